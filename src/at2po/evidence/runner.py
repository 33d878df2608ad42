"""A resumable, process-parallel runner of paired-seed training sweeps (the ablation benchmark's engine).

A sweep is a set of jobs, each writing one file under the sweep's folder ``out``:

- ``assets`` (one per seed): the seed's world, tokenizer and warm-started tiny model, built once
  into ``cache/seed<N>/assets`` and shared by every row and task variant of the seed;
- ``warm`` (per variant and seed): the warm start's held-out metrics, greedy and sampled
  (pass@k), in ``runs/<variant>/warm-start/seed<N>.json``;
- ``row`` (per variant, row and seed): one training run from that warm start, in
  ``runs/<variant>/<row slug>/seed<N>.json``.

Paired seeds: every row of a seed starts from the same warm start with the same ``trainer.seed``
(so the same prompt order and the same rollout seed); rows differ only in their overrides.

Resumable: a job whose file exists is done and is never run again; a file is written to a
temporary name and renamed, so a killed sweep leaves only whole files and the next invocation
with the same arguments runs exactly the jobs still missing. Each file records the job's spec
(warm start, variant, overrides, budget): resuming with other settings is refused, never
silently mixed or overwritten.

Parallel: ``workers > 1`` runs jobs in that many spawned processes, each with one torch thread;
a job starts as soon as the jobs it needs are done (the seed's warm start; with a measured
budget, the reference row of its variant and seed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from at2po.evidence.environment import environment
from at2po.evidence.stats import pass_at_k, slug

__all__ = ["SweepLocked", "SweepMismatch", "atomic_write_json", "check_jobs", "plan_jobs", "run_job", "run_jobs",
           "sweep_lock", "validation_steps"]

PASS_KS = (1, 2, 4, 8, 16, 32, 64)
# MultiHopConfig fields a task variant may change: build_world draws names, facts and held-out
# facts before the splits, so these change the questions and nothing else.
SPLIT_FIELDS = frozenset({"n_train", "n_test", "train_hop_weights", "test_hop_weights"})


class SweepMismatch(ValueError):
    """A result file in the sweep's folder was made by a job with other settings."""


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or whole (rename of a temp file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True)


def validation_steps(steps: int, every: int) -> list[int]:
    """The reference row's validation steps: every ``every`` steps and the last one."""
    return sorted({*range(every, steps, every), steps}) if every else [steps]


# -- planning --------------------------------------------------------------------------------------
def assets_job(out: Path, seed: int, assets: dict[str, Any]) -> dict[str, Any]:
    """The job that builds seed ``seed``'s warm start (``assets``: its QuickstartConfig as a dict)
    into ``out``'s cache, where every other job of the seed reads it."""
    return {"id": f"assets/seed{seed}", "kind": "assets", "seed": seed, "out": str(out), "deps": [],
            "path": str(Path(out) / "cache" / f"seed{seed}" / "assets"), "spec": {"assets": assets}}


def plan_jobs(out: Path, seeds: Sequence[int], assets: Callable[[int], dict[str, Any]],
              variants: dict[str, dict[str, Any]], rows: dict[str, list[str]], reference: str,
              aliases: dict[str, dict[str, str]], budget: float | None, pass_k_samples: int) -> list[dict[str, Any]]:
    """Every job of the sweep, in an order where each job comes after the jobs it needs.

    ``assets(seed)``: the QuickstartConfig of the seed's warm start, as a dict; ``variants``:
    name -> {"world": MultiHopConfig fields to change, "overrides": every row's config overrides,
    before the row's own}; ``rows``: name -> overrides; ``aliases[variant]``: rows that are the
    same run as another row (no job of their own); ``budget``: None to measure it on
    ``reference``, or generated tokens per row.
    """
    jobs: list[dict[str, Any]] = []
    for seed in seeds:
        seed_assets = assets(seed)
        jobs.append(assets_job(out, seed, seed_assets))
        assets_id = jobs[-1]["id"]
        for vname, variant in variants.items():
            common = {"assets": seed_assets, "variant": {"name": vname, **variant},
                      "overrides": list(variant["overrides"])}
            warm_id = f"{vname}/warm-start/seed{seed}"
            jobs.append({"id": warm_id, "kind": "warm", "seed": seed, "out": str(out), "deps": [assets_id],
                         "path": str(out / "runs" / vname / "warm-start" / f"seed{seed}.json"),
                         "spec": {**common, "pass_k_samples": pass_k_samples}})
            ref_id = f"{vname}/{slug(reference)}/seed{seed}"
            ordered = [reference, *(r for r in rows if r != reference)] if reference in rows else list(rows)
            for row in ordered:
                if row in aliases.get(vname, {}):
                    continue
                measured = budget is None
                deps = [assets_id, warm_id] + ([ref_id] if measured and row != reference else [])
                jobs.append({
                    "id": f"{vname}/{slug(row)}/seed{seed}", "kind": "row", "seed": seed, "out": str(out), "deps": deps,
                    "path": str(out / "runs" / vname / slug(row) / f"seed{seed}.json"), "row": row,
                    "reference_path": str(out / "runs" / vname / slug(reference) / f"seed{seed}.json"),
                    "warm_path": str(out / "runs" / vname / "warm-start" / f"seed{seed}.json"),
                    "spec": {**common, "row": row, "row_overrides": rows[row],
                             "budget": {"reference": reference} if measured else {"tokens": budget}},
                })
    return jobs


def _done(job: dict[str, Any]) -> bool:
    """Whether the job's file exists; raises SweepMismatch when it was made with other settings."""
    path = Path(job["path"])
    if job["kind"] == "assets":
        log = path / "sft_log.json"
        if not log.is_file():
            return False
        made = json.loads(log.read_text())["config"]
        if _canonical(made) != _canonical(job["spec"]["assets"]):
            raise SweepMismatch(f"{path} holds a warm start built with other settings: give another --out "
                                "(or delete that folder to rebuild it)")
        return True
    if not path.is_file():
        return False
    if _canonical(json.loads(path.read_text()).get("spec")) != _canonical(job["spec"]):
        raise SweepMismatch(f"{path} was made with other settings than this sweep's: give another --out "
                            "(or delete that file to rerun it)")
    return True


def check_jobs(jobs: list[dict[str, Any]]) -> list[str]:
    """The ids of the jobs already done; raises SweepMismatch before anything runs or is written
    when an existing file was made with other settings."""
    return [j["id"] for j in jobs if _done(j)]


# -- running ---------------------------------------------------------------------------------------
def _init_worker() -> None:
    """One torch thread per worker process: N workers use N cores without oversubscribing them."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files and folders of jobs killed mid-write (never a finished result)."""
    for p in [*out.glob("runs/*/*/.seed*.tmp-*"), *out.glob("cache/seed*/.*.tmp-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_jobs(jobs: list[dict[str, Any]], workers: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the jobs not yet done, ``workers`` at a time, each once its dependencies are done.

    Returns {"run": ids run now, "skipped": ids already done, "failed": {id: error}, "blocked": ids
    not run because a job they need failed}. A failing job does not stop the others."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if jobs:
        _remove_stale_temporaries(Path(jobs[0]["out"]))
    skipped = check_jobs(jobs)
    todo = [j for j in jobs if j["id"] not in set(skipped)]
    report: dict[str, Any] = {"run": [], "skipped": skipped, "failed": {}, "blocked": []}
    log(f"{len(jobs)} jobs: {len(skipped)} already done, {len(todo)} to run with {workers} worker(s)")
    finished = set(skipped)

    def ready(j: dict[str, Any]) -> bool:
        return all(d in finished for d in j["deps"])

    def blocked(j: dict[str, Any]) -> bool:
        return any(d in report["failed"] or d in report["blocked"] for d in j["deps"])

    if workers == 1:
        for job in todo:  # planned in dependency order
            if blocked(job):
                report["blocked"].append(job["id"])
                continue
            try:
                run_job(job)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
                _failed(report, job, e, log)
                continue
            finished.add(job["id"])
            report["run"].append(job["id"])
        return report

    import multiprocessing

    waiting = list(todo)
    running: dict[Future, dict[str, Any]] = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        while waiting or running:
            for job in [j for j in waiting if blocked(j)]:
                waiting.remove(job)
                report["blocked"].append(job["id"])
            for job in [j for j in waiting if ready(j)][: workers - len(running)]:
                waiting.remove(job)
                running[pool.submit(run_job, job)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001
                    _failed(report, job, e, log)
                    continue
                finished.add(job["id"])
                report["run"].append(job["id"])
    return report


def _failed(report: dict[str, Any], job: dict[str, Any], e: BaseException, log: Callable[[str], None]) -> None:
    """Record a failed job; its traceback (the worker's, for a job run in another process) goes
    to the log, since a failure here is a bug or a broken environment, not a user error."""
    import traceback

    report["failed"][job["id"]] = f"{type(e).__name__}: {e}"
    log("".join(traceback.format_exception(e)).rstrip())
    log(f"{job['id']}: FAILED: {type(e).__name__}: {e}")


def run_job(job: dict[str, Any]) -> str:
    """Run one job and write its file (the function a worker process runs)."""
    t0 = time.perf_counter()
    {"assets": _run_assets, "warm": _run_warm, "row": _run_row}[job["kind"]](job)
    msg = f"{job['id']}: done in {time.perf_counter() - t0:.1f} s"
    print(msg, flush=True)
    return msg


def _say(job: dict[str, Any]) -> Callable[[str], None]:
    return lambda msg: print(f"{job['id']} | {msg}", flush=True)


def _quickstart_config(d: dict[str, Any]):
    from at2po.quickstart import QuickstartConfig
    from at2po.tasks.multihop import MultiHopConfig

    d = dict(d)
    world = MultiHopConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("world").items()})
    return QuickstartConfig(world=world, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _run_assets(job: dict[str, Any]) -> None:
    from at2po.quickstart import build_quickstart_assets

    final = Path(job["path"])
    if final.exists():  # a folder without sft_log.json: an interrupted build that was not ours to finish
        shutil.rmtree(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    build_quickstart_assets(_quickstart_config(job["spec"]["assets"]), out_dir=tmp, progress=False)
    atomic_write_json(tmp / "environment.json", environment())
    os.replace(tmp, final)


def _variant_data(job: dict[str, Any]) -> tuple[Path, Path]:
    """(train file, validation file) of the job's task variant: the warm start's own world, with
    the variant's question splits (written once per seed and variant)."""
    from at2po.tasks.multihop import build_world

    out, seed, variant = Path(job["out"]), job["seed"], job["spec"]["variant"]
    assets = out / "cache" / f"seed{seed}" / "assets"
    if not variant.get("world"):
        return assets / "train.jsonl", assets / "test.jsonl"
    other = set(variant["world"]) - SPLIT_FIELDS
    if other:
        raise ValueError(f"task variant {variant['name']!r} changes {sorted(other)}: a variant may change only "
                         f"{sorted(SPLIT_FIELDS)}, the fields that leave the warm start's world and corpus as they are")
    folder = out / "cache" / f"seed{seed}" / variant["name"]
    made = folder / "variant.json"  # what the cached splits were built from: rebuilt when it differs
    if not made.is_file() or _canonical(json.loads(made.read_text())) != _canonical(variant["world"]):
        # Only the splits change: names, facts and corpus are a function of the world's seed and
        # sizes, so the warm start's world and search corpus serve every variant.
        world_cfg = _quickstart_config(job["spec"]["assets"]).world
        world = build_world(replace(world_cfg, **{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in variant["world"].items()}))
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        world.write(tmp)
        (tmp / "corpus.jsonl").unlink()  # the assets' corpus is the same one
        (tmp / "variant.json").write_text(json.dumps(variant["world"]))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder / "train.jsonl", folder / "test.jsonl"


def _config(job: dict[str, Any], name: str, extra: Sequence[str] = ()):
    from at2po.quickstart import quickstart_config

    out, seed = Path(job["out"]), job["seed"]
    train, val = _variant_data(job)
    assets = out / "cache" / f"seed{seed}" / "assets"
    scratch = out / "cache" / f"seed{seed}" / job["spec"]["variant"]["name"] / name
    return quickstart_config(assets, scratch, seed, [*job["spec"]["overrides"], *extra,
                                                     f"data.train_file={train}", f"data.val_file={val}"])


def by_hop(records: list[dict[str, Any]]) -> dict[str, float]:
    """EM overall and per hop count of one greedy validation's per-row records (no second pass)."""
    from at2po.evaluation.evaluator import mean_metrics

    out = {"em": mean_metrics(records, ["em"])["em"]}
    for hops in sorted({r["meta"]["hops"] for r in records}):
        out[f"em_{hops}hop"] = mean_metrics([r for r in records if r["meta"]["hops"] == hops], ["em"])["em"]
    return out


def sampled_pass_at_k(trainer, samples: int, batch_prompts: int = 8) -> dict[str, Any]:
    """pass@k of the trainer's current policy on its validation questions: ``samples`` chains per
    question at the rollout temperature, k = 1, 2, 4, ... up to ``samples``, overall and per hop
    count, with every question's (id, hops, samples, correct) so each number can be recomputed."""
    from at2po.config import RolloutConfig

    cfg = RolloutConfig(**{**trainer.cfg.rollout.__dict__, "n_initial": samples, "expansion_rounds": 0,
                           "samples_per_tree": 0})
    per_question = []
    rows = trainer.val_rows
    for start in range(0, len(rows), batch_prompts):
        chunk = rows[start:start + batch_prompts]
        result = trainer.engine.rollout([trainer.engine.prompt(s) for s in chunk], config=cfg)
        for t, sample in enumerate(chunk):
            leaves = [r for r in result.rows if r.tree == t and not r.duplicate]
            per_question.append([sample.id, (sample.meta or {}).get("hops"), len(leaves),
                                 int(sum(float(r.score.metrics["em"]) for r in leaves))])
    ks = [k for k in PASS_KS if k <= samples]

    def summary(qs: list[list[Any]]) -> dict[str, float]:
        return {f"pass@{k}": sum(pass_at_k(n, c, k) for _, _, n, c in qs) / len(qs) for k in ks}

    hops = sorted({q[1] for q in per_question if q[1] is not None})
    return {"samples": samples, **summary(per_question),
            "by_hop": {str(h): summary([q for q in per_question if q[1] == h]) for h in hops},
            "per_question": per_question}


def _run_warm(job: dict[str, Any]) -> None:
    from at2po.training.trainer import Trainer

    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer = Trainer(_config(job, "warm-start"))
    val = trainer.validate()
    result: dict[str, Any] = {"spec": job["spec"], "environment": environment(), "val": val,
                              "by_hop": by_hop(trainer.val_records),
                              "questions": {"train": len(trainer.train_rows), "val": len(trainer.val_rows)}}
    n = job["spec"]["pass_k_samples"]
    if n:
        result["pass_at_k"] = sampled_pass_at_k(trainer, n)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - cpu0
    msg = f"greedy EM {val['val/em']:.3f}"
    if n:
        msg += f", pass@{n} {result['pass_at_k'][f'pass@{max(k for k in PASS_KS if k <= n)}']:.3f}"
    _say(job)(msg)
    atomic_write_json(Path(job["path"]), result)


def train_row(cfg, targets: Sequence[float], unit: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Train a fresh Trainer from the warm start until every target is reached, validating at each.

    ``unit`` is "steps" (the reference row measuring the budget) or "tokens" (cumulative
    generated tokens). A step that passes several targets is validated once and counts for each,
    so every row's curve has one point per target.
    """
    from at2po.training.trainer import Trainer

    start, cpu_start = time.perf_counter(), time.process_time()
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
        # CPU seconds of all this process's threads: the cost on a free core, whatever the load was.
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, "train_seconds": sum(s["time/step"] for s in steps),
        "val_after": {k: v for k, v in steps[-1].items() if k.startswith("val/")},
        "by_hop_after": by_hop(trainer.val_records), "curve": curve, "step_metrics": steps,
    }


def _run_row(job: dict[str, Any]) -> None:
    spec = job["spec"]
    cfg = _config(job, slug(spec["row"]), spec["row_overrides"])
    val_steps = validation_steps(cfg.trainer.steps, cfg.trainer.val_every)
    say = _say(job)
    if "tokens" in spec["budget"]:
        checkpoints = [spec["budget"]["tokens"] * s / cfg.trainer.steps for s in val_steps]
        r = train_row(cfg, checkpoints, "tokens", say)
    elif spec["row"] == spec["budget"]["reference"]:
        r = train_row(cfg, val_steps, "steps", say)
        checkpoints = [c["tokens"] for c in r["curve"]]
    else:
        checkpoints = json.loads(Path(job["reference_path"]).read_text())["checkpoints"]
        r = train_row(cfg, checkpoints, "tokens", say)
    warm = json.loads(Path(job["warm_path"]).read_text())
    before, after = warm["val"]["val/em"], r["val_after"]["val/em"]
    say(f"EM {before:.3f} -> {after:.3f}, {r['generated_tokens']:.0f} tokens (budget {checkpoints[-1]:.0f}) "
        f"in {r['steps']} steps, {r['seconds']:.1f} s")
    atomic_write_json(Path(job["path"]), {
        "spec": spec, "environment": environment(), "seed": job["seed"], "checkpoints": checkpoints,
        "em_before": before, "em_after": after, "delta": after - before, "budget_overshoot": r["generated_tokens"] - checkpoints[-1], **r,
    })


def assets_dict(cfg) -> dict[str, Any]:
    """A QuickstartConfig as the JSON a job spec (and the warm start's sft_log.json) holds."""
    return json.loads(json.dumps(asdict(cfg)))


class SweepLocked(RuntimeError):
    """Another live process is running a sweep in the same folder."""


class sweep_lock:
    """Hold ``out/.lock`` (with this process's id) while a sweep runs, so that two invocations
    never run, or clean up after, the same jobs at once; a lock whose process is gone is stale."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"

    def __enter__(self) -> "sweep_lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise SweepLocked(f"another sweep (pid {pid}) is running in {self.path.parent}; "
                                      "wait for it or give another --out") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise SweepLocked(f"could not take {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
