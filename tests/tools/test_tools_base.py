import threading
import time

import pytest

from at2po.retriever.bm25 import BM25Index
from at2po.tools import (
    TOOLS,
    HTTPSearchTool,
    LocalSearchTool,
    PythonTool,
    Tool,
    ToolResult,
    build_tool,
    register_tool,
    run_tool_calls,
)
from at2po.config import load_config
from at2po.tools.base import ToolCallPool


class SleepTool(Tool):
    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, query: str) -> ToolResult:
        time.sleep(self.seconds)
        return ToolResult(f"slept {query}", ok=True)


class GatedTool(Tool):
    """Counts the calls that have started and are running; each call holds its slot until the test
    opens the gate for it, so concurrency is observed through events, not through wall time."""

    name = "gated"

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.gate = threading.Semaphore(0)
        self.started = 0
        self.running = 0
        self.max_running = 0

    def run(self, query: str) -> ToolResult:
        with self.changed:
            self.started += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.changed.notify_all()
        if not self.gate.acquire(timeout=30):  # a test that never opens the gate fails, not hangs
            return ToolResult(f"gate stayed shut for {query}", ok=False, error="stuck")
        with self.changed:
            self.running -= 1
        return ToolResult(f"done {query}", ok=True)

    def wait_started(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.started >= n, timeout=30), (self.started, n)


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


def _run_in_background(calls, **kwargs):
    """run_tool_calls in a thread: (thread, list that receives its results)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(run_tool_calls(calls, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def test_calls_run_concurrently():
    # All four calls are inside the tool at the same time (none is let out before the fourth
    # started): run one after the other, the second would never start and the gate's own
    # 30 s limit would fail the calls.
    tool = GatedTool()
    thread, out = _run_in_background([(tool, str(i)) for i in range(4)], max_workers=4, timeout=60)
    tool.wait_started(4)
    assert tool.running == 4
    tool.gate.release(4)
    thread.join(timeout=30)
    assert not thread.is_alive()
    [results] = out
    assert [r.text for r in results] == ["done 0", "done 1", "done 2", "done 3"]
    assert all(r.ok for r in results)
    assert tool.max_running == 4


def test_max_workers_bounds_concurrency():
    # Two waves of two: two calls start, and a third starts only when one of them finishes.
    tool = GatedTool()
    thread, out = _run_in_background([(tool, str(i)) for i in range(4)], max_workers=2, timeout=60)
    tool.wait_started(2)
    time.sleep(0.2)  # room for a third call to start if the bound leaked (a pass never depends on it)
    assert tool.started == 2 and tool.running == 2
    tool.gate.release()  # one call finishes: its slot goes to the next
    tool.wait_started(3)
    time.sleep(0.1)
    assert tool.started == 3 and tool.running == 2
    tool.gate.release(3)
    thread.join(timeout=30)
    assert not thread.is_alive()
    [results] = out
    assert [r.text for r in results] == ["done 0", "done 1", "done 2", "done 3"]
    assert tool.max_running == 2


def test_stuck_tool_times_out_without_blocking_the_round():
    stuck = StuckTool()
    try:
        start = time.monotonic()
        thread, out = _run_in_background([(Echo(), "a"), (stuck, "b"), (Echo(), "c")], max_workers=2, timeout=0.3)
        thread.join(timeout=30)
        elapsed = time.monotonic() - start
        # The round came back while the stuck call was still stuck (its release is only set below):
        # it did not wait for the tool.
        assert not thread.is_alive() and not stuck.release.is_set()
    finally:
        stuck.release.set()
    # Generous on purpose (a loaded machine may stall threads for seconds): the bound only has to
    # separate "about the 0.3 s timeout" from "waited for the stuck tool", which the check above
    # already rules out.
    assert elapsed < 10, elapsed
    [results] = out
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


@pytest.mark.sandbox
def test_registry_builds_the_python_tool():
    python = build_tool("python", timeout=2.0)
    assert isinstance(python, PythonTool) and python.timeout == 2.0 and python.isolated


def test_registry(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "0", "contents": "Paris is the capital of France."}\n')
    bm25 = build_tool("search", corpus_file=str(corpus))
    assert isinstance(bm25, LocalSearchTool) and (bm25.topk, bm25.max_chars) == (3, 1000)
    assert bm25("capital of France") == ToolResult("Page 1: Paris is the capital of France.", ok=True)
    http = build_tool("search", backend="http", retriever_url="http://127.0.0.1:9")
    assert isinstance(http, HTTPSearchTool) and http.endpoint == "http://127.0.0.1:9/retrieve"
    assert {"python", "search"} <= set(TOOLS)
    with pytest.raises(ValueError) as err:
        build_tool("calculator")
    assert str(err.value) == f"unknown tool 'calculator'; registered tools: {', '.join(sorted(TOOLS))}"
    if set(TOOLS) == {"python", "search"}:  # nothing else registered in this process
        assert str(err.value) == "unknown tool 'calculator'; registered tools: python, search"
    # the old registry names are gone
    for old_name in ("search_bm25", "search_http"):
        with pytest.raises(ValueError, match=f"unknown tool '{old_name}'"):
            build_tool(old_name)


# ---------------------------------------------------------------------------------------------
# registry: options, validation, plug-in tools
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def clean_registry():
    """Remove whatever a test registers from TOOLS, so other tests see the built-ins only."""
    before = dict(TOOLS)
    try:
        yield TOOLS
    finally:
        for key in set(TOOLS) - set(before):
            del TOOLS[key]
        TOOLS.update(before)


def test_search_builder_options(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"id": "0", "contents": "Paris is the capital of France."}\n'
        '{"id": "1", "contents": "Rome is the capital of Italy."}\n'
    )
    tool = build_tool("search", backend="bm25", corpus_file=str(corpus), topk=1, max_passage_chars=5)
    assert (tool.topk, tool.max_chars) == (1, 5)
    assert tool("capital of Italy") == ToolResult("Page 1: Rome ", ok=True)
    index_dir = tmp_path / "index"
    BM25Index(["Paris is the capital of France.", "Rome is the capital of Italy."]).save(index_dir)
    from_index = build_tool("search", index_dir=str(index_dir), topk=2)
    assert isinstance(from_index, LocalSearchTool) and from_index.index.docs == tool.index.docs
    http = build_tool("search", backend="http", retriever_url="http://host:1/retrieve", topk=4, max_passage_chars=7)
    assert (http.endpoint, http.topk, http.max_chars) == ("http://host:1/retrieve", 4, 7)
    with pytest.raises(ValueError, match="tools.search.corpus_file"):
        build_tool("search")  # bm25 needs a corpus or an index
    with pytest.raises(ValueError, match="tools.search.topk must be >= 1, got 0"):
        build_tool("search", backend="http", topk=0)


def test_build_tool_rejects_bad_options():
    with pytest.raises(ValueError, match="tools.search.backend='ftp' is not one of bm25, http"):
        build_tool("search", backend="ftp")
    with pytest.raises(ValueError, match="tools.python.timeout must be > 0 and at most 86400 seconds, got 0"):
        build_tool("python", timeout=0)
    # inf and 1e12 once overflowed the clock arithmetic (OverflowError) inside the call; nan
    # compared false with every bound; a negative limit switched its rlimit off (-1 is
    # RLIM_INFINITY: a 1,500 MiB allocation went through) or mangled the output.
    for bad in (-1.5, float("inf"), float("nan"), 1e12, "soon"):
        with pytest.raises(ValueError, match=r"^tools.python.timeout must be"):
            build_tool("python", timeout=bad, unsafe_allow_weak_isolation=True)
    for field in ("memory_mb", "max_output_chars", "max_file_mb", "max_open_files", "max_processes", "disk_mb"):
        for bad in (-1, 0, 2.5, True):
            with pytest.raises(ValueError, match=rf"^python tool: {field} must be an integer >= 1, got {bad!r}$"):
                build_tool("python", unsafe_allow_weak_isolation=True, **{field: bad})
    with pytest.raises(ValueError, match="^tool 'python': .*colour") as err:
        build_tool("python", colour="red")
    assert "unexpected keyword argument" in str(err.value)
    with pytest.raises(ValueError, match="^tool 'search': .*corpus_path"):
        build_tool("search", corpus_path="c.jsonl")  # the old option name of search_bm25


def test_tool_call_pool_refuses_a_timeout_the_clocks_cannot_hold():
    for bad in (0, -1, float("inf"), float("nan"), 1e12):
        with pytest.raises(ValueError, match=r"^tool timeout must be > 0 and at most 86400 seconds"):
            run_tool_calls([], timeout=bad)
    for field in ("tools.python.timeout", "rollout.tool_timeout"):
        with pytest.raises(ValueError, match=rf"^{field} must be > 0 and at most 86400 seconds, got 1000000000000.0"):
            load_config(None, [f"{field}=1e12"])
        for bad in ("inf", "nan"):
            with pytest.raises(ValueError, match=rf"^{field} must be a finite number, got {bad}"):
                load_config(None, [f"{field}={bad}"])


def test_register_tool_class_and_build(clean_registry):
    @register_tool()
    class Calc(Tool):
        name = "calc"
        max_input_chars = 5

        def __init__(self, precision: int = 2) -> None:
            self.precision = precision

        def run(self, query: str) -> ToolResult:
            return ToolResult(f"{eval(query, {}):.{self.precision}f}", ok=True)

    assert TOOLS["calc"] is Calc
    tool = build_tool("calc", precision=1)
    assert isinstance(tool, Calc) and tool("1/4") == ToolResult("0.2", ok=True)
    assert build_tool("calc")("1/4") == ToolResult("0.25", ok=True)
    with pytest.raises(ValueError, match="^tool 'calc': .*digits"):
        build_tool("calc", digits=3)
    with pytest.raises(ValueError) as err:
        build_tool("nope")
    assert "calc, python, search" in str(err.value)


def test_register_tool_function_under_a_name(clean_registry):
    @register_tool("echo")
    def make_echo() -> Tool:
        return Echo()

    assert TOOLS["echo"] is make_echo
    assert build_tool("echo")("hi") == ToolResult("HI", ok=True)


def test_builder_returning_another_tool_is_rejected(clean_registry):
    register_tool("shout")(lambda: Echo())  # an Echo is named "echo", not "shout"
    with pytest.raises(ValueError, match="tool builder 'shout' must return a Tool whose name is 'shout'"):
        build_tool("shout")
    register_tool("text")(lambda: "not a tool")
    with pytest.raises(ValueError, match="tool builder 'text' must return a Tool"):
        build_tool("text")


@pytest.mark.parametrize("reserved", ["answer", "think", "result"])
def test_register_tool_rejects_reserved_names(clean_registry, reserved):
    with pytest.raises(ValueError, match=f"tool name '{reserved}' is reserved"):
        register_tool(reserved)(lambda: Echo())

    class Reserved(Tool):
        name = reserved

        def run(self, query: str) -> ToolResult:
            return ToolResult(query, ok=True)

    with pytest.raises(ValueError, match="reserved"):
        register_tool()(Reserved)
    assert reserved not in TOOLS


@pytest.mark.parametrize("bad", ["two words", "a-b", "", "<x>"])
def test_register_tool_needs_an_identifier(clean_registry, bad):
    with pytest.raises(ValueError, match="must be an identifier"):
        register_tool(bad)(lambda: Echo())
    assert bad not in TOOLS


def test_register_tool_needs_a_name(clean_registry):
    with pytest.raises(ValueError, match="must be an identifier"):
        register_tool()(lambda: Echo())  # a function has no `name`


def test_a_pool_reports_calls_as_they_finish_and_lets_its_caller_go_on():
    """ToolCallPool (the stream schedule's tool runner): ``wait(0)`` only looks, results come
    back under the caller's keys in the order the calls finish, queued calls wait for a slot,
    and a stuck call times out while the others go on."""
    tool, stuck = GatedTool(), StuckTool()
    pool = ToolCallPool(max_workers=2, timeout=60)
    try:
        pool.submit("a", tool, "a")
        pool.submit("b", tool, "b")
        pool.submit("c", tool, "c")
        assert pool.wait(0) == [] and pool.pending == 3  # nothing finished: the caller goes on
        tool.wait_started(2)
        assert tool.started == 2  # "c" is queued behind the two workers
        tool.gate.release()
        first = pool.wait()
        assert len(first) == 1 and first[0][0] in ("a", "b") and first[0][1].text == f"done {first[0][0]}"
        tool.wait_started(3)  # its slot went to "c"
        tool.gate.release(2)
        rest = []
        while pool.pending:
            rest += pool.wait()
        assert sorted(k for k, _ in first + rest) == ["a", "b", "c"]
        assert all(r.ok for _, r in rest)

        short = ToolCallPool(max_workers=1, timeout=0.2)
        short.submit(1, stuck, "x")
        short.submit(2, Echo(), "y")
        got = []
        while short.pending:
            got += short.wait()
        assert got == [(1, ToolResult("tool 'stuck' timed out after 0.2s", ok=False, error="timeout")),
                       (2, ToolResult("Y", ok=True))]
    finally:
        stuck.release.set()
        tool.gate.release(10)
