"""AT²PO inside verl: the ATPO turn-level loss and the tree credit in verl's own registries.

Importing this module registers, with verl 0.9.1's call signatures:

* policy loss ``"atpo"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=atpo``): at2po's
  ``policy_loss`` at level "turn", a turn being a maximal run of 1s in verl's response mask
  (the only per-token structure verl hands a policy loss); its value is rescaled to verl's
  global-batch normalisation (``agg_loss`` with ``config.global_batch_info``);
* advantage estimator ``"at2po_tree"`` (``algorithm.adv_estimator=at2po_tree``): at2po's turn-wise
  credit (docs/method.md §3), the tree rebuilt from non-tensor batch fields (``uid`` = tree,
  ``at2po_node_path``, ``at2po_node_entropy``; layout in docs/verl.md).

verl imports this module by itself when at2po is installed in the same environment: the package
declares it as a ``verl.plugins`` entry point, which ``import verl`` loads. Nothing from verl is
copied: we call its registry functions and follow its argument names.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est, register_policy_loss

from at2po.algorithms.credit import ADV_MODES, VALUE_MODES, token_advantages, turn_credit_batch
from at2po.algorithms.losses import policy_loss, turn_ids_from_mask

__all__ = [
    "ATPO_LOSS",
    "NODE_ENTROPY",
    "NODE_PATH",
    "TREE_ESTIMATOR",
    "atpo_policy_loss",
    "compute_advantage",
    "register_tree_estimator",
    "tree_advantages_from_batch",
]

ATPO_LOSS = "atpo"
TREE_ESTIMATOR = "at2po_tree"
NODE_PATH = "at2po_node_path"
NODE_ENTROPY = "at2po_node_entropy"
DUMP_ENV = "AT2PO_VERL_DUMP_DIR"  # a folder: the trainer mode and the loss write what they saw (CI checks)
_LOSS_CALLS = itertools.count()

# verl's aggregation modes -> the at2po mode whose numerator they share. The denominators differ
# (verl divides by global-batch counts, at2po by the micro-batch's rows or tokens) and are
# reconciled by ``_verl_scale``.
_BASE_AGG = {
    "token-mean": "token-mean",
    "token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
}
LOG_RATIO_MAX = 10.0  # at2po's default clamp; verl's GSPO clamps its log-ratio at the same value


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from verl's ActorConfig / AlgoConfig or an OmegaConf/dict config alike."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    value = getter(key, default) if callable(getter) else getattr(config, key, default)
    return default if value is None else value


def _clip_range(config: Any) -> tuple[float, float]:
    if config is None:
        raise ValueError("policy loss 'atpo' needs verl's actor config (clip_ratio_low / clip_ratio_high); got config=None")
    clip = _cfg(config, "clip_ratio", 0.2)
    return float(_cfg(config, "clip_ratio_low", clip)), float(_cfg(config, "clip_ratio_high", clip))


def _verl_scale(mask: torch.Tensor, agg: str, info: dict) -> float:
    """Factor turning at2po's micro-batch aggregate into verl's ``agg_loss`` value.

    at2po divides by the micro-batch (all B rows, or its trained tokens); verl divides by the global
    batch's tokens or non-empty rows when ``global_batch_info`` gives them (else by this micro-batch's
    tokens / non-empty rows) and multiplies by the data-parallel size, so that summing micro-batch
    gradients over ranks gives the global-batch mean. Both share the numerator, so one factor
    converts value and gradient alike.
    """
    dp = int(info.get("dp_size") or 1)
    n_rows = mask.shape[0]
    n_tok = int(mask.sum())
    if agg == "token-mean":
        total = info.get("batch_num_tokens")
        if total is None and dp > 1:
            raise ValueError("loss_agg_mode=token-mean with dp_size > 1 needs global_batch_info['batch_num_tokens']")
        total = float(total) if total is not None else float(n_tok)
        return max(n_tok, 1) * dp / total if total > 0 else 0.0
    if agg == "token-sum":
        return float(n_rows * dp)
    rows = info.get("global_batch_size")
    if rows is None and dp > 1:
        raise ValueError(f"loss_agg_mode={agg} with dp_size > 1 needs global_batch_info['global_batch_size']")
    rows = float(rows) if rows is not None else float(int(mask.any(dim=1).sum()))
    scale = n_rows * dp / rows if rows > 0 else 0.0
    if agg == "seq-mean-token-sum-norm":
        horizon = info.get("loss_scale_factor")
        scale /= float(horizon) if horizon is not None else float(mask.shape[-1])
    return scale


@register_policy_loss(ATPO_LOSS)
def atpo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ATPO's turn-level clipped objective (docs/method.md §4) with verl's policy-loss signature.

    Turns are the maximal runs of 1s in ``response_mask``: verl's multi-turn rollouts mask tool
    observations, so consecutive turns are always separated. The clip range is the actor's
    ``clip_ratio_low`` / ``clip_ratio_high`` (ATPO: 3e-3 / 4e-3). ``rollout_is_weights`` (verl's
    rollout correction, non-negative) multiply each token's loss; since w·max(a, b) = max(w·a, w·b)
    for w >= 0, they are folded into the advantages.
    """
    if loss_agg_mode not in _BASE_AGG:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {', '.join(_BASE_AGG)}")
    clip_low, clip_high = _clip_range(config)
    mask = response_mask.bool()
    if rollout_is_weights is not None:
        weights = rollout_is_weights.detach()
        if bool((weights[mask] < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 on trained tokens (verl's rollout correction gives truncated ratios)")
        advantages = advantages * weights
    loss, stats = policy_loss(
        log_prob, old_log_prob, advantages, mask, level="turn", clip_low=clip_low, clip_high=clip_high,
        agg=_BASE_AGG[loss_agg_mode], log_ratio_max=LOG_RATIO_MAX,
    )
    info = _cfg(config, "global_batch_info", None) or {}
    loss = loss * _verl_scale(mask, loss_agg_mode, info)
    if os.environ.get(DUMP_ENV):
        _dump_loss_call(old_log_prob, log_prob, advantages, response_mask, loss, loss_agg_mode, clip_low, clip_high, info)
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"],
        "actor/ppo_kl": stats["ppo_kl"],
        "actor/turn_kl_entropy": stats["turn_kl_entropy"],
        "actor/turn_ratio_max": stats["ratio_max"],
        "actor/turn_ratio_min": stats["ratio_min"],
    }
    return loss, metrics


def _dump_loss_call(old_log_prob, log_prob, advantages, response_mask, loss, agg, clip_low, clip_high, info) -> None:
    """With ``AT2PO_VERL_DUMP_DIR`` set: one file per call in the actor worker, what verl passed and
    what the loss returned (the CI checks recompute the loss from it)."""
    folder = Path(os.environ[DUMP_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    call = next(_LOSS_CALLS)
    torch.save({"call": call, "old_log_prob": old_log_prob.detach().cpu(), "log_prob": log_prob.detach().cpu(),
                "advantages": advantages.detach().cpu(), "response_mask": response_mask.detach().cpu(),
                "loss": float(loss.detach()), "loss_agg_mode": agg, "clip_low": clip_low, "clip_high": clip_high,
                "global_batch_info": {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in dict(info).items()}},
               folder / f"loss_call_{os.getpid()}_{call:05d}.pt")


# -- tree credit ----------------------------------------------------------------------------------
def _row_path(paths: Sequence, row: int) -> np.ndarray:
    path = np.asarray(paths[row])
    if path.ndim != 1 or path.shape[0] < 2 or not np.issubdtype(path.dtype, np.integer):
        raise ValueError(
            f"{NODE_PATH}[{row}] must be a 1-D integer array of node ids from the root to the row's leaf "
            f"(at least root and one turn), got {path!r}")
    return path.astype(np.int64)


def _build_tree(tree_id, rows, paths, entropies, rewards, n_turns):
    """One tree's (parent, entropy, leaf_reward) arrays from its rows' paths, nodes renumbered
    breadth-first (parent < child, as at2po's credit requires), and per row its path in new ids."""
    parent_of: dict[int, int] = {}
    entropy_of: dict[int, float] = {}
    reward_of: dict[int, float] = {}
    root = None
    row_paths = []
    for r in rows:
        path = _row_path(paths, r)
        if n_turns[r] > path.shape[0] - 1:
            raise ValueError(
                f"row {r} (uid {tree_id!r}) has {n_turns[r]} turns in response_mask but {NODE_PATH} names "
                f"{path.shape[0] - 1}: every turn needs its node on the path, and a turn's tokens must be contiguous")
        if root is None:
            root = int(path[0])
        elif int(path[0]) != root:
            raise ValueError(f"rows of uid {tree_id!r} start at different roots ({root} and {int(path[0])}): one uid is one tree")
        ent = np.zeros(path.shape[0]) if entropies is None else np.asarray(entropies[r], dtype=np.float64)
        if ent.shape != path.shape:
            raise ValueError(f"{NODE_ENTROPY}[{r}] has shape {ent.shape} but {NODE_PATH}[{r}] has shape {path.shape}")
        for k in range(1, path.shape[0]):
            node, par = int(path[k]), int(path[k - 1])
            if node == root:
                raise ValueError(f"uid {tree_id!r}: {NODE_PATH}[{r}] returns to the root {root} after its start")
            if parent_of.setdefault(node, par) != par:
                raise ValueError(f"uid {tree_id!r}: node {node} has two parents ({parent_of[node]} and {par}) across rows")
            if not np.isclose(entropy_of.setdefault(node, float(ent[k])), ent[k], rtol=1e-5, atol=1e-6):
                raise ValueError(f"uid {tree_id!r}: node {node} has entropy {entropy_of[node]} in one row and {ent[k]} in another")
        leaf = int(path[-1])
        if not np.isclose(reward_of.setdefault(leaf, rewards[r]), rewards[r], rtol=1e-6, atol=1e-7):
            raise ValueError(f"uid {tree_id!r}: leaf {leaf} has reward {reward_of[leaf]} in one row and {rewards[r]} in another")
        row_paths.append(path)
    children: dict[int, list[int]] = {}
    for node, par in parent_of.items():
        children.setdefault(par, []).append(node)
    inner = [leaf for leaf in reward_of if leaf in children]
    if inner:
        raise ValueError(f"uid {tree_id!r}: node {inner[0]} ends one row's path but has children in another row: "
                         f"a leaf ends its trajectory")
    order, frontier = [root], [root]
    while frontier:
        frontier = [c for n in frontier for c in sorted(children.get(n, []))]
        order += frontier
    new_id = {node: i for i, node in enumerate(order)}
    parent = np.array([-1] + [new_id[parent_of[n]] for n in order[1:]], dtype=np.int64)
    entropy = np.array([0.0] + [entropy_of[n] for n in order[1:]])
    leaf_reward = np.array([np.nan] + [reward_of.get(n, np.nan) for n in order[1:]])
    return (parent, entropy, leaf_reward), [np.array([new_id[int(n)] for n in p]) for p in row_paths]


def tree_advantages_from_batch(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    tree_ids: Sequence,
    node_paths: Sequence,
    node_entropies: Sequence | None = None,
    *,
    value_mode: str = "entropy_softmax",
    adv_mode: str = "value",
    normalize_leaves: bool = True,
) -> torch.Tensor:
    """Per-token turn-wise credit (docs/method.md §3) for a verl batch; (B, T) float32.

    Row i belongs to tree ``tree_ids[i]``, follows ``node_paths[i]`` (root → leaf) and its outcome
    reward is ``token_level_rewards[i].sum()``. The k-th run of 1s in ``response_mask[i]`` is the
    turn of node ``node_paths[i][k + 1]``; every token of it gets that node's advantage. Rows
    repeating a leaf share its advantages; nodes off every row's path take no part.
    """
    bsz = response_mask.shape[0]
    for name, field in (("uid", tree_ids), (NODE_PATH, node_paths), (NODE_ENTROPY, node_entropies)):
        if field is not None and len(field) != bsz:
            raise ValueError(f"{name} has {len(field)} entries but the batch has {bsz} rows")
    if value_mode.startswith("entropy") and node_entropies is None:
        raise ValueError(f"value_mode={value_mode!r} weighs children by entropy: the batch needs {NODE_ENTROPY}")
    mask = response_mask.bool()
    turn_ids = turn_ids_from_mask(mask).cpu().numpy()
    n_turns = turn_ids.max(axis=1, initial=-1) + 1
    rewards = token_level_rewards.detach().float().sum(dim=-1).cpu().numpy().astype(np.float64)
    groups: dict[Any, list[int]] = {}
    for r in range(bsz):
        groups.setdefault(tree_ids[r], []).append(r)
    trees, row_paths = [], {}
    for tree_id, rows in groups.items():
        arrays, paths = _build_tree(tree_id, rows, node_paths, node_entropies, rewards, n_turns)
        trees.append(arrays)
        row_paths.update({r: (len(trees) - 1, p) for r, p in zip(rows, paths)})
    _, node_adv = turn_credit_batch(*zip(*trees), value_mode=value_mode, adv_mode=adv_mode,
                                    normalize_leaves=normalize_leaves) if trees else ([], [])
    out = np.zeros(mask.shape, dtype=np.float32)
    for r, (t, path) in row_paths.items():
        turns = turn_ids[r]
        token_node = np.where(turns >= 0, path[1:][np.clip(turns, 0, None)], -1)
        out[r] = token_advantages(node_adv[t], token_node)
    return torch.as_tensor(out, device=token_level_rewards.device)


def register_tree_estimator(
    name: str = TREE_ESTIMATOR,
    *,
    value_mode: str = "entropy_softmax",
    adv_mode: str = "value",
    normalize_leaves: bool = True,
):
    """Register a tree-credit estimator under ``name`` in verl's advantage registry.

    The options are at2po's ``algo.value_mode`` / ``algo.adv_mode`` / ``algo.normalize_leaves``
    (verl's AlgoConfig takes no extra keys, so a variant is a second name, e.g.
    ``register_tree_estimator("at2po_tree_td", adv_mode="td")`` in a module verl imports).
    """
    if value_mode not in VALUE_MODES:
        raise ValueError(f"value_mode={value_mode!r} is not one of {', '.join(VALUE_MODES)}")
    if adv_mode not in ADV_MODES:
        raise ValueError(f"adv_mode={adv_mode!r} is not one of {', '.join(ADV_MODES)}")

    def estimator(token_level_rewards, response_mask, index=None, config=None, non_tensor_batch=None, **kwargs):
        """verl advantage estimator: returns (advantages, returns), both the tree credit."""
        batch = non_tensor_batch if non_tensor_batch is not None else kwargs
        if index is None or NODE_PATH not in batch:
            missing = ", ".join(f for f, ok in (("index (uid)", index is not None), (NODE_PATH, NODE_PATH in batch)) if not ok)
            raise ValueError(
                f"advantage estimator {name!r} needs the tree fields of the batch ({missing} missing): "
                f"call at2po.integrations.verl.compute_advantage(data, config), which passes "
                f"non_tensor_batch, and give every row uid, {NODE_PATH} and {NODE_ENTROPY} (docs/verl.md)")
        adv = tree_advantages_from_batch(
            token_level_rewards, response_mask, index, batch[NODE_PATH], batch.get(NODE_ENTROPY),
            value_mode=value_mode, adv_mode=adv_mode, normalize_leaves=normalize_leaves)
        return adv, adv

    estimator.__name__ = estimator.__qualname__ = f"at2po_tree_estimator_{name}"
    register_adv_est(name)(estimator)
    return estimator


register_tree_estimator()


def compute_advantage(data, config=None, estimator: str = TREE_ESTIMATOR):
    """Fill ``data.batch["advantages"]`` and ``["returns"]`` of a verl ``DataProto`` with a tree
    estimator looked up in verl's registry, passing the batch's non-tensor fields to it.

    verl 0.9.1's own ``compute_advantage`` hands a registered estimator only ``uid`` among the
    non-tensor fields, so a trainer that uses the tree credit calls this in its place
    (docs/verl.md).
    """
    for key in ("token_level_rewards", "response_mask"):
        if key not in data.batch.keys():
            raise ValueError(f"the batch has no {key!r}: compute rewards (and the response mask) before advantages")
    fn = get_adv_estimator_fn(estimator)
    advantages, returns = fn(
        token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch.get("uid"), config=config, non_tensor_batch=data.non_tensor_batch)
    data.batch["advantages"] = advantages
    data.batch["returns"] = returns
    return data


# The tree rollout as a verl agent loop (and its generator backend), and the trainer mode that
# carries the tree to the estimator. The trainer mode needs verl's v1 trainer, which imports
# TransferQueue: without it only the legacy trainer exists and there is nothing to register.
from at2po.integrations.verl import agent_loop  # noqa: E402,F401  registers "at2po_tree", backend "verl_server"

try:
    import transfer_queue  # noqa: F401
except ImportError:
    pass
else:
    from at2po.integrations.verl import trainer  # noqa: E402,F401  registers trainer mode "at2po"
