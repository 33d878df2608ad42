"""The tool interface, the tool registry, and concurrent execution of one round's tool calls.

A tool describes itself (class attributes): its ``name`` (the registry and config key, and the
tag the model writes: ``<name> input </name>``), the sentence it adds to the system prompt, and
how much input it accepts. The agent protocol (``at2po.agent.AgentProtocol``) derives the stop
strings, the action parser and the format check from the enabled tools, so a new tool is one
class with ``@register_tool`` (see docs/architecture.md).

Contract (docs/method.md §1): a tool failure must never crash a rollout. Every tool therefore
turns its own failures into a ``ToolResult(ok=False)`` whose text tells the model what went
wrong, and ``run_tool_calls`` additionally guards against tools that raise or hang.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, cast


@dataclass
class ToolResult:
    """Outcome of one tool call.

    ``text`` is the observation body shown to the model, without the ``<result>`` wrapper.
    ``error`` is a short machine-readable failure kind (e.g. "timeout", "connection",
    "http_status", "bad_response", "empty_query", "exit_code", "exception"); None when ok.
    ``infra`` marks a failure of a service the tool depends on (unreachable, timeout, 5xx),
    not of the model's input: counted apart, and redone when ``at2po eval`` resumes.
    """

    text: str
    ok: bool
    error: str | None = None
    infra: bool = False


class Tool(ABC):
    """A callable tool. Subclasses implement ``run``; calling the tool never raises.

    Self-description, read by the agent protocol and the system prompt:
      ``name``: registry/config name and the action tag (``<name>...</name>``);
      ``description``: the sentence the system prompt gets when the tool is enabled;
      ``max_input_chars``: longer inputs are cut to this bound (and still run);
      ``dedent_input``: remove the common indentation of the input first (code).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    max_input_chars: ClassVar[int] = 2000
    dedent_input: ClassVar[bool] = False

    def __call__(self, query: str) -> ToolResult:
        try:
            return self.run(query)
        except Exception as exc:  # the never-raise contract: report, don't propagate
            return exception_result(self.name, exc)

    @abstractmethod
    def run(self, query: str) -> ToolResult:
        """Execute the tool; may raise (``__call__`` converts exceptions)."""


def exception_result(tool_name: str, exc: BaseException) -> ToolResult:
    return ToolResult(
        text=f"{tool_name} failed: {type(exc).__name__}: {exc}", ok=False, error="exception"
    )


def _tool_name(tool: Callable[[str], ToolResult]) -> str:
    # Tools have a name; plain functions passed as tools have a __name__.
    return getattr(tool, "name", None) or getattr(tool, "__name__", type(tool).__name__)


def _safe_call(tool: Callable[[str], ToolResult], query: str) -> ToolResult:
    try:
        result = tool(query)
    except Exception as exc:
        return exception_result(_tool_name(tool), exc)
    if not isinstance(result, ToolResult):
        return ToolResult(
            text=f"{_tool_name(tool)} failed: returned {type(result).__name__}, not ToolResult",
            ok=False,
            error="exception",
        )
    return result


MAX_TIMEOUT_SECONDS = 86_400.0  # a day: longer waits are typos (and inf overflows the clocks)


def check_timeout(field: str, value: float) -> float:
    """``value`` as a timeout in seconds, or a one-line error naming ``field``: a finite number
    in (0, MAX_TIMEOUT_SECONDS]."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number of seconds, got {value!r}") from None
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:  # also refuses nan and inf
        raise ValueError(f"{field} must be > 0 and at most {MAX_TIMEOUT_SECONDS:.0f} seconds, got {value!r}")
    return seconds


class ToolCallPool:
    """Runs tool calls in the background: at most ``max_workers`` at once, each with ``timeout``
    seconds of wall clock from its start; calls beyond ``max_workers`` wait for a free slot.

    A call that overruns is reported as timed out and abandoned: Python cannot kill a thread, so
    it keeps running in a daemon thread and its late result is dropped. Abandoned calls free
    their slot, so a stuck tool delays its caller by at most ``timeout`` and never blocks the
    process from exiting. (A ThreadPoolExecutor would do neither: its workers stay occupied and
    are joined at interpreter exit.) Failures come back as ``ToolResult(ok=False)``, never raised.

    ``submit`` queues a call under a caller's key; ``wait`` returns the (key, result) pairs that
    are done, so a caller can keep other work (e.g. a generation engine) going in between.
    """

    def __init__(self, max_workers: int = 8, timeout: float = 30.0) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self.timeout = check_timeout("tool timeout", timeout)
        self._queued: list[tuple[Any, Tool, str]] = []
        self._running: dict[int, tuple[Any, Tool, float]] = {}  # call id -> (key, tool, monotonic deadline)
        self._finished: queue.Queue[tuple[int, ToolResult]] = queue.Queue()  # private to this pool
        self._next_id = 0

    def submit(self, key: Any, tool: Tool, query: str) -> None:
        """Queue one call; it starts at the next ``wait`` with a free worker slot."""
        self._queued.append((key, tool, query))

    @property
    def pending(self) -> int:
        """Calls submitted and not yet returned by ``wait`` (queued or running)."""
        return len(self._queued) + len(self._running)

    def wait(self, timeout: float | None = None) -> list[tuple[Any, ToolResult]]:
        """Start queued calls while slots are free, then wait until at least one call is done
        (finished or timed out) or ``timeout`` seconds passed (None: no limit; 0: just look).
        Returns every call done by then, in the order they finished."""
        self._start_queued()
        done: list[tuple[Any, ToolResult]] = []
        if not self._running:
            return done
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            deadline = min(d for _, _, d in self._running.values())
            limit = deadline if until is None else min(deadline, until)
            try:
                self._take(*self._finished.get(timeout=max(0.0, limit - time.monotonic())), done)
                while True:  # whatever else finished meanwhile
                    self._take(*self._finished.get_nowait(), done)
            except queue.Empty:
                pass
            now = time.monotonic()
            for call_id, (key, tool, deadline) in list(self._running.items()):
                if deadline <= now:
                    del self._running[call_id]
                    done.append((key, ToolResult(
                        text=f"tool '{_tool_name(tool)}' timed out after {self.timeout:g}s", ok=False, error="timeout")))
            self._start_queued()
            if done or not self._running or (until is not None and now >= until):
                return done

    def _take(self, call_id: int, result: ToolResult, done: list) -> None:
        if call_id in self._running:  # otherwise it already timed out; drop the late result
            done.append((self._running.pop(call_id)[0], result))

    def _start_queued(self) -> None:
        while self._queued and len(self._running) < self.max_workers:
            key, tool, query = self._queued.pop(0)
            call_id, self._next_id = self._next_id, self._next_id + 1
            self._running[call_id] = (key, tool, time.monotonic() + self.timeout)
            threading.Thread(
                target=self._worker, args=(call_id, tool, query), daemon=True,
                name=f"tool-{_tool_name(tool)}-{call_id}",
            ).start()

    def _worker(self, call_id: int, tool: Tool, query: str) -> None:
        self._finished.put((call_id, _safe_call(tool, query)))


def run_tool_calls(
    calls: list[tuple[Tool, str]], max_workers: int = 8, timeout: float = 30.0
) -> list[ToolResult]:
    """Run one generation round's tool calls concurrently (a :class:`ToolCallPool`, same
    concurrency, timeout and failure handling) and return the results in input order."""
    pool = ToolCallPool(max_workers, timeout)
    for index, (tool, query) in enumerate(calls):
        pool.submit(index, tool, query)
    results: list[ToolResult | None] = [None] * len(calls)
    while pool.pending:
        for index, result in pool.wait():
            results[index] = result
    return cast(list[ToolResult], results)  # every slot is filled by now


# -- registry -----------------------------------------------------------------------------------
ToolBuilder = Callable[..., Tool]
TOOLS: dict[str, ToolBuilder] = {}


def register_tool(name: str | None = None) -> Callable[[Any], Any]:
    """Class or function decorator: register a tool builder under ``name`` (default: the class's
    ``name``). ``build_tool(name, **options)`` then calls it with the options of the config."""

    def decorate(builder: Any) -> Any:
        key = name or getattr(builder, "name", None)
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"a tool name must be an identifier (it is the tag <name>), got {key!r}")
        if key in ("answer", "think", "result"):
            raise ValueError(f"tool name {key!r} is reserved by the agent protocol")
        TOOLS[key] = builder
        return builder

    return decorate


def build_tool(name: str, **options: Any) -> Tool:
    """Construct a registered tool; ``options`` go to its builder. Unknown names and options
    raise ValueError naming them."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; registered tools: {', '.join(sorted(TOOLS))}")
    try:
        tool = TOOLS[name](**options)
    except TypeError as exc:  # an option the builder does not take
        raise ValueError(f"tool {name!r}: {exc}") from None
    if not isinstance(tool, Tool) or tool.name != name:
        raise ValueError(f"tool builder {name!r} must return a Tool whose name is {name!r}")
    return tool
