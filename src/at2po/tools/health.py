"""Tools that depend on a service (the HTTP retriever) must not fail silently.

A tool whose answers come from a service may define ``preflight()`` (raise ToolServiceError when
the service cannot be reached) and ``failing()`` (a message once the service has failed every
call for too long, else None). Training and evaluation call ``preflight_tools`` before the first
rollout and ``check_tools`` after each rollout, and stop with the message: a run whose searches
all fail would otherwise train on error observations, or report EM 0 as a result.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any


class ToolServiceError(ValueError):
    """A tool's service is unreachable or keeps failing: a one-line error for the user."""


def preflight_tools(tools: Iterable[Any]) -> None:
    for tool in tools:
        check = getattr(tool, "preflight", None)
        if callable(check):
            check()


def check_tools(tools: Iterable[Any]) -> None:
    for tool in tools:
        failing = getattr(tool, "failing", None)
        message = failing() if callable(failing) else None
        if message:
            raise ToolServiceError(message)


class FailureStreak:
    """Counts consecutive calls that failed for infrastructure reasons (thread-safe: a round's
    calls run in parallel). ``limit`` 0 never trips."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"max_consecutive_failures must be >= 0, got {limit}")
        self.limit = limit
        self.count = 0
        self.last_error = ""
        self._lock = threading.Lock()

    def record(self, infra_failure: bool, error: str = "", calls: int = 1) -> None:
        with self._lock:
            if infra_failure:
                self.count += calls
                self.last_error = error
            else:
                self.count = 0

    @property
    def tripped(self) -> bool:
        return self.limit > 0 and self.count >= self.limit
