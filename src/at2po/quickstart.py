"""`at2po quickstart`: the whole AT²PO loop on a laptop CPU in minutes.

1. builds a synthetic multi-hop world (entities, relations, a passage corpus, 1–3-hop questions),
2. trains a tokenizer and a tiny Qwen2 model in-process and warm-starts it on demonstrations,
3. writes an ordinary training config for them and runs the same trainer as `at2po train`,
4. prints held-out EM before and after RL and saves a PNG of the training curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from at2po.config import Config, load_config, save_config
from at2po.trainer import Trainer, plot_metrics

if TYPE_CHECKING:
    from at2po.tasks.sft import QuickstartConfig

# RL settings sized for 2 CPU cores; every one can be overridden with `--set key=value`.
QUICKSTART_OVERRIDES = [
    "rollout.n_initial=5",
    "rollout.expansion_rounds=1",
    "rollout.top_k=3",
    "rollout.samples_per_tree=8",
    "rollout.max_turn_tokens=48",
    "rollout.max_response_tokens=400",
    "rollout.max_turns=6",
    "rollout.max_tool_calls=4",
    "rollout.tool_workers=2",
    "trainer.prompts_per_step=16",
    "trainer.mini_batch_prompts=4",
    "trainer.micro_batch_rows=32",
    "trainer.steps=30",
    "trainer.val_every=10",
    "trainer.save_every=0",
    "trainer.keep_checkpoints=1",
    "optim.lr=1e-3",
    "optim.weight_decay=0.0",
]


def quickstart_assets_config(seed: int) -> "QuickstartConfig":
    """The world, tiny model and warm start of ``at2po quickstart --seed seed``."""
    from at2po.tasks.multihop import MultiHopConfig
    from at2po.tasks.sft import QuickstartConfig

    return QuickstartConfig(seed=seed, world=MultiHopConfig(seed=seed))


def quickstart_config(assets_dir: Path, out_dir: Path, seed: int, overrides: list[str]) -> Config:
    return load_config(None, [
        f"model.path={assets_dir / 'model'}",
        f"data.train_file={assets_dir / 'train.jsonl'}",
        f"data.val_file={assets_dir / 'test.jsonl'}",
        f"tools.corpus_file={assets_dir / 'corpus.jsonl'}",
        f"trainer.output_dir={out_dir / 'train'}",
        f"trainer.seed={seed}",
        f"rollout.seed={seed}",
        *QUICKSTART_OVERRIDES,
        *overrides,
    ])


def run_quickstart(out_dir: str | Path = "runs/quickstart", seed: int = 0, overrides: list[str] | None = None,
                   progress: bool = True) -> dict:
    from at2po.tasks.sft import build_quickstart_assets

    out = Path(out_dir)
    t0 = time.perf_counter()
    assets_dir = out / "assets"
    print(f"[1/3] world, tokenizer, tiny model and warm start -> {assets_dir}", flush=True)
    build_quickstart_assets(quickstart_assets_config(seed), out_dir=assets_dir, progress=progress)
    t_assets = time.perf_counter() - t0

    cfg = quickstart_config(assets_dir, out, seed, overrides or [])
    cfg.trainer.progress = progress
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "quickstart.yaml")
    print(f"[2/3] AT²PO RL ({cfg.trainer.steps} steps; the same run: at2po train --config {out / 'quickstart.yaml'})",
          flush=True)
    result = Trainer(cfg).fit()
    t_total = time.perf_counter() - t0

    vals = [h for h in result["history"] if "val/em" in h]
    before, after = vals[0], vals[-1]
    png = plot_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl", out / "training_curves.png")
    summary = {
        "seed": seed,
        "heldout_em_before": before["val/em"], "heldout_em_after": after["val/em"],
        "heldout_f1_before": before["val/f1"], "heldout_f1_after": after["val/f1"],
        "format_before": before["val/format_ok"], "format_after": after["val/format_ok"],
        "tool_calls_before": before["val/tool_calls"], "tool_calls_after": after["val/tool_calls"],
        "seconds_warm_start": t_assets, "seconds_total": t_total,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[3/3] held-out results (greedy, one chain per question)")
    print(f"  {'':<22}{'before RL':>10}{'after RL':>10}")
    for label, key in (("exact match", "heldout_em"), ("F1", "heldout_f1"), ("valid format", "format"),
                       ("searches / question", "tool_calls")):
        print(f"  {label:<22}{summary[key + '_before']:>10.3f}{summary[key + '_after']:>10.3f}")
    print(f"  curves: {png}   metrics: {Path(cfg.trainer.output_dir) / 'metrics.jsonl'}   "
          f"time: {t_total / 60:.1f} min")
    return summary
