"""The ``at2po_tree`` agent loop's pieces and the ``at2po`` trainer mode's helpers, without Ray.

The tree is grown by at2po's engine through the ``verl_server`` backend, whose requests go to a
scripted stand-in for verl's server manager (an ``async generate`` returning verl's
``TokenOutput``, as verl's LLM server client does); test_verl_run.py runs the real servers. The
rows it returns are compared with the engine's own tree and credit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import replace

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
from verl.experimental.agent_loop.agent_loop import DictConfigWrap  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

import at2po.rollout.engine as engine_mod  # noqa: E402
from at2po.agent import render_messages, render_prompt  # noqa: E402
from at2po.algorithms.credit import turn_credit  # noqa: E402
from at2po.config import RolloutConfig, load_config  # noqa: E402
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
        self.tok, self.requests, self.replies = tok, [], []

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        await asyncio.sleep(0)
        n = len(self.requests)
        self.requests.append(dict(sampling_params))
        context = self.tok.decode(prompt_ids)
        results = context.split("<|im_start|>assistant\n", 1)[-1].count("<result>")
        text = SEARCH.format(q="Zorbex") if results == 0 else ANSWER.format(a="paris" if n % 2 else "rome")
        ids = self.tok.encode(text, add_special_tokens=False)[: sampling_params["max_tokens"]]
        self.replies.append(ids)
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
    for out, key in zip(outs, "abc"):  # the tokens and log-probs as the server returned them
        ids = [tok.eos_token_id] if replies[key] is None else tok.encode(replies[key], add_special_tokens=False)
        assert (out.token_ids, out.logprobs) == (ids, [-1.0] * len(ids))
    assert (outs[3].token_ids, outs[3].logprobs) == ([], []), "a zero limit sends no request"


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
    ("trainer.use_v1", False, "the at2po_tree agent loop returns one row per leaf, which only verl's v1 trainer takes: "
                              "set trainer.use_v1=true trainer.v1.trainer_mode=at2po"),
    ("trainer.v1.trainer_mode", "sync", "trainer.v1.trainer_mode='sync': the at2po_tree agent loop needs "
                                        "trainer.v1.trainer_mode=at2po (the stock trainers give every leaf the last "
                                        "leaf's reward and no tree fields)"),
    ("actor_rollout_ref.rollout.n", 2,
     "actor_rollout_ref.rollout.n=2: one at2po_tree run already returns N leaves (rollout.samples_per_tree of the "
     "at2po config); set actor_rollout_ref.rollout.n=1"),
    ("actor_rollout_ref.rollout.response_length", 299,
     "rollout.max_response_tokens=300 of the at2po config exceeds actor_rollout_ref.rollout.response_length=299: verl "
     "would cut the trees' rows; raise response_length or lower max_response_tokens"),
    ("actor_rollout_ref.rollout.calculate_log_probs", False,
     "the at2po_tree agent loop needs the sampler's log-probs (turn entropy, rollout log-probs): set "
     "actor_rollout_ref.rollout.calculate_log_probs=true"),
])
def test_verl_settings_that_break_trees_are_named(key, value, message):
    """One line each, naming the field and the fix, word for word."""
    loop_mod._check_verl_settings(verl_cfg(), TREE_CFG)
    with pytest.raises(ValueError) as err:
        loop_mod._check_verl_settings(verl_cfg(**{key: value}), TREE_CFG)
    assert str(err.value) == message


def test_verl_settings_left_out_and_the_edge_of_response_length():
    """use_v1 left out is verl's default (true); a trainer with no v1 section has no trainer mode;
    calculate_log_probs left out is off; max_response_tokens equal to response_length fits."""
    ok = verl_cfg(**{"actor_rollout_ref.rollout.response_length": 300})
    loop_mod._check_verl_settings(ok, TREE_CFG)
    no_use_v1 = verl_cfg()
    del no_use_v1.trainer["use_v1"]
    loop_mod._check_verl_settings(no_use_v1, TREE_CFG)
    no_v1 = verl_cfg()
    del no_v1.trainer["v1"]
    with pytest.raises(ValueError, match=r"^trainer\.v1\.trainer_mode=None: "):
        loop_mod._check_verl_settings(no_v1, TREE_CFG)
    no_log_probs = verl_cfg()
    del no_log_probs.actor_rollout_ref.rollout["calculate_log_probs"]
    with pytest.raises(ValueError, match=r"calculate_log_probs=true$"):
        loop_mod._check_verl_settings(no_log_probs, TREE_CFG)


class _Cfg:
    rollout = TREE


TREE_CFG = _Cfg()


NO_CONFIG = ("the at2po_tree agent loop needs an at2po config for the tree shape, task and tools: add "
             "+at2po.config=PATH to the verl command (docs/verl.md)")


@pytest.mark.parametrize("verl_config", [
    OmegaConf.create({"trainer": {}}), OmegaConf.create({"at2po": {"overrides": []}}),
    OmegaConf.create({"at2po": {"config": ""}}), object(),
])
def test_the_agent_loop_needs_an_at2po_config(verl_config):
    with pytest.raises(ValueError) as err:
        loop_mod.load_tree_setup(verl_config)
    assert str(err.value) == NO_CONFIG


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


# -- TreeAgentLoop.run end to end, without Ray ---------------------------------------------------------
# The agent loop is built as verl's worker builds it (AgentLoopBase.__init__ with the whole config and
# the data config wrapped), with ScriptedServers as its server manager and a real at2po config file:
# a BM25 search tool over a three-line corpus. A spy subclass of TreeRolloutEngine records what run()
# hands the engine; the rows are compared with a tree grown by the engine directly and with the
# rewards read off the rows' own answers.

QUESTION = "Who founded Zorbex?"
ROW = {  # one verl row as the agent-loop worker hands it to run(): numpy values, as read from parquet
    "raw_prompt": np.array([{"role": "user", "content": f"Answer with the tools.\nQuestion: {QUESTION}"}],
                           dtype=object),
    "data_source": "nq",
    "ability": "fact-reasoning",
    "reward_model": {"style": "rule", "ground_truth": {"target": np.array(["paris", "Paris City"], dtype=object)}},
    "extra_info": {"split": "train", "index": np.int64(7)},
    "index": np.int64(7),
    "uid": "u-1",
    "session_id": 3,
}
SAMPLE = Sample("7", QUESTION, ("paris", "Paris City"))


def forget_eos_ids():
    """The class as a fresh process has it: no cached EOS set (not even a None)."""
    if "_eos_cache" in vars(loop_mod.TreeAgentLoop):
        del loop_mod.TreeAgentLoop._eos_cache


@pytest.fixture
def fresh_loop_state(monkeypatch):
    """No setup, EOS set or tree thread pool left by another test (each is cached per process)."""
    monkeypatch.setattr(loop_mod, "_SETUPS", {})
    monkeypatch.setattr(loop_mod, "_TREE_THREADS", None)
    forget_eos_ids()
    yield
    forget_eos_ids()
    if loop_mod._TREE_THREADS is not None:
        loop_mod._TREE_THREADS.shutdown(wait=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok):
    """An at2po config file (BM25 search over a tiny corpus), a model directory whose generation
    config adds <|im_end|> to the EOS ids, and an empty model directory."""
    root = tmp_path_factory.mktemp("agent_loop")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": text}) + "\n" for i, text in
                              enumerate(["Zorbex was founded in paris", "rome is a city", "nothing here"])))
    at2po = {"tools": {"search": {"corpus_file": str(corpus), "topk": 1}},
             "data": {"system_prompt": "You answer with the tools."},
             "rollout": {"n_initial": 2, "expansion_rounds": 1, "top_k": 1, "samples_per_tree": 4, "chunk_tokens": 64,
                         "max_response_tokens": 300, "max_turns": 4, "temperature": 0.9, "top_p": 0.95}}
    (root / "at2po.yaml").write_text(json.dumps(at2po))
    # the authors' prompt layout, without the backspace quirk and with the task's own system prompt
    atpo = {**at2po, "data": {"prompt_layout": "atpo", "atpo_backspace_quirk": False}}
    (root / "atpo.yaml").write_text(json.dumps(atpo))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = root / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, im_end]}))
    (root / "empty").mkdir()
    return {"config": root / "at2po.yaml", "atpo": root / "atpo.yaml", "model": model, "empty": root / "empty",
            "im_end": im_end}


def verl_run_cfg(assets, config="config", overrides=("rollout.seed=5",), prompt_length=1024, model="model"):
    cfg = verl_cfg()
    OmegaConf.update(cfg, "at2po", {"config": str(assets[config]), "overrides": list(overrides)}, force_add=True)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.prompt_length", prompt_length, force_add=True)
    OmegaConf.update(cfg, "actor_rollout_ref.model", {"path": str(assets[model])}, force_add=True)
    OmegaConf.update(cfg, "data", {"max_prompt_length": prompt_length}, force_add=True)
    return cfg


def agent_loop(tok, servers, cfg):
    """A TreeAgentLoop built as verl's agent-loop worker builds one (hydra.utils.instantiate)."""
    return loop_mod.TreeAgentLoop(trainer_config=DictConfigWrap(config=cfg), server_manager=servers, tokenizer=tok,
                                  processor=None, dataset_cls=None, data_config=DictConfigWrap(config=cfg.data))


class SpyEngine(TreeRolloutEngine):
    """The engine run() builds, recording its arguments and which growth ran in which thread."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args, self.kwargs, self.calls = args, kwargs, []
        SpyEngine.made.append(self)

    def rollout(self, prompts, **kw):
        self.calls.append(("rollout", threading.current_thread().name, list(prompts), kw))
        return super().rollout(prompts, **kw)

    def validate(self, prompts):
        self.calls.append(("validate", threading.current_thread().name, list(prompts), {}))
        return super().validate(prompts)


@pytest.fixture
def spy(monkeypatch, fresh_loop_state):
    SpyEngine.made = []
    monkeypatch.setattr(engine_mod, "TreeRolloutEngine", SpyEngine)
    return SpyEngine


class QuietServers(ScriptedServers):
    """ScriptedServers whose replies name no weight version."""

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        return TokenOutput(token_ids=out.token_ids, log_probs=out.log_probs, stop_reason="completed")


def seed_by_hand(base, uid, session):
    return (base * 1_000_003 + zlib.crc32(f"{uid}/{session}".encode())) % 2**31


def reward_by_hand(tok, response_ids):
    """1 for a row whose answer is paris (a gold), 0 for rome: the script's two answers."""
    text = tok.decode(response_ids)
    assert text.count("\\boxed{") == 1, text
    return 1.0 if "\\boxed{paris}" in text else 0.0


def test_run_grows_one_tree_through_the_servers_and_returns_its_leaves(tok, assets, spy):
    servers = ScriptedServers(tok)
    cfg = verl_run_cfg(assets)
    t0 = time.perf_counter()
    outputs = asyncio.run(agent_loop(tok, servers, cfg).run({"temperature": 0.7, "top_p": 0.8, "top_k": 5}, **ROW))
    elapsed = time.perf_counter() - t0

    at2po_cfg = load_config(str(assets["config"]), ["rollout.seed=5"])
    expected_cfg = replace(at2po_cfg.rollout, backend="verl_server", temperature=0.7, top_p=0.8,
                           seed=seed_by_hand(5, "u-1", 3))
    (engine,) = spy.made
    generator, tok_arg, tools, task, rollout_cfg = engine.args
    assert rollout_cfg == expected_cfg
    assert tok_arg is tok and [t.name for t in tools] == ["search"] and isinstance(task, SearchQATask)
    assert (tools, task) == (loop_mod._SETUPS[(str(assets["config"]), ("rollout.seed=5",))][2],
                             loop_mod._SETUPS[(str(assets["config"]), ("rollout.seed=5",))][1])
    assert engine.kwargs == {"system_prompt": "You answer with the tools.", "prompt_layout": "chat",
                             "atpo_backspace_quirk": True}
    server = generator.server
    assert isinstance(generator, loop_mod.VerlServerGenerator) and generator.tokenizer is tok
    assert server.server_manager is servers and server.top_k == 5
    assert server.eos_token_ids == {tok.eos_token_id, assets["im_end"]}
    assert isinstance(server.loop, asyncio.AbstractEventLoop) and server.loop.is_closed()  # asyncio.run's loop
    # the tree grew in a tree thread, from the row's question under the config's system prompt
    ((kind, thread, prompts, kw),) = engine.calls
    assert kind == "rollout" and kw == {} and thread.startswith("at2po-tree_")
    assert [p.sample for p in prompts] == [SAMPLE]
    assert prompts[0].prompt_ids == render_prompt(tok, f"Question: {QUESTION}", "You answer with the tools.")
    # every request sampled as verl asked
    assert servers.requests
    assert all((r["temperature"], r["top_p"], r["top_k"]) == (0.7, 0.8, 5) for r in servers.requests)

    # the same tree grown by the engine directly, from the same script
    direct_servers = ScriptedServers(tok)

    async def direct():
        srv = loop_mod.VerlServer(direct_servers, asyncio.get_running_loop(), frozenset({tok.eos_token_id}), top_k=5)
        eng = TreeRolloutEngine(loop_mod.VerlServerGenerator(srv, tok), tok, tools, task, expected_cfg,
                                system_prompt="You answer with the tools.")
        return await asyncio.to_thread(eng.rollout, [eng.prompt(SAMPLE)])

    result = asyncio.run(direct())
    assert len(outputs) == expected_cfg.samples_per_tree == len(result.rows) == 4
    for out, ref in zip(outputs, loop_mod.tree_outputs(result)):
        assert out.prompt_ids == ref.prompt_ids == prompts[0].prompt_ids
        assert (out.response_ids, out.response_mask, out.response_logprobs) == (
            ref.response_ids, ref.response_mask, ref.response_logprobs)
        assert out.reward_score == out.extra_fields[loop_mod.LEAF_REWARD] == reward_by_hand(tok, out.response_ids)
        assert out.num_turns == 4, "search, then answer: two turns, each with its tool reply or user message"
        assert out.extra_fields[NODE_PATH] == ref.extra_fields[NODE_PATH] and len(out.extra_fields[NODE_PATH]) == 3
        assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (3, 4)
        assert 0.0 < out.metrics.generate_sequences <= elapsed
        assert out.metrics.tool_calls == 3.0, "three chains (two initial, one expanded) each searched once"
    assert sorted(o.reward_score for o in outputs) != [outputs[0].reward_score] * 4, "the leaves differ in reward"


def test_run_without_sampling_settings_uses_the_configs_and_reports_no_weight_version(tok, assets, spy):
    """verl's sampling params may be empty and the servers may name no weight version; the row may
    carry no uid or session. The at2po config's temperature and top-p are used, top_k is off, the
    seed is the config's mixed with the empty uid and session 0; a prompt of exactly prompt_length
    tokens fits."""
    prompt_ids = render_prompt(tok, f"Question: {QUESTION}", "You answer with the tools.")
    cfg = verl_run_cfg(assets, overrides=(), prompt_length=len(prompt_ids), model="empty")
    servers = QuietServers(tok)
    row = {k: v for k, v in ROW.items() if k not in ("uid", "session_id")}
    outputs = asyncio.run(agent_loop(tok, servers, cfg).run({}, **row))
    (engine,) = spy.made
    rollout_cfg = engine.args[4]
    assert (rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.seed) == (0.9, 0.95, seed_by_hand(0, "", 0))
    assert engine.args[0].server.top_k == -1
    assert engine.args[0].server.eos_token_ids == {tok.eos_token_id}, "no generation config: the tokenizer's EOS"
    assert [c[0] for c in engine.calls] == ["rollout"]
    assert all((r["temperature"], r["top_p"], r["top_k"]) == (0.9, 0.95, -1) for r in servers.requests)
    assert len(outputs) == 4
    assert all(o.extra_fields["min_global_steps"] is o.extra_fields["max_global_steps"] is None for o in outputs)


def test_run_at_temperature_zero_is_one_greedy_chain(tok, assets, spy):
    """verl validates with temperature 0: at2po's validation, one greedy chain, whatever top_k
    (0: off) and with the config's temperature kept (> 0) in the rollout config."""
    servers = ScriptedServers(tok)
    outputs = asyncio.run(agent_loop(tok, servers, verl_run_cfg(assets)).run(
        {"temperature": 0.0, "top_p": 0.7, "top_k": 0}, **ROW))
    (engine,) = spy.made
    assert engine.args[4].temperature == 0.9 and engine.args[0].server.top_k == -1
    assert [c[0] for c in engine.calls] == ["validate", "rollout"]
    assert engine.calls[0][1].startswith("at2po-tree_")
    assert len(servers.requests) == 2, "one chain: search, then answer"
    assert all((r["temperature"], r["top_p"], r["top_k"]) == (0.0, 1.0, -1) for r in servers.requests)
    (out,) = outputs
    assert out.reward_score == reward_by_hand(tok, out.response_ids) == 1.0, "the script's request 1 answers paris"


def test_run_passes_the_prompt_layout_and_the_default_system_prompt(tok, assets, spy):
    """data.prompt_layout=atpo with atpo_backspace_quirk=false and no system prompt of the config's
    own: the engine gets None (the task's prompt) and renders the authors' single system message."""
    asyncio.run(agent_loop(tok, ScriptedServers(tok), verl_run_cfg(assets, config="atpo")).run({}, **ROW))
    (engine,) = spy.made
    assert engine.kwargs == {"system_prompt": None, "prompt_layout": "atpo", "atpo_backspace_quirk": False}
    task = engine.args[3]
    expected = render_messages(tok, task.atpo_messages(SAMPLE, None, backspace_quirk=False))
    assert engine.calls[0][2][0].prompt_ids == expected
    assert expected != render_messages(tok, task.atpo_messages(SAMPLE, None, backspace_quirk=True))


def test_run_refuses_a_prompt_longer_than_verls_prompt_length(tok, assets, spy):
    n = len(render_prompt(tok, f"Question: {QUESTION}", "You answer with the tools."))
    servers = ScriptedServers(tok)
    with pytest.raises(ValueError) as err:
        asyncio.run(agent_loop(tok, servers, verl_run_cfg(assets, prompt_length=n - 1)).run({}, **ROW))
    assert str(err.value) == (f"the tree's prompt has {n} tokens but actor_rollout_ref.rollout.prompt_length={n - 1}: "
                              "raise data.max_prompt_length")
    assert servers.requests == []


def test_run_checks_verls_settings_before_growing(tok, assets, spy):
    cfg = verl_run_cfg(assets)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.n", 4)
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.rollout\.n=4: "):
        asyncio.run(agent_loop(tok, ScriptedServers(tok), cfg).run({}, **ROW))
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.n", 1)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.response_length", 299)
    with pytest.raises(ValueError, match=r"^rollout\.max_response_tokens=300 of the at2po config exceeds"):
        asyncio.run(agent_loop(tok, ScriptedServers(tok), cfg).run({}, **ROW))
    assert spy.made == []


# -- the pieces of run(), one by one -------------------------------------------------------------------
def test_load_tree_setup_reads_verls_at2po_section_once_per_config_and_overrides(assets, fresh_loop_state):
    path = str(assets["config"])
    first = loop_mod.load_tree_setup(OmegaConf.create(
        {"at2po": {"config": path, "overrides": ["rollout.n_initial=3", "tools.search.topk=2"]}}))
    cfg, task, tools = first
    assert (cfg.rollout.n_initial, cfg.tools.search.topk, cfg.rollout.top_k) == (3, 2, 1)
    assert isinstance(task, SearchQATask) and [t.name for t in tools] == list(task.tools) == ["search"]
    # built once per (path, overrides): the search index is not loaded again for the next tree
    again = loop_mod.load_tree_setup(OmegaConf.create(
        {"at2po": {"config": path, "overrides": ["rollout.n_initial=3", "tools.search.topk=2"]}}))
    assert again is first
    other = loop_mod.load_tree_setup(OmegaConf.create(
        {"at2po": {"config": path, "overrides": ["rollout.n_initial=4", "tools.search.topk=2"]}}))
    assert other[0].rollout.n_initial == 4
    other_file = loop_mod.load_tree_setup(OmegaConf.create(
        {"at2po": {"config": str(assets["atpo"]), "overrides": ["rollout.n_initial=3", "tools.search.topk=2"]}}))
    assert (other_file[0].data.prompt_layout, cfg.data.prompt_layout) == ("atpo", "chat")
    # a plain mapping with a tuple of overrides, and none at all
    plain = loop_mod.load_tree_setup({"at2po": {"config": path, "overrides": ("rollout.top_k=2",)}})
    assert (plain[0].rollout.top_k, plain[0].rollout.n_initial) == (2, 2)
    bare = loop_mod.load_tree_setup(OmegaConf.create({"at2po": {"config": path}}))
    assert (bare[0].rollout.top_k, bare[0].rollout.n_initial, bare[0].tools.search.topk) == (1, 2, 1)
    assert len(loop_mod._SETUPS) == 5


def test_load_tree_setup_refuses_the_atpo_environment(assets, fresh_loop_state):
    with pytest.raises(ValueError) as err:
        loop_mod.load_tree_setup(OmegaConf.create(
            {"at2po": {"config": str(assets["config"]), "overrides": ["rollout.env_compat=atpo"]}}))
    assert str(err.value) == ("rollout.env_compat='atpo' is not supported inside verl: its limit notice splits a "
                              "turn's tokens, and verl's estimator reads turns as mask runs; use at2po")
    assert loop_mod._SETUPS == {}


def test_sample_from_row_reads_verls_rows():
    """verl's row: the chat prompt as raw_prompt (a numpy array of messages, or a list), the golds
    nested in reward_model as a numpy array, the index in extra_info (the id)."""
    assert loop_mod.sample_from_row(ROW) == SAMPLE
    listed = {**ROW, "raw_prompt": [dict(m) for m in ROW["raw_prompt"]]}
    assert loop_mod.sample_from_row(listed) == SAMPLE
    # a question column wins over the prompt; the id column over extra_info's index
    assert loop_mod.sample_from_row({**ROW, "question": "Where?", "id": "q9"}) == Sample("q9", "Where?", SAMPLE.target)
    # no index in extra_info: the row's place in verl's batch names it
    no_index = {**ROW, "extra_info": {"split": "train"}}
    assert loop_mod.sample_from_row(no_index) == Sample("verl row 7", QUESTION, SAMPLE.target)
    anonymous = {k: v for k, v in no_index.items() if k != "index"}
    assert loop_mod.sample_from_row(anonymous) == Sample("verl row ?", QUESTION, SAMPLE.target)
    with pytest.raises(ValueError) as err:
        loop_mod.sample_from_row({**ROW, "reward_model": {"style": "rule"}})
    assert str(err.value) == "verl row 7: field 'reward_model.ground_truth.target' is missing"


def test_plain_turns_parquet_values_into_python():
    value = {"a": np.array([np.array([1, 2]), np.array([3])], dtype=object), "b": (np.float32(0.5), [np.int64(4)]),
             "c": np.str_("x")}
    plain = loop_mod._plain(value)
    assert plain == {"a": [[1, 2], [3]], "b": [0.5, [4]], "c": "x"}
    assert type(plain["b"][1][0]) is int and type(plain["c"]) is str and type(plain["a"][0][0]) is int


def test_tree_seed_mixes_the_base_seed_and_the_trees_names():
    cases = [(base, uid, session) for base in (0, 1, 5000) for uid in ("", "u-1", "u-2", "7f3a") for session in (0, 3)]
    seeds = [loop_mod.tree_seed(*c) for c in cases]
    assert seeds == [seed_by_hand(*c) for c in cases]
    assert len(set(seeds)) == len(cases), "every tree of a batch gets its own seed"
    assert all(type(s) is int and 0 <= s < 2**31 for s in seeds)
    assert loop_mod.tree_seed(3, "a", "b/c") == seed_by_hand(3, "a", "b/c") == loop_mod.tree_seed(3, "a/b", "c")
    assert loop_mod.tree_seed(0) == 0 and loop_mod.tree_seed(1) == 1_000_003
    assert loop_mod.tree_seed(0, "u-1") == zlib.crc32(b"u-1") % 2**31


def test_tree_threads_are_one_large_pool_of_named_threads(fresh_loop_state):
    """Not the event loop's default executor (min(32, CPUs + 4) threads): a thread per tree."""
    from concurrent.futures import ThreadPoolExecutor

    pool = loop_mod._tree_threads()
    assert isinstance(pool, ThreadPoolExecutor) and loop_mod._tree_threads() is pool
    assert pool._max_workers >= 256
    assert pool.submit(lambda: threading.current_thread().name).result().startswith("at2po-tree_")


def test_eos_ids_add_the_generation_configs_once_per_process(tok, assets, fresh_loop_state):
    """Qwen3 ends chat turns on <|im_end|>, which only the model's generation config names; read
    once (the class caches it), and without a generation config the tokenizer's EOS alone."""
    with_config = agent_loop(tok, None, verl_run_cfg(assets))
    assert with_config._eos_ids() == frozenset({tok.eos_token_id, assets["im_end"]})
    # cached for the process: another loop (same model in verl) does not read it again
    assert agent_loop(tok, None, verl_run_cfg(assets, model="empty"))._eos_ids() == {tok.eos_token_id, assets["im_end"]}
    forget_eos_ids()
    assert agent_loop(tok, None, verl_run_cfg(assets, model="empty"))._eos_ids() == frozenset({tok.eos_token_id})


class OneReply:
    """A server manager that answers every request with one TokenOutput and records the requests."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        self.requests.append({"request_id": request_id, "prompt_ids": prompt_ids, **sampling_params})
        return self.reply


def generate_in_thread(tok, servers, contexts, params, limits=None, top_k=-1, tokenizer=None):
    async def main():
        server = loop_mod.VerlServer(servers, asyncio.get_running_loop(), frozenset({tok.eos_token_id}), top_k=top_k)
        gen = loop_mod.VerlServerGenerator(server, tokenizer or tok)
        outs = await asyncio.to_thread(gen.generate, contexts, params, limits)
        return outs, gen

    return asyncio.run(main())


def test_requests_carry_the_sampling_settings_vllm_needs(tok):
    servers = OneReply(TokenOutput(token_ids=[5, 6], log_probs=[-0.25, -0.5], stop_reason="completed"))
    params = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=30, stop=("</search>", "</answer>"))
    (out,), _ = generate_in_thread(tok, servers, [(3, 4)], params, top_k=5)
    (request,) = servers.requests
    request_id = request.pop("request_id")
    assert isinstance(request_id, str) and len(request_id) == 32 and int(request_id, 16) >= 0
    assert request == {"prompt_ids": [3, 4], "temperature": 0.7, "top_p": 0.8, "top_k": 5, "max_tokens": 30,
                       "stop": ["</search>", "</answer>"], "include_stop_str_in_output": True,
                       "skip_special_tokens": False, "logprobs": True, "repetition_penalty": 1.0}
    assert (out.token_ids, out.logprobs, out.finish_reason) == ([5, 6], [-0.25, -0.5], "length")
    greedy = replace(params, greedy=True)
    servers.requests = []
    generate_in_thread(tok, servers, [[3], [4]], greedy, [7, 9], top_k=5)
    assert [(r["temperature"], r["top_p"], r["top_k"], r["max_tokens"]) for r in servers.requests] == [
        (0.0, 1.0, -1, 7), (0.0, 1.0, -1, 9)]
    assert len({r["request_id"] for r in servers.requests}) == 2, "one request id per request"


def test_the_servers_weight_versions_are_collected(tok):
    params = SamplingParams(max_new_tokens=4)
    for extra, steps in [({"min_global_steps": 2, "max_global_steps": 5}, [2, 5]), ({"global_steps": 4}, [4]),
                         ({"global_steps": None}, []), ({}, [])]:
        servers = OneReply(TokenOutput(token_ids=[5], log_probs=[-1.0], stop_reason="completed", extra_fields=extra))
        _, gen = generate_in_thread(tok, servers, [[3]], params)
        assert gen.weight_steps == steps, extra


ABORTED = ("verl's LLM server aborted a tree's request (weights were updated mid-rollout?): the at2po_tree agent loop "
           "needs the synchronous trainer mode (trainer.v1.trainer_mode=at2po)")
NO_LOG_PROBS = ("verl's LLM server returned no log-prob per sampled token: the tree's entropy needs them "
                "(actor_rollout_ref.rollout.calculate_log_probs=true)")


@pytest.mark.parametrize("reply, message", [
    (TokenOutput(token_ids=[5], log_probs=[-1.0], stop_reason="aborted"), ABORTED),
    (TokenOutput(token_ids=[5, 6], log_probs=None, stop_reason="completed"), NO_LOG_PROBS),
    (TokenOutput(token_ids=[5, 6], log_probs=[-1.0], stop_reason="completed"), NO_LOG_PROBS),
])
def test_replies_the_tree_cannot_use_are_errors(tok, reply, message):
    with pytest.raises(RuntimeError) as err:
        generate_in_thread(tok, OneReply(reply), [[3]], SamplingParams(max_new_tokens=4))
    assert str(err.value) == message


def test_the_first_stop_string_in_the_text_is_the_one_reported(tok):
    """Several stop strings in one reply: the one that occurs first, not the first listed nor the
    one whose last occurrence is first."""
    text = "<think> x </search> y </answer> z </search>"
    ids = tok.encode(text, add_special_tokens=False)
    servers = OneReply(TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids), stop_reason="completed"))
    (out,), _ = generate_in_thread(tok, servers, [[3]], SamplingParams(stop=("</answer>", "</search>")))
    assert (out.finish_reason, out.stop_string) == ("stop", "</search>")


def test_stop_strings_are_found_in_the_text_as_sampled(tok):
    """Special tokens are kept (a chat model's <|im_end|> can be a stop string) and no clean-up
    of spaces runs, even for a tokenizer that would clean up on decode."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("<think> done", add_special_tokens=False) + [im_end]
    servers = OneReply(TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids), stop_reason="completed"))
    (out,), _ = generate_in_thread(tok, servers, [[3]], SamplingParams(stop=("<|im_end|>",)))
    assert (out.finish_reason, out.stop_string, out.token_ids) == ("stop", "<|im_end|>", ids)

    import copy

    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = tok.encode("<think> why ?", add_special_tokens=False)
    assert cleaning.decode(ids) == "<think> why?", "the tokenizer does clean up by default"
    servers = OneReply(TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids), stop_reason="completed"))
    (out,), _ = generate_in_thread(tok, servers, [[3]], SamplingParams(stop=("why ?",)), tokenizer=cleaning)
    assert (out.finish_reason, out.stop_string) == ("stop", "why ?")


def test_a_tokenizer_without_eos_is_refused():
    from types import SimpleNamespace

    server = loop_mod.VerlServer(None, asyncio.new_event_loop(), frozenset({0}))
    try:
        with pytest.raises(ValueError) as err:
            loop_mod.VerlServerGenerator(server, SimpleNamespace(eos_token_id=None))
        assert str(err.value) == "the tokenizer has no eos_token_id"
        assert loop_mod.VerlServerGenerator(server, SimpleNamespace(eos_token_id=9)).eos_token_id == 9
    finally:
        server.loop.close()


def test_generate_refuses_to_block_the_event_loop(tok):
    """Called on the loop's own thread, generate would wait forever on coroutines that loop must
    run: an error instead (checked before anything is submitted)."""

    async def main():
        server = loop_mod.VerlServer(OneReply(None), asyncio.get_running_loop(), frozenset({0}))
        gen = loop_mod.VerlServerGenerator(server, tok)
        with pytest.raises(RuntimeError) as err:
            gen.generate([[3]], SamplingParams(max_new_tokens=4), [0])
        other = asyncio.new_event_loop()
        try:
            return str(err.value), loop_mod._on_loop_thread(asyncio.get_running_loop()), loop_mod._on_loop_thread(other)
        finally:
            other.close()

    message, on_own, on_other = asyncio.run(main())
    assert message == "VerlServerGenerator.generate blocks: call it from a worker thread, not the event loop's"
    assert (on_own, on_other) == (True, False)
    assert loop_mod._on_loop_thread(asyncio.new_event_loop()) is False, "no running loop in this thread"


def test_tree_outputs_fields_by_hand(tok):
    """Each row's extra fields against what the script did: the root's entropy 0, the repeated
    leaf of a short tree marked, the task's metrics, the tree's sampled tokens and tool calls (all
    of its branches), two verl turns per tree turn; no timing or weight version unless given."""
    result, _, servers = grow_tree(tok, TREE)
    outputs = loop_mod.tree_outputs(result)
    sampled = sum(len(ids) for ids in servers.replies)
    searches = sum(1 for ids in servers.replies if "<search>" in tok.decode(ids))
    assert searches == 3, "two chains and one expansion each search once"
    for out in outputs:
        extra = out.extra_fields
        assert extra[NODE_ENTROPY][0] == 0.0 and len(extra[NODE_ENTROPY]) == 3
        paris = reward_by_hand(tok, out.response_ids)
        assert extra["reward_extra_info"] == {"em": paris, "f1": paris, "format_ok": 1.0}
        assert extra["at2po_tree_generated_tokens"] == sampled
        assert (extra["min_global_steps"], extra["max_global_steps"]) == (None, None)
        assert out.num_turns == 4
        assert (out.metrics.generate_sequences, out.metrics.tool_calls) == (0.0, 3.0)
    # three leaves for four rows: the last row repeats one leaf and is marked
    assert [o.extra_fields["at2po_duplicate"] for o in outputs] == [False, False, False, True]
    assert outputs[3].response_ids in [o.response_ids for o in outputs[:3]]
    timed = loop_mod.tree_outputs(result, 2.5, (1, 2))
    assert all((o.metrics.generate_sequences, o.extra_fields["min_global_steps"], o.extra_fields["max_global_steps"])
               == (2.5, 1, 2) for o in timed)
