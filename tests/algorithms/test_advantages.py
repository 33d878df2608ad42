"""The advantage estimators by name (at2po.algorithms.advantages) on two hand-built trees in one
batch: which row gets which tree's values, the options each estimator reads, and the registry."""

import math

import numpy as np
import pytest

import at2po.algorithms.advantages as adv_module
from at2po.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    compute_advantages,
    grpo_advantages,
    tree_advantages,
)

EPS = 1e-6
NAN = float("nan")

# Tree 0: root -> a -> {b, c}, root -> d; H(a) = 1.5, H(b) = 0.5, H(c) = 0.3, H(d) = 3; r(b) = 1, r(c) = r(d) = 0.
TREE0 = (np.array([-1, 0, 1, 1, 0]), np.array([0.0, 1.5, 0.5, 0.3, 3.0]), np.array([NAN, NAN, 1.0, 0.0, 0.0]))
# Tree 1: root -> {e, f}; H(e) = 0.2, H(f) = 0.7; r(e) = 2, r(f) = 4.
TREE1 = (np.array([-1, 0, 0]), np.array([0.0, 0.2, 0.7]), np.array([NAN, 2.0, 4.0]))
TREES = [TREE0, TREE1]
# (tree, leaf, token node per response token; -1 = not trained). Rows of the two trees interleave.
ROWS = [
    (0, 2, np.array([1, 1, -1, 2])),  # a a <obs> b
    (1, 2, np.array([2, -1, 2])),  # f <obs> f
    (0, 4, np.array([4])),  # d
    (1, 1, np.array([1, 1])),  # e e
]

# Hand-computed: leaf normalisation within each tree (population std, eps 1e-6).
_m0 = 1 / 3
_s0 = math.sqrt(((1 - _m0) ** 2 + 2 * _m0**2) / 3)
RB, RC, RD = (1 - _m0) / (_s0 + EPS), (0 - _m0) / (_s0 + EPS), (0 - _m0) / (_s0 + EPS)
RE, RF = -1 / (1 + EPS), 1 / (1 + EPS)  # mean 3, std 1
_wb = math.exp(0.5) / (math.exp(0.5) + math.exp(0.3))
VA = _wb * RB + (1 - _wb) * RC  # entropy-softmax weights over a's children
_wa = math.exp(1.5) / (math.exp(1.5) + math.exp(3.0))
V_ROOT0 = _wa * VA + (1 - _wa) * RD
_we = math.exp(0.2) / (math.exp(0.2) + math.exp(0.7))
V_ROOT1 = _we * RE + (1 - _we) * RF


def check(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-9)


def test_tree_credit_gives_each_token_its_turn_value_in_its_own_tree():
    expected = [[VA, VA, 0, RB], [RF, 0, RF], [RD], [RE, RE]]
    check(compute_advantages("tree", TREES, ROWS), expected)
    check(tree_advantages(TREES, ROWS), expected)  # the defaults: entropy_softmax, value, normalised leaves


def test_grpo_gives_each_trained_token_its_leaf_reward():
    expected = [[RB, RB, 0, RB], [RF, 0, RF], [RD], [RE, RE]]
    check(compute_advantages("grpo", TREES, ROWS), expected)
    check(grpo_advantages(TREES, ROWS), expected)
    # Raw rewards without normalisation.
    check(compute_advantages("grpo", TREES, ROWS, normalize_leaves=False), [[1, 1, 0, 1], [4, 0, 4], [0], [2, 2]])


def test_tree_options_reach_the_credit():
    check(compute_advantages("tree", TREES, ROWS, value_mode="child_mean"),
          [[(RB + RC) / 2] * 2 + [0, RB], [RF, 0, RF], [RD], [RE, RE]])
    check(compute_advantages("tree", TREES, ROWS, adv_mode="td"),
          [[VA - V_ROOT0, VA - V_ROOT0, 0, RB - VA], [RF - V_ROOT1, 0, RF - V_ROOT1], [RD - V_ROOT0],
           [RE - V_ROOT1] * 2])
    # Raw leaf rewards: V(a) = w_b * 1 + w_c * 0; tree 1's leaves keep 2 and 4.
    check(compute_advantages("tree", TREES, ROWS, normalize_leaves=False), [[_wb, _wb, 0, 1], [4, 0, 4], [0], [2, 2]])


def test_compute_advantages_passes_only_the_declared_options():
    # grpo does not take value_mode/adv_mode: they are dropped, not passed (no TypeError).
    check(compute_advantages("grpo", TREES, ROWS, value_mode="child_mean", adv_mode="td", normalize_leaves=False),
          [[1, 1, 0, 1], [4, 0, 4], [0], [2, 2]])
    check(compute_advantages("tree", TREES, ROWS, value_mode="child_mean", unrelated=3),
          compute_advantages("tree", TREES, ROWS, value_mode="child_mean"))
    assert ADVANTAGE_ESTIMATORS["tree"].options == ("value_mode", "adv_mode", "normalize_leaves")
    assert ADVANTAGE_ESTIMATORS["grpo"].options == ("normalize_leaves",)


def test_no_trees_no_rows():
    assert compute_advantages("tree", [], []) == []
    assert compute_advantages("grpo", [], []) == []


def test_unknown_estimator_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^algo.advantage='ppo' is not one of grpo, tree$"):
        compute_advantages("ppo", TREES, ROWS)


def test_register_advantage_adds_a_peer(monkeypatch):
    monkeypatch.setattr(adv_module, "ADVANTAGE_ESTIMATORS", dict(ADVANTAGE_ESTIMATORS))

    def constant(trees, rows, *, scale=1.0):
        return [np.full(len(token_node), scale) for _, _, token_node in rows]

    assert adv_module.register_advantage("constant", options=["scale"])(constant) is constant
    assert adv_module.ADVANTAGE_ESTIMATORS["constant"] == AdvantageEstimator("constant", constant, ("scale",))
    check(adv_module.compute_advantages("constant", TREES, ROWS, scale=2.0, value_mode="td"),
          [[2.0] * 4, [2.0] * 3, [2.0], [2.0] * 2])
    assert adv_module.register_advantage("bare")(constant) is constant
    assert adv_module.ADVANTAGE_ESTIMATORS["bare"].options == ()
