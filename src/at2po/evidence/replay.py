"""Rerun one finished job of a sweep and compare it with its file: does this machine reproduce it?

A sweep's files are the evidence behind its tables; ``replay_run`` answers, for one of them,
whether the same job run here gives the same numbers. It reads the job's spec from the file,
runs the job in a scratch folder (the sweep's folder is only read), and compares every outcome:
held-out EM, per-hop EM, tokens, steps, the curve and each step's metrics, all but timings.

On one machine a job is deterministic, so the result is identical to the last bit; on another
machine (another CPU, other package versions: another environment fingerprint) the runs usually
part at the first sampled token that flips, and ``first_step`` says where. That is why paired
differences are only taken within one environment (``at2po.evidence.stats``).

The seed's warm-started model is reused from the sweep's cache when it is there and was built
with the file's settings; otherwise (a fresh clone: the cache is not committed; or a cache built
with other settings, which is left as it is) it is rebuilt in
the scratch folder, which on another machine may itself differ: replay the seed's
``<variant>/warm-start/seed<N>`` file too, to see whether it does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from at2po.evidence.runner import SweepMismatch, _done, assets_job, run_job
from at2po.evidence.stats import fingerprint_of, slug

RUN_ID = re.compile(r"^(?P<variant>[\w.-]+)/(?P<row>[\w.-]+)/seed(?P<seed>\d+)$")
# What a run's file holds that is not an outcome: wall and CPU times, and where it ran.
NOT_OUTCOMES = frozenset({"seconds", "cpu_seconds", "train_seconds", "environment"})
TIMING_PREFIXES = ("time/", "perf/")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, as the recorded job did (a sweep's workers use 1): the thread
    count changes reduction orders, so it is part of the environment."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_path(out: Path, run_id: str) -> Path:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run {run_id!r}: give it as VARIANT/ROW/seedN, e.g. standard/at2po-full/seed0 "
                         "(the file's path under the sweep's runs/, without .json)")
    path = Path(out) / "runs" / f"{run_id}.json"
    if not path.is_file():
        raise ValueError(f"run {run_id!r}: no file {path}; the sweep's finished runs are the files under "
                         f"{Path(out) / 'runs'}")
    return path


def outcome(result: dict[str, Any]) -> dict[str, Any]:
    """A run's file without its timings and environment: what a reproduction must match exactly."""
    def untimed(x: Any) -> Any:  # metrics named time/... or perf/..., at any depth
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items() if not str(k).startswith(TIMING_PREFIXES)}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    return untimed({k: v for k, v in result.items() if k not in NOT_OUTCOMES})


def compare_runs(recorded: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """Which outcomes differ between a run's file and its rerun, and the first training step that
    differs (with the metrics that do): {"identical", "differences", "first_step", "step_differences"}."""
    a, b = outcome(recorded), outcome(fresh)
    differences = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    first_step, step_differences = None, []
    for i, (x, y) in enumerate(zip(a.get("step_metrics", []), b.get("step_metrics", []))):
        if x != y:
            first_step = x.get("step", i + 1)
            step_differences = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            break
    else:
        if len(a.get("step_metrics", [])) != len(b.get("step_metrics", [])):
            first_step = min(len(a["step_metrics"]), len(b["step_metrics"])) + 1
    return {"identical": not differences, "differences": differences, "first_step": first_step,
            "step_differences": step_differences}


def replay_run(out: str | Path, run_id: str, scratch: str | Path) -> dict[str, Any]:
    """Run the job behind ``out/runs/<run_id>.json`` again in ``scratch`` and compare.

    Returns compare_runs' keys plus "run", "recorded" and "fresh" (the two files' contents),
    "fingerprints" (the file's, this machine's) and "assets" ("reused" from the sweep's cache or
    "rebuilt"). Nothing under ``out`` is written.
    """
    out, scratch = Path(out), Path(scratch)
    path = run_path(out, run_id)
    recorded = json.loads(path.read_text())
    spec, m = recorded.get("spec"), RUN_ID.match(run_id)
    if not isinstance(spec, dict) or "assets" not in spec or "variant" not in spec:
        raise ValueError(f"{path} holds no job spec (a file of an older runner?): it cannot be rerun")
    seed, variant = int(m["seed"]), m["variant"]

    # The seed's warm start: the sweep's cached build when it matches the spec, else a new build.
    build, cached = assets_job(scratch, seed, spec["assets"]), assets_job(out, seed, spec["assets"])
    target = Path(build["path"])
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        reusable = _done(cached)
    except SweepMismatch:  # the cache holds a warm start built with other settings than this run's
        reusable = False
    if reusable:
        if not target.exists():
            os.symlink(Path(cached["path"]).resolve(), target, target_is_directory=True)
        assets = "reused"
    else:
        with torch_threads(1):  # as a sweep's workers build it
            run_job(build)
        assets = "rebuilt"

    job: dict[str, Any] = {"id": run_id, "seed": seed, "out": str(scratch), "deps": [], "spec": spec,
                           "path": str(scratch / "runs" / f"{run_id}.json")}
    if m["row"] == "warm-start":
        job["kind"] = "warm"
    else:
        # A row reads its warm start's held-out EM and, under a measured budget, the reference
        # row's token checkpoints: both are taken from the sweep's files, as in the sweep.
        job |= {"kind": "row", "row": spec["row"], "warm_path": str(run_path(out, f"{variant}/warm-start/seed{seed}"))}
        reference = spec.get("budget", {}).get("reference")
        if reference is not None and reference != spec["row"]:
            job["reference_path"] = str(run_path(out, f"{variant}/{slug(reference)}/seed{seed}"))
    fresh_path = Path(job["path"])
    if fresh_path.exists():
        fresh_path.unlink()
    with torch_threads(int((recorded.get("environment") or {}).get("torch_threads") or 1)):
        run_job(job)
    fresh = json.loads(fresh_path.read_text())
    return {"run": run_id, **compare_runs(recorded, fresh), "recorded": recorded, "fresh": fresh,
            "fingerprints": {"recorded": fingerprint_of(recorded), "here": fingerprint_of(fresh)},
            "assets": assets}


def describe(report: dict[str, Any]) -> str:
    """One paragraph a person reads: reproduced or not, where it parted, in which environments."""
    rec, new = report["recorded"], report["fresh"]
    fp = report["fingerprints"]
    where = (f"environment here {fp['here']}, in the file {fp['recorded'] or 'not recorded'}"
             + ("" if fp["recorded"] in (None, fp["here"]) else ": different environments, so a difference is expected"))
    warm = f"warm start {report['assets']}"
    if "em_after" in rec:
        what = (f"held-out EM {new['em_after']:.3f} (file {rec['em_after']:.3f}), "
                f"{new['generated_tokens']:,.0f} tokens (file {rec['generated_tokens']:,.0f})")
    else:
        what = f"greedy EM {new['val']['val/em']:.3f} (file {rec['val']['val/em']:.3f})"
    if report["identical"]:
        return f"{report['run']}: reproduced exactly: {what}; {warm}; {where}"
    step = (f"; the runs part at step {report['first_step']} ({', '.join(report['step_differences'][:4])})"
            if report["first_step"] is not None else "")
    return (f"{report['run']}: NOT reproduced: {what}; differs in {', '.join(report['differences'])}{step}; "
            f"{warm}; {where}")
