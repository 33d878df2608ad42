import math

import pytest
import torch

from at2po.algorithms.losses import (
    AGGS, LEVELS, _group_index, aggregate, kl_penalty, logprob_mismatch, policy_loss, turn_ids_from_mask, turn_kl_entropy,
)


# ---------------------------------------------------------------- naive reference (loops)
def naive_turn_ids(mask_row):
    ids, k, prev = [], -1, 0
    for m in mask_row:
        if m and not prev:
            k += 1
        ids.append(k if m else -1)
        prev = m
    return ids


def naive_policy_loss(logp, old, adv, mask, level, clip_low, clip_high, turn_ids=None, agg="seq-mean-token-mean", lr_max=10.0):
    """Row by row, turn by turn, token by token; returns (loss, per-token ratio values, metrics)."""
    B, T = logp.shape
    row_losses, tok_losses, n_tok = [], [], 0
    clipped, kl_sum, hturn = 0, 0.0, []
    for i in range(B):
        m = [int(x) for x in mask[i].tolist()]
        tids = turn_ids[i].tolist() if turn_ids is not None else naive_turn_ids(m)
        idx = [t for t in range(T) if m[t]]
        groups = {}
        for t in idx:
            groups.setdefault(tids[t], []).append(t)
        losses = []
        for t in idx:
            if level == "token":
                s = torch.exp(torch.clamp(logp[i, t] - old[i, t], max=lr_max))
            else:
                members = idx if level == "sequence" else groups[tids[t]]
                lr = sum((logp[i, u] - old[i, u]) for u in members) / len(members)
                s = torch.exp(torch.clamp(lr.detach(), max=lr_max)) * torch.exp(logp[i, t] - logp[i, t].detach())
            l1 = -adv[i, t] * s
            l2 = -adv[i, t] * torch.clamp(s, 1 - clip_low, 1 + clip_high)
            losses.append(torch.maximum(l1, l2))
            clipped += int(l2.item() > l1.item())
            kl_sum += float(old[i, t] - logp[i, t].detach())
        n_tok += len(idx)
        tok_losses += losses
        if agg == "seq-mean-token-mean":
            row_losses.append(sum(losses) / len(losses) if losses else torch.zeros(()))
        else:
            row_losses.append(sum(losses) if losses else torch.zeros(()))
        # H_turn, Eq. 13
        if groups:
            kls = [sum(float(logp[i, u].detach() - old[i, u]) for u in g) for g in groups.values()]
            kseq = sum(float(logp[i, u].detach() - old[i, u]) for u in idx)
            if abs(kseq) <= 1e-8:
                kseq = -1e-8 if kseq < 0 else 1e-8
            if len(kls) == 1:
                hturn.append(0.0)
            else:
                xs = [k / kseq for k in kls]
                mx = max(xs)
                ex = [math.exp(x - mx) for x in xs]
                p = [e / sum(ex) for e in ex]
                hturn.append(-sum(q * math.log(q) for q in p if q > 0) / math.log(len(kls)))
    if agg == "token-mean":
        loss = sum(tok_losses) / max(n_tok, 1) if tok_losses else torch.zeros(())
    else:
        loss = sum(row_losses) / B
    metrics = {
        "clipfrac": clipped / max(n_tok, 1),
        "ppo_kl": kl_sum / max(n_tok, 1),
        "turn_kl_entropy": sum(hturn) / len(hturn) if hturn else 0.0,
    }
    return loss, metrics


def random_batch(seed, B, T, p_mask=0.3, scale=0.05, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = (old + scale * torch.randn(B, T, generator=g, dtype=dtype))
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > p_mask).long()
    return logp, old, adv, mask


CLIPS = {"token": (0.2, 0.28), "sequence": (3e-4, 4e-4), "turn": (3e-3, 4e-3)}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (6, 33), (4, 64)])
def test_loss_and_grad_match_naive(level, agg, shape):
    B, T = shape
    for seed in range(3):
        logp, old, adv, mask = random_batch(seed, B, T, scale=0.01 if level != "token" else 0.3)
        lo, hi = CLIPS[level]
        x = logp.clone().requires_grad_(True)
        loss, metrics = policy_loss(x, old, adv, mask, level=level, clip_low=lo, clip_high=hi, agg=agg)
        loss.backward()
        y = logp.clone().float().requires_grad_(True)
        ref, ref_metrics = naive_policy_loss(y, old.float(), adv.float(), mask, level, lo, hi, agg=agg)
        if isinstance(ref, torch.Tensor) and ref.requires_grad:
            ref.backward()
            ref_grad = y.grad
        else:
            ref_grad = torch.zeros_like(y)
        torch.testing.assert_close(loss, torch.as_tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.float(), ref_grad, rtol=1e-5, atol=1e-6)
        for k in ref_metrics:
            assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-4, abs=1e-5), k


def test_turn_grad_has_the_spec_stop_gradient_structure():
    # One row, two turns [0,1] and [3,4] (token 2 masked), no clipping (wide clip range).
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.7]])
    delta = torch.tensor([[0.1, 0.3, 9.0, -0.2, 0.0]])
    adv = torch.tensor([[2.0, 2.0, 0.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    x = (old + delta).requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, level="turn", clip_low=10.0, clip_high=10.0)
    loss.backward()
    s1, s2 = math.exp(0.2), math.exp(-0.1)  # geometric-mean ratios of the two turns
    # L = −(1/1)(1/4) Σ A_t s_turn(t); dL/dlogπ_t = −A_t s_turn(t) / 4 (only the token's own path)
    expected_loss = -(2 * s1 * 2 + (-1) * s2 * 2) / 4
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[-2 * s1 / 4, -2 * s1 / 4, 0.0, s2 / 4, s2 / 4]]))
    # Sequence level: one ratio exp(mean of all 4 log-ratios) = exp(0.05)
    x.grad = None
    loss, _ = policy_loss(x, old, adv, mask, level="sequence", clip_low=10.0, clip_high=10.0)
    loss.backward()
    s = math.exp(0.05)
    torch.testing.assert_close(x.grad, torch.tensor([[-2 * s / 4, -2 * s / 4, 0.0, s / 4, s / 4]]))


def test_ratio_far_from_one_is_clipped():
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    # Turn ratio e^1 (>1+ε_high) with A>0: clipped to 1+ε_high, no gradient.
    x = torch.ones(1, 4, requires_grad=True)
    loss, m = policy_loss(x, old, torch.ones(1, 4), mask, level="turn")
    loss.backward()
    assert loss.item() == pytest.approx(-(1 + 4e-3))
    assert m["clipfrac"] == 1.0
    assert torch.count_nonzero(x.grad) == 0
    # Ratio e^−1 (<1−ε_low) with A>0: the unclipped (smaller) objective wins, gradient flows.
    x = (-torch.ones(1, 4)).requires_grad_(True)
    loss, m = policy_loss(x, old, torch.ones(1, 4), mask, level="turn")
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(-1), rel=1e-6)
    assert m["clipfrac"] == 0.0
    torch.testing.assert_close(x.grad, torch.full((1, 4), -math.exp(-1) / 4))
    # Log-ratio beyond log_ratio_max is clamped before exp: finite even for +1000.
    x = torch.full((1, 4), 1000.0, requires_grad=True)
    loss, m = policy_loss(x, old, -torch.ones(1, 4), mask, level="token")
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.exp(10.0), rel=1e-5)


def test_rows_without_trained_tokens_add_zero_and_no_nan():
    logp, old, adv, mask = random_batch(0, 4, 6, dtype=torch.float32)
    mask[1] = 0
    logp[1] = float("nan")  # garbage where nothing is trained must not leak
    adv[1] = float("inf")
    for level in LEVELS:
        for agg in AGGS:
            x = logp.clone().requires_grad_(True)
            loss, metrics = policy_loss(x, old, adv, mask, level=level, agg=agg)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            assert all(math.isfinite(v) for v in metrics.values())
            assert torch.count_nonzero(x.grad[1]) == 0
    # The empty row counts in the 1/G of seq-mean: loss equals the 3-row sum divided by 4.
    keep = [0, 2, 3]
    x = logp.clone()
    full, _ = policy_loss(x, old, adv, mask, level="turn")
    part, _ = policy_loss(x[keep], old[keep], adv[keep], mask[keep], level="turn")
    assert full.item() == pytest.approx(part.item() * 3 / 4, rel=1e-6)
    # All rows empty: loss 0.
    loss, metrics = policy_loss(x, old, adv, torch.zeros_like(mask), level="turn")
    assert loss.item() == 0.0 and metrics["turn_kl_entropy"] == 0.0


def test_single_token_turns_and_masked_splits():
    logp, old, adv, _ = random_batch(3, 1, 6, scale=0.002, dtype=torch.float32)
    mask = torch.tensor([[1, 0, 1, 0, 1, 1]])
    # turn_ids None: three turns [0], [2], [4,5]
    assert turn_ids_from_mask(mask).tolist() == [[0, -1, 1, -1, 2, 2]]
    a, _ = policy_loss(logp, old, adv, mask, level="turn", clip_low=1, clip_high=1)
    explicit = torch.tensor([[0, -1, 1, -1, 2, 2]])
    b, _ = policy_loss(logp, old, adv, mask, level="turn", turn_ids=explicit, clip_low=1, clip_high=1)
    assert a.item() == pytest.approx(b.item())
    # Single-token turns make turn-level equal token-level (when nothing clips).
    single = torch.tensor([[0, -1, 1, -1, 2, 3]])
    c, _ = policy_loss(logp, old, adv, mask, level="turn", turn_ids=single, clip_low=1, clip_high=1)
    d, _ = policy_loss(logp, old, adv, mask, level="token", clip_low=1, clip_high=1)
    assert c.item() == pytest.approx(d.item(), rel=1e-6)
    # One turn id across a masked gap groups both pieces (tree turn ids are authoritative).
    joined = torch.tensor([[0, -1, 0, -1, 0, 0]])
    e, _ = policy_loss(logp, old, adv, mask, level="turn", turn_ids=joined, clip_low=1, clip_high=1)
    f, _ = policy_loss(logp, old, adv, mask, level="sequence", clip_low=1, clip_high=1)
    assert e.item() == pytest.approx(f.item(), rel=1e-6)


def test_large_turn_ids_take_the_compacting_path():
    logp, old, adv, mask = random_batch(5, 3, 8, scale=0.01)
    tids = turn_ids_from_mask(mask)
    big = torch.where(tids >= 0, tids * 1000 + 7, tids)  # e.g. tree node ids, larger than T
    a, ma = policy_loss(logp, old, adv, mask, level="turn", turn_ids=tids)
    b, mb = policy_loss(logp, old, adv, mask, level="turn", turn_ids=big)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert ma["turn_kl_entropy"] == pytest.approx(mb["turn_kl_entropy"], rel=1e-5)


def test_bf16_inputs_are_computed_in_fp32():
    logp, old, adv, mask = random_batch(7, 4, 16, scale=0.01, dtype=torch.float32)
    x = logp.to(torch.bfloat16).requires_grad_(True)
    loss, _ = policy_loss(x, old.to(torch.bfloat16), adv.to(torch.bfloat16), mask, level="turn")
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    ref, _ = policy_loss(x.detach().float(), old.to(torch.bfloat16).float(), adv.to(torch.bfloat16).float(), mask, level="turn")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_hturn_is_one_for_equal_turn_kls_and_zero_for_single_turn():
    old = torch.zeros(2, 6)
    x = torch.full((2, 6), 0.01)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    _, m = policy_loss(x[:1], old[:1], torch.ones(1, 6), mask[:1], level="turn")
    assert m["turn_kl_entropy"] == pytest.approx(1.0)
    _, m = policy_loss(x[1:], old[1:], torch.ones(1, 6), mask[1:], level="turn")
    assert m["turn_kl_entropy"] == 0.0
    _, m = policy_loss(x, old, torch.ones(2, 6), mask, level="turn")
    assert m["turn_kl_entropy"] == pytest.approx(0.5)
    # Exactly on-policy (KL_seq = 0): uniform over turns, finite.
    _, m = policy_loss(old[:1], old[:1], torch.ones(1, 6), mask[:1], level="turn")
    assert m["turn_kl_entropy"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(level="step"), "level='step'"),
        (dict(agg="mean"), "agg='mean'"),
        (dict(clip_low=-1.0), "clip_low"),
        (dict(turn_ids=torch.zeros(2, 3, dtype=torch.long)), "turn_ids has shape"),
        (dict(turn_ids=torch.zeros(2, 4)), "integer"),
        (dict(turn_ids=-torch.ones(2, 4, dtype=torch.long)), "turn_ids is −1"),
    ],
)
def test_bad_arguments(kwargs, message):
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=message):
        policy_loss(z, z, z, torch.ones(2, 4), **kwargs)


def test_shape_mismatch_names_the_argument():
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(z, z, torch.zeros(2, 5), z)
    with pytest.raises(ValueError, match="log_prob must be"):
        policy_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4))


def test_kl_penalty_estimators():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    d = lp - ref
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * d**2)
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), torch.exp(-d) + d - 1)
    assert torch.all(kl_penalty(lp, ref) >= 0)
    assert kl_penalty(torch.zeros(1, 1), torch.full((1, 1), 50.0)).item() == 10.0
    with pytest.raises(ValueError, match="kind='k9'"):
        kl_penalty(lp, ref, "k9")
    with pytest.raises(ValueError, match="ref_log_prob has shape"):
        kl_penalty(lp, ref[:, :1])


def test_aggregate_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logp, old, adv, mask = random_batch(11, 8, 128, scale=0.01, dtype=torch.float32)
    a, ma = policy_loss(logp, old, adv, mask, level="turn")
    b, mb = policy_loss(logp.cuda(), old.cuda(), adv.cuda(), mask.cuda(), level="turn")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert ma["turn_kl_entropy"] == pytest.approx(mb["turn_kl_entropy"], rel=1e-4)


# ---------------------------------------------------------------- pinned behaviours (issue 16)
# Each test below pins one behaviour a caller relies on, against hand-computed or naive values.


def naive_hturn(log_ratio, mask, turn_ids, eps=1e-8):
    """Eq. 13 row by row in Python floats (docs/method.md §4): mean over rows with a trained token."""
    vals = []
    for i in range(log_ratio.shape[0]):
        groups = {}
        for t in range(log_ratio.shape[1]):
            if mask[i, t]:
                groups.setdefault(int(turn_ids[i, t]), []).append(float(log_ratio[i, t]))
        if not groups:
            continue
        kls = [sum(g) for g in groups.values()]
        kseq = sum(sum(g) for g in groups.values())
        if abs(kseq) <= eps:
            kseq = -eps if kseq < 0 else eps
        if len(kls) == 1:
            vals.append(0.0)
            continue
        xs = [k / kseq for k in kls]
        ex = [math.exp(x - max(xs)) for x in xs]
        p = [e / sum(ex) for e in ex]
        vals.append(-sum(q * math.log(q) for q in p if q > 0) / math.log(len(kls)))
    return sum(vals) / len(vals) if vals else 0.0


@pytest.mark.parametrize("ids", ["dense", "sparse"])
def test_explicit_turn_ids_match_naive_on_both_grouping_paths(ids):
    # The engine passes the tree's turn ids; they may be non-contiguous, span masked gaps, and
    # (tree node ids) exceed T, which takes the sort path. Many rows so that a key collision
    # between rows (row r's id j meeting row r′'s id j′) would merge two rows' turns.
    B, T = 9, 3
    logp, old, adv, mask = random_batch(21 if ids == "dense" else 22, B, T, p_mask=0.2, scale=0.02)
    g = torch.Generator().manual_seed(5)
    pool = torch.tensor([0, 1, 2]) if ids == "dense" else torch.tensor([0, 1, 3])
    tids = pool[torch.randint(0, 3, (B, T), generator=g)]
    tids = torch.where(mask.bool(), tids, torch.full_like(tids, -1))
    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(x, old, adv, mask, level="turn", turn_ids=tids, clip_low=0.01, clip_high=0.01)
    loss.backward()
    y = logp.clone().float().requires_grad_(True)
    ref, ref_m = naive_policy_loss(y, old.float(), adv.float(), mask, "turn", 0.01, 0.01, turn_ids=tids)
    ref.backward()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.float(), y.grad, rtol=1e-5, atol=1e-6)
    assert metrics["clipfrac"] == pytest.approx(ref_m["clipfrac"])
    assert metrics["turn_kl_entropy"] == pytest.approx(ref_m["turn_kl_entropy"], rel=1e-4, abs=1e-6)


def test_a_turn_id_equal_to_t_is_its_own_turn():
    # T = 4; row 0 has turn ids 0 and 4 (= T), row 1 turn ids 0 and 1. Id 4 must not be read as
    # row 1's turn 0 (a row-major key r·T + id would collide there).
    old = torch.zeros(2, 4)
    logp = torch.tensor([[0.1, 0.1, -0.3, -0.1], [0.2, 0.4, -0.2, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0], [2.0, 2.0, 1.0, 1.0]])
    mask = torch.ones(2, 4)
    tids = torch.tensor([[0, 0, 4, 4], [0, 0, 1, 1]])
    loss, m = policy_loss(logp, old, adv, mask, level="turn", turn_ids=tids, clip_low=10.0, clip_high=10.0)
    # turn ratios: row 0 e^0.1, e^-0.2; row 1 e^0.3, e^-0.1; L = −(1/2)Σ_rows (1/4)Σ_t A·s
    r0 = (2 * math.exp(0.1) - 2 * math.exp(-0.2)) / 4
    r1 = (4 * math.exp(0.3) + 2 * math.exp(-0.1)) / 4
    assert loss.item() == pytest.approx(-(r0 + r1) / 2, rel=1e-6)
    assert m["turn_kl_entropy"] == pytest.approx(naive_hturn(logp, mask, tids), rel=1e-5)


def test_every_buffer_is_created_on_the_inputs_device():
    # A GPU run needs every tensor the loss creates on the inputs' device. Setting the default
    # device to "meta" makes any factory call that forgets device= produce a meta tensor, which
    # fails when mixed with the CPU inputs: a CPU-only check of device placement.
    logp, old, adv, mask = random_batch(13, 4, 7, scale=0.02, dtype=torch.float32)
    mask[2] = 0
    tids = turn_ids_from_mask(mask)
    big = torch.where(tids >= 0, tids * 50 + 3, tids)
    none = torch.zeros_like(mask)
    ref = {}
    for key, kw in [("turn", dict(level="turn")), ("big", dict(level="turn", turn_ids=big)),
                    ("seq", dict(level="sequence")), ("tok", dict(level="token", agg="token-mean"))]:
        ref[key] = policy_loss(logp, old, adv, mask, **kw)
    ref_empty = policy_loss(logp, old, adv, none, level="turn")
    ref_mm = logprob_mismatch(old, logp, mask, big, 3e-3, 4e-3)
    x = logp.clone().requires_grad_(True)
    with torch.device("meta"):
        for key, kw in [("turn", dict(level="turn")), ("big", dict(level="turn", turn_ids=big)),
                        ("seq", dict(level="sequence")), ("tok", dict(level="token", agg="token-mean"))]:
            loss, m = policy_loss(x, old, adv, mask, **kw)
            loss.backward()
            assert loss.device.type == "cpu" and x.grad.device.type == "cpu"
            assert loss.item() == pytest.approx(ref[key][0].item()) and m == pytest.approx(ref[key][1])
        loss, m = policy_loss(x, old, adv, none, level="turn")
        assert loss.item() == ref_empty[0].item() and m == ref_empty[1]
        assert logprob_mismatch(old, logp, mask, big, 3e-3, 4e-3) == pytest.approx(ref_mm)


def test_turn_kl_entropy_keeps_the_input_dtype():
    # turn_kl_entropy is public: float64 log-ratios (offline analysis of logged log-probs) are
    # reduced in float64, to naive-reference precision.
    logp, old, _, mask = random_batch(17, 5, 9, scale=0.05)
    mask[3] = 0
    tids = turn_ids_from_mask(mask)
    lr = (logp - old) * mask
    index, n = _group_index(tids, mask.bool())
    h = turn_kl_entropy(lr, mask.bool(), index, n)
    assert h.dtype == torch.float64
    assert h.item() == pytest.approx(naive_hturn(lr, mask, tids), rel=1e-12)
    empty = turn_kl_entropy(lr, torch.zeros_like(mask, dtype=torch.bool), index, n)
    assert empty.dtype == torch.float64 and empty.item() == 0.0


def test_hturn_averages_only_rows_with_trained_tokens():
    # Row 0: two turns with equal KL (H = 1); row 1: nothing trained. The batch H_turn is 1, not 1/2.
    old = torch.zeros(2, 4)
    x = torch.full((2, 4), 0.01)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    _, m = policy_loss(x, old, torch.ones(2, 4), mask, level="turn")
    assert m["turn_kl_entropy"] == pytest.approx(1.0)


def test_hturn_of_cancelling_turn_kls_is_near_zero_and_keeps_kl_seq_sign():
    # docs/method.md §4: nonzero KL_j that cancel give H_turn near 0. One token per turn.
    mask, old, tids = torch.ones(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 2]])
    # KL_j = (0.5, −0.25, −0.25): KL_seq = 0 exactly, replaced by +1e-8: p = one-hot on turn 0.
    _, m = policy_loss(torch.tensor([[0.5, -0.25, -0.25]]), old, torch.ones(1, 3), mask, level="turn", turn_ids=tids)
    assert m["turn_kl_entropy"] == pytest.approx(0.0, abs=1e-6)
    # KL_j = (−0.125, 0.0625, 0.0625 − 2^-28): KL_seq = −2^-28 (inside ±1e-8, exact in fp32) is
    # replaced by −1e-8, keeping its sign: logits (+1.25e7, −6.25e6, ...) put all mass on turn 0.
    # With the sign lost, turns 1 and 2 would share the mass: H ≈ 0.6.
    lp = torch.tensor([[-0.125, 0.0625, 0.0625 - 2.0**-28]])
    assert float(lp.sum()) == -(2.0**-28)
    _, m = policy_loss(lp, old, torch.ones(1, 3), mask, level="turn", turn_ids=tids)
    assert m["turn_kl_entropy"] == pytest.approx(0.0, abs=1e-6)
    # KL_j = (0.25, 0.25, −0.5), KL_seq = 0 → +1e-8: logits (2.5e7, 2.5e7, −5e7). The mass splits
    # evenly over turns 0 and 1: H = log 2 / log 3, computed without exp() overflowing.
    _, m = policy_loss(torch.tensor([[0.25, 0.25, -0.5]]), old, torch.ones(1, 3), mask, level="turn", turn_ids=tids)
    assert m["turn_kl_entropy"] == pytest.approx(math.log(2) / math.log(3), rel=1e-6)


def test_ratio_metrics_ignore_untrained_positions():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.2, 50.0], [-50.0, 0.05, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    _, m = policy_loss(logp, old, torch.ones(2, 3), mask, level="token", clip_low=0.2, clip_high=0.2)
    r = [math.exp(0.1), math.exp(-0.2), math.exp(0.05)]
    assert m["ratio_max"] == pytest.approx(max(r), rel=1e-6)
    assert m["ratio_min"] == pytest.approx(min(r), rel=1e-6)
    assert m["ratio_mean"] == pytest.approx(sum(r) / 3, rel=1e-6)
    assert m["ppo_kl"] == pytest.approx(-(0.1 - 0.2 + 0.05) / 3, rel=1e-5)


def test_default_clip_range_is_atpos_on_both_sides():
    # Token-level ratio e^{-0.1} with A = −1: the lower clip binds, L = |A|·(1 − ε_low) = 0.997;
    # e^{+0.1} with A = +1: the upper clip binds, L = −(1 + ε_high) = −1.004.
    old, mask = torch.zeros(1, 1), torch.ones(1, 1)
    low, _ = policy_loss(torch.full((1, 1), -0.1), old, -torch.ones(1, 1), mask, level="token")
    high, _ = policy_loss(torch.full((1, 1), 0.1), old, torch.ones(1, 1), mask, level="token")
    assert low.item() == pytest.approx(1 - 3e-3, rel=1e-7) and high.item() == pytest.approx(-(1 + 4e-3), rel=1e-7)


def test_zero_clip_range_is_allowed_and_clips_everything_off_one():
    # clip_low = clip_high = 0 (documented: >= 0): the clipped ratio is exactly 1, so with A > 0 a
    # ratio above 1 gives L = −A and one below 1 keeps its own value.
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    logp = torch.tensor([[0.2, -0.2]])
    loss, m = policy_loss(logp, old, torch.ones(1, 2), mask, level="token", clip_low=0.0, clip_high=0.0)
    assert loss.item() == pytest.approx(-(1.0 + math.exp(-0.2)) / 2, rel=1e-6)
    assert m["clipfrac"] == 0.5
    # One side zero, the other 0.1: [1, 1.1] clips e^0.2 to 1.1 and lifts e^−0.2 to 1 (the unclipped
    # e^−0.2 is the smaller objective, so it stays); [0.9, 1] caps e^0.2 at 1 and keeps e^−0.2.
    loss, _ = policy_loss(logp, old, torch.ones(1, 2), mask, level="token", clip_low=0.0, clip_high=0.1)
    assert loss.item() == pytest.approx(-(1.1 + math.exp(-0.2)) / 2, rel=1e-6)
    loss, _ = policy_loss(logp, old, torch.ones(1, 2), mask, level="token", clip_low=0.1, clip_high=0.0)
    assert loss.item() == pytest.approx(-(1.0 + math.exp(-0.2)) / 2, rel=1e-6)


def test_empty_batches_give_zero_loss():
    # A micro-batch with no rows, or rows padded to zero response tokens, trains nothing: loss 0.
    for shape in [(0, 5), (3, 0)]:
        z = torch.zeros(shape)
        for level in LEVELS:
            loss, m = policy_loss(z, z, z, z, level=level)
            assert loss.item() == 0.0 and m["turn_kl_entropy"] == 0.0 and m["clipfrac"] == 0.0
            assert m["ratio_max"] == m["ratio_min"] == 1.0  # the logged ratio range is neutral
        for agg in AGGS:
            assert aggregate(z, z, agg).item() == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: policy_loss(z, z, z, z, level="step"), r"level='step' is not one of token, sequence, turn$"),
        (lambda z: policy_loss(z, z, z, z, agg="mean"),
         r"agg='mean' is not one of token-mean, seq-mean-token-mean, seq-mean-token-sum$"),
        (lambda z: aggregate(z, z, "mean"), r"agg='mean' is not one of token-mean, seq-mean-token-mean, seq-mean-token-sum$"),
        (lambda z: kl_penalty(z, z, "k9"), r"kind='k9' is not one of k1, k2, low_var_kl$"),
        (lambda z: policy_loss(z, torch.zeros(2, 5), z, z), r"^old_log_prob has shape \(2, 5\) but log_prob has shape \(2, 4\)$"),
        (lambda z: policy_loss(z, z, torch.zeros(3, 4), z), r"^advantages has shape \(3, 4\) but log_prob has shape \(2, 4\)$"),
        (lambda z: policy_loss(z, z, z, torch.ones(2, 3)), r"^loss_mask has shape \(2, 3\) but log_prob has shape \(2, 4\)$"),
        (lambda z: policy_loss(z, z, z, torch.ones(2, 4), turn_ids=torch.tensor([[0, 0, -1, 1], [0, 0, 0, 0]])),
         r"^turn_ids is −1 at a position where loss_mask is 1: every trained token needs a turn id$"),
    ],
)
def test_error_messages_name_the_field_and_the_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(2, 4))


def naive_mismatch(rollout, trainer, mask, turn_ids, lo, hi):
    diffs, turns = [], {}
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                d = float(trainer[i, t]) - float(rollout[i, t])
                diffs.append(abs(d))
                turns.setdefault((i, int(turn_ids[i, t])), []).append(d)
    if not diffs:
        return {"diff_mean": 0.0, "diff_max": 0.0, "turns_outside_clip": 0.0}
    out = [not (1 - lo <= math.exp(sum(v) / len(v)) <= 1 + hi) for v in turns.values()]
    return {"diff_mean": sum(diffs) / len(diffs), "diff_max": max(diffs), "turns_outside_clip": sum(out) / len(out)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ids", ["turn numbers", "tree ids"])
def test_logprob_mismatch_matches_naive(seed, ids):
    # The engine reports sampler/trainer log-prob drift per turn, with turn numbers or the tree's
    # node ids (which can exceed T); untrained positions may hold garbage.
    B, T = 6, 10
    rollout, _, _, mask = random_batch(seed, B, T, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    trainer = rollout + 0.004 * torch.randn(B, T, generator=g)
    trainer = torch.where(mask.bool(), trainer, torch.full_like(trainer, 99.0))
    tids = turn_ids_from_mask(mask)
    if ids == "tree ids":
        tids = torch.where(mask.bool(), tids * 7 + 2, tids)
    got = logprob_mismatch(rollout, trainer, mask, tids, 3e-3, 4e-3)
    ref = naive_mismatch(rollout, trainer, mask, tids, 3e-3, 4e-3)
    assert 0 < ref["turns_outside_clip"] < 1
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_logprob_mismatch_clip_bounds_are_inclusive():
    # A turn whose ratio sits exactly on 1 − ε_low or 1 + ε_high is not clipped by the objective
    # (clamp is inclusive), so it is not counted; one just outside is.
    lo_r = float(torch.exp(torch.tensor(-0.01)))
    hi_r = float(torch.exp(torch.tensor(0.01)))
    rollout = torch.zeros(1, 2)
    trainer = torch.tensor([[-0.01, 0.01]])
    mask, tids = torch.ones(1, 2), torch.tensor([[0, 1]])
    assert logprob_mismatch(rollout, trainer, mask, tids, 1 - lo_r, hi_r - 1)["turns_outside_clip"] == 0.0
    m = logprob_mismatch(rollout, trainer, mask, tids, (1 - lo_r) * 0.999, (hi_r - 1) * 0.999)
    assert m["turns_outside_clip"] == 1.0
    assert m["diff_mean"] == pytest.approx(0.01) and m["diff_max"] == pytest.approx(0.01)
    m = logprob_mismatch(rollout, trainer, mask, tids, (1 - lo_r) * 0.999, 1.0)
    assert m["turns_outside_clip"] == 0.5


def test_sequence_ratio_of_a_one_token_response_is_that_tokens_ratio():
    # Row 0 trains one token (log-ratio 0.2), row 1 two tokens (0.1, −0.3: mean −0.1); wide clip.
    old = torch.zeros(2, 3)
    x = torch.tensor([[0.2, 0.0, 0.0], [0.1, -0.3, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss, m = policy_loss(x, old, torch.ones(2, 3), mask, level="sequence", clip_low=10.0, clip_high=10.0)
    loss.backward()
    s0, s1 = math.exp(0.2), math.exp(-0.1)
    assert loss.item() == pytest.approx(-(s0 + s1) / 2, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[-s0 / 2, 0.0, 0.0], [-s1 / 4, -s1 / 4, 0.0]]))
    assert m["ratio_max"] == pytest.approx(s0, rel=1e-6) and m["ratio_min"] == pytest.approx(s1, rel=1e-6)
