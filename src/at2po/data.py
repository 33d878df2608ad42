"""QA data rows: FlashRAG jsonl ({"id", "question", "golden_answers"}), validated at the boundary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QARow:
    id: str
    question: str
    golds: tuple[str, ...]
    # The benchmark a row of a mixed file belongs to (Search-R1's parquet column, kept in jsonl);
    # not part of a row's identity.
    data_source: str | None = field(default=None, compare=False)


def row_from_dict(d: dict, where: str) -> QARow:
    """Validate one record; ``where`` ("file:line") is named in every error."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    question = d.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' is missing or empty")
    golds = d.get("golden_answers", d.get("golds", d.get("answer")))
    if isinstance(golds, str):
        golds = [golds]
    if not isinstance(golds, (list, tuple)) or not golds or not all(isinstance(g, str) and g.strip() for g in golds):
        raise ValueError(f"{where}: field 'golden_answers' must be a non-empty list of non-empty strings, got {golds!r}")
    source = d.get("data_source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise ValueError(f"{where}: field 'data_source' must be a non-empty string, got {source!r}")
    rid = d.get("id", where)
    return QARow(id=str(rid), question=question.strip(), golds=tuple(g.strip() for g in golds), data_source=source)


def _lone_surrogate(value: Any, field: str) -> tuple[str, str] | None:
    """(field, the surrogate) of the first string in ``value`` that holds a lone UTF-16 surrogate
    (JSON lets an escape such as "\\ud800" write one), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return field, value[e.start]
    elif isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _lone_surrogate(v, f"{field}.{k}" if field else str(k)))),
                    None)
    elif isinstance(value, list):
        return next((found for i, v in enumerate(value) if (found := _lone_surrogate(v, f"{field}[{i}]"))), None)
    return None


def check_text(record: Any, where: str) -> None:
    """Refuse a record whose strings are not all text: a lone surrogate cannot be encoded, and
    the tokenizer would fail on it mid-run without naming the row."""
    found = _lone_surrogate(record, "")
    if found is not None:
        field, char = found
        raise ValueError(f"{where}: field {field!r} holds a lone surrogate ({char.encode('unicode_escape').decode()}), "
                         "which is not text: fix or drop that escape in the file")


def read_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every non-blank line of a jsonl file; ``where`` is "file:line".

    A missing file, a line that is not JSON, text that is not UTF-8 and a string with a lone
    surrogate raise errors that name the file (and the line, and the field); what a record must hold is the caller's to check.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        check_text(record, f"{path}:{line_no}")
        yield f"{path}:{line_no}", record


def load_qa_jsonl(path: str | Path) -> list[QARow]:
    rows = [row_from_dict(record, where) for where, record in read_jsonl(path, "QA file")]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def write_qa_jsonl(rows: list[QARow], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            source = {"data_source": r.data_source} if r.data_source else {}
            f.write(json.dumps({"id": r.id, "question": r.question, "golden_answers": list(r.golds), **source}) + "\n")
