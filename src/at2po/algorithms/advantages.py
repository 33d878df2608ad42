"""Advantage estimators by name (docs/method.md §3): from a step's trees to per-token advantages.

Every estimator has the same signature and is a peer in ``ADVANTAGE_ESTIMATORS``:

    estimator(trees, rows, **options) -> list of per-token advantage arrays, one per row

* ``trees``: one ``(parent, entropy, leaf_reward)`` triple of arrays per tree, as
  ``TurnTree.to_arrays`` gives them (``at2po.algorithms.credit`` describes the layout);
* ``rows``: one ``(tree, leaf, token_node)`` triple per training row: the tree index, the leaf
  node whose trajectory the row is, and per response token the node (turn) that generated it,
  -1 for tokens that are not trained (observations, padding). Rows that repeat a leaf (a tree
  topped up to N rows) get the same advantages as the leaf;
* ``options``: the ``algo.*`` settings the estimator declares in ``options`` (only those are
  passed; the config rejects a non-default value of any other, so nothing is silently ignored).

``tree`` is AT²PO's turn-wise credit: every token gets its turn's advantage. ``grpo`` is the
GRPO-style baseline: every trained token of a row gets its leaf's normalised reward. A new
estimator is one function decorated with ``@register_advantage`` (see docs/architecture.md).
Pure numpy; no models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from at2po.algorithms.credit import token_advantages, turn_credit_batch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "compute_advantages",
    "grpo_advantages",
    "register_advantage",
    "tree_advantages",
]

Trees = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
Rows = Sequence[tuple[int, int, np.ndarray]]


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[..., list[np.ndarray]]
    options: tuple[str, ...]  # the algo.* settings it reads


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, *, options: Sequence[str] = ()) -> Callable:
    """Function decorator: register an estimator under ``name`` (``algo.advantage``)."""

    def decorate(fn: Callable[..., list[np.ndarray]]) -> Callable[..., list[np.ndarray]]:
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, tuple(options))
        return fn

    return decorate


def compute_advantages(name: str, trees: Trees, rows: Rows, **options) -> list[np.ndarray]:
    """Run estimator ``name`` with the options it declares (others in ``options`` are not passed)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algo.advantage={name!r} is not one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    est = ADVANTAGE_ESTIMATORS[name]
    return est.fn(trees, rows, **{k: v for k, v in options.items() if k in est.options})


def _solve(trees: Trees, **credit_options) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not trees:
        return [], []
    return turn_credit_batch(*zip(*trees), **credit_options)


@register_advantage("tree", options=("value_mode", "adv_mode", "normalize_leaves"))
def tree_advantages(trees: Trees, rows: Rows, *, value_mode: str = "entropy_softmax", adv_mode: str = "value",
                    normalize_leaves: bool = True) -> list[np.ndarray]:
    """Turn-wise credit (paper Eq. 3 and the advantage variants): each token gets the advantage
    of the node (turn) that generated it; untrained tokens get 0."""
    _, node_adv = _solve(trees, value_mode=value_mode, adv_mode=adv_mode, normalize_leaves=normalize_leaves)
    return [token_advantages(node_adv[t], token_node) for t, _, token_node in rows]


@register_advantage("grpo", options=("normalize_leaves",))
def grpo_advantages(trees: Trees, rows: Rows, *, normalize_leaves: bool = True) -> list[np.ndarray]:
    """GRPO-style: every trained token of a row gets its leaf's reward, normalised within its
    tree (the same normalisation as the tree credit's leaves, so the two differ only in credit)."""
    # A leaf's value is its normalised reward in every value mode.
    values, _ = _solve(trees, normalize_leaves=normalize_leaves)
    return [np.where(np.asarray(token_node) >= 0, values[t][leaf], 0.0) for t, leaf, token_node in rows]
