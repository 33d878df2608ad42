"""The verl plug-in, called the way verl calls it: through verl's registry lookups.

These tests need verl, which pins transformers below what the main environment carries, so they
run in a separate environment (.ci/run's verl step; README "verl"). In the main environment they
are skipped.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import required  # noqa: E402

try:
    import verl  # noqa: E402,F401
except ImportError:
    if required("verl"):  # .ci/run's verl environment: a missing verl must fail there, not skip
        raise
    pytest.skip("verl is not installed: the verl environment runs these (.ci/run, README 'verl')",
                allow_module_level=True)

from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, agg_loss, get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from at2po.algorithms.advantages import tree_advantages  # noqa: E402
from at2po.algorithms.credit import ADV_MODES, VALUE_MODES, turn_credit_batch  # noqa: E402
from at2po.algorithms.losses import policy_loss  # noqa: E402
from at2po.algorithms.tree import LEAF, TurnTree  # noqa: E402
from at2po.integrations import verl as plugin  # noqa: E402
from conftest import hand_credit  # noqa: E402


def test_importing_verl_alone_registers_the_plugin():
    """The entry point: a process that imports only verl finds both names in verl's registries."""
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
        "print(get_policy_loss_fn('atpo').__module__, get_adv_estimator_fn('at2po_tree').__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["at2po.integrations.verl", "at2po.integrations.verl"]


# -- the loss ----------------------------------------------------------------------------------------
def actor_config(clip_low, clip_high, agg="seq-mean-token-mean", **global_info):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=clip_low,
                       clip_ratio_high=clip_high, loss_agg_mode=agg, global_batch_info=dict(global_info))


def random_turn_batch(seed, bsz=7, t=24, empty_row=True):
    """Random multi-turn masks (runs of 1s separated by 0s), log-probs straddling the clip range."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(bsz, t, dtype=torch.bool)
    for i in range(bsz):
        pos = int(torch.randint(0, 3, (1,), generator=g))
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            n = int(torch.randint(1, 5, (1,), generator=g))
            mask[i, pos:pos + n] = True
            pos += n + int(torch.randint(1, 4, (1,), generator=g))
            if pos >= t:
                break
    if empty_row:
        mask[1] = False
    old = -torch.rand(bsz, t, generator=g) * 3
    logp = (old + torch.randn(bsz, t, generator=g) * 0.05).requires_grad_(True)
    adv = torch.randn(bsz, t, generator=g)
    return old, logp, adv, mask


def runs(row_mask):
    """Maximal runs of True in one row, as lists of positions: the turns, found by hand."""
    out, cur = [], []
    for j, m in enumerate(row_mask.tolist()):
        if m:
            cur.append(j)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


def naive_turn_loss_matrix(old, logp, adv, mask, lo, hi):
    """Per-token ATPO loss by loops over rows and turns (docs/method.md §4)."""
    rows = []
    for i in range(mask.shape[0]):
        row = [torch.zeros(()) for _ in range(mask.shape[1])]
        for turn in runs(mask[i]):
            mean_lr = sum(float(logp[i, j].detach() - old[i, j]) for j in turn) / len(turn)
            for j in turn:
                ratio = torch.exp(mean_lr + logp[i, j] - logp[i, j].detach())
                row[j] = torch.maximum(-adv[i, j] * ratio, -adv[i, j] * ratio.clamp(1 - lo, 1 + hi))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 97, "global_batch_size": 12,
                                              "loss_scale_factor": 7}])
def test_atpo_loss_through_verl_registry_matches_naive_reference(seed, agg, global_info):
    """Value and gradient equal the loop reference aggregated by verl's own agg_loss (its global-batch
    normalisation included), with clip ranges that clip some turns and not others."""
    old, logp, adv, mask = random_turn_batch(seed)
    lo, hi = 0.03, 0.04
    loss_fn = get_policy_loss_fn("atpo")
    cfg = actor_config(lo, hi, agg, **global_info)
    loss, metrics = loss_fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                            loss_agg_mode=agg, config=cfg, rollout_is_weights=None)
    (grad,) = torch.autograd.grad(loss, logp)

    logp_ref = logp.detach().clone().requires_grad_(True)
    mat = naive_turn_loss_matrix(old, logp_ref, adv, mask, lo, hi)
    ref = agg_loss(loss_mat=mat, loss_mask=mask, loss_agg_mode=agg, **cfg.global_batch_info)
    (grad_ref,) = torch.autograd.grad(ref, logp_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # the random ratios straddle the clip range
    assert float(grad.abs().sum()) > 0 and bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_atpo_loss_through_verl_registry_equals_at2po_policy_loss(seed, agg):
    """Where verl's and at2po's normalisations coincide (one process, every row trained), the
    registered loss IS at2po's turn-level policy_loss: same value, same gradient, same metrics."""
    old, logp, adv, mask = random_turn_batch(seed, empty_row=False)
    lo, hi = 3e-3, 4e-3
    loss, metrics = get_policy_loss_fn("atpo")(old, logp, adv, mask, agg, actor_config(lo, hi, agg), None)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    ref, ref_metrics = policy_loss(logp2, old, adv, mask, level="turn", clip_low=lo, clip_high=hi, agg=agg)
    (grad_ref,) = torch.autograd.grad(ref, logp2)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-8)
    assert metrics["actor/pg_clipfrac"] == ref_metrics["clipfrac"]
    assert metrics["actor/turn_kl_entropy"] == ref_metrics["turn_kl_entropy"]


def test_atpo_loss_equals_verl_gspo_when_every_row_is_one_turn():
    """verl's own GSPO loss is the sequence-level case: with one turn per row the two must agree."""
    g = torch.Generator().manual_seed(5)
    bsz, t = 6, 15
    mask = torch.zeros(bsz, t, dtype=torch.bool)
    for i in range(bsz):
        start = int(torch.randint(0, 5, (1,), generator=g))
        mask[i, start:start + int(torch.randint(1, 10, (1,), generator=g))] = True
    old = -torch.rand(bsz, t, generator=g) * 2
    logp = (old + torch.randn(bsz, t, generator=g) * 0.1).requires_grad_(True)
    adv = torch.randn(bsz, 1, generator=g).expand(bsz, t)
    cfg = actor_config(0.02, 0.03)
    ours, _ = get_policy_loss_fn("atpo")(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    theirs, _ = get_policy_loss_fn("gspo")(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    g_ours, g_theirs = (torch.autograd.grad(x, logp)[0] for x in (ours, theirs))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-8)


def test_atpo_loss_applies_rollout_is_weights_per_token():
    old, logp, adv, mask = random_turn_batch(6)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(7)) * 2
    cfg = actor_config(0.03, 0.04, "token-mean")
    loss, _ = get_policy_loss_fn("atpo")(old, logp, adv, mask, "token-mean", cfg, w)
    mat = naive_turn_loss_matrix(old, logp, adv, mask, 0.03, 0.04) * w
    ref = agg_loss(loss_mat=mat, loss_mask=mask, loss_agg_mode="token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0],
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="rollout_is_weights must be >= 0"):
        get_policy_loss_fn("atpo")(old, logp, adv, mask, "token-mean", cfg, -w)


def test_atpo_loss_refuses_a_missing_config():
    old, logp, adv, mask = random_turn_batch(8)
    with pytest.raises(ValueError, match="needs verl's actor config"):
        get_policy_loss_fn("atpo")(old, logp, adv, mask, "token-mean", None, None)


def actor_loss_inputs(old, logp, adv, mask, rows, prompt_len=3, **global_info):
    """The micro-batch verl's actor hands its loss (``verl.workers.utils.losses.ppo_loss``): padded
    prompts/responses, and the model's log-probs flat over every sequence, shifted by one token."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    bsz, width = len(rows), mask.shape[1]
    attention = torch.ones(bsz, prompt_len + width, dtype=torch.int64)
    flat = []
    for r in rows:
        flat += [torch.zeros(prompt_len - 1), logp[r], torch.zeros(1)]
    data = TensorDict({"prompts": torch.ones(bsz, prompt_len, dtype=torch.int64),
                       "responses": torch.ones(bsz, width, dtype=torch.int64), "attention_mask": attention,
                       "response_mask": mask[rows].long(), "old_log_probs": old[rows], "advantages": adv[rows]},
                      batch_size=bsz)
    tu.assign_non_tensor(data, **global_info)
    return {"log_probs": torch.cat(flat)}, data


def test_verl_actor_loss_with_atpo_adds_up_to_the_global_batch_loss():
    """verl's own actor loss path (ppo_loss: config -> get_policy_loss_fn -> agg with the global batch
    info) with loss_mode=atpo, on two micro-batches: their losses and gradients add up to at2po's
    policy_loss over the whole batch, i.e. gradient accumulation gives the global-batch objective."""
    from verl.workers.config.actor import PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    old, logp, adv, mask = random_turn_batch(10, bsz=6, empty_row=False)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=3, clip_ratio_low=0.03,
                      clip_ratio_high=0.04, loss_agg_mode="seq-mean-token-mean",
                      policy_loss=PolicyLossConfig(loss_mode="atpo"))
    total = 0
    for rows in ([0, 2, 4], [1, 3, 5]):
        output, data = actor_loss_inputs(old, logp, adv, mask, rows, dp_size=1, batch_num_tokens=int(mask.sum()),
                                         global_batch_size=6)
        loss, metrics = ppo_loss(cfg, output, data)
        assert "actor/turn_kl_entropy" in metrics
        total = total + loss
    logp2 = logp.detach().clone().requires_grad_(True)
    ref, _ = policy_loss(logp2, old, adv, mask, level="turn", clip_low=0.03, clip_high=0.04)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0], torch.autograd.grad(ref, logp2)[0],
                               rtol=1e-5, atol=1e-8)


# -- the tree credit ---------------------------------------------------------------------------------
def random_tree(rng, max_turns):
    """A finished tree of random shape: turns branch from random open turns; every open turn is
    closed with a leaf at the end. Observations (masked) precede every turn after the first."""
    tree = TurnTree(prompt_ids=[1, 2, 3])
    open_nodes = [0]
    while open_nodes and len(tree) <= max_turns:
        parent = open_nodes[rng.integers(len(open_nodes))]
        n_gen = int(rng.integers(1, 5))
        leaf = rng.random() < 0.35 or tree.depth(parent) >= 3
        node = tree.add_turn(parent, obs_ids=[] if parent == 0 else [9] * int(rng.integers(1, 3)),
                             gen_ids=[5] * n_gen, gen_logprobs=list(-rng.random(n_gen) * 3),
                             status=LEAF if leaf else "active")
        if not leaf:
            open_nodes.append(node)
        if parent != 0 and rng.random() < 0.5:  # stop branching from this turn
            open_nodes.remove(parent)
    for n in tree.nodes[1:]:
        if not n.is_terminal and not n.children:
            tree.add_turn(n.index, obs_ids=[9], gen_ids=[5, 5], gen_logprobs=[-0.5, -1.0], status=LEAF)
    for leaf in tree.leaves():
        tree.nodes[leaf].reward = float(rng.choice([0.0, 1.0, rng.random()]))
    return tree


def verl_batch(trees, rng, pad=3):
    """The batch a verl tree rollout hands the trainer: one row per leaf (plus a repeated leaf),
    rows shuffled across trees, node ids relabelled at random, rewards on the last token."""
    rows = [(t, leaf) for t, tree in enumerate(trees) for leaf in tree.leaves()]
    rows.append(rows[0])
    rows = [rows[i] for i in rng.permutation(len(rows))]
    seqs = [trees[t].leaf_sequence(leaf) for t, leaf in rows]
    width = max(len(s.loss_mask) for s in seqs) + pad
    relabel = [rng.permutation(len(tree)) + 100 * t for t, tree in enumerate(trees)]
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    rewards = torch.zeros(len(rows), width)
    token_node = np.full((len(rows), width), -1)
    paths, ents = np.empty(len(rows), dtype=object), np.empty(len(rows), dtype=object)
    for i, ((t, leaf), s) in enumerate(zip(rows, seqs)):
        n = len(s.loss_mask)
        mask[i, :n] = torch.as_tensor(s.loss_mask)
        rewards[i, n - 1] = trees[t].nodes[leaf].reward
        token_node[i, :n] = s.token_node
        paths[i] = relabel[t][np.asarray(s.path)]
        ents[i] = np.array([trees[t].nodes[k].entropy for k in s.path])
    uid = np.array([f"tree-{t}" for t, _ in rows], dtype=object)
    return rows, token_node, DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": uid, plugin.NODE_PATH: paths, plugin.NODE_ENTROPY: ents})


def registered(value_mode, adv_mode):
    if (value_mode, adv_mode) == ("entropy_softmax", "value"):
        return "at2po_tree"
    name = f"at2po_tree_test_{value_mode}_{adv_mode}"
    if name not in ADV_ESTIMATOR_REGISTRY:
        plugin.register_tree_estimator(name, value_mode=value_mode, adv_mode=adv_mode)
    return name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("value_mode", VALUE_MODES)
@pytest.mark.parametrize("adv_mode", ADV_MODES)
def test_tree_estimator_through_verl_registry_matches_at2po_credit(seed, value_mode, adv_mode):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, int(rng.integers(1, 12))) for _ in range(int(rng.integers(2, 5)))]
    rows, token_node, data = verl_batch(trees, rng)
    fn = get_adv_estimator_fn(registered(value_mode, adv_mode))
    adv, ret = fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
                  index=data.non_tensor_batch["uid"], config=AlgoConfig(), non_tensor_batch=data.non_tensor_batch)
    ref = tree_advantages([t.to_arrays() for t in trees], [(t, leaf, tn) for (t, leaf), tn in zip(rows, token_node)],
                          value_mode=value_mode, adv_mode=adv_mode)
    assert adv.shape == data.batch["response_mask"].shape and adv.dtype == torch.float32
    np.testing.assert_allclose(adv.numpy(), np.stack(ref), rtol=1e-5, atol=1e-6)
    assert torch.equal(adv, ret)
    assert bool((adv[data.batch["response_mask"] == 0] == 0).all())


def test_tree_estimator_matches_hand_computed_values():
    """One tree by hand: root → a (→ leaves c, d) and leaf b; entropy-softmax values by recursion."""
    tree = TurnTree(prompt_ids=[1])
    a = tree.add_turn(0, obs_ids=[], gen_ids=[5, 5], gen_logprobs=[-1.0, -2.0])
    b = tree.add_turn(0, obs_ids=[], gen_ids=[5], gen_logprobs=[-0.3], status=LEAF)
    c = tree.add_turn(a, obs_ids=[9], gen_ids=[5, 5, 5], gen_logprobs=[-0.1, -0.2, -0.6], status=LEAF)
    d = tree.add_turn(a, obs_ids=[9, 9], gen_ids=[5], gen_logprobs=[-2.5], status=LEAF)
    rewards = {b: 0.0, c: 1.0, d: 0.0}
    for leaf, r in rewards.items():
        tree.nodes[leaf].reward = r
    r_hat, value = hand_credit(tree, rewards)
    _, token_node, data = verl_batch([tree], np.random.default_rng(0))
    adv = plugin.compute_advantage(data, AlgoConfig()).batch["advantages"]
    expected = np.where(token_node >= 0, np.vectorize(lambda n: value(n) if n > 0 else 0.0)(token_node), 0.0)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(value(c), r_hat[c]) and not np.isclose(value(a), 0.0)


def test_compute_advantage_fills_the_dataproto():
    rng = np.random.default_rng(9)
    trees = [random_tree(rng, 8), random_tree(rng, 5)]
    rows, token_node, data = verl_batch(trees, rng)
    out = plugin.compute_advantage(data, AlgoConfig(adv_estimator="at2po_tree"))
    ref = tree_advantages([t.to_arrays() for t in trees], [(t, leaf, tn) for (t, leaf), tn in zip(rows, token_node)])
    np.testing.assert_allclose(out.batch["advantages"].numpy(), np.stack(ref), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.batch["returns"], out.batch["advantages"])


def test_tree_estimator_without_tree_fields_says_what_to_do():
    """verl 0.9.1's stock compute_advantage hands a registered estimator only uid: the estimator
    then stops with a message naming the fields and the call that passes them."""
    from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

    rng = np.random.default_rng(1)
    _, _, data = verl_batch([random_tree(rng, 6)], rng)
    with pytest.raises(ValueError, match="at2po_node_path missing.*compute_advantage"):
        verl_compute_advantage(data, adv_estimator="at2po_tree", config=AlgoConfig(adv_estimator="at2po_tree"))
    data.non_tensor_batch.pop(plugin.NODE_PATH)
    with pytest.raises(ValueError, match="at2po_node_path missing"):
        plugin.compute_advantage(data)
    data.non_tensor_batch.pop(plugin.NODE_ENTROPY)
    data.non_tensor_batch[plugin.NODE_PATH] = np.empty(len(data), dtype=object)
    data.non_tensor_batch[plugin.NODE_PATH][:] = [np.array([0, 1])] * len(data)
    with pytest.raises(ValueError, match="needs at2po_node_entropy"):
        plugin.compute_advantage(data)


def bad_batch(paths, mask_rows, rewards, entropies=None):
    bsz = len(paths)
    width = max(len(m) for m in mask_rows)
    mask = torch.zeros(bsz, width, dtype=torch.int64)
    for i, m in enumerate(mask_rows):
        mask[i, :len(m)] = torch.as_tensor(m)
    p, e = np.empty(bsz, dtype=object), np.empty(bsz, dtype=object)
    p[:] = [np.asarray(x) for x in paths]
    e[:] = [np.asarray(x, dtype=float) for x in (entropies or [np.zeros(len(x)) for x in paths])]
    tlr = torch.zeros(bsz, width)
    tlr[:, -1] = torch.as_tensor(rewards, dtype=torch.float32)
    return DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                               non_tensors={"uid": np.array(["t"] * bsz, dtype=object), plugin.NODE_PATH: p,
                                            plugin.NODE_ENTROPY: e})


@pytest.mark.parametrize("paths, masks, rewards, entropies, message", [
    ([[0, 1]], [[1, 0, 1]], [1.0], None, "has 2 turns in response_mask but at2po_node_path names 1"),
    ([[0, 1, 2], [0, 3, 2]], [[1, 0, 1], [1, 0, 1]], [1.0, 0.0], None, "node 2 has two parents"),
    ([[0, 1], [0, 1, 2]], [[1], [1, 0, 1]], [1.0, 0.0], None, "node 1 ends one row's path but has children"),
    ([[0, 1], [0, 1]], [[1], [1]], [1.0, 0.0], None, "leaf 1 has reward 1.0 in one row and 0.0"),
    ([[0, 1, 2], [0, 1, 3]], [[1, 0, 1], [1, 0, 1]], [1.0, 0.0], [[0, 0.5, 1], [0, 0.7, 1]], "node 1 has entropy"),
    ([[0, 1], [5, 2]], [[1], [1]], [1.0, 0.0], None, "different roots"),
    ([[0]], [[1]], [1.0], None, "at least root and one turn"),
])
def test_tree_estimator_rejects_inconsistent_trees(paths, masks, rewards, entropies, message):
    with pytest.raises(ValueError, match=message):
        plugin.compute_advantage(bad_batch(paths, masks, rewards, entropies))


def test_truncated_rows_credit_only_the_turns_they_hold():
    """A row cut by the response length keeps fewer turns than its path: those it holds are credited."""
    data = bad_batch([[0, 1, 2], [0, 1, 3]], [[1, 1, 0, 1], [1, 1, 0, 0]], [1.0, 0.0],
                     [[0, 0.2, 0.4], [0, 0.2, 0.9]])
    adv = plugin.compute_advantage(data).batch["advantages"]
    ref_values, _ = turn_credit_batch([np.array([-1, 0, 1, 1])], [np.array([0, 0.2, 0.4, 0.9])],
                                             [np.array([np.nan, np.nan, 1.0, 0.0])])
    v = ref_values[0]
    torch.testing.assert_close(adv, torch.tensor([[v[1], v[1], 0, v[2]], [v[1], v[1], 0, 0]], dtype=torch.float32))
