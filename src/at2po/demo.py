"""`at2po demo`: the three algorithms on a toy tree, printed step by step (no model needed)."""

from __future__ import annotations

import numpy as np
import torch

from at2po.algorithms.credit import token_advantages, turn_credit
from at2po.algorithms.expansion import expansion_scores, select_from_tree
from at2po.algorithms.losses import policy_loss
from at2po.algorithms.tree import ACTIVE, LEAF, TurnTree


def _random_turn(rng: np.random.Generator, tree: TurnTree, parent: int, p_answer: float) -> int:
    n_tok = int(rng.integers(2, 6))
    node = tree.add_turn(
        parent,
        obs_ids=[] if parent == 0 else [0, 0],  # two observation tokens after each tool call
        gen_ids=rng.integers(1, 100, n_tok).tolist(),
        gen_logprobs=(-rng.gamma(1.0, 1.0, n_tok)).tolist(),
        tool_calls_at_start=tree.depth(parent),
        status=LEAF if rng.random() < p_answer else ACTIVE,
    )
    if tree.nodes[node].status == LEAF:
        tree.nodes[node].reward = float(rng.random() < 0.5)
    return node


def _finish_chain(rng, tree, node, max_turns=4):
    while tree.nodes[node].status == ACTIVE:
        depth = tree.depth(node)
        node = _random_turn(rng, tree, node, p_answer=1.0 if depth + 1 >= max_turns else 0.4)
    return node


def run_demo(seed: int = 0, m: int = 4, rounds: int = 2, k: int = 2) -> None:
    for flag, value, low in (("--seed", seed, 0), ("--chains", m, 1), ("--rounds", rounds, 0), ("--top-k", k, 1)):
        if value < low:
            raise ValueError(f"demo: {flag} must be >= {low}, got {value}")
    rng = np.random.default_rng(seed)
    tree = TurnTree(prompt_ids=[1, 2, 3])
    print(f"1) {m} initial chains from the root (random toy turns: tokens + log-probs)")
    for _ in range(m):
        _finish_chain(rng, tree, _random_turn(rng, tree, 0, p_answer=0.2))
    for r in range(rounds):
        parent = [n.parent for n in tree.nodes]
        entropy = [n.entropy for n in tree.nodes]
        scores = expansion_scores(parent, entropy)
        picks = select_from_tree(tree, k)
        shown = ", ".join(f"n{i}: H={entropy[i]:.2f} s={scores[i]:.2f}" for i in tree.expansion_candidates())
        print(f"2.{r + 1}) candidates [{shown}] -> expand {picks}")
        for n in picks:
            sib = _random_turn(rng, tree, tree.nodes[n].parent, p_answer=0.3)
            _finish_chain(rng, tree, sib)
    parent, entropy, reward = tree.to_arrays()
    values, adv = turn_credit(parent, entropy, reward)
    print(f"3) turn-wise credit over {len(tree.leaves())} leaves (entropy_softmax values, A = V):")
    print("   node parent  H(n)  reward   V(n)    A(n)")
    for i in range(len(tree)):
        r = "" if np.isnan(reward[i]) else f"{reward[i]:.0f}"
        print(f"   {i:>4} {parent[i]:>6} {entropy[i]:5.2f} {r:>6} {values[i]:7.3f} {adv[i]:7.3f}")
    seqs = [tree.leaf_sequence(l) for l in tree.leaves()]
    T = max(len(s.response_ids) for s in seqs)
    pad = lambda xs, v, dt: torch.tensor(np.stack([np.pad(x, (0, T - len(x)), constant_values=v) for x in xs]), dtype=dt)
    mask = pad([s.loss_mask for s in seqs], 0, torch.long)
    old = pad([s.old_log_probs for s in seqs], 0.0, torch.float32)
    turn_ids = pad([s.turn_ids for s in seqs], -1, torch.long)
    tok_adv = pad([token_advantages(adv, s.token_node) for s in seqs], 0.0, torch.float32)
    new = (old + 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
    print("4) policy losses on the leaves' token arrays (new log-probs = old + small noise):")
    for level, lo, hi in (("token", 0.2, 0.28), ("sequence", 3e-4, 4e-4), ("turn", 3e-3, 4e-3)):
        loss, metrics = policy_loss(new, old, tok_adv, mask, level=level, clip_low=lo, clip_high=hi, turn_ids=turn_ids)
        print(f"   {level:<8} loss={loss.item():+.4f} clipfrac={metrics['clipfrac']:.3f} "
              f"H_turn={metrics['turn_kl_entropy']:.3f}")
