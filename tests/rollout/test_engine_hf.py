"""Tree rollout end to end: tiny HF model, locally trained tokenizer, real BM25 index, real tool calls."""

import math

import numpy as np
import pytest
import torch

from at2po.agent import decode_ids, render_prompt
from at2po.algorithms.credit import turn_credit
from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.rollout.generator import HFGenerator
from at2po.training.logprobs import sequence_logprobs
from at2po.training.sft import SFTExample, sft_warm_start
from at2po.tiny import build_tiny_model, synthetic_agent_texts, train_tokenizer
from at2po.tools.search import BM25Index, LocalSearchTool, format_passages

CORPUS = [
    "Quovia is a city in Belmark.",
    "Belmark is a country with many rivers.",
    "Drelto is a river that flows through Quovia.",
    "Zorbex was founded by Mila Tarn.",
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, seed=0)
    tool = LocalSearchTool(BM25Index(CORPUS), topk=2)
    question = "Which country is Quovia in?"
    sample = Sample("quovia", question, ("Belmark",))
    prompt_ids = render_prompt(tok, SearchQATask().user_message(sample), PAPER_SYSTEM_PROMPT)
    # A short SFT on one demonstration teaches the tiny model the protocol, so rollouts contain
    # real <search> calls answered by the real BM25 tool.
    obs = tool("Quovia").text
    pieces = [("<think> find Quovia </think> <search> Quovia </search>", " <result>\n" + obs + "\n</result>"),
              ("<think> done </think> <answer> The final answer is \\[ \\boxed{Belmark} \\] </answer>", "")]
    sft_warm_start(model, tok, [SFTExample(prompt_ids, pieces)], steps=60, batch_size=1, lr=1e-2, progress=False)
    return tok, model, tool, Prompt(prompt_ids, sample)


def reference_credit(parent, entropy, reward, eps=1e-6):
    """Eq. 3 written out recursively (entropy_softmax values, "value" advantages): an independent
    reference for the batched triangular solve of at2po.algorithms.credit."""
    n = len(parent)
    children = [[c for c in range(1, n) if parent[c] == i] for i in range(n)]
    leaves = [i for i in range(1, n) if not children[i]]
    rs = [reward[i] for i in leaves]
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))

    def value(i):
        if not children[i]:
            return (reward[i] - mean) / (std + eps)
        ws = [math.exp(entropy[c]) for c in children[i]]
        return sum(w * value(c) for w, c in zip(ws, children[i])) / sum(ws)

    values = [value(i) for i in range(n)]
    return values, [0.0] + values[1:]


def test_tree_rollout_with_real_model_and_tools(setup):
    tok, model, tool, prompt = setup
    gen = HFGenerator(model, tok, seed=1)
    cfg = RolloutConfig(n_initial=4, expansion_rounds=2, top_k=2, samples_per_tree=6, chunk_tokens=40,
                        max_response_tokens=200, temperature=1.0)
    eng = TreeRolloutEngine(gen, tok, [tool], SearchQATask(), cfg)
    res = eng.rollout([prompt, prompt])
    st = res.stats
    assert sum(s.tool_calls for s in st) > 0, "the warm-started model should call the search tool"
    assert sum(s.leaves for s in st) >= 2 * 4
    assert all(sum(1 for r in res.rows if r.tree == t) == 6 for t in range(2))
    # Real BM25 output inside an observation.
    seen = [tok.decode(n.obs_ids) for t in res.trees for n in t.nodes if n.obs_ids]
    assert any(format_passages(["Quovia is a city in Belmark."]).split("\n")[0] in s for s in seen)

    # Old log-probs from the generator = a fresh forward pass over the assembled sequence.
    rows = [r for r in res.rows if not r.duplicate]
    seqs = [res.trees[r.tree].prompt_ids + r.sequence.response_ids.tolist() for r in rows]
    starts = [len(res.trees[r.tree].prompt_ids) for r in rows]
    with torch.no_grad():
        fresh = sequence_logprobs(model, seqs, starts)
    for r, lp in zip(rows, fresh):
        m = r.sequence.loss_mask.astype(bool)
        np.testing.assert_allclose(lp.numpy()[m], r.sequence.old_log_probs[m], atol=2e-5, rtol=1e-5)
    # Every kept leaf carries its row's score: the task's score of the decoded response.
    task = SearchQATask()
    for r in rows:
        tree = res.trees[r.tree]
        assert tree.nodes[r.sequence.leaf].reward == r.score.reward
        response = decode_ids(tok, r.sequence.response_ids.tolist())
        assert task.score(response, prompt.sample, eng.protocol) == r.score
        assert r.score.reward in (-1.0, 0.0, 1.0)
    # Trees go straight into turn-wise credit: the values of Eq. 3 computed by hand.
    for t in range(2):
        parent, entropy, reward = res.credit_arrays(t)
        assert res.trees[t].meta == {"id": "quovia"}
        v, a = turn_credit(parent, entropy, reward)
        ref_v, ref_a = reference_credit(parent.tolist(), entropy.tolist(), reward.tolist())
        np.testing.assert_allclose(v, ref_v, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a, ref_a, rtol=1e-9, atol=1e-12)


def test_validation_is_greedy_and_deterministic(setup):
    tok, model, tool, prompt = setup
    eng = TreeRolloutEngine(HFGenerator(model, tok, seed=5), tok, [tool], SearchQATask(),
                            RolloutConfig(chunk_tokens=40, max_response_tokens=200))
    a = eng.validate([prompt])
    b = eng.validate([prompt])
    assert a.rows[0].sequence.response_ids.tolist() == b.rows[0].sequence.response_ids.tolist()
    assert len(a.rows) == 1 and len(a.trees[0].leaves()) == 1
    assert a.rows[0].score == b.rows[0].score
    assert eng.prompt(prompt.sample).prompt_ids == prompt.prompt_ids
