"""Calibrate the quickstart's warm start: a grid of world/model/SFT settings, greedy metrics each.

    python scripts/calibrate_warm_start.py --steps 150 200 300 --seed 0 1 2 [--shard 0/4]

Prints one JSON line per setting (SFT time, final loss, held-out and training EM, EM by hop
count). This is how the defaults of ``at2po.quickstart.QuickstartConfig`` were chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

from at2po.config import load_config
from at2po.evaluation.evaluator import evaluate_greedy, mean_metrics
from at2po.factory import build_engine
from at2po.quickstart import QuickstartConfig, _sample, _warm_started_assets
from at2po.tasks.multihop import MultiHopConfig
from at2po.tasks.search_qa import SearchQATask

# The rollout limits the calibration evaluates under (the engine's defaults for the rest).
LIMITS = ["rollout.chunk_tokens=64", "rollout.max_response_tokens=1024", "rollout.max_turns=10",
          "rollout.max_tool_calls=6"]


def heldout_metrics(model: Any, tokenizer: Any, tool: Any, questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Greedy EM, format rate, searches per question and EM by hop count (the shared evaluator)."""
    engine = build_engine(load_config(None, LIMITS), model, tokenizer, task=SearchQATask(), tools=[tool])
    start = time.perf_counter()
    records = evaluate_greedy(engine, [_sample(q) for q in questions])
    metrics = {**mean_metrics(records, ["em", "format_ok", "tool_calls"]), "seconds": time.perf_counter() - start}
    for hops in sorted({q["hops"] for q in questions}):
        metrics[f"em_{hops}hop"] = mean_metrics([r for r in records if r["meta"]["hops"] == hops], ["em"])["em"]
    return metrics


# Calibration grid: option -> (type, default).
_GRID: dict[str, tuple[type, Any]] = {
    "people": (int, QuickstartConfig().world.n_people),  # world size (companies, cities, countries scale with it)
    "vocab": (int, QuickstartConfig.vocab_size),
    "hidden": (int, QuickstartConfig.hidden_size),  # intermediate size = 8/3 hidden
    "layers": (int, QuickstartConfig.num_layers),
    "short_steps": (int, QuickstartConfig.sft_short_prompt_steps),
    "steps": (int, QuickstartConfig.sft_steps),
    "batch": (int, QuickstartConfig.sft_batch_size),
    "lr": (float, QuickstartConfig.sft_lr),
    "worlds": (int, QuickstartConfig.sft_worlds),
    "three_hop": (float, QuickstartConfig.sft_hop_fractions[2]),  # share of 3-hop questions in the warm start
    "early_answer": (float, QuickstartConfig.sft_early_answer),
}


def _calibration_config(setting: dict[str, Any], seed: int, device: str) -> QuickstartConfig:
    people = setting["people"]
    world = MultiHopConfig(
        # Proportions of the default world (60 people, 20 companies, 20 cities, 8 countries).
        seed=seed, n_people=people, n_companies=max(2, people // 3), n_cities=max(2, people // 3),
        n_countries=max(2, people * 2 // 15),
    )
    return QuickstartConfig(
        world=world, vocab_size=setting["vocab"], hidden_size=setting["hidden"], num_layers=setting["layers"],
        intermediate_size=setting["hidden"] * 8 // 3, sft_short_prompt_steps=setting["short_steps"], sft_steps=setting["steps"],
        sft_batch_size=setting["batch"],
        sft_lr=setting["lr"], sft_worlds=setting["worlds"], sft_hop_fractions=(1.0, 1.0, setting["three_hop"]),
        sft_early_answer=setting["early_answer"], seed=seed,
        device=device,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Calibration: warm-start every combination of the given settings and print, per setting,
    one JSON line with the SFT time, the final loss and greedy held-out (and training) metrics.

    Example: ``python scripts/calibrate_warm_start.py --steps 150 200 300 --seed 0 1 2``.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    for name, (kind, default) in _GRID.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+", default=[default])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--n-train-eval", type=int, default=50, help="training questions also evaluated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard", default="0/1", help="i/n: run only every n-th setting, from the i-th")
    args = parser.parse_args(argv)
    shard, n_shards = (int(x) for x in args.shard.split("/"))

    names = [*_GRID, "seed"]
    for index, values in enumerate(itertools.product(*(getattr(args, n) for n in names))):
        if index % n_shards != shard:
            continue
        setting = dict(zip(names, values))
        cfg = _calibration_config(setting, setting["seed"], args.device)
        start = time.perf_counter()
        (world, tokenizer, model, tool), history = _warm_started_assets(cfg, progress=False)
        row: dict[str, Any] = {
            **setting, "n_sft": history["examples"], "build_s": round(time.perf_counter() - start, 1),
            "sft_s": round(history["seconds"], 1), "final_loss": round(sum(history["loss"][-10:]) / 10, 3),
        }
        for split, questions in (("test", world.questions("test")), ("train", world.questions("train")[: args.n_train_eval])):
            metrics = heldout_metrics(model, tokenizer, tool, questions)
            row.update({f"{split}_{k}": round(v, 3) for k, v in metrics.items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
