"""Supervised warm start on demonstrations (before RL), in the rollout's exact token layout.

A random-init or small model may know nothing of the agent protocol, so RL from scratch would
only ever see format errors. A short supervised run on demonstrations (a task's ideal, or
deliberately sloppy, trajectories) teaches the protocol and leaves the rest to RL; the
quickstart (``at2po.quickstart``) and the arithmetic task use it.

Sequences are built exactly as the rollout builds contexts (token-in-token-out): the prompt ids
from ``render_prompt``, then each generated piece encoded on its own (labels = its ids) and each
observation encoded with ``encode_observation`` (labels -100, as are the prompt's), concatenated
as ids.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from at2po.agent import encode_observation
from at2po.rollout.generator import common_prefix_length

__all__ = ["IGNORE_INDEX", "SFTExample", "encode_example", "sft_loss", "sft_warm_start"]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, observations, padding)


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the demonstration that answers it, as (generated, observation) pieces."""

    prompt_ids: list[int]
    pieces: Sequence[tuple[str, str]]


def encode_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the rollout's token layout; labels are -100 off the generated pieces."""
    input_ids = list(example.prompt_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for generated, observation in example.pieces:
        gen_ids = [int(i) for i in tokenizer.encode(generated, add_special_tokens=False)]
        input_ids += gen_ids
        labels += gen_ids
        if observation:
            obs_ids = encode_observation(tokenizer, observation)
            input_ids += obs_ids
            labels += [IGNORE_INDEX] * len(obs_ids)
    return input_ids, labels


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, skip: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the sequences without their first ``skip`` tokens."""
    rows = [(ids[skip:], labels[skip:]) for ids, labels in encoded]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prefix_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over all labelled tokens of the sequences ``prefix_ids + row``.

    The prefix that every row shares (the system prompt, most of each sequence) runs once and its
    key/value cache is repeated across the batch: the same loss and gradients as running every
    full row, at a fraction of the cost. ``labels`` is -100 where there is no loss, which must
    include the first token of each row when there is a prefix.
    """
    # The decoder stack under the LM head: get_decoder() on transformers 5, where 4.x returns
    # None for most causal LMs; base_model is that stack in both.
    decoder = model.get_decoder()
    if decoder is None:
        decoder = model.base_model
    if prefix_ids is None or len(prefix_ids) == 0:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        # transformers 5 calls the cache argument (and output) ``cache``; 4.x ``past_key_values``.
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        n_rows, n_prefix = input_ids.shape[0], len(prefix_ids)
        cache = getattr(decoder(input_ids=prefix_ids[None], use_cache=True), cache_arg)
        cache.batch_repeat_interleave(n_rows)
        positions = torch.arange(n_prefix, n_prefix + input_ids.shape[1], device=input_ids.device)
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=torch.cat([attention_mask.new_ones((n_rows, n_prefix)), attention_mask], dim=1),
            position_ids=positions.expand(n_rows, -1),
            use_cache=True,
            **{cache_arg: cache},
        ).last_hidden_state
    # Position t predicts token t + 1. The LM head runs only where there is a label: most
    # positions are prompt or observation, and the head is a large share of a tiny model.
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][trained])
    return F.cross_entropy(logits.float(), targets[trained])


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def sft_warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[SFTExample],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW on ``examples`` (cross-entropy on generated tokens).

    Batches are drawn epoch by epoch in an order shuffled by ``seed``; the loss is the mean over
    the batch's labelled tokens. Deterministic for a given seed (CPU). The model is left in eval
    mode. Returns {"loss": per-step losses, "seconds": wall time, "tokens": tokens seen,
    "examples": number of examples}.
    """
    if not examples:
        raise ValueError("sft_warm_start needs at least one example")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    # The system prompt, which all prompts share, runs once per batch; it stops short of every
    # prompt's end so that the first token after it is never a labelled one.
    prompts = [ex.prompt_ids for ex in examples]
    n_prefix = common_prefix_length(prompts, min(map(len, prompts)) - 1)
    device = next(model.parameters()).device
    prefix_ids = torch.tensor(encoded[0][0][:n_prefix], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, min(warmup_steps, steps))
    )
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                epoch = list(range(len(encoded)))
                rng.shuffle(epoch)
                order += epoch
            batch = _collate([encoded[i] for i in order[:batch_size]], pad_id, n_prefix)
            del order[:batch_size]
            loss = sft_loss(model, **{k: v.to(device) for k, v in batch.items()}, prefix_ids=prefix_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            tokens += n_prefix * len(batch["input_ids"]) + int(batch["attention_mask"].sum())
            if progress and (step + 1) % log_every == 0:
                elapsed = time.perf_counter() - start
                print(f"  sft step {step + 1}/{steps}  loss {losses[-1]:.4f}  ({elapsed:.0f}s)", flush=True)
    finally:
        model.eval()
    return {"loss": losses, "seconds": time.perf_counter() - start, "tokens": tokens, "examples": len(examples)}
