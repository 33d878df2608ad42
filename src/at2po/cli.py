"""Command-line entry point: `at2po --help`."""

from __future__ import annotations

import argparse
import os
import sys

# Optional dependencies and the extra that installs each (pyproject.toml). A core install
# (`pip install at2po`) has the algorithms only; commands that need more say which extra.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("transformers", "tokenizers", "bm25s", "requests", "safetensors"), "agent"),
    **dict.fromkeys(("accelerate", "yaml", "tqdm", "tensorboard", "matplotlib"), "train"),
    **dict.fromkeys(("pyarrow", "fastapi", "uvicorn", "faiss", "sentence_transformers", "pydantic"), "retriever"),
}


# The extra that gives a command everything it needs (an extra includes the ones it builds on).
EXTRA_OF_COMMAND = {"quickstart": "train", "train": "train", "config": "train", "eval": "train",
                    "retriever": "retriever", "data": "retriever"}


def missing_extra_message(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one-line install hint for a missing optional dependency, or None for any other module."""
    root = (exc.name or "").split(".")[0]
    if root not in EXTRA_OF_MODULE:
        return None
    extra = EXTRA_OF_COMMAND.get(command, EXTRA_OF_MODULE[root])
    return f"this command needs {root!r}, which the {extra!r} extra installs: pip install 'at2po[{extra}]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="at2po",
        description="AT²PO: agentic turn-based policy optimisation via tree search (arXiv 2601.04767).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    qs = sub.add_parser(
        "quickstart",
        help="build a synthetic multi-hop search task and a tiny model, warm-start it, train it with AT²PO on CPU",
        description="Builds a synthetic multi-hop world with a BM25-searchable corpus, a locally trained "
        "tokenizer and a tiny Qwen2 model, warm-starts the model on demonstrations, trains it with AT²PO "
        "(the same trainer as `at2po train`), then prints held-out EM before/after RL and saves curves.",
    )
    qs.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    qs.add_argument("--seed", type=int, default=0, help="seed of the world, the model and training (default 0)")
    qs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training config field, e.g. --set trainer.steps=20 (repeatable)")
    qs.add_argument("--no-progress", action="store_true", help="no progress bars")
    qs.add_argument("--overwrite", action="store_true",
                    help="start over in an --out that holds an earlier run (deletes its checkpoints and logs)")

    tr = sub.add_parser("train", help="train from a YAML config (see README: every field and its default)")
    tr.add_argument("--config", help="YAML file whose sections mirror at2po.config.Config")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.output_dir")
    tr.add_argument("--overwrite", action="store_true",
                    help="start a fresh run in a non-empty trainer.output_dir (deletes its checkpoints and logs)")
    tr.add_argument("--force-resume", action="store_true",
                    help="resume although the config changes the algorithm or the data (see README)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. rollout.top_k=4")

    cfg = sub.add_parser("config", help="print the full default config (or a file merged with overrides) as YAML")
    cfg.add_argument("--config", help="YAML file to merge")
    cfg.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    from at2po.datasets import add_cli as add_data_cli
    from at2po.evaluation.benchmarks import add_cli as add_eval_cli
    from at2po.retriever import add_cli as add_retriever_cli

    add_eval_cli(sub)
    add_retriever_cli(sub)
    add_data_cli(sub)

    demo = sub.add_parser("demo", help="show tree expansion, turn-wise credit and the ATPO loss on a toy tree")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--chains", type=int, default=4, help="initial chains M (default 4)")
    demo.add_argument("--rounds", type=int, default=2, help="expansion rounds L (default 2)")
    demo.add_argument("--top-k", type=int, default=2, help="nodes expanded per round K (default 2)")
    return parser


def _one_line(e: BaseException) -> str:
    """The error as one line; an OSError names its file ("[Errno 13] Permission denied: 'x'" as is)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "quickstart":
            from at2po.quickstart import run_quickstart

            run_quickstart(args.out, seed=args.seed, overrides=args.overrides, progress=not args.no_progress,
                           overwrite=args.overwrite)
        elif args.command == "train":
            from at2po.config import load_config
            from at2po.training.trainer import train

            if args.overwrite and args.resume:
                raise ValueError("--overwrite and --resume contradict each other: pass one")
            train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite,
                  force_resume=args.force_resume)
        elif args.command == "config":
            import yaml

            from at2po.config import config_to_dict, load_config

            print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
        elif hasattr(args, "func"):  # subcommands registered by their own modules
            return args.func(args)
        elif args.command == "demo":
            from at2po.demo import run_demo

            run_demo(seed=args.seed, m=args.chains, rounds=args.rounds, k=args.top_k)
    except ModuleNotFoundError as e:
        message = missing_extra_message(e, args.command)
        if message is None or os.environ.get("AT2PO_DEBUG"):
            raise
        print(f"at2po {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        # Configuration, data and file-system problems (a read-only directory, a full disk): one
        # clear line. AT2PO_DEBUG=1 shows the traceback.
        if os.environ.get("AT2PO_DEBUG"):
            raise
        print(f"at2po {args.command}: error: {_one_line(e)}  (AT2PO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"at2po {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
