"""HTTPSearchTool against a real HTTP server on localhost that plays Search-R1's retriever."""

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from at2po.tools import HTTPSearchTool, ToolResult
from at2po.tools.health import ToolServiceError, check_tools

# A behaviour maps (request payload, attempt number from 1) to (status, body, delay seconds).
Behaviour = Callable[[dict, int], tuple[int, bytes, float]]


def hits_for(query: str, k: int) -> list[dict]:
    return [
        {"document": {"id": str(i), "contents": f'"{query} {i}"\nAbout {query}, part {i}.'}, "score": 10.0 - i}
        for i in range(k)
    ]


def answer(payload: dict, attempt: int) -> tuple[int, bytes, float]:
    result = [hits_for(q, payload["topk"]) for q in payload["queries"]]
    return 200, json.dumps({"result": result}).encode(), 0.0


class FakeRetriever(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour: Behaviour = answer
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out and hang up are expected here


class _Handler(BaseHTTPRequestHandler):
    server: FakeRetriever

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, payload))
            attempt = len(self.server.requests)
        status, body, delay = self.server.behaviour(payload, attempt)
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeRetriever]:
    srv = FakeRetriever()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def tool_for(server: FakeRetriever, **kwargs) -> HTTPSearchTool:
    kwargs.setdefault("backoff", 0.01)
    return HTTPSearchTool(server.url, **kwargs)


def test_normal_answer_and_exact_format(server):
    result = tool_for(server)("  who wrote Hamlet ")
    assert result == ToolResult(
        'Page 1: "who wrote Hamlet 0" About who wrote Hamlet, part 0.\n'
        'Page 2: "who wrote Hamlet 1" About who wrote Hamlet, part 1.\n'
        'Page 3: "who wrote Hamlet 2" About who wrote Hamlet, part 2.',
        ok=True,
    )
    assert server.requests == [
        ("/retrieve", {"queries": ["who wrote Hamlet"], "topk": 3, "return_scores": True})
    ]


def test_passages_cut_and_extra_hits_dropped(server):
    def long_hits(payload, attempt):
        docs = [{"document": {"contents": "x" * 2000}, "score": 1.0}] * 5
        return 200, json.dumps({"result": [docs]}).encode(), 0.0

    server.behaviour = long_hits
    result = tool_for(server, topk=2, max_chars=1000)("q")
    assert result.text == "Page 1: " + "x" * 1000 + "\nPage 2: " + "x" * 1000


def test_plain_documents_without_scores(server):
    server.behaviour = lambda p, a: (200, json.dumps({"result": [[{"contents": "bare doc"}]]}).encode(), 0.0)
    assert tool_for(server)("q") == ToolResult("Page 1: bare doc", ok=True)


def test_no_results(server):
    server.behaviour = lambda p, a: (200, b'{"result": [[]]}', 0.0)
    assert tool_for(server)("q") == ToolResult("No results found for query: q", ok=True)


def test_endpoint_url_may_include_retrieve():
    for url in ("http://host:8000", "http://host:8000/", "http://host:8000/retrieve", "http://host:8000/retrieve/"):
        assert HTTPSearchTool(url).endpoint == "http://host:8000/retrieve"


def test_5xx_is_retried_until_success(server):
    server.behaviour = lambda p, a: (500, b"oops", 0.0) if a <= 2 else answer(p, a)
    result = tool_for(server, retries=2)("q")
    assert result.ok and result.text.startswith("Page 1: ")
    assert len(server.requests) == 3


def test_always_5xx_fails_after_bounded_retries(server):
    server.behaviour = lambda p, a: (503, b"busy", 0.0)
    result = tool_for(server, retries=2)("q")
    assert result == ToolResult(
        f"search failed: retriever at {server.url}/retrieve returned HTTP 503 after 3 attempt(s)",
        ok=False,
        error="http_status",
        infra=True,  # a 5xx is the service's failure, not the query's
    )
    assert len(server.requests) == 3


def test_4xx_is_not_retried(server):
    server.behaviour = lambda p, a: (400, b"bad topk", 0.0)
    result = tool_for(server, retries=2)("q")
    assert result == ToolResult(
        f"search failed: retriever at {server.url}/retrieve rejected the request with HTTP 400: bad topk",
        ok=False,
        error="http_status",
    )
    assert len(server.requests) == 1


def test_slow_server_times_out_quickly(server):
    release, answered = threading.Event(), threading.Event()

    def slow(payload, attempt):  # answers only once the test lets it (or after 30 s)
        release.wait(30)
        answered.set()
        return answer(payload, attempt)

    server.behaviour = slow
    start = time.monotonic()
    try:
        result = tool_for(server, timeout=0.3, retries=2)("q")
        elapsed = time.monotonic() - start
        gave_up_first = not answered.is_set()  # the client came back while the server still held the request
    finally:
        release.set()
    assert result == ToolResult(
        f"search failed: retriever at {server.url}/retrieve did not answer within 0.3s",
        ok=False,
        error="timeout",
        infra=True,
    )
    assert gave_up_first
    # Generous on purpose (a loaded machine may stall for seconds): waiting for the server would
    # take 30 s, and the check above already shows the client did not.
    assert elapsed < 10, elapsed
    assert len(server.requests) == 1  # a timeout is not retried


def test_malformed_json(server):
    server.behaviour = lambda p, a: (200, b"{'result': oops", 0.0)
    result = tool_for(server)("q")
    assert not result.ok and result.error == "bad_response"
    assert result.text == f"search failed: retriever at {server.url}/retrieve returned invalid JSON: \"{{'result': oops\""


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"results": []}, 'expected {"result": [...]} with one list per query'),
        ([1, 2], 'expected {"result": [...]} with one list per query'),
        ({"result": [[], []]}, 'expected {"result": [...]} with one list per query'),
        ({"result": ["a string"]}, "a query's result is str, not a list"),
        ({"result": [[{"doc": "x"}]]}, "a hit has no document contents"),
        ({"result": [[{"document": {"contents": 3}}]]}, "a hit has no document contents"),
    ],
)
def test_wrong_shape(server, body, detail):
    server.behaviour = lambda p, a: (200, json.dumps(body).encode(), 0.0)
    result = tool_for(server)("q")
    assert not result.ok and result.error == "bad_response"
    assert result.text.startswith(f"search failed: retriever at {server.url}/retrieve returned an unexpected response shape")
    assert detail in result.text


def test_server_down(monkeypatch):
    import at2po.tools.search as search_module

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []  # the backoff the client sleeps between attempts, instead of a wall clock

    class Clock:  # the time module, except that sleep() only records how long
        sleep = staticmethod(waits.append)

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(search_module, "time", Clock())
    result = HTTPSearchTool(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)("q")
    assert result == ToolResult(
        f"search failed: could not connect to retriever at http://127.0.0.1:{port}/retrieve "
        "after 3 attempt(s) (Connection refused)",
        ok=False,
        error="connection",
        infra=True,
    )
    assert waits == [0.01, 0.02]  # backoff · 2^k before each retry, nothing else


def test_batch_search_sends_one_request(server):
    results = tool_for(server, topk=1).batch_search(["alpha", " ", "beta"])
    assert results == [
        ToolResult('Page 1: "alpha 0" About alpha, part 0.', ok=True),
        ToolResult("empty search query", ok=False, error="empty_query"),
        ToolResult('Page 1: "beta 0" About beta, part 0.', ok=True),
    ]
    assert server.requests == [("/retrieve", {"queries": ["alpha", "beta"], "topk": 1, "return_scores": True})]


def test_batch_failure_reaches_every_query(server):
    server.behaviour = lambda p, a: (500, b"", 0.0)
    results = tool_for(server, retries=0).batch_search(["alpha", "", "beta"])
    assert [r.error for r in results] == ["http_status", "empty_query", "http_status"]


def test_empty_and_huge_queries(server):
    tool = tool_for(server)
    assert tool("") == ToolResult("empty search query", ok=False, error="empty_query")
    assert server.requests == []  # answered without asking the server
    assert tool("q" * 100_000).ok
    assert len(server.requests[0][1]["queries"][0]) == 1000


# -- a dead retriever must stop a run, not feed it error observations (issue 14) -----------------
def test_preflight_names_the_url_and_the_fix(server):
    tool_for(server).preflight()  # a live service passes
    assert server.requests[-1][1]["queries"] == ["preflight"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ToolServiceError, match=rf"retriever_url: .*127.0.0.1:{port}/retrieve .*Connection refused.*"
                                               "start the retriever"):
        HTTPSearchTool(f"http://127.0.0.1:{port}", retries=0).preflight()


def test_consecutive_infrastructure_failures_trip_the_tool_and_a_success_resets_them(server):
    down = {"on": True}
    server.behaviour = lambda p, a: (503, b"busy", 0.0) if down["on"] else answer(p, a)
    tool = tool_for(server, retries=0, max_consecutive_failures=3)
    tool("a"), tool("b")
    assert tool.failing() is None
    down["on"] = False
    assert tool("c").ok  # a success: the streak starts over
    down["on"] = True
    tool("d"), tool("e")
    assert tool.failing() is None
    assert tool("f").infra and tool.failing().startswith(
        f"tools.search: the retriever at {server.url}/retrieve failed 3 calls in a row (last: search failed: ")
    sent = len(server.requests)
    late = tool("g")  # tripped: answered at once, the service is not asked again
    assert not late.ok and late.infra and len(server.requests) == sent
    with pytest.raises(ToolServiceError, match="failed 3 calls in a row"):
        check_tools([tool])


def test_answers_the_query_got_wrong_are_not_infrastructure_failures(server):
    server.behaviour = lambda p, a: (400, b"bad", 0.0)
    tool = tool_for(server, max_consecutive_failures=1)
    result = tool("q")
    assert not result.ok and not result.infra and tool.failing() is None
    server.behaviour = lambda p, a: (200, b'{"result": [[]]}', 0.0)
    assert tool("q").ok and not tool("").infra  # no results / an empty query: the model's doing
