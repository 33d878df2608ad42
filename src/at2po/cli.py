"""Command-line entry point: `at2po --help`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="at2po",
        description="AT²PO: agentic turn-based policy optimisation via tree search (arXiv 2601.04767).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show tree expansion, turn-wise credit and the ATPO loss on a toy tree")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--chains", type=int, default=4, help="initial chains M (default 4)")
    demo.add_argument("--rounds", type=int, default=2, help="expansion rounds L (default 2)")
    demo.add_argument("--top-k", type=int, default=2, help="nodes expanded per round K (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from at2po.demo import run_demo

        run_demo(seed=args.seed, m=args.chains, rounds=args.rounds, k=args.top_k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
