"""The search tool: a local BM25 index, or a client of Search-R1's HTTP retriever
(docs/method.md §1, §5). Registered as ``search`` (``tools.search.backend``: bm25 | http).

Both return the top-k passages formatted one per line as ``Page i: <text>``; the caller wraps
that in ``<result>...</result>``. With ``env_compat="atpo"`` (``rollout.env_compat``) queries and
passages are treated as the ATPO authors' search tool treats them (``format_passages_atpo``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from at2po.config import ENV_COMPAT
from at2po.retriever.bm25 import BM25Index, load_corpus
from at2po.tools.base import Tool, ToolResult, register_tool
from at2po.tools.health import FailureStreak, ToolServiceError

if TYPE_CHECKING:  # requests loads only when an HTTP search tool is built
    import requests

# Queries are cut to this many characters before searching, so that a runaway generation
# (e.g. a 100 KB "query") cannot stall the retriever.
MAX_QUERY_CHARS = 1000
# How much of the query the "No results found" observation echoes back.
_ECHO_CHARS = 200


def format_passages(passages: list[str], max_chars: int = 1000) -> str:
    """``Page i: <text>`` lines (i from 1), each passage cut to ``max_chars`` characters.

    Whitespace runs (including line breaks) collapse to one space so every page is one line.
    """
    lines = []
    for i, passage in enumerate(passages, start=1):
        text = " ".join(passage.split())[:max_chars]
        lines.append(f"Page {i}: {text}")
    return "\n".join(lines)


def format_passages_atpo(passages: list[str], max_chars: int = 1000) -> str:
    """The ATPO authors' observation body: each passage stripped (line breaks inside it, such as
    the one after a Wikipedia passage's title, are kept), empty and repeated passages dropped,
    the rest cut to ``max_chars`` and listed as ``Page i: <text>`` lines; "No search results
    found." when none is left."""
    kept: list[str] = []
    for passage in passages:
        text = passage.strip()
        if text and text not in kept:
            kept.append(text)
    if not kept:
        return ATPO_NO_RESULTS
    return "\n".join(f"Page {i}: {text[:max_chars]}" for i, text in enumerate(kept, start=1))


ATPO_NO_RESULTS = "No search results found."


def _prepare_query(query: str, env_compat: str = "at2po") -> str | None:
    """The query as searched: stripped and length-bounded, None when empty; for the ATPO authors
    (``env_compat="atpo"``) their input with every double quote removed, nothing else changed."""
    if env_compat == "atpo":
        return query.replace('"', "")
    query = query.strip()[:MAX_QUERY_CHARS]
    return query or None


def _empty_query_result() -> ToolResult:
    return ToolResult(text="empty search query", ok=False, error="empty_query")


def _passages_result(query: str, passages: list[str], max_chars: int, env_compat: str = "at2po") -> ToolResult:
    if env_compat == "atpo":
        return ToolResult(text=format_passages_atpo(passages, max_chars), ok=True)
    if not passages:
        shown = query if len(query) <= _ECHO_CHARS else query[:_ECHO_CHARS] + "..."
        return ToolResult(text=f"No results found for query: {shown}", ok=True)
    return ToolResult(text=format_passages(passages, max_chars), ok=True)


def _check_env_compat(env_compat: str) -> None:
    if env_compat not in ENV_COMPAT:
        raise ValueError(f"rollout.env_compat={env_compat!r} is not one of {', '.join(ENV_COMPAT)}")


SEARCH_DESCRIPTION = (
    "You can search for facts by writing a query within <search> </search> tags; the top "
    "passages are returned to you within <result> </result> tags."
)


class _SearchTool(Tool):
    name = "search"
    description = SEARCH_DESCRIPTION
    max_input_chars = 2000  # what reaches the tool; it searches the first MAX_QUERY_CHARS of it


class LocalSearchTool(_SearchTool):
    """Search over a local BM25 index (for tests, quickstarts and small corpora).

    Give exactly one of: a built ``index``, ``index_dir`` (saved with ``BM25Index.save``) or
    ``corpus_path`` (a jsonl corpus, indexed on construction).
    """

    def __init__(
        self,
        index: BM25Index | None = None,
        *,
        index_dir: str | Path | None = None,
        corpus_path: str | Path | None = None,
        topk: int = 3,
        max_chars: int = 1000,
        env_compat: str = "at2po",
    ) -> None:
        _check_env_compat(env_compat)
        self.env_compat = env_compat
        sources = [s for s in (index, index_dir, corpus_path) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of index, index_dir, corpus_path")
        if index_dir is not None:
            index = BM25Index.load(index_dir)
        elif corpus_path is not None:
            index = BM25Index([row["contents"] for row in load_corpus(corpus_path)])
        assert index is not None
        self.index = index
        self.topk = topk
        self.max_chars = max_chars
        self._broken: str | None = None

    def run(self, query: str) -> ToolResult:
        return self.batch_search([query])[0]

    def failing(self) -> str | None:
        """Why the index failed, once it has: training and ``at2po eval`` then stop
        (at2po.tools.health) instead of counting the failure as the model's bad query."""
        return self._broken

    def batch_search(self, queries: list[str]) -> list[ToolResult]:
        prepared = [_prepare_query(q, self.env_compat) for q in queries]
        to_search = [q for q in prepared if q is not None]
        try:
            found = iter([[self.index.docs[doc] for doc, _ in hits] for hits in self.index.search(to_search, self.topk)])
        except Exception as e:  # the index is broken, whatever the query: a failure of the service, not the model
            self._broken = f"tools.search: the local index failed ({type(e).__name__}: {e}); rebuild or reload it"
            return [ToolResult(f"search failed: {self._broken}", ok=False, error="exception", infra=True)
                    for _ in queries]
        results = []
        for query in prepared:
            if query is None:
                results.append(_empty_query_result())
            else:
                results.append(_passages_result(query, next(found), self.max_chars, self.env_compat))
        return results


class _RetrieverError(Exception):
    def __init__(self, kind: str, message: str, infra: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.infra = infra  # the service failed (unreachable, timeout, 5xx), not the query


def _errno_reason(exc: Exception) -> str:
    """'Connection refused' out of requests' long nested error message, or ''."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return f" ({match.group(1).strip()})" if match else ""


def _hit_contents(hit: Any) -> str | None:
    # {"document": {"contents": ...}, "score": s} with return_scores, else the bare document.
    document = hit.get("document", hit) if isinstance(hit, dict) else None
    contents = document.get("contents") if isinstance(document, dict) else None
    return contents if isinstance(contents, str) else None


class HTTPSearchTool(_SearchTool):
    """Client of Search-R1's retriever server (``POST {url}/retrieve``).

    Connection failures and 5xx answers are retried ``retries`` times with exponential
    backoff; 4xx answers and timeouts are not (a retry would not help, or would multiply the
    wait). Proxy settings from the environment are ignored by default (``trust_env``): the
    retriever runs next to the trainer, and an internet proxy would only get in the way.

    Failures of the service (connection, timeout, 5xx) are marked ``infra``. After
    ``max_consecutive_failures`` of them in a row (0: never) the tool stops calling the service
    and ``failing()`` says why, so the trainer and ``at2po eval`` stop (at2po.tools.health).
    """

    def __init__(
        self,
        url: str,
        topk: int = 3,
        max_chars: int = 1000,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.5,
        trust_env: bool = False,
        max_consecutive_failures: int = 20,
        env_compat: str = "at2po",
    ) -> None:
        _check_env_compat(env_compat)
        self.env_compat = env_compat
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/retrieve") else url + "/retrieve"
        self.streak = FailureStreak(max_consecutive_failures)
        self.topk = topk
        self.max_chars = max_chars
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        # One session shared by the rollout's tool threads: urllib3's pool is thread-safe,
        # and sized so that a round of concurrent calls reuses connections.
        import requests
        from requests.adapters import HTTPAdapter

        self._session = requests.Session()
        self._session.trust_env = trust_env
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=32)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def run(self, query: str) -> ToolResult:
        return self.batch_search([query])[0]

    def preflight(self) -> None:
        """One probe search: raise ToolServiceError when the retriever cannot answer at all."""
        try:
            self._retrieve(["preflight"])
        except _RetrieverError as exc:
            raise ToolServiceError(
                f"tools.search.retriever_url: {exc} -- start the retriever (at2po retriever serve --index DIR) "
                "or fix the URL") from None

    def failing(self) -> str | None:
        if not self.streak.tripped:
            return None
        return (f"tools.search: the retriever at {self.endpoint} failed {self.streak.count} calls in a row "
                f"(last: {self.streak.last_error}); stopping (tools.search.max_consecutive_failures="
                f"{self.streak.limit}, 0 never stops)")

    def batch_search(self, queries: list[str]) -> list[ToolResult]:
        """Search all queries with one request; empty queries are answered locally."""
        prepared = [_prepare_query(q, self.env_compat) for q in queries]
        to_send = [q for q in prepared if q is not None]
        failure: ToolResult | None = None
        answers: list[list[str]] = []
        if to_send and self.streak.tripped:  # the run is stopping: no more waits on a dead service
            failure = ToolResult(text=f"search failed: {self.streak.last_error}", ok=False, error="connection",
                                 infra=True)
        elif to_send:
            try:
                answers = self._retrieve(to_send)
                self.streak.record(False)
            except _RetrieverError as exc:
                failure = ToolResult(text=str(exc), ok=False, error=exc.kind, infra=exc.infra)
                self.streak.record(exc.infra, str(exc), calls=len(to_send))
        answer_iter = iter(answers)
        results = []
        for query in prepared:
            if query is None:
                results.append(_empty_query_result())
            elif failure is not None:
                results.append(failure)
            else:
                results.append(_passages_result(query, next(answer_iter), self.max_chars, self.env_compat))
        return results

    def _retrieve(self, queries: list[str]) -> list[list[str]]:
        import requests

        payload = {"queries": queries, "topk": self.topk, "return_scores": True}
        where = f"retriever at {self.endpoint}"
        attempts = self.retries + 1
        last_error: _RetrieverError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._session.post(self.endpoint, json=payload, timeout=self.timeout)
            except requests.ConnectionError as exc:  # includes connect timeouts: retry
                last_error = _RetrieverError(
                    "connection",
                    f"search failed: could not connect to {where} "
                    f"after {attempts} attempt(s){_errno_reason(exc)}",
                    infra=True,
                )
                continue
            except requests.Timeout:
                raise _RetrieverError(
                    "timeout", f"search failed: {where} did not answer within {self.timeout:g}s", infra=True
                ) from None
            except requests.RequestException as exc:
                raise _RetrieverError("request", f"search failed: request to {where} failed: {exc}") from None
            if response.status_code >= 500:
                last_error = _RetrieverError(
                    "http_status",
                    f"search failed: {where} returned HTTP {response.status_code} "
                    f"after {attempts} attempt(s)",
                    infra=True,
                )
                continue
            if response.status_code >= 400:
                raise _RetrieverError(
                    "http_status",
                    f"search failed: {where} rejected the request with HTTP "
                    f"{response.status_code}: {response.text[:200]}",
                )
            return self._parse(response, len(queries))
        assert last_error is not None  # attempts >= 1
        raise last_error

    def _parse(self, response: requests.Response, n_queries: int) -> list[list[str]]:
        where = f"retriever at {self.endpoint}"
        try:
            data = response.json()
        except ValueError:
            raise _RetrieverError(
                "bad_response", f"search failed: {where} returned invalid JSON: {response.text[:100]!r}"
            ) from None
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != n_queries:
            raise _RetrieverError(
                "bad_response",
                f"search failed: {where} returned an unexpected response shape "
                f"(expected {{\"result\": [...]}} with one list per query, for {n_queries} queries)",
            )
        answers = []
        for hits in result:
            if not isinstance(hits, list):
                raise _RetrieverError(
                    "bad_response",
                    f"search failed: {where} returned an unexpected response shape "
                    f"(a query's result is {type(hits).__name__}, not a list)",
                )
            passages = []
            for hit in hits[: self.topk]:
                contents = _hit_contents(hit)
                if contents is None:
                    raise _RetrieverError(
                        "bad_response",
                        f"search failed: {where} returned an unexpected response shape "
                        f"(a hit has no document contents)",
                    )
                passages.append(contents)
            answers.append(passages)
        return answers


SEARCH_BACKENDS = ("bm25", "http")


@register_tool("search")
def build_search_tool(
    backend: str = "bm25",
    corpus_file: str = "",
    index_dir: str = "",
    retriever_url: str = "http://127.0.0.1:8000",
    topk: int = 3,
    max_passage_chars: int = 1000,
    max_consecutive_failures: int = 20,
    env_compat: str = "at2po",
) -> Tool:
    """The search tool of ``tools.search``: BM25 over a local corpus/index, or the HTTP retriever.
    ``env_compat`` (``rollout.env_compat``, passed by the factory) picks whose query handling and
    observation text it reproduces."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"tools.search.backend={backend!r} is not one of {', '.join(SEARCH_BACKENDS)}")
    if topk < 1:
        raise ValueError(f"tools.search.topk must be >= 1, got {topk}")
    if backend == "http":
        return HTTPSearchTool(retriever_url, topk=topk, max_chars=max_passage_chars,
                              max_consecutive_failures=max_consecutive_failures, env_compat=env_compat)
    if not (corpus_file or index_dir):
        raise ValueError("tools.search.corpus_file (or tools.search.index_dir) is required for backend bm25")
    source = {"index_dir": index_dir} if index_dir else {"corpus_path": corpus_file}
    return LocalSearchTool(**source, topk=topk, max_chars=max_passage_chars, env_compat=env_compat)
