"""What the trainer needs to run on several processes (Accelerate: DDP or FSDP) and stay correct.

- Metrics: each process describes its step as sums, weighted means (numerator, weight) and maxima;
  :func:`reduce_metrics` combines every process's description, so a mean is over all rows of the
  step (not a mean of per-process means when processes hold different row counts).
- Equal collectives: DDP and FSDP need every process to run the same number of forward/backward
  passes and optimizer steps. With ``rollout.samples_per_tree=0`` trees keep every leaf, so
  processes hold different row counts; :func:`pad_plans` pads the shorter plans with zero-weight
  micro-batches.
- Loss scale: gradients are averaged over processes, so a micro-batch's loss is weighted by
  ``world_size * its share / the global denominator`` of its mini-batch; a 2-process update then
  equals the 1-process update on the same rows (docs/architecture.md, "Several processes").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LocalMetrics:
    """One process's contribution to a step's metrics."""

    sums: dict[str, float] = field(default_factory=dict)  # totals: tool calls, tokens
    means: dict[str, tuple[float, float]] = field(default_factory=dict)  # (numerator, weight) over rows/tokens
    maxima: dict[str, float] = field(default_factory=dict)  # depth, times, grad norm

    def mean(self, key: str, total: float, weight: float) -> None:
        self.means[key] = (float(total), float(weight))

    def as_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "means": {k: list(v) for k, v in self.means.items()}, "maxima": self.maxima}


def combine(records: list[dict[str, Any]]) -> dict[str, float]:
    """The step's metrics from every process's :meth:`LocalMetrics.as_dict`: sums add, means are
    total numerator / total weight (0 when no process had any weight), maxima take the max."""
    out: dict[str, float] = {}
    for r in records:
        for k, v in r["sums"].items():
            out[k] = out.get(k, 0.0) + float(v)
    totals: dict[str, list[float]] = {}
    for r in records:
        for k, (num, w) in r["means"].items():
            t = totals.setdefault(k, [0.0, 0.0])
            t[0] += float(num)
            t[1] += float(w)
    out.update({k: (num / w if w > 0 else 0.0) for k, (num, w) in totals.items()})
    for r in records:
        for k, v in r["maxima"].items():
            out[k] = max(out.get(k, -math.inf), float(v))
    return out


def all_gather_objects(accelerator, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a plain list on one process)."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def reduce_metrics(accelerator, local: LocalMetrics) -> dict[str, float]:
    """The step's metrics over all processes (identical on every process)."""
    return combine(all_gather_objects(accelerator, local.as_dict()))


def std_from_moments(total: float, total_sq: float, n: float) -> float:
    """Sample standard deviation (n - 1) from Σx, Σx² and n; 0 for fewer than two values."""
    if n < 2:
        return 0.0
    var = (total_sq - total * total / n) / (n - 1)
    return math.sqrt(max(var, 0.0))


# -- rank-equal mini-batch plans ------------------------------------------------------------------
Plan = list[tuple[list[int], list[list[int]]]]  # mini-batches as (rows, micro-batches' rows)


def pad_plans(plans: list[Plan], everyone: list[tuple[list[list[int]], list[list[float]]]]):
    """Pad this process's epoch plans so that every process runs the same number of mini-batches
    per epoch and micro-batches per mini-batch.

    ``everyone[r] = (counts, shares)`` of process r: ``counts[e][m]`` its number of micro-batches
    and ``shares[e][m]`` its loss weight (rows or tokens) in mini-batch m of epoch e. Returns, per
    epoch, ``(rows, micro-batches, denominator)`` triples where the denominator is the mini-batch's
    weight summed over all processes. A padding micro-batch is ``None`` (the trainer runs it with
    zero weight); a padding mini-batch has no rows; a mini-batch empty on every process is dropped.
    """
    out = []
    for e, plan in enumerate(plans):
        n_mini = max(len(counts[e]) for counts, _ in everyone)
        padded = []
        for m in range(n_mini):
            rows, micros = plan[m] if m < len(plan) else ([], [])
            n_micro = max((counts[e][m] if m < len(counts[e]) else 0) for counts, _ in everyone)
            if n_micro == 0:  # no process has rows here: no optimizer step anywhere
                continue
            den = sum(shares[e][m] for _, shares in everyone if m < len(shares[e]))
            padded.append((rows, list(micros) + [None] * (n_micro - len(micros)), den))
        out.append(padded)
    return out


def check_world_size(prompts_per_step: int, mini_batch_prompts: int, world: int) -> None:
    """Every process must get the same number of prompts and of whole trees per mini-batch."""
    if prompts_per_step % world:
        raise ValueError(f"trainer.prompts_per_step ({prompts_per_step}) must be a multiple of the number of "
                         f"processes ({world}): change it or launch with a number of processes that divides it")
    if mini_batch_prompts % world:
        raise ValueError(f"trainer.mini_batch_prompts ({mini_batch_prompts}) must be a multiple of the number of "
                         f"processes ({world}): change it or launch with a number of processes that divides it")


# -- sharded models (FSDP) ------------------------------------------------------------------------
def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_request(accelerator) -> None:
    """Fail when the launch asked for FSDP but Accelerate did not enable it. Accelerate 1.16 turns
    FSDP on only for GPU-like devices (CUDA, XPU, NPU, ...): on CPU it silently trains with DDP,
    every process holding the whole model, which is not what a user of an FSDP config expects."""
    import os

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not is_fsdp(accelerator):
        raise ValueError(f"the Accelerate config asks for FSDP but this launch runs {accelerator.distributed_type.value} "
                         f"on {accelerator.device.type}: Accelerate runs FSDP only on GPUs; on CPU use a DDP config "
                         f"(configs/accelerate/cpu_2proc.yaml)")


def full_state_dict(accelerator, model) -> dict:
    """The policy's full (unsharded) weights by name on every process: gathered under FSDP (a
    collective: every process must call it), the module's own state dict otherwise."""
    if not is_fsdp(accelerator):
        return accelerator.unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimizer state to checkpoint: gathered by parameter name under FSDP (collective)."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_state(accelerator, model, optimizer, weights: dict, optim_state: dict) -> None:
    """Load full weights and optimizer state into a sharded model (FSDP); every process calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=opts)
