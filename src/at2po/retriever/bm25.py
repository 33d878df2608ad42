"""A BM25 index over a passage corpus (bm25s), and the corpus reader.

Used in-process by the local search tool (``at2po.tools.search``) and served by the retriever
service (``at2po.retriever``); it knows nothing of either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DOCS_FILE = "docs.jsonl"


def load_corpus(path: str | Path) -> list[dict[str, Any]]:
    """Read a Search-R1/FlashRAG corpus: one JSON object ``{"id", "contents"}`` per line.

    Ids must be unique: a retriever answers with them, and two passages under one id would make
    every hit of either ambiguous."""
    from at2po.data import read_jsonl

    rows = []
    first_line: dict[str, str] = {}
    for where, row in read_jsonl(path, "corpus file"):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "id" not in row:
            raise ValueError(f"{where}: missing field 'id'")
        if not isinstance(row["id"], (str, int)):
            raise ValueError(f"{where}: field 'id' must be a string or integer")
        if "contents" not in row:
            raise ValueError(f"{where}: missing field 'contents'")
        if not isinstance(row["contents"], str):
            raise ValueError(f"{where}: field 'contents' must be a string, got {type(row['contents']).__name__}")
        key = str(row["id"])
        if key in first_line:
            raise ValueError(f"{where}: id {row['id']!r} was already used at {first_line[key]}; ids must be unique")
        first_line[key] = where
        rows.append(row)
    return rows


def _tokenize(texts: list[str], return_ids: bool) -> Any:
    import bm25s  # heavy import (scipy); only needed for the local index

    # English stop words, no stemmer: no dependency beyond bm25s itself.
    return bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)


class BM25Index:
    """A bm25s index over a list of passages."""

    def __init__(self, docs: list[str]) -> None:
        import bm25s

        if not docs:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        self.docs = list(docs)
        tokens = _tokenize(self.docs, return_ids=True)
        if not tokens.vocab:  # bm25s itself fails with "max() arg is an empty sequence"
            raise ValueError(f"nothing to index: none of the {len(self.docs)} passages has a word that is not an "
                             "English stop word")
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)

    def search(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        """For each query, up to ``topk`` (doc_index, score) pairs, best first, score > 0.

        Queries with no indexed word (empty, only stop words, unknown words) get [].
        """
        if not queries:
            return []
        vocab = self._retriever.vocab_dict
        token_lists = [
            [token for token in tokens if token and token in vocab]
            for tokens in _tokenize(queries, return_ids=False)
        ]
        hits: list[list[tuple[int, float]]] = [[] for _ in queries]
        searchable = [i for i, tokens in enumerate(token_lists) if tokens]
        k = min(topk, len(self.docs))
        if not searchable or k < 1:
            return hits
        doc_ids, scores = self._retriever.retrieve(
            [token_lists[i] for i in searchable], k=k, show_progress=False
        )
        for row, i in enumerate(searchable):
            hits[i] = [
                (int(doc), float(score))
                for doc, score in zip(doc_ids[row], scores[row])
                if score > 0  # bm25s pads with zero-score documents that match nothing
            ]
        return hits

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(directory), show_progress=False)
        with open(directory / _DOCS_FILE, "w", encoding="utf-8") as f:
            for i, doc in enumerate(self.docs):
                f.write(json.dumps({"id": str(i), "contents": doc}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        import bm25s

        directory = Path(directory)
        index = cls.__new__(cls)
        index.docs = [row["contents"] for row in load_corpus(directory / _DOCS_FILE)]
        index._retriever = bm25s.BM25.load(str(directory), show_progress=False)
        # A docs.jsonl cut short at a line break still reads, but its hits would point past its end.
        indexed = index._retriever.scores.get("num_docs") if isinstance(index._retriever.scores, dict) else None
        if indexed is not None and indexed != len(index.docs):
            raise ValueError(f"{directory}: {_DOCS_FILE} holds {len(index.docs)} passages but the BM25 index "
                             f"{indexed} ({_DOCS_FILE} was cut short or replaced): rebuild the index with "
                             "`at2po retriever build`")
        return index
