"""The retriever service under hostile or careless requests and corpora (issue 14): limits answered
with 413 before any work, an empty query list answered as Search-R1's server does, /health free
while a large request is served, and corpora that cannot be served refused with a clear error."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from at2po.cli import main
from at2po.retriever import build_index, create_app, load_retriever, serve_in_thread
from at2po.retriever import server as server_module
from at2po.retriever.bm25 import BM25Index, load_corpus

PASSAGES = {f"p{i}": f"passage word{i} about the river of town{i % 7}" for i in range(40)}


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "contents": v}) + "\n" for k, v in PASSAGES.items()))
    build_index(corpus, root / "index", kind="bm25", progress=False)
    return load_retriever(root / "index")


@pytest.fixture(scope="module")
def url(bm25):
    with serve_in_thread(create_app(bm25, max_batch=64, max_hits=100, max_body_bytes=4000)) as u:
        yield u


def test_empty_query_list_answers_an_empty_result_like_search_r1(url):
    response = httpx.post(f"{url}/retrieve", json={"queries": [], "topk": 3, "return_scores": True})
    assert response.status_code == 200 and response.json() == {"result": []}


def test_hits_over_the_limit_get_413_before_any_search(url, bm25, monkeypatch):
    calls = []
    monkeypatch.setattr(bm25, "_search", lambda q, k: calls.append(len(q)) or [])
    response = httpx.post(f"{url}/retrieve", json={"queries": ["river"] * 11, "topk": 10})  # 110 > 100
    assert response.status_code == 413 and "11 queries x topk 10 > 100" in response.json()["detail"]
    assert calls == []
    monkeypatch.undo()
    ok = httpx.post(f"{url}/retrieve", json={"queries": ["river"] * 10, "topk": 10})  # 100: at the limit
    assert ok.status_code == 200 and [len(r) for r in ok.json()["result"]] == [10] * 10


def test_a_body_over_the_limit_gets_413_with_or_without_content_length(url):
    big = json.dumps({"queries": ["x" * 1000] * 5}).encode()  # > 4000 bytes
    response = httpx.post(f"{url}/retrieve", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "at most 4000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    response = httpx.post(f"{url}/retrieve", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    small = json.dumps({"queries": ["word3"], "topk": 1}).encode()
    response = httpx.post(f"{url}/retrieve", content=iter([small[:10], small[10:]]),
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["result"][0][0]["id"] == "p3"


def test_health_answers_while_a_slow_answer_is_encoded(bm25, monkeypatch):
    release = threading.Event()
    real = server_module._encode_result

    def slow_encode(hits, with_score):
        release.wait(10)  # an answer that takes long to encode (the 568 MB case of the issue)
        return real(hits, with_score)

    monkeypatch.setattr(server_module, "_encode_result", slow_encode)
    with serve_in_thread(create_app(bm25)) as u:
        slow = threading.Thread(target=lambda: httpx.post(f"{u}/retrieve", json={"queries": ["river"]}, timeout=30))
        slow.start()
        time.sleep(0.3)  # the slow request is in its encoding step now
        t0 = time.monotonic()
        health = httpx.get(f"{u}/health", timeout=5)
        waited = time.monotonic() - t0
        still_busy = slow.is_alive()
        release.set()
        slow.join(30)
    assert health.status_code == 200 and still_busy and waited < 5


def test_duplicate_ids_are_rejected_naming_both_lines(tmp_path):
    corpus = tmp_path / "dup.jsonl"
    corpus.write_text('{"id": "a", "contents": "x y"}\n{"id": "b", "contents": "z"}\n{"id": "a", "contents": "w"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl:3: id 'a' was already used at .*dup.jsonl:1"):
        load_corpus(corpus)
    # An integer id and its string form are the same id in a JSON answer.
    corpus.write_text('{"id": 1, "contents": "x"}\n{"id": "1", "contents": "y"}\n')
    with pytest.raises(ValueError, match="already used"):
        load_corpus(corpus)


def test_stop_word_only_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="none of the 2 passages has a word that is not an English stop word"):
        BM25Index(["the and of", "a an the"])


@pytest.mark.parametrize("argv, message", [
    (["retriever", "serve", "--index", "IDX", "--port", "99999"], "--port 99999 is not a TCP port"),
    (["retriever", "build", "--corpus", "DIR", "--out", "OUT"], "is a directory; give a .jsonl file"),
    (["retriever", "build", "--corpus", "STOP", "--out", "OUT"], "has a word that is not an English stop word"),
    (["retriever", "build", "--corpus", "LATIN1", "--out", "OUT"], "latin1.jsonl: not UTF-8 text"),
])
def test_retriever_cli_user_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "stop.jsonl").write_text('{"id": 1, "contents": "the of and"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"id": 1, "contents": "café"}\n'.encode("latin-1"))
    subst = {"IDX": str(tmp_path), "DIR": str(tmp_path), "OUT": str(tmp_path / "out"),
             "STOP": str(tmp_path / "stop.jsonl"), "LATIN1": str(tmp_path / "latin1.jsonl")}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    *progress, last = err.splitlines()  # build's progress lines may come first
    assert last.startswith("at2po retriever: error: ") and message in last and "Traceback" not in err
    assert all(line.startswith("[retriever]") for line in progress)
