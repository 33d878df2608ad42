"""The update's log-prob path (at2po.training.logprobs): the chunked scoring head, tree packing,
the token-budget micro-batches and the trainer glue around them.

Every expected value comes from a naive computation that shares no code with the path under
test: one plain forward per row with the full (B, T, V) logits (``naive_logprobs``), a trie
built as a set of prefixes, a mask built by walking parent pointers, a per-mini-batch loss
written out by hand. Values AND gradients (of every trainable parameter, after ``backward`` of
a weighted sum of the log-probs with distinct random weights per token) are compared. Trees
are random and seeded (``random_forest``): several prompts sharing a system prefix, expansions
branching at random depths (inside a turn too), strict-prefix rows (continued turns),
duplicate rows, rows of different lengths and response starts.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from at2po.algorithms.losses import AGGS, policy_loss
from at2po.training.logprobs import (
    chunked_token_logprobs,
    distinct_tokens,
    head_fallback_reason,
    pack_rows,
    packing_fallback_reason,
    sequence_logprobs,
)
from at2po.training.trainer import (
    Trainer,
    TrainBatch,
    forward_tokens,
    response_log_probs,
    token_budget_micro_batches,
)
from conftest import make_run_cfg, tiny_search_qa_assets

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 384
HERE = Path(__file__).resolve().parent


# == models ========================================================================================
def tiny_lm(arch: str = "qwen2", *, tie: bool = True, attn: str = "sdpa", dtype=torch.float32, hidden: int = 32,
            layers: int = 2, vocab: int = VOCAB, seed: int = 0, **extra) -> torch.nn.Module:
    """A random causal LM of a real HF architecture. initializer_range 0.2 (not HF's 0.02): the
    logits then spread over several nats, so a log-prob read off the wrong position or through
    the wrong attention differs by far more than rounding."""
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=1024,
                        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=0, pad_token_id=0,
                        initializer_range=0.2, **extra)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()  # checkpointing acts in train mode only (dropout is 0 in these configs)


# == the naive reference ===========================================================================
def naive_logprobs(model, sequences, starts, temperature: float) -> list[torch.Tensor]:
    """One plain forward per row (no padding, no mask, no cache), full logits, then
    log_softmax(logits / T) of each response token read at the position before it."""
    out = []
    for seq, start in zip(sequences, starts):
        ids = torch.tensor([list(seq)])
        logits = model(input_ids=ids, use_cache=False).logits[0].float() / temperature
        lp = torch.log_softmax(logits, dim=-1)[start - 1:len(seq) - 1]
        out.append(lp.gather(1, ids[0, start:, None])[:, 0])
    return out


def token_weights(sequences, starts, seed: int = 1) -> list[torch.Tensor]:
    """Distinct random weights per (row, token): a gradient mixes the rows in a way only the right
    per-row log-probs reproduce."""
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.uniform(0.5, 1.5, len(s) - st) * rng.choice([-1, 1], len(s) - st), dtype=torch.float32)
            for s, st in zip(sequences, starts)]


def values_and_grads(model, compute, weights):
    """compute() -> per-row log-probs; backward of Σ w·lp; (values, {name: grad}) of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    lps = compute()
    loss = sum((w * lp).sum() for w, lp in zip(weights, lps))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    model.zero_grad(set_to_none=True)
    return [lp.detach() for lp in lps], grads


def assert_values_close(got, want, rtol: float, what: str = "") -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape, (what, i, g.dtype, g.shape, w.shape)
        if w.numel():
            rel = float(((g - w).abs() / w.abs().clamp(min=1e-6)).max())
            assert rel <= rtol, f"{what} row {i}: max relative diff {rel:.3g} > {rtol:g}"


def assert_grads_close(got: dict, want: dict, rtol: float, what: str = "") -> None:
    """Per parameter: max |Δ| ≤ rtol · max |reference| (the reference gradient is not all zero)."""
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].float().abs().max())
        assert scale > 0, f"{what} {name}: the reference gradient is zero (the test would check nothing)"
        diff = float((got[name].float() - want[name].float()).abs().max())
        assert diff <= rtol * scale, f"{what} {name}: max |Δgrad| {diff:.3g} > {rtol:g} · {scale:.3g}"


# == random trees ==================================================================================
@dataclass
class Row:
    seq: list[int]
    start: int  # the tree's prompt length
    mask: list[int]  # per response token: 1 generated, 0 observation
    turn: list[int]  # per response token: turn id (−1 where not trained)
    adv: list[float]  # per response token


def random_forest(seed: int, n_trees: int = 3, vocab: int = VOCAB) -> list[Row]:
    """Rows of ``n_trees`` random trees of agent turns. The prompts share a system prefix and differ
    after it; each tree has 2 initial chains and 2–4 expansions, each branching off an existing
    chain at a random depth (inside a turn too: the branch continues that turn), whose turns
    above the branching point are shared; one row is a strict prefix of another (a continued
    turn) and one row is a duplicate. Token advantages are per token of a chain and copied with
    the prefix, so shared tokens carry the same advantage (as a tree's nodes do)."""
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(1, vocab, size=n).tolist()  # noqa: E731
    system = tok(int(rng.integers(5, 10)))
    rows: list[Row] = []
    for t in range(n_trees):
        prompt = system + tok(2 + 3 * t + int(rng.integers(0, 3)))  # prompts of different lengths

        def turns(chain: dict, k: int) -> dict:
            chain = {key: list(v) for key, v in chain.items()}
            next_turn = max(chain["turn"], default=-1) + 1
            for j in range(k):
                gen = j % 2 == 0 or rng.random() < 0.3
                n = int(rng.integers(1, 7))
                chain["tokens"] += tok(n)
                chain["mask"] += [int(gen)] * n
                chain["turn"] += [next_turn if gen else -1] * n
                chain["adv"] += rng.normal(size=n).tolist()
                next_turn += gen
            return chain

        empty = {"tokens": [], "mask": [], "turn": [], "adv": []}
        chains = [turns(empty, int(rng.integers(1, 5))) for _ in range(2)]
        for _ in range(int(rng.integers(2, 5))):
            parent = chains[int(rng.integers(len(chains)))]
            cut = int(rng.integers(1, len(parent["tokens"]) + 1))
            branch = {key: v[:cut] for key, v in parent.items()}
            if branch["mask"][-1] and rng.random() < 0.5:  # the cut is inside a turn: continue it
                n = int(rng.integers(1, 4))
                branch["tokens"] += tok(n)
                branch["mask"] += [1] * n
                branch["turn"] += [branch["turn"][-1]] * n
                branch["adv"] += rng.normal(size=n).tolist()
            chains.append(turns(branch, int(rng.integers(1, 4))))
        longest = max(chains, key=lambda c: len(c["tokens"]))
        keep = int(rng.integers(1, len(longest["tokens"])))
        chains.append({key: v[:keep] for key, v in longest.items()})  # a strict prefix of another row
        chains.append(copy.deepcopy(chains[int(rng.integers(len(chains)))]))  # a duplicate row
        for c in chains:
            rows.append(Row(prompt + c["tokens"], len(prompt), c["mask"], c["turn"], c["adv"]))
    order = rng.permutation(len(rows))  # trees interleaved: the packing must undo any row order
    return [rows[i] for i in order]


def mixed_starts(rows: list[Row], seed: int) -> list[int]:
    """Response starts that differ between rows sharing nodes: the prompt length, or anywhere in
    the row (1 ≤ start ≤ len; start = len, an empty response, included)."""
    rng = np.random.default_rng(seed)
    starts = []
    for i, r in enumerate(rows):
        if i == 0:
            starts.append(len(r.seq))
        elif i % 3 == 1:
            starts.append(r.start)
        else:
            starts.append(int(rng.integers(1, len(r.seq) + 1)))
    return starts


def test_the_random_forest_has_the_shapes_it_promises():
    """The generator of the packing tests' trees (a test that cannot fail silently needs trees
    that actually share prefixes, hold strict prefixes and duplicates)."""
    for seed in range(5):
        rows = random_forest(seed)
        seqs = [tuple(r.seq) for r in rows]
        assert len(set(seqs)) < len(seqs)  # a duplicate
        assert any(a != b and b[:len(a)] == a for a in seqs for b in seqs)  # a strict prefix
        assert len({r.start for r in rows}) > 1 and len({len(s) for s in seqs}) > 3
        assert distinct_tokens(seqs) < 0.6 * sum(map(len, seqs))  # heavy sharing
        for r in rows:
            n = len(r.seq) - r.start
            assert len(r.mask) == len(r.turn) == len(r.adv) == n
            assert all((t >= 0) == bool(m) for t, m in zip(r.turn, r.mask))


# == 1. the chunked scoring head ===================================================================
CHUNK_SEQS = [[(7 * i + 3 * j) % (VOCAB - 1) + 1 for j in range(n)] for i, n in enumerate((13, 21, 7, 17, 2))]
CHUNK_STARTS = [5, 1, 7, 10, 1]  # row 2: start = len (no response token); row 4: one token
N_SCORED = sum(len(s) - st for s, st in zip(CHUNK_SEQS, CHUNK_STARTS))  # 45


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_chunked_head_equals_full_logits_in_fp32(tie, temperature):
    """Pins (b), a chunk boundary off by one: every chunk size, one that does not divide the 45
    scored positions, and one larger than all of them, gives the full-logits values and gradients.
    Values within 1e-6 relative. Gradients within 5e-6 (max |Δ| / max |ref|, per parameter):
    1e-6 is not reachable in fp32 at chunk size 1, measured 1.6e-6 (untied q_proj), because each
    1-row chunk's head backward is a matrix-vector product that rounds the last bit differently
    from the one (45, H) GEMM, and that noise passes back through both layers; chunk sizes ≥ 7
    measured ≤ 5e-7, and the float64 test below shows the arithmetic is exact."""
    model = tiny_lm(tie=tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    assert N_SCORED % 7 and N_SCORED % 11
    w = token_weights(CHUNK_SEQS, CHUNK_STARTS)
    run = lambda chunk: values_and_grads(model, lambda: sequence_logprobs(  # noqa: E731
        model, CHUNK_SEQS, CHUNK_STARTS, temperature, chunk_tokens=chunk), w)
    ref_v, ref_g = run(0)
    with torch.no_grad():
        assert_values_close(ref_v, naive_logprobs(model, CHUNK_SEQS, CHUNK_STARTS, temperature), 1e-5, "reference")
    for chunk in (1, 7, 11, N_SCORED, 1000):
        v, g = run(chunk)
        assert_values_close(v, ref_v, 1e-6, f"chunk {chunk}")
        assert_grads_close(g, ref_g, 5e-6, f"chunk {chunk}")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_head_is_exact_in_float64(tie):
    """The same comparison in float64: no rounding left to hide behind, 1e-12."""
    model = tiny_lm(tie=tie, dtype=torch.float64)
    w = [x.double() for x in token_weights(CHUNK_SEQS, CHUNK_STARTS)]
    run = lambda chunk: values_and_grads(model, lambda: sequence_logprobs(  # noqa: E731
        model, CHUNK_SEQS, CHUNK_STARTS, 0.7, chunk_tokens=chunk), w)
    ref_v, ref_g = run(0)
    for chunk in (1, 4, 7, 1000):
        v, g = run(chunk)
        # The path returns fp32 by contract; compare the fp32 values exactly up to their rounding.
        assert_values_close(v, ref_v, 1e-7, f"chunk {chunk}")
        assert_grads_close(g, ref_g, 1e-12, f"chunk {chunk}")


def test_chunked_head_in_bf16_is_within_bf16_rounding():
    """bf16 weights. Measured (tied and untied, chunk sizes 1/7/11; the linear head's fused path):
    values within 5e-7 (the fp32 log-softmax's rounding), and every gradient identical but the
    output head's weight (the embedding when tied), within 0.27-0.54% (max |Δ| / max |ref|). Why:
    that gradient is a sum over the scored positions. The full path forms it in one GEMM that
    accumulates in fp32 and rounds to bf16 once; the chunked path forms one bf16 GEMM output per
    chunk, each rounded to bf16 (8 significant bits: 2^-8 = 0.39% per rounding), and adds them in
    fp32.
    Tolerances: values 2e-2 absolute (1-2 bf16 ulps of a logit of a few nats, should another CPU
    round a slice's GEMM differently), gradients 3% (a few roundings' worth); a shifted position
    or a dropped chunk is an O(1) change."""
    for tie in (True, False):
        model = tiny_lm(tie=tie, dtype=torch.bfloat16)
        w = token_weights(CHUNK_SEQS, CHUNK_STARTS)
        run = lambda chunk: values_and_grads(model, lambda: sequence_logprobs(  # noqa: E731
            model, CHUNK_SEQS, CHUNK_STARTS, 0.7, chunk_tokens=chunk), w)
        ref_v, ref_g = run(0)
        for chunk in (1, 7, 11):
            v, g = run(chunk)
            for a, b in zip(v, ref_v):
                assert a.dtype == torch.float32
                torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
            assert_grads_close(g, ref_g, 3e-2, f"bf16 chunk {chunk}")


def test_chunked_head_with_a_shared_prompt_prefix_equals_the_reference():
    """Rows sharing a 40-token prompt (≥ min_shared_prefix): the padded path runs the prefix once
    and its KV cache under the rows (2 forward calls), and the scoring head swapped in for the
    second call still gives the naive values and gradients (starts differ, one before the end of
    the shared prompt)."""
    model = tiny_lm(tie=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, VOCAB, 40).tolist()
    seqs = [prompt + rng.integers(1, VOCAB, n).tolist() for n in (3, 9, 1, 6)]
    starts = [40, 35, 41, 44]
    w = token_weights(seqs, starts)
    ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 0.8), w)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    for chunk in (1, 5):
        calls.clear()
        v, g = values_and_grads(model, lambda: sequence_logprobs(model, seqs, starts, 0.8, chunk_tokens=chunk), w)
        assert len(calls) == 2  # the shared prefix, then the rows
        assert_values_close(v, ref_v, 1e-5, f"chunk {chunk}")
        assert_grads_close(g, ref_g, 1e-5, f"chunk {chunk}")
    handle.remove()


@pytest.mark.parametrize("temperature", [0.9, 2.0])
@pytest.mark.parametrize("bias", [False, True], ids=["linear-head", "module-head"])
def test_chunked_token_logprobs_by_hand(bias, temperature):
    """The chunk loop alone, against log_softmax(head(h) / T)[target] written out, for chunk
    sizes around the 10 positions (pins (b): a chunk that skips or shifts a position), values and
    both gradients, through both paths: the fused linear head and a head's own forward (a head
    with a bias). T = 2.0 too: a division skipped at one particular temperature shows."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 23, bias=bias)
    hidden = torch.randn(10, 8)
    targets = torch.randint(0, 23, (10,))
    want = torch.log_softmax(head(hidden) / temperature, dim=-1)[torch.arange(10), targets]
    for chunk in (1, 3, 4, 9, 10, 11):
        with torch.no_grad():
            got = chunked_token_logprobs(head, hidden, targets, temperature, chunk)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        h = hidden.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        got = chunked_token_logprobs(head, h, targets, temperature, chunk)
        (got * torch.arange(1.0, 11.0)).sum().backward()
        got_w = head.weight.grad.clone()
        head.zero_grad(set_to_none=True)
        h_ref = hidden.clone().requires_grad_()
        ref = torch.log_softmax(head(h_ref) / temperature, dim=-1)[torch.arange(10), targets]
        (ref * torch.arange(1.0, 11.0)).sum().backward()
        torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_w, head.weight.grad, atol=1e-6, rtol=1e-6)
    assert chunked_token_logprobs(head, hidden[:0], targets[:0], 1.0, 4).shape == (0,)


@pytest.mark.parametrize("bias", [False, True], ids=["linear-head", "module-head"])
def test_chunked_head_in_bf16_runs_its_log_softmax_in_fp32(bias):
    """A bf16 head: the logits are upcast before the log-softmax on both paths, so the values
    equal log_softmax(head(h).float()) to fp32 rounding, not to bf16's (~1e-2 here), and the
    hidden states' gradient equals the reference's to a bf16 rounding of its own size."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).to(torch.bfloat16)
    hidden = (3 * torch.randn(12, 16)).to(torch.bfloat16)
    targets = torch.randint(0, 50, (12,))
    h_ref = hidden.clone().requires_grad_()
    want = torch.log_softmax(head(h_ref).float() / 0.7, dim=-1)[torch.arange(12), targets]
    (want * torch.arange(1.0, 13.0)).sum().backward()
    h = hidden.clone().requires_grad_()
    got = chunked_token_logprobs(head, h, targets, 0.7, 5)
    (got * torch.arange(1.0, 13.0)).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
    scale = float(h_ref.grad.float().abs().max())
    assert float((h.grad.float() - h_ref.grad.float()).abs().max()) <= 2 ** -8 * scale


@pytest.mark.parametrize("bias", [False, True], ids=["linear-head", "module-head"])
def test_chunked_head_under_autocast_matches_autograd_under_autocast(bias):
    """fp32 weights under bf16 autocast (Accelerate's mixed precision): the forward's head product
    is bf16, and the backward, which runs outside autocast, must recompute the logits in bf16 too
    (recomputed in fp32 they no longer match the forward's log-sum-exp). Values and both gradients
    against autograd through full logits under the same autocast."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias)
    hidden, targets = 2 * torch.randn(24, 16), torch.randint(0, 300, (24,))
    weights = torch.linspace(-1.0, 1.0, 24)

    def run(fn):
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = fn(h)
        (lp * weights).sum().backward()
        return lp.detach(), h.grad, head.weight.grad

    want = run(lambda h: torch.log_softmax(head(h).float() / 0.8, dim=-1)[torch.arange(24), targets])
    got = run(lambda h: chunked_token_logprobs(head, h, targets, 0.8, 7))
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    # The hidden states' gradient is the same bf16 product as autograd's (measured: identical; with
    # the backward's logits recomputed in fp32 it is 0.4-0.5 % off). The weight's sums one bf16
    # product per chunk in fp32 instead of one product: within two bf16 roundings (measured 0.3-0.5 %).
    assert float((got[1] - want[1]).abs().max()) <= 1e-6 * float(want[1].abs().max())
    assert float((got[2] - want[2]).abs().max()) <= 2 ** -7 * float(want[2].abs().max())


def test_rows_whose_logits_lie_hundreds_of_nats_apart():
    """Each position's log-softmax is shifted by its own maximum: a chunk in which one position's
    logits are ~500 nats above another's must not underflow the lower one to -inf (a shift by
    the chunk's maximum would)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 30, bias=False)
    hidden = torch.randn(6, 4)
    hidden[3] *= 300.0
    targets = torch.randint(0, 30, (6,))
    want = torch.log_softmax(head.double()(hidden.double()), dim=-1)[torch.arange(6), targets].float()
    head.float()
    got = chunked_token_logprobs(head, hidden.requires_grad_(), targets, 1.0, 6)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-6)
    got.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("kind", ["plain", "bias", "forward-hook", "pre-hook", "subclass", "lora"])
def test_the_fused_head_is_taken_exactly_for_plain_linear_heads(kind, monkeypatch):
    """Which path a head takes (both exact; the fused one is the fast one, the module one keeps a
    head's own forward): a bias-free nn.Linear with no hooks is fused; a bias, a forward or
    forward-pre hook, a Linear subclass (FSDP2 turns a head sharded on its own into one) or a
    LoRA-wrapped head run the module per chunk. Counted by spying on both paths."""
    import at2po.training.logprobs as lp_mod

    calls = {"fused": 0, "module": 0}
    fused, module = lp_mod._LinearHeadLogprobs.apply, lp_mod._score_chunk

    def spy_fused(*args):
        calls["fused"] += 1
        return fused(*args)

    def spy_module(*args):
        calls["module"] += 1
        return module(*args)

    monkeypatch.setattr(lp_mod._LinearHeadLogprobs, "apply", spy_fused)
    monkeypatch.setattr(lp_mod, "_score_chunk", spy_module)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 23, bias=kind == "bias")
    if kind == "forward-hook":
        head.register_forward_hook(lambda *a: None)
    elif kind == "pre-hook":
        head.register_forward_pre_hook(lambda *a: None)
    elif kind == "subclass":
        head = type("ShardedLinear", (torch.nn.Linear,), {})(8, 23, bias=False)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(torch.nn.Sequential(head), LoraConfig(r=2, target_modules=["0"]))
        head = wrapped.base_model.model[0]
    hidden, targets = torch.randn(10, 8), torch.randint(0, 23, (10,))
    want = torch.log_softmax(head(hidden) / 0.9, dim=-1)[torch.arange(10), targets]
    got = chunked_token_logprobs(head, hidden, targets, 0.9, 4)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    assert calls == ({"fused": 1, "module": 0} if kind == "plain" else {"fused": 0, "module": 3}), calls


def test_a_head_with_hooks_runs_its_own_forward():
    """The fused linear head reads the weight directly, which would skip a hook on the head (a
    user's, or a wrapper's that gathers or reshards the weight): with a forward hook registered the
    head's forward runs, once per chunk, and the values still equal the reference."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 23, bias=False)
    hidden, targets = torch.randn(10, 8), torch.randint(0, 23, (10,))
    want = torch.log_softmax(head(hidden) / 0.9, dim=-1)[torch.arange(10), targets]
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    got = chunked_token_logprobs(head, hidden, targets, 0.9, 4)
    handle.remove()
    assert len(calls) == 3  # chunks of 4, 4, 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# == 2. tree packing ===============================================================================
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_tree_packing_equals_per_row_forwards_on_random_trees(arch, attn, checkpointing):
    """Pins (a) a wrong ancestor in the mask, (d) position ids = node index, (e) a node scored
    from itself: all rows of 3 random trees in one packed forward give each row's own log-probs
    and the same parameter gradients as one plain forward per row, within 1e-5 (fp32). Starts
    differ between rows that share nodes; one row has no response token."""
    model = tiny_lm(arch, attn=attn, tie=arch == "qwen2")
    if checkpointing:
        enable_checkpointing(model)
        assert model.is_activation_checkpointing and model.training
    for seed in (0, 1):
        rows = random_forest(seed + 10 * (arch == "llama"))
        seqs, starts = [r.seq for r in rows], mixed_starts(rows, seed)
        w = token_weights(seqs, starts, seed)
        ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 0.8), w)
        for chunk in (0, 5):
            v, g = values_and_grads(model, lambda: sequence_logprobs(
                model, seqs, starts, 0.8, chunk_tokens=chunk, tree_packing=True), w)
            assert_values_close(v, ref_v, 1e-5, f"seed {seed} chunk {chunk}")
            assert_grads_close(g, ref_g, 1e-5, f"seed {seed} chunk {chunk}")


def test_tree_packing_runs_one_forward_over_the_distinct_tokens():
    """The packed forward is one call whose sequence holds each distinct prefix token once."""
    model = tiny_lm()
    rows = random_forest(3)
    seqs = [r.seq for r in rows]
    shapes = []
    handle = model.model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    with torch.no_grad():
        sequence_logprobs(model, seqs, [r.start for r in rows], chunk_tokens=4, tree_packing=True)
    handle.remove()
    assert shapes == [(1, len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}))]


# == 3. pack_rows against a naive trie =============================================================
def naive_ancestors(parent: np.ndarray) -> np.ndarray:
    n = len(parent)
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = int(parent[j])
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_pack_rows_is_the_trie_of_the_rows(seed):
    """Pins (a): the trie's nodes are the distinct non-empty prefixes, each path's node t has depth
    t, token s[t] and parent path[t-1], rows sharing a prefix share its nodes, parents precede
    children, the segments are chains covering every node once, and attention_mask() is the
    ancestor-or-self relation found by walking parents."""
    rows = random_forest(seed) if seed < 4 else [
        [3, 1, 2], [3, 1], [3, 1, 2], [3], [4, 1, 2, 5], [3, 1, 2, 5, 6], [4], [3, 2]] if seed == 4 else [[9, 9, 9]]
    seqs = [r.seq if isinstance(r, Row) else r for r in rows]
    packed = pack_rows(seqs)
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    n = len(packed.tokens)
    assert n == len(prefixes) == distinct_tokens(seqs)
    assert len(packed.depth) == len(packed.parent) == n
    node_of: dict[tuple, int] = {}
    for s, path in zip(seqs, packed.paths):
        assert len(path) == len(s)
        for t, node in enumerate(path):
            assert packed.tokens[node] == s[t] and packed.depth[node] == t
            assert packed.parent[node] == (path[t - 1] if t else -1)
            assert node_of.setdefault(tuple(s[:t + 1]), int(node)) == node  # one node per prefix
    assert sorted(node_of.values()) == list(range(n))  # and one prefix per node
    assert all(packed.parent[i] < i for i in range(n))
    covered = []
    for begin, end in packed.segments:
        covered += range(begin, end)
        assert all(packed.parent[i] == i - 1 for i in range(begin + 1, end))
    assert covered == list(range(n))
    mask = packed.attention_mask()
    assert mask.dtype == torch.bool and mask.shape == (n, n)
    assert np.array_equal(mask.numpy(), naive_ancestors(packed.parent))


# == 4. the trainer glue: response_log_probs + the ATPO loss =======================================
def batch_of(rows: list[Row], old: list[torch.Tensor] | None = None, tree_of_row=None) -> TrainBatch:
    """A TrainBatch laid out as build_train_batch lays one out (right-padded response tensors)."""
    width = max(len(r.mask) for r in rows)

    def pad(key, value, dtype):
        out = torch.full((len(rows), width), value, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, :len(r.mask)] = torch.tensor(getattr(r, key), dtype=dtype)
        return out

    old_lp = torch.zeros(len(rows), width)
    if old is not None:
        for i, lp in enumerate(old):
            old_lp[i, :len(lp)] = lp
    trees = np.zeros(len(rows), dtype=np.int64) if tree_of_row is None else np.asarray(tree_of_row, dtype=np.int64)
    return TrainBatch([r.seq for r in rows], [r.start for r in rows], trees, pad("mask", 0, torch.long),
                      old_lp * pad("mask", 0, torch.long), pad("adv", 0.0, torch.float32), pad("turn", -1, torch.long))


def padded(per_row: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(per_row), width)
    for i, lp in enumerate(per_row):
        out[i, :len(lp)] = lp
    return out


@pytest.mark.parametrize("agg", AGGS)
def test_atpo_loss_through_packed_chunked_log_probs_equals_the_reference(agg):
    """response_log_probs(tree_packing=True, chunk_tokens=3) → policy_loss(level="turn") gives the
    reference loss and gradients on a batch of 3 random trees: each row's mask, turn ids and
    advantages stay with its own log-probs (a row order lost in the packing would mix them)."""
    model = tiny_lm(tie=False)
    rows = random_forest(7)
    with torch.no_grad():
        naive = naive_logprobs(model, [r.seq for r in rows], [r.start for r in rows], 1.0)
    rng = np.random.default_rng(0)
    # π_old off by up to ±0.15 a token: some turn ratios inside the 0.1 clip range, some outside.
    old = [lp + torch.tensor(rng.uniform(-0.15, 0.15, len(lp)), dtype=torch.float32) for lp in naive]
    batch = batch_of(rows, old)

    def loss_of(logp):
        loss, m = policy_loss(logp, batch.old_log_probs, batch.advantages, batch.response_mask, level="turn",
                              clip_low=0.1, clip_high=0.1, turn_ids=batch.turn_ids, agg=agg)
        return loss, m

    def run(compute):
        model.zero_grad(set_to_none=True)
        loss, m = loss_of(compute())
        loss.backward()
        return float(loss), m, {n: p.grad.clone() for n, p in model.named_parameters()}

    width = batch.response_mask.shape[1]
    ref_loss, ref_m, ref_g = run(
        lambda: padded(naive_logprobs(model, batch.sequences, batch.response_starts, 1.0), width))
    loss, m, g = run(lambda: response_log_probs(model, batch, 1.0, chunk_tokens=3, tree_packing=True))
    assert 0 < ref_m["clipfrac"] < 1  # both branches of the clipped surrogate are exercised
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    for k in ("clipfrac", "ppo_kl", "turn_kl_entropy", "ratio_mean"):
        assert m[k] == pytest.approx(ref_m[k], rel=1e-4, abs=1e-6), k
    assert_grads_close(g, ref_g, 1e-5, agg)
    # The padded reference path of the trainer (chunk 0, no packing) agrees too.
    loss0, _, g0 = run(lambda: response_log_probs(model, batch, 1.0))
    assert loss0 == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert_grads_close(g0, ref_g, 1e-5, agg)


# == 5. token-budget micro-batches =================================================================
def by_hand_forward_tokens(seqs, packed: bool) -> int:
    if packed:
        return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})
    return len(seqs) * max(map(len, seqs))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("budget", [1, 25, 60, 150, 100_000])
def test_token_budget_micro_batches_hold_every_row_once_within_the_budget(packed, budget):
    """Pins the planner: every row of the mini-batch exactly once, each micro-batch's forward
    (counted by hand: distinct prefixes packed, rows × longest padded) within the budget unless it
    is a single row longer than the budget, and the count of such rows."""
    for seed in range(3):
        seqs = [r.seq for r in random_forest(seed)]
        rows = [i for i in range(len(seqs)) if i % 5 != 2]  # a mini-batch: some rows of the batch
        micros, over = token_budget_micro_batches(seqs, rows, budget, packed)
        assert sorted(r for m in micros for r in m) == sorted(rows)
        assert all(micros)
        for m in micros:
            cost = by_hand_forward_tokens([seqs[r] for r in m], packed)
            assert cost == forward_tokens([seqs[r] for r in m], packed)
            assert cost <= budget or (len(m) == 1 and len(seqs[m[0]]) > budget), (m, cost)
        assert over == sum(len(seqs[r]) > budget for r in rows)
        if budget == 100_000:
            assert len(micros) == 1
        # Greedy: two neighbouring micro-batches would not have fitted together.
        for a, b in zip(micros, micros[1:]):
            assert by_hand_forward_tokens([seqs[r] for r in a + b], packed) > budget
    assert token_budget_micro_batches(seqs, [], 10, packed) == ([], 0)


def test_packed_budget_plan_keeps_a_trees_rows_together():
    """Two trees of 4 rows with a 40-token prompt each, their rows interleaved in the batch: under a
    budget of 80 the packed plan is one micro-batch per tree (each tree's prompt runs once), fewer
    forward tokens than the padded plan's micro-batches would run even packed."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, VOCAB, 40).tolist() for _ in range(2)]
    seqs = [prompts[i % 2] + rng.integers(1, VOCAB, 3 + i).tolist() for i in range(8)]
    micros, over = token_budget_micro_batches(seqs, list(range(8)), 80, packed=True)
    assert over == 0
    assert sorted(map(sorted, micros)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    packed_total = sum(forward_tokens([seqs[r] for r in m], True) for m in micros)
    assert packed_total == 2 * 40 + sum(3 + i for i in range(8))
    padded_micros, _ = token_budget_micro_batches(seqs, list(range(8)), 80, packed=False)
    assert len(padded_micros) == 8  # two 43+-token rows exceed 80 padded
    assert packed_total < sum(forward_tokens([seqs[r] for r in m], True) for m in padded_micros)
    # On random trees too: the lexicographic order shares more than the longest-first order.
    for seed in range(3):
        seqs = [r.seq for r in random_forest(seed)]
        rows = list(range(len(seqs)))
        plans = {p: token_budget_micro_batches(seqs, rows, 60, p)[0] for p in (True, False)}
        totals = {p: sum(forward_tokens([seqs[r] for r in m], True) for m in plans[p]) for p in plans}
        assert totals[True] < totals[False], totals


# -- the trainer's update under a token budget ------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_search_qa_assets(tmp_path_factory.mktemp("logprobs_assets"))


@pytest.fixture(scope="module")
def assets_vocab(assets):
    return json.loads((assets / "model" / "config.json").read_text())["vocab_size"]


def trainer_of(assets, out, *extra):
    tr = Trainer(make_run_cfg(assets, out, "trainer.mini_batch_prompts=1", "algo.recompute_old_logprobs=false",
                              "algo.clip_low=0.2", "algo.clip_high=0.2", "optim.grad_clip=1e9", "optim.lr=1.0",
                              "optim.weight_decay=0", "trainer.save_every=0", *extra, val=False))
    for group in tr.optimizer.param_groups:  # eps = 1 ≫ |g|: Adam's step ≈ lr·g, blind to no scale of g
        group["eps"] = 1.0
    return tr


def forest_batch(vocab: int, seed: int, n_trees: int = 3) -> TrainBatch:
    """A batch of ``n_trees`` random trees (rows interleaved), π_old a fixed offset from a random
    policy's, so ratios are off 1 in both directions."""
    rows = random_forest(seed, n_trees=n_trees, vocab=vocab)
    # Which tree each row belongs to: rows of one tree share their prompt.
    prompts = sorted({tuple(r.seq[:r.start]) for r in rows})
    rng = np.random.default_rng(seed)
    old = [torch.tensor(-3.0 + rng.uniform(-0.3, 0.3, len(r.mask)), dtype=torch.float32) for r in rows]
    return batch_of(rows, old, [prompts.index(tuple(r.seq[:r.start])) for r in rows])


def update_weights(tr, batch, n_trees):
    """(weights before, weights after, metrics, the plans _update drew) of one Trainer._update."""
    model = tr.accelerator.unwrap_model(tr.model)
    before = copy.deepcopy(model)
    plans = []
    draw = tr._epoch_plan
    tr._epoch_plan = lambda b, n: plans.append(draw(b, n)) or plans[-1]
    metrics = tr._update(copy.deepcopy(batch), n_trees=n_trees)
    return before, {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics, plans


def naive_update(model, batch: TrainBatch, plans, cfg) -> dict:
    """The update written out: per mini-batch of the trainer's plan, the loss over ALL its rows at
    once (one plain forward per row, full logits), backward, one AdamW step. No micro-batches, so
    no micro-batch weights to get wrong."""
    model = copy.deepcopy(model).train()
    oc, algo = cfg.optim, cfg.algo
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay, eps=1.0)
    for plan in plans:
        for rows, _ in plan:
            if not rows:
                continue
            mb = batch.rows(rows)
            logp = padded(naive_logprobs(model, mb.sequences, mb.response_starts, cfg.rollout.temperature),
                          mb.response_mask.shape[1])
            loss, _ = policy_loss(logp, mb.old_log_probs, mb.advantages, mb.response_mask, level=algo.loss_level,
                                  clip_low=algo.clip_low, clip_high=algo.clip_high, turn_ids=mb.turn_ids,
                                  agg=algo.loss_agg, log_ratio_max=algo.log_ratio_max)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_update(got: dict, want: dict, w0: dict, rtol: float = 1e-5) -> None:
    """Per tensor: max |Δ| between the two updated weights ≤ rtol · max |update| (the update is
    compared, not the weights, which would hide it), plus 4 fp32 ulps of the weights (an update
    far below a weight's ulp, such as k_proj's here, is rounded away when added to it)."""
    moved = max(float((want[k] - w0[k]).abs().max()) for k in want)
    assert moved > 1e-3, "the update is negligible: equality would be that of two no-ops"
    eps = torch.finfo(torch.float32).eps
    for k in want:
        step = float((want[k] - w0[k]).abs().max())
        diff = float((got[k] - want[k]).abs().max())
        assert diff <= rtol * step + 4 * eps * float(w0[k].abs().max()), f"{k}: |Δ| {diff:.3g} vs update {step:.3g}"


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_under_a_token_budget_equals_the_row_micro_batches_and_the_naive_update(assets, assets_vocab, tmp_path,
                                                                                         agg):
    """Pins (c), a micro-batch weight from the wrong denominator: one _update of 3 random trees (one
    mini-batch per tree) with trainer.micro_batch_tokens=32 (packed, chunked head of 5: several
    micro-batches per tree, of up to 3 rows, a row over the budget) gives the weights of micro_batch_rows=64
    (one padded full-logits micro-batch per tree) and of the update written out by hand, within
    1e-5 of the update; token-mean weights micro-batches by tokens, seq-mean-token-mean by rows."""
    batch = forest_batch(assets_vocab, seed=5)
    budget = 32
    tok = trainer_of(assets, tmp_path / "tok", f"algo.loss_agg={agg}", f"trainer.micro_batch_tokens={budget}",
                     "trainer.logprob_chunk_tokens=5")
    row = trainer_of(assets, tmp_path / "row", f"algo.loss_agg={agg}", "trainer.micro_batch_rows=64",
                     "trainer.tree_packing=false", "trainer.logprob_chunk_tokens=0")
    assert tok.tree_packing and tok.chunk_tokens == 5 and not row.tree_packing and row.chunk_tokens == 0
    before, w_tok, m_tok, plans = update_weights(tok, batch, n_trees=3)
    _, w_row, m_row, row_plans = update_weights(row, batch, n_trees=3)
    w0 = before.state_dict()
    # The budget split every tree's rows: the micro-batch weights matter.
    assert [len(r) for r, _ in plans[0]] == [len(r) for r, _ in row_plans[0]]
    assert all(len(micros) > 1 for _, micros in plans[0]) and all(len(m) == 1 for _, m in row_plans[0])
    assert max(len(m) for _, micros in plans[0] for m in micros) >= 3  # rows packed together
    assert len({len(r) for r, _ in plans[0]}) > 1  # mini-batches of different sizes: different denominators
    over = sum(len(s) > budget for s in batch.sequences)
    assert 0 < over < len(batch.sequences)
    assert m_tok["perf/rows_over_token_budget"] == over and m_row["perf/rows_over_token_budget"] == 0
    assert m_tok["perf/update_forward_tokens"] == sum(by_hand_forward_tokens([batch.sequences[r] for r in m], True)
                                                      for _, micros in plans[0] for m in micros)
    assert m_row["perf/update_forward_tokens"] == sum(by_hand_forward_tokens([batch.sequences[r] for r in rows], False)
                                                      for rows, _ in row_plans[0])
    assert m_tok["loss/updates"] == m_row["loss/updates"] == 3.0
    assert m_tok["loss/policy"] == pytest.approx(m_row["loss/policy"], rel=1e-5)
    want = naive_update(before, batch, plans, tok.cfg)
    assert_same_update(w_row, want, w0)
    assert_same_update(w_tok, want, w0)


def test_rows_over_a_tiny_token_budget_run_alone_and_are_counted(assets, assets_vocab, tmp_path, capsys):
    """A budget of 3 tokens: every row is longer, runs alone, and is counted (and named on stderr)."""
    batch = forest_batch(assets_vocab, seed=6, n_trees=2)
    tr = trainer_of(assets, tmp_path / "run", "trainer.micro_batch_tokens=3")
    _, _, metrics, plans = update_weights(tr, batch, n_trees=2)
    n = len(batch.sequences)
    assert [len(m) for _, micros in plans[0] for m in micros] == [1] * n
    assert metrics["perf/rows_over_token_budget"] == n
    assert metrics["perf/update_forward_tokens"] == sum(map(len, batch.sequences))
    assert f"warning: {n} row(s) longer than trainer.micro_batch_tokens=3 ran alone (process 0)" in capsys.readouterr().err


def test_rows_over_the_budget_are_counted_once_whatever_the_ppo_epochs(assets, assets_vocab, tmp_path, capsys):
    """perf/rows_over_token_budget counts rows (and perf/update_forward_tokens one epoch's forwards):
    with algo.ppo_epochs=2 each row over the budget is still one row."""
    batch = forest_batch(assets_vocab, seed=6, n_trees=2)
    tr = trainer_of(assets, tmp_path / "run", "trainer.micro_batch_tokens=3", "trainer.ppo_epochs=2")
    _, _, metrics, plans = update_weights(tr, batch, n_trees=2)
    n = len(batch.sequences)
    assert len(plans) == 2 and metrics["loss/updates"] == 4.0
    assert metrics["perf/update_forward_tokens"] == sum(map(len, batch.sequences))  # one epoch's
    assert metrics["perf/rows_over_token_budget"] == n
    assert f"warning: {n} row(s) longer" in capsys.readouterr().err


# == 8. LoRA =======================================================================================
@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj", "lm_head"]],
                         ids=["attention", "with-lm_head"])
def test_lora_packed_chunked_equals_the_reference(targets):
    """A PEFT model (apply_lora): packed rows through the chunked head give the reference values and
    adapter gradients, within 1e-5. With lm_head among the targets (untied head) the scoring head
    must call the LoRA-wrapped head, not its base layer."""
    pytest.importorskip("peft")
    from at2po.config import ModelConfig
    from at2po.training.lora import apply_lora

    model = apply_lora(tiny_lm(tie="lm_head" not in targets),
                       ModelConfig(lora_rank=4, lora_alpha=8.0, lora_target_modules=targets))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert ("lm_head" in targets) == any("lm_head" in n for n in trainable)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would give A no gradient and the adapters no effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    rows = random_forest(2)
    seqs, starts = [r.seq for r in rows], mixed_starts(rows, 2)
    w = token_weights(seqs, starts)
    ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 1.0), w)
    with model.disable_adapter(), torch.no_grad():
        base = naive_logprobs(model, seqs, starts, 1.0)
    assert max(float((a - b).abs().max()) for a, b in zip(ref_v, base) if a.numel()) > 1e-2  # the adapters act
    v, g = values_and_grads(model, lambda: sequence_logprobs(model, seqs, starts, 1.0, chunk_tokens=4,
                                                             tree_packing=True), w)
    assert_values_close(v, ref_v, 1e-5, "lora")
    assert_grads_close(g, ref_g, 1e-5, "lora")
    assert set(g) == set(trainable)


# == 9. fallbacks ==================================================================================
def test_packing_fallback_reason_names_attentions_without_masks_and_sliding_windows():
    model = tiny_lm()
    assert packing_fallback_reason(model) is None
    assert packing_fallback_reason(tiny_lm("llama", attn="eager")) is None
    for impl in ("flash_attention_2", "flex_attention"):
        model.config._attn_implementation = impl
        reason = packing_fallback_reason(model)
        assert reason is not None and repr(impl) in reason
        wrapped = torch.nn.Module()
        wrapped.module = model  # DDP's wrapper: the reason is the inner model's
        assert packing_fallback_reason(wrapped) == reason
    sliding = tiny_lm(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert sliding.config.layer_types == ["full_attention", "sliding_attention"]
    assert "sliding-window layers" in packing_fallback_reason(sliding)
    llama = tiny_lm("llama")  # no layer_types: the flag is what says it
    assert getattr(llama.config, "layer_types", None) is None
    llama.config.use_sliding_window, llama.config.sliding_window = True, 8
    assert "use_sliding_window" in packing_fallback_reason(llama)
    llama.config.sliding_window = None  # the flag without a window: no window
    assert packing_fallback_reason(llama) is None


def test_head_fallback_reason_names_logit_post_processing():
    model = tiny_lm()
    assert head_fallback_reason(model) is None
    for name, value, neutral in (("final_logit_softcapping", 30.0, None), ("logit_scale", 0.5, 1.0),
                                 ("logits_scaling", 2.0, 1.0)):
        setattr(model.config, name, neutral)
        assert head_fallback_reason(model) is None, name
        setattr(model.config, name, value)
        reason = head_fallback_reason(model)
        assert reason is not None and f"config.{name}={value}" in reason
        setattr(model.config, name, neutral)


def tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                          final_logit_softcapping=3.0, sliding_window=6, bos_token_id=None, eos_token_id=0,
                          pad_token_id=0, initializer_range=0.2, max_position_embeddings=1024)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gemma2ForCausalLM(config).eval()


def test_a_softcapping_model_falls_back_to_full_logits_and_stays_exact(monkeypatch):
    """Gemma2 soft-caps its logits after the head (final_logit_softcapping): the scoring head would
    skip that, so sequence_logprobs(chunk_tokens=...) runs the full logits and equals the reference
    (values and gradients); forced through the scoring head it would not (the fallback matters)."""
    model = tiny_gemma2()
    assert "final_logit_softcapping" in head_fallback_reason(model)
    assert "sliding-window layers" in packing_fallback_reason(model)
    seqs, starts = CHUNK_SEQS, CHUNK_STARTS
    w = token_weights(seqs, starts)
    ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 0.7), w)
    v, g = values_and_grads(model, lambda: sequence_logprobs(model, seqs, starts, 0.7, chunk_tokens=4), w)
    assert_values_close(v, ref_v, 1e-5, "softcapped")
    assert_grads_close(g, ref_g, 1e-5, "softcapped")
    import at2po.training.logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "head_fallback_reason", lambda m: None)
    with torch.no_grad():
        forced = sequence_logprobs(model, seqs, starts, 0.7, chunk_tokens=4)
    assert max(float((a - b).abs().max()) for a, b in zip(forced, ref_v) if b.numel()) > 1e-2


def test_packing_a_sliding_window_model_would_be_wrong():
    """Why packing_fallback_reason refuses sliding windows: a window of 4 positions cuts a row's
    attention, and the packed ancestor mask does not (the fallback is what keeps the update exact)."""
    model = tiny_lm(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    rows = random_forest(1)
    seqs, starts = [r.seq for r in rows], [r.start for r in rows]
    with torch.no_grad():
        ref = naive_logprobs(model, seqs, starts, 1.0)
        padded_path = sequence_logprobs(model, seqs, starts, 1.0, chunk_tokens=4)
        packed = sequence_logprobs(model, seqs, starts, 1.0, chunk_tokens=4, tree_packing=True)
    assert_values_close(padded_path, ref, 1e-5, "padded, windowed")
    assert max(float((a - b).abs().max()) for a, b in zip(packed, ref)) > 1e-2


@pytest.fixture(scope="module")
def fallback_assets(assets, tmp_path_factory):
    """The tiny assets with a model whose config asks for both fallbacks: sliding-window layers
    and soft-capped logits."""
    root = tmp_path_factory.mktemp("fallback_assets")
    shutil.copytree(assets / "model", root / "model")
    for name in ("corpus.jsonl", "train.jsonl"):
        shutil.copy(assets / name, root / name)
    path = root / "model" / "config.json"
    config = json.loads(path.read_text())
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                  layer_types=["sliding_attention"] * config["num_hidden_layers"], final_logit_softcapping=30.0)
    path.write_text(json.dumps(config))
    return root


def test_trainer_turns_both_paths_off_for_a_model_that_cannot_take_them_and_says_why(assets, fallback_assets,
                                                                                     assets_vocab, tmp_path, capsys):
    tr = Trainer(make_run_cfg(fallback_assets, tmp_path / "run", val=False))  # defaults: packing on, chunks of 1024
    out = capsys.readouterr().out
    assert tr.cfg.trainer.tree_packing and tr.cfg.trainer.logprob_chunk_tokens == 1024
    assert not tr.tree_packing and tr.chunk_tokens == 0
    assert ("trainer.tree_packing: off for this model (the model has sliding-window layers (config.layer_types)); "
            "rows run padded") in out
    assert ("trainer.logprob_chunk_tokens: off for this model (the model post-processes its logits after the head "
            "(config.final_logit_softcapping=30.0)); full logits are computed") in out
    # The trainer's log-probs are the windowed per-row ones.
    batch = forest_batch(assets_vocab, seed=3, n_trees=2)
    model = tr.accelerator.unwrap_model(tr.model)
    with torch.no_grad():
        got = tr._log_probs(tr.model, batch)
        want = padded(naive_logprobs(model, batch.sequences, batch.response_starts, 1.0), got.shape[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The same model without those settings takes both: nothing is said, both stay on.
    on = Trainer(make_run_cfg(assets, tmp_path / "on", val=False))
    assert on.tree_packing and on.chunk_tokens == 1024 and "off for this model" not in capsys.readouterr().out


# == 6. DDP: 2 processes under a token budget ======================================================
DIST_CORPUS = ["Zorbex was founded by Mila Tarn.", "Mila Tarn was born in Quovia.", "Quovia is a city in Belmark.",
               "Drelto is a river that flows through Quovia."]
DIST_QUESTIONS = [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
                  ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")]
RUN_TIMEOUT = 150  # seconds per launched run: a hang (unequal collectives) fails instead of blocking


@pytest.fixture(scope="module")
def dist_assets(tmp_path_factory):
    """tests/training/test_distributed.py's assets (dist_worker.py's scripted turns are keyed to them)."""
    from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
    from conftest import write_search_qa_files

    root = tmp_path_factory.mktemp("logprobs_dist_assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + DIST_CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, DIST_CORPUS, DIST_QUESTIONS)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo"}


def run_to_end(command: list[str]) -> None:
    """Run a launcher to its end within RUN_TIMEOUT; on a timeout kill its whole process tree (by
    id: torchrun starts its workers in sessions of their own) and fail."""
    import psutil

    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid)
        for p in [*tree.children(recursive=True), tree]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        pytest.fail(f"{command[-1]} timed out after {RUN_TIMEOUT} s:\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]


def accelerate_launch(processes: int, script: Path, *args) -> list[str]:
    if processes == 1:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--mixed_precision", "no",
            "--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(script), *map(str, args)]


def test_two_process_update_under_a_token_budget_equals_the_one_process_reference(dist_assets, tmp_path):
    """test_distributed.py's 2-process update (scripted rollouts, rank 0 holds 8 rows, rank 1
    10), now with trainer.micro_batch_tokens (packed rows, chunked head): each rank plans its own
    micro-batches (different counts: the padded plan runs zero-weight forwards) and the updated
    weights equal one process's reference update (padded full-logits micro-batches of 2 rows)
    within 1e-6 (lr 1, so the update is the gradient: pins (c) under DDP as well)."""
    from conftest import own_processes_end

    common = ["rollout.samples_per_tree=0", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.root_fallback=false",
              "rollout.n_initial=3", "rollout.max_response_tokens=400", "rollout.chunk_tokens=64", "data.shuffle=false",
              "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4", "algo.loss_agg=token-mean", "optim.lr=1.0",
              "optim.grad_clip=1e6", "data.val_file=", "trainer.save_every=0"]
    reference = [*common, "trainer.micro_batch_rows=2", "trainer.tree_packing=false", "trainer.logprob_chunk_tokens=0"]
    budget = [*common, f"trainer.micro_batch_tokens={DDP_BUDGET}", "trainer.logprob_chunk_tokens=7"]
    worker = HERE / "logprobs_ddp_worker.py"
    with own_processes_end():
        run_to_end(accelerate_launch(1, worker, "update", dist_assets, tmp_path, "one", *reference))
        run_to_end(accelerate_launch(2, worker, "update", dist_assets, tmp_path, "two", *budget))
    one, two = (torch.load(tmp_path / f"{t}_weights.pt") for t in ("one", "two"))
    m1, m2 = one["metrics"], two["metrics"]
    ranks = [json.loads((tmp_path / f"two_plan_rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank's rows once; micro-batches within the budget but for single long rows; unequal counts
    # (measured: 4 and 5 micro-batches of rows of 571-653 tokens, 5 rows over the 650 budget).
    counts = []
    for r in ranks:
        ((rows, micros),) = r["plans"][0]  # one mini-batch of the 2 prompts a rank holds
        assert sorted(x for m in micros for x in m) == sorted(rows) == list(range(len(r["lengths"])))
        assert all(len(m) == 1 for m in micros if any(r["lengths"][x] > DDP_BUDGET for x in m))
        counts.append(len(micros))
    assert min(counts) > 1 and counts[0] != counts[1], counts
    over = sum(n > DDP_BUDGET for r in ranks for n in r["lengths"])
    assert m2["perf/rows_over_token_budget"] == over > 0 and m1["perf/rows_over_token_budget"] == 0
    assert m1["rollout/tool_calls"] == m2["rollout/tool_calls"]  # the same rollouts
    assert m2["perf/update_forward_tokens"] < m1["perf/update_forward_tokens"]  # the packing shares prompts
    assert m1["loss/policy"] == pytest.approx(m2["loss/policy"], abs=1e-6)
    assert sum(two["allreduces"]) == 1  # one gradient all-reduce for the one mini-batch (no_sync on the others)
    from safetensors.torch import load_file

    w0 = load_file(str(dist_assets / "model" / "model.safetensors"))
    assert max(float((one["weights"][k] - w0[k]).abs().max()) for k in w0) > 1e-4
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], atol=1e-6, rtol=0, msg=k)


DDP_BUDGET = 650  # tokens: the rows are 571-653 tokens (a 570-token prompt shared by a tree's rows)


# == 7. FSDP2: 2 processes, sharded parameters =====================================================
def test_fsdp2_packed_chunked_log_probs_and_gradients_equal_the_one_process_reference(tmp_path):
    """Each rank runs its own trees through sequence_logprobs(chunk_tokens=3, tree_packing=True) on a
    fully_shard-ed model (the output head runs, and is re-run in the checkpointed backward, on
    gathered parameters; tied and untied heads); the gathered gradient (FSDP2 averages over ranks)
    equals the 1-process gradient of the mean of both ranks' Σ w·log-prob, and each rank's values
    its rows' reference, within 1e-5."""
    from conftest import own_processes_end

    models = {"tied": tiny_lm(tie=True), "untied": tiny_lm(tie=False, seed=1)}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    ranks = []
    for seed in (20, 21):
        rows = random_forest(seed, n_trees=2)
        seqs, starts = [r.seq for r in rows], mixed_starts(rows, seed)
        weights = [w.tolist() for w in token_weights(seqs, starts, seed)]
        ranks.append({"sequences": seqs, "starts": starts, "weights": weights})
    ranks[1]["sequences"] = ranks[1]["sequences"][:-3]  # unequal row counts and packed lengths
    ranks[1]["starts"], ranks[1]["weights"] = ranks[1]["starts"][:-3], ranks[1]["weights"][:-3]
    spec = {"temperature": 0.9, "chunk_tokens": 3, "ranks": ranks}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker = HERE / "logprobs_fsdp_worker.py"
    with own_processes_end():
        run_to_end([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), str(worker), str(tmp_path / "spec.json"), str(tmp_path),
                    *(str(tmp_path / name) for name in models)])
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        total = 0
        for r, part in enumerate(ranks):
            want = naive_logprobs(model, part["sequences"], part["starts"], 0.9)
            got = torch.load(tmp_path / f"{name}_values_rank{r}.pt")
            assert_values_close(got, [x.detach() for x in want], 1e-5, f"{name} rank {r}")
            total = total + sum((torch.tensor(w) * lp).sum() for w, lp in zip(part["weights"], want)) / 2
        total.backward()
        want_g = {n: p.grad for n, p in model.named_parameters()}
        assert_grads_close(torch.load(tmp_path / f"{name}_grads.pt"), want_g, 1e-5, name)


# == 11. gaps found by mutation testing (benchmarks/results/mutation-2026-12-07/) ==================
class ConfiglessLM(torch.nn.Module):
    """A causal LM that is not a transformers model: no ``config``, no attention. The output at
    position p is head(embed(token p) + pos(position p)), so the naive per-row forward (positions
    0..len-1) is a reference the packed sequence reproduces only with each node's depth as its
    position and its parent's output scoring it."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.pos = torch.nn.Embedding(256, hidden)
            self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        from types import SimpleNamespace

        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        return SimpleNamespace(logits=self.head(self.embed(input_ids) + self.pos(position_ids)))


def test_a_model_without_a_config_is_packed_and_scored_exactly():
    """No ``config`` attribute reads as no config: the packing fallback names the missing attention
    implementation (it does not raise), and the packed path (full logits and chunked head) runs
    without one and equals the per-row reference, values and gradients."""
    model = ConfiglessLM()
    assert not hasattr(model, "config")
    assert packing_fallback_reason(model) == "attention implementation None takes no custom 4-D mask (sdpa or eager do)"
    assert head_fallback_reason(model) is None
    rows = random_forest(4)
    seqs, starts = [r.seq for r in rows], mixed_starts(rows, 4)
    w = token_weights(seqs, starts, 4)
    ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 0.8), w)
    for chunk in (0, 5):
        v, g = values_and_grads(
            model, lambda: sequence_logprobs(model, seqs, starts, 0.8, chunk_tokens=chunk, tree_packing=True), w)
        assert_values_close(v, ref_v, 1e-5, f"configless, chunk {chunk}")
        assert_grads_close(g, ref_g, 1e-5, f"configless, chunk {chunk}")


def test_packing_fallback_reason_reads_absent_config_fields_as_off():
    """A config without ``use_sliding_window`` has no sliding window whatever its ``sliding_window``;
    one with the flag but no ``sliding_window`` field has none either; both flag and window: the
    reason, word for word."""
    from types import SimpleNamespace

    def with_config(**fields) -> torch.nn.Module:
        m = torch.nn.Module()
        m.config = SimpleNamespace(**fields)
        return m

    assert packing_fallback_reason(with_config(_attn_implementation="sdpa", sliding_window=8)) is None
    assert packing_fallback_reason(with_config(_attn_implementation="eager", use_sliding_window=True)) is None
    assert packing_fallback_reason(with_config(_attn_implementation="sdpa", use_sliding_window=True,
                                               sliding_window=8)) == \
        "the model uses sliding-window attention (config.use_sliding_window)"
    assert packing_fallback_reason(with_config()) == \
        "attention implementation None takes no custom 4-D mask (sdpa or eager do)"


def test_token_budget_plan_by_hand_after_a_row_over_the_budget():
    """A row over the budget runs alone and the next micro-batch starts empty: the two rows after it
    (3 new tokens each) fill a budget of 6 exactly, together. Packed: lexicographic order, a shared
    prefix counted once; padded: longest first, rows × longest."""
    seqs = [[3, 3, 3], [1] * 8, [2, 2, 2]]
    assert token_budget_micro_batches(seqs, [0, 1, 2], 6, packed=True) == ([[1], [2, 0]], 1)
    assert token_budget_micro_batches(seqs, [0, 1, 2], 6, packed=False) == ([[1], [0, 2]], 1)
    shared = [[5, 5, 1], [5, 5, 2], [5, 5, 3]]  # packed: 3 + 1 + 1 tokens
    assert token_budget_micro_batches(shared, [0, 1, 2], 5, packed=True) == ([[0, 1, 2]], 0)
    assert token_budget_micro_batches(shared, [0, 1, 2], 4, packed=True) == ([[0, 1], [2]], 0)
    assert token_budget_micro_batches(shared, [0, 1, 2], 6, packed=False) == ([[0, 1], [2]], 0)


def _trainer_stub(**attrs) -> Trainer:
    """A Trainer without its __init__ (no model, no run): just the attributes a method reads."""
    stub = Trainer.__new__(Trainer)
    for k, v in attrs.items():
        setattr(stub, k, v)
    return stub


def test_epoch_plan_by_hand():
    """Trainer._epoch_plan: mini-batches of mini_batch_prompts // processes whole trees (at least 1)
    in the shuffle generator's order; micro-batches of micro_batch_rows rows, or under
    micro_batch_tokens the planner's (packed or padded as the trainer runs; the rows over the
    budget, each alone, are counted by the update: test_rows_over_a_tiny_token_budget_*, test_rows_over_the_budget_are_counted_once_*)."""
    from types import SimpleNamespace

    seqs = [[1] * 4, [2] * 4, [3] * 4, [4] * 4, [5] * 4, [6] * 9]
    tree_of_row = np.array([0, 1, 2, 0, 1, 2])
    batch = SimpleNamespace(sequences=seqs, tree_of_row=tree_of_row)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(5)).tolist()
    rows_of = lambda trees: [i for i in range(6) if tree_of_row[i] in trees]  # noqa: E731

    def plan(mini, procs, micro_rows=1, tokens=0, packing=False):
        tc = SimpleNamespace(mini_batch_prompts=mini, micro_batch_rows=micro_rows, micro_batch_tokens=tokens)
        stub = _trainer_stub(cfg=SimpleNamespace(trainer=tc), shuffle_rng=torch.Generator().manual_seed(5),
                             accelerator=SimpleNamespace(num_processes=procs), tree_packing=packing)
        return Trainer._epoch_plan(stub, batch, 3)

    first, rest = rows_of(order[:2]), rows_of(order[2:])
    assert plan(4, 2, micro_rows=3) == [(first, [first[:3], first[3:]]), (rest, [rest])]
    assert plan(5, 2, micro_rows=2) == plan(4, 2, micro_rows=2)  # 5 // 2 = 2 trees
    assert plan(3, 2, micro_rows=1) == plan(1, 2, micro_rows=1) == \
        [(rows_of([t]), [[r] for r in rows_of([t])]) for t in order]  # at least one tree
    everything = [0, 1, 2, 3, 4, 5]
    assert plan(3, 1, tokens=8, packing=True) == [(everything, [[0, 1], [2, 3], [4], [5]])]
    assert plan(3, 1, tokens=8, packing=False) == [(everything, [[5], [0, 1], [2, 3], [4]])]


def test_trainer_log_probs_hands_its_paths_to_the_forward(monkeypatch):
    """Trainer._log_probs: the rollout temperature, the trainer's chunk size and packing (as
    resolved against the model's fallbacks), and share_prefix=False as an unshareable prefix
    reach sequence_logprobs; its per-row log-probs come back right-padded in fp32."""
    import at2po.training.trainer as trainer_module
    from types import SimpleNamespace

    calls = []

    def spy(model, sequences, starts, temperature=1.0, max_batch_size=None, min_shared_prefix=32, *,
            chunk_tokens=1024, tree_packing=False):
        calls.append(dict(model=model, temperature=temperature, min_shared_prefix=min_shared_prefix,
                          chunk_tokens=chunk_tokens, tree_packing=tree_packing))
        return [torch.full((len(s) - st,), float(i + 1)) for i, (s, st) in enumerate(zip(sequences, starts))]

    monkeypatch.setattr(trainer_module, "sequence_logprobs", spy)
    batch = SimpleNamespace(sequences=[[1, 2, 3], [1, 2, 3, 4, 5]], response_starts=[2, 3],
                            response_mask=torch.ones(2, 3))
    model = object()
    for chunk, packing in ((5, True), (0, False)):
        stub = _trainer_stub(cfg=SimpleNamespace(rollout=SimpleNamespace(temperature=0.7)), chunk_tokens=chunk,
                             tree_packing=packing)
        for share, min_shared in ((True, 32), (False, sys.maxsize)):
            out = Trainer._log_probs(stub, model, batch, share_prefix=share)
            assert calls.pop() == dict(model=model, temperature=0.7, min_shared_prefix=min_shared,
                                       chunk_tokens=chunk, tree_packing=packing)
            assert out.dtype == torch.float32
            assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))
        Trainer._log_probs(stub, model, batch)  # share_prefix defaults to True
        assert calls.pop()["min_shared_prefix"] == 32


def test_no_scored_position_gives_fp32_log_probs_whatever_the_model_dtype():
    """chunked_token_logprobs over no position returns an empty fp32 tensor (as the docstring
    promises) also from bf16 hidden states; so does sequence_logprobs for rows without a response
    token under a bf16 model."""
    head = torch.nn.Linear(8, 11, bias=False).to(torch.bfloat16)
    empty = chunked_token_logprobs(head, torch.zeros(0, 8, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long),
                                   1.0, 4)
    assert empty.dtype == torch.float32 and empty.shape == (0,)
    model = tiny_lm(dtype=torch.bfloat16)
    seqs = [[5, 6, 7], [5, 6, 8, 9]]
    for packing in (False, True):
        with torch.no_grad():
            out = sequence_logprobs(model, seqs, [3, 4], chunk_tokens=4, tree_packing=packing)
        assert [(t.dtype, t.shape) for t in out] == [(torch.float32, (0,))] * 2, packing


def test_head_fallback_reason_of_a_model_without_an_output_head():
    """No get_output_embeddings, or one returning None: the reason, word for word."""
    reason = "the model has no output head (get_output_embeddings() is None)"
    assert head_fallback_reason(torch.nn.Linear(2, 2)) == reason
    headless = ConfiglessLM()
    headless.get_output_embeddings = lambda: None
    assert head_fallback_reason(headless) == reason


def test_the_padded_path_shares_a_prefix_from_min_shared_prefix_tokens_on_and_never_caches_otherwise():
    """Rows sharing a 10-token prompt prefix: with min_shared_prefix 10 (or less) the prefix runs
    once (2 forwards, the second on the repeated cache), with 11 or more (the default 32, and
    sys.maxsize, the trainer's share_prefix=False) one forward with use_cache=False (no KV cache
    built for nothing); the values are the reference's either way. Packed: one forward, no cache."""
    model = tiny_lm()
    prefix = list(range(1, 11))
    seqs = [prefix + [20, 21, 22], prefix + [30, 31], prefix + [40, 41, 42, 43]]
    starts = [11, 11, 12]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    try:
        with torch.no_grad():
            ref = naive_logprobs(model, seqs, starts, 1.0)
            calls.clear()
            for min_shared, want in ((4, [True, True]), (10, [True, True]), (11, [False]), (32, [False]),
                                     (sys.maxsize, [False])):
                out = sequence_logprobs(model, seqs, starts, 1.0, min_shared_prefix=min_shared)
                assert calls == want, (min_shared, calls)
                assert_values_close(out, ref, 1e-5, f"min_shared_prefix {min_shared}")
                calls.clear()
            sequence_logprobs(model, seqs, starts, 1.0)
            assert calls == [False]  # the default, 32
            calls.clear()
            sequence_logprobs(model, seqs, starts, 1.0, tree_packing=True)
            assert calls == [False]
    finally:
        hook.remove()


def test_forward_tokens_by_hand():
    """No rows: no forward, 0 tokens (both ways); packed: the distinct prefixes; padded: rows × longest."""
    assert forward_tokens([], packed=True) == forward_tokens([], packed=False) == 0
    seqs = [[1, 2, 3], [1, 2, 4, 5], [7]]
    assert forward_tokens(seqs, packed=True) == 3 + 2 + 1
    assert forward_tokens(seqs, packed=False) == 3 * 4


def test_chunk_tokens_decides_how_the_output_head_runs_padded_and_packed():
    """chunk_tokens > 0 runs the real head only on the scored positions, at most chunk_tokens rows a
    call (never on the full (1, N, H) hidden states), padded and packed alike; 0 runs it once on
    the full hidden states. The values are the same, so only the calls tell the paths apart."""
    model = tiny_lm()
    rows = random_forest(5, n_trees=2)
    seqs, starts = [r.seq for r in rows], mixed_starts(rows, 5)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    try:
        for packing in (False, True):
            n_scored = (len(np.unique(np.concatenate([p[s:] for p, s in zip(pack_rows(seqs).paths, starts)])))
                        if packing else sum(len(s) - st for s, st in zip(seqs, starts)))
            with torch.no_grad():
                sequence_logprobs(model, seqs, starts, chunk_tokens=4, tree_packing=packing)
            assert calls and all(len(c) == 2 and c[0] <= 4 for c in calls), (packing, calls)
            assert sum(c[0] for c in calls) == n_scored, packing
            calls.clear()
            with torch.no_grad():
                sequence_logprobs(model, seqs, starts, chunk_tokens=0, tree_packing=packing)
            assert len(calls) == 1 and len(calls[0]) == 3, (packing, calls)
            calls.clear()
    finally:
        hook.remove()


def test_pack_rows_of_no_rows_and_of_empty_rows():
    """The trie of no rows is empty (int64 arrays, no paths, no segments); an empty row has an
    empty path and adds no node, and the arrays stay int64 beside it."""
    empty = pack_rows([])
    for name in ("tokens", "depth", "parent"):
        a = getattr(empty, name)
        assert a.dtype == np.int64 and a.shape == (0,), name
    assert empty.paths == [] and empty.segments == []
    assert distinct_tokens([]) == 0
    assert empty.attention_mask().shape == (0, 0)
    packed = pack_rows([[4, 5], [], [4, 6]])
    for name in ("tokens", "depth", "parent"):
        assert getattr(packed, name).dtype == np.int64, name
    assert packed.tokens.tolist() == [4, 5, 6] and packed.parent.tolist() == [-1, 0, 0]
    assert [p.tolist() for p in packed.paths] == [[0, 1], [], [0, 2]]
    only_empty = pack_rows([[]])
    assert only_empty.tokens.dtype == np.int64 and only_empty.tokens.shape == (0,)
    assert [p.tolist() for p in only_empty.paths] == [[]]


@pytest.mark.parametrize("bias", [False, True], ids=["linear-head", "module-head"])
def test_the_chunked_head_keeps_no_chunk_logits_for_the_backward(bias):
    """With gradients on, nothing of a chunk's (rows, V) logits is saved for the backward (the
    backward recomputes them): a bias-free linear head through _LinearHeadLogprobs (it saves the
    hidden states, the weight itself and one log-sum-exp per position), a head with a bias through
    its own forward in checkpointed chunks. Both gradients equal the full logits' ones."""
    torch.manual_seed(0)
    vocab = 1000
    head = torch.nn.Linear(8, vocab, bias=bias)
    hidden = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (12,))
    saved = []

    def pack(t):
        if t is not head.weight:  # a parameter saved by reference is no new memory
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = chunked_token_logprobs(head, hidden, targets, 0.9, 4)
    assert max(saved, default=0) < vocab, saved
    (lp * torch.arange(1.0, 13.0)).sum().backward()
    got_h, got_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    ref = torch.log_softmax(head(hidden) / 0.9, dim=-1).gather(1, targets[:, None])[:, 0]
    (ref * torch.arange(1.0, 13.0)).sum().backward()
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_h, hidden.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_w, head.weight.grad, atol=1e-6, rtol=1e-6)  # entries up to ~15


@pytest.mark.parametrize("bias", [False, True], ids=["linear-head", "module-head"])
def test_a_trainable_head_over_a_frozen_body_gets_its_gradient_through_the_chunked_head(bias):
    """Only the (untied) output head trains, so the hidden states entering the chunked head need no
    gradient: the head's gradient must still come out, equal to the full-logits reference, padded
    and packed, through the fused head and through a head with a bias (its checkpointed module
    path: a re-entrant checkpoint would lose it)."""
    model = tiny_lm(tie=False)
    if bias:
        with torch.no_grad():
            head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
            head.weight.copy_(model.lm_head.weight)
            head.bias.copy_(torch.linspace(-1.0, 1.0, head.out_features))
        model.lm_head = head
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lm_head"))
    seqs, starts = CHUNK_SEQS, CHUNK_STARTS
    w = token_weights(seqs, starts)
    ref_v, ref_g = values_and_grads(model, lambda: naive_logprobs(model, seqs, starts, 0.7), w)
    assert list(ref_g) == (["lm_head.weight", "lm_head.bias"] if bias else ["lm_head.weight"])
    for packing in (False, True):
        v, g = values_and_grads(
            model, lambda: sequence_logprobs(model, seqs, starts, 0.7, chunk_tokens=4, tree_packing=packing), w)
        assert_values_close(v, ref_v, 1e-5, f"frozen body, packed={packing}")
        assert_grads_close(g, ref_g, 1e-5, f"frozen body, packed={packing}")


def test_sequence_logprobs_names_what_is_wrong_with_its_arguments():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"^2 sequences but 1 response starts$"):
        sequence_logprobs(model, [[1, 2], [3, 4]], [1])
    for start in (0, 3):
        with pytest.raises(ValueError, match=rf"^response start {start} outside \[1, 2\]$"):
            sequence_logprobs(model, [[1, 2]], [start])
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0.0$"):
        sequence_logprobs(model, [[1, 2]], [1], temperature=0.0)
    with pytest.raises(ValueError, match=r"^chunk_tokens must be >= 0, got -1$"):
        sequence_logprobs(model, [[1, 2]], [1], chunk_tokens=-1)
