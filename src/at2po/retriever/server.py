"""An HTTP retriever speaking Search-R1's ``/retrieve`` API (docs/method.md §5), on FastAPI + uvicorn.

``POST /retrieve`` ``{"queries": [...], "topk": 3, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``, one list per query;
with ``return_scores`` false (Search-R1's default) each hit is the bare document. ``topk`` left
out means ``default_topk``; an empty ``queries`` list answers ``{"result": []}`` (Search-R1's
agent sends one in a turn where no rollout searches). ``GET /health`` answers
``{"status": "ok", "kind", "n_docs"}``.

Limits, so that one request cannot take the service down: a body over ``max_body_bytes`` gets
HTTP 413 before it is parsed, more than ``max_batch`` queries or ``len(queries) * topk`` over
``max_hits`` get 413, ``topk`` over ``max_topk`` gets 422. Retrieval, formatting and JSON
encoding all run in a worker thread, so ``/health`` answers while a large request is served.

Concurrency: requests are micro-batched. A single worker task owns the retriever and runs it in a
thread, off the event loop; requests arriving while it is busy queue up and are merged into its
next call (up to ``max_batch`` queries), so concurrent callers share one encoder pass and the
retriever is never used from two threads at once. No request waits for a timer: an idle server
starts on a request at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from at2po.retriever.index import Retriever, load_retriever

__all__ = ["create_app", "serve", "serve_in_thread"]

logger = logging.getLogger(__name__)

# Longer queries are cut to this many characters: a runaway generation must not stall the
# retriever (the encoder truncates to its max sequence length anyway).
MAX_QUERY_CHARS = 4096


class RetrieveRequest(BaseModel):
    queries: list[StrictStr]
    topk: Annotated[StrictInt, Field(ge=1)] | None = None
    return_scores: StrictBool = False


@dataclass
class _Job:
    queries: list[str]
    topk: int
    future: asyncio.Future


class _MicroBatcher:
    """Merges the queries of requests that wait at the same time into one retriever call."""

    def __init__(self, retriever: Retriever, max_batch: int) -> None:
        self.retriever = retriever
        self.max_batch = max_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def search(self, queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first request on this event loop: start its worker here
            self._loop, self._pending, self._wakeup = loop, deque(), asyncio.Event()
            self._worker = loop.create_task(self._run(self._pending, self._wakeup))
        future = loop.create_future()
        self._pending.append(_Job(queries, topk, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._loop = self._worker = None

    async def _run(self, pending: deque[_Job], wakeup: asyncio.Event) -> None:
        while True:
            await wakeup.wait()
            wakeup.clear()
            while pending:
                await self._execute(self._take_batch(pending))

    def _take_batch(self, pending: deque[_Job]) -> list[_Job]:
        batch = [pending.popleft()]
        size = len(batch[0].queries)
        while pending and size + len(pending[0].queries) <= self.max_batch:
            job = pending.popleft()
            size += len(job.queries)
            batch.append(job)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        # One call per distinct topk: the top-3 of a top-10 search may order ties differently.
        by_topk: dict[int, list[_Job]] = {}
        for job in batch:
            by_topk.setdefault(job.topk, []).append(job)
        for topk, jobs in by_topk.items():
            queries = [q for job in jobs for q in job.queries]
            try:
                hits = await asyncio.to_thread(self.retriever.search, queries, topk)
            except Exception as exc:  # reported to these requests; the server goes on
                logger.exception("retrieval failed for %d queries", len(queries))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():  # done = the client went away
                    job.future.set_result(hits[start : start + len(job.queries)])
                start += len(job.queries)


def _validation_message(exc: RequestValidationError) -> str:
    """One readable line, e.g. ``queries: List should have at least 1 item after validation, not 0``."""
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
            continue
        where = ".".join(str(x) for x in error.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts) + (
        ' (expected a JSON object {"queries": [str, ...], "topk": int >= 1, "return_scores": bool})'
    )


def _format_hit(hit: dict[str, Any], with_score: bool) -> dict[str, Any]:
    document = {"id": hit["id"], "contents": hit["contents"]}
    return {"document": document, "score": hit["score"]} if with_score else document


def _encode_result(hits: list[list[dict[str, Any]]], with_score: bool) -> bytes:
    # One json.dumps per query, not one for the whole answer: a single C-level dumps holds the GIL
    # until it is done, and the event loop (/health) would wait for all of it.
    parts = [json.dumps([_format_hit(hit, with_score) for hit in per_query], ensure_ascii=False,
                        separators=(",", ":")).encode("utf-8") for per_query in hits]
    return b'{"result":[' + b",".join(parts) + b"]}"


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 without being kept in memory
    (Content-Length is checked first; a chunked body is counted as it arrives)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _reject(self, send: Any, size: str) -> None:
        body = json.dumps({"detail": f"request body too large ({size}); at most {self.limit} bytes: split it"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send, f"{int(length)} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(send, f"over {size} bytes")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def create_app(
    retriever: Retriever,
    max_batch: int = 4096,
    default_topk: int = 3,
    max_topk: int = 1000,
    max_hits: int = 65536,
    max_body_bytes: int = 8 * 2**20,
) -> FastAPI:
    """The FastAPI app serving ``retriever``.

    ``max_batch`` bounds the queries of one request (more get HTTP 413) and of one merged
    retriever call; ``max_topk`` bounds ``topk`` (more get HTTP 422); ``max_hits`` bounds
    ``len(queries) * topk`` and ``max_body_bytes`` the request body (more get HTTP 413).
    """
    if max_batch < 1 or not 1 <= default_topk <= max_topk:
        raise ValueError("need max_batch >= 1 and 1 <= default_topk <= max_topk")
    if max_hits < 1 or max_body_bytes < 1:
        raise ValueError("need max_hits >= 1 and max_body_bytes >= 1")
    batcher = _MicroBatcher(retriever, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        await batcher.close()

    app = FastAPI(title="at2po retriever", description=__doc__, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "kind": retriever.kind, "n_docs": retriever.n_docs}

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> JSONResponse:
        if len(request.queries) > max_batch:
            raise HTTPException(
                413, f"too many queries: {len(request.queries)} in one request, at most {max_batch}; split it"
            )
        topk = default_topk if request.topk is None else request.topk
        if topk > max_topk:
            raise HTTPException(422, f"topk {topk} is too large; at most {max_topk}")
        if len(request.queries) * topk > max_hits:
            raise HTTPException(
                413, f"too many hits requested: {len(request.queries)} queries x topk {topk} > {max_hits}; "
                "split the request or lower topk")
        if not request.queries:
            return JSONResponse({"result": []})
        queries = [q[:MAX_QUERY_CHARS] for q in request.queries]
        try:
            hits = await batcher.search(queries, topk)
        except Exception as exc:
            raise HTTPException(500, f"retrieval failed: {type(exc).__name__}: {exc}") from None
        # Encoded off the event loop: a large answer must not hold up /health or other requests.
        body = await asyncio.to_thread(_encode_result, hits, request.return_scores)
        return Response(body, media_type="application/json")

    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    return app


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 4096,
    default_topk: int = 3,
    encoder: str | None = None,
    device: str | None = None,
    log_level: str = "info",
    max_hits: int = 65536,
    max_body_bytes: int = 8 * 2**20,
) -> None:
    """Load the index in ``index_dir`` and serve it until interrupted."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (1-65535)")
    retriever = load_retriever(index_dir, encoder=encoder, device=device)
    app = create_app(retriever, max_batch=max_batch, default_topk=default_topk, max_hits=max_hits,
                     max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``port=0``: a free one).

    For tests and for trainers that host the retriever in their own process.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="at2po-retriever", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the retriever server did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
