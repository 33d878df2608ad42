"""The ``at2po_tree`` agent loop's pieces and the ``at2po`` trainer mode's helpers, without Ray.

The tree is grown by at2po's engine through the ``verl_server`` backend, whose requests go to a
scripted stand-in for verl's server manager (an ``async generate`` returning verl's
``TokenOutput``, as verl's LLM server client does); test_verl_run.py runs the real servers. The
rows it returns are compared with the engine's own tree and credit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import required

try:
    import verl  # noqa: F401
except ImportError:
    if required("verl"):
        raise
    pytest.skip("verl is not installed: the verl environment runs these (.ci/run, README 'verl')",
                allow_module_level=True)

from omegaconf import OmegaConf  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from at2po.agent import render_prompt  # noqa: E402
from at2po.algorithms.credit import turn_credit  # noqa: E402
from at2po.config import RolloutConfig  # noqa: E402
from at2po.integrations.verl import NODE_ENTROPY, NODE_PATH, tree_advantages_from_batch  # noqa: E402
from at2po.integrations.verl import agent_loop as loop_mod  # noqa: E402
from at2po.rollout.engine import Prompt, TreeRolloutEngine  # noqa: E402
from at2po.rollout.generator import SamplingParams  # noqa: E402
from at2po.tasks.base import Sample  # noqa: E402
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask  # noqa: E402
from at2po.tiny import synthetic_agent_texts, train_tokenizer  # noqa: E402
from conftest import ANSWER, SEARCH, EchoSearch  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(100), vocab_size=500)


class ScriptedServers:
    """verl's server manager as an agent loop calls it. Each request's reply comes from the
    number of results in its context: search first, then answer; answers alternate between the
    right and a wrong entity so that a tree's leaves differ in reward. Every token's log-prob
    is -0.5 - 0.1 * (request number mod 5), so each turn has its own entropy."""

    def __init__(self, tok):
        self.tok, self.requests = tok, []

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        await asyncio.sleep(0)
        n = len(self.requests)
        self.requests.append(dict(sampling_params))
        context = self.tok.decode(prompt_ids)
        results = context.split("<|im_start|>assistant\n", 1)[-1].count("<result>")
        text = SEARCH.format(q="Zorbex") if results == 0 else ANSWER.format(a="paris" if n % 2 else "rome")
        ids = self.tok.encode(text, add_special_tokens=False)[: sampling_params["max_tokens"]]
        return TokenOutput(token_ids=ids, log_probs=[-0.5 - 0.1 * (n % 5)] * len(ids), stop_reason="completed",
                           extra_fields={"global_steps": 3 + n % 2})


def grow_tree(tok, cfg):
    """One tree grown as the agent loop grows it: the engine in a worker thread, its requests
    submitted to the running event loop."""
    servers = ScriptedServers(tok)

    async def main():
        server = loop_mod.VerlServer(servers, asyncio.get_running_loop(), frozenset({tok.eos_token_id}))
        generator = loop_mod.VerlServerGenerator(server, tok)
        engine = TreeRolloutEngine(generator, tok, [EchoSearch()], SearchQATask(), cfg)
        prompt = Prompt(render_prompt(tok, "Question: Who?", PAPER_SYSTEM_PROMPT), Sample("q", "Who?", ("paris",)))
        result = await asyncio.to_thread(engine.rollout, [prompt])
        return result, generator

    result, generator = asyncio.run(main())
    return result, generator, servers


TREE = RolloutConfig(n_initial=2, expansion_rounds=1, top_k=1, samples_per_tree=4, chunk_tokens=64,
                     max_response_tokens=300, max_turns=4)


def test_one_row_per_leaf_with_its_own_reward_and_the_tree_fields(tok):
    result, generator, servers = grow_tree(tok, TREE)
    tree = result.trees[0]
    outputs = loop_mod.tree_outputs(result, 1.0, (min(generator.weight_steps), max(generator.weight_steps)))
    assert len(outputs) == TREE.samples_per_tree == len(result.rows)
    rewards = set()
    for out, row in zip(outputs, result.rows):
        seq = row.sequence
        assert out.response_ids == seq.response_ids.tolist()
        assert out.response_mask == seq.loss_mask.tolist()
        assert out.response_logprobs == pytest.approx(seq.old_log_probs.tolist())
        extra = out.extra_fields
        assert extra[NODE_PATH] == seq.path and seq.path[0] == 0 and tree.nodes[seq.path[-1]].reward == row.score.reward
        # H(n) = mean NLL of the turn's sampled tokens: every token of request k logged -0.5 - 0.1 k
        for node, h in zip(seq.path[1:], extra[NODE_ENTROPY][1:]):
            assert h == pytest.approx(-float(np.mean(tree.nodes[node].gen_logprobs)))
        assert out.reward_score == extra[loop_mod.LEAF_REWARD] == row.score.reward
        assert (extra["min_global_steps"], extra["max_global_steps"]) == (3, 4)
        rewards.add(out.reward_score)
    assert len(rewards) > 1, "the script's leaves differ in reward"
    assert all(len(o.extra_fields[NODE_PATH]) == 3 for o in outputs), "search, then answer: two turns per leaf"
    # verl's requests: the tools' stop strings kept in the output, the sampler's log-probs asked for
    assert all(r["include_stop_str_in_output"] and r["logprobs"] and "</search>" in r["stop"] for r in servers.requests)


def test_the_estimator_on_the_rows_equals_the_engines_tree_credit(tok):
    """The rows' fields, read by the at2po_tree estimator as verl hands them over, give every turn
    the advantage at2po's turn_credit gives its node on the engine's own tree."""
    result, *_ = grow_tree(tok, TREE)
    outputs = loop_mod.tree_outputs(result)
    width = max(len(o.response_mask) for o in outputs)
    mask = torch.zeros(len(outputs), width)
    rewards = torch.zeros(len(outputs), width)
    for r, o in enumerate(outputs):
        mask[r, : len(o.response_mask)] = torch.tensor(o.response_mask, dtype=torch.float32)
        rewards[r, len(o.response_mask) - 1] = o.reward_score
    adv = tree_advantages_from_batch(rewards, mask, ["t"] * len(outputs), [np.array(o.extra_fields[NODE_PATH]) for o in outputs],
                                     [np.array(o.extra_fields[NODE_ENTROPY]) for o in outputs])
    _, node_adv = turn_credit(*result.credit_arrays(0))
    for r, row in enumerate(result.rows):
        seq = row.sequence
        expected = np.where(seq.token_node >= 0, node_adv[np.clip(seq.token_node, 0, None)], 0.0)
        np.testing.assert_allclose(adv[r, : len(expected)].numpy(), expected, atol=1e-6)


def test_finish_reasons_are_read_off_the_tokens(tok):
    """vLLM's servers say only "completed": EOS last is "eos", a stop string is "stop", else "length"."""
    replies = {"a": SEARCH.format(q="x"), "b": "<think> plain text", "c": None}

    class Servers:
        async def generate(self, request_id, *, prompt_ids, sampling_params):
            key = tok.decode(prompt_ids[-1:]).strip()
            ids = [tok.eos_token_id] if replies[key] is None else tok.encode(replies[key], add_special_tokens=False)
            return TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids), stop_reason="completed")

    async def main():
        server = loop_mod.VerlServer(Servers(), asyncio.get_running_loop(), frozenset({tok.eos_token_id}))
        gen = loop_mod.VerlServerGenerator(server, tok)
        contexts = [tok.encode(k, add_special_tokens=False) for k in "abc"]
        params = SamplingParams(stop=("</search>",), max_new_tokens=50)
        return await asyncio.to_thread(gen.generate, contexts + [contexts[0]], params, [50, 50, 50, 0])

    outs = asyncio.run(main())
    assert [(o.finish_reason, o.stop_string) for o in outs] == [("stop", "</search>"), ("length", None), ("eos", None),
                                                               ("length", None)]
    assert outs[3].token_ids == []


def test_trainer_mode_helpers():
    from at2po.integrations.verl.trainer import leaf_scores, tree_ids_from_keys

    keys = ["ab-c_0_0", "ab-c_0_1", "ab-c_1_0", "x_0_0"]
    assert tree_ids_from_keys(keys).tolist() == ["ab-c_0", "ab-c_0", "ab-c_1", "x_0"]
    with pytest.raises(ValueError, match="not verl's"):
        tree_ids_from_keys(["nokey"])
    extra = [{loop_mod.LEAF_REWARD: 1.0, NODE_PATH: [0, 1]}, {loop_mod.LEAF_REWARD: -1.0, NODE_PATH: [0, 2]}]
    scores = leaf_scores(extra, [3, 1], 4)
    assert scores.tolist() == [[0, 0, 1.0, 0], [-1.0, 0, 0, 0]]
    with pytest.raises(ValueError, match="at2po_tree agent loop"):
        leaf_scores([{}], [2], 2)


def verl_cfg(**over):
    base = {"trainer": {"use_v1": True, "v1": {"trainer_mode": "at2po"}},
            "actor_rollout_ref": {"rollout": {"n": 1, "response_length": 400, "calculate_log_probs": True}}}
    cfg = OmegaConf.create(base)
    for key, value in over.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize("key, value, message", [
    ("trainer.use_v1", False, "trainer.use_v1=true"),
    ("trainer.v1.trainer_mode", "sync", "trainer.v1.trainer_mode=at2po"),
    ("actor_rollout_ref.rollout.n", 2, "actor_rollout_ref.rollout.n=1"),
    ("actor_rollout_ref.rollout.response_length", 100, "response_length=100"),
    ("actor_rollout_ref.rollout.calculate_log_probs", False, "calculate_log_probs=true"),
])
def test_verl_settings_that_break_trees_are_named(key, value, message):
    loop_mod._check_verl_settings(verl_cfg(), TREE_CFG)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        loop_mod._check_verl_settings(verl_cfg(**{key: value}), TREE_CFG)


class _Cfg:
    rollout = TREE


TREE_CFG = _Cfg()


def test_the_agent_loop_needs_an_at2po_config():
    with pytest.raises(ValueError, match=r"\+at2po\.config=PATH"):
        loop_mod.load_tree_setup(OmegaConf.create({"trainer": {}}))


def test_importing_verl_alone_registers_the_agent_loop_trainer_and_backend():
    code = (
        "import verl\n"
        "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "from at2po.rollout.generator import GENERATOR_BACKENDS\n"
        "print(_agent_loop_registry['at2po_tree']['_target_'], get_trainer_cls('at2po').__name__,"
        " 'verl_server' in GENERATOR_BACKENDS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["at2po.integrations.verl.agent_loop.TreeAgentLoop", "TreeTrainer", "True"]


def test_the_verl_server_backend_lives_only_inside_verl(tok):
    from at2po.rollout.generator import build_generator

    with pytest.raises(ValueError, match="at2po_tree agent loop inside verl"):
        build_generator("verl_server", torch.nn.Linear(1, 1), tok)
