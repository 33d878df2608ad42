"""Vectorised ATPO loss and turn credit against naive per-row / per-turn loops.

    python benchmarks/bench_loss.py                 # B=176, T=8192, CPU
    python benchmarks/bench_loss.py --device cuda   # same on a GPU

Prints median forward+backward time of each and the speed-up ratio. Not a test: numbers depend on
the machine; the equality of the two implementations is checked here and in tests/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from at2po.algorithms.credit import turn_credit_batch
from at2po.algorithms.losses import policy_loss


def make_batch(B, T, turns, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.01 * torch.randn(B, T, generator=g)
    # Each row: `turns` generated runs separated by 64-token masked observations, random length.
    mask = torch.zeros(B, T, dtype=torch.long)
    adv = torch.zeros(B, T)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    for i in range(B):  # building the data only
        seg = int(lengths[i]) // turns
        for k in range(turns):
            s = k * seg + (64 if k else 0)
            mask[i, s:(k + 1) * seg] = 1
            adv[i, s:(k + 1) * seg] = torch.randn((), generator=g)
    return [x.to(device) for x in (logp, old, adv, mask)]


def naive_turn_loss(logp, old, adv, mask, clip_low=3e-3, clip_high=4e-3):
    """Row by row, turn by turn: what one writes without vectorising."""
    B = logp.shape[0]
    total = logp.new_zeros(())
    for i in range(B):
        m = mask[i].bool()
        idx = torch.nonzero(m).flatten()
        if idx.numel() == 0:
            continue
        # Turn boundaries: breaks in the index sequence.
        breaks = torch.nonzero(idx[1:] - idx[:-1] > 1).flatten() + 1
        bounds = [0] + breaks.tolist() + [idx.numel()]
        row = logp.new_zeros(())
        for a, b in zip(bounds[:-1], bounds[1:]):
            t = idx[a:b]
            lr = (logp[i, t] - old[i, t]).mean().detach().clamp(max=10.0)
            s = torch.exp(lr + logp[i, t] - logp[i, t].detach())
            l1 = -adv[i, t] * s
            l2 = -adv[i, t] * s.clamp(1 - clip_low, 1 + clip_high)
            row = row + torch.maximum(l1, l2).sum()
        total = total + row / idx.numel()
    return total / B


def naive_credit(parents, entropies, rewards):
    out = []
    for parent, h, r in zip(parents, entropies, rewards):
        n = len(parent)
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[parent[i]].append(i)
        leaves = [i for i in range(1, n) if not children[i]]
        rv = np.array([r[i] for i in leaves])
        rn = dict(zip(leaves, (rv - rv.mean()) / (rv.std() + 1e-6)))
        v = np.zeros(n)
        for i in range(n - 1, -1, -1):
            if not children[i]:
                v[i] = rn[i]
            else:
                w = np.exp([h[c] for c in children[i]])
                v[i] = float(np.dot(w / w.sum(), [v[c] for c in children[i]]))
        out.append(v)
    return out


def timeit(fn, repeat, device):
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=176)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    logp, old, adv, mask = make_batch(args.batch, args.seq_len, args.turns, args.device)

    def fast():
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, adv, mask, level="turn")
        loss.backward()
        return loss, x.grad

    def slow():
        x = logp.clone().requires_grad_(True)
        loss = naive_turn_loss(x, old, adv, mask)
        loss.backward()
        return loss, x.grad

    (lf, gf), (ls, gs) = fast(), slow()
    torch.testing.assert_close(lf, ls, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-8)
    t_fast = timeit(fast, args.repeat, args.device)
    t_slow = timeit(slow, max(1, args.repeat // 2), args.device)
    print(f"ATPO turn loss fwd+bwd  B={args.batch} T={args.seq_len} turns={args.turns} on {args.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"  vectorised {t_fast * 1e3:9.1f} ms   naive loop {t_slow * 1e3:9.1f} ms   speed-up x{t_slow / t_fast:.1f}")

    # Turn credit: 64 trees of ~22 leaves, depth up to 6.
    rng = np.random.default_rng(0)
    parents, ents, rews = [], [], []
    for _ in range(64):
        parent = [-1]
        for leaf in range(22):
            start = 0 if leaf < 10 else int(rng.integers(1, len(parent)))
            node = start
            for _ in range(int(rng.integers(1, 6))):
                parent.append(node)
                node = len(parent) - 1
        parent = np.array(parent)
        has_child = np.zeros(len(parent), bool)
        has_child[parent[1:]] = True
        parents.append(parent)
        ents.append(rng.uniform(0, 2, len(parent)))
        rews.append(np.where(has_child, np.nan, rng.choice([-1.0, 0.0, 1.0], len(parent))))
    v_fast, _ = turn_credit_batch(parents, ents, rews)
    v_slow = naive_credit(parents, ents, rews)
    for a, b in zip(v_fast, v_slow):
        np.testing.assert_allclose(a, b, atol=1e-9)
    t_fast = timeit(lambda: turn_credit_batch(parents, ents, rews), args.repeat, "cpu")
    t_slow = timeit(lambda: naive_credit(parents, ents, rews), args.repeat, "cpu")
    sizes = [len(p) for p in parents]
    print(f"turn credit  64 trees, {min(sizes)}-{max(sizes)} nodes (numpy)")
    print(f"  batched    {t_fast * 1e3:9.1f} ms   naive loop {t_slow * 1e3:9.1f} ms   speed-up x{t_slow / t_fast:.1f}")


if __name__ == "__main__":
    main()
