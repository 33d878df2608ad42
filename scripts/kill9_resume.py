"""Kill a single-process CPU training run with SIGKILL at random points, resume it each time, and
compare the end with an uninterrupted run's: the final weights bit for bit, metrics.jsonl row by
row (every metric except wall-clock times and rates, which no two runs share).

    PYTHONPATH=src python scripts/kill9_resume.py --kills 10 --steps 24 --out runs/kill9

Each run is ``python -m at2po.cli train`` in a subprocess: a fresh run first, then ``--resume``.
A kill lands at a random time, mostly while the run trains and saves (uniform over the next few
steps after it printed that it started), sometimes while it starts up (loading, resuming). Every
resume must print which checkpoint it resumed from and must never skip a damaged one (saves are
atomic); the script exits 1 when anything differs. Writes ``report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CORPUS = ["Zorbex was founded by Mila Tarn.", "Mila Tarn was born in Quovia.", "Quovia is a city in Belmark.",
          "Drelto is a river that flows through Quovia.", "Belmark is a country with many rivers."]
QUESTIONS = [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
             ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")]
# Wall-clock metrics differ between any two runs; everything else must be equal.
UNTIMED = re.compile(r"^(time/|perf/)")
STARTED = re.compile(r"^(step \d+:|resumed from |no checkpoint in )")


def build_assets(root: Path) -> None:
    """A tiny random model with its tokenizer, a BM25 corpus and a training file under ``root``."""
    from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(synthetic_agent_texts(150) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    save_pretrained_dir(model, tok, root / "model")
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "contents": c}) + "\n" for i, c in enumerate(CORPUS))
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "question": q, "golden_answers": [a]}) + "\n"
                     for i, (q, a) in enumerate(QUESTIONS))


def write_config(root: Path, steps: int) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(root / "model")},
        "data": {"train_file": str(root / "train.jsonl"), "val_file": str(root / "train.jsonl")},
        "tools": {"search": {"corpus_file": str(root / "corpus.jsonl")}},
        "rollout": {"n_initial": 3, "expansion_rounds": 1, "top_k": 2, "samples_per_tree": 4, "chunk_tokens": 16,
                    "max_response_tokens": 48, "max_turns": 3},
        "optim": {"lr": 1e-3},
        "trainer": {"steps": steps, "prompts_per_step": 2, "mini_batch_prompts": 1, "micro_batch_rows": 3,
                    "save_every": 1, "keep_checkpoints": 2, "val_every": 5, "val_before_train": True,
                    "progress": False, "tensorboard": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _command(config: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "at2po.cli", "train", "--config", str(config), f"trainer.output_dir={out}",
            *(["--resume"] if resume else [])]


class Run:
    """One training process whose output lines are collected as they come, with their times."""

    def __init__(self, config: Path, out: Path, resume: bool) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(_command(config, out, resume), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=_env(), start_new_session=True)
        self.lines: list[str] = []
        self.started = threading.Event()
        self.started_at: float | None = None  # seconds from launch to its first step or resume line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if STARTED.match(line) and not self.started.is_set():
                self.started_at = time.monotonic() - self.t0
                self.started.set()
        self.started.set()  # the process ended

    def wait(self) -> int:
        rc = self.proc.wait()
        self._reader.join()
        return rc

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)


def untimed_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not UNTIMED.match(k)} for r in rows]


def final_weights(out: Path, steps: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{steps:06d}" / "model.safetensors"))


def run_reference(config: Path, out: Path, steps: int) -> tuple[float, float, float]:
    """The uninterrupted run: (total seconds, start-up seconds, seconds per step)."""
    ref = Run(config, out, resume=False)
    if ref.wait() != 0:
        raise RuntimeError("the uninterrupted run failed:\n" + "\n".join(ref.lines[-40:]))
    total = time.monotonic() - ref.t0
    startup = ref.started_at or total / 3
    return total, startup, (total - startup) / steps


def kill_loop(config: Path, out: Path, kills: int, step_seconds: float, startup_seconds: float,
              rng: random.Random, window_steps: float = 3.0, say=print) -> dict:
    """Start, kill at a random point, resume, ... ``kills`` times, then resume to the end. A
    training-time kill lands uniformly within ``window_steps`` steps after the run started."""
    events = []
    resume = False
    while len(events) < kills:
        run = Run(config, out, resume)
        if rng.random() < 0.2:  # during start-up: loading, resuming, cleaning up
            where, delay = "startup", rng.uniform(0, startup_seconds)
            time.sleep(delay)
        else:  # while training, validating and saving: somewhere in the next few steps
            run.started.wait(timeout=600)
            where, delay = "training", rng.uniform(0, window_steps * step_seconds)
            time.sleep(delay)
        finished = run.proc.poll() is not None
        if not finished:
            run.kill()
        rc = run.wait()
        text = "\n".join(run.lines)
        resumed = re.findall(r"resumed from (\S+) at step (\d+)", text)
        event = {"where": where, "delay_s": round(delay, 3), "rc": rc, "killed": not finished,
                 "resumed_from": resumed[0][1] if resumed else None,
                 "skipped": re.findall(r"skipping checkpoint (\S+)", text),
                 "steps_logged": [int(s) for s in re.findall(r"^step (\d+):", text, re.M)],
                 "error": "Traceback" in text or (finished and rc != 0)}
        say(f"run {len(events) + 1}: {event}")
        if finished:
            if rc != 0:
                raise RuntimeError(f"a run failed on its own (exit {rc}):\n{text[-3000:]}")
            break  # it finished before the kill: nothing left to kill
        events.append(event)
        resume = True
    last = Run(config, out, resume=True)
    rc = last.wait()
    text = "\n".join(last.lines)
    if rc != 0:
        raise RuntimeError(f"the final resume failed (exit {rc}):\n{text[-3000:]}")
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", text)
    events.append({"where": "final", "rc": rc, "killed": False, "resumed_from": resumed[0][1] if resumed else None,
                   "skipped": re.findall(r"skipping checkpoint (\S+)", text), "error": "Traceback" in text})
    return {"events": events}


def compare(ref: Path, out: Path, steps: int) -> dict:
    import torch

    wa, wb = final_weights(ref, steps), final_weights(out, steps)
    differing = sorted(k for k in wa if k not in wb or not torch.equal(wa[k], wb[k]))
    ra, rb = untimed_rows(ref), untimed_rows(out)
    return {"tensors": len(wa), "tensors_differing": differing, "weights_equal": not differing and wa.keys() == wb.keys(),
            "metric_rows": [len(ra), len(rb)], "metrics_equal": ra == rb,
            "first_differing_row": next((i for i, (a, b) in enumerate(zip(ra, rb)) if a != b), None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", type=Path, default=Path("runs/kill9"))
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)  # the script's own scratch directory
    build_assets(args.out / "assets")
    config = write_config(args.out / "assets", args.steps)

    total, startup, step_seconds = run_reference(config, args.out / "uninterrupted", args.steps)
    print(f"uninterrupted: {args.steps} steps in {total:.1f}s ({startup:.1f}s start-up, {step_seconds:.2f}s a step)")

    start = time.monotonic()
    result = kill_loop(config, args.out / "killed", args.kills, step_seconds, startup, rng=random.Random(args.seed))
    comparison = compare(args.out / "uninterrupted", args.out / "killed", args.steps)
    kills = [e for e in result["events"] if e["killed"]]
    ok = (len(kills) == args.kills and comparison["weights_equal"] and comparison["metrics_equal"]
          and not any(e["skipped"] or e["error"] for e in result["events"]))
    report = {"kills": len(kills), "steps": args.steps, "uninterrupted_seconds": round(total, 1),
              "loop_seconds": round(time.monotonic() - start, 1), **comparison, "ok": ok, **result}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "events"}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
