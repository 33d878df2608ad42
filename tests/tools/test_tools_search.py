import re
import json

import pytest

from at2po.retriever import bm25
from at2po.tools import LocalSearchTool, ToolResult, format_passages
from at2po.tools.search import BM25Index, load_corpus

DOCS = [
    '"Paris"\nParis is the capital and most populous city of France.',
    '"Berlin"\nBerlin is the capital and largest city of Germany.',
    '"Mount Everest"\nMount Everest is the highest mountain above sea level, in the Himalayas.',
    '"Python (programming language)"\nPython is a high-level programming language created by Guido van Rossum.',
    '"Amazon River"\nThe Amazon River in South America is the largest river by discharge volume.',
]


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index(DOCS)


def write_corpus(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_bm25_ranks_the_matching_passage_first(index):
    hits = index.search(["capital of Germany", "who created the Python programming language"], topk=3)
    assert hits[0][0][0] == 1
    assert hits[1][0][0] == 3
    for per_query in hits:
        assert 1 <= len(per_query) <= 3
        scores = [score for _, score in per_query]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_bm25_queries_without_indexed_words_return_nothing(index):
    assert index.search(["", "the of and", "zyxwvut qwerty", "   "], topk=3) == [[], [], [], []]


def test_bm25_no_queries(index):
    assert index.search([], topk=3) == []


def test_bm25_topk_larger_than_corpus(index):
    hits = index.search(["capital city"], topk=50)
    assert 1 <= len(hits[0]) <= len(DOCS)


def test_empty_corpus_rejected():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index([])


def test_format_passages_exact():
    text = format_passages(["first passage", '"Title"\nline one\n\nline  two\tend', "third"])
    assert text == 'Page 1: first passage\nPage 2: "Title" line one line two end\nPage 3: third'


def test_format_passages_truncates_each_passage():
    text = format_passages(["a" * 1500, "b" * 10], max_chars=1000)
    assert text == "Page 1: " + "a" * 1000 + "\nPage 2: " + "b" * 10
    assert format_passages([]) == ""


def test_local_tool_observation(index):
    tool = LocalSearchTool(index)
    result = tool("  capital of France  ")
    assert result.ok and result.error is None
    lines = result.text.split("\n")
    assert lines[0] == "Page 1: " + " ".join(DOCS[0].split())
    assert all(line.startswith(f"Page {i}: ") for i, line in enumerate(lines, start=1))
    assert len(lines) <= 3


def test_local_tool_respects_topk_and_max_chars(index):
    result = LocalSearchTool(index, topk=1, max_chars=10)("capital city")
    assert result.ok and len(result.text.split("\n")) == 1
    assert len(result.text) == len("Page 1: ") + 10


def test_local_tool_empty_and_no_result_queries(index):
    tool = LocalSearchTool(index)
    assert tool("   \n ") == ToolResult("empty search query", ok=False, error="empty_query")
    assert tool("the of") == ToolResult("No results found for query: the of", ok=True)


def test_local_tool_huge_query_is_bounded(index):
    result = LocalSearchTool(index)("zzzz " * 20_000 + "France")  # 100 KB
    assert result.ok
    assert result.text.startswith("No results found for query: zzzz")  # "France" was cut off
    assert len(result.text) < 300


def test_local_tool_batch(index):
    results = LocalSearchTool(index, topk=1).batch_search(["Everest", "", "Amazon river"])
    assert [r.ok for r in results] == [True, False, True]
    assert "Mount Everest" in results[0].text and "Amazon" in results[2].text


def test_local_tool_needs_exactly_one_source(index, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        LocalSearchTool()
    with pytest.raises(ValueError, match="exactly one"):
        LocalSearchTool(index, corpus_path=tmp_path / "c.jsonl")


def test_load_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, [{"id": "0", "contents": "alpha"}, "", {"id": 1, "contents": "beta", "title": "B"}])
    assert load_corpus(path) == [{"id": "0", "contents": "alpha"}, {"id": 1, "contents": "beta", "title": "B"}]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("{not json", ":2: not valid JSON"),
        ('["a list"]', ":2: expected a JSON object, got list"),
        ({"contents": "no id"}, ":2: missing field 'id'"),
        ({"id": None, "contents": "x"}, ":2: field 'id' must be a string or integer"),
        ({"id": "1"}, ":2: missing field 'contents'"),
        ({"id": "1", "contents": 5}, ":2: field 'contents' must be a string, got int"),
    ],
)
def test_load_corpus_rejects_bad_rows(tmp_path, bad_row, message):
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, [{"id": "0", "contents": "fine"}, bad_row])
    with pytest.raises(ValueError) as excinfo:
        load_corpus(path)
    assert str(excinfo.value).startswith(f"{path}{message}")


def test_save_load_roundtrip(index, tmp_path):
    index.save(tmp_path / "idx")
    loaded = BM25Index.load(tmp_path / "idx")
    assert loaded.docs == DOCS
    queries = ["capital of Germany", "highest mountain", "the", "unknownword"]
    assert loaded.search(queries, topk=3) == index.search(queries, topk=3)
    via_tool = LocalSearchTool(index_dir=tmp_path / "idx")("highest mountain")
    assert via_tool == LocalSearchTool(index)("highest mountain")


def test_tool_from_corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, [{"id": str(i), "contents": doc} for i, doc in enumerate(DOCS)])
    result = LocalSearchTool(corpus_path=path, topk=1)("largest river discharge")
    assert result == ToolResult("Page 1: " + " ".join(DOCS[4].split()), ok=True)


def test_bm25_lives_in_the_retriever_package():
    # at2po.retriever.bm25 is the home; at2po.tools.search re-exports it.
    assert BM25Index is bm25.BM25Index and load_corpus is bm25.load_corpus


def test_search_tool_self_description():
    assert LocalSearchTool.name == "search" and LocalSearchTool.max_input_chars == 2000
    assert LocalSearchTool.dedent_input is False
    assert "<search> </search>" in LocalSearchTool.description


def test_load_corpus_names_the_file_of_non_utf8_text(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"id": "0", "contents": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text"):
        load_corpus(path)
