"""Statistics of a paired-seed sweep, recomputed from its per-(row, seed) result files.

Every number of a sweep's tables comes from ``tables_from_files``: it reads ``sweep.json`` (which
rows form which table, the reference row, rows that are the same run as another) and the
per-seed files ``runs/<variant>/<row slug>/seed<N>.json``, and nothing else, so a committed sweep
can be re-checked from its files alone (``python -m at2po.evidence.stats DIR``).

Paired seeds: every row of a seed starts from the same warm start with the same prompt order, so
the effect of a row is measured as the per-seed difference ``row − reference``, whose spread
excludes the seed-to-seed spread of the warm start itself. Its 95% confidence interval is the
percentile bootstrap of the mean difference over seeds.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "bootstrap_ci",
    "environments_of",
    "fingerprint_of",
    "load_sweep",
    "markdown_tables",
    "paired",
    "pass_at_k",
    "slug",
    "tables_from_files",
]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed, so recomputing a table gives the same interval to the last digit


def slug(name: str) -> str:
    """A row's name as typed on a command line and used as its folder: 'AT²PO (full)' -> 'at2po-full'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("²", "2")).strip("-")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k) / C(n, k)
    (the probability that k of the n samples, drawn without replacement, include a correct one)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_ci(diffs: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``: resample the seeds with replacement
    ``resamples`` times, take the (1 − level)/2 and (1 + level)/2 quantiles of the resampled means."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one difference")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired(values: dict[int, float], reference: dict[int, float],
           environments: dict[int, tuple[str | None, str | None]] | None = None) -> dict[str, Any]:
    """Paired comparison over the seeds both have: mean difference (values − reference), its 95%
    bootstrap CI, and the number of seeds where the row is ahead, level or behind.

    ``environments``: per seed, the environment fingerprints of the two runs (None where a run
    did not record one). A seed whose two runs were made in different environments is left out
    (``excluded_seeds``): its difference would mix the row's effect with the machine's. Seeds
    with an unrecorded side are kept and listed (``unrecorded_seeds``): nothing says they differ."""
    common = sorted(set(values) & set(reference))
    envs = {s: (environments or {}).get(s, (None, None)) for s in common}
    unrecorded = [s for s in common if None in envs[s]]
    excluded = [s for s in common if None not in envs[s] and envs[s][0] != envs[s][1]]
    seeds = [s for s in common if s not in excluded]
    diffs = [values[s] - reference[s] for s in seeds]
    notes = {k: v for k, v in (("excluded_seeds", excluded), ("unrecorded_seeds", unrecorded)) if v}
    if not diffs:
        return {"n": 0, **notes}
    lo, hi = bootstrap_ci(diffs)
    return {
        "n": len(diffs), "seeds": seeds, "diffs": diffs, "mean": sum(diffs) / len(diffs), "ci95": [lo, hi],
        "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
        # Resolved: the interval excludes 0, i.e. the sign of the effect is settled at this level.
        "resolved": lo > 0 or hi < 0, **notes,
    }


def fingerprint_of(run: dict[str, Any]) -> str | None:
    """The environment fingerprint a result file recorded (None for files written before runs recorded it)."""
    return (run.get("environment") or {}).get("fingerprint")


def _paired_runs(runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]]) -> dict[str, Any]:
    envs = {s: (fingerprint_of(runs[s]), fingerprint_of(reference[s])) for s in set(runs) & set(reference)}
    return paired({s: r["em_after"] for s, r in runs.items()}, {s: r["em_after"] for s, r in reference.items()}, envs)


def environments_of(files: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """How many of a variant's result files each environment made: {fingerprint: {"runs", "cpu_model",
    "torch_cpu_capability", "at2po_source": [...]}}, plus "unrecorded": files without a record."""
    out: dict[str, Any] = {}
    unrecorded = 0
    for runs in files.values():
        for run in runs.values():
            env = run.get("environment")
            if not env:
                unrecorded += 1
                continue
            e = out.setdefault(env["fingerprint"], {"runs": 0, "cpu_model": env.get("cpu_model"),
                                                    "torch_cpu_capability": env.get("torch_cpu_capability"),
                                                    "at2po_source": []})
            e["runs"] += 1
            if env.get("at2po_source") not in e["at2po_source"]:
                e["at2po_source"].append(env.get("at2po_source"))
    return {**dict(sorted(out.items())), **({"unrecorded": unrecorded} if unrecorded else {})}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def load_sweep(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, dict[int, dict[str, Any]]]]]:
    """(sweep.json, files) where ``files[variant][row folder][seed]`` is a result file's content.

    The folder ``warm-start`` holds the warm start's metrics of each seed."""
    out = Path(out_dir)
    sweep_path = out / "sweep.json"
    if not sweep_path.is_file():
        raise FileNotFoundError(f"{sweep_path} does not exist: give the folder a sweep wrote (ablation.py --out)")
    sweep = json.loads(sweep_path.read_text())
    files: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted((out / "runs").glob("*/*/seed*.json")):
        m = re.fullmatch(r"seed(\d+)\.json", path.name)
        if m is None:
            continue
        variant, folder = path.parent.parent.name, path.parent.name
        files.setdefault(variant, {}).setdefault(folder, {})[int(m.group(1))] = json.loads(path.read_text())
    return sweep, files


def _row_stats(runs: dict[int, dict[str, Any]], warm: dict[int, dict[str, Any]],
               reference: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    seeds = sorted(runs)
    em = {s: runs[s]["em_after"] for s in seeds}
    hops = sorted({k for r in runs.values() for k in r["by_hop_after"] if re.fullmatch(r"em_\dhop", k)})
    out: dict[str, Any] = {
        "n": len(seeds), "seeds": seeds, "em": em, "em_mean": _mean(list(em.values())),
        "em_std": statistics.stdev(em.values()) if len(em) > 1 else 0.0,
        "delta_warm_mean": _mean([em[s] - warm[s]["val"]["val/em"] for s in seeds if s in warm]),
        **{f"{h}_mean": _mean([r["by_hop_after"][h] for r in runs.values() if h in r["by_hop_after"]]) for h in hops},
        **{f"{k}_mean": _mean([r[k] for r in runs.values()]) for k in ("generated_tokens", "tool_calls", "steps", "seconds")},
        "max_overshoot": max(r["generated_tokens"] - r["checkpoints"][-1] for r in runs.values()),
    }
    if reference is not None:
        out["vs_reference"] = _paired_runs(runs, reference)
    # The EM curve at the shared checkpoints, mean over seeds (the warm start at 0 tokens).
    points = list(zip(*(runs[s]["curve"] for s in seeds)))
    out["curve_tokens"] = [0.0, *(_mean([p["tokens"] for p in pt]) for pt in points)]
    out["curve_em"] = [_mean([warm[s]["val"]["val/em"] for s in seeds if s in warm]),
                       *(_mean([p["em"] for p in pt]) for pt in points)]
    return out


def _warm_stats(warm: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(warm)
    em = [warm[s]["val"]["val/em"] for s in seeds]
    out: dict[str, Any] = {"n": len(seeds), "seeds": seeds, "em_mean": _mean(em),
                           "em_std": statistics.stdev(em) if len(em) > 1 else 0.0}
    hops = sorted({k for w in warm.values() for k in w["by_hop"] if re.fullmatch(r"em_\dhop", k)})
    out.update({f"{h}_mean": _mean([w["by_hop"][h] for w in warm.values() if h in w["by_hop"]]) for h in hops})
    with_pass = [w["pass_at_k"] for w in warm.values() if w.get("pass_at_k")]
    if with_pass:
        def means(dicts: list[dict[str, Any]]) -> dict[str, float]:
            keys = [k for k in dicts[0] if k.startswith("pass@") and all(k in d for d in dicts)]
            return {k: _mean([d[k] for d in dicts]) for k in keys}

        out["pass_at_k"] = means(with_pass)
        hops = sorted({h for p in with_pass for h in p["by_hop"]})
        out["pass_at_k_by_hop"] = {h: means([p["by_hop"][h] for p in with_pass if h in p["by_hop"]]) for h in hops}
    return out


def tables_from_files(out_dir: str | Path) -> dict[str, Any]:
    """Every table entry of the sweep in ``out_dir``, from its files alone.

    Per variant: the warm start (greedy EM, per hop, pass@k), and per table (``progressive``,
    ``credit``) per row: EM after training per seed, mean ± sample std, Δ vs warm start, per-hop
    EM, costs, the paired difference to the reference row, and the component steps
    (``sweep["components"]``: the paired difference of one row to the previous one). Only seeds
    whose file exists count, so a sweep in progress gives tables over the seeds done so far.
    """
    sweep, files = load_sweep(out_dir)
    plan = sweep["plan"]
    reference, aliases = plan["reference_row"], plan.get("aliases", {})
    tables: dict[str, Any] = {}
    for variant in plan["variants"]:
        vfiles = files.get(variant, {})
        warm = vfiles.get("warm-start", {})

        valiases = aliases.get(variant, {})

        def runs_of(row: str) -> dict[int, dict[str, Any]]:
            return vfiles.get(slug(valiases.get(row, row)), {})

        ref_runs = runs_of(reference)
        vt: dict[str, Any] = {"environments": environments_of(vfiles),
                              "warm_start": _warm_stats(warm) if warm else {"n": 0}}
        for table, rows in plan["tables"].items():
            vt[table] = {row: _row_stats(runs_of(row), warm, ref_runs if row != reference else None)
                         for row in rows if runs_of(row)}
        vt["components"] = [
            {"component": label, "from": a, "to": b, **_paired_runs(runs_of(b), runs_of(a))}
            for label, a, b in plan.get("components", []) if runs_of(a) and runs_of(b)
        ]
        tables[variant] = vt
    return tables


# -- markdown -----------------------------------------------------------------------------------
def _ci(p: dict[str, Any]) -> str:
    if not p or p.get("n", 0) == 0:
        return "–"
    def signed(x: float) -> str:
        return f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: a rounding error below zero prints as +0.000, not -0.000

    return f"{signed(p['mean'])} [{signed(p['ci95'][0])}, {signed(p['ci95'][1])}]"


def _wtl(p: dict[str, Any]) -> str:
    return f"{p['wins']}/{p['ties']}/{p['losses']}" if p and p.get("n") else "–"


def _row_table(rows: dict[str, dict[str, Any]], first: str, reference: str, paper: dict[str, float]) -> list[str]:
    hops = sorted({k[:-5] for s in rows.values() for k in s if re.fullmatch(r"em_\dhop_mean", k)})
    head = [first, "seeds", "held-out EM", "Δ vs warm start", f"− {reference} (95% CI)", "ahead/level/behind",
            *(f"{h[3]}-hop EM" for h in hops), "generated tokens", "steps", "wall s", "paper EM %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():
        vs = s.get("vs_reference")
        cells = [name, str(s["n"]), f"{s['em_mean']:.3f} ± {s['em_std']:.3f}", f"{s['delta_warm_mean']:+.3f}",
                 _ci(vs) if vs else "(reference)", _wtl(vs) if vs else "",
                 *(f"{s[h + '_mean']:.3f}" if h + "_mean" in s else "–" for h in hops),
                 f"{s['generated_tokens_mean']:,.0f}", f"{s['steps_mean']:.1f}", f"{s['seconds_mean']:,.1f}",
                 f"{paper[name]:.2f}" if name in paper else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_tables(tables: dict[str, Any], sweep: dict[str, Any], paper: dict[str, float] | None = None) -> str:
    """The sweep's tables as markdown (what ablation.md holds below its header)."""
    paper = paper or {}
    plan = sweep["plan"]
    reference = plan["reference_row"]
    titles = {"progressive": "Progressive ablation (the paper's Table 4 analogue)",
              "credit": f"Turn-wise credit variants on top of {reference} (the paper's Table 5 analogue)"}
    text: list[str] = []
    for variant, vt in tables.items():
        text += [f"## Task variant `{variant}`: {plan['variant_descriptions'].get(variant, '')}", ""]
        text += _environment_lines(vt.get("environments", {}))
        w = vt["warm_start"]
        if w.get("n"):
            hop = ", ".join(f"{k[3]}-hop {v:.3f}" for k, v in w.items() if re.fullmatch(r"em_\dhop_mean", k))
            line = f"Warm start (no RL, {w['n']} seeds): greedy held-out EM {w['em_mean']:.3f} ± {w['em_std']:.3f} ({hop})"
            if w.get("pass_at_k"):
                line += "; sampled pass@k " + ", ".join(
                    f"{k.replace('pass@', '@')} {v:.3f}" for k, v in w["pass_at_k"].items() if k.startswith("pass@"))
            text += [line + ".", ""]
        for table in plan["tables"]:
            if vt.get(table):
                text += [f"### {titles.get(table, table)}", "",
                         *_row_table(vt[table], "row" if table == "progressive" else "credit", reference, paper), ""]
        if vt["components"]:
            text += ["### Components: paired difference of each step of the progression", "",
                     "| component | from → to | seeds | mean difference (95% CI) | ahead/level/behind | resolved |",
                     "|---|---|---|---|---|---|"]
            for c in vt["components"]:
                text.append(f"| {c['component']} | {c['from']} → {c['to']} | {c['n']} | {_ci(c)} | {_wtl(c)} | "
                            f"{'yes' if c.get('resolved') else 'no'} |")
            text.append("")
        text += _pairing_notes(vt, plan["tables"])
    return "\n".join(text)


def _environment_lines(envs: dict[str, Any]) -> list[str]:
    parts = [f"`{fp}` ({e['cpu_model']}, {e['torch_cpu_capability']}): {e['runs']} runs"
             for fp, e in envs.items() if fp != "unrecorded"]
    if envs.get("unrecorded"):
        parts.append(f"{envs['unrecorded']} runs without a record (made before runs recorded their environment)")
    return [f"Environments (fingerprint, CPU, torch kernels): {'; '.join(parts)}.", ""] if parts else []


def _pairing_notes(vt: dict[str, Any], tables: Sequence[str]) -> list[str]:
    """Which paired differences left seeds out (runs made in different environments), and which
    rest on runs that recorded no environment."""
    if set(vt.get("environments", {})) == {"unrecorded"}:  # an older sweep: one sentence, not one per pair
        return ["No run of this variant recorded its environment, so no pair is checked for a change of "
                "machine or packages between its two runs.", ""]
    pairs = [(f"{row} vs the reference", st["vs_reference"]) for table in tables
             for row, st in vt.get(table, {}).items() if "vs_reference" in st]
    pairs += [(c["component"], c) for c in vt.get("components", [])]
    lines: list[str] = []
    for key, what in (("excluded_seeds", "Left out of the paired differences (the two runs were made in "
                                         "different environments)"),
                      ("unrecorded_seeds", "Paired differences over runs that recorded no environment, so "
                                           "not checked for a change of machine or packages")):
        hit = [f"{name} (seeds {', '.join(map(str, p[key]))})" for name, p in pairs if p.get(key)]
        if hit:
            lines += [f"{what}: " + "; ".join(hit) + ".", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Recompute and print a sweep's tables: ``python -m at2po.evidence.stats DIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m at2po.evidence.stats SWEEP_DIR", file=sys.stderr)
        return 2
    try:
        sweep, _ = load_sweep(args[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_tables(tables_from_files(args[0]), sweep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
