"""Generator paths that tests/rollout/test_generator.py does not reach with the stock tiny model:
other forward signatures (transformers 4's ``past_key_values`` without ``logits_to_keep``, the
``cache`` name of later transformers 5 releases), wrapped and checkpointing models, how contexts
are grouped into forward passes, and the small helpers (EOS set, shared prefix, backend registry).

Forward passes are observed with a forward hook on the tiny model: the batch shape of each call
says which rows shared a chunk and whether a shared prefix ran on its own.
"""

import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

import at2po.rollout.generator as generator_module
from at2po.rollout.generator import (
    FINISH_STOP,
    HFGenerator,
    SamplingParams,
    forward_kwargs,
    _StopChecker,
    common_prefix_length,
    eos_token_set,
)
from at2po.training.logprobs import sequence_logprobs
from at2po.tiny import build_tiny_model, synthetic_agent_texts, train_tokenizer

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(300))


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, arch="qwen2", hidden_size=32, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, seed=0)


@pytest.fixture
def calls(model):
    """Shapes of the ``input_ids`` of every forward call of ``model`` while the test runs."""
    shapes = []
    hook = model.register_forward_hook(
        lambda mod, args, kwargs, out: shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    yield shapes
    hook.remove()


def call_inner(inner, cache, **kwargs):
    """Run the stock tiny model with ``cache`` under whichever name the installed transformers
    gives its KV-cache argument (``past_key_values``, or ``cache`` in later 5.x releases), and
    return its logits and cache: the fakes below keep their own signature whatever is installed."""
    name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    out = inner(**kwargs, **{name: cache})
    return out.logits, getattr(out, name)


class LegacyLM(torch.nn.Module):
    """The tiny model behind transformers 4's signature: ``past_key_values`` in and out, no
    ``logits_to_keep`` (passing it raises TypeError, as an unexpected keyword would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        logits, cache = call_inner(self.inner, past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache)
        return SimpleNamespace(logits=logits, past_key_values=cache)


class PastKeyValuesLM(torch.nn.Module):
    """The signature of transformers 4.45+ and early 5.x: ``past_key_values`` and ``logits_to_keep``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        logits, cache = call_inner(self.inner, past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=logits, past_key_values=cache)


class CacheLM(torch.nn.Module):
    """The tiny model behind the later transformers 5 signature: the KV cache is called ``cache``
    (in and out). ``seen`` records the keywords of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
        self.seen.append({"cache": cache is not None, "logits_to_keep": logits_to_keep, "use_cache": use_cache})
        logits, cache = call_inner(self.inner, cache, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=logits, cache=cache)


class Flagged(PastKeyValuesLM):
    """The tiny model with plain checkpointing flags set (``is_gradient_checkpointing``, the
    transformers 4 / early 5 name, or ``is_activation_checkpointing``, the later 5.x name), so
    both names are covered whichever the installed transformers defines or lets a test set."""

    def __init__(self, inner, **flags):
        super().__init__(inner)
        for name, value in flags.items():
            setattr(self, name, value)


class Wrapped(torch.nn.Module):
    """A DDP-like wrapper: the real module is ``.module``; ``forward`` hides its signature."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def prefix_and_contexts(tok):
    prefix = tok.encode("You are a helpful assistant that can search the wikipedia tool step by step. " * 3)
    assert len(prefix) > 40
    tails = [tok.encode(t) for t in ("<think> the", "<search> the old library was founded by", "a")]
    return prefix, [prefix + t for t in tails]


def fresh(model, seq, start):
    with torch.no_grad():
        logits = model(torch.tensor([list(seq)])).logits[0, start - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[start:]).unsqueeze(1)).squeeze(1)


# -- forward signatures ------------------------------------------------------------------------------


def testforward_kwargs_reads_the_signature_through_a_wrapper(model):
    """Each signature transformers has used, bare and behind a DDP-like wrapper; none depends on
    the installed release."""
    assert forward_kwargs(LegacyLM(model)) == ("past_key_values", False)
    assert forward_kwargs(PastKeyValuesLM(model)) == ("past_key_values", True)
    assert forward_kwargs(CacheLM(model)) == ("cache", True)
    # A wrapper's own forward(*args, **kwargs) names nothing: the wrapped module's signature counts.
    assert forward_kwargs(Wrapped(LegacyLM(model))) == ("past_key_values", False)
    assert forward_kwargs(Wrapped(CacheLM(model))) == ("cache", True)
    assert forward_kwargs(Wrapped(PastKeyValuesLM(model))) == ("past_key_values", True)


@pytest.mark.parametrize("signature", [LegacyLM, PastKeyValuesLM, CacheLM])
def test_generation_under_other_forward_signatures_matches_the_stock_model(tok, model, signature):
    """Greedy tokens and their log-probs are those of the stock model, with and without a shared
    prefix (prefill, cache repetition and decoding all pass the cache under the right name)."""
    prefix, contexts = prefix_and_contexts(tok)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    for min_shared in (16, 10**9):
        ref = HFGenerator(model, tok, min_shared_prefix=min_shared).generate(contexts, params)
        got = HFGenerator(signature(model), tok, min_shared_prefix=min_shared).generate(contexts, params)
        for a, b in zip(got, ref):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("signature", [LegacyLM, PastKeyValuesLM, CacheLM])
def test_sequence_logprobs_under_other_forward_signatures(tok, model, signature):
    prefix, contexts = prefix_and_contexts(tok)
    seqs = [c + tok.encode(" <answer> the lake </answer>") for c in contexts]
    starts = [len(c) for c in contexts]
    wrapped = signature(model)
    for min_shared in (16, 10**9):
        with torch.no_grad():
            out = sequence_logprobs(wrapped, seqs, starts, min_shared_prefix=min_shared)
        for seq, start, lp in zip(seqs, starts, out):
            torch.testing.assert_close(lp, fresh(model, seq, start), atol=ATOL, rtol=0)
    if signature is CacheLM:
        # Shared prefix: the prefix pass keeps one logit and returns a cache; the rest reuses it
        # and keeps logits from the earliest response position on.
        wrapped.seen.clear()
        with torch.no_grad():
            sequence_logprobs(wrapped, seqs, starts, min_shared_prefix=16)
        width, first = max(map(len, seqs)), min(starts) - 1
        assert wrapped.seen == [{"cache": False, "logits_to_keep": 1, "use_cache": True},
                                {"cache": True, "logits_to_keep": width - first, "use_cache": True}]


# -- which rows run together -------------------------------------------------------------------------


def test_sequence_logprobs_shares_a_prefix_only_where_it_may(tok, model, calls):
    """Two rows share the prefix (default minimum 32 tokens); one row, a DDP-like wrapper and a
    gradient-checkpointing model (either attribute name) run every row in full."""
    prefix, contexts = prefix_and_contexts(tok)
    seqs = [c + tok.encode(" the lake") for c in contexts[:2]]
    starts = [len(c) for c in contexts[:2]]
    a, b = seqs
    width = max(map(len, seqs))
    n_prefix = min(next(i for i in range(len(a)) if a[i] != b[i]), min(starts) - 1)
    assert n_prefix >= 32
    expected = [fresh(model, s, st) for s, st in zip(seqs, starts)]

    def run(m, sequences=seqs, response_starts=starts, **kw):
        calls.clear()
        with torch.no_grad():
            out = sequence_logprobs(m, sequences, response_starts, **kw)
        for lp, exp in zip(out, expected):
            torch.testing.assert_close(lp, exp, atol=ATOL, rtol=0)
        return list(calls)

    assert run(model) == [(1, n_prefix), (2, width - n_prefix)]
    assert run(model, seqs[:1], starts[:1]) == [(1, len(seqs[0]))]
    assert run(Wrapped(model)) == [(2, width)]
    model.gradient_checkpointing_enable()  # sets whichever flag the installed transformers reads
    try:
        assert run(model) == [(2, width)]
    finally:
        model.gradient_checkpointing_disable()
    assert run(model) == [(1, n_prefix), (2, width - n_prefix)]
    # Each flag name on its own, as a plain attribute; the later name wins where both are set.
    assert run(Flagged(model)) == [(1, n_prefix), (2, width - n_prefix)]
    assert run(Flagged(model, is_gradient_checkpointing=True)) == [(2, width)]
    assert run(Flagged(model, is_activation_checkpointing=True)) == [(2, width)]
    assert run(Flagged(model, is_activation_checkpointing=True, is_gradient_checkpointing=False)) == [(2, width)]
    assert run(Flagged(model, is_activation_checkpointing=False, is_gradient_checkpointing=True)) \
        == [(1, n_prefix), (2, width - n_prefix)]


def test_shared_prefix_thresholds_default_to_32_tokens(tok, model, calls):
    """A prefix of exactly 32 shared tokens is shared by default (>=), in scoring and in generation."""
    base = tok.encode("You are a helpful assistant that can search the wikipedia tool step by step. " * 3)[:32]
    seqs = [base + tok.encode("<think> the lake"), base + tok.encode("<search> x")]
    assert seqs[0][32] != seqs[1][32]
    starts = [33, 33]
    with torch.no_grad():
        sequence_logprobs(model, seqs, starts)
    assert calls == [(1, 32), (2, max(map(len, seqs)) - 32)]
    calls.clear()
    HFGenerator(model, tok).generate(seqs, SamplingParams(max_new_tokens=1, greedy=True))
    assert calls[:2] == [(1, 32), (2, max(map(len, seqs)) - 32)]
    assert common_prefix_length(seqs, 40, 32) == 32 and common_prefix_length(seqs, 40, 33) == 0


def test_generate_groups_contexts_by_length_into_chunks(tok, model, calls):
    """With max_batch_size=2, the two short and the two long contexts share a prefill; without
    it, all contexts prefill together; a single long context never runs a separate prefix."""
    texts = ["a b", "<search> the old library was founded by two brothers </search>", "a b c",
             "<search> the old library was founded by two brothers in </search>"]
    contexts = [tok.encode(t) for t in texts]
    lengths = [len(c) for c in contexts]
    assert lengths[0] < lengths[2] < lengths[1] < lengths[3]
    greedy = SamplingParams(max_new_tokens=1, greedy=True)
    HFGenerator(model, tok, max_batch_size=2).generate(contexts, greedy)
    assert calls == [(2, lengths[2]), (2, lengths[3])]
    calls.clear()
    HFGenerator(model, tok).generate(contexts, greedy)
    assert calls == [(4, lengths[3])]
    calls.clear()
    prefix, long_contexts = prefix_and_contexts(tok)
    HFGenerator(model, tok, min_shared_prefix=16).generate(long_contexts[:1], greedy)
    assert calls == [(1, len(long_contexts[0]))]
    calls.clear()
    HFGenerator(model, tok, min_shared_prefix=16).generate(long_contexts[:2], greedy)
    a, b = long_contexts[:2]
    shared = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    assert shared >= len(prefix)
    assert calls[:2] == [(1, shared), (2, max(len(a), len(b)) - shared)]


def test_padding_uses_the_tokenizer_pad_id_else_eos(tok, model):
    """Left padding of the prefill: the tokenizer's pad id, or its EOS when it has none."""
    contexts = [tok.encode("a"), tok.encode("a b c d")]
    seen = []
    hook = model.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    try:
        pad = len(tok) - 1
        assert pad not in (tok.eos_token_id, tok.pad_token_id)
        for pad_token_id, expected in ((pad, pad), (None, tok.eos_token_id)):
            fake = SimpleNamespace(eos_token_id=tok.eos_token_id, pad_token_id=pad_token_id)
            gen = HFGenerator(model, fake)
            assert gen.pad_token_id == expected
            seen.clear()
            gen.generate(contexts, SamplingParams(max_new_tokens=1, greedy=True))
            width = len(contexts[1])
            assert seen[0][0].tolist() == [expected] * (width - 1) + contexts[0]
    finally:
        hook.remove()


def test_default_seed_is_zero(tok, model):
    prefix, contexts = prefix_and_contexts(tok)
    params = SamplingParams(temperature=1.5, max_new_tokens=8)
    default = [g.token_ids for g in HFGenerator(model, tok).generate(contexts, params)]
    assert default == [g.token_ids for g in HFGenerator(model, tok, seed=0).generate(contexts, params)]
    assert default != [g.token_ids for g in HFGenerator(model, tok, seed=1).generate(contexts, params)]


# -- argument errors ---------------------------------------------------------------------------------


def test_error_messages_name_the_problem(tok, model):
    gen = HFGenerator(model, tok)
    ctx = tok.encode("a b")
    with pytest.raises(ValueError, match=r"^max_new_tokens has 1 entries for 2 contexts$"):
        gen.generate([ctx, ctx], SamplingParams(), max_new_tokens=[1])
    with pytest.raises(ValueError, match=r"^max_new_tokens entries must be >= 0$"):
        gen.generate([ctx], SamplingParams(), max_new_tokens=[-1])
    with pytest.raises(ValueError, match=r"^every context must contain at least one token$"):
        gen.generate([ctx, []], SamplingParams())
    with pytest.raises(ValueError, match=r"^the tokenizer has no eos_token_id$"):
        HFGenerator(model, SimpleNamespace(eos_token_id=None, pad_token_id=0))
    with pytest.raises(ValueError, match=r"^max_batch_size must be >= 1, got 0$"):
        HFGenerator(model, tok, max_batch_size=0)
    with pytest.raises(ValueError, match=r"^stop must be a sequence of strings, not a single string$"):
        SamplingParams(stop="</search>")
    with pytest.raises(ValueError, match=r"^stop strings must be non-empty$"):
        SamplingParams(stop=("x", ""))
    assert SamplingParams(max_new_tokens=1).max_new_tokens == 1
    with pytest.raises(ValueError, match=r"^2 sequences but 1 response starts$"):
        sequence_logprobs(model, [ctx, ctx], [1])
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0$"):
        sequence_logprobs(model, [ctx], [1], temperature=0)


# -- helpers -----------------------------------------------------------------------------------------


def test_stop_checker_window_special_tokens_and_earliest_stop(tok):
    a = tok.encode("a")[0]
    # Three one-byte tokens complete a three-byte stop: the window must cover all of them.
    assert tok.encode("aaa") == [a, a, a]
    assert _StopChecker(tok, ("aaa",)).find([[a, a, a]]) == ["aaa"]
    # Special tokens are decoded as their text, so a special-token stop string is found.
    special = tok.convert_tokens_to_ids("<|im_start|>")
    assert _StopChecker(tok, ("<|im_start|>",)).find([[a, special]]) == ["<|im_start|>"]
    # "b ab": "b" starts at 0 (also at 3), "ab" at 2 -> the earliest start wins, by first occurrence.
    ids = tok.encode("b ab")
    assert _StopChecker(tok, ("ab", "b")).find([ids]) == ["b"]


def test_eos_token_set():
    assert eos_token_set(object(), 5) == {5}  # no generation_config at all
    assert eos_token_set(SimpleNamespace(generation_config=SimpleNamespace()), 5) == {5}
    assert eos_token_set(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), 5) == {5}
    assert eos_token_set(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7)), 5) == {5, 7}
    assert eos_token_set(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 8])), 5) == {5, 7, 8}
    assert eos_token_set(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7)), 5, [9]) == {9}


def test_common_prefix_length():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 9, 9, 9], [1, 2, 9, 9, 9]]
    assert common_prefix_length(seqs, 4) == 2  # the first row differs from the others at index 2
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 4], [1, 9, 3, 4]], 4) == 1  # the third row counts
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 4]], 3) == 3  # capped by the limit
    assert common_prefix_length(seqs, 4, minimum=2) == 2  # exactly the minimum is enough
    assert common_prefix_length(seqs, 4, minimum=3) == 0
    assert common_prefix_length([[1, 2], [7, 2]], 1) == 0
    assert common_prefix_length([[1, 2, 3]], 2) == 2  # one sequence: the limit


def test_build_generator_passes_arguments_and_config(monkeypatch):
    monkeypatch.setattr(generator_module, "GENERATOR_BACKENDS", {})
    got = []

    @generator_module.register_backend("with-config")
    def with_config(model, tokenizer, *, seed=0, config=None):
        got.append(("with-config", model, tokenizer, seed, config))
        return "gen-a"

    @generator_module.register_backend("plain")
    def plain(model, tokenizer, *, seed):
        got.append(("plain", model, tokenizer, seed))
        return "gen-b"

    assert generator_module.GENERATOR_BACKENDS == {"with-config": with_config, "plain": plain}
    build = generator_module.build_generator
    assert build("with-config", "M", "T") == "gen-a"
    assert build("with-config", "M", "T", seed=3, config="C") == "gen-a"
    assert build("plain", "M", "T", config="C") == "gen-b"  # a builder without `config` is called without it
    assert build("plain", "M", "T") == "gen-b"
    assert got == [("with-config", "M", "T", 0, None), ("with-config", "M", "T", 3, "C"),
                   ("plain", "M", "T", 0), ("plain", "M", "T", 0)]


def test_build_generator_imports_the_vllm_backend_for_an_unknown_name(monkeypatch):
    """The vllm backend registers itself on import; an unknown name triggers that import first,
    so the error lists it (without importing vllm itself)."""
    monkeypatch.setattr(generator_module, "GENERATOR_BACKENDS", {"hf": generator_module._hf_backend})
    import at2po.rollout

    monkeypatch.delitem(sys.modules, "at2po.rollout.vllm_backend", raising=False)
    monkeypatch.delattr(at2po.rollout, "vllm_backend", raising=False)
    with pytest.raises(ValueError, match=r"^rollout.backend='nope' is not one of hf, vllm$"):
        generator_module.build_generator("nope", None, None)


def test_generation_asks_for_the_cache_even_when_the_config_does_not(tok):
    """Decoding needs the KV cache: a model whose config says use_cache=False generates the same."""
    model = build_tiny_model(tok, arch="qwen2", hidden_size=32, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=0)
    prefix, contexts = prefix_and_contexts(tok)
    params = SamplingParams(max_new_tokens=4, greedy=True)
    ref = HFGenerator(model, tok, min_shared_prefix=16).generate(contexts, params)
    model.config.use_cache = False
    got = HFGenerator(model, tok, min_shared_prefix=16).generate(contexts, params)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    with torch.no_grad():
        out = sequence_logprobs(model, [c + [5, 6] for c in contexts], [len(c) for c in contexts], min_shared_prefix=16)
    for c, lp in zip(contexts, out):
        torch.testing.assert_close(lp, fresh(model, c + [5, 6], len(c)), atol=ATOL, rtol=0)
