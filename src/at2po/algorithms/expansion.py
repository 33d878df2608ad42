"""Entropy-guided expansion selection (docs/method.md §2, paper Eqs. 2 and 4).

Among the candidates C (non-root turns that ended in a tool call) pick K nodes to branch from:

    s(n) = H(n) − α · |children(parent(n))|

The penalty discourages piling siblings under one parent. Scores are computed once per round
(the authors' code does the same), so the K picks of a round see the same child counts.
The authors score the root too and use α·(|children| − 1); both give the same ranking of the
candidates, which is all that matters here.
"""

from __future__ import annotations

import numpy as np

from at2po.algorithms.tree import TurnTree

EXPANSION_MODES = ("entropy", "random")


def expansion_scores(parent, entropy, alpha: float = 0.05) -> np.ndarray:
    """s(n) = H(n) − α·|children(parent(n))| for every node (the root gets −inf)."""
    parent = np.asarray(parent, dtype=np.int64)
    entropy = np.asarray(entropy, dtype=np.float64)
    n_children = np.bincount(parent[parent >= 0], minlength=parent.shape[0])
    scores = entropy - alpha * n_children[np.clip(parent, 0, None)]
    scores[parent < 0] = -np.inf
    return scores


def select_expansion(
    parent,
    entropy,
    candidates,
    k: int,
    *,
    alpha: float = 0.05,
    mode: str = "entropy",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of the K nodes to re-sample (duplicates allowed when fewer than K candidates).

    mode "entropy": top-K by score, ties broken by lower index; with fewer than K candidates the
    ranked list is reused cyclically (best first), so every round adds exactly K siblings.
    mode "random": uniform choice without replacement, topped up with replacement when short.
    Returns an empty array when there is no candidate.
    """
    if mode not in EXPANSION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(EXPANSION_MODES)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.size == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    if mode == "random":
        rng = rng if rng is not None else np.random.default_rng()
        first = rng.permutation(cand)[:k]
        extra = rng.choice(cand, size=k - first.size, replace=True) if first.size < k else cand[:0]
        return np.concatenate([first, extra]).astype(np.int64)
    scores = expansion_scores(parent, entropy, alpha)[cand]
    ranked = cand[np.lexsort((cand, -scores))]  # score descending, then index ascending
    return ranked[np.arange(k) % ranked.size]


def select_from_tree(
    tree: TurnTree,
    k: int,
    *,
    alpha: float = 0.05,
    mode: str = "entropy",
    rng: np.random.Generator | None = None,
) -> list[int]:
    """``select_expansion`` over a live tree's candidates (turns that ended in a tool call)."""
    parent = [n.parent for n in tree.nodes]
    entropy = [n.entropy for n in tree.nodes]
    return select_expansion(parent, entropy, tree.expansion_candidates(), k, alpha=alpha, mode=mode, rng=rng).tolist()
