"""Benchmark registry, FlashRAG jsonl / Search-R1 parquet loading and conversion, prepare."""

import argparse
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from at2po.data import QARow
from at2po.datasets import (
    BENCHMARKS,
    add_cli,
    convert,
    load_qa_by_source,
    load_qa_file,
    prepare,
    write_qa_file,
)

ROWS = [
    {"id": "dev_0", "question": "Who wrote Hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"]},
    {"id": "dev_1", "question": "What is the capital of Japan?", "golden_answers": ["Tokyo"]},
    {"id": "dev_2", "question": "In which year did the Titanic sink?", "golden_answers": ["1912"]},
]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def search_r1_record(asked, target, source="nq", index=0, **columns):
    """A row in Search-R1's layout, its instruction text paraphrased (only 'Question:' matters)."""
    prompt = f"Answer the given question, searching with <search> query </search> as needed. Question: {asked}\n"
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": target}},
        "extra_info": {"split": "test", "index": index},
        **columns,
    }


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# --- registry ---------------------------------------------------------------------------------


def test_registry_has_the_papers_seven_benchmarks_and_eval_sizes():
    sizes = {name: (info.eval_split, info.n_eval, info.multi_hop) for name, info in BENCHMARKS.items()}
    assert sizes == {
        "nq": ("test", 3610, False),
        "triviaqa": ("test", 11313, False),
        "popqa": ("test", 14267, False),
        "hotpotqa": ("dev", 7405, True),
        "2wikimultihopqa": ("dev", 12576, True),
        "musique": ("dev", 2417, True),
        "bamboogle": ("test", 125, True),
    }
    assert all(info.name == name and info.flashrag_name == name for name, info in BENCHMARKS.items())
    assert {name for name, info in BENCHMARKS.items() if info.train_split} == {"nq", "hotpotqa"}


# --- loading ----------------------------------------------------------------------------------


def test_flashrag_jsonl_and_json_array_load(tmp_path):
    rows = load_qa_file(write_jsonl(tmp_path / "dev.jsonl", ROWS))
    assert rows[0] == QARow("dev_0", "Who wrote Hamlet?", ("William Shakespeare", "Shakespeare"))
    as_array = tmp_path / "dev.json"
    as_array.write_text(json.dumps(ROWS))
    assert load_qa_file(as_array) == rows
    as_jsonl_named_json = write_jsonl(tmp_path / "other.json", ROWS)
    assert load_qa_file(as_jsonl_named_json) == rows


def test_search_r1_parquet_question_sources(tmp_path):
    path = write_parquet(
        tmp_path / "test.parquet",
        [
            # A question column (Search-R1 keeps FlashRAG's) wins over the prompt.
            search_r1_record("ignored", ["Paris"], index=0, question="capital of France?", id="test_0"),
            # No question (null) and no id: the question is read after "Question:" in the prompt.
            search_r1_record("who sang thriller?", ["Michael Jackson"], index=1, question=None, id=None),
        ],
    )
    rows = load_qa_file(path)
    assert rows[0] == QARow("test_0", "capital of France?", ("Paris",))
    assert rows[1] == QARow("1", "who sang thriller?", ("Michael Jackson",))  # id from extra_info.index


def test_mixed_parquet_splits_by_data_source(tmp_path):
    path = write_parquet(
        tmp_path / "test.parquet",
        [
            search_r1_record("q1?", ["a"], source="nq", index=0),
            search_r1_record("q2?", ["b"], source="hotpotqa", index=1),
            search_r1_record("q3?", ["c"], source="hotpotqa", index=2),
        ],
    )
    assert [r.question for r in load_qa_file(path, data_source="hotpotqa")] == ["q2?", "q3?"]
    assert {k: len(v) for k, v in load_qa_by_source(path).items()} == {"nq": 1, "hotpotqa": 2}
    with pytest.raises(ValueError, match=r"no rows with data_source 'musique' \(found: hotpotqa, nq\)"):
        load_qa_file(path, data_source="musique")


# --- validation -------------------------------------------------------------------------------


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    bad = ROWS[:2] + [{"id": "dev_2", "question": "Where?", "golden_answers": []}]
    path = write_jsonl(tmp_path / "dev.jsonl", bad)
    with pytest.raises(ValueError, match=r"dev\.jsonl:3: field 'golden_answers'"):
        load_qa_file(path)
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "question": "  ", "golden_answers": ["a"]}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: field 'question' is missing or empty"):
        load_qa_file(path)


def test_parquet_errors_name_file_row_and_field(tmp_path):
    empty_target = write_parquet(
        tmp_path / "a.parquet",
        [search_r1_record("ok?", ["yes"]), search_r1_record("fine?", [""], index=1)],
    )
    with pytest.raises(ValueError, match=r"a\.parquet, row 2: field 'golden_answers'"):
        load_qa_file(empty_target)
    no_target = write_parquet(
        tmp_path / "b.parquet",
        [{"data_source": "nq", "prompt": [{"role": "user", "content": "Question: q?"}], "reward_model": {"style": "rule"}}],
    )
    with pytest.raises(ValueError, match=r"b\.parquet, row 1: field 'reward_model\.ground_truth\.target' is missing"):
        load_qa_file(no_target)
    no_question = write_parquet(
        tmp_path / "c.parquet",
        [search_r1_record("q?", ["a"]) | {"prompt": [{"role": "user", "content": "no marker here"}]}],
    )
    with pytest.raises(ValueError, match=r"c\.parquet, row 1: no question found.*field 'prompt'"):
        load_qa_file(no_question)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unknown QA file type '\.csv'"):
        load_qa_file(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qa_file(tmp_path / "nope.jsonl")


# --- convert ----------------------------------------------------------------------------------


def test_jsonl_parquet_round_trip_in_search_r1_layout(tmp_path):
    src = write_jsonl(tmp_path / "hotpotqa" / "dev.jsonl", ROWS)
    assert convert(src, tmp_path / "out" / "hotpotqa_dev.parquet") == 3
    table = pq.read_table(tmp_path / "out" / "hotpotqa_dev.parquet").to_pylist()
    first = table[0]
    assert first["data_source"] == "hotpotqa"  # from the source path
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert first["prompt"][1]["content"] == "Question: Who wrote Hamlet?"
    assert first["reward_model"] == {"style": "rule", "ground_truth": {"target": ["William Shakespeare", "Shakespeare"]}}
    assert first["extra_info"] == {"split": "dev", "index": 0} and table[2]["extra_info"]["index"] == 2
    assert (first["id"], first["question"], first["golden_answers"]) == ("dev_0", ROWS[0]["question"], ROWS[0]["golden_answers"])

    # Back to jsonl: identical rows, which keep their data_source; and a parquet without the
    # FlashRAG columns reads the same.
    assert convert(tmp_path / "out" / "hotpotqa_dev.parquet", tmp_path / "back.jsonl") == 3
    back = [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert back == [{**r, "data_source": "hotpotqa"} for r in ROWS]
    stripped = [{k: v for k, v in r.items() if k not in ("id", "question", "golden_answers")} for r in table]
    assert [(r.question, r.golds) for r in load_qa_file(write_parquet(tmp_path / "s.parquet", stripped))] == [
        (r["question"], tuple(r["golden_answers"])) for r in ROWS
    ]


def test_search_r1_parquet_to_jsonl_and_back(tmp_path):
    (tmp_path / "nq").mkdir()
    src = write_parquet(
        tmp_path / "nq" / "test.parquet",
        [search_r1_record("who sang thriller?", ["Michael Jackson"], index=i, id=f"test_{i}") for i in range(2)],
    )
    convert(src, tmp_path / "nq.jsonl")
    convert(tmp_path / "nq.jsonl", tmp_path / "again.parquet", data_source="nq")
    assert load_qa_file(tmp_path / "again.parquet") == load_qa_file(src)
    assert pq.read_table(tmp_path / "again.parquet").column("data_source").to_pylist() == ["nq", "nq"]


def test_a_mixed_search_r1_parquet_converts_with_unique_ids_and_its_data_source(tmp_path, capsys):
    """Search-R1's combined test set numbers each benchmark's rows from 0 and has no id column:
    the jsonl got ids 0, 1, 0, 1 and lost data_source."""
    from at2po.cli import main

    src = write_parquet(tmp_path / "test.parquet", [search_r1_record(f"q{s}{i}?", ["a"], source=s, index=i)
                                                    for s in ("nq", "hotpotqa") for i in range(2)])
    assert main(["data", "convert", str(src), str(tmp_path / "test.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [(r["id"], r["data_source"]) for r in rows] == [("nq_0", "nq"), ("nq_1", "nq"), ("hotpotqa_0", "hotpotqa"),
                                                          ("hotpotqa_1", "hotpotqa")]
    # Back to parquet, each row keeps its own benchmark (no --data-source needed).
    assert main(["data", "convert", str(tmp_path / "test.jsonl"), str(tmp_path / "again.parquet")]) == 0
    assert pq.read_table(tmp_path / "again.parquet").column("data_source").to_pylist() == ["nq"] * 2 + ["hotpotqa"] * 2
    # Ids repeated within one benchmark cannot be told apart: refused.
    twice = write_parquet(tmp_path / "twice.parquet", [search_r1_record(f"q{i}?", ["a"], index=0) for i in range(2)])
    capsys.readouterr()
    assert main(["data", "convert", str(twice), str(tmp_path / "twice.jsonl")]) == 2
    assert "twice.parquet: id '0' of data_source 'nq' is used by rows 1 and 2" in capsys.readouterr().err
    assert not (tmp_path / "twice.jsonl").exists()


def test_convert_errors(tmp_path):
    src = write_jsonl(tmp_path / "questions.jsonl", ROWS)
    with pytest.raises(ValueError, match="pass data_source"):
        convert(src, tmp_path / "questions.parquet")  # no benchmark in either path
    with pytest.raises(ValueError, match="same format"):
        convert(src, tmp_path / "copy.jsonl")
    with pytest.raises(ValueError, match=r"questions\.jsonl:1"):
        convert(write_jsonl(tmp_path / "questions.jsonl", [{"question": "q"}]), tmp_path / "x.parquet", data_source="nq")


def test_write_qa_file_parquet_needs_a_benchmark(tmp_path):
    rows = [QARow("1", "q?", ("a",))]
    write_qa_file(rows, tmp_path / "musique" / "dev.parquet")
    record = pq.read_table(tmp_path / "musique" / "dev.parquet").to_pylist()[0]
    assert (record["data_source"], record["extra_info"]["split"]) == ("musique", "dev")


# --- prepare ----------------------------------------------------------------------------------


def test_prepare_validates_a_flashrag_layout(tmp_path):
    raw = tmp_path / "raw"
    hotpot = [dict(r, metadata={"type": "bridge"}) for r in ROWS]  # FlashRAG's extra fields are dropped
    write_jsonl(raw / "hotpotqa" / "dev.jsonl", hotpot)
    write_jsonl(raw / "hotpotqa" / "train.jsonl", ROWS[:2])
    write_jsonl(raw / "bamboogle" / "test.jsonl", ROWS[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = prepare(raw, tmp_path / "out", datasets=["hotpotqa", "bamboogle"])
    assert counts == {("hotpotqa", "dev"): 3, ("hotpotqa", "train"): 2, ("bamboogle", "test"): 1}
    assert [json.loads(line) for line in (tmp_path / "out" / "hotpotqa" / "dev.jsonl").read_text().splitlines()] == ROWS
    assert load_qa_file(tmp_path / "out" / "bamboogle" / "test.jsonl")[0].id == "dev_0"
    messages = [str(w.message) for w in caught]
    assert any("paper evaluates hotpotqa dev on 7405" in m for m in messages)
    assert any("paper evaluates bamboogle test on 125" in m for m in messages)


def test_prepare_errors(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "musique" / "dev.jsonl", ROWS[:1] + [{"id": "x", "golden_answers": ["a"]}])
    with pytest.raises(ValueError, match=r"musique[/\\]dev\.jsonl:2: field 'question'"):
        prepare(raw, tmp_path / "out", datasets=["musique"])
    with pytest.raises(FileNotFoundError, match=r"popqa[/\\]test\.jsonl not found.*--download"):
        prepare(raw, tmp_path / "out", datasets=["popqa"])
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare(raw, tmp_path / "out", datasets=["squad"])


# --- command line -----------------------------------------------------------------------------


def test_cli_prepare_and_convert(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="at2po")
    add_cli(parser.add_subparsers(dest="command"))
    write_jsonl(tmp_path / "raw" / "bamboogle" / "test.jsonl", ROWS)
    args = parser.parse_args(["data", "prepare", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--datasets", "bamboogle"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "bamboogle" in out.out and "(paper: 125)" in out.out and "paper evaluates bamboogle" in out.err
    args = parser.parse_args(["data", "convert", str(tmp_path / "out" / "bamboogle" / "test.jsonl"), str(tmp_path / "b.parquet"), "--data-source", "bamboogle"])
    assert args.func(args) == 0
    assert pq.read_table(tmp_path / "b.parquet").column("data_source").to_pylist() == ["bamboogle"] * 3
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "prepare", "--help"])
    assert "--download" in capsys.readouterr().out
