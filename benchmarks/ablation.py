"""The paper's progressive ablation (docs/method.md §5) in miniature, on the quickstart's task, at equal budget.

    python benchmarks/ablation.py --quick                 # smoke run, about a minute on CPU
    python benchmarks/ablation.py                         # 6 rows x seeds 0 1 2 (hours on 2 CPU cores)
    python benchmarks/ablation.py --credit --seeds 0      # plus the credit variants of Table 5

Every row is only a list of config overrides on top of the quickstart's config (``ROWS``,
``CREDIT_ROWS``): the same trainer runs all of them. For each seed the quickstart's world, tokenizer
and warm-started tiny model are built once, and every row of that seed starts from that model.

Equal budget: each row trains until its cumulative generated tokens reach the same budget B,
so rows with cheaper steps take more of them. By default B is measured per seed: the full
AT²PO row runs the quickstart's number of steps (``trainer.steps``) and B is its generated tokens;
``--budget`` gives a fixed B instead. Held-out EM (greedy, ``Trainer.validate``) is measured
at the same token checkpoints in every row (the reference row's tokens at its validation
steps), so the curves line up; the last checkpoint is B. The recorded tokens are the sums of the
steps' ``rollout/generated_tokens``, and the report states each row's overshoot of B (at most
its last step's tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from at2po.config import Config, config_to_dict, load_config
from at2po.evaluation.evaluator import mean_metrics
from at2po.quickstart import (
    QUICKSTART_OVERRIDES,
    QuickstartConfig,
    build_quickstart_assets,
    quickstart_assets_config,
    quickstart_config,
)
from at2po.tasks.multihop import MultiHopConfig
from at2po.training.trainer import Trainer

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


def chain_count(cfg: Config) -> int:
    """Chains per prompt costing about one tree: M initial chains plus, per round, K siblings
    that start on average halfway down a trajectory, ≈ M + L·K/2 trajectories (docs/method.md §2;
    10 + 2·6/2 = 16 in the paper), rounded up."""
    r = cfg.rollout
    return math.ceil(r.n_initial + r.expansion_rounds * r.top_k / 2)


def slug(name: str) -> str:
    """A row's name as typed on a command line: 'AT²PO (full)' -> 'at2po-full'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("²", "2")).strip("-")


def validation_steps(cfg: Config) -> list[int]:
    """The reference row's validation steps: every trainer.val_every steps and the last one."""
    steps, every = cfg.trainer.steps, cfg.trainer.val_every
    return sorted({*range(every, steps, every), steps}) if every else [steps]


def _resolved_key(cfg: Config) -> str:
    """Rows with the same resolved config (output folder aside) are the same run."""
    d = config_to_dict(cfg)
    d["trainer"].pop("output_dir")
    return json.dumps(d, sort_keys=True)


def by_hop(records: list[dict[str, Any]]) -> dict[str, float]:
    """EM overall and per hop count of one greedy validation's per-row records (no second pass)."""
    out = {"em": mean_metrics(records, ["em"])["em"]}
    for hops in sorted({r["meta"]["hops"] for r in records}):
        out[f"em_{hops}hop"] = mean_metrics([r for r in records if r["meta"]["hops"] == hops], ["em"])["em"]
    return out


def warm_start_metrics(cfg: Config) -> dict[str, Any]:
    """Held-out metrics of the warm start: every row's starting point (greedy, so one run serves all)."""
    trainer = Trainer(cfg)
    val = trainer.validate()
    return {"val": val, "by_hop": by_hop(trainer.val_records)}


def train_row(cfg: Config, targets: Sequence[float], unit: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Train a fresh Trainer from the warm start until every target is reached, validating at each.

    ``unit`` is "steps" (the reference row measuring the budget) or "tokens" (cumulative
    generated tokens). A step that passes several targets is validated once and counts for each,
    so every row's curve has one point per target.
    """
    start = time.perf_counter()
    trainer = Trainer(cfg)
    pending = list(targets)
    tokens, tool_calls = 0.0, 0.0
    steps: list[dict[str, float]] = []
    curve: list[dict[str, float]] = []
    while pending:
        metrics = trainer.train_step()
        tokens += metrics["rollout/generated_tokens"]
        tool_calls += metrics["rollout/tool_calls"]
        reached = trainer.step if unit == "steps" else tokens
        passed = [t for t in pending if reached >= t]
        if passed:
            metrics.update(trainer.validate())
            curve += [{"step": trainer.step, "tokens": tokens, "em": metrics["val/em"]} for _ in passed]
            pending = pending[len(passed):]
        steps.append({"step": trainer.step, **metrics})
        val = f"  val EM {metrics['val/em']:.3f}" if passed else ""
        say(f"step {trainer.step:3d}  tokens {tokens:9.0f}  reward {metrics['reward/mean']:+.3f}{val}")
    return {
        "steps": trainer.step, "generated_tokens": tokens, "tool_calls": tool_calls,
        "seconds": time.perf_counter() - start, "train_seconds": sum(s["time/step"] for s in steps),
        "val_after": {k: v for k, v in steps[-1].items() if k.startswith("val/")},
        "by_hop_after": by_hop(trainer.val_records), "curve": curve, "step_metrics": steps,
    }


def run_seed(seed: int, out: Path, rows: dict[str, list[str]], budget: float | None, quick: bool,
             overrides: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Every row of one seed from one warm start; the reference row first when it sets the budget."""
    t0 = time.perf_counter()
    seed_dir = out / f"seed{seed}"
    log(f"seed {seed}: world, tokenizer and warm start -> {seed_dir / 'assets'}")
    build_quickstart_assets(assets_config(seed, quick), out_dir=seed_dir / "assets", progress=False)
    base_overrides = [*COMMON_OVERRIDES, *(QUICK_OVERRIDES if quick else []), *overrides]

    def config(name: str, extra: Sequence[str]) -> Config:
        return quickstart_config(seed_dir / "assets", seed_dir / slug(name), seed, [*base_overrides, *extra])

    def row_log(name: str) -> Callable[[str], None]:
        return lambda msg: log(f"seed {seed} | {name} | {msg}")

    base = config("warm-start", [])
    chains = chain_count(base)
    row_overrides = {name: [o.format(chains=chains) for o in ovr] for name, ovr in rows.items()}
    val_steps = validation_steps(base)
    warm = warm_start_metrics(base)
    log(f"seed {seed}: warm start held-out EM {warm['val']['val/em']:.3f}   chain rows: {chains} chains per prompt")

    # Without a fixed budget the reference row runs first, by steps, and its tokens at its
    # validation steps become every other row's checkpoints.
    order = [REFERENCE, *(n for n in row_overrides if n != REFERENCE)] if budget is None else list(row_overrides)
    checkpoints = None if budget is None else [budget * s / base.trainer.steps for s in val_steps]
    results: dict[str, dict[str, Any]] = {}
    done: dict[str, str] = {}  # resolved config -> the row that ran it
    for name in order:
        cfg = config(name, row_overrides[name])
        key = _resolved_key(cfg)
        if key in done:  # e.g. value/entropy_softmax is the full AT²PO row: same config, same run
            r = {**results[done[key]], "same_run_as": done[key]}
        elif checkpoints is None:
            log(f"seed {seed} | {name}: measuring the budget over {base.trainer.steps} steps")
            r = train_row(cfg, val_steps, "steps", row_log(name))
            checkpoints = [c["tokens"] for c in r["curve"]]
            log(f"seed {seed}: budget {checkpoints[-1]:.0f} generated tokens per row")
        else:
            r = train_row(cfg, checkpoints, "tokens", row_log(name))
        done.setdefault(key, name)
        before, after = warm["val"]["val/em"], r["val_after"]["val/em"]
        results[name] = {**r, "overrides": row_overrides[name], "em_before": before, "em_after": after,
                         "delta": after - before, "budget_overshoot": r["generated_tokens"] - checkpoints[-1]}
        log(f"seed {seed} | {name}: EM {before:.3f} -> {after:.3f}, {r['generated_tokens']:.0f} tokens "
            f"(budget {checkpoints[-1]:.0f}) in {r['steps']} steps, {r['seconds']:.1f} s")
    return {"budget_tokens": checkpoints[-1], "checkpoints": checkpoints, "chains": chains, "warm_start": warm,
            "seconds": time.perf_counter() - t0, "rows": results}


# -- report ------------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _mean_std(xs: Sequence[float]) -> str:
    """'mean ± sample std' over seeds ('mean' alone for one seed)."""
    return f"{_mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def summarize(per_seed: dict[str, dict], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per row, over seeds: EM after (mean, sample std), Δ vs warm start, per-hop EM, costs, curve."""
    out = {}
    for name in names:
        runs = [s["rows"][name] for s in per_seed.values()]
        hops = sorted({k for r in runs for k in r["by_hop_after"] if re.fullmatch(r"em_\dhop", k)})
        points = list(zip(*(r["curve"] for r in runs)))  # aligned: same checkpoints in every row
        warm = _mean([r["em_before"] for r in runs])
        out[name] = {
            "em_after": [r["em_after"] for r in runs],
            "delta_mean": _mean([r["delta"] for r in runs]),
            **{f"{h}_mean": _mean([r["by_hop_after"][h] for r in runs if h in r["by_hop_after"]]) for h in hops},
            **{f"{k}_mean": _mean([r[k] for r in runs]) for k in ("generated_tokens", "tool_calls", "steps", "seconds")},
            "max_overshoot": max(r["budget_overshoot"] for r in runs),
            "curve_tokens": [0.0, *(_mean([p["tokens"] for p in pt]) for pt in points)],
            "curve_em": [warm, *(_mean([p["em"] for p in pt]) for pt in points)],
        }
    return out


def markdown_table(summary: dict[str, dict[str, Any]], first_column: str) -> str:
    hops = sorted({k[:-5] for s in summary.values() for k in s if re.fullmatch(r"em_\dhop_mean", k)})
    head = [first_column, "held-out EM", "Δ vs warm start", *(f"{h[3]}-hop EM" for h in hops),
            "generated tokens", "tool calls", "steps", "wall s", "paper EM %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        cells = [name, _mean_std(s["em_after"]), f"{s['delta_mean']:+.3f}",
                 *(f"{s[h + '_mean']:.3f}" if h + "_mean" in s else "–" for h in hops),
                 f"{s['generated_tokens_mean']:,.0f}", f"{s['tool_calls_mean']:,.0f}", f"{s['steps_mean']:.1f}",
                 f"{s['seconds_mean']:,.1f}", f"{PAPER_EM[name]:.2f}" if name in PAPER_EM else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    warm = [s["warm_start"]["val"]["val/em"] for s in seeds.values()]
    budget = ("measured per seed: the full AT²PO row's generated tokens over trainer.steps steps"
              if results["settings"]["budget"] is None else "fixed with --budget")
    budgets = ", ".join(f"seed {k}: {s['budget_tokens']:,.0f}" for k, s in seeds.items())
    overshoot = max(s["max_overshoot"] for table in results["summary"].values() for s in table.values())
    text = [
        "# AT²PO progressive ablation (tiny model, synthetic multi-hop task, equal token budget)", "",
        f"Date {results['date']}; `{results['command']}`; seeds {', '.join(seeds)}.", "",
        f"Budget B ({budget}): {budgets} generated tokens. Every row trains until its cumulative generated tokens "
        f"reach B; the largest overshoot of any row is {overshoot:,.0f} tokens (less than its last step).",
        f"Chain rows: {next(iter(seeds.values()))['chains']} chains per prompt, about the cost of one tree "
        "(M + L·K/2 trajectories).",
        f"Warm start (no RL): held-out EM {_mean_std(warm)}. Held-out EM is greedy on the validation questions at B, "
        "mean ± sample std over seeds; per-hop EM from the same validation's per-row records; tokens, tool calls, "
        "steps and wall seconds are per-row training totals, mean over seeds; paper EM: Qwen3-4B multi-hop average, "
        "for reference.", "",
        markdown_table(results["summary"]["main"], "method"),
    ]
    if results["summary"].get("credit"):
        text += ["", "## Turn-wise credit variants (on top of AT²PO (full))", "",
                 markdown_table(results["summary"]["credit"], "credit")]
    path.write_text("\n".join(text) + "\n")
    return "\n".join(text)


def plot_curves(path: Path, summary: dict[str, dict[str, dict[str, Any]]], budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"main": "progressive ablation", "credit": "turn-wise credit variants"}
    tables = [(titles[k], v) for k, v in summary.items() if v]
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables):
        for name, s in rows.items():
            ax.plot(s["curve_tokens"], s["curve_em"], marker="o", ms=3, label=name)
        ax.axvline(budget, color="grey", ls="--", lw=1, label="budget (mean over seeds)")
        ax.set_title(f"{title}: held-out EM (greedy), mean over seeds", fontsize=10)
        ax.set_xlabel("cumulative generated tokens")
        ax.set_ylabel("EM")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def run_ablation(out_dir: str | Path, seeds: Sequence[int] = (0, 1, 2), rows: Sequence[str] | None = None,
                 credit: bool = False, quick: bool = False, budget: float | None = None,
                 overrides: Sequence[str] = (), command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ablation and write results.json, ablation.md and curves.png to ``out_dir``.

    ``rows``: names of ``ROWS`` (default all); ``budget``: generated tokens per row (default:
    measured per seed on the full AT²PO row, which must then be among the rows); ``overrides``:
    config overrides for every row, applied before the row's own.
    """
    names = list(ROWS) if rows is None else list(rows)
    if set(names) - set(ROWS):
        raise ValueError(f"unknown rows {sorted(set(names) - set(ROWS))}; choose from {list(ROWS)}")
    if budget is None and REFERENCE not in names:
        raise ValueError(f"without a budget it is measured on the {REFERENCE!r} row: include it or give a budget")
    if budget is not None and budget <= 0:
        raise ValueError(f"the budget must be > 0 generated tokens, got {budget}")
    run_rows = {n: ROWS[n] for n in names}
    if credit:
        run_rows |= {name: [*ROWS[REFERENCE], *ovr] for name, ovr in CREDIT_ROWS.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
        "settings": {"seeds": list(seeds), "quick": quick, "budget": budget, "overrides": list(overrides),
                     "quickstart_overrides": QUICKSTART_OVERRIDES, "common_overrides": COMMON_OVERRIDES,
                     "quick_overrides": QUICK_OVERRIDES if quick else [], "rows": run_rows,
                     "reference_row": REFERENCE},
        "seeds": {},
    }
    t0 = time.perf_counter()
    for seed in seeds:
        results["seeds"][str(seed)] = run_seed(seed, out, run_rows, budget, quick, overrides, log)
        # Rewritten after every seed, so a long run that dies keeps what it finished.
        (out / "results.json").write_text(json.dumps(results, indent=1))
    per_seed = results["seeds"]
    results["summary"] = {"main": summarize(per_seed, names),
                          "credit": summarize(per_seed, list(CREDIT_ROWS)) if credit else {}}
    results["seconds"] = time.perf_counter() - t0
    results["machine"]["load_average_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = write_markdown(out / "ablation.md", results)
    plot_curves(out / "curves.png", results["summary"], _mean([s["budget_tokens"] for s in per_seed.values()]))
    log("\n" + table)
    log(f"\n{out / 'ablation.md'}  {out / 'curves.png'}  {out / 'results.json'}  "
        f"({results['seconds']:.0f} s after start-up)")
    return results


def main(argv: Sequence[str] | None = None, results_root: str | Path = "benchmarks/results") -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury the per-step lines
    argv = list(sys.argv[1:] if argv is None else argv)
    by_slug = {slug(n): n for n in ROWS}
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(f"{s} ({n})" for s, n in by_slug.items()),
    )
    ap.add_argument("--quick", action="store_true", help="tiny world, model and budget: a smoke run in about a minute")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    ap.add_argument("--out", default="", help=f"output folder (default {results_root}/ablation-DATE)")
    ap.add_argument("--rows", nargs="+", default=None, metavar="ROW", help="rows to run, by name or slug (default all)")
    ap.add_argument("--credit", action="store_true", help="also the credit variants of the paper's Table 5")
    ap.add_argument("--budget", type=float, default=None,
                    help="generated tokens per row (default: the full AT²PO row's tokens over trainer.steps steps)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every row, before the row's own (repeatable)")
    args = ap.parse_args(argv)

    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        ap.error(f"--seeds must be distinct non-negative integers, got {seeds}")
    rows = None
    if args.rows is not None:
        unknown = [r for r in args.rows if r not in ROWS and slug(r) not in by_slug]
        if unknown:
            ap.error(f"unknown row(s) {unknown}; choose from {', '.join(by_slug)}")
        rows = list(dict.fromkeys(r if r in ROWS else by_slug[slug(r)] for r in args.rows))
    if args.budget is None and rows is not None and REFERENCE not in rows:
        ap.error(f"without --budget the budget is measured on {slug(REFERENCE)!r}: add it to --rows or give --budget")
    if args.budget is not None and args.budget <= 0:
        ap.error(f"--budget must be > 0 generated tokens, got {args.budget:g}")
    try:  # a bad --set fails here, not after the first seed's warm start
        load_config(None, [*QUICKSTART_OVERRIDES, *args.overrides])
    except ValueError as e:
        ap.error(f"--set: {e}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(results_root) / f"ablation-{'quick-' if args.quick else ''}{date}"
    return run_ablation(out, seeds, rows, credit=args.credit, quick=args.quick, budget=args.budget,
                        overrides=args.overrides, command=shlex.join(["python", "benchmarks/ablation.py", *argv]))


if __name__ == "__main__":
    main(results_root=Path(__file__).resolve().parent / "results")
