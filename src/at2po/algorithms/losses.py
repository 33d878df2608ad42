"""Policy objectives over (B, T) token tensors: token (PPO/GRPO), sequence (GSPO), turn (ATPO).

All three share one clipped surrogate (docs/method.md §4) and differ only in the importance ratio s:

    token     s(i,t) = π_θ(y_t) / π_old(y_t)
    sequence  s(i,t) = sg[exp(mean_{u ∈ y_i}    log π_θ(y_u)/π_old(y_u))] · π_θ(y_t) / sg[π_θ(y_t)]
    turn      s(i,t) = sg[exp(mean_{u ∈ k(t)}   log π_θ(y_u)/π_old(y_u))] · π_θ(y_t) / sg[π_θ(y_t)]

    L = −(1/G) Σ_i (1/|y_i|) Σ_t M(i,t) · min( s·Â, clip(s, 1−ε_low, 1+ε_high)·Â )

The "sg[...]·π/sg[π]" construction keeps the value of the group ratio while routing the gradient
through each token's own log-prob (GSPO's trick, applied per turn by ATPO). Everything is
computed in fp32 whatever the input dtype, with no Python loop over rows or turns.
"""

from __future__ import annotations

import torch

LEVELS = ("token", "sequence", "turn")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "low_var_kl")


def turn_ids_from_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number the maximal runs of 1s in each row of ``loss_mask`` (0, 1, ...); −1 elsewhere.

    A turn's generated tokens are contiguous and observations between turns are masked, so the
    runs are the turns when the tree's exact turn ids are not at hand.
    """
    m = loss_mask.bool()
    prev = torch.zeros_like(m)
    prev[:, 1:] = m[:, :-1]
    starts = m & ~prev
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(m, ids, torch.full_like(ids, -1))


def _group_index(group_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map (row, group id) pairs of masked tokens to dense indices 0..G−1 (one per row's group)."""
    bsz, t = group_ids.shape
    gid = torch.where(mask, group_ids, torch.zeros_like(group_ids))
    max_id = int(gid.max()) if gid.numel() else 0
    if max_id < t:  # the usual case (turn numbers): a direct row-major key, no sort needed
        key = torch.arange(bsz, device=gid.device)[:, None] * t + gid
        return key, bsz * t
    key = torch.arange(bsz, device=gid.device)[:, None] * (max_id + 1) + gid
    uniq, inv = torch.unique(key, return_inverse=True)
    return inv, int(uniq.numel())


def _group_mean(x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of x over each token's group (masked tokens only), gathered back to (B, T)."""
    flat_idx = index.reshape(-1)
    w = mask.reshape(-1).to(x.dtype)
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, flat_idx, x.reshape(-1) * w)
    cnts = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, flat_idx, w)
    return (sums / cnts.clamp(min=1.0))[flat_idx].reshape(x.shape)


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce per-token values to a scalar. Rows without a trained token contribute 0.

    "token-mean": Σ M·x / Σ M over the whole batch.
    "seq-mean-token-mean": (1/B) Σ_i (Σ_t M·x / Σ_t M)   (docs/method.md §4; B counts every row).
    "seq-mean-token-sum": (1/B) Σ_i Σ_t M·x.
    """
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGS)}")
    m = mask.to(values.dtype)
    masked = values * m
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    row_sum = masked.sum(dim=1)
    if agg == "seq-mean-token-mean":
        row_sum = row_sum / m.sum(dim=1).clamp(min=1.0)
    return row_sum.mean() if row_sum.numel() else masked.sum()


def _check_inputs(log_prob, old_log_prob, advantages, loss_mask, turn_ids):
    shape = log_prob.shape
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(shape)}")
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages), ("loss_mask", loss_mask)):
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but log_prob has shape {tuple(shape)}")
    if turn_ids is not None:
        if turn_ids.shape != shape:
            raise ValueError(f"turn_ids has shape {tuple(turn_ids.shape)} but log_prob has shape {tuple(shape)}")
        if turn_ids.is_floating_point() or turn_ids.dtype == torch.bool:
            raise ValueError(f"turn_ids must be an integer tensor, got {turn_ids.dtype}")
        if bool((loss_mask.bool() & (turn_ids < 0)).any()):
            raise ValueError("turn_ids is −1 at a position where loss_mask is 1: every trained token needs a turn id")


def turn_kl_entropy(
    log_ratio: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, n_groups: int, eps: float = 1e-8
) -> torch.Tensor:
    """H_turn (docs/method.md §4, paper Eq. 13), averaged over rows that have a trained token.

    Per row: p_j = softmax_j(KL_j / KL_seq) over its turns, entropy / log(#turns), 0 for a single
    turn. KL_seq = 0 (exactly on-policy) would divide by zero; it is replaced by ±eps, which gives
    the uniform distribution when every KL_j is 0 too.
    """
    bsz, t = log_ratio.shape
    m = mask.to(log_ratio.dtype)
    flat_idx = index.reshape(-1)
    kl_turn = torch.zeros(n_groups, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(
        0, flat_idx, (log_ratio * m).reshape(-1))
    # Row of each group and whether the group holds a trained token.
    row_of = torch.arange(bsz, device=log_ratio.device)[:, None].expand(bsz, t).reshape(-1)
    present = torch.zeros(n_groups, dtype=log_ratio.dtype, device=log_ratio.device).index_add_(0, flat_idx, m.reshape(-1)) > 0
    group_row = torch.zeros(n_groups, dtype=torch.long, device=log_ratio.device).scatter_(0, flat_idx, row_of)
    kl_seq = (log_ratio * m).sum(dim=1)
    kl_seq = torch.where(kl_seq.abs() > eps, kl_seq, torch.where(kl_seq < 0, -eps, eps))
    logits = torch.where(present, kl_turn / kl_seq[group_row], torch.full_like(kl_turn, -torch.inf))
    # Row-wise softmax over groups via a per-row max (scatter_reduce), no loop over rows.
    row_max = torch.full((bsz,), -torch.inf, dtype=logits.dtype, device=logits.device).scatter_reduce(
        0, group_row[present], logits[present], reduce="amax")
    ex = torch.where(present, torch.exp(logits - row_max[group_row]), torch.zeros_like(logits))
    z = torch.zeros(bsz, dtype=ex.dtype, device=ex.device).index_add_(0, group_row, ex)
    p = ex / z[group_row].clamp(min=1e-30)
    plogp = torch.where(present & (p > 0), p * torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    ent = -torch.zeros(bsz, dtype=p.dtype, device=p.device).index_add_(0, group_row, plogp)
    n_turns = torch.zeros(bsz, dtype=p.dtype, device=p.device).index_add_(0, group_row, present.to(p.dtype))
    norm = torch.where(n_turns > 1, ent / torch.log(n_turns.clamp(min=2.0)), torch.zeros_like(ent))
    has_tokens = n_turns > 0
    return norm[has_tokens].mean() if bool(has_tokens.any()) else torch.zeros((), dtype=p.dtype, device=p.device)


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    level: str = "turn",
    clip_low: float = 3e-3,
    clip_high: float = 4e-3,
    turn_ids: torch.Tensor | None = None,
    agg: str = "seq-mean-token-mean",
    log_ratio_max: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss at token, sequence or turn level (docs/method.md §4, paper Eqs. 9–12).

    Tensors are (B, T) over response tokens. ``loss_mask`` is 1 for policy-generated tokens.
    ``turn_ids`` (level="turn") numbers the turns of each row, −1 where not trained; when None a
    turn is a maximal run of 1s in ``loss_mask``. Log-ratios are clamped at ``log_ratio_max``
    before exponentiation so a stale sample cannot overflow.
    Defaults are ATPO's (ε = 3e-3/4e-3); GRPO uses level="token" with 0.2/0.2 (or 0.2/0.28),
    GSPO level="sequence" with 3e-4/4e-4.

    Returns (scalar loss, metrics) with metrics "clipfrac", "ppo_kl", "turn_kl_entropy",
    "ratio_mean", "ratio_max", "ratio_min".
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not one of {', '.join(LEVELS)}")
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGS)}")
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    _check_inputs(log_prob, old_log_prob, advantages, loss_mask, turn_ids)

    mask = loss_mask.bool()
    mask_f = mask.float()
    # Zero untrained positions first: padding may hold NaN/inf, and exp() of it would turn the
    # masked-out gradient (0 · NaN) into NaN.
    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    logp = torch.where(mask, log_prob.float(), zero)
    old = torch.where(mask, old_log_prob.float(), zero)
    adv = torch.where(mask, advantages.float(), zero)
    log_ratio = logp - old

    if turn_ids is None:
        turn_ids = turn_ids_from_mask(mask)
    turn_index, n_turns = _group_index(turn_ids, mask)

    if level == "token":
        ratio = torch.exp(log_ratio.clamp(max=log_ratio_max))
    else:
        if level == "sequence":
            group_lr = (log_ratio * mask_f).sum(1, keepdim=True) / mask_f.sum(1, keepdim=True).clamp(min=1.0)
            group_lr = group_lr.expand_as(log_ratio)
        else:
            group_lr = _group_mean(log_ratio, mask, turn_index, n_turns)
        # sg[group ratio] · π_θ/sg[π_θ]: value = group ratio, d/d logπ_θ(y_t) = group ratio.
        ratio = torch.exp(group_lr.detach().clamp(max=log_ratio_max) + logp - logp.detach())

    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss1 = -adv * ratio
    loss2 = -adv * clipped
    per_token = torch.maximum(loss1, loss2)
    loss = aggregate(per_token, mask, agg)

    with torch.no_grad():
        n_tok = mask_f.sum().clamp(min=1.0)
        r = ratio.detach()
        big = torch.finfo(r.dtype).max
        metrics = {
            "clipfrac": float(((loss2 > loss1).float() * mask_f).sum() / n_tok),
            "ppo_kl": float((-log_ratio * mask_f).sum() / n_tok),
            "turn_kl_entropy": float(turn_kl_entropy(log_ratio, mask, turn_index, n_turns)),
            "ratio_mean": float((r * mask_f).sum() / n_tok),
            "ratio_max": float(torch.where(mask, r, torch.full_like(r, -big)).max()) if bool(mask.any()) else 1.0,
            "ratio_min": float(torch.where(mask, r, torch.full_like(r, big)).min()) if bool(mask.any()) else 1.0,
        }
    return loss, metrics


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate of π_θ against a frozen reference (fp32, same shape as inputs).

    "k1": log π_θ − log π_ref; "k2": ½ (log π_θ − log π_ref)²;
    "low_var_kl" (k3, Schulman): exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1, clamped to
    [−10, 10] as is usual for stability. Reduce it with ``aggregate`` and the loss mask.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KL_KINDS)}")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"ref_log_prob has shape {tuple(ref_log_prob.shape)} but log_prob has shape {tuple(log_prob.shape)}")
    diff = log_prob.float() - ref_log_prob.float()
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    return (torch.exp(-diff) + diff - 1.0).clamp(-10.0, 10.0)


def logprob_mismatch(
    rollout_log_prob: torch.Tensor,
    trainer_log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    turn_ids: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's on the same tokens (docs/method.md §6).

    ``diff_mean``/``diff_max``: mean and max of |log π_trainer − log π_rollout| over trained
    tokens. ``turns_outside_clip``: the share of turns (row, turn id) whose mean log-ratio
    log π_trainer − log π_rollout puts the turn ratio outside [1 − clip_low, 1 + clip_high]:
    the turns the ATPO objective would clip before any update if the sampler's log-probs were
    used as π_old. All 0 when nothing is trained. Tokens without a sampler log-prob (NaN: a
    token the environment appended, ``rollout.env_compat=atpo``'s EOS) are left out.
    """
    mask = loss_mask.bool() & torch.isfinite(rollout_log_prob)
    diff = (trainer_log_prob.float() - rollout_log_prob.float()).masked_fill(~mask, 0.0)
    if not bool(mask.any()):
        return {"diff_mean": 0.0, "diff_max": 0.0, "turns_outside_clip": 0.0}
    index, n_groups = _group_index(turn_ids, mask)
    flat_idx, w = index.reshape(-1), mask.reshape(-1).float()
    sums = torch.zeros(n_groups, device=diff.device).index_add_(0, flat_idx, diff.reshape(-1) * w)
    counts = torch.zeros(n_groups, device=diff.device).index_add_(0, flat_idx, w)
    turns = counts > 0
    turn_ratio = torch.exp(sums[turns] / counts[turns])
    outside = (turn_ratio < 1.0 - clip_low) | (turn_ratio > 1.0 + clip_high)
    absdiff = diff.abs()[mask]
    return {"diff_mean": float(absdiff.mean()), "diff_max": float(absdiff.max()),
            "turns_outside_clip": float(outside.float().mean())}
