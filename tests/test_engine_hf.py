"""Tree rollout end to end: tiny HF model, locally trained tokenizer, real BM25 index, real tool calls."""

import numpy as np
import pytest
import torch

from at2po.agent import render_prompt
from at2po.algorithms.credit import turn_credit
from at2po.rewards import qa_reward
from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import HFGenerator, sequence_logprobs
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
    prompt_ids = render_prompt(tok, question)
    # A short SFT on one demonstration teaches the tiny model the protocol, so rollouts contain
    # real <search> calls answered by the real BM25 tool.
    obs = tool("Quovia").text
    pieces = [("<think> find Quovia </think> <search> Quovia </search>", " <result>\n" + obs + "\n</result>"),
              ("<think> done </think> <answer> The final answer is \\[ \\boxed{Belmark} \\] </answer>", "")]
    sft_warm_start(model, tok, [SFTExample(prompt_ids, pieces)], steps=60, batch_size=1, lr=1e-2, progress=False)
    return tok, model, tool, Prompt(prompt_ids, ["Belmark"], question)


def test_tree_rollout_with_real_model_and_tools(setup):
    tok, model, tool, prompt = setup
    gen = HFGenerator(model, tok, seed=1)
    cfg = RolloutConfig(n_initial=4, expansion_rounds=2, top_k=2, samples_per_tree=6, max_turn_tokens=40,
                        max_response_tokens=200, temperature=1.0)
    eng = TreeRolloutEngine(gen, tok, {"search": tool}, qa_reward, cfg)
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
    # Trees go straight into turn-wise credit.
    for t in range(2):
        v, a = turn_credit(*res.credit_arrays(t))
        assert np.isfinite(a).all()


def test_validation_is_greedy_and_deterministic(setup):
    tok, model, tool, prompt = setup
    eng = TreeRolloutEngine(HFGenerator(model, tok, seed=5), tok, {"search": tool}, qa_reward,
                            RolloutConfig(max_turn_tokens=40, max_response_tokens=200))
    a = eng.validate([prompt])
    b = eng.validate([prompt])
    assert a.rows[0].sequence.response_ids.tolist() == b.rows[0].sequence.response_ids.tolist()
    assert len(a.rows) == 1 and len(a.trees[0].leaves()) == 1
