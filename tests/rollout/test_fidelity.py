"""Fidelity to the authors' training signal (docs/method.md §6): turns that span several
generation calls, the root as the expansion fallback, tool calls recognised by their stop string,
old log-probs recomputed by the trainer, and the sampler-vs-trainer mismatch metrics."""

import math

import numpy as np
import pytest
import torch

from at2po.agent import AgentProtocol
from at2po.algorithms.expansion import expansion_scores, select_expansion
from at2po.algorithms.losses import logprob_mismatch
from at2po.rollout.engine import RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import HFGenerator
from at2po.training.logprobs import sequence_logprobs
from at2po.tasks.search_qa import SearchQATask
from at2po.tiny import build_tiny_model, synthetic_agent_texts, train_tokenizer
from at2po.tools import LocalSearchTool, PythonTool

from conftest import ANSWER, SEARCH, EchoSearch, ScriptedGenerator, make_prompt


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(200), vocab_size=600)


# -- a turn longer than the chunk size ---------------------------------------------------------------
class ChunkedScript:
    """Writes a planned turn (SEARCH before any result, then ANSWER) a chunk at a time: each call
    continues the current turn's text from where the previous call stopped."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, response, n_results, call):
        turn_so_far = response.rsplit("</result>", 1)[-1] if n_results else response
        plan = (" " + ANSWER.format(a="paris")) if n_results else SEARCH.format(q="long query about paris")
        assert plan.startswith(turn_so_far), (plan, turn_so_far)
        return plan[len(turn_so_far):], -0.5


def test_a_turn_longer_than_the_chunk_stays_one_node_and_one_turn(tok):
    gen = ScriptedGenerator(tok, ChunkedScript(tok))
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], SearchQATask(),
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=1, chunk_tokens=4))
    res = eng.rollout([make_prompt(tok)])
    tree = res.trees[0]
    search_ids = tok.encode(SEARCH.format(q="long query about paris"), add_special_tokens=False)
    # Two turns (search, answer), each one node, although each took several calls of 4 tokens.
    assert len(tree) == 3 and [n.parent for n in tree.nodes] == [-1, 0, 1]
    assert tok.decode(tree.nodes[1].gen_ids) == SEARCH.format(q="long query about paris")
    assert len(tree.nodes[1].gen_ids) >= len(search_ids) > 4
    assert tree.nodes[1].status == "active" and tree.nodes[2].status == "leaf"
    assert res.generation_calls > 2 + 2  # more calls than turns: chunks
    seq = res.rows[0].sequence
    trained_turns = sorted(set(seq.turn_ids[seq.loss_mask == 1].tolist()))
    assert trained_turns == [0, 1]  # one turn id per turn, not per chunk
    assert res.rows[0].score.reward == 1.0 and res.stats[0].tool_calls == 1
    # The tool got the query of the whole turn.
    assert eng.tools["search"].queries == ["long query about paris"]


def test_chunked_turns_of_a_real_model_are_token_in_token_out(tok):
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=1)
    gen = HFGenerator(model, tok, seed=0)
    calls = []
    generate = gen.generate

    def counting(contexts, params, max_new_tokens=None):
        calls.append(list(max_new_tokens))
        return generate(contexts, params, max_new_tokens)

    gen.generate = counting
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], SearchQATask(), RolloutConfig(
        n_initial=2, expansion_rounds=0, samples_per_tree=2, chunk_tokens=5, max_response_tokens=23))
    res = eng.rollout([make_prompt(tok)])
    tree = res.trees[0]
    for leaf in tree.leaves():
        node = tree.nodes[leaf]
        if node.info.get("finish") == "length":  # ran to the response budget: one turn of 23 tokens
            assert tree.depth(leaf) == 1 and len(node.gen_ids) == 23
    # Chunk limits: 5, 5, 5, 5, then what is left of the budget (3).
    assert calls[0] == [5, 5] and min(c for cs in calls for c in cs) >= 1
    # The log-probs of every chunked turn equal a fresh forward pass over the whole turn.
    for row in res.rows:
        seq = row.sequence
        fresh = sequence_logprobs(model, [tree.prompt_ids + seq.response_ids.tolist()], [len(tree.prompt_ids)])[0]
        mask = seq.loss_mask == 1
        np.testing.assert_allclose(fresh.detach().numpy()[mask], seq.old_log_probs[mask], atol=2e-5)
        # and the turn's entropy is the mean NLL of all its chunks' tokens
        for n in seq.path[1:]:
            node = tree.nodes[n]
            assert math.isclose(node.entropy, -float(np.mean(node.gen_logprobs)), rel_tol=1e-12)


# -- the root as fallback --------------------------------------------------------------------------------
def _answer_at_once(ctx, n_results, call):
    return ANSWER.format(a="paris" if call % 2 else "rome"), -0.3


@pytest.mark.parametrize("root_fallback, distinct, duplicates", [(True, 5, 0), (False, 3, 2)])
def test_no_tool_call_still_gives_distinct_leaves_with_the_root_fallback(tok, root_fallback, distinct, duplicates):
    gen = ScriptedGenerator(tok, _answer_at_once)
    cfg = RolloutConfig(n_initial=3, expansion_rounds=1, top_k=2, samples_per_tree=5, root_fallback=root_fallback)
    res = TreeRolloutEngine(gen, tok, [EchoSearch()], SearchQATask(), cfg).rollout([make_prompt(tok)])
    tree = res.trees[0]
    assert len(tree.leaves()) == distinct
    assert len(res.rows) == 5 and sum(r.duplicate for r in res.rows) == duplicates
    # Fresh chains hang under the root and start from the prompt alone.
    assert tree.nodes[0].children == list(range(1, distinct + 1))
    assert all(c == tree.prompt_ids for c in gen.contexts)


def test_root_scores_and_cyclic_fallback():
    # root (0) with 3 chains; node 1 a tool-calling turn with H = 0.8 under the root.
    parent, entropy = [-1, 0, 0, 0], [0.0, 0.8, 0.4, 0.2]
    s = expansion_scores(parent, entropy, alpha=0.05)
    np.testing.assert_allclose(s, [-0.15, 0.65, 0.25, 0.05])
    # One real candidate and the root, K = 3: best first, then reused cyclically.
    assert select_expansion(parent, entropy, [0, 1], 3).tolist() == [1, 0, 1]


# -- a turn that stops on a tool's closing tag is that call ---------------------------------------------
def test_stop_on_a_tool_tag_is_a_tool_call_even_when_answer_is_mentioned(tok):
    protocol = AgentProtocol([LocalSearchTool, PythonTool])
    text = "<think> I will write <answer> later </think> <search> capital of France </search>"
    assert protocol.parse(text).kind == "answer"  # without the stop string: the old reading
    action = protocol.parse(text, stop="</search>")
    assert (action.kind, action.query, action.error) == ("search", "capital of France", None)
    assert protocol.parse("<answer> \\boxed{x} </answer>", stop="</answer>").kind == "answer"

    def script(ctx, n_results, call):
        return (text, -0.2) if n_results == 0 else (" " + ANSWER.format(a="paris"), -0.2)

    tool = EchoSearch()
    res = TreeRolloutEngine(ScriptedGenerator(tok, script), tok, [tool], SearchQATask(),
                            RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=1)).rollout([make_prompt(tok)])
    assert tool.queries == ["capital of France"] and res.stats[0].tool_calls == 1
    assert len(res.trees[0]) == 3


# -- the mismatch metrics on a hand-built case ----------------------------------------------------------
def test_logprob_mismatch_by_hand():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.001, -2.0, -2.9, 7.0], [-0.5, -0.499, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    turn_ids = torch.tensor([[0, 0, 1, -1], [0, 0, -1, -1]])
    m = logprob_mismatch(rollout, trainer, mask, turn_ids, clip_low=3e-3, clip_high=4e-3)
    # |Δ| over the 5 trained tokens: 0.001, 0, 0.1, 0, 0.001 (the masked 7.0 does not count).
    assert m["diff_mean"] == pytest.approx(0.102 / 5, abs=1e-6) and m["diff_max"] == pytest.approx(0.1, abs=1e-6)
    # Turn means: row 0 turn 0 -0.0005 (ratio 0.9995: inside), turn 1 +0.1 (1.105: outside);
    # row 1 turn 0 +0.0005 (inside): 1 of 3 turns.
    assert m["turns_outside_clip"] == pytest.approx(1 / 3)
    empty = logprob_mismatch(rollout, trainer, torch.zeros_like(mask), turn_ids, 3e-3, 4e-3)
    assert empty == {"diff_mean": 0.0, "diff_max": 0.0, "turns_outside_clip": 0.0}


def test_a_chunked_tool_turn_counts_once_towards_the_turn_limit(tok):
    # Turn 1: a long search written in chunks of 4 tokens; turn 2: a short search; turn 3: the answer.
    plans = [SEARCH.format(q="long query about paris"), " " + SEARCH.format(q="q2"), " " + ANSWER.format(a="paris")]

    def script(response, n_results, call):  # every turn is written 4 tokens a call, continued where it stopped
        turn_so_far = response.rsplit("</result>", 1)[-1] if n_results else response
        return plans[n_results][len(turn_so_far):], -0.5

    cfg = RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=1, chunk_tokens=4, max_turns=3)
    res = TreeRolloutEngine(ScriptedGenerator(tok, script), tok, [EchoSearch()], SearchQATask(), cfg).rollout(
        [make_prompt(tok)])
    tree = res.trees[0]
    # Three turns, the third an answer within the limit of 3 (a chunk is not a turn).
    assert [n.status for n in tree.nodes[1:]] == ["active", "active", "leaf"]
    assert res.stats[0].depth == 3 and res.rows[0].score.reward == 1.0
