import copy

import pytest
import torch

from at2po.rollout.generator import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    Generator,
    HFGenerator,
    SamplingParams,
    _StopChecker,
    _top_p_mask,
)
from at2po.training.logprobs import sequence_logprobs
from at2po.tiny import IM_END, build_tiny_model, synthetic_agent_texts, train_tokenizer

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(300))


def tiny(tok, arch="qwen2", seed=0):
    return build_tiny_model(tok, arch=arch, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=seed)


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


@pytest.fixture(scope="module")
def contexts(tok):
    """Contexts of different lengths, so left padding matters."""
    texts = ["<think> the", "<search> the old library was founded by two brothers </search>", "a", "Page 1: Zürich is"]
    ctxs = [tok.encode(t) for t in texts]
    assert len({len(c) for c in ctxs}) == len(ctxs)
    return ctxs


def with_logit_bias(model, bias: dict[int, float]):
    """A copy of ``model`` whose LM head adds ``bias`` to the given token logits."""
    biased = copy.deepcopy(model)
    old = biased.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    biased.lm_head = head
    return biased


def fresh_logprobs(model, context, generated, temperature=1.0):
    """Unpadded, uncached forward over context + generated: (log-probs of the generated tokens, all log-probs)."""
    ids = torch.tensor([list(context) + list(generated)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1 : -1].float()
    all_lp = torch.log_softmax(logits / temperature, dim=-1)
    return all_lp.gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1), all_lp


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logprobs_match_fresh_forward(tok, contexts, arch):
    """The key contract: returned log-probs equal a trainer's fresh forward pass."""
    model = tiny(tok, arch=arch)
    gen = HFGenerator(model, tok, seed=1)
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    # Different limits make rows finish at different steps (exercises dropping finished rows).
    outs = gen.generate(contexts, params, max_new_tokens=[12, 3, 9, 6])
    batched = sequence_logprobs(model, [c + o.token_ids for c, o in zip(contexts, outs)], [len(c) for c in contexts], temperature=0.7)
    for ctx, out, batch_lp in zip(contexts, outs, batched):
        assert len(out.token_ids) == len(out.logprobs) > 0
        expected, _ = fresh_logprobs(model, ctx, out.token_ids, temperature=0.7)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(batch_lp, expected, atol=ATOL, rtol=0)


def test_determinism_under_seed(tok, model, contexts):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a, b = HFGenerator(model, tok, seed=7), HFGenerator(model, tok, seed=7)
    first = a.generate(contexts, params)
    assert first == b.generate(contexts, params)
    assert a.generate(contexts, params) == b.generate(contexts, params)  # the streams advance alike
    assert a.generate(contexts, params) != first
    assert HFGenerator(model, tok, seed=8).generate(contexts, params) != first
    # The RNG state round-trips (checkpoint/resume).
    state = a.get_rng_state()
    expected = a.generate(contexts, params)
    b.set_rng_state(state)
    assert b.generate(contexts, params) == expected


def test_greedy_is_argmax_of_fresh_forward(tok, model, contexts):
    # temperature is ignored by greedy: log-probs are at temperature 1.
    params = SamplingParams(temperature=0.3, max_new_tokens=10, greedy=True)
    outs = HFGenerator(model, tok).generate(contexts, params)
    for ctx, out in zip(contexts, outs):
        expected, all_lp = fresh_logprobs(model, ctx, out.token_ids)
        assert out.token_ids == all_lp.argmax(dim=-1).tolist()
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=ATOL, rtol=0)
    # Chunking the batch changes nothing for greedy decoding (log-probs up to float rounding).
    for max_batch_size in (1, 3):
        chunked = HFGenerator(model, tok, max_batch_size=max_batch_size).generate(contexts, params)
        for a, b in zip(chunked, outs):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)


def test_per_context_max_new_tokens(tok, model, contexts):
    no_eos = with_logit_bias(model, {tok.eos_token_id: -100.0})
    gen = HFGenerator(no_eos, tok, seed=3)
    outs = gen.generate(contexts, SamplingParams(max_new_tokens=2), max_new_tokens=[1, 5, 0, 3])
    assert [len(o.token_ids) for o in outs] == [1, 5, 0, 3]
    assert [len(o.logprobs) for o in outs] == [1, 5, 0, 3]
    assert all(o.finish_reason == FINISH_LENGTH and o.stop_string is None for o in outs)
    # Without overrides, params.max_new_tokens applies to every context.
    outs = gen.generate(contexts, SamplingParams(max_new_tokens=2))
    assert [len(o.token_ids) for o in outs] == [2] * len(contexts)


def test_stop_string_single_token(tok, model, contexts):
    close = tok.convert_tokens_to_ids("</search>")
    forced = with_logit_bias(model, {close: 50.0})
    gen = HFGenerator(forced, tok, seed=0)
    outs = gen.generate(contexts, SamplingParams(max_new_tokens=5, stop=("</answer>", "</search>")))
    for out in outs:
        assert out == Generation([close], out.logprobs, FINISH_STOP, "</search>")
        assert out.logprobs[0] == pytest.approx(0.0, abs=1e-4)
    # A stop string that is only part of the token's text also stops; the whole token is kept.
    out = gen.generate(contexts[:1], SamplingParams(max_new_tokens=5, stop=("search>",)))[0]
    assert (out.token_ids, out.finish_reason, out.stop_string) == ([close], FINISH_STOP, "search>")


def test_stop_string_spanning_tokens_and_not_from_context(tok, model):
    a = tok.encode("a")
    assert len(a) == 1
    forced = with_logit_bias(model, {a[0]: 50.0})
    gen = HFGenerator(forced, tok)
    # The context already ends with the stop string: only generated text counts.
    ctx = tok.encode("<search> aaa </search> aaa")
    out = gen.generate([ctx], SamplingParams(max_new_tokens=10, stop=("aaa", "</search>")))[0]
    assert out.token_ids == a * 3
    assert (out.finish_reason, out.stop_string) == (FINISH_STOP, "aaa")
    out = gen.generate([ctx], SamplingParams(max_new_tokens=4, stop=("</search>",)))[0]
    assert (out.token_ids, out.finish_reason, out.stop_string) == (a * 4, FINISH_LENGTH, None)


def test_stop_on_a_special_token_string_during_generation(tok, model):
    special = tok.convert_tokens_to_ids("<|im_start|>")
    forced = with_logit_bias(model, {special: 50.0})
    out = HFGenerator(forced, tok).generate([tok.encode("a b")], SamplingParams(max_new_tokens=4, stop=("<|im_start|>",)))[0]
    assert (out.token_ids, out.finish_reason, out.stop_string) == ([special], FINISH_STOP, "<|im_start|>")


def test_stop_checker_finds_each_stop_when_completed(tok):
    text = "<think> ok </think> Zürich is near Page 1: the lake"
    ids = tok.encode(text)
    for stop in ("Page 1:", "Zürich", "</think>", "ü", "e lak"):
        checker = _StopChecker(tok, (stop,))
        found_at = next(n for n in range(1, len(ids) + 1) if checker.find([ids[:n]])[0] == stop)
        # Reported exactly at the first prefix whose full decode contains it.
        assert found_at == next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n]))
    assert _StopChecker(tok, ()).find([ids, ids]) == [None, None]
    # Of stops completed by the same token, the one starting earliest wins; rows are independent.
    assert _StopChecker(tok, ("lake", "the lake")).find([ids, ids[:3]]) == ["the lake", None]


def test_eos(tok, model, contexts):
    forced = with_logit_bias(model, {tok.eos_token_id: 50.0})
    outs = HFGenerator(forced, tok).generate(contexts, SamplingParams(max_new_tokens=5, stop=("</search>",)))
    for out in outs:
        assert (out.token_ids, out.finish_reason, out.stop_string) == ([tok.eos_token_id], FINISH_EOS, None)
        assert len(out.logprobs) == 1


def test_extra_eos_ids_from_generation_config(tok, model, contexts):
    im_end = tok.convert_tokens_to_ids(IM_END)
    forced = with_logit_bias(model, {im_end: 50.0})
    forced.generation_config.eos_token_id = [tok.eos_token_id, im_end]
    gen = HFGenerator(forced, tok)
    assert gen.eos_token_id == tok.eos_token_id and gen.eos_token_ids == {tok.eos_token_id, im_end}
    out = gen.generate(contexts[:1], SamplingParams(max_new_tokens=5))[0]
    assert (out.token_ids, out.finish_reason) == ([im_end], FINISH_EOS)
    # An explicit eos_token_ids replaces the defaults.
    out = HFGenerator(forced, tok, eos_token_ids=[tok.eos_token_id]).generate(contexts[:1], SamplingParams(max_new_tokens=3))[0]
    assert (out.token_ids, out.finish_reason) == ([im_end] * 3, FINISH_LENGTH)


def test_empty_batch_and_protocol(tok, model):
    gen = HFGenerator(model, tok)
    assert isinstance(gen, Generator)
    assert gen.generate([], SamplingParams()) == []
    assert gen.generate([], SamplingParams(), max_new_tokens=[]) == []


def test_restores_train_mode(tok, model, contexts):
    trained = copy.deepcopy(model).train()
    HFGenerator(trained, tok).generate(contexts, SamplingParams(max_new_tokens=2))
    assert trained.training


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": "</search>"}, "stop"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_greedy_zero_temperature_and_list_stop():
    assert SamplingParams(temperature=0.0, greedy=True).greedy
    assert SamplingParams(stop=["</search>"]).stop == ("</search>",)


def test_generate_argument_errors(tok, model, contexts):
    gen = HFGenerator(model, tok)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(contexts, SamplingParams(), max_new_tokens=[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(contexts[:1], SamplingParams(), max_new_tokens=[-1])
    with pytest.raises(ValueError, match="context"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_batch_size"):
        HFGenerator(model, tok, max_batch_size=0)


def test_top_p_mask():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert _top_p_mask(probs, 0.7).tolist() == [[True, False, True, False]]
    assert _top_p_mask(probs, 0.5).tolist() == [[True, False, True, True]]
    assert _top_p_mask(probs, 1.0).tolist() == [[False, False, False, False]]


def test_top_p_samples_stay_in_nucleus(tok, model, contexts):
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(12.0)  # a spread-out distribution with a small nucleus
    top_p = 0.6
    gen = HFGenerator(peaked, tok, seed=0)
    many = contexts * 4
    outs = gen.generate(many, SamplingParams(top_p=top_p, max_new_tokens=8))
    nucleus_sizes, non_argmax = [], 0
    for ctx, out in zip(many, outs):
        _, all_lp = fresh_logprobs(peaked, ctx, out.token_ids)
        probs = all_lp.exp()
        for step, token in enumerate(out.token_ids):
            mass_above = probs[step][probs[step] > probs[step, token]].sum().item()
            assert mass_above < top_p + 1e-5
            nucleus_sizes.append(int((~_top_p_mask(probs[step : step + 1], top_p)).sum()))
            non_argmax += token != probs[step].argmax().item()
    # The check is meaningful: nuclei are small but not trivial, and sampling is not greedy.
    assert max(nucleus_sizes) < len(tok) // 4 and max(nucleus_sizes) > 1
    assert non_argmax > 0


def test_sequence_logprobs(tok, model, contexts):
    seqs = [c + tok.encode(" the lake") for c in contexts]
    starts = [len(c) for c in contexts]
    out = sequence_logprobs(model, seqs, starts, temperature=1.3)
    chunked_out = sequence_logprobs(model, seqs, starts, temperature=1.3, max_batch_size=2)
    for seq, start, lp, chunked in zip(seqs, starts, out, chunked_out):
        expected, _ = fresh_logprobs(model, seq[:start], seq[start:], temperature=1.3)
        assert lp.dtype == torch.float32 and lp.requires_grad
        torch.testing.assert_close(lp, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(chunked, expected, atol=ATOL, rtol=0)
    # An empty response gives an empty tensor; starts must leave a context token.
    assert sequence_logprobs(model, [seqs[0]], [len(seqs[0])])[0].numel() == 0
    with pytest.raises(ValueError, match="response start"):
        sequence_logprobs(model, [seqs[0]], [0])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sequence_logprobs_shared_prefix_matches_full_rows(tok, arch):
    """Rows sharing a long prompt prefix (run once, cache repeated) give the full forward's
    log-probs and the same gradients; one row ends inside what would be the prefix of the others."""
    model = tiny(tok, arch=arch, seed=3).train()
    prefix = tok.encode("You are a helpful assistant that can search the wikipedia tool step by step. " * 3)
    assert len(prefix) > 40
    tails = [tok.encode(t) for t in ("<think> the lake </think>", "<search> Zürich </search> <result> x", "a")]
    seqs = [prefix + t + tok.encode(" <answer> the old library </answer>") for t in tails]
    starts = [len(prefix) + len(t) for t in tails]
    weights = [torch.randn(len(s) - st, generator=torch.Generator().manual_seed(i)) for i, (s, st) in enumerate(zip(seqs, starts))]

    widths = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)

    def run(min_shared_prefix):
        model.zero_grad()
        widths.clear()
        out = sequence_logprobs(model, seqs, starts, temperature=0.9, min_shared_prefix=min_shared_prefix)
        sum((lp * w).sum() for lp, w in zip(out, weights)).backward()
        return [lp.detach() for lp in out], [p.grad.clone() for p in model.parameters()], list(widths)

    shared, shared_grads, shared_calls = run(min_shared_prefix=16)
    full, full_grads, full_calls = run(min_shared_prefix=10**9)
    hook.remove()
    n_prefix = min(starts) - 1
    assert shared_calls == [(1, n_prefix), (3, max(map(len, seqs)) - n_prefix)]
    assert full_calls == [(3, max(map(len, seqs)))]
    for seq, start, a, b in zip(seqs, starts, shared, full):
        expected, _ = fresh_logprobs(model, seq[:start], seq[start:], temperature=0.9)
        torch.testing.assert_close(a, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(b, expected, atol=ATOL, rtol=0)
    for g_shared, g_full in zip(shared_grads, full_grads):
        torch.testing.assert_close(g_shared, g_full, atol=1e-6, rtol=1e-4)
    # A row whose response starts right after the prefix limits the shared part (a logit is needed there).
    short = [prefix[:20] + [prefix[20]], seqs[0]]
    out = sequence_logprobs(model, short, [20, starts[0]], min_shared_prefix=8)
    torch.testing.assert_close(out[0], fresh_logprobs(model, short[0][:20], short[0][20:])[0], atol=ATOL, rtol=0)


def test_generation_with_a_shared_prefix_matches_full_prefill(tok):
    """Contexts sharing a long prefix (prefilled once, cache repeated) give what full per-row
    prefill gives: greedy tokens, sampled tokens under the same seed, log-probs equal to a fresh pass."""
    model = tiny(tok, seed=5)
    prefix = tok.encode("You are a helpful assistant that can search the wikipedia tool step by step. " * 3)
    contexts = [prefix + tok.encode(t) for t in ("<think> the", "<search> the old library was founded by", "a")]
    widths = []
    hook = model.register_forward_hook(
        lambda mod, args, kwargs, out: widths.append(kwargs.get("input_ids", args[0] if args else None).shape[1]),
        with_kwargs=True)
    for params in (SamplingParams(max_new_tokens=10, greedy=True), SamplingParams(temperature=1.2, max_new_tokens=10)):
        widths.clear()
        shared = HFGenerator(model, tok, seed=11).generate(contexts, params)
        shared_prefill = widths[:2]
        widths.clear()
        full = HFGenerator(model, tok, seed=11, min_shared_prefix=10**9).generate(contexts, params)
        # Shared: the prefix alone, then the left-padded rests; full: every whole context.
        assert shared_prefill[0] >= len(prefix) and sum(shared_prefill) == widths[0] == max(map(len, contexts))
        for ctx, a, b in zip(contexts, shared, full):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL, rtol=0)
            temperature = 1.0 if params.greedy else params.temperature
            expected, _ = fresh_logprobs(model, ctx, a.token_ids, temperature=temperature)
            torch.testing.assert_close(torch.tensor(a.logprobs), expected, atol=ATOL, rtol=0)
    hook.remove()


# -- weights and backends ------------------------------------------------------------------------


def _outputs(gen, contexts, params):
    return [(g.token_ids, g.logprobs, g.finish_reason) for g in gen.generate(contexts, params)]


def test_load_weights_from_another_module(tok, contexts):
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    mine, other = tiny(tok, seed=0), tiny(tok, seed=7)
    reference = _outputs(HFGenerator(other, tok), contexts, greedy)
    gen = HFGenerator(mine, tok)
    before = _outputs(gen, contexts, greedy)
    assert [t for t, _, _ in before] != [t for t, _, _ in reference]  # the two modules differ
    gen.load_weights(other)
    assert gen.model is mine  # the weights are copied into the generator's own module
    after = _outputs(gen, contexts, greedy)
    assert [(t, f) for t, _, f in after] == [(t, f) for t, _, f in reference]
    for (_, lp_a, _), (_, lp_b, _) in zip(after, reference):
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=0, rtol=0)
    for (name, p), q in zip(mine.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    # A copy, not an alias: later updates of the source need another load_weights.
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert not torch.equal(next(mine.parameters()), next(other.parameters()))


def test_load_weights_of_its_own_module_is_a_no_op(tok, contexts, monkeypatch):
    model = tiny(tok, seed=3)
    gen = HFGenerator(model, tok)
    params = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}

    def no_copy(*args, **kwargs):
        raise AssertionError("load_weights copied a module into itself")

    monkeypatch.setattr(model, "load_state_dict", no_copy)
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    before = _outputs(gen, contexts, greedy)
    gen.load_weights(model)
    assert gen.model is model
    for name, p in model.named_parameters():
        ptr, value = params[name]
        assert p.data_ptr() == ptr and torch.equal(p, value), name
    assert _outputs(gen, contexts, greedy) == before


def test_build_generator_backends(tok, model, contexts):
    from at2po.rollout.generator import GENERATOR_BACKENDS, build_generator

    assert "hf" in GENERATOR_BACKENDS
    gen = build_generator("hf", model, tok, seed=4)
    assert isinstance(gen, HFGenerator) and isinstance(gen, Generator)
    assert gen.model is model  # shares the training module
    params = SamplingParams(temperature=1.3, max_new_tokens=6)
    assert _outputs(gen, contexts, params) == _outputs(HFGenerator(model, tok, seed=4), contexts, params)
    with pytest.raises(ValueError, match="rollout.backend='nope' is not one of") as err:
        build_generator("nope", model, tok)
    assert str(err.value).endswith(", ".join(sorted(GENERATOR_BACKENDS)))
