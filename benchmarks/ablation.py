"""The paper's ablations (docs/method.md §5) in miniature, on the quickstart's task, at equal budget,
over paired seeds, resumable and parallel across processes.

    python benchmarks/ablation.py --quick                              # smoke run, under a minute on CPU
    python benchmarks/ablation.py --credit --workers 16 --out DIR      # the full sweep (hours on 16 cores)
    python -m at2po.evidence.stats DIR                                 # every table entry, recomputed from the files
    python benchmarks/ablation.py --out DIR --verify standard/at2po-full/seed0   # does this machine reproduce a run?

Rows (``ROWS``: the progressive ablation, the paper's Table 4; ``CREDIT_ROWS``: the turn-wise
credit variants, its Table 5, each on top of the full AT²PO row) are lists of config overrides
on top of the quickstart's config: the same trainer runs all of them. Task variants
(``VARIANTS``) change the question splits of the same world: ``standard`` is the quickstart's
task, ``hard`` asks only 3-hop questions (in training and held out), which the warm start never
saw demonstrated (exploration is the bottleneck), with a longer run.

Paired seeds: per seed the world, tokenizer and warm-started model are built once (cached under
DIR/cache) and every row and variant of that seed starts from that model with the same seed, so
the same prompt order; the tables report each row's per-seed difference to the full AT²PO row,
its bootstrap 95% CI and the seeds where it is ahead (``at2po.evidence.stats``).

Equal budget: each row trains until its cumulative generated tokens reach the same budget B, so
rows with cheaper steps take more of them. By default B is measured per variant and seed: the
full AT²PO row runs ``trainer.steps`` steps and B is its generated tokens; ``--budget`` fixes B
instead. Held-out EM (greedy, ``Trainer.validate``) is measured at the same token checkpoints in
every row (the reference row's tokens at its validation steps), so the curves line up.

Resumable: one file per (variant, row, seed) under DIR/runs, written atomically; rerunning the
same command runs only the missing jobs (see ``at2po.evidence.runner``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from at2po.config import Config, config_to_dict, load_config
from at2po.evidence.environment import environment
from at2po.evidence.runner import (
    SweepLocked,
    SweepMismatch,
    assets_dict,
    atomic_write_json,
    check_jobs,
    plan_jobs,
    run_jobs,
    sweep_lock,
)
from at2po.evidence.replay import describe, replay_run, run_path
from at2po.evidence.stats import markdown_tables, slug, tables_from_files
from at2po.quickstart import QUICKSTART_OVERRIDES, QuickstartConfig, quickstart_assets_config
from at2po.tasks.multihop import MultiHopConfig

TOKEN_LOSS = ["algo.loss_level=token", "algo.clip_low=0.2", "algo.clip_high=0.28"]  # PPO/GRPO ratio per token
SEQUENCE_LOSS = ["algo.loss_level=sequence", "algo.clip_low=3e-4", "algo.clip_high=4e-4"]  # GSPO
TURN_LOSS = ["algo.loss_level=turn", "algo.clip_low=3e-3", "algo.clip_high=4e-3"]  # ATPO
# {chains} is filled in per run: chains that cost about what a tree step costs (see chain_count).
CHAINS = ["rollout.expansion_rounds=0", "rollout.n_initial={chains}", "rollout.samples_per_tree={chains}"]

# The progressive ablation, in the paper's order. Every row states its objective, clip range and
# credit explicitly, so a change of the quickstart's defaults cannot silently change a row.
# KL is 0 in every row (the quickstart's setting; the paper's GRPO baseline used 0.001).
ROWS: dict[str, list[str]] = {
    "chain GRPO": [*CHAINS, *TOKEN_LOSS, "algo.advantage=grpo"],
    "chain GSPO": [*CHAINS, *SEQUENCE_LOSS, "algo.advantage=grpo"],
    "random tree + token loss": ["rollout.expansion_mode=random", *TOKEN_LOSS, "algo.advantage=grpo"],
    "random tree + ATPO": ["rollout.expansion_mode=random", *TURN_LOSS, "algo.advantage=grpo"],
    "entropy tree + ATPO": ["rollout.expansion_mode=entropy", *TURN_LOSS, "algo.advantage=grpo"],
    "AT²PO (full)": ["rollout.expansion_mode=entropy", *TURN_LOSS, "algo.advantage=tree"],
}
REFERENCE = "AT²PO (full)"  # the row whose tokens over trainer.steps steps set the default budget

# The credit variants of the paper's Table 5, each on top of the full AT²PO row.
CREDIT_ROWS: dict[str, list[str]] = {
    "value/entropy_softmax": ["algo.adv_mode=value", "algo.value_mode=entropy_softmax"],
    "value/entropy_linear": ["algo.adv_mode=value", "algo.value_mode=entropy_linear"],
    "value/child_mean": ["algo.adv_mode=value", "algo.value_mode=child_mean"],
    "value/leaf_mean": ["algo.adv_mode=value", "algo.value_mode=leaf_mean"],
    "td": ["algo.adv_mode=td", "algo.value_mode=entropy_softmax"],
    "global": ["algo.adv_mode=global", "algo.value_mode=entropy_softmax"],
    "td_global+leaf_mean": ["algo.adv_mode=td_global", "algo.value_mode=leaf_mean"],
}

# The paper's numbers for the same rows (Qwen3-4B, multi-hop average EM %), shown for reference.
# It reports one "entropy-weighted" credit row: the full AT²PO run (the authors' code: softmax).
PAPER_EM: dict[str, float] = {
    "chain GRPO": 46.02, "chain GSPO": 45.69, "random tree + token loss": 45.42, "random tree + ATPO": 47.75,
    "entropy tree + ATPO": 48.33, "AT²PO (full)": 48.81, "value/entropy_softmax": 48.81,
    "value/child_mean": 48.43, "value/leaf_mean": 48.52, "td": 45.80, "global": 48.19, "td_global+leaf_mean": 44.18,
}

# The steps of the progression whose paired difference the tables report (label, from row, to row).
COMPONENTS: list[tuple[str, str, str]] = [
    ("chains → random tree", "chain GRPO", "random tree + token loss"),
    ("token → turn loss", "random tree + token loss", "random tree + ATPO"),
    ("random → entropy expansion", "random tree + ATPO", "entropy tree + ATPO"),
    ("no credit → turn credit", "entropy tree + ATPO", "AT²PO (full)"),
]

# Task variants: MultiHopConfig fields that change the question splits of the warm start's own
# world (names, facts and corpus stay), and config overrides of every row of the variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {
        "description": "the quickstart's task: held-out 1-, 2- and 3-hop questions; the warm start saw "
                       "1- and 2-hop demonstrations only",
        "world": {}, "overrides": [],
    },
    "hard": {
        "description": "3-hop questions only, in training and held out (the warm start saw no 3-hop "
                       "demonstration and answers them after 2 searches); twice the quickstart's steps",
        # Training on 3-hop questions alone: every reward then comes from a trajectory that searched
        # a third time, which the warm start rarely samples (pass@16 ≈ 0.07 on seed 0). A pilot that
        # mixed in 1- and 2-hop questions (1:1:2) learned those and never a third search in 60 steps.
        "world": {"train_hop_weights": [0.0, 0.0, 1.0], "test_hop_weights": [0.0, 0.0, 1.0]},
        "overrides": ["trainer.steps=60", "trainer.val_every=15"],
    },
}

# Applied to every row: the loop here replaces Trainer.fit, which owns the bars and the logs.
COMMON_OVERRIDES = ["trainer.progress=false", "trainer.tensorboard=false"]

# --quick: a tiny world and model, a few SFT steps, 2 prompts a step, a budget of 2 full-row steps.
QUICK_OVERRIDES = [
    "trainer.steps=2", "trainer.val_every=1", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
    "rollout.chunk_tokens=16", "rollout.max_response_tokens=64", "rollout.max_turns=3", "data.val_size=4",
]


def assets_config(seed: int, quick: bool) -> QuickstartConfig:
    """The quickstart's warm start for ``seed`` (``--quick``: a tiny one that takes seconds)."""
    if not quick:
        return quickstart_assets_config(seed)
    world = MultiHopConfig(seed=seed, n_people=16, n_companies=5, n_cities=5, n_countries=3, n_train=24, n_test=6)
    return QuickstartConfig(
        world=world, vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
        sft_worlds=2, sft_short_prompt_steps=3, sft_steps=2, sft_batch_size=2, seed=seed,
    )


PASS_K_SAMPLES = 16  # sampled chains per validation question for the warm start's pass@k (--quick: 2)


def chain_count(cfg: Config) -> int:
    """Chains per prompt costing about one tree: M initial chains plus, per round, K siblings
    that start on average halfway down a trajectory, ≈ M + L·K/2 trajectories (docs/method.md §2;
    10 + 2·6/2 = 16 in the paper), rounded up."""
    r = cfg.rollout
    return math.ceil(r.n_initial + r.expansion_rounds * r.top_k / 2)


def _resolved_key(overrides: Sequence[str]) -> str:
    """Rows whose overrides resolve to the same config are the same run."""
    return json.dumps(config_to_dict(load_config(None, [*QUICKSTART_OVERRIDES, *overrides])), sort_keys=True)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    env = environment()  # the main process's; each result file records its own worker's
    return {
        "environment_fingerprint": env["fingerprint"], "cpu_model": env["cpu_model"],
        "torch_cpu_capability": env["torch_cpu_capability"], "at2po_source": env["at2po_source"],
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads_main_process": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def _merge_plan(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A sweep extended by a later invocation (more seeds, rows or variants) tables all it holds."""
    if old is None:
        return new
    out = dict(new)
    out["seeds"] = sorted(set(old["seeds"]) | set(new["seeds"]))
    out["variants"] = list(dict.fromkeys([*old["variants"], *new["variants"]]))
    out["variant_descriptions"] = {**old["variant_descriptions"], **new["variant_descriptions"]}
    out["tables"] = {t: list(dict.fromkeys([*old["tables"].get(t, []), *new["tables"].get(t, [])]))
                     for t in dict.fromkeys([*old["tables"], *new["tables"]])}
    out["aliases"] = {**old.get("aliases", {}), **new["aliases"]}
    return out


def run_ablation(out_dir: str | Path, seeds: Sequence[int] = tuple(range(10)), rows: Sequence[str] | None = None,
                 credit: bool = False, quick: bool = False, budget: float | None = None,
                 overrides: Sequence[str] = (), variants: Sequence[str] = ("standard",), workers: int = 1,
                 pass_k_samples: int | None = None, command: str = "",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep in ``out_dir`` and write sweep.json, tables.json, ablation.md and curves.png.

    ``rows``: names of ``ROWS`` (default all); ``credit``: add ``CREDIT_ROWS``; ``budget``:
    generated tokens per row (default: measured per variant and seed on the full AT²PO row, which
    must then be among the rows); ``overrides``: config overrides for every row, applied before
    the variant's and the row's own. Returns {"tables", "report", "sweep"}.
    """
    names = list(ROWS) if rows is None else list(rows)
    if set(names) - set(ROWS):
        raise ValueError(f"unknown rows {sorted(set(names) - set(ROWS))}; choose from {list(ROWS)}")
    if credit and REFERENCE not in names:
        names.append(REFERENCE)  # the credit variants are compared with the full row
    if budget is None and REFERENCE not in names:
        raise ValueError(f"without a budget it is measured on the {REFERENCE!r} row: include it or give a budget")
    if budget is not None and budget <= 0:
        raise ValueError(f"the budget must be > 0 generated tokens, got {budget}")
    if set(variants) - set(VARIANTS):
        raise ValueError(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    pass_k_samples = (2 if quick else PASS_K_SAMPLES) if pass_k_samples is None else pass_k_samples
    # Per variant, every row's overrides before its own: the variant's (a longer run, ...) give way
    # to --quick's tiny settings, and --set comes last.
    variant_overrides = {v: [*COMMON_OVERRIDES, *VARIANTS[v]["overrides"], *(QUICK_OVERRIDES if quick else []),
                             *overrides] for v in variants}
    chains = chain_count(load_config(None, [*QUICKSTART_OVERRIDES, *COMMON_OVERRIDES, *overrides]))
    table_rows = {"progressive": names, **({"credit": list(CREDIT_ROWS)} if credit else {})}
    all_rows = {n: [o.format(chains=chains) for o in ROWS[n]] for n in names}
    if credit:
        all_rows |= {n: [*all_rows[REFERENCE], *ovr] for n, ovr in CREDIT_ROWS.items()}

    # A row whose config resolves to an earlier row's (value/entropy_softmax is the full row) is
    # that row's run: it gets no job and the tables read the other row's files.
    aliases: dict[str, dict[str, str]] = {}
    for v in variants:
        seen: dict[str, str] = {}
        for n in [REFERENCE, *all_rows] if REFERENCE in all_rows else all_rows:
            key = _resolved_key([*variant_overrides[v], *all_rows[n]])
            if key in seen and seen[key] != n:
                aliases.setdefault(v, {})[n] = seen[key]
            seen.setdefault(key, n)

    out = Path(out_dir)
    plan = {"seeds": list(seeds), "variants": list(variants), "tables": table_rows, "reference_row": REFERENCE,
            "aliases": aliases, "components": COMPONENTS,
            "variant_descriptions": {v: VARIANTS[v]["description"] for v in variants}}
    jobs = plan_jobs(out, seeds, lambda s: assets_dict(assets_config(s, quick)),
                     {v: {"world": VARIANTS[v]["world"], "overrides": variant_overrides[v]} for v in variants},
                     all_rows, REFERENCE, aliases, budget, pass_k_samples)
    with sweep_lock(out):
        check_jobs(jobs)  # other settings in the folder: refused before a line of it changes
        sweep_path = out / "sweep.json"
        sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else {"invocations": []}
        sweep["plan"] = _merge_plan(sweep.get("plan"), plan)
        sweep["settings"] = {"quick": quick, "budget": budget, "overrides": list(overrides),
                             "quickstart_overrides": QUICKSTART_OVERRIDES, "common_overrides": COMMON_OVERRIDES,
                             "quick_overrides": QUICK_OVERRIDES if quick else [], "chains": chains,
                             "pass_k_samples": pass_k_samples, "rows": all_rows, "variants": VARIANTS}
        invocation = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "workers": workers, "machine": machine_info()}
        sweep["invocations"].append(invocation)
        atomic_write_json(sweep_path, sweep)
        t0 = time.perf_counter()
        report = run_jobs(jobs, workers, log)
        invocation.update(seconds=time.perf_counter() - t0, jobs_run=len(report["run"]),
                          jobs_skipped=len(report["skipped"]), jobs_failed=report["failed"],
                          jobs_blocked=report["blocked"])
        invocation["machine"]["load_average_at_end"] = os.getloadavg()
        atomic_write_json(sweep_path, sweep)
        tables, text = write_report(out, sweep)
    log("\n" + text)
    log(f"\n{out / 'ablation.md'}  {out / 'curves.png'}  {out / 'effects.png'}  {out / 'tables.json'}  "
        f"({invocation['seconds']:.0f} s after start-up; {len(report['run'])} jobs run, "
        f"{len(report['skipped'])} already done)")
    return {"tables": tables, "report": report, "sweep": sweep}


# -- report ------------------------------------------------------------------------------------------
def write_report(out: Path, sweep: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """tables.json, ablation.md, curves.png and effects.png of the sweep in ``out``, from its files."""
    tables = tables_from_files(out)
    atomic_write_json(out / "tables.json", tables)
    text = write_markdown(out / "ablation.md", sweep, tables)
    plot_curves(out / "curves.png", sweep, tables)
    plot_effects(out / "effects.png", tables)
    return tables, text


def budgets(out: Path, sweep: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Budget B per variant and seed, read from the reference row's files."""
    ref = slug(sweep["plan"]["reference_row"])
    found: dict[str, dict[int, float]] = {}
    for v in sweep["plan"]["variants"]:
        for path in sorted((out / "runs" / v / ref).glob("seed*.json")):
            found.setdefault(v, {})[int(path.stem[4:])] = json.loads(path.read_text())["checkpoints"][-1]
    return found


def write_markdown(path: Path, sweep: dict[str, Any], tables: dict[str, Any]) -> str:
    inv = sweep["invocations"]
    s = sweep["settings"]
    b = budgets(path.parent, sweep)
    lines = [
        "# AT²PO ablations in miniature (tiny model, synthetic multi-hop task, equal token budget, paired seeds)", "",
        "Invocations (command, date, workers, wall time):", "",
        *(f"- `{i['command']}`, {i['date']}, {i['workers']} worker(s), "
          + (f"{i['seconds']:,.0f} s, {i['jobs_run']} jobs run, {i['jobs_skipped']} already done"
             + (f", {len(i['jobs_failed'])} failed" if i["jobs_failed"] else "") if "seconds" in i
             else "did not finish (killed, or still running)")
          + f"; {i['machine']['cpus']} CPUs, torch {i['machine']['torch']}" for i in inv), "",
        "Budget B: " + ("fixed with --budget" if s["budget"] is not None else
                        "measured per variant and seed, the full AT²PO row's generated tokens over trainer.steps"),
        *(f"- {v}: " + ", ".join(f"seed {k}: {x:,.0f}" for k, x in sorted(bs.items())) for v, bs in b.items()), "",
        f"Chain rows: {s['chains']} chains per prompt, about the cost of one tree (M + L·K/2 trajectories). "
        "Held-out EM: greedy, on the variant's validation questions, at B; mean ± sample std over seeds. "
        "'− AT²PO (full)': mean over seeds of the per-seed difference to the full row, with its 95% "
        "percentile-bootstrap interval; ahead/level/behind: seeds where the row is above, equal to or below "
        "the full row. Every entry is recomputed from the per-seed files by `python -m at2po.evidence.stats DIR`.",
        "",
        markdown_tables(tables, sweep, PAPER_EM),
    ]
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot_curves(path: Path, sweep: dict[str, Any], tables: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(v, t, rows) for v, vt in tables.items() for t in sweep["plan"]["tables"] if (rows := vt.get(t))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (variant, table, rows) in zip(axes[0], panels):
        for name, st in rows.items():
            ax.plot(st["curve_tokens"], st["curve_em"], marker="o", ms=3, label=f"{name} (n={st['n']})")
        ax.set_title(f"{variant} task, {table}: held-out EM (greedy), mean over seeds", fontsize=9)
        ax.set_xlabel("cumulative generated tokens")
        ax.set_ylabel("EM")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_effects(path: Path, tables: dict[str, Any]) -> None:
    """Per variant, each component's and each row's paired difference with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for variant, vt in tables.items():
        items = [(c["component"], c) for c in vt["components"] if c.get("n")]
        items += [(f"{name} − full", st["vs_reference"]) for t in ("progressive", "credit")
                  for name, st in vt.get(t, {}).items() if st.get("vs_reference", {}).get("n")]
        if items:
            panels.append((variant, items))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.4 * max(len(i) for _, i in panels) + 1.5),
                             squeeze=False)
    for ax, (variant, items) in zip(axes[0], panels):
        for y, (label, p) in enumerate(reversed(items)):
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]], fmt="o",
                        color="tab:green" if p["ci95"][0] > 0 else "tab:red" if p["ci95"][1] < 0 else "tab:gray")
        ax.set_yticks(range(len(items)), [f"{label} (n={p['n']})" for label, p in reversed(items)], fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{variant} task: paired difference in held-out EM, mean and 95% CI", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, results_root: str | Path = "benchmarks/results") -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury the per-step lines
    argv = list(sys.argv[1:] if argv is None else argv)
    by_slug = {slug(n): n for n in ROWS}
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(f"{s} ({n})" for s, n in by_slug.items()),
    )
    ap.add_argument("--quick", action="store_true", help="tiny world, model and budget: a smoke run in under a minute")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 ... 9 (--quick: 0)")
    ap.add_argument("--out", default="", help=f"sweep folder; rerun with the same --out to resume "
                                              f"(default {results_root}/ablation-DATE)")
    ap.add_argument("--rows", nargs="+", default=None, metavar="ROW", help="rows to run, by name or slug (default all)")
    ap.add_argument("--credit", action="store_true", help="also the credit variants of the paper's Table 5")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="task variants (default: standard hard; --quick: standard)")
    ap.add_argument("--workers", type=int, default=1,
                    help="jobs run at once, each in its own process with one torch thread (default 1: in this process)")
    ap.add_argument("--pass-k-samples", type=int, default=None,
                    help=f"sampled chains per question for the warm start's pass@k (default {PASS_K_SAMPLES}, "
                         "--quick: 2; 0: skip)")
    ap.add_argument("--budget", type=float, default=None,
                    help="generated tokens per row (default: the full AT²PO row's tokens over trainer.steps steps)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every row, before the row's own (repeatable)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite the tables, ablation.md and plots of --out from its files")
    ap.add_argument("--verify", nargs="+", default=None, metavar="RUN",
                    help="run nothing of the sweep: rerun these finished runs of --out (VARIANT/ROW/seedN, e.g. "
                         "standard/at2po-full/seed0) in a scratch folder and say whether this machine reproduces "
                         "their files exactly (exit status 1 if not)")
    args = ap.parse_args(argv)
    if args.verify:
        return verify(ap, args.out, args.verify)
    if args.report_only:
        out = sweep_folder(ap, args.out, "--report-only")
        sweep = json.loads((out / "sweep.json").read_text())
        tables, text = write_report(out, sweep)
        print(text)
        return {"tables": tables, "report": {"run": [], "skipped": [], "failed": {}, "blocked": []}, "sweep": sweep}

    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(range(10)))
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        ap.error(f"--seeds must be distinct non-negative integers, got {seeds}")
    variants = args.variants or (["standard"] if args.quick else ["standard", "hard"])
    rows = None
    if args.rows is not None:
        unknown = [r for r in args.rows if r not in ROWS and slug(r) not in by_slug]
        if unknown:
            ap.error(f"unknown row(s) {unknown}; choose from {', '.join(by_slug)}")
        rows = list(dict.fromkeys(r if r in ROWS else by_slug[slug(r)] for r in args.rows))
    if args.budget is None and rows is not None and REFERENCE not in rows and not args.credit:
        ap.error(f"without --budget the budget is measured on {slug(REFERENCE)!r}: add it to --rows or give --budget")
    if args.budget is not None and args.budget <= 0:
        ap.error(f"--budget must be > 0 generated tokens, got {args.budget:g}")
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if args.pass_k_samples is not None and args.pass_k_samples < 0:
        ap.error(f"--pass-k-samples must be >= 0, got {args.pass_k_samples}")
    try:  # a bad --set fails here, not after the first seed's warm start
        load_config(None, [*QUICKSTART_OVERRIDES, *args.overrides])
    except ValueError as e:
        ap.error(f"--set: {e}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(results_root) / f"ablation-{'quick-' if args.quick else ''}{date}"
    try:
        return run_ablation(out, seeds, rows, credit=args.credit, quick=args.quick, budget=args.budget,
                            overrides=args.overrides, variants=variants, workers=args.workers,
                            pass_k_samples=args.pass_k_samples,
                            command=shlex.join(["python", "benchmarks/ablation.py", *argv]))
    except (SweepMismatch, SweepLocked) as e:
        ap.error(str(e))


def sweep_folder(ap: argparse.ArgumentParser, out: str | Path | None, flag: str) -> Path:
    """--out for a flag that reads a finished sweep: it must be a folder holding the sweep's sweep.json."""
    if not out or not (Path(out) / "sweep.json").is_file():
        ap.error(f"{flag} needs --out, a folder a sweep wrote (no sweep.json in {str(out or '.')!r})")
    return Path(out)


def verify(ap: argparse.ArgumentParser, out: str | Path | None, runs: Sequence[str]) -> dict[str, Any]:
    """--verify: each run replayed in its own scratch folder; the sweep's folder is only read."""
    out = sweep_folder(ap, out, "--verify")
    try:
        for run in runs:
            run_path(out, run)  # every name checked before the first one runs
    except ValueError as e:
        ap.error(f"--verify: {e}")
    reports = []
    for run in runs:
        with tempfile.TemporaryDirectory(prefix="at2po-verify-") as scratch:
            reports.append(replay_run(out, run, scratch))
        print(describe(reports[-1]), flush=True)
    return {"verify": reports}


if __name__ == "__main__":
    result = main(results_root=Path(__file__).resolve().parent / "results")
    if "verify" in result:
        sys.exit(0 if all(r["identical"] for r in result["verify"]) else 1)
    report = result["report"]
    if report["failed"] or report["blocked"]:
        print(f"{len(report['failed'])} job(s) failed and {len(report['blocked'])} could not run: "
              "rerun the same command to retry them", file=sys.stderr)
        sys.exit(1)
