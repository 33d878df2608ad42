"""Tree rollout engine driven by a scripted generator (pins tree shapes exactly)."""

import math
import random
import time

import numpy as np
import pytest

from at2po.agent import TOOL_LIMIT_MESSAGE, render_prompt
from at2po.algorithms.credit import turn_credit
from at2po.rollout.engine import RolloutConfig, TreeRolloutEngine
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import synthetic_agent_texts, train_tokenizer
from at2po.tools.base import Tool, ToolResult
from at2po.algorithms.tree import ACTIVE, FAILED, LEAF
from at2po.rollout.generator import Generation
from conftest import ANSWER, SEARCH, EchoSearch, ScriptedGenerator, StreamQueue
from conftest import make_prompt as prompt

qa_reward = SearchQATask()  # the task whose score was the old qa_reward (EM, -1 on bad format)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(200), vocab_size=600)


def test_tree_shape_selection_and_sibling_state(tok):
    # Initial chain i (call i = 0,1,2) searches with entropy H = 0.5, 2.0, 1.0, then answers.
    entropies = {0: 0.5, 1: 2.0, 2: 1.0}

    def script(ctx, n_results, call):
        if n_results == 0:
            h = entropies.get(call, 0.1)
            return SEARCH.format(q=f"q{call}"), -h
        return ANSWER.format(a="paris" if call % 2 else "rome"), -0.2

    gen = ScriptedGenerator(tok, script)
    tool = EchoSearch()
    cfg = RolloutConfig(n_initial=3, expansion_rounds=1, top_k=2, samples_per_tree=0, alpha=0.05)
    eng = TreeRolloutEngine(gen, tok, [tool], qa_reward, cfg)
    p = prompt(tok)
    res = eng.rollout([p])
    tree = res.trees[0]
    # Initial phase: turn 1 of three chains (nodes 1-3), then their answers (4-6).
    assert [n.parent for n in tree.nodes[:7]] == [-1, 0, 0, 0, 1, 2, 3]
    assert [n.status for n in tree.nodes[1:7]] == [ACTIVE] * 3 + [LEAF] * 3
    # Expansion picks the two highest-entropy turns (all share the root: same penalty): 2 then 3.
    assert [n.parent for n in tree.nodes[7:9]] == [0, 0]
    # Siblings re-sample from exactly the selected node's state: the prompt, no observation.
    sib_contexts = gen.contexts[6:8]
    assert sib_contexts == [tree.context_ids(2), tree.context_ids(3)] == [p.prompt_ids, p.prompt_ids]
    assert all(tree.nodes[i].tool_calls_at_start == 0 for i in (7, 8))
    # Each sibling continues to a leaf: search turn, then answer.
    assert len(tree.leaves()) == 5 and len(res.rows) == 5
    assert tool.queries[:3] == ["q0", "q1", "q2"]
    # Tool counts along a path.
    assert tree.nodes[4].tool_calls_at_start == 1 and tree.nodes[1].tool_calls_at_start == 0
    # Leaf row arrays: obs masked, turn ids 0/1, token_node points at the path.
    row = next(r for r in res.rows if r.sequence.leaf == 4)
    s = row.sequence
    n1, n4 = tree.nodes[1], tree.nodes[4]
    assert s.response_ids.tolist() == n1.gen_ids + n4.obs_ids + n4.gen_ids
    assert s.loss_mask.tolist() == [1] * len(n1.gen_ids) + [0] * len(n4.obs_ids) + [1] * len(n4.gen_ids)
    assert set(s.turn_ids[s.loss_mask == 1].tolist()) == {0, 1}
    assert (s.turn_ids[s.loss_mask == 0] == -1).all()
    assert tok.decode(n4.obs_ids) == " <result>\nPage 1: facts about q0\n</result>"
    np.testing.assert_allclose(s.old_log_probs[s.loss_mask == 1][: len(n1.gen_ids)], -0.5)
    # Rewards: chain from call 0 answered at call 3 (odd → paris → EM 1).
    assert tree.nodes[4].reward == 1.0 and row.score.metrics["em"] == 1.0
    st = res.stats[0]
    assert st.tool_calls == 5 and st.tool_failures == 0 and st.depth == 2 and st.leaves == 5
    assert st.generated_tokens == sum(len(n.gen_ids) for n in tree.nodes)
    parent, entropy, reward = res.credit_arrays(0)
    # Nodes 7, 8 re-sample turns 2, 3 (calls 6, 7: H = 0.1) and answer at calls 8 (rome), 9 (paris);
    # every answer turn has H = 0.2.
    assert parent.tolist() == [-1, 0, 0, 0, 1, 2, 3, 0, 0, 7, 8]
    np.testing.assert_allclose(entropy, [0.0, 0.5, 2.0, 1.0, 0.2, 0.2, 0.2, 0.1, 0.1, 0.2, 0.2])
    np.testing.assert_array_equal(reward, [np.nan] * 4 + [1.0, 0.0, 1.0] + [np.nan] * 2 + [0.0, 1.0])
    assert [r.score.reward for r in sorted(res.rows, key=lambda r: r.sequence.leaf)] == [1.0, 0.0, 1.0, 0.0, 1.0]
    v, a = turn_credit(parent, entropy, reward)
    # By hand (docs/method.md §3): leaf rewards 1,0,1,0,1 -> mean 0.6, population std sqrt(0.24);
    # every non-root turn has one child, so it takes its leaf's value; the root mixes its five
    # children with softmax(H) weights.
    hi, lo = 0.4 / (math.sqrt(0.24) + 1e-6), -0.6 / (math.sqrt(0.24) + 1e-6)
    leaf_of_child = [hi, lo, hi, lo, hi]  # root children 1, 2, 3, 7, 8
    w = np.exp([0.5, 2.0, 1.0, 0.1, 0.1])
    root = float(np.dot(w / w.sum(), leaf_of_child))
    expected_v = [root, hi, lo, hi, hi, lo, hi, lo, hi, lo, hi]
    np.testing.assert_allclose(v, expected_v, rtol=1e-9)
    np.testing.assert_allclose(a, [0.0, *expected_v[1:]], rtol=1e-9)
    assert res.generation_calls == 4  # two turns per phase, every tree batched together


def test_every_generation_call_batches_all_trees(tok):
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q="x"), -1.0) if k < 2 else (ANSWER.format(a="x"), -1.0))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=2, expansion_rounds=2, top_k=3, samples_per_tree=0))
    res = eng.rollout([prompt(tok, "a"), prompt(tok, "b"), prompt(tok, "c")])
    # 3 turns per trajectory; initial phase 3 calls; each expansion 3 calls (siblings of turn-1
    # or turn-2 nodes need <= 3 turns): at most 9 calls in all, each holding all trees' chains.
    assert res.generation_calls <= 9
    assert len(gen.contexts) == sum(len(t) - 1 for t in res.trees)
    assert all(len(t.leaves()) == 2 + 2 * 3 for t in res.trees)


def test_samples_per_tree_prunes_and_duplicates(tok):
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q="x"), -1.0) if k < 1 else (ANSWER.format(a="x"), -1.0))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=4, expansion_rounds=1, top_k=3, samples_per_tree=5, seed=1))
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert res.stats[0].leaves == 7 and len(tree.leaves()) == 5 and len(res.rows) == 5
    parent, _, reward = tree.to_arrays()
    assert (parent[1:] < np.arange(1, len(parent))).all()
    # Too few leaves: the last one is repeated, flagged, and credit still sees 2 leaves.
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=2, expansion_rounds=0, samples_per_tree=5))
    res = eng.rollout([prompt(tok)])
    assert len(res.rows) == 5 and [r.duplicate for r in res.rows] == [False, False, True, True, True]
    assert len(res.trees[0].leaves()) == 2


def test_tool_call_limit_gives_masked_notice(tok):
    def script(ctx, k, n):
        if TOOL_LIMIT_MESSAGE in ctx:
            return ANSWER.format(a="x"), -1.0
        return SEARCH.format(q=f"q{k}"), -1.0

    gen = ScriptedGenerator(tok, script)
    tool = EchoSearch()
    eng = TreeRolloutEngine(gen, tok, [tool], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, max_tool_calls=2, samples_per_tree=0))
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert tool.queries == ["q0", "q1"]
    assert res.stats[0].tool_calls == 2 and res.stats[0].limit_notices == 1
    # Turns: search, search, search (limit), answer.
    assert [n.tool_calls_at_start for n in tree.nodes[1:]] == [0, 1, 2, 2]
    notice = tree.nodes[4].obs_ids
    assert TOOL_LIMIT_MESSAGE in tok.decode(notice)
    s = res.rows[0].sequence
    assert res.rows[0].score.metrics["format_ok"] == 1.0, res.rows[0].score.reason
    assert s.loss_mask[-len(tree.nodes[4].gen_ids) - len(notice):-len(tree.nodes[4].gen_ids)].sum() == 0


class RaisingTool(Tool):
    name = "search"

    def run(self, query):
        raise RuntimeError("index exploded")


class SlowTool(Tool):
    name = "search"

    def run(self, query):
        time.sleep(5)
        return ToolResult("late", ok=True)


@pytest.mark.parametrize("tool, expect", [(RaisingTool(), "index exploded"), (SlowTool(), "timed out")])
def test_failing_tools_become_observations(tok, tool, expect):
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q="x"), -1.0) if k < 1 else (ANSWER.format(a="x"), -1.0))
    eng = TreeRolloutEngine(gen, tok, [tool], qa_reward,
                            RolloutConfig(n_initial=2, expansion_rounds=0, samples_per_tree=0, tool_timeout=0.3))
    t0 = time.perf_counter()
    res = eng.rollout([prompt(tok)])
    assert time.perf_counter() - t0 < 3
    assert res.stats[0].tool_failures == 2
    obs = tok.decode(res.trees[0].nodes[3].obs_ids)
    assert expect in obs and obs.startswith(" <result>")
    assert all(r.score.metrics["format_ok"] == 1.0 for r in res.rows)


GARBAGE = [
    "<search> unclosed query and then nothing",
    "<search>   </search>",  # empty query -> error observation
    "<search><search> nested </search>",
    "<search> " + "x" * 100_000 + " </search>",
    "</search>",
    "<answer> no box </answer>",
    "\ufffd\ufffd\x00\x01 binary",
    "",
]


@pytest.mark.parametrize("text", GARBAGE)
def test_malformed_output_never_crashes(tok, text):
    def script(ctx, k, n):
        return (text, -3.0) if k == 0 else (ANSWER.format(a="x"), -1.0)

    tool = EchoSearch()
    gen = ScriptedGenerator(tok, script)
    eng = TreeRolloutEngine(gen, tok, [tool], qa_reward,
                            RolloutConfig(n_initial=2, expansion_rounds=1, top_k=2, samples_per_tree=4, chunk_tokens=64))
    res = eng.rollout([prompt(tok)])
    assert len(res.rows) == 4
    for q in tool.queries:
        assert len(q) <= 2000
    for row in res.rows:
        assert row.sequence.loss_mask.sum() > 0 or text == ""


def test_invalid_utf8_token_ids(tok):
    # Raw byte tokens that do not form valid UTF-8 on their own.
    byte_ids = tok.convert_tokens_to_ids(["Ã", "Ĥ"])  # byte-level pieces of broken sequences
    gen = ScriptedGenerator(tok, lambda c, k, n: (byte_ids * 5, -2.0))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=2, expansion_rounds=0, samples_per_tree=0))
    res = eng.rollout([prompt(tok)])
    assert all(r.score.reward == -1.0 for r in res.rows)


def test_call_of_a_disabled_tool_is_plain_text(tok):
    # Only search is enabled: "<python>" is plain text, "</python>" no stop string, so the turn
    # runs on to its end (EOS here) and the trajectory ends there (no tool call, no error observation).
    gen = ScriptedGenerator(tok, lambda c, k, n: ("<python> print(1) </python>", -1.0) if k < 1 else (ANSWER.format(a="x"), -1.0))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0))
    assert eng.protocol.stop_strings == ("</search>", "</answer>")
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert len(tree) == 2 and tree.nodes[1].status == LEAF
    assert tree.nodes[1].info == {"finish": "eos", "action": "none", "end": "eos"}
    assert res.stats[0].tool_calls == 0 and res.stats[0].tool_failures == 0
    assert gen.n == 1
    score = res.rows[0].score
    assert (score.reward, score.reason) == (-1.0, "missing <think>...</think>")


class EchoPython(Tool):
    name = "python"
    max_input_chars = 20000
    dedent_input = True

    def __init__(self):
        self.queries = []

    def run(self, query):
        self.queries.append(query)
        return ToolResult(f"ran {query}", ok=True)


def test_enabled_python_tool_is_called(tok):
    gen = ScriptedGenerator(tok, lambda c, k, n: ("<think> c </think> <python>\n  print(1)\n</python>", -1.0) if k < 1 else (ANSWER.format(a="x"), -1.0))
    python = EchoPython()
    eng = TreeRolloutEngine(gen, tok, [EchoSearch(), python], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0))
    assert eng.protocol.stop_strings == ("</search>", "</python>", "</answer>")
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert python.queries == ["print(1)"]  # dedented and stripped
    assert tok.decode(tree.nodes[2].obs_ids) == " <result>\nran print(1)\n</result>"
    assert tree.nodes[1].info["action"] == "python" and tree.nodes[1].info["tool_ok"] is True
    assert res.stats[0].tool_calls == 1 and res.stats[0].tool_failures == 0
    assert res.rows[0].score.metrics["format_ok"] == 1.0, res.rows[0].score.reason


def test_engine_prompt_and_tree_meta(tok):
    gen = ScriptedGenerator(tok, lambda c, k, n: (ANSWER.format(a="paris"), -0.1))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0))
    assert eng.system_prompt == PAPER_SYSTEM_PROMPT  # SearchQATask.system_prompt of [search]
    s = Sample("row-7", "  Who? ", ("paris",), {"hops": 2})
    p = eng.prompt(s)
    assert p.sample is s
    assert p.prompt_ids == render_prompt(tok, "Question: Who?", PAPER_SYSTEM_PROMPT)
    assert p.prompt_ids == prompt(tok).prompt_ids
    res = eng.rollout([p])
    assert res.trees[0].meta == {"id": "row-7"}
    assert res.rows[0].score.reward == 1.0 and res.rows[0].score.answer == "paris"
    # An explicit system prompt replaces the task's.
    custom = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, system_prompt="Be brief.")
    assert custom.prompt(s).prompt_ids == render_prompt(tok, "Question: Who?", "Be brief.")
    # Without tools the task's generic prompt is used and only </answer> stops a turn.
    bare = TreeRolloutEngine(gen, tok, [], qa_reward)
    assert bare.protocol.stop_strings == ("</answer>",)
    assert bare.system_prompt == qa_reward.system_prompt([]) != PAPER_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="two enabled tools"):
        TreeRolloutEngine(gen, tok, [EchoSearch(), EchoSearch()], qa_reward)


def test_budget_and_turn_limits(tok):
    # Never answers: max_turns ends the trajectory as a failed leaf.
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q="x"), -1.0))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0, max_turns=3, max_tool_calls=10))
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert len(tree) == 4 and tree.nodes[3].status == FAILED and res.rows[0].score.reward == -1.0
    # A tiny response budget: generation is cut ("length") and the trajectory ends.
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0, max_response_tokens=12))
    res = eng.rollout([prompt(tok)])
    for r in res.rows:
        assert len(r.sequence.response_ids) <= 12 + 40  # the observation may overshoot, never a new turn
    tree = res.trees[0]
    assert all(n.is_terminal or n.children for n in tree.nodes[1:])


def test_validate_is_greedy_single_chain(tok):
    gen = ScriptedGenerator(tok, lambda c, k, n: (ANSWER.format(a="paris"), -0.1))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, RolloutConfig())
    res = eng.validate([prompt(tok), prompt(tok, golds=("rome",))])
    assert gen.greedy_flags == [True]
    assert [r.score.metrics["em"] for r in res.rows] == [1.0, 0.0]
    assert len(res.rows) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="rollout.n_initial"):
        RolloutConfig(n_initial=0)
    with pytest.raises(ValueError, match="rollout.expansion_mode"):
        RolloutConfig(expansion_mode="greedy")
    with pytest.raises(ValueError, match="rollout.top_k"):
        RolloutConfig(top_k=-1)
    from at2po import config

    assert RolloutConfig is config.RolloutConfig  # lives in at2po.config, re-exported by the engine
    assert RolloutConfig().backend == "hf"


def test_async_schedule_keeps_tree_semantics_and_fills_batches(tok):
    # Tree "a": 3-turn chains, highest entropy on the first turn, so its expansions are long.
    # Tree "b": 5-turn chains, highest entropy on the last search, so its expansions are short.
    # With the barrier ("sync") every phase lasts as long as its slowest tree: 5 + 3 + 3 calls.
    # "async" lets each tree run its own phases back to back: max(3+3+3, 5+2+2) = 9 calls.
    def script(full, k):
        a = "Question: a" in full
        searches = 2 if a else 4
        hot = 0 if a else searches - 1
        if k < searches:
            return SEARCH.format(q=f"q{k}"), -2.0 if k == hot else -0.5
        return ANSWER.format(a="x"), -1.0

    def run(schedule):
        gen = ScriptedGenerator(tok, None)

        def generate(contexts, params, max_new_tokens=None):
            outs = []
            for c, m in zip(contexts, max_new_tokens):
                full = tok.decode(c)
                gen.script = lambda resp, k, n: script(full, k)
                outs += ScriptedGenerator.generate(gen, [c], params, [m])
            return outs

        gen.generate = generate
        eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward,
                                RolloutConfig(n_initial=2, expansion_rounds=2, top_k=2, samples_per_tree=0,
                                              max_tool_calls=10, schedule=schedule))
        return eng.rollout([prompt(tok, "a"), prompt(tok, "b")])

    sync, asyn = run("sync"), run("async")
    for t in range(2):
        assert [n.parent for n in sync.trees[t].nodes] == [n.parent for n in asyn.trees[t].nodes]
        assert [n.gen_ids for n in sync.trees[t].nodes] == [n.gen_ids for n in asyn.trees[t].nodes]
    assert (sync.generation_calls, asyn.generation_calls) == (11, 9)
    assert len(asyn.stats[0].phase_end_seconds) == 3  # initial, expand 1, expand 2


def test_an_empty_length_generation_ends_the_turn(tok):
    """A backend that cannot add a token (the context fills its model length, e.g. vLLM's
    max_model_len) returns an empty "length" generation: the turn ends instead of being
    continued forever. Script: one search turn, then nothing."""
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q="x"), -1.0) if k == 0 else ([], -1.0))
    real = gen.generate
    gen.generate = lambda ctxs, params, max_new_tokens=None: [
        g if g.token_ids != [gen.eos_token_id] else type(g)([], [], "length") for g in real(ctxs, params, max_new_tokens)]
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, RolloutConfig(n_initial=2, expansion_rounds=0,
                                                                             samples_per_tree=0))
    res = eng.rollout([prompt(tok)])
    assert res.generation_calls == 2
    tree = res.trees[0]
    assert len(tree) == 5 and all(tree.nodes[n].gen_ids == [] for n in tree.leaves())
    assert all(tree.nodes[n].info["end"] == "length" for n in tree.leaves())


def test_the_stream_schedule_needs_a_streaming_backend(tok):
    """schedule=stream with a backend that only generates in batches (the hf backend, these
    scripted doubles) is a configuration error naming the fix, at construction and per call."""
    gen = ScriptedGenerator(tok, lambda c, k, n: (ANSWER.format(a="x"), -1.0))
    with pytest.raises(ValueError, match=r"rollout.schedule=stream needs .*rollout.backend=vllm.*set rollout.schedule=async"):
        TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, RolloutConfig(schedule="stream"))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, RolloutConfig(n_initial=1, expansion_rounds=0))
    with pytest.raises(ValueError, match="rollout.schedule=stream needs"):
        eng.rollout([prompt(tok)], config=RolloutConfig(schedule="stream"))
    with pytest.raises(ValueError, match="not one of async, sync, stream"):
        RolloutConfig(schedule="streaming")


class ShuffledStream(StreamQueue):
    """A scripted backend whose turn depends on the context alone (the same context, the same
    turn: like greedy decoding, so a tree's trajectories tie and node numbers decide), cut at the
    call's limit and continued from where it was cut, with the streaming interface: each
    ``step`` returns a random subset of the requests in flight, in a random order, so turns
    finish in another order than in a batched call."""

    def __init__(self, tok, by_context, seed=0):
        self.tok, self.by_context, self.eos_token_id = tok, by_context, tok.eos_token_id
        self.rest = {}  # context after a cut turn -> (the turn's remaining ids, log-prob, stop string)
        self.pending, self.chance = [], random.Random(seed)

    def _turn(self, ctx, params):
        full = self.tok.decode(ctx)
        question = full.rsplit("Question: ", 1)[1][0]
        response = full.split("<|im_start|>assistant\n", 1)[-1]
        text, lp = self.by_context(question, response, response.count("<result>"))
        stop = next((s for s in params.stop if text.endswith(s)), None)
        ids = self.tok.encode(text, add_special_tokens=False)
        return (ids if stop else ids + [self.eos_token_id]), lp, stop

    def _one(self, ctx, params, limit):
        ids, lp, stop = self.rest.get(tuple(ctx)) or self._turn(ctx, params)
        if len(ids) > limit:
            self.rest[tuple(ctx) + tuple(ids[:limit])] = (ids[limit:], lp, stop)
            return Generation(ids[:limit], [lp] * limit, "length")
        return Generation(ids, [lp] * len(ids), "stop" if stop else "eos", stop)

    def generate(self, contexts, params, max_new_tokens=None):
        return [self._one(c, params, m) for c, m in zip(contexts, max_new_tokens or [params.max_new_tokens] * len(contexts))]

    def submit(self, key, context, params, max_new_tokens, seed=None):
        self.pending.append((key, context, params, max_new_tokens))

    def step(self):
        self.chance.shuffle(self.pending)
        k = self.chance.randint(0, len(self.pending))
        done, self.pending = self.pending[:k], self.pending[k:]
        return [(key, self._one(c, p, m)) for key, c, p, m in done]


class JitteryEcho(EchoSearch):
    """EchoSearch with a random latency of 0-5 ms per call, so tool calls return out of order."""

    def __init__(self, seed):
        super().__init__()
        self.jitter = random.Random(seed)

    def run(self, query):
        time.sleep(self.jitter.random() * 0.005)
        return super().run(query)


def test_stream_builds_the_trees_async_builds_whatever_the_completion_order(tok):
    """Four trees that meet every case of a turn: tool calls, a turn longer than the chunk size
    (continued), a malformed call (error observation), the tool-call limit (masked notice), the
    turn limit, and a tree that stops on its response budget. Streamed with requests and tool
    calls finishing in random orders, every tree is the async one node for node, rows included."""
    def by_context(question, response, n_results):
        h = -0.3 - 0.2 * n_results  # turns of the same depth tie: node numbers break the tie
        if question == "a":  # two searches, then an answer
            return (SEARCH.format(q=f"a{n_results}"), h) if n_results < 2 else (ANSWER.format(a="x"), -0.4)
        if question == "b":  # long turns, cut at chunk_tokens; the third call gets the limit notice
            if TOOL_LIMIT_MESSAGE in response:
                return ANSWER.format(a="y"), -0.2
            return "<think> " + "long thought " * 6 + "</think> " + SEARCH.format(q=f"b{n_results}"), h
        if question == "c":  # an empty query first (an error observation), then an answer
            return (SEARCH.format(q=" "), h) if n_results == 0 else (ANSWER.format(a="z"), -0.5)
        if question == "d":  # searches forever: the turn limit ends it
            return SEARCH.format(q=f"d{n_results}"), h
        if question == "f":  # search, malformed search, answer; expanding both turns in one round
            # puts a sibling whose call fails (no tool) after siblings waiting on the tool
            return [("<search> f </search>", -1.0), ("<search> </search>", -0.3), (ANSWER.format(a="f"), -0.2)][n_results]
        return "<think> " + "on and on " * 100, -0.1  # "e": no stop, over the response budget

    cfg = dict(n_initial=3, expansion_rounds=2, top_k=4, samples_per_tree=0, chunk_tokens=12, max_tool_calls=2,
               max_turns=4, max_response_tokens=300, seed=4)
    prompts = [prompt(tok, q) for q in "abcdef"]

    renumbered = []

    def run(gen, schedule, tool):
        engine = TreeRolloutEngine(gen, tok, [tool], qa_reward, RolloutConfig(schedule=schedule, **cfg))
        if schedule == "async":
            # The numbering by request order is the order in which batched calls create nodes:
            # there, renumbering a finished phase leaves every node where it is.
            phase_over = engine._phase_over

            def checked(tree, t):
                before = list(tree.nodes)
                phase_over(tree, t)
                renumbered.append(tree.nodes != before)

            engine._phase_over = checked
        res = engine.rollout(prompts)
        trees = [[(n.parent, n.obs_ids, n.gen_ids, n.gen_logprobs, n.status, n.info) for n in t.nodes] for t in res.trees]
        rows = [(r.tree, r.sequence.response_ids.tolist(), r.score.reward, r.duplicate) for r in res.rows]
        keys = ("generated_tokens", "prefill_tokens", "tool_calls", "tool_failures", "limit_notices", "depth", "leaves")
        stats = [[getattr(s, k) for k in keys] for s in res.stats]
        return trees, rows, stats, res

    batched = run(ShuffledStream(tok, by_context), "async", EchoSearch())
    assert len(renumbered) == 6 * 3 and not any(renumbered)
    trees, _, stats, res = batched
    assert [len(s.phase_end_seconds) for s in res.stats] == [3] * 6
    assert stats[1][4] > 0 and stats[2][3] > 0  # limit notices (b), a malformed call (c)
    assert any(n.info.get("end", "").startswith("turn limit") for n in res.trees[3].nodes)
    assert any(len(n.gen_ids) > cfg["chunk_tokens"] for n in res.trees[1].nodes)  # continued turns
    assert all(n.info.get("end") == "length" for n in res.trees[4].nodes[1:])
    for seed in range(3):
        gen = ShuffledStream(tok, by_context, seed=seed)
        streamed = run(gen, "stream", JitteryEcho(seed))
        assert streamed[:3] == batched[:3]
        assert streamed[3].generation_calls > batched[3].generation_calls  # engine steps, some returning nothing


def test_stream_and_async_keep_to_a_response_budget_smaller_than_two_chunks(tok):
    """Pins the stream schedule's request limit: each request may generate at most what is left
    of the trajectory's response budget, not a whole chunk (a stream schedule asking for
    chunk_tokens whatever remains survived every other test, whose budgets are whole numbers of
    chunks). A 50-token budget with 40-token chunks: a long first turn is cut at 40 and continued
    for 10 more, a search's observation leaves less than a chunk for the answer; every row ends
    within the budget, and streamed trees equal the async ones node for node."""
    def by_context(question, response, n_results):
        if question == "e":  # a turn that never stops: the budget ends it
            return "<think> " + "on and on " * 40, -0.1
        if question == "s":  # one search, then a long answer the remaining budget cuts
            return (SEARCH.format(q="s"), -0.5) if n_results == 0 else ("<think> " + "so " * 60 + "</think>", -0.2)
        return ANSWER.format(a="x"), -0.3

    cfg = dict(n_initial=2, expansion_rounds=1, top_k=1, samples_per_tree=0, chunk_tokens=40, max_tool_calls=2,
               max_turns=4, max_response_tokens=50, seed=2)
    prompts = [prompt(tok, q) for q in "esx"]

    def run(schedule, seed=0):
        engine = TreeRolloutEngine(ShuffledStream(tok, by_context, seed=seed), tok, [EchoSearch()], qa_reward,
                                   RolloutConfig(schedule=schedule, **cfg))
        res = engine.rollout(prompts)
        for row in res.rows:
            assert len(row.sequence.response_ids) <= cfg["max_response_tokens"], (schedule, row.tree)
        trees = [[(n.parent, n.obs_ids, n.gen_ids, n.status, n.info) for n in t.nodes] for t in res.trees]
        return trees, [(r.tree, r.sequence.response_ids.tolist()) for r in res.rows], res

    trees, rows, res = run("async")
    lengths = {tree: len(ids) for tree, ids in rows}
    assert lengths[0] == 50 and lengths[1] == 50  # both long cases end exactly on the budget
    assert any(len(n.gen_ids) < cfg["chunk_tokens"] and n.parent > 0 for n in res.trees[1].nodes)  # after the search
    for seed in range(3):
        streamed_trees, streamed_rows, _ = run("stream", seed)
        assert (streamed_trees, streamed_rows) == (trees, rows)


def test_an_interrupted_stream_rollout_leaves_nothing_in_flight(tok):
    """A rollout stopped by an exception (here from the progress callback, as Ctrl-C would)
    aborts its requests, so that none of their results reaches the next rollout."""
    gen = ShuffledStream(tok, lambda q, response, k: (SEARCH.format(q="x"), -1.0) if k < 2 else (ANSWER.format(a="x"), -1.0))
    calls = []

    def progress(phase, step, open_trajectories):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    cfg = RolloutConfig(n_initial=3, expansion_rounds=1, top_k=2, samples_per_tree=0, schedule="stream")
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], qa_reward, cfg, progress=progress)
    with pytest.raises(KeyboardInterrupt):
        eng.rollout([prompt(tok, "a")])
    assert gen.unfinished() == 0
    eng.progress = None
    again = eng.rollout([prompt(tok, "a")])
    fresh = TreeRolloutEngine(ShuffledStream(tok, gen.by_context), tok, [EchoSearch()], qa_reward, cfg).rollout([prompt(tok, "a")])
    assert [n.gen_ids for n in again.trees[0].nodes] == [n.gen_ids for n in fresh.trees[0].nodes]
