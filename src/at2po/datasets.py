"""The paper's seven QA benchmarks (docs/method.md §5) and the two file formats they come in.

* FlashRAG jsonl: one ``{"id", "question", "golden_answers"}`` object per line (``at2po.data``).
* Search-R1 parquet: columns ``data_source``, ``prompt`` (chat messages, the question in the user
  message after ``Question:``), ``reward_model`` ``{"style", "ground_truth": {"target": [...]}}``,
  ``extra_info`` ``{"split", "index"}``; Search-R1's own files also keep FlashRAG's ``id``,
  ``question`` and ``golden_answers`` columns, and a combined test file mixes several benchmarks,
  told apart by ``data_source``.

Every row read is validated; errors name the file, the row and the field.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from at2po.data import QARow, check_text, load_qa_jsonl, row_from_dict, write_qa_jsonl

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "FLASHRAG_REPO",
    "add_cli",
    "convert",
    "load_qa_by_source",
    "load_qa_file",
    "prepare",
    "write_qa_file",
]

FLASHRAG_REPO = "RUC-NLPIR/FlashRAG_datasets"


@dataclass(frozen=True)
class BenchmarkInfo:
    name: str
    eval_split: str  # the split the paper reports (§5)
    n_eval: int  # its number of questions
    multi_hop: bool
    flashrag_name: str  # folder in FlashRAG's dataset layout / config name on the Hub
    train_split: str | None = None  # the split the paper trains on, if any


BENCHMARKS: dict[str, BenchmarkInfo] = {
    info.name: info
    for info in (
        BenchmarkInfo("nq", "test", 3610, False, "nq", train_split="train"),
        BenchmarkInfo("triviaqa", "test", 11313, False, "triviaqa"),
        BenchmarkInfo("popqa", "test", 14267, False, "popqa"),
        BenchmarkInfo("hotpotqa", "dev", 7405, True, "hotpotqa", train_split="train"),
        BenchmarkInfo("2wikimultihopqa", "dev", 12576, True, "2wikimultihopqa"),
        BenchmarkInfo("musique", "dev", 2417, True, "musique"),
        BenchmarkInfo("bamboogle", "test", 125, True, "bamboogle"),
    )
}

_PARQUET = ".parquet"
_JSON_SUFFIXES = (".jsonl", ".json")
_SPLIT_NAMES = ("train", "dev", "test", "validation", "val")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (_PARQUET, *_JSON_SUFFIXES):
        raise ValueError(f"{path}: unknown QA file type {suffix!r}; expected .jsonl, .json or .parquet")
    return suffix


def _load_json_file(path: Path) -> list[QARow]:
    """A .json file is either one JSON array of rows or, as often, jsonl under another name."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        return load_qa_jsonl(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    rows = []
    for i, d in enumerate(records, start=1):
        check_text(d, f"{path}, row {i}")
        rows.append(row_from_dict(d, f"{path}, row {i}"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _question_from_prompt(prompt: Any, where: str) -> str:
    """The text after the last ``Question:`` in the last user message of a chat prompt."""
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of chat messages")
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1] if users else None
    if not isinstance(content, str) or "Question:" not in content:
        raise ValueError(
            f"{where}: no question found: there is no 'question' column, no extra_info.question, "
            f"and the user message of field 'prompt' has no 'Question:'"
        )
    return content.rsplit("Question:", 1)[1].strip()


def parquet_record(raw: dict[str, Any], where: str) -> tuple[str | None, QARow]:
    """(data_source, row) from one Search-R1 parquet record."""
    extra = raw.get("extra_info") if isinstance(raw.get("extra_info"), dict) else {}
    question = raw.get("question") or extra.get("question")
    if question is None:
        question = _question_from_prompt(raw.get("prompt"), where)
    reward = raw.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    # The reward target is what Search-R1 scores against; golden_answers is the fallback.
    golds = truth.get("target") if isinstance(truth, dict) else None
    if golds is None:
        golds = raw.get("golden_answers")
    if golds is None:
        raise ValueError(f"{where}: field 'reward_model.ground_truth.target' is missing")
    rid = raw.get("id")
    if rid is None:
        rid = extra.get("index", where)
    data_source = raw.get("data_source")
    row = {"id": rid, "question": question, "golden_answers": golds}
    if data_source is not None:
        row["data_source"] = data_source
    return data_source, row_from_dict(row, where)


def _read_parquet(path: Path) -> list[tuple[str | None, QARow]]:
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
    if not records:
        raise ValueError(f"{path}: no rows")
    return [parquet_record(raw, f"{path}, row {i}") for i, raw in enumerate(records, start=1)]


def load_qa_file(path: str | Path, data_source: str | None = None) -> list[QARow]:
    """Validated rows of a FlashRAG ``.jsonl``/``.json`` or a Search-R1 ``.parquet`` file.

    ``data_source`` keeps only that benchmark's rows of a parquet file that mixes several
    (Search-R1's combined test set); it is an error when no row has it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    if _suffix(path) != _PARQUET:
        if data_source is not None:
            raise ValueError(f"{path}: data_source filtering needs a parquet file (jsonl rows have none)")
        return load_qa_jsonl(path) if path.suffix.lower() == ".jsonl" else _load_json_file(path)
    records = _read_parquet(path)
    if data_source is None:
        return [row for _, row in records]
    rows = [row for source, row in records if source == data_source]
    if not rows:
        found = sorted({str(source) for source, _ in records})
        raise ValueError(f"{path}: no rows with data_source {data_source!r} (found: {', '.join(found)})")
    return rows


def load_qa_by_source(path: str | Path) -> dict[str, list[QARow]]:
    """Rows of a QA file grouped by benchmark, for per-benchmark scores.

    Parquet rows are grouped by ``data_source``; a jsonl file is one group named after the
    benchmark in its path (``.../hotpotqa/dev.jsonl``), else after the file's stem.
    """
    path = Path(path)
    if _suffix(path) != _PARQUET:
        name = _benchmark_in_path(path) or path.stem
        return {name: load_qa_file(path)}
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    groups: dict[str, list[QARow]] = {}
    for source, row in _read_parquet(path):
        groups.setdefault(source or "unknown", []).append(row)
    return groups


# ---------------------------------------------------------------------------------------------
# Writing and converting
# ---------------------------------------------------------------------------------------------


def _benchmark_in_path(path: Path) -> str | None:
    """The benchmark a file belongs to, from a path component (``data/hotpotqa/dev.jsonl``)."""
    for part in reversed([*path.parent.parts, path.stem]):
        if part.lower() in BENCHMARKS:
            return part.lower()
    return None


def _split_in_path(path: Path) -> str:
    stem = path.stem.lower()
    return stem if stem in _SPLIT_NAMES else "test"


def _search_r1_prompt(question: str) -> list[dict[str, str]]:
    # at2po's own protocol (agent.render_prompt): the paper's system prompt, "Question: ...".
    from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT

    return [
        {"role": "system", "content": PAPER_SYSTEM_PROMPT},
        {"role": "user", "content": f"Question: {question}"},
    ]


def _write_parquet(rows: list[QARow], data_source: str, split: str, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {
            "id": row.id,
            "question": row.question,
            "golden_answers": list(row.golds),
            "data_source": row.data_source or data_source,
            "prompt": _search_r1_prompt(row.question),
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(row.golds)}},
            "extra_info": {"split": split, "index": i},
        }
        for i, row in enumerate(rows)
    ]
    pq.write_table(pa.Table.from_pylist(records), path)


def write_qa_file(
    rows: list[QARow],
    path: str | Path,
    data_source: str | None = None,
    split: str | None = None,
) -> None:
    """Write rows as FlashRAG jsonl or, for ``.parquet``, in Search-R1's layout.

    Parquet needs the benchmark name for ``data_source`` (Search-R1 picks its reward function by
    it): given, or found in the path; ``split`` defaults to the file's stem when that is a split
    name, else ``test``.
    """
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix != _PARQUET:
        write_qa_jsonl(rows, path)
        return
    data_source = data_source or _benchmark_in_path(path)
    if data_source is None and not all(row.data_source for row in rows):
        raise ValueError(
            f"{path}: cannot tell the benchmark for the parquet column 'data_source' from the path; "
            f"pass data_source (one of: {', '.join(BENCHMARKS)})"
        )
    _write_parquet(rows, data_source, split or _split_in_path(path), path)


def convert(src: str | Path, dst: str | Path, data_source: str | None = None, split: str | None = None) -> int:
    """Convert a QA file between FlashRAG jsonl and Search-R1 parquet (by extension); rows written.

    Every row is validated on the way. For parquet output ``data_source`` comes from the
    argument or the benchmark named in either path, ``split`` from the argument or the source
    file's stem (see ``write_qa_file``).
    """
    src, dst = Path(src), Path(dst)
    if (_suffix(src) == _PARQUET) == (_suffix(dst) == _PARQUET):
        raise ValueError(f"{src} -> {dst}: both files have the same format; convert jsonl <-> parquet")
    rows = _unique_ids(load_qa_file(src), src)
    source = data_source or _benchmark_in_path(dst) or _benchmark_in_path(src)
    write_qa_file(rows, dst, data_source=source, split=split or _split_in_path(src))
    return len(rows)


def _unique_ids(rows: list[QARow], src: Path) -> list[QARow]:
    """Rows whose ids are unique in the file: a file that mixes benchmarks (Search-R1's combined
    test set numbers each benchmark's rows from 0) gets ids qualified by their data_source
    ("nq_0"); ids repeated within one benchmark are an error."""
    seen: dict[tuple[str | None, str], int] = {}
    for i, row in enumerate(rows, start=1):
        key = (row.data_source, row.id)
        if key in seen:
            within = f" of data_source {row.data_source!r}" if row.data_source else ""
            raise ValueError(f"{src}: id {row.id!r}{within} is used by rows {seen[key]} and {i}; ids must be unique")
        seen[key] = i
    if len({row.id for row in rows}) == len(rows):
        return rows
    return [replace(row, id=f"{row.data_source}_{row.id}") for row in rows]


# ---------------------------------------------------------------------------------------------
# Preparing the benchmarks
# ---------------------------------------------------------------------------------------------


def _default_splits(info: BenchmarkInfo) -> list[str]:
    return [info.eval_split] + ([info.train_split] if info.train_split else [])


def _download(info: BenchmarkInfo, split: str, raw_dir: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RuntimeError("--download needs huggingface_hub: pip install huggingface_hub") from None
    hf_hub_download(
        repo_id=FLASHRAG_REPO,
        repo_type="dataset",
        filename=f"{info.flashrag_name}/{split}.jsonl",
        local_dir=str(raw_dir),
    )


def prepare(
    raw_dir: str | Path,
    out_dir: str | Path,
    datasets: list[str] | None = None,
    splits: list[str] | None = None,
    download: bool = False,
) -> dict[tuple[str, str], int]:
    """Validate FlashRAG's ``raw_dir/<name>/<split>.jsonl`` files into ``out_dir/<name>/<split>.jsonl``.

    ``datasets`` defaults to all seven benchmarks; ``splits`` to each one's evaluation split plus
    its training split where the paper trains on it (NQ, HotpotQA). With ``download`` missing
    files are first fetched from the Hugging Face Hub (``RUC-NLPIR/FlashRAG_datasets``) into
    ``raw_dir``. An evaluation split whose size differs from the paper's is written with a
    warning. Returns the number of rows written per (dataset, split).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    names = list(datasets or BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    counts: dict[tuple[str, str], int] = {}
    for name in names:
        info = BENCHMARKS[name]
        for split in splits or _default_splits(info):
            src = raw_dir / info.flashrag_name / f"{split}.jsonl"
            if not src.is_file() and download:
                _download(info, split, raw_dir)
            if not src.is_file():
                raise FileNotFoundError(
                    f"{src} not found: expected FlashRAG's layout <raw>/<dataset>/<split>.jsonl "
                    f"(or pass download=True / --download to fetch it from {FLASHRAG_REPO})"
                )
            rows = load_qa_jsonl(src)
            if split == info.eval_split and len(rows) != info.n_eval:
                warnings.warn(
                    f"{src}: {len(rows)} rows, but the paper evaluates {name} {split} on {info.n_eval}",
                    stacklevel=2,
                )
            dst = out_dir / name / f"{split}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_qa_jsonl(rows, dst)
            counts[(name, split)] = len(rows)
    return counts


# ---------------------------------------------------------------------------------------------
# Command line: `at2po data prepare|convert`
# ---------------------------------------------------------------------------------------------


def _cmd_prepare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = prepare(args.raw, args.out, args.datasets, args.splits, download=args.download)
    for (name, split), n in counts.items():
        info = BENCHMARKS[name]
        expected = f"(paper: {info.n_eval})" if split == info.eval_split else ""
        print(f"{name:<16} {split:<6} {n:>7} rows {expected}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {len(counts)} file(s) under {args.out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    n = convert(args.src, args.dst, data_source=args.data_source, split=args.split)
    print(f"wrote {n} rows to {args.dst}")
    return 0


def describe_benchmarks() -> str:
    """"nq (test 3610), ..." for help texts."""
    return ", ".join(f"{n} ({i.eval_split} {i.n_eval})" for n, i in BENCHMARKS.items())


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data prepare`` and ``data convert``; each sets ``args.func(args) -> int``."""
    data = subparsers.add_parser(
        "data",
        help="prepare the paper's QA benchmarks and convert QA files",
        description="Prepare the seven QA benchmarks and convert between FlashRAG jsonl and Search-R1 parquet.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    names = describe_benchmarks()

    p = sub.add_parser(
        "prepare",
        help="validate FlashRAG dataset files into <out>/<dataset>/<split>.jsonl",
        description=(
            "Read FlashRAG's layout <raw>/<dataset>/<split>.jsonl, validate every row and write "
            f"<out>/<dataset>/<split>.jsonl. Benchmarks (paper's evaluation split and size): {names}."
        ),
    )
    p.add_argument("--raw", required=True, type=Path, help="local copy of FlashRAG's dataset folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--datasets", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
        help="benchmarks to prepare (default: all seven)",
    )
    p.add_argument(
        "--splits", nargs="+", metavar="SPLIT",
        help="splits to prepare (default: each benchmark's evaluation split, plus train for nq and hotpotqa)",
    )
    p.add_argument(
        "--download", action="store_true",
        help=f"fetch missing files from the Hugging Face Hub ({FLASHRAG_REPO}) into --raw first (needs network)",
    )
    p.set_defaults(func=_cmd_prepare)

    c = sub.add_parser(
        "convert",
        help="convert a QA file between FlashRAG jsonl and Search-R1 parquet",
        description=(
            "Convert SRC to DST, the formats given by the extensions (.jsonl/.json or .parquet), "
            "validating every row. Parquet is written in Search-R1's layout (data_source, prompt, "
            "reward_model.ground_truth.target, extra_info). Each row keeps its data_source; in a file "
            "that mixes benchmarks with ids repeated across them, ids become <data_source>_<id>."
        ),
    )
    c.add_argument("src", type=Path, help="input file (.jsonl, .json or .parquet)")
    c.add_argument("dst", type=Path, help="output file (.jsonl or .parquet)")
    c.add_argument(
        "--data-source", metavar="NAME",
        help="parquet data_source, the benchmark (default: the one named in either path, e.g. data/hotpotqa/dev.jsonl)",
    )
    c.add_argument(
        "--split", help="parquet extra_info.split (default: the input file's stem if a split name, else test)"
    )
    c.set_defaults(func=_cmd_convert)
    return data
