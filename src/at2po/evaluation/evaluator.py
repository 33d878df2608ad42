"""The greedy evaluator: one chain per sample, one record per sample (docs/method.md §5).

Used by the trainer's validation, ``at2po eval`` and the ablation benchmark alike, so that every
number called "held-out EM" comes from the same code. Per-row records carry the task's metrics,
the turns and tool calls, the answer and the response, so any breakdown (per dataset, per hop
count via ``meta``) is a grouping of records, not a second pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from at2po.agent import decode_ids

if TYPE_CHECKING:
    from at2po.rollout.engine import TreeRolloutEngine
    from at2po.tasks.base import Sample

__all__ = ["evaluate_greedy", "mean_metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _skipped_record(sample: Sample, metrics: Sequence[str], reason: str) -> dict[str, Any]:
    rec = {"id": sample.id, "prompt": sample.prompt, "target": _jsonable(sample.target), "prediction": None,
           "reward": 0.0, **{m: 0.0 for m in metrics}, "turns": 0, "tool_calls": 0, "tool_failures": 0,
           "infra_failures": 0, "response": "", "skipped": reason}
    if sample.meta:
        rec["meta"] = dict(sample.meta)
    return rec


def evaluate_greedy(
    engine: TreeRolloutEngine,
    samples: Sequence[Sample],
    *,
    batch_size: int | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    context: int | None = None,
) -> list[dict[str, Any]]:
    """Roll out every sample greedily (``batch_size`` at a time; default all at once) and return
    one record per sample, in order:

    ``{"id", "prompt", "target", "prediction", "reward", <task metrics>, "turns", "tool_calls",
    "tool_failures", "infra_failures", "response"}`` plus ``"meta"`` when the sample has one
    (``infra_failures``: failed calls whose service failed, see ``ToolResult.infra``). ``on_batch`` receives each batch's
    records as soon as they exist (``at2po eval`` writes them to disk there).

    With ``context`` (the model's context in tokens), a sample whose prompt plus
    ``rollout.max_response_tokens`` exceeds it is not generated: its record scores as wrong (reward
    and metrics 0, so a dataset keeps its denominator) and carries a ``skipped`` reason.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: list[dict[str, Any]] = []
    step = batch_size or max(len(samples), 1)
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        prompts = [engine.prompt(s) for s in chunk]
        budget = engine.config.max_response_tokens
        fits = [context is None or len(p.prompt_ids) + budget <= context for p in prompts]
        result = engine.validate([p for p, ok in zip(prompts, fits) if ok]) if any(fits) else None
        leaves = {leaf.tree: leaf for leaf in result.rows} if result is not None else {}  # one per sample
        tree_of = {i: t for t, i in enumerate(i for i, ok in enumerate(fits) if ok)}
        batch = []
        for i, sample in enumerate(chunk):
            if not fits[i]:
                batch.append(_skipped_record(sample, engine.task.metrics,
                                             f"prompt of {len(prompts[i].prompt_ids)} tokens + "
                                             f"rollout.max_response_tokens={budget} > the model's context of "
                                             f"{context} tokens"))
                continue
            t = tree_of[i]
            leaf = leaves[t]
            score = leaf.score
            rec = {
                "id": sample.id, "prompt": sample.prompt, "target": _jsonable(sample.target),
                "prediction": score.answer, "reward": score.reward, **score.metrics,
                "turns": len(leaf.sequence.path) - 1, "tool_calls": result.stats[t].tool_calls,
                "tool_failures": result.stats[t].tool_failures, "infra_failures": result.stats[t].tool_infra_failures,
                "response": decode_ids(engine.tokenizer, leaf.sequence.response_ids.tolist()),
            }
            if sample.meta:
                rec["meta"] = dict(sample.meta)
            batch.append(rec)
        records += batch
        if on_batch is not None:
            on_batch(batch)
    return records


def mean_metrics(records: Sequence[dict[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    """Mean of each key over the records (0.0 for none)."""
    n = len(records)
    return {k: (sum(float(r[k]) for r in records) / n if n else 0.0) for k in keys}
