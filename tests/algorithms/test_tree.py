import numpy as np
import pytest

from at2po.algorithms.credit import token_advantages, turn_credit
from at2po.algorithms.expansion import expansion_scores, select_expansion, select_from_tree
from at2po.algorithms.tree import ACTIVE, FAILED, LEAF, TurnTree


def build_tree():
    """root(prompt 1 2) ─ a(obs -, gen 10 11, tool) ─ b(obs 90, gen 12, answer)
                        │                          └ c(obs 90, gen 13 14, answer)  [sibling of b]
                        └ d(gen 20, answer)"""
    t = TurnTree([1, 2])
    a = t.add_turn(0, obs_ids=[], gen_ids=[10, 11], gen_logprobs=[-1.0, -3.0], tool_calls_at_start=0)
    b = t.add_turn(a, obs_ids=[90], gen_ids=[12], gen_logprobs=[-0.5], tool_calls_at_start=1, status=LEAF)
    c = t.add_turn(a, obs_ids=[90], gen_ids=[13, 14], gen_logprobs=[-0.1, -0.3], tool_calls_at_start=1, status=LEAF)
    d = t.add_turn(0, obs_ids=[], gen_ids=[20], gen_logprobs=[-2.0], status=FAILED)
    return t, (a, b, c, d)


def test_structure_and_queries():
    t, (a, b, c, d) = build_tree()
    assert (a, b, c, d) == (1, 2, 3, 4)
    assert t.leaves() == [b, c, d]
    assert t.expansion_candidates() == [a]
    assert t.path(c) == [0, a, c]
    assert t.root.children == [a, d] and t.nodes[a].children == [b, c]
    assert t.nodes[a].entropy == pytest.approx(2.0)
    assert t.nodes[c].entropy == pytest.approx(0.2)
    assert t.root.entropy == 0.0
    # State for re-sampling c: prompt + a's turn + c's observation.
    assert t.context_ids(c) == [1, 2, 10, 11, 90]
    assert t.context_ids(a) == [1, 2]
    assert t.full_ids(c) == [1, 2, 10, 11, 90, 13, 14]


def test_leaf_sequence_arrays():
    t, (a, b, c, d) = build_tree()
    s = t.leaf_sequence(c)
    assert s.response_ids.tolist() == [10, 11, 90, 13, 14]
    assert s.loss_mask.tolist() == [1, 1, 0, 1, 1]
    np.testing.assert_allclose(s.old_log_probs, [-1.0, -3.0, 0.0, -0.1, -0.3])
    assert s.turn_ids.tolist() == [0, 0, -1, 1, 1]
    assert s.token_node.tolist() == [a, a, -1, c, c]
    assert s.path == [0, a, c]
    assert t.leaf_sequence(d).turn_ids.tolist() == [0]


def test_masked_generated_tokens_are_not_trained():
    t = TurnTree([5])
    t.add_turn(0, obs_ids=[], gen_ids=[1, 2, 3], gen_logprobs=[-1, -2, -9], gen_mask=[1, 1, 0], status=LEAF)
    s = t.leaf_sequence(1)
    assert s.loss_mask.tolist() == [1, 1, 0]
    assert s.turn_ids.tolist() == [0, 0, -1]
    assert s.old_log_probs.tolist() == [-1, -2, 0]
    assert t.nodes[1].entropy == pytest.approx(1.5)  # masked tokens do not count


def test_to_arrays_and_credit_roundtrip():
    t, (a, b, c, d) = build_tree()
    for leaf, r in zip((b, c, d), (1.0, 0.0, -1.0)):
        t.nodes[leaf].reward = r
    parent, entropy, reward = t.to_arrays()
    assert parent.tolist() == [-1, 0, 1, 1, 0]
    np.testing.assert_allclose(entropy, [0, 2.0, 0.5, 0.2, 2.0])
    assert np.isnan(reward[[0, 1]]).all() and reward[2:].tolist() == [1.0, 0.0, -1.0]
    v, adv = turn_credit(parent, entropy, reward, value_mode="child_mean", normalize_leaves=False)
    np.testing.assert_allclose(v, [(0.5 - 1) / 2, 0.5, 1, 0, -1])
    s = t.leaf_sequence(b)
    np.testing.assert_allclose(token_advantages(adv, s.token_node), [0.5, 0.5, 0, 1.0])


def test_to_arrays_refuses_unfinished_or_unrewarded():
    t = TurnTree([1])
    t.add_turn(0, obs_ids=[], gen_ids=[2], gen_logprobs=[-1.0])
    with pytest.raises(ValueError, match="still active"):
        t.to_arrays()
    t.add_turn(1, obs_ids=[3], gen_ids=[4], gen_logprobs=[-1.0], status=LEAF)
    with pytest.raises(ValueError, match="no reward"):
        t.to_arrays()


def test_add_turn_validation():
    t, (a, b, c, d) = build_tree()
    with pytest.raises(ValueError, match="is a leaf node"):
        t.add_turn(b, obs_ids=[], gen_ids=[1], gen_logprobs=[0.0])
    with pytest.raises(ValueError, match="parent=99"):
        t.add_turn(99, obs_ids=[], gen_ids=[1], gen_logprobs=[0.0])
    with pytest.raises(ValueError, match="gen_logprobs has 0"):
        t.add_turn(a, obs_ids=[], gen_ids=[1], gen_logprobs=[])
    with pytest.raises(ValueError, match="status='done'"):
        t.add_turn(a, obs_ids=[], gen_ids=[1], gen_logprobs=[0.0], status="done")


def test_prune_leaves_renumbers_topologically():
    t, (a, b, c, d) = build_tree()
    t.prune_leaves([c, d])
    assert [n.parent for n in t.nodes] == [-1, 0, 1, 0]
    assert t.leaves() == [2, 3]
    assert t.leaf_sequence(2).response_ids.tolist() == [10, 11, 90, 13, 14]
    t2, _ = build_tree()
    t2.prune_leaves([d])  # the whole branch under a disappears
    assert [n.parent for n in t2.nodes] == [-1, 0] and t2.nodes[1].gen_ids == [20]
    with pytest.raises(ValueError, match="not leaves"):
        t2.prune_leaves([0])


# ---------------------------------------------------------------- expansion selection
def test_scores_apply_branching_penalty():
    parent = [-1, 0, 0, 1, 1, 1]
    entropy = [0, 1.0, 1.0, 2.0, 1.0, 0.5]
    s = expansion_scores(parent, entropy, alpha=0.1)
    np.testing.assert_allclose(s[1:], [1.0 - 0.2, 1.0 - 0.2, 2.0 - 0.3, 1.0 - 0.3, 0.5 - 0.3])
    # The root competes too (the authors' fallback): 0 − α·|children(root)|.
    assert s[0] == pytest.approx(0.0 - 0.1 * 2)


def test_topk_with_penalty_changes_the_ranking():
    # Node 3 sits under a crowded parent (3 children), node 2 under the root (2 children).
    parent = [-1, 0, 0, 1, 1, 1]
    entropy = [0, 0.0, 1.0, 1.05, 0.2, 0.1]
    cands = [2, 3, 4, 5]
    assert select_expansion(parent, entropy, cands, 2, alpha=0.0).tolist() == [3, 2]
    assert select_expansion(parent, entropy, cands, 2, alpha=0.1).tolist() == [2, 3]


def test_fewer_candidates_than_k_reuses_the_best_and_ties_by_index():
    parent = [-1, 0, 0, 0]
    entropy = [0, 1.0, 3.0, 1.0]
    assert select_expansion(parent, entropy, [1, 2, 3], 6).tolist() == [2, 1, 3, 2, 1, 3]
    assert select_expansion(parent, entropy, [3], 3).tolist() == [3, 3, 3]
    assert select_expansion(parent, entropy, [], 6).tolist() == []
    assert select_expansion(parent, entropy, [1, 2], 0).tolist() == []


def test_random_mode_is_seeded_and_uniform():
    parent = [-1] + [0] * 10
    entropy = [0] + list(range(10))
    cands = list(range(1, 11))
    a = select_expansion(parent, entropy, cands, 4, mode="random", rng=np.random.default_rng(3))
    b = select_expansion(parent, entropy, cands, 4, mode="random", rng=np.random.default_rng(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4 and set(a.tolist()) <= set(cands)
    short = select_expansion(parent, entropy, [4, 7], 5, mode="random", rng=np.random.default_rng(0))
    assert len(short) == 5 and {4, 7} == set(short.tolist())
    counts = np.zeros(11)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        counts[select_expansion(parent, entropy, cands, 1, mode="random", rng=rng)[0]] += 1
    assert counts[1:].min() > 140 and counts[1:].max() < 260  # ~200 each


def test_select_errors():
    with pytest.raises(ValueError, match="mode='best'"):
        select_expansion([-1, 0], [0, 1], [1], 1, mode="best")
    with pytest.raises(ValueError, match="k must be"):
        select_expansion([-1, 0], [0, 1], [1], -1)


def test_select_from_tree_uses_live_candidates():
    t, (a, b, c, d) = build_tree()
    # One live turn (a: H = 2.0, score 2.0 − 0.05·2) and the root (0 − 0.05·2): a, then a fresh chain.
    assert select_from_tree(t, 2) == [a, 0]
    assert select_from_tree(t, 3) == [a, 0, a]
    assert select_from_tree(t, 2, include_root=False) == [a, a]
