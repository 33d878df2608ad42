"""Tree rollout (M=10, L=2, K=6, N=22; async and sync phase schedules) against 16 chains, same prompts and model.

    python benchmarks/bench_rollout.py --assets runs/quickstart/assets   # reuse quickstart assets
    python benchmarks/bench_rollout.py                                   # builds them first (minutes)

Uses the quickstart's warm-started tiny model (so trajectories really call the BM25 tool) and
prints generated tokens per leaf, total tokens, wall time and generation calls, with ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from at2po.config import RolloutConfig, load_config
from at2po.factory import build_engine, build_task, build_tools, load_model, load_tokenizer
from at2po.rollout.engine import TreeRolloutEngine


def run(engine: TreeRolloutEngine, prompts, cfg: RolloutConfig) -> dict:
    t0 = time.perf_counter()
    res = engine.rollout(prompts, config=cfg)
    dt = time.perf_counter() - t0
    tot = res.totals()
    return {
        "seconds": dt,
        "generated_tokens": tot["generated_tokens"],
        "leaves": tot["leaves"],
        "tokens_per_leaf": tot["generated_tokens"] / max(tot["leaves"], 1),
        "tool_calls": tot["tool_calls"],
        "generation_calls": res.generation_calls,
        "phase_seconds": res.phase_seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="runs/bench_assets", help="quickstart assets dir (built if missing)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="", help="write the numbers as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = Path(args.assets)
    if not (assets / "model").is_dir():
        from at2po.quickstart import build_quickstart_assets

        build_quickstart_assets(out_dir=assets)
    base = load_config(None, [f"model.path={assets / 'model'}", f"tools.search.corpus_file={assets / 'corpus.jsonl'}"])
    tok, model = load_tokenizer(base.model), load_model(base.model)
    task = build_task(base)
    tools = build_tools(base, task)
    rows = task.load(assets / "train.jsonl")[: args.prompts]
    common = dict(chunk_tokens=48, max_response_tokens=400, max_turns=6, max_tool_calls=4)
    configs = {
        "tree": RolloutConfig(n_initial=10, expansion_rounds=2, top_k=6, samples_per_tree=22, **common),
        "tree_sync": RolloutConfig(n_initial=10, expansion_rounds=2, top_k=6, samples_per_tree=22, schedule="sync", **common),
        "chain16": RolloutConfig(n_initial=16, expansion_rounds=0, samples_per_tree=16, **common),
    }
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.repeat):
        for name, cfg in configs.items():
            base.rollout = cfg
            eng = build_engine(base, model, tok, task=task, tools=tools, seed=rep)
            results[name].append(run(eng, [eng.prompt(r) for r in rows], cfg))
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("seconds", "generated_tokens", "leaves", "tokens_per_leaf",
                                                          "tool_calls", "generation_calls")} for k, v in results.items()}
    t, s, c = mean["tree"], mean["tree_sync"], mean["chain16"]
    print(f"{args.prompts} prompts, {args.repeat} repeats, {torch.get_num_threads()} torch threads, CPU")
    print(f"{'':<18}{'tree async':>12}{'tree sync':>12}{'16 chains':>12}{'async/chains':>14}{'sync/chains':>13}")
    for m in ("seconds", "generated_tokens", "leaves", "tokens_per_leaf", "tool_calls", "generation_calls"):
        print(f"{m:<18}{t[m]:>12.1f}{s[m]:>12.1f}{c[m]:>12.1f}{t[m] / max(c[m], 1e-9):>14.2f}{s[m] / max(c[m], 1e-9):>13.2f}")
    for name, x in (("async", t), ("sync", s)):
        per_tok = (x["seconds"] / x["generated_tokens"]) / (c["seconds"] / c["generated_tokens"])
        print(f"wall time per generated token, tree {name} / chains: {per_tok:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"mean": mean, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
