"""Turn-wise credit assignment (docs/method.md §3, paper Eq. 3).

A tree is given in array form: ``parent[i]`` is the parent of node ``i`` (``parent[0] == -1`` is
the root, the prompt) and ``parent[i] < i``, so node order is a topological order. Every other
node is one turn. Leaves (nodes without children) carry the trajectory's outcome reward.

    r̂(l)  = (r(l) − mean_l r) / (std_l r + eps)          leaf normalisation within the tree
    V(l)  = r̂(l)                                           for leaves
    V(n)  = Σ_{c ∈ children(n)} w_c · V(c)                 bootstrapped values (Eq. 3)

Eq. 3 is linear, so all values come from one triangular solve: with W[n, c] = w_c for every edge
and b = r̂ on leaves (0 elsewhere), V = W V + b, i.e. (I − W) V = b. No loop over nodes or levels;
many trees are padded and solved as one batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

VALUE_MODES = ("entropy_softmax", "entropy_linear", "child_mean", "leaf_mean")
ADV_MODES = ("value", "td", "global", "td_global")


def _check_mode(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def validate_tree(parent, entropy, leaf_reward) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check one tree's arrays and return them as (int64, float64, float64) numpy arrays."""
    parent = np.asarray(parent)
    entropy = np.asarray(entropy, dtype=np.float64)
    leaf_reward = np.asarray(leaf_reward, dtype=np.float64)
    if parent.ndim != 1 or parent.shape[0] == 0:
        raise ValueError(f"parent must be a non-empty 1-D array, got shape {parent.shape}")
    if not np.issubdtype(parent.dtype, np.integer):
        raise ValueError(f"parent must hold integers, got dtype {parent.dtype}")
    parent = parent.astype(np.int64)
    n = parent.shape[0]
    for name, arr in (("entropy", entropy), ("leaf_reward", leaf_reward)):
        if arr.shape != (n,):
            raise ValueError(f"{name} has shape {arr.shape} but parent has shape ({n},)")
    if parent[0] != -1:
        raise ValueError(f"parent[0] must be -1 (node 0 is the root), got {parent[0]}")
    idx = np.arange(n)
    bad = np.flatnonzero((parent[1:] < 0) | (parent[1:] >= idx[1:])) + 1
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"parent is not topologically ordered: parent[{i}] = {parent[i]} but every non-root "
            f"node needs 0 <= parent[i] < i (list parents before their children)"
        )
    has_child = np.zeros(n, dtype=bool)
    has_child[parent[1:]] = True
    is_leaf = ~has_child
    if n > 1:
        missing = np.flatnonzero(is_leaf & ~np.isfinite(leaf_reward))
        if missing.size:
            i = int(missing[0])
            raise ValueError(f"leaf_reward[{i}] is {leaf_reward[i]} but node {i} is a leaf: every leaf needs a finite reward")
        extra = np.flatnonzero(has_child & ~np.isnan(leaf_reward))
        if extra.size:
            i = int(extra[0])
            raise ValueError(f"leaf_reward[{i}] = {leaf_reward[i]} but node {i} has children: use NaN for non-leaf nodes")
    bad_h = np.flatnonzero(~np.isfinite(entropy[1:])) + 1
    if bad_h.size:
        i = int(bad_h[0])
        raise ValueError(f"entropy[{i}] is {entropy[i]}: turn entropies must be finite")
    return parent, entropy, leaf_reward


def _edge_weights(parent: np.ndarray, entropy: np.ndarray, edge: np.ndarray, value_mode: str) -> np.ndarray:
    """w_c for every edge (parent(c), c), normalised over the children of parent(c). Shapes (B, N)."""
    bsz, n = parent.shape
    # Flat id of each child's parent, so per-parent sums/maxes are single bincount/maximum.at calls.
    par = np.where(edge, parent + n * np.arange(bsz)[:, None], 0)
    h = np.where(edge, entropy, 0.0)
    if value_mode == "entropy_softmax":
        hmax = np.full(bsz * n, -np.inf)
        np.maximum.at(hmax, par[edge], h[edge])  # per-parent max keeps exp from overflowing
        raw = np.where(edge, np.exp(h - np.where(edge, hmax[par], 0.0)), 0.0)
    elif value_mode == "entropy_linear":
        total = np.bincount(par[edge], weights=h[edge], minlength=bsz * n)
        # A parent whose children all have zero entropy has no preference: weight them uniformly.
        raw = np.where(edge, np.where(total[par] > 0, h, 1.0), 0.0)
    else:  # child_mean
        raw = edge.astype(np.float64)
    denom = np.bincount(par[edge], weights=raw[edge], minlength=bsz * n)
    return np.where(edge, raw / np.where(edge, denom[par], 1.0), 0.0)


def _credit_padded(parent, entropy, leaf_reward, valid, value_mode, adv_mode, normalize_leaves, eps):
    """Credit for B trees padded to N nodes (``valid`` marks real nodes). Arrays (B, N)."""
    bsz, n = parent.shape
    edge = valid & (parent >= 0)
    rows = np.arange(bsz)[:, None].repeat(n, 1)
    cols = np.arange(n)[None, :].repeat(bsz, 0)
    has_child = np.zeros((bsz, n), dtype=bool)
    has_child[rows[edge], parent[edge]] = True
    is_leaf = valid & ~has_child & (cols > 0)

    r = np.where(is_leaf, leaf_reward, 0.0)
    if normalize_leaves:
        cnt = np.maximum(is_leaf.sum(1, keepdims=True), 1)
        mean = r.sum(1, keepdims=True) / cnt
        std = np.sqrt((np.where(is_leaf, r - mean, 0.0) ** 2).sum(1, keepdims=True) / cnt)  # population std
        r = np.where(is_leaf, (r - mean) / (std + eps), 0.0)

    # Edge matrix: E[b, parent(c), c] = weight of c. (I − E) is unit upper triangular: always solvable.
    eye = np.broadcast_to(np.eye(n), (bsz, n, n))
    if value_mode == "leaf_mean":
        adj = np.zeros((bsz, n, n))
        adj[rows[edge], parent[edge], cols[edge]] = 1.0
        desc = np.linalg.solve(eye - adj, eye)  # desc[a, m] = 1 iff m is a or below a
        n_leaves = np.einsum("bij,bj->bi", desc, is_leaf.astype(np.float64))
        values = np.einsum("bij,bj->bi", desc, r) / np.maximum(n_leaves, 1.0)
    else:
        w = np.zeros((bsz, n, n))
        w[rows[edge], parent[edge], cols[edge]] = _edge_weights(parent, entropy, edge, value_mode)[edge]
        values = np.linalg.solve(eye - w, r[..., None])[..., 0]  # (I − W) V = r̂  ⇔  Eq. 3 bottom-up
    values = np.where(is_leaf, r, values)  # leaves exact, not up to solver round-off
    values = np.where(valid, values, 0.0)

    v_parent = np.where(edge, np.take_along_axis(values, np.clip(parent, 0, None), 1), 0.0)
    td = values - v_parent
    glob = values - values[:, :1]
    adv = {"value": values, "td": td, "global": glob, "td_global": td + glob}[adv_mode]
    adv = np.where(edge, adv, 0.0)  # the root (and padding) owns no tokens
    return values, adv


def turn_credit(
    parent,
    entropy,
    leaf_reward,
    *,
    value_mode: str = "entropy_softmax",
    adv_mode: str = "value",
    normalize_leaves: bool = True,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Node values and advantages of one tree (docs/method.md §3, paper Eq. 3).

    value_mode: "entropy_softmax" (w ∝ exp H(c), the authors' code), "entropy_linear"
    (w ∝ H(c), the paper's Eq. 3; uniform when every sibling has H = 0), "child_mean"
    (w = 1/|children|), "leaf_mean" (V(n) = mean r̂ of the leaves under n, TreeRL style).
    adv_mode: "value" A = V(n); "td" A = V(n) − V(parent); "global" A = V(n) − V(root);
    "td_global" = td + global.

    The root (node 0) is the prompt and owns no tokens: its advantage is 0 in every mode.
    A tree holding only its root has nothing to credit and returns zeros.
    """
    (values,), (adv,) = turn_credit_batch(
        [parent], [entropy], [leaf_reward], value_mode=value_mode, adv_mode=adv_mode,
        normalize_leaves=normalize_leaves, eps=eps,
    )
    return values, adv


def turn_credit_batch(
    parents: Sequence,
    entropies: Sequence,
    leaf_rewards: Sequence,
    *,
    value_mode: str = "entropy_softmax",
    adv_mode: str = "value",
    normalize_leaves: bool = True,
    eps: float = 1e-6,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``turn_credit`` for many trees at once (padded to the largest, one batched solve).

    Returns (values per tree, advantages per tree) as two lists of 1-D arrays.
    """
    _check_mode("value_mode", value_mode, VALUE_MODES)
    _check_mode("adv_mode", adv_mode, ADV_MODES)
    if not (len(parents) == len(entropies) == len(leaf_rewards)):
        raise ValueError(
            f"parents, entropies and leaf_rewards must have one entry per tree, got "
            f"{len(parents)}, {len(entropies)}, {len(leaf_rewards)}"
        )
    if len(parents) == 0:
        return [], []
    trees = [validate_tree(p, h, r) for p, h, r in zip(parents, entropies, leaf_rewards)]
    sizes = [t[0].shape[0] for t in trees]
    bsz, n = len(trees), max(sizes)
    parent = np.full((bsz, n), -1, dtype=np.int64)
    entropy = np.zeros((bsz, n))
    reward = np.zeros((bsz, n))
    valid = np.zeros((bsz, n), dtype=bool)
    for b, (p, h, r) in enumerate(trees):  # packing only; the math below is batched
        k = p.shape[0]
        parent[b, :k], entropy[b, :k], reward[b, :k], valid[b, :k] = p, h, np.nan_to_num(r), True
    values, adv = _credit_padded(parent, entropy, reward, valid, value_mode, adv_mode, normalize_leaves, eps)
    return [values[b, :k] for b, k in enumerate(sizes)], [adv[b, :k] for b, k in enumerate(sizes)]


def token_advantages(node_advantages, token_node):
    """Broadcast node advantages to tokens: every token of a turn gets its node's advantage.

    ``token_node`` holds, per token, the index of the node (turn) that generated it, or −1 for
    tokens that are not trained (prompt, observations, padding); those get 0. Works for numpy
    arrays and torch tensors of any shape.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch = None
    if torch is not None and isinstance(token_node, torch.Tensor):
        node_adv = torch.as_tensor(node_advantages, dtype=torch.float32, device=token_node.device)
        idx = token_node.clamp(min=0)
        out = node_adv[idx]
        return torch.where(token_node >= 0, out, torch.zeros_like(out))
    token_node = np.asarray(token_node)
    node_adv = np.asarray(node_advantages, dtype=np.float64)
    if token_node.size and token_node.max(initial=-1) >= node_adv.shape[0]:
        raise ValueError(f"token_node refers to node {token_node.max()} but only {node_adv.shape[0]} nodes have advantages")
    return np.where(token_node >= 0, node_adv[np.clip(token_node, 0, None)], 0.0)
