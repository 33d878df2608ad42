"""Entropy-guided expansion selection (docs/method.md §2, paper Eqs. 2 and 4).

Among the candidates C (turns that ended in a tool call, and the root) pick K nodes to branch from:

    s(n) = H(n) − α · |children(parent(n))|        s(root) = 0 − α · |children(root)|

The penalty discourages piling siblings under one parent. Scores are computed once per round
(the authors' code does the same), so the K picks of a round see the same child counts. The
authors' score uses α·(|children| − 1): the same for every node, so the same ranking. The root
competes as the authors' code has it: it ranks below every turn with positive entropy whose
parent has no more children than the root, so in practice it is picked only when fewer than K
real candidates exist, and a "sibling" of the root is a fresh chain. A tree whose chains never
called a tool therefore still ends with M + L·K distinct trajectories.
"""

from __future__ import annotations

import numpy as np

from at2po.algorithms.tree import TurnTree

EXPANSION_MODES = ("entropy", "random")


def expansion_scores(parent, entropy, alpha: float = 0.05) -> np.ndarray:
    """s(n) = H(n) − α·|children(parent(n))| for every node; the root's is 0 − α·|children(root)|."""
    parent = np.asarray(parent, dtype=np.int64)
    entropy = np.asarray(entropy, dtype=np.float64)
    n_children = np.bincount(parent[parent >= 0], minlength=parent.shape[0])
    # The root is its own "parent" here: a fresh chain is a sibling of the root's other chains.
    own_group = np.where(parent >= 0, parent, np.arange(parent.shape[0]))
    scores = entropy - alpha * n_children[own_group]
    scores[parent < 0] = -alpha * n_children[parent < 0]
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
    include_root: bool = True,
) -> list[int]:
    """``select_expansion`` over a live tree's candidates: the turns that ended in a tool call and,
    with ``include_root`` (the authors' fallback, the default), the root."""
    parent = [n.parent for n in tree.nodes]
    entropy = [n.entropy for n in tree.nodes]
    candidates = ([0] if include_root else []) + tree.expansion_candidates()
    return select_expansion(parent, entropy, candidates, k, alpha=alpha, mode=mode, rng=rng).tolist()
