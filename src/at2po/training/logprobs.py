"""The update's log-probs: per-token log-probs of the responses under a model, at the paper's
shapes (docs/method.md §6, README "Memory and speed at scale").

Two things make this path fit a 151,936-token vocabulary and 22-leaf trees:

* **No full-vocabulary logits.** The model's output head is swapped, for the duration of one
  forward call, for a scoring head that takes the final hidden states of only the positions
  that score a token, and runs them through the head in chunks of ``chunk_tokens`` positions:
  logits, /temperature, log-softmax, gather; the backward recomputes each chunk's logits. The
  path's peak is O(chunk_tokens × V), not O(rows × T × V). A bias-free ``nn.Linear`` head (Qwen,
  Llama; tied or not; its weight whole at call time, as under DDP and root-level FSDP2) runs
  :class:`_LinearHeadLogprobs`, whose hand-written backward recomputes each chunk's logits once
  and works in place. Any other head (LoRA-wrapped, with a bias or hooks, sharded on its own)
  is called as a module per chunk under activation checkpointing, so its own forward (an adapter,
  FSDP's gather) runs as usual.
* **Tree packing.** The rows of a micro-batch (a tree's leaves repeat the prompt and every turn
  above their branching point) run as ONE packed sequence in which each distinct prefix token
  appears once: a trie over the rows' token sequences. Each token attends to its own ancestors
  (an additive 4-D attention mask through the model's standard SDPA/eager attention), its position id is
  its depth, and each row reads its log-probs off its own path in the trie. A token shared by
  several rows is computed once, and its gradient is the sum of the rows' (autograd does it).

Both are exact (the same arithmetic on fewer numbers); where a model cannot take them (logits
post-processed after the head, an attention without custom masks, sliding windows) the caller
learns why from :func:`head_fallback_reason` / :func:`packing_fallback_reason` and the full path
runs instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from at2po.rollout.generator import common_prefix_length, forward_kwargs

DEFAULT_CHUNK_TOKENS = 1024


# -- which models take which path ------------------------------------------------------------------
def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's wrapper (FSDP2 and PEFT keep the model's own class and attributes)."""
    return getattr(model, "module", model)


def head_fallback_reason(model: torch.nn.Module) -> str | None:
    """Why the chunked scoring head cannot stand in for ``model``'s output head (None: it can).
    Logits transformed after the head (soft-capping, scaling) would be skipped by it."""
    inner = _unwrapped(model)
    if not hasattr(inner, "get_output_embeddings") or inner.get_output_embeddings() is None:
        return "the model has no output head (get_output_embeddings() is None)"
    config = getattr(inner, "config", None)
    for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return f"the model post-processes its logits after the head (config.{name}={value})"
    return None


def packing_fallback_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run a tree-packed sequence exactly (None: it can). The packing needs an
    attention that applies a custom 4-D mask as given (SDPA or eager) and no sliding window, which
    would cut a long row's attention differently from the packed mask."""
    config = getattr(_unwrapped(model), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} takes no custom 4-D mask (sdpa or eager do)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window layers (config.layer_types)"
    if layer_types is None and getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "the model uses sliding-window attention (config.use_sliding_window)"
    return None


# -- the chunked scoring head --------------------------------------------------------------------
def _logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-softmax runs in fp32 at least: bf16/fp16 logits are upcast, a float64 model keeps float64
    (the returned log-probs are fp32 either way)."""
    return torch.promote_types(dtype, torch.float32)


def _score_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(_logit_dtype(logits.dtype)) / temperature
    return F.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).float()


class _LinearHeadLogprobs(torch.autograd.Function):
    """log_softmax((hidden @ weight.T) / temperature)[targets] for a bias-free linear head,
    ``chunk`` positions at a time, with a hand-written backward.

    Checkpointing the chunks costs, per chunk, a second forward (logits, division, log-softmax)
    before autograd's own backward of all three, each a pass over a (chunk, V) tensor. Here the
    forward keeps only each position's log-sum-exp; the backward recomputes the chunk's logits
    once and turns them in place into d log p(y) / d logits = e_y - softmax, times the incoming
    gradient g:

        grad_logits = g * (e_y - exp(logits - lse)) / temperature
        grad_hidden = grad_logits @ W,    grad_W = grad_logits.T @ hidden

    The matmuls run in the dtype the forward's product had (the weight's, or autocast's: the
    backward runs outside autocast, so it casts to that dtype itself), as the module path's
    autograd runs them; the logits are upcast after the matmul (:func:`_logit_dtype`) there too.
    grad_W accumulates over chunks in that dtype."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        # The product's dtype: the weight's, or autocast's when the model runs under it.
        product = torch.result_type(hidden, weight)
        if torch.is_autocast_enabled(hidden.device.type):
            product = torch.get_autocast_dtype(hidden.device.type)
        compute = _logit_dtype(product)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = hidden.new_empty(hidden.shape[0], dtype=compute)
        for begin in range(0, hidden.shape[0], chunk):
            end = begin + chunk
            logits = (hidden[begin:end] @ weight.t()).to(compute)
            if temperature != 1.0:
                logits.div_(temperature)
            # log_softmax's own arithmetic, (z_y - max) - log Σ exp(z - max), in the logits' buffer.
            peak = logits.amax(dim=-1, keepdim=True)
            shifted = logits.sub_(peak)
            picked = shifted.gather(1, targets[begin:end, None]).squeeze(1)
            log_sum = shifted.exp_().sum(dim=-1).log_()
            out[begin:end] = picked - log_sum
            lse[begin:end] = peak.squeeze(1) + log_sum
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.product = temperature, chunk, product
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, chunk, product = ctx.temperature, ctx.chunk, ctx.product
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute = _logit_dtype(product)
        w = weight.to(product)
        grad_hidden = hidden.new_empty(hidden.shape, dtype=product) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if want_weight else None
        for begin in range(0, hidden.shape[0], chunk):
            end = begin + chunk
            h, g = hidden[begin:end].to(product), grad_out[begin:end].to(compute)
            logits = (h @ w.t()).to(compute)
            if temperature != 1.0:
                logits.div_(temperature)
            # softmax * -g, then + g at the target: g * (e_y - softmax), in the logits' buffer.
            grad = logits.sub_(lse[begin:end, None]).exp_().mul_(-g[:, None])
            grad.scatter_add_(1, targets[begin:end, None], g[:, None])
            if temperature != 1.0:
                grad.div_(temperature)
            grad = grad.to(product)
            if want_hidden:
                grad_hidden[begin:end] = grad @ w
            if want_weight:
                grad_weight += (grad.t() @ h).to(compute)
        # Each input's gradient in its own dtype (the product's under autocast, as autograd would).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _plain_linear_head(head: torch.nn.Module) -> bool:
    """Whether ``head`` is exactly a bias-free ``nn.Linear`` with a whole weight and no hooks, so
    that its weight can be used directly (a LoRA-wrapped or FSDP-sharded head, a head with a
    bias or hooks goes through its own forward instead)."""
    from torch.distributed.tensor import DTensor

    return (type(head) is torch.nn.Linear and head.bias is None and not isinstance(head.weight, DTensor)
            and not head._forward_hooks and not head._forward_pre_hooks)


def chunked_token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float, chunk_tokens: int) -> torch.Tensor:
    """log_softmax(head(hidden) / temperature)[targets], (E,) fp32, from ``hidden`` (E, H), computed
    ``chunk_tokens`` rows at a time, so at most one chunk's logits live. A plain linear head runs
    :class:`_LinearHeadLogprobs` (one forward matmul per chunk, its backward recomputes it once);
    any other head runs its own forward per chunk, checkpointed when gradients are on (its logits
    are freed after the forward and recomputed in the backward)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if _plain_linear_head(head):
        return _LinearHeadLogprobs.apply(hidden, head.weight, targets, temperature, chunk_tokens)
    grad = torch.is_grad_enabled()
    out = []
    for begin in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[begin:begin + chunk_tokens], targets[begin:begin + chunk_tokens]
        if grad:
            out.append(checkpoint(partial(_score_chunk, head), h, t, temperature, use_reentrant=False))
        else:
            out.append(_score_chunk(head, h, t, temperature))
    return torch.cat(out)


class _ScoringHead(torch.nn.Module):
    """Stands in for the output head during one forward: returns, instead of (B, L, V) logits, the
    (1, E, 1) log-probs of ``targets`` scored at the flat output positions ``index``."""

    def __init__(self, head: torch.nn.Module, index: torch.Tensor, targets: torch.Tensor,
                 temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        self.head = head
        self.index, self.targets = index, targets
        self.temperature, self.chunk_tokens = temperature, chunk_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)
        lp = chunked_token_logprobs(self.head, flat, self.targets, self.temperature, self.chunk_tokens)
        return lp[None, :, None]


@contextlib.contextmanager
def _head_swapped(model: torch.nn.Module, scorer: _ScoringHead) -> Iterator[None]:
    inner = _unwrapped(model)
    head = scorer.head
    owner, name = next((m, n) for m in inner.modules() for n, c in m.named_children() if c is head)
    # Plain attribute swap (not set_output_embeddings, which some models tie or resize on).
    owner._modules[name] = scorer
    try:
        yield
    finally:
        owner._modules[name] = head


def _scores(model, inputs: dict, index: torch.Tensor, targets: torch.Tensor, temperature: float,
            chunk_tokens: int) -> torch.Tensor:
    """(E,) fp32 log-probs of ``targets`` at the flat output positions ``index`` of ``model(**inputs)``:
    through the chunked scoring head when ``chunk_tokens`` > 0, else from the full logits."""
    if chunk_tokens:
        scorer = _ScoringHead(_unwrapped(model).get_output_embeddings(), index, targets, temperature, chunk_tokens)
        with _head_swapped(model, scorer):
            return model(**inputs).logits.reshape(-1)
    logits = model(**inputs).logits
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
    flat = flat.to(_logit_dtype(flat.dtype)) / temperature
    return F.log_softmax(flat, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).float()


# -- tree packing --------------------------------------------------------------------------------
@dataclass
class PackedRows:
    """Rows as one trie-ordered token sequence: node ``i`` holds ``tokens[i]`` at ``depth[i]`` (its
    index in every row through it) with parent ``parent[i]`` (-1 at a root); every parent precedes
    its children. ``paths[r][t]`` is the node of row ``r``'s token ``t``."""

    tokens: np.ndarray
    depth: np.ndarray
    parent: np.ndarray
    paths: list[np.ndarray]
    segments: list[tuple[int, int]]  # each row's new nodes: a chain [begin, end) in node order

    def attention_mask(self) -> torch.Tensor:
        """(N, N) bool: node ``i`` attends to node ``j`` iff ``j`` is ``i`` or one of its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros((n, n), dtype=torch.bool)
        for begin, end in self.segments:
            # A chain sees what its first node's parent sees, and itself causally.
            if self.parent[begin] >= 0:
                mask[begin:end] = mask[self.parent[begin]]
            mask[begin:end, begin:end] = torch.ones((end - begin, end - begin), dtype=torch.bool).tril_()
        return mask


def pack_rows(sequences: Sequence[Sequence[int]]) -> PackedRows:
    """The trie of ``sequences``: rows are inserted in lexicographic order, so each row's longest
    shared prefix is with the row inserted just before it (the longest common prefix of a row with
    any earlier one, in sorted order, is with its predecessor)."""
    arrays = [np.asarray(list(s), dtype=np.int64) for s in sequences]
    order = sorted(range(len(arrays)), key=lambda r: arrays[r].tolist())
    tokens: list[np.ndarray] = []
    depth: list[np.ndarray] = []
    parent: list[np.ndarray] = []
    paths: list[np.ndarray | None] = [None] * len(arrays)
    segments: list[tuple[int, int]] = []
    n_nodes, prev = 0, None
    for r in order:
        row = arrays[r]
        shared = 0
        if prev is not None:
            m = min(len(row), len(arrays[prev]))
            diff = np.flatnonzero(row[:m] != arrays[prev][:m])
            shared = int(diff[0]) if len(diff) else m
        new = len(row) - shared
        path = np.empty(len(row), dtype=np.int64)
        path[:shared] = paths[prev][:shared] if shared else path[:0]
        path[shared:] = np.arange(n_nodes, n_nodes + new)
        tokens.append(row[shared:])
        depth.append(np.arange(shared, len(row)))
        par = np.empty(new, dtype=np.int64)
        if new:
            par[0] = path[shared - 1] if shared else -1
            par[1:] = path[shared:-1]
        parent.append(par)
        paths[r] = path
        if new:
            segments.append((n_nodes, n_nodes + new))
        n_nodes += new
        prev = r
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return PackedRows(cat(tokens), cat(depth), cat(parent), paths, segments)  # type: ignore[arg-type]


def distinct_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """How many tokens a tree-packed forward over ``sequences`` processes (the trie's size)."""
    return len(pack_rows(sequences).tokens)


# -- the update's entry point ----------------------------------------------------------------------
def sequence_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    temperature: float = 1.0,
    max_batch_size: int | None = None,
    min_shared_prefix: int = 32,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    tree_packing: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probs of the responses of ``sequences`` from a fresh forward pass.

    Returns, for each sequence ``s`` with response start ``r`` (1 <= r <= len(s)), an fp32 tensor
    of length ``len(s) - r`` whose entry ``t - r`` is log_softmax(logits / temperature) of
    ``s[t]`` given ``s[:t]``. Runs under the caller's grad mode, so a trainer can backpropagate
    through it; the model's train/eval mode is left as it is.

    ``chunk_tokens`` > 0 scores through the chunked head (module docstring; 0: full logits, the
    reference path). ``tree_packing`` runs all the rows as one trie-packed sequence (the caller
    checks :func:`packing_fallback_reason` first). Otherwise rows are right-padded into a batch of
    at most ``max_batch_size`` rows (padding after the tokens cannot change them under causal
    attention), and when they share a prompt prefix of at least ``min_shared_prefix`` tokens the
    prefix runs once, its KV cache repeated across the rows (not for DDP-wrapped models, which
    allow one forward before a backward, nor under gradient checkpointing, which has no cache).
    """
    if len(sequences) != len(response_starts):
        raise ValueError(f"{len(sequences)} sequences but {len(response_starts)} response starts")
    for seq, start in zip(sequences, response_starts):
        if not 1 <= start <= len(seq):
            raise ValueError(f"response start {start} outside [1, {len(seq)}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    if chunk_tokens and head_fallback_reason(model) is not None:
        chunk_tokens = 0
    if not sequences:
        return []
    if tree_packing:
        return _packed_logprobs(model, sequences, response_starts, temperature, chunk_tokens)
    device = next(model.parameters()).device
    cache_arg, has_logits_to_keep = forward_kwargs(model)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    can_share = not hasattr(model, "module") and not checkpointing
    batch = max_batch_size or len(sequences)
    results: list[torch.Tensor] = []
    for begin in range(0, len(sequences), batch):
        seqs, starts = sequences[begin:begin + batch], response_starts[begin:begin + batch]
        width = max(len(s) for s in seqs)
        # The shared prefix stops before every row's first response logit (position start - 1).
        n_prefix = common_prefix_length(seqs, min(starts) - 1, min_shared_prefix) if can_share and len(seqs) > 1 else 0
        cols = width - n_prefix
        # Outputs are needed only from the position before the earliest response token on.
        dropped = min(starts) - 1 - n_prefix if has_logits_to_keep else 0
        kept = cols - dropped
        input_ids = torch.zeros((len(seqs), cols), dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        index, targets, counts = [], [], []
        for row, (seq, start) in enumerate(zip(seqs, starts)):
            input_ids[row, : len(seq) - n_prefix] = torch.tensor(list(seq[n_prefix:]), dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
            # Output position p - 1 scores token p (positions counted after the shared prefix).
            index.append(np.arange(start - 1, len(seq) - 1) - n_prefix - dropped + row * kept)
            targets.append(np.asarray(list(seq[start:]), dtype=np.int64))
            counts.append(len(seq) - start)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if has_logits_to_keep:
            inputs["logits_to_keep"] = kept
        if n_prefix:
            prefix = torch.tensor(list(seqs[0][:n_prefix]), dtype=torch.long, device=device)[None]
            keep_one = {"logits_to_keep": 1} if has_logits_to_keep else {}
            cache = getattr(model(input_ids=prefix, use_cache=True, **keep_one), cache_arg)
            cache.batch_repeat_interleave(len(seqs))
            inputs.update({cache_arg: cache, "use_cache": True,
                           "position_ids": torch.arange(n_prefix, width, device=device).expand(len(seqs), -1)})
        else:
            inputs["use_cache"] = False
        lp = _scores(model, inputs, torch.as_tensor(np.concatenate(index), device=device),
                     torch.as_tensor(np.concatenate(targets), device=device), temperature, chunk_tokens)
        results.extend(lp.split(counts))
    return results


def _packed_logprobs(model, sequences, response_starts, temperature: float, chunk_tokens: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    packed = pack_rows(sequences)
    # The nodes whose token some row scores (a response token of that row), each scored once,
    # from its parent's output position.
    scored = np.unique(np.concatenate([path[start:] for path, start in zip(packed.paths, response_starts)]))
    where = np.full(len(packed.tokens), -1, dtype=np.int64)
    where[scored] = np.arange(len(scored))
    # Additive, as eager attention needs it (0 where allowed, the dtype's minimum elsewhere); SDPA
    # takes it too, and on CPU runs it faster than the same mask as booleans (torch 2.13, one
    # 4,096-token sequence: 5-7 s against 11-12 s forward + backward).
    dtype = next(model.parameters()).dtype
    allowed = packed.attention_mask()
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    inputs = {
        "input_ids": torch.as_tensor(packed.tokens, device=device)[None],
        "position_ids": torch.as_tensor(packed.depth, device=device)[None],
        "attention_mask": mask.to(device)[None, None],
        "use_cache": False,
    }
    lp = _scores(model, inputs, torch.as_tensor(packed.parent[scored], device=device),
                 torch.as_tensor(packed.tokens[scored], device=device), temperature, chunk_tokens)
    return [lp[torch.as_tensor(where[path[start:]], device=device)] for path, start in zip(packed.paths, response_starts)]

