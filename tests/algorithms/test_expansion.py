"""Entropy-guided expansion selection (docs/method.md §2): defaults, argument passing through
``select_from_tree``, and the shapes and types of what the engine receives."""

import numpy as np
import pytest

from at2po.algorithms.expansion import expansion_scores, select_expansion, select_from_tree
from at2po.algorithms.tree import LEAF, TurnTree

# root 0 ─ 1 ─ 4          node 2 sits under the crowded root (3 chains), node 4 under node 1 (1 child)
#        ├ 2
#        └ 3
PARENT = [-1, 0, 0, 0, 1]
ENTROPY = [0.0, 0.3, 1.0, 0.2, 0.5]


def test_default_alpha_is_0_05():
    # s(n) = H(n) − 0.05·|children(parent(n))|; the root: 0 − 0.05·3.
    expected = [-0.15, 0.3 - 0.15, 1.0 - 0.15, 0.2 - 0.15, 0.5 - 0.05]
    np.testing.assert_allclose(expansion_scores(PARENT, ENTROPY), expected)
    # s(2) − s(4) = 0.5 − 2α: node 2 first at α = 0.05, node 4 first once α > 0.25.
    assert select_expansion(PARENT, ENTROPY, [2, 4], 2).tolist() == [2, 4]
    assert select_expansion(PARENT, ENTROPY, [2, 4], 2, alpha=0.5).tolist() == [4, 2]


def live_tree():
    """The tree above as a live TurnTree: nodes 1-4 are turns that ended in a tool call
    (candidates); H(n) is the mean negative log-prob of a turn's tokens."""
    t = TurnTree([1, 2])
    for parent, h in zip(PARENT[1:], ENTROPY[1:]):
        t.add_turn(parent, obs_ids=[], gen_ids=[7, 8], gen_logprobs=[-h, -h])
    return t


def test_select_from_tree_passes_alpha_mode_and_rng_on():
    t = live_tree()
    # default α = 0.05: scores 0.15, 0.85, 0.05, 0.45 for nodes 1-4; the root −0.15
    assert select_from_tree(t, 3) == [2, 4, 1]
    assert select_from_tree(t, 3, alpha=0.5) == [4, 2, 1]  # −1.2, −0.5, −1.3, 0.0 for nodes 1-4; root −1.5
    # random mode with a seeded generator: the same draw as select_expansion's on the same candidates
    for seed in range(3):
        got = select_from_tree(t, 4, mode="random", rng=np.random.default_rng(seed), include_root=False)
        ref = select_expansion(PARENT, ENTROPY, [1, 2, 3, 4], 4, mode="random", rng=np.random.default_rng(seed))
        assert got == ref.tolist() and sorted(got) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="mode='best'"):
        select_from_tree(t, 1, mode="best")


def test_select_from_tree_random_mode_is_reproducible_per_seed():
    # Two runs with the same seed pick the same nodes (resumable, reproducible rollouts).
    t = TurnTree([1])
    for _ in range(8):
        t.add_turn(0, obs_ids=[], gen_ids=[3], gen_logprobs=[-1.0])
    picks = [select_from_tree(t, 4, mode="random", rng=np.random.default_rng(11)) for _ in range(2)]
    assert picks[0] == picks[1] and len(set(picks[0])) == 4
    assert len({tuple(select_from_tree(t, 4, mode="random", rng=np.random.default_rng(s))) for s in range(6)}) > 1


def test_random_mode_returns_exactly_k_distinct_when_enough_candidates():
    cands = [1, 2, 3, 4, 5]
    for seed in range(5):
        out = select_expansion([-1] + [0] * 5, [0.0] * 6, cands, 2, mode="random", rng=np.random.default_rng(seed))
        assert len(out) == 2 and len(set(out.tolist())) == 2 and out.dtype == np.int64
    # without an rng: still k ids from the candidates (fresh OS entropy)
    out = select_expansion([-1] + [0] * 5, [0.0] * 6, cands, 3, mode="random")
    assert len(out) == 3 and len(set(out.tolist())) == 3 and set(out.tolist()) <= set(cands)


def test_an_empty_selection_still_indexes_arrays():
    # The engine indexes node arrays with the selection: an empty one must be an integer array.
    nodes = np.arange(5)
    for kw in (dict(candidates=[1, 2], k=0), dict(candidates=[], k=3)):
        sel = select_expansion(PARENT, ENTROPY, **kw)
        assert sel.dtype == np.int64 and nodes[sel].tolist() == []


def test_unknown_mode_lists_the_choices():
    with pytest.raises(ValueError, match=r"^mode='best' is not one of entropy, random$"):
        select_expansion(PARENT, ENTROPY, [1], 1, mode="best")
    with pytest.raises(ValueError, match=r"^k must be >= 0, got -1$"):
        select_expansion(PARENT, ENTROPY, [1], -1)


def test_leaves_are_not_candidates():
    t = live_tree()
    t.add_turn(4, obs_ids=[9], gen_ids=[5], gen_logprobs=[-9.0], status=LEAF)  # H = 9, but finished
    assert 5 not in select_from_tree(t, 6)
