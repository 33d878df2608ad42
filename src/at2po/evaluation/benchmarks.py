"""Greedy evaluation on the paper's QA benchmarks (docs/method.md §5), resumable, reported as Table 1.

``evaluate`` runs the shared greedy evaluator (``at2po.evaluation.evaluator``, one chain per
question) with the model of ``cfg.model.path`` and the task and tools of the config over any set of the seven benchmarks, given
as FlashRAG jsonl or Search-R1 parquet files. Per-sample results go to ``<out>/<dataset>.jsonl``
batch by batch, so an interrupted run resumes where it stopped; the summary goes to
``<out>/results.json`` and ``<out>/results.md`` (EM in %, averages weighted by sample count).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from at2po.data import QARow
from at2po.datasets import BENCHMARKS, describe_benchmarks, load_qa_by_source

if TYPE_CHECKING:  # the model stack loads only when an evaluation runs (keeps `at2po --help` fast)
    from at2po.config import Config
    from at2po.rollout.engine import TreeRolloutEngine

__all__ = [
    "RESULTS_JSON",
    "RESULTS_MD",
    "add_cli",
    "default_name",
    "evaluate",
    "load_eval_datasets",
    "read_records",
    "results_markdown",
    "summarize",
]

PathLike = str | Path
DatasetSpec = Mapping[str, PathLike] | Sequence[PathLike | tuple[str | None, PathLike]]

RESULTS_JSON = "results.json"
SCORER_NOTE = "em: at2po's format-checked EM; atpo_em_eval: the authors' validation scorer, no format gate"
RESULTS_MD = "results.md"
SETTINGS_FILE = "eval_settings.json"  # what produced the per-sample files; a resume must match it

# Column labels of the paper's Table 1; BENCHMARKS is already in the paper's column order.
LABELS = {
    "nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
    "2wikimultihopqa": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle",
}
ALIASES = {"2wiki": "2wikimultihopqa"}
GROUPS = {"single_hop": "Single-hop Avg.", "multi_hop": "Multi-hop Avg."}
_NAME_RE = re.compile(r"[\w.-]+")


# -- datasets ------------------------------------------------------------------------------------
def _canonical(name: str) -> str:
    name = name.strip()
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"dataset name {name!r} may only hold letters, digits, '_', '-' and '.'")
    return ALIASES.get(name.lower(), name.lower() if name.lower() in BENCHMARKS else name)


def _named_rows(name: str, path: Path) -> list[QARow]:
    groups = load_qa_by_source(path)
    if len(groups) == 1:
        return next(iter(groups.values()))
    # A Search-R1 test file mixing benchmarks: take the named one's rows.
    matches = [rows for source, rows in groups.items() if _canonical(source) == name]
    if not matches:
        raise ValueError(f"{path}: holds {', '.join(sorted(groups))}, not {name!r}")
    return matches[0]


def load_eval_datasets(datasets: DatasetSpec) -> dict[str, list[QARow]]:
    """Rows per dataset name from ``{name: path}``, or a list of paths or ``(name | None, path)`` pairs.

    Without a name a jsonl file is named after the benchmark in its path (``data/hotpotqa/dev.jsonl``)
    or its stem, and a parquet file after its ``data_source`` column (one dataset per source).
    Ids must be unique within a dataset: they key the per-sample results a resume skips.
    """
    entries = datasets.items() if isinstance(datasets, Mapping) else [
        d if isinstance(d, tuple) else (None, d) for d in datasets
    ]
    out: dict[str, list[QARow]] = {}
    for name, path in entries:
        path = Path(path)
        if name is None:
            found = {_canonical(source): rows for source, rows in load_qa_by_source(path).items()}
        else:
            found = {_canonical(name): _named_rows(_canonical(name), path)}
        for key, rows in found.items():
            if key in out:
                raise ValueError(f"dataset {key!r} is given twice (again in {path})")
            seen: set[str] = set()
            for row in rows:
                if row.id in seen:
                    raise ValueError(f"{path}: id {row.id!r} occurs twice in {key!r}; ids must be unique")
                seen.add(row.id)
            out[key] = rows
    if not out:
        raise ValueError("no dataset to evaluate")
    return out


# -- per-sample files ----------------------------------------------------------------------------
def read_records(path: PathLike) -> list[dict[str, Any]]:
    """The complete records of a per-sample file; a line cut short by an interruption is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
    return records


def _resume_file(path: Path, resume: bool, rows: Sequence[QARow]) -> dict[str, dict[str, Any]]:
    """Finished records by id; the file is rewritten to just those (appends then start on a fresh line).
    A record with a tool call that failed for infrastructure reasons (the retriever unreachable, a
    timeout, a 5xx) is not finished: it is dropped and evaluated again. Wrong answers stay.
    Records of questions that ``rows`` (the dataset's whole file) does not hold as they were
    asked are refused before anything is rewritten: the dataset's name now stands for another file."""
    done: dict[str, dict[str, Any]] = {}
    if resume:
        for rec in read_records(path):
            if rec.get("infra_failures", 0):
                continue
            done.setdefault(str(rec["id"]), rec)
        asked = {row.id: (row.question, list(row.golds)) for row in rows}
        other = [rid for rid, rec in done.items() if asked.get(rid) != (rec.get("prompt"), rec.get("target"))]
        if other:
            rid = other[0]
            now = f"{asked[rid][0]!r}" if rid in asked else "no such id"
            raise ValueError(f"{path} holds records of another file than dataset {path.stem!r} is now read from "
                             f"({len(other)} of {len(done)} differ; id {rid}: {done[rid].get('prompt')!r} then, "
                             f"{now} now): pass --no-resume to start it over, or give this file another "
                             "dataset name or --out")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
    os.replace(tmp, path)
    return done


def _settings(cfg: Config, system_prompt: str) -> dict[str, Any]:
    """Everything that changes a greedy answer, the retriever's URL included (another service may
    hold another corpus). Not the failure limit, which only decides when a run stops."""
    import dataclasses

    t, r = cfg.tools, cfg.rollout
    search = {k: v for k, v in dataclasses.asdict(t.search).items() if k != "max_consecutive_failures"}
    settings = {
        "model": {"path": cfg.model.path, "tokenizer_path": cfg.model.tokenizer_path, "dtype": cfg.model.dtype},
        # What the reward reads: results saved before it read only the policy's own tokens were
        # scored on observations too and must not be mixed with these.
        "task": {"name": cfg.task.name, "options": cfg.task.options,
                 "scored": "response" if cfg.task.options.get("score_observations") else "policy tokens"},
        "system_prompt": system_prompt,
        "tools": {"enabled": t.enabled, "search": search, "python": dataclasses.asdict(t.python), "options": t.options},
        # Not chunk_tokens: a turn that reaches it goes on in the next call, the answer is the same.
        "rollout": {"max_tool_calls": r.max_tool_calls, "max_turns": r.max_turns,
                    "max_response_tokens": r.max_response_tokens},
    }
    # The switches of the authors' setup, only where they are set (so that runs made before they
    # existed still resume): each changes prompts, turn endings or observations.
    d = cfg.data
    if d.prompt_layout != "chat":
        settings["prompt_layout"] = {"layout": d.prompt_layout, "atpo_backspace_quirk": d.atpo_backspace_quirk}
    for key, default in (("stop_at_answer", True), ("env_compat", "at2po")):
        if getattr(r, key) != default:
            settings["rollout"][key] = getattr(r, key)
    return settings


def _check_settings(out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    path = out_dir / SETTINGS_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            diff = [k for k in settings if old.get(k) != settings[k]]
            raise ValueError(
                f"{out_dir} holds results of another setting ({', '.join(diff)} differ): "
                "pass --no-resume (resume=False) to start over, or another --out"
            )
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


# -- summary -------------------------------------------------------------------------------------
def _means(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    n = len(records)

    def mean(key: str, scale: float = 1.0) -> float:
        return scale * sum(float(r[key]) for r in records) / n if n else 0.0

    return {"n": n, "em": mean("em", 100), "f1": mean("f1", 100), "format_ok": mean("format_ok", 100),
            "turns": mean("turns"), "tool_calls": mean("tool_calls"),
            "tool_failures": sum(int(r.get("tool_failures", 0)) for r in records),
            "infra_failures": sum(int(r.get("infra_failures", 0)) for r in records)}


def summarize(records: Mapping[str, Sequence[dict[str, Any]]], name: str = "", model: str = "") -> dict[str, Any]:
    """Per-dataset EM/F1/format (%), turns and tool calls per sample, and the single-/multi-hop
    averages weighted by sample count (Σ over the group's samples / their number)."""
    order = [b for b in BENCHMARKS if b in records] + [d for d in records if d not in BENCHMARKS]
    datasets = {}
    for d in order:
        datasets[d] = {**_means(records[d]), "file": f"{d}.jsonl"}
        if d in BENCHMARKS:
            datasets[d]["paper_n"] = BENCHMARKS[d].n_eval
    averages = {}
    for group, multi in (("single_hop", False), ("multi_hop", True)):
        members = [d for d in order if d in BENCHMARKS and BENCHMARKS[d].multi_hop == multi]
        if members:
            averages[group] = {**_means([r for d in members for r in records[d]]), "datasets": members}
    return {"name": name, "model": model, "datasets": datasets, "averages": averages}


def _columns(results: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(kind, key, label) of Table 1's columns that any result has, in the paper's order."""
    present = {d for r in results for d in r["datasets"]}
    groups = {g for r in results for g in r["averages"]}
    cols = []
    for group, multi in (("single_hop", False), ("multi_hop", True)):
        cols += [("datasets", b, LABELS[b]) for b in BENCHMARKS if b in present and BENCHMARKS[b].multi_hop == multi]
        if group in groups:
            cols.append(("averages", group, GROUPS[group]))
    others = dict.fromkeys(d for r in results for d in r["datasets"] if d not in BENCHMARKS)
    return cols + [("datasets", d, d) for d in others]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Table 1's layout (one row per method, EM %), then F1 %, turns and tool calls per column."""
    cols = _columns(results)
    scorers = ", ".join(dict.fromkeys(r.get("scorer", "em") for r in results))
    lines = ["## EM (%), greedy", "", f"Scorer: {scorers} ({SCORER_NOTE})", "",
             _row(["Method", *(label for _, _, label in cols)]),
             _row(["---", *("---:" for _ in cols)])]
    for r in results:
        cells = [r[kind].get(key) for kind, key, _ in cols]
        lines.append(_row([r["name"], *(f"{c['em']:.2f}" if c else "–" for c in cells)]))
    lines += ["", "## Details", "",
              _row(["Method", "Dataset", "N", "EM (%)", "F1 (%)", "Format OK (%)", "Turns", "Tool calls"]),
              _row(["---", "---", *("---:" for _ in range(6))])]
    for r in results:
        for kind, key, label in cols:
            c = r[kind].get(key)
            if c:
                lines.append(_row([r["name"], label, str(c["n"]), f"{c['em']:.2f}", f"{c['f1']:.2f}",
                                   f"{c['format_ok']:.2f}", f"{c['turns']:.2f}", f"{c['tool_calls']:.2f}"]))
    return "\n".join(lines) + "\n"


# -- evaluation ----------------------------------------------------------------------------------
def default_name(cfg: Config) -> str:
    return Path(cfg.model.path.rstrip("/")).name or "model"


def _run_dataset(engine: TreeRolloutEngine, name: str, rows: list[QARow], done: dict[str, dict[str, Any]],
                 path: Path, batch_size: int, progress: bool, context: int | None = None) -> None:
    """Evaluate the rows not in ``done``, appending each batch's records to ``path`` (and to ``done``).
    A question too long for ``context`` counts as wrong without being generated (``evaluate_greedy``)."""
    from tqdm.auto import tqdm

    from at2po.evaluation.evaluator import evaluate_greedy
    from at2po.tasks.base import Sample
    from at2po.tools.health import check_tools

    todo = [Sample(row.id, row.question, row.golds) for row in rows if row.id not in done]
    n_done = len(rows) - len(todo)
    em_sum = sum(float(done[row.id]["em"]) for row in rows if row.id in done)
    with path.open("a", encoding="utf-8") as f, tqdm(
        total=len(rows), initial=n_done, desc=name, unit="q", disable=not progress, dynamic_ncols=True
    ) as bar:

        def write(batch: list[dict[str, Any]]) -> None:
            nonlocal n_done, em_sum
            check_tools(engine.tools.values())  # a dead retriever stops the run; this batch is redone later
            for rec in batch:
                done[rec["id"]] = rec
                em_sum += rec["em"]
                f.write(json.dumps(rec) + "\n")
            # A batch reaches the disk before the next starts: an interruption loses at most one.
            f.flush()
            os.fsync(f.fileno())
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"EM {100 * em_sum / n_done:.2f}")

        records = evaluate_greedy(engine, todo, batch_size=batch_size, on_batch=write, context=context)
    skipped = [r["id"] for r in records if "skipped" in r]
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        print(f"warning: {name}: {len(skipped)} of {len(rows)} questions do not fit the model's context and count "
              f"as wrong (ids: {shown})")


def evaluate(
    cfg: Config,
    datasets: DatasetSpec,
    out_dir: PathLike,
    *,
    name: str | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    resume: bool = True,
    tools: list | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy EM/F1 of ``cfg.model.path`` on ``datasets`` (see ``load_eval_datasets``); returns results.json.

    ``limit`` evaluates each dataset's first N questions; ``batch_size`` questions are rolled out
    together and written to ``<out_dir>/<dataset>.jsonl`` as one batch. With ``resume`` the ids
    already in those files are skipped (the model and rollout settings must be the same as
    before); without it the files start over. ``tools`` replaces the tools of the config.
    """
    import torch

    from at2po.factory import build_engine, build_task, build_tools, load_model, load_tokenizer
    from at2po.tools.health import preflight_tools
    from at2po.training.prompt_limits import context_length

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    task = build_task(cfg)
    if getattr(task, "reward", None) == "atpo_em":
        # A run trained with the authors' scorer is evaluated as they validate: without the format gate.
        task = type(task)(reward="atpo_em_eval", score_observations=task.score_observations)
    if not {"em", "f1", "format_ok"} <= set(task.metrics):
        raise ValueError(f"at2po eval reports EM/F1 on the QA benchmarks; task.name={cfg.task.name!r} has no em/f1")
    whole = load_eval_datasets(datasets)
    data = {d: rows[:limit] for d, rows in whole.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = tools if tools is not None else build_tools(cfg, task)
    system_prompt = cfg.data.system_prompt or task.system_prompt(tools)
    preflight_tools(tools)  # an unreachable retriever stops here, not after a table of EM 0
    _check_settings(out_dir, _settings(cfg, system_prompt), resume)
    done = {d: _resume_file(out_dir / f"{d}.jsonl", resume, whole[d]) for d in data}

    # Nothing left (e.g. re-run to rebuild the tables): no model to load.
    if any(row.id not in done[d] for d, rows in data.items() for row in rows):
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, "cuda" if torch.cuda.is_available() else "cpu").eval()
        engine = build_engine(cfg, model, tokenizer, task=task, tools=tools)
        for d, rows in data.items():
            _run_dataset(engine, d, rows, done[d], out_dir / f"{d}.jsonl", batch_size, progress,
                         context=context_length(model))

    records = {d: [done[d][row.id] for row in rows] for d, rows in data.items()}
    results = summarize(records, name=name or default_name(cfg), model=cfg.model.path)
    for d, r in results["datasets"].items():  # failures must be seen, not read off a low EM
        if r["tool_failures"]:
            print(f"{d}: {r['tool_failures']} tool calls failed ({r['infra_failures']} for infrastructure reasons, "
                  "redone on the next resume)" if r["infra_failures"] else
                  f"{d}: {r['tool_failures']} tool calls failed (the model's input: empty or bad queries)")
    results["scorer"] = getattr(task, "reward", cfg.task.name)
    (out_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / RESULTS_MD).write_text(results_markdown([results]), encoding="utf-8")
    return results


# -- command line --------------------------------------------------------------------------------
def _dataset_arg(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or a bare ``PATH`` (a path whose text before '=' is no plain name stays a path)."""
    name, sep, path = value.partition("=")
    return (name, path) if sep and _NAME_RE.fullmatch(name) else (None, value)


def _cmd_eval(args: argparse.Namespace) -> int:
    from at2po.config import load_config

    cfg = load_config(args.config, args.overrides)
    datasets = [_dataset_arg(v) for v in args.dataset]
    if not datasets:
        if not cfg.data.val_file:
            raise ValueError("no dataset: pass --dataset NAME=PATH (repeatable) or set data.val_file")
        datasets = [(None, cfg.data.val_file)]
    name = args.name or default_name(cfg)
    out = args.out or Path("runs/eval") / name
    results = evaluate(cfg, datasets, out, name=name, batch_size=args.batch_size, limit=args.limit,
                       resume=not args.no_resume, progress=cfg.trainer.progress)
    print(results_markdown([results]), end="")
    print(f"per-sample results and {RESULTS_JSON} in {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval``; it sets ``args.func(args) -> int``."""
    names = describe_benchmarks()
    p = subparsers.add_parser(
        "eval",
        help="greedy EM/F1 on the QA benchmarks, resumable, written as the paper's Table 1",
        description=(
            "Greedy evaluation (one chain per question) of model.path with the tools of the config, "
            "on FlashRAG jsonl or Search-R1 parquet files. Writes <out>/<dataset>.jsonl per sample "
            "(resumed when interrupted), <out>/results.json and <out>/results.md (EM in %, single-/"
            f"multi-hop averages weighted by sample count). Benchmarks: {names}."
        ),
    )
    p.add_argument("--config", help="YAML file whose sections mirror at2po.config.Config (model, tools, rollout)")
    p.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=PATH",
        help="a dataset file, repeatable; without NAME= the benchmark is read from the path "
        "(data/hotpotqa/dev.jsonl) or a parquet file's data_source column (default: data.val_file)",
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/eval/<name>)")
    p.add_argument("--name", help="method name of the table row (default: the model directory's name)")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions of each dataset")
    p.add_argument("--batch-size", type=int, default=64, help="questions rolled out and written together (default 64)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished questions")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. model.path=runs/x/checkpoints/step_000240")
    p.set_defaults(func=_cmd_eval)
    return p
