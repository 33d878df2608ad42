import math

import numpy as np
import pytest
import torch

from at2po.algorithms.credit import ADV_MODES, VALUE_MODES, token_advantages, turn_credit, turn_credit_batch, validate_tree


# ---------------------------------------------------------------- naive reference (recursion)
def naive_credit(parent, entropy, reward, value_mode, adv_mode, normalize=True, eps=1e-6):
    n = len(parent)
    children = {i: [] for i in range(n)}
    for i in range(1, n):
        children[parent[i]].append(i)
    leaves = [i for i in range(1, n) if not children[i]]
    r = {i: float(reward[i]) for i in leaves}
    if normalize:
        vals = [r[i] for i in leaves]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        r = {i: (r[i] - mean) / (std + eps) for i in leaves}

    def leaves_under(i):
        if not children[i]:
            return [i]
        return [l for c in children[i] for l in leaves_under(c)]

    def value(i):
        if not children[i]:
            return r[i]
        cs = children[i]
        if value_mode == "leaf_mean":
            ls = leaves_under(i)
            return sum(r[l] for l in ls) / len(ls)
        if value_mode == "child_mean":
            w = [1.0] * len(cs)
        elif value_mode == "entropy_softmax":
            w = [math.exp(entropy[c]) for c in cs]
        else:
            w = [entropy[c] for c in cs]
            if sum(w) == 0:
                w = [1.0] * len(cs)
        return sum(wi * value(c) for wi, c in zip(w, cs)) / sum(w)

    v = [value(i) for i in range(n)]
    adv = [0.0] * n
    for i in range(1, n):
        td = v[i] - v[parent[i]]
        gl = v[i] - v[0]
        adv[i] = {"value": v[i], "td": td, "global": gl, "td_global": td + gl}[adv_mode]
    return np.array(v), np.array(adv)


def random_tree(rng, n_nodes, p_branch=0.4):
    parent = [-1]
    for i in range(1, n_nodes):
        # Mostly chains with some branching, like a rollout tree.
        parent.append(i - 1 if (rng.random() > p_branch and i > 1) else int(rng.integers(0, i)))
    parent = np.array(parent)
    entropy = rng.uniform(0.0, 3.0, n_nodes)
    has_child = np.zeros(n_nodes, bool)
    has_child[parent[1:]] = True
    reward = np.where(has_child, np.nan, rng.choice([-1.0, 0.0, 1.0], n_nodes))
    if n_nodes == 1:
        reward[:] = np.nan
    return parent, entropy, reward


@pytest.mark.parametrize("value_mode", VALUE_MODES)
@pytest.mark.parametrize("adv_mode", ADV_MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_naive_on_random_trees(value_mode, adv_mode, normalize):
    rng = np.random.default_rng(0)
    for n_nodes in [2, 3, 5, 8, 17, 40, 120]:
        for _ in range(3):
            p, h, r = random_tree(rng, n_nodes)
            v, a = turn_credit(p, h, r, value_mode=value_mode, adv_mode=adv_mode, normalize_leaves=normalize)
            v_ref, a_ref = naive_credit(p, h, r, value_mode, adv_mode, normalize)
            np.testing.assert_allclose(v, v_ref, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-9)


def test_batch_equals_single_calls():
    rng = np.random.default_rng(1)
    trees = [random_tree(rng, n) for n in [2, 9, 30, 4, 55]]
    for vm in VALUE_MODES:
        values, advs = turn_credit_batch(*zip(*trees), value_mode=vm, adv_mode="td_global")
        for (p, h, r), v, a in zip(trees, values, advs):
            v1, a1 = turn_credit(p, h, r, value_mode=vm, adv_mode="td_global")
            np.testing.assert_allclose(v, v1, atol=1e-12)
            np.testing.assert_allclose(a, a1, atol=1e-12)
    assert turn_credit_batch([], [], []) == ([], [])


# Hand-worked tree:       0 (root)
#                        /        \
#                 1 (H=1)          2 (H=2, leaf r=0)
#                /      \
#       3 (H=.5, r=1)   4 (H=1.5, r=0)
P = [-1, 0, 0, 1, 1]
H = [0.0, 1.0, 2.0, 0.5, 1.5]
R = [np.nan, np.nan, 0.0, 1.0, 0.0]


def test_hand_worked_values_without_normalisation():
    e = math.exp
    # entropy_softmax: V1 = (e^.5·1 + e^1.5·0)/(e^.5+e^1.5); V0 = (e^1·V1 + e^2·0)/(e^1+e^2)
    v1 = e(0.5) / (e(0.5) + e(1.5))
    v0 = e(1) * v1 / (e(1) + e(2))
    v, a = turn_credit(P, H, R, value_mode="entropy_softmax", normalize_leaves=False)
    np.testing.assert_allclose(v, [v0, v1, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(a, [0.0, v1, 0.0, 1.0, 0.0])
    # entropy_linear: V1 = .5/(.5+1.5) = .25; V0 = 1·.25/(1+2) = 1/12
    v, _ = turn_credit(P, H, R, value_mode="entropy_linear", normalize_leaves=False)
    np.testing.assert_allclose(v, [1 / 12, 0.25, 0.0, 1.0, 0.0])
    # child_mean: V1 = .5; V0 = (.5 + 0)/2 = .25
    v, _ = turn_credit(P, H, R, value_mode="child_mean", normalize_leaves=False)
    np.testing.assert_allclose(v, [0.25, 0.5, 0.0, 1.0, 0.0])
    # leaf_mean: V1 = mean(1, 0) = .5; V0 = mean(1, 0, 0) = 1/3
    v, _ = turn_credit(P, H, R, value_mode="leaf_mean", normalize_leaves=False)
    np.testing.assert_allclose(v, [1 / 3, 0.5, 0.0, 1.0, 0.0])


def test_hand_worked_advantage_modes():
    # child_mean values [.25, .5, 0, 1, 0]
    kw = dict(value_mode="child_mean", normalize_leaves=False)
    _, a = turn_credit(P, H, R, adv_mode="value", **kw)
    np.testing.assert_allclose(a, [0, 0.5, 0, 1, 0])
    _, a = turn_credit(P, H, R, adv_mode="td", **kw)  # V(n) − V(parent)
    np.testing.assert_allclose(a, [0, 0.25, -0.25, 0.5, -0.5])
    _, a = turn_credit(P, H, R, adv_mode="global", **kw)  # V(n) − V(root)
    np.testing.assert_allclose(a, [0, 0.25, -0.25, 0.75, -0.25])
    _, a = turn_credit(P, H, R, adv_mode="td_global", **kw)
    np.testing.assert_allclose(a, [0, 0.5, -0.5, 1.25, -0.75])


def test_leaf_normalisation_is_population_std():
    # rewards 1, 0, 0: mean 1/3, population std sqrt(2)/3
    v, _ = turn_credit(P, H, R, value_mode="child_mean")
    std = math.sqrt(2) / 3
    np.testing.assert_allclose(v[[3, 4, 2]], [(1 - 1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)])


def test_equal_rewards_give_zero_not_nan():
    for vm in VALUE_MODES:
        for am in ADV_MODES:
            v, a = turn_credit(P, H, [np.nan, np.nan, 1.0, 1.0, 1.0], value_mode=vm, adv_mode=am)
            assert np.all(np.isfinite(v)) and np.all(np.isfinite(a))
            np.testing.assert_allclose(a, 0.0, atol=1e-12)


def test_single_leaf_and_root_only_trees():
    v, a = turn_credit([-1, 0], [0.0, 1.0], [np.nan, 1.0])
    np.testing.assert_allclose(v, [0, 0])  # one leaf: r − mean = 0
    v, a = turn_credit([-1, 0], [0.0, 1.0], [np.nan, 1.0], normalize_leaves=False)
    np.testing.assert_allclose(v, [1, 1])
    np.testing.assert_allclose(a, [0, 1])
    v, a = turn_credit([-1], [0.0], [np.nan])
    np.testing.assert_allclose(v, [0])
    np.testing.assert_allclose(a, [0])


def test_single_chain_values_equal_its_leaf():
    p = [-1, 0, 1, 2, 3]
    r = [np.nan] * 4 + [1.0]
    for vm in VALUE_MODES:
        v, _ = turn_credit(p, [0, 1, 2, 3, 4], r, value_mode=vm, normalize_leaves=False)
        np.testing.assert_allclose(v, 1.0)


def test_entropy_linear_zero_entropy_siblings_are_uniform():
    v, _ = turn_credit([-1, 0, 0], [0.0, 0.0, 0.0], [np.nan, 1.0, 0.0], value_mode="entropy_linear", normalize_leaves=False)
    np.testing.assert_allclose(v[0], 0.5)


def test_softmax_does_not_overflow_on_huge_entropy():
    v, _ = turn_credit([-1, 0, 0], [0.0, 1000.0, 999.0], [np.nan, 1.0, 0.0], normalize_leaves=False)
    np.testing.assert_allclose(v[0], math.exp(1) / (math.exp(1) + 1))


@pytest.mark.parametrize(
    "args, message",
    [
        (([-1, 1, 0], [0, 0, 0], [np.nan, 1, 1]), "topologically"),
        (([0, 0], [0, 0], [np.nan, 1]), r"parent\[0\] must be -1"),
        (([-1, 0, 0], [0, 0, 0], [np.nan, 1, np.nan]), r"leaf_reward\[2\]"),
        (([-1, 0, 1], [0, 0, 0], [np.nan, 0.5, 1]), r"node 1 has children"),
        (([-1, 0], [0, 0, 0], [np.nan, 1]), "entropy has shape"),
        (([-1, 0], [0, np.nan], [np.nan, 1]), r"entropy\[1\]"),
        (([-1.0, 0.0], [0, 0], [np.nan, 1]), "integers"),
        (([], [], []), "non-empty"),
    ],
)
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        turn_credit(*args)


def test_unknown_modes():
    with pytest.raises(ValueError, match="value_mode='nope'"):
        turn_credit(P, H, R, value_mode="nope")
    with pytest.raises(ValueError, match="adv_mode='nope'"):
        turn_credit(P, H, R, adv_mode="nope")


def test_token_advantages_numpy_and_torch():
    node_adv = np.array([0.0, 0.5, -1.0])
    tok = np.array([[-1, 1, 1, -1, 2], [2, 2, -1, -1, -1]])
    expected = np.array([[0, 0.5, 0.5, 0, -1], [-1, -1, 0, 0, 0]])
    np.testing.assert_allclose(token_advantages(node_adv, tok), expected)
    out = token_advantages(node_adv, torch.as_tensor(tok))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected)
    with pytest.raises(ValueError, match="node 7"):
        token_advantages(node_adv, np.array([7]))


# ---------------------------------------------------------------- pinned behaviours (issue 16)


@pytest.mark.parametrize(
    "args, message",
    [
        # the shape error names the argument at fault and the expected shape
        (([-1, 0], [0, 0], [np.nan]), r"^leaf_reward has shape \(1,\) but parent has shape \(2,\)$"),
        # a 1-node tree whose root has a parent: the message shows parent[0]
        (([0], [0.0], [np.nan]), r"^parent\[0\] must be -1 \(node 0 is the root\), got 0$"),
        # the offending node is the last one: its index and parent are reported
        (([-1, 0, 5], [0, 0, 0], [np.nan, 1, 1]),
         r"^parent is not topologically ordered: parent\[2\] = 5 but every non-root node needs 0 <= parent\[i\] < i"),
        (([-1, 0, 0, 2], [0, 0, 0, 0], [np.nan, 1, 1, 1]), r"^leaf_reward\[2\] = 1.0 but node 2 has children: use NaN for non-leaf nodes$"),
        # a 2-node tree is checked like any other: its leaf needs a reward
        (([-1, 0], [0, 0], [np.nan, np.nan]), r"^leaf_reward\[1\] is nan but node 1 is a leaf: every leaf needs a finite reward$"),
    ],
)
def test_validation_messages_point_at_the_node(args, message):
    with pytest.raises(ValueError, match=message):
        validate_tree(*args)


def test_mode_and_batch_errors_list_the_choices():
    with pytest.raises(ValueError, match=r"^value_mode='nope' is not one of entropy_softmax, entropy_linear, child_mean, leaf_mean$"):
        turn_credit(P, H, R, value_mode="nope")
    with pytest.raises(ValueError, match=r"^adv_mode='nope' is not one of value, td, global, td_global$"):
        turn_credit(P, H, R, adv_mode="nope")
    with pytest.raises(ValueError, match=r"must have one entry per tree, got 2, 1, 2$"):
        turn_credit_batch([P, P], [H], [R, R])


def test_eps_reaches_the_leaf_normalisation():
    # Two leaves, rewards 1 and 0: mean 0.5, population std 0.5, r̂ = ±0.5 / (0.5 + eps).
    v, _ = turn_credit([-1, 0, 0], [0.0, 1.0, 1.0], [np.nan, 1.0, 0.0], value_mode="child_mean", eps=1.0)
    np.testing.assert_allclose(v, [0.0, 1 / 3, -1 / 3])


def test_leaf_values_are_exactly_the_leaf_rewards():
    # The solver gives leaves their reward only up to round-off; leaves are overwritten with the
    # (normalised) reward itself, so a leaf's value is bit-identical to it in every value mode.
    rng = np.random.default_rng(7)
    for _ in range(20):
        parent, entropy, reward = random_tree(rng, 30)
        leaf = np.isfinite(reward)
        reward = np.where(leaf, rng.normal(size=reward.shape), np.nan)
        for vm in VALUE_MODES:
            v, _ = turn_credit(parent, entropy, reward, value_mode=vm, normalize_leaves=False)
            assert np.array_equal(v[leaf], reward[leaf]), vm


def test_root_only_trees_return_zeros_in_every_mode():
    # "A tree holding only its root has nothing to credit": even with a finite reward entry at the
    # root, which validation cannot reject for a 1-node tree, and in a batch of root-only trees.
    for vm in VALUE_MODES:
        v, a = turn_credit([-1], [0.0], [1.0], value_mode=vm, normalize_leaves=False)
        assert v.tolist() == [0.0] and a.tolist() == [0.0]
        vs, advs = turn_credit_batch([[-1], [-1]], [[0.0], [0.0]], [[np.nan], [np.nan]], value_mode=vm)
        assert [x.tolist() for x in vs + advs] == [[0.0]] * 4


def test_token_advantages_of_node_zero_and_of_one_node_trees():
    # Tokens of node 0 get node 0's advantage (not 0, not node 1's); −1 tokens get 0.
    for tok in (np.array([0, 1, -1]), torch.tensor([0, 1, -1])):
        out = token_advantages([5.0, 1.0], tok)
        np.testing.assert_array_equal(np.asarray(out), [5.0, 1.0, 0.0])
    # A one-node (root-only) tree: its tokens are all untrained.
    np.testing.assert_array_equal(token_advantages([0.0], np.array([-1, -1])), [0.0, 0.0])
    # Node index == number of nodes is out of range: a clear ValueError, not numpy's IndexError.
    with pytest.raises(ValueError, match="token_node refers to node 2 but only 2 nodes have advantages"):
        token_advantages([0.0, 1.0], np.array([0, 2]))
    # The numpy path works in float64 like the rest of the credit code, whatever the input dtype.
    assert token_advantages(np.array([0.0, 0.5], dtype=np.float32), np.array([1])).dtype == np.float64


def test_token_advantages_follow_the_token_tensor_device():
    # A factory call without device= would land on the (here "meta") default device and fail
    # next to the CPU token tensor: a CPU-only check that a GPU token tensor gets GPU advantages.
    tok = torch.tensor([[0, 1, -1], [1, 1, 0]])
    with torch.device("meta"):
        out = token_advantages([0.5, -1.0], tok)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.0, 0.0], [-1.0, -1.0, 0.5]]))
