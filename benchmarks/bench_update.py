"""The update's forward + backward at the paper's shapes: per-row vs prompt-shared vs tree-shared,
full logits vs the chunked head (README, "Memory and speed at scale").

    python benchmarks/bench_update.py                       # trees + time table, then the memory table
    python benchmarks/bench_update.py --only memory         # peak memory of the log-prob path only
    python benchmarks/bench_update.py --trees 2 --width 64  # the defaults

The model is a random Qwen3 (2 layers, ``--width`` wide, head dim 64) with Qwen3's vocabulary of
151,936 tokens, fp32, gradient checkpointing on where the paper config has it. The trees have the
paper's shape (M=10 chains, L=2 rounds of K=6 expansions, N=22 leaves) with recorded-style
lengths: a 500-token prompt, turns of 80-250 generated tokens each followed by a 300-500-token
search result, 3-6 turns a chain (about 2k response tokens), expansions branching after a turn
chosen uniformly (half-way down on average) and growing as many new turns as the chain they left
had after that point. Tokens are random: the update's cost does not depend on their values.

Each configuration runs the same rows through ``response_log_probs`` + the ATPO loss + backward,
micro-batch by micro-batch as the trainer plans them, and prints the tokens its forwards process,
its wall time (best of ``--repeats``, configurations interleaved) and the ratios to the per-row
baseline. Peak memory is measured in a fresh subprocess per configuration: the growth of the
process's peak RSS (Linux VmHWM, reset just before the call) over what model and batch hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from at2po.algorithms.losses import policy_loss
from at2po.training.trainer import TrainBatch, _pad, forward_tokens, response_log_probs, token_budget_micro_batches

V = 151_936


def paper_model(width: int, seed: int = 0, checkpointing: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 128),
                         head_dim=64, max_position_embeddings=16384, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float().train()
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def paper_trees(n_trees: int, seed: int = 0, prompt_len: int = 500, chains: int = 10, rounds: int = 2,
                per_round: int = 6) -> TrainBatch:
    """Rows (leaves) of ``n_trees`` paper-shaped trees; see the module docstring."""
    rng = np.random.default_rng(seed)
    seqs, starts, tree_of, masks, tids, advs = [], [], [], [], [], []

    def turns(n):  # n turns: (tokens, mask) pairs, generated then observed (the last: no observation)
        out = []
        for k in range(n):
            gen = rng.integers(0, V, rng.integers(80, 251))
            out.append((gen, np.ones(len(gen), dtype=np.int64)))
            if k < n - 1:
                obs = rng.integers(0, V, rng.integers(300, 501))
                out.append((obs, np.zeros(len(obs), dtype=np.int64)))
        return out

    for t in range(n_trees):
        prompt = rng.integers(0, V, prompt_len)
        leaves = [turns(int(rng.integers(3, 7))) for _ in range(chains)]
        for _ in range(rounds):
            for _ in range(per_round):
                src = leaves[int(rng.integers(len(leaves)))]
                n_turns = (len(src) + 1) // 2
                cut = int(rng.integers(1, n_turns)) if n_turns > 1 else 0  # after turn `cut` (its observation)
                leaves.append(src[: 2 * cut] + turns(n_turns - cut))
        for leaf in leaves:
            body = np.concatenate([seg for seg, _ in leaf])
            mask = np.concatenate([m for _, m in leaf])
            # Turn ids count generated segments; advantages are one value per turn.
            tid = np.concatenate([np.full(len(seg), i // 2, dtype=np.int64) for i, (seg, _) in enumerate(leaf)])
            adv = rng.normal(size=tid.max() + 1)[tid] * mask
            seqs.append(np.concatenate([prompt, body]).tolist())
            starts.append(prompt_len)
            tree_of.append(t)
            masks.append(mask)
            tids.append(np.where(mask > 0, tid, -1))
            advs.append(adv)
    old = [np.full(len(m), -np.log(V)) * m for m in masks]
    return TrainBatch(seqs, starts, np.asarray(tree_of), _pad(masks, 0, torch.long), _pad(old, 0.0, torch.float32),
                      _pad(advs, 0.0, torch.float32), _pad(tids, -1, torch.long))


# The per-row baselines run one row per micro-batch: no padding (the fewest tokens a per-row
# update can run) and full logits that fit this machine (4 rows of ~2.7k tokens would need ~16 GB).
CONFIGS = {
    # key: (label, gradient checkpointing, prompt sharing, chunk tokens, tree packing, micro-batch rows, token budget)
    "rows-full": ("per-row, full logits (today, paper config)", True, False, 0, False, 1, 0),
    "rows-chunked": ("per-row, chunked", True, False, 1024, False, 1, 0),
    "prompt-chunked": ("prompt-shared, chunked (no ckpt)", False, True, 1024, False, 4, 0),
    "tree-full": ("tree-shared, full logits", True, False, 0, True, 0, 4096),
    "tree-chunked": ("tree-shared, chunked", True, False, 1024, True, 0, 8192),
}


def plan(batch: TrainBatch, rows_per_micro: int, budget: int, packed: bool) -> list[list[int]]:
    rows = list(range(len(batch.sequences)))
    if budget:
        return token_budget_micro_batches(batch.sequences, rows, budget, packed)[0]
    return [rows[i:i + rows_per_micro] for i in range(0, len(rows), rows_per_micro)]


def run_update(model, batch: TrainBatch, config) -> tuple[int, float]:
    """One forward + backward over the batch's micro-batches; (forward tokens, seconds)."""
    _, _, share, chunk, packed, rows_per_micro, budget = config
    micros = plan(batch, rows_per_micro, budget, packed)
    tokens = sum(forward_tokens([batch.sequences[r] for r in m], packed) for m in micros)
    n_trained = float(batch.response_mask.sum())
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for rows in micros:
        micro = batch.rows(rows)
        logp = response_log_probs(model, micro, 1.0, share_prefix=share, chunk_tokens=chunk, tree_packing=packed)
        loss, _ = policy_loss(logp, micro.old_log_probs, micro.advantages, micro.response_mask, level="turn",
                              clip_low=3e-3, clip_high=4e-3, turn_ids=micro.turn_ids, agg="token-mean")
        (loss * float(micro.response_mask.sum()) / n_trained).backward()  # the trainer's token-mean weights
    return tokens, time.perf_counter() - t0


def proc_status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Linux: set this process's peak RSS (VmHWM) to its current RSS and return that, in KiB.
    (ru_maxrss cannot be reset, and a child inherits its parent's through exec.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kib("VmRSS")


def memory_child(args) -> None:
    """Peak-RSS growth of one log-prob path call (forward + backward), printed as JSON."""
    name, rows, resp, chunk = args.memory_child.split(":")
    rows, resp, chunk = int(rows), int(resp), int(chunk)
    model = paper_model(args.width, checkpointing=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (256,), generator=g).tolist()
    seqs = [prompt + torch.randint(0, V, (resp,), generator=g).tolist() for _ in range(rows)]
    mask = torch.ones(rows, resp, dtype=torch.long)
    batch = TrainBatch(seqs, [256] * rows, np.zeros(rows, dtype=np.int64), mask, torch.zeros(rows, resp),
                       torch.zeros(rows, resp), torch.zeros(rows, resp, dtype=torch.long))
    # Warm up kernels and allocator on a small call, then take the baseline high-water mark.
    response_log_probs(model, batch.rows([0]), 1.0, chunk_tokens=min(chunk, 16) or 16).sum().backward()
    model.zero_grad(set_to_none=True)
    before = reset_peak_rss()
    t0 = time.perf_counter()
    response_log_probs(model, batch, 1.0, share_prefix=False, chunk_tokens=chunk).sum().backward()
    seconds = time.perf_counter() - t0
    after = proc_status_kib("VmHWM")
    print(json.dumps({"name": name, "rows": rows, "resp": resp, "chunk": chunk,
                      "peak_growth_mib": (after - before) / 1024, "seconds": seconds}))


def measure_memory(width: int, rows: int, resp: int, chunk: int, name: str) -> dict | None:
    cmd = [sys.executable, __file__, "--width", str(width), "--memory-child", f"{name}:{rows}:{resp}:{chunk}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"name": name, "rows": rows, "resp": resp, "chunk": chunk, "error": out.stderr.strip().splitlines()[-1:]
                or [f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="rows-full,rows-chunked,tree-chunked",
                    help=f"comma-separated, of {', '.join(CONFIGS)} (the first is the baseline)")
    ap.add_argument("--only", choices=["time", "memory"])
    ap.add_argument("--memory-rows", type=int, default=4)
    ap.add_argument("--memory-resp", default="1024,4096", help="response lengths for the memory table")
    ap.add_argument("--memory-full-max", type=int, default=1024,
                    help="longest response the full-logits path is measured at (it needs ~5 GiB per 1k x 4 rows)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: one per CPU); 1 keeps the ratios steady on a shared machine")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()}, torch {torch.__version__}")
    if args.only != "memory":
        batch = paper_trees(args.trees)
        lengths = [len(s) - 500 for s in batch.sequences]
        print(f"{args.trees} paper-shaped trees: {len(batch.sequences)} rows, response tokens mean "
              f"{np.mean(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), row tokens "
              f"{sum(map(len, batch.sequences))}")
        chosen = args.configs.split(",")
        unknown = [c for c in chosen if c not in CONFIGS]
        if unknown:
            ap.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
        models = {ckpt: paper_model(args.width, checkpointing=ckpt) for ckpt in {CONFIGS[c][1] for c in chosen}}
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for key in chosen:
                n, s = run_update(models[CONFIGS[key][1]], batch, CONFIGS[key])
                tokens[key], best[key] = n, min(best.get(key, float("inf")), s)
                print(f"  {CONFIGS[key][0]}: {n} tokens, {s:.1f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        base = chosen[0]
        print(f"\n| configuration | forward tokens | tokens / {base} | wall (best of {args.repeats}) | wall / {base} |")
        print("|---|---|---|---|---|")
        for key in chosen:
            print(f"| {CONFIGS[key][0]} | {tokens[key]} | {tokens[key] / tokens[base]:.3f} | {best[key]:.1f} s | "
                  f"{best[key] / best[base]:.3f} |")
        print(f"load average after: {os.getloadavg()}", flush=True)
    if args.only != "time":
        print(f"\npeak RSS growth of the log-prob path, {args.memory_rows} rows x (256 prompt + R response) tokens, V={V}:")
        print("| response tokens R | full logits | chunked (1024) |")
        print("|---|---|---|")
        for resp in map(int, args.memory_resp.split(",")):
            cells = []
            for chunk in (0, 1024):
                if chunk == 0 and resp > args.memory_full_max:
                    cells.append("not run (exceeds this machine's memory)")
                    continue
                r = measure_memory(args.width, args.memory_rows, resp, chunk, f"chunk{chunk}")
                cells.append(f"{r['peak_growth_mib']:.0f} MiB ({r['seconds']:.1f} s)" if "error" not in r
                             else f"failed: {r['error']}")
            print(f"| {resp} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
