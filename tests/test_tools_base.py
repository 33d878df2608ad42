import threading
import time

import pytest

from at2po.tools import (
    HTTPSearchTool,
    LocalSearchTool,
    PythonTool,
    Tool,
    ToolResult,
    build_tool,
    run_tool_calls,
)


class SleepTool(Tool):
    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, query: str) -> ToolResult:
        time.sleep(self.seconds)
        return ToolResult(f"slept {query}", ok=True)


class StuckTool(Tool):
    """Blocks until released: a tool that never returns on its own."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def run(self, query: str) -> ToolResult:
        self.release.wait()
        return ToolResult("finally", ok=True)


class RaisingTool(Tool):
    name = "boom"

    def run(self, query: str) -> ToolResult:
        raise RuntimeError(f"index exploded on {query}")


class Echo(Tool):
    name = "echo"

    def run(self, query: str) -> ToolResult:
        return ToolResult(query.upper(), ok=True)


def test_tool_call_never_raises():
    result = RaisingTool()("q")
    assert result == ToolResult("boom failed: RuntimeError: index exploded on q", ok=False, error="exception")


def test_calls_run_concurrently():
    tool = SleepTool(0.5)
    start = time.monotonic()
    results = run_tool_calls([(tool, str(i)) for i in range(4)], max_workers=4, timeout=5)
    elapsed = time.monotonic() - start
    assert [r.text for r in results] == ["slept 0", "slept 1", "slept 2", "slept 3"]
    assert all(r.ok for r in results)
    assert elapsed < 1.2, elapsed  # sequential would take 2 s


def test_max_workers_bounds_concurrency():
    tool = SleepTool(0.3)
    start = time.monotonic()
    run_tool_calls([(tool, str(i)) for i in range(4)], max_workers=2, timeout=5)
    assert 0.55 < time.monotonic() - start < 1.2  # two waves of two


def test_stuck_tool_times_out_without_blocking_the_round():
    stuck = StuckTool()
    try:
        start = time.monotonic()
        results = run_tool_calls([(Echo(), "a"), (stuck, "b"), (Echo(), "c")], max_workers=2, timeout=0.3)
        elapsed = time.monotonic() - start
    finally:
        stuck.release.set()
    assert elapsed < 1.0, elapsed
    assert results[0] == ToolResult("A", ok=True)
    assert results[1] == ToolResult("tool 'stuck' timed out after 0.3s", ok=False, error="timeout")
    assert results[2] == ToolResult("C", ok=True)


def test_stuck_tools_free_their_slot():
    # With one worker, a stuck call must not keep the next call from running.
    stuck = StuckTool()
    try:
        results = run_tool_calls([(stuck, "a"), (Echo(), "b")], max_workers=1, timeout=0.2)
    finally:
        stuck.release.set()
    assert results[0].error == "timeout"
    assert results[1] == ToolResult("B", ok=True)


def test_exceptions_and_bad_returns_become_results_in_order():
    def plain_function(query: str) -> ToolResult:  # not a Tool subclass: may raise
        raise ValueError("bad query")

    def wrong_type(query: str) -> str:
        return "not a ToolResult"

    calls = [(Echo(), "x"), (RaisingTool(), "y"), (plain_function, "z"), (wrong_type, "w"), (Echo(), "v")]
    results = run_tool_calls(calls, max_workers=3, timeout=5)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert results[0].text == "X" and results[4].text == "V"
    assert results[1].text == "boom failed: RuntimeError: index exploded on y"
    assert results[2].text == "plain_function failed: ValueError: bad query"
    assert results[3].text == "wrong_type failed: returned str, not ToolResult"
    assert all(r.error == "exception" for r in results[1:4])


def test_order_preserved_when_later_calls_finish_first():
    calls = [(SleepTool(0.3), "slow"), (SleepTool(0.0), "fast")]
    assert [r.text for r in run_tool_calls(calls, max_workers=2, timeout=5)] == ["slept slow", "slept fast"]


def test_empty_round():
    assert run_tool_calls([], max_workers=4, timeout=1) == []


def test_registry(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "0", "contents": "Paris is the capital of France."}\n')
    assert isinstance(build_tool("search_bm25", corpus_path=corpus), LocalSearchTool)
    http = build_tool("search_http", url="http://127.0.0.1:9", timeout=1.0)
    assert isinstance(http, HTTPSearchTool) and http.endpoint == "http://127.0.0.1:9/retrieve"
    python = build_tool("python", timeout=2.0)
    assert isinstance(python, PythonTool) and python.timeout == 2.0
    with pytest.raises(ValueError, match="unknown tool 'calculator'; valid choices: python, search_bm25, search_http"):
        build_tool("calculator")
