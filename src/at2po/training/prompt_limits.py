"""Prompts that cannot fit the model's context are skipped at start, counted and named.

A prompt of ``p`` tokens leaves room for a trajectory only when ``p + rollout.max_response_tokens``
fits the model's context (``max_position_embeddings``). A longer one would be generated past the
positions the model was trained on: slow (a 100 KB question took 103 s per step) and meaningless
(reward -1 every time), and it would still be trained on. We skip such rows rather than fail: one
malformed row in a large dataset should not stop a run, and the printed count makes the skip
visible. When no row fits, the run cannot do anything useful and stops with a message instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def context_length(model: Any) -> int | None:
    """The model's context in tokens (``config.max_position_embeddings``), or None when unknown."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the module
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def drop_long_prompts(engine: Any, model: Any, rows: Sequence[Any], what: str, say: Callable[[str], None] = print,
                      allow_none: bool = False) -> list[Any]:
    """``rows`` without those whose prompt leaves no room for the response budget; ``what`` names the
    data (e.g. ``data.train_file``) in the messages. With no row left, a ValueError (an empty
    ``rows`` stays empty when ``allow_none``)."""
    limit = context_length(model)
    if limit is None or not rows:
        return list(rows)
    budget = engine.config.max_response_tokens
    kept, long_ids, longest = [], [], 0
    for row in rows:
        n = len(engine.prompt(row).prompt_ids)
        if n + budget > limit:
            long_ids.append(getattr(row, "id", "?"))
            longest = max(longest, n)
        else:
            kept.append(row)
    if not long_ids:
        return kept
    detail = (f"prompt of up to {longest} tokens + rollout.max_response_tokens={budget} > the model's context of "
              f"{limit} tokens")
    if not kept and not allow_none:
        raise ValueError(f"{what}: no row fits ({detail}): shorten the questions, lower "
                         "rollout.max_response_tokens, or use a model with a longer context")
    shown = ", ".join(map(str, long_ids[:5])) + (", ..." if len(long_ids) > 5 else "")
    say(f"warning: {what}: skipping {len(long_ids)} of {len(rows)} rows that do not fit ({detail}); ids: {shown}")
    return kept
