"""Greedy evaluation: a warm-started tiny model, real BM25 search, jsonl and parquet datasets.

Every number of results.json / results.md is recomputed from the per-sample files; resuming an
interrupted run must evaluate only the missing questions and end with a fresh run's numbers.
"""

import argparse
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from at2po.agent import render_prompt
from at2po.config import load_config
from at2po.data import QARow
from at2po.datasets import write_qa_file
from at2po.evaluation.benchmarks import _dataset_arg, add_cli, evaluate, load_eval_datasets
from at2po.evaluation.evaluator import evaluate_greedy, mean_metrics
from at2po.factory import build_engine, load_model, load_tokenizer
from at2po.rewards import check_format, exact_match, extract_answer, f1_score
from at2po.rollout.engine import TreeRolloutEngine
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.training.sft import SFTExample, sft_warm_start
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.tools.base import ToolResult
from at2po.tools.health import ToolServiceError
from at2po.tools.search import BM25Index, LocalSearchTool
from conftest import SearchThenOwnTurn

CORPUS = [
    "Quovia is a city in Belmark.",
    "Belmark is a country with many rivers.",
    "Drelto is a river that flows through Quovia.",
    "Zorbex was founded by Mila Tarn.",
]


def _rows(prefix, pairs):
    return [QARow(f"{prefix}{i}", q, tuple(golds)) for i, (q, golds) in enumerate(pairs)]


# Golds chosen so that the warm-started model (it answers "Belmark") scores a mix of EM 0/1 and partial F1.
DATA = {
    "nq": _rows("nq", [("Which country is Quovia in?", ["Belmark"]), ("Where is Quovia?", ["the Belmark"]),
                       ("Who founded Zorbex?", ["Mila Tarn"]), ("What river is in Quovia?", ["Belmark river"]),
                       ("Name a country.", ["Belmark", "X"])]),
    "triviaqa": _rows("tq", [("Which country is Quovia in?", ["Belmark"]), ("What flows through Quovia?", ["Drelto"]),
                             ("Is Belmark a country?", ["yes"])]),
    "hotpotqa": _rows("hp", [("Which country has the city where Drelto flows?", ["Belmark"]),
                             ("Who founded the company Zorbex?", ["Mila Tarn"]),
                             ("Which country is Quovia in?", ["Belmark country"]),
                             ("What is Belmark?", ["a country"])]),
    "bamboogle": _rows("bb", [("Which country is Quovia in?", ["Belmark"]), ("Who is Mila Tarn?", ["a founder"])]),
}
RECORD_KEYS = {"id", "prompt", "target", "prediction", "reward", "em", "f1", "format_ok", "turns", "tool_calls",
               "tool_failures", "infra_failures", "response"}
SINGLE, MULTI = ("nq", "triviaqa"), ("hotpotqa", "bamboogle")
LABELS = {"nq": "NQ", "triviaqa": "TriviaQA", "hotpotqa": "HotpotQA", "bamboogle": "Bamboogle"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                             seed=0)
    # One demonstration teaches the protocol: greedy answers then search and answer "Belmark" on some questions.
    obs = LocalSearchTool(BM25Index(CORPUS), topk=2)("Quovia").text
    pieces = [("<think> find Quovia </think> <search> Quovia </search>", " <result>\n" + obs + "\n</result>"),
              ("<think> done </think> <answer> The final answer is \\[ \\boxed{Belmark} \\] </answer>", "")]
    # The prompt `at2po eval` renders for the question: the search-QA task's user message, the paper's prompt.
    question = SearchQATask().user_message(Sample("q", "Which country is Quovia in?", ("Belmark",)))
    prompt = render_prompt(tok, question, PAPER_SYSTEM_PROMPT)
    sft_warm_start(model, tok, [SFTExample(prompt, pieces)],
                   steps=60, batch_size=1, lr=1e-2, progress=False)
    save_pretrained_dir(model, tok, root / "model")
    with open(root / "corpus.jsonl", "w") as f:
        for i, c in enumerate(CORPUS):
            f.write(json.dumps({"id": str(i), "contents": c}) + "\n")
    # FlashRAG jsonl named by its folder / stem, Search-R1 parquet by its path or an explicit name.
    write_qa_file(DATA["nq"], root / "nq" / "test.jsonl")
    write_qa_file(DATA["triviaqa"], root / "tq_small.parquet", data_source="triviaqa")
    write_qa_file(DATA["hotpotqa"], root / "hotpotqa" / "dev.parquet")
    write_qa_file(DATA["bamboogle"], root / "bamboogle.jsonl")
    return root


def datasets(root):
    return [root / "nq" / "test.jsonl", ("triviaqa", root / "tq_small.parquet"), root / "hotpotqa" / "dev.parquet",
            root / "bamboogle.jsonl"]


def make_cfg(root, *extra):
    return load_config(None, [
        f"model.path={root / 'model'}", f"tools.search.corpus_file={root / 'corpus.jsonl'}", "tools.search.topk=2",
        "rollout.chunk_tokens=40", "rollout.max_response_tokens=200", "rollout.max_turns=4", *extra,
    ])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def md_tables(text):
    """Each markdown table of results.md as a list of rows (lists of cells), header first."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-", ":"}:
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def recompute(records):
    n = len(records)
    return {"n": n, "em": 100 * sum(r["em"] for r in records) / n, "f1": 100 * sum(r["f1"] for r in records) / n,
            "format_ok": 100 * sum(r["format_ok"] for r in records) / n,
            "turns": sum(r["turns"] for r in records) / n, "tool_calls": sum(r["tool_calls"] for r in records) / n}


def check_results(out, data):
    """results.json and results.md against the per-sample files; returns the per-sample records."""
    records = {d: read_jsonl(out / f"{d}.jsonl") for d in data}
    results = json.loads((out / "results.json").read_text())
    for d, rows in data.items():
        assert [r["id"] for r in records[d]] == [row.id for row in rows]
        for rec, row in zip(records[d], rows):
            assert set(rec) == RECORD_KEYS
            assert rec["prompt"] == row.question and rec["target"] == list(row.golds)
            # The record belongs to its question: scores follow from its own response and golds.
            assert rec["prediction"] == extract_answer(rec["response"])
            pred = rec["prediction"]
            assert rec["em"] == (exact_match(pred, row.golds) if pred is not None else 0.0)
            assert rec["f1"] == pytest.approx(f1_score(pred, row.golds) if pred is not None else 0.0)
            # The paper's format rule for a search agent, and its EM reward (−1 for a bad format).
            assert rec["format_ok"] == float(check_format(rec["response"], ("search",))[0])
            assert rec["reward"] == (rec["em"] if rec["format_ok"] else -1.0)
            assert rec["turns"] >= 1 and rec["tool_calls"] <= rec["turns"]
    expect = {d: recompute(records[d]) for d in data}
    for group, members in (("single_hop", SINGLE), ("multi_hop", MULTI)):
        # Weighted by sample count: Σ over all the group's samples / their number.
        expect[group] = recompute([r for d in members for r in records[d]])
    assert list(results["datasets"]) == ["nq", "triviaqa", "hotpotqa", "bamboogle"]  # the paper's order
    for key, want in expect.items():
        got = results["averages"][key] if key in ("single_hop", "multi_hop") else results["datasets"][key]
        assert got["n"] == want["n"]
        for m in ("em", "f1", "format_ok", "turns", "tool_calls"):
            assert got[m] == pytest.approx(want[m], abs=1e-9), (key, m)

    em_table, details = md_tables((out / "results.md").read_text())
    labels = {**LABELS, "single_hop": "Single-hop Avg.", "multi_hop": "Multi-hop Avg."}
    order = ["nq", "triviaqa", "single_hop", "hotpotqa", "bamboogle", "multi_hop"]
    assert em_table[0] == ["Method"] + [labels[k] for k in order]
    assert em_table[1] == [results["name"]] + [f"{expect[k]['em']:.2f}" for k in order]
    assert len(em_table) == 2
    assert details[1:] == [
        [results["name"], labels[k], str(expect[k]["n"]), *(f"{expect[k][m]:.2f}" for m in
                                                             ("em", "f1", "format_ok", "turns", "tool_calls"))]
        for k in order
    ]
    return records, results


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = evaluate(make_cfg(assets), datasets(assets), out, name="tiny", batch_size=3, progress=False)
    return out, results


def test_results_match_per_sample_files(assets, full_run):
    out, results = full_run
    records, on_disk = check_results(out, DATA)
    assert on_disk == results
    assert results["name"] == "tiny" and results["datasets"]["nq"]["paper_n"] == 3610
    em = [r["em"] for recs in records.values() for r in recs]
    assert 0 < sum(em) < len(em), "the warm-started model should get some, not all, questions right"
    assert any(r["tool_calls"] > 0 for recs in records.values() for r in recs)
    assert any(0 < r["f1"] < 1 for recs in records.values() for r in recs)


@pytest.fixture
def rolled_out_ids(monkeypatch):
    """The ids of the samples every engine is asked to roll out, in order."""
    ids = []
    original = TreeRolloutEngine.validate

    def counting(self, prompts):
        ids.extend(p.sample.id for p in prompts)
        return original(self, prompts)

    monkeypatch.setattr(TreeRolloutEngine, "validate", counting)
    return ids


def test_resume_evaluates_only_missing_samples(assets, full_run, tmp_path, rolled_out_ids):
    cfg, out = make_cfg(assets), tmp_path / "out"

    # An evaluation stopped early: the first 3 questions of each dataset.
    partial = evaluate(cfg, datasets(assets), out, name="tiny", batch_size=2, limit=3, progress=False)
    first = [row.id for rows in DATA.values() for row in rows[:3]]
    assert rolled_out_ids == first
    assert {d: r["n"] for d, r in partial["datasets"].items()} == {
        "nq": 3, "triviaqa": 3, "hotpotqa": 3, "bamboogle": 2}
    check_results(out, {d: rows[:3] for d, rows in DATA.items()})

    rolled_out_ids.clear()
    evaluate(cfg, datasets(assets), out, name="tiny", batch_size=2, progress=False)
    assert rolled_out_ids == [row.id for rows in DATA.values() for row in rows[3:]]

    # Killed while writing: the last line of nq is cut in half, hotpotqa's last record is gone.
    nq = out / "nq.jsonl"
    text = nq.read_text()
    nq.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    hp = out / "hotpotqa.jsonl"
    hp.write_text("".join(line + "\n" for line in hp.read_text().splitlines()[:-1]))
    rolled_out_ids.clear()
    resumed = evaluate(cfg, datasets(assets), out, name="tiny", batch_size=2, progress=False)
    assert rolled_out_ids == [DATA["nq"][-1].id, DATA["hotpotqa"][-1].id]

    full_out, full_results = full_run
    assert resumed == full_results
    records, _ = check_results(out, DATA)
    for d in DATA:  # record by record, in the file's order
        assert records[d] == read_jsonl(full_out / f"{d}.jsonl")

    rolled_out_ids.clear()
    evaluate(cfg, datasets(assets), out, name="tiny", batch_size=2, progress=False)
    assert rolled_out_ids == []  # nothing left to do


def test_resume_refuses_other_settings_unless_told(assets, full_run, tmp_path):
    out = tmp_path / "out"
    evaluate(make_cfg(assets), {"bamboogle": assets / "bamboogle.jsonl"}, out, limit=1, progress=False)
    other = make_cfg(assets, "rollout.max_response_tokens=150")
    with pytest.raises(ValueError, match="rollout"):
        evaluate(other, {"bamboogle": assets / "bamboogle.jsonl"}, out, progress=False)
    res = evaluate(other, {"bamboogle": assets / "bamboogle.jsonl"}, out, resume=False, progress=False)
    assert res["datasets"]["bamboogle"]["n"] == 2 and len(read_jsonl(out / "bamboogle.jsonl")) == 2


def test_resume_refuses_results_scored_before_the_reward_read_only_the_models_tokens(assets, tmp_path):
    out = tmp_path / "out"
    evaluate(make_cfg(assets), {"bamboogle": assets / "bamboogle.jsonl"}, out, limit=1, progress=False)
    settings = json.loads((out / "eval_settings.json").read_text())
    assert settings["task"].pop("scored") == "policy tokens"
    (out / "eval_settings.json").write_text(json.dumps(settings))  # as an earlier at2po wrote it
    with pytest.raises(ValueError, match=r"holds results of another setting \(task differ\)"):
        evaluate(make_cfg(assets), {"bamboogle": assets / "bamboogle.jsonl"}, out, progress=False)


def test_dataset_names_and_mixed_search_r1_files(assets, tmp_path):
    # Search-R1's combined test file: one parquet, benchmarks told apart by data_source.
    write_qa_file(DATA["nq"], tmp_path / "a.parquet", data_source="nq")
    write_qa_file(DATA["bamboogle"], tmp_path / "b.parquet", data_source="bamboogle")
    mixed = tmp_path / "test.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")]),
                   mixed)
    got = load_eval_datasets([mixed])
    assert {d: [r.id for r in rows] for d, rows in got.items()} == {
        d: [r.id for r in DATA[d]] for d in ("nq", "bamboogle")}
    assert [r.id for r in load_eval_datasets({"Bamboogle": mixed})["bamboogle"]] == [r.id for r in DATA["bamboogle"]]
    with pytest.raises(ValueError, match="not 'popqa'"):
        load_eval_datasets({"popqa": mixed})
    with pytest.raises(ValueError, match="twice"):
        load_eval_datasets([mixed, assets / "nq" / "test.jsonl"])
    assert list(load_eval_datasets({"2wiki": assets / "bamboogle.jsonl"})) == ["2wikimultihopqa"]
    write_qa_file(DATA["nq"] + DATA["nq"][:1], tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="occurs twice"):
        load_eval_datasets({"nq": tmp_path / "dup.jsonl"})
    assert _dataset_arg("nq=data/nq/test.jsonl") == ("nq", "data/nq/test.jsonl")
    assert _dataset_arg("data/nq/test.jsonl") == (None, "data/nq/test.jsonl")
    assert _dataset_arg("runs/a=b/test.jsonl") == (None, "runs/a=b/test.jsonl")


def test_cli(assets, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="at2po")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args([
        "eval", "--dataset", f"musique={assets / 'bamboogle.jsonl'}", "--dataset", str(assets / "nq" / "test.jsonl"),
        "--out", str(out), "--name", "AT2PO-tiny", "--limit", "1", "--batch-size", "1", "--no-resume",
        f"model.path={assets / 'model'}", f"tools.search.corpus_file={assets / 'corpus.jsonl'}",
        "rollout.chunk_tokens=40", "rollout.max_response_tokens=200", "trainer.progress=false",
    ])
    assert args.func(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]) == ["nq", "musique"] and results["name"] == "AT2PO-tiny"
    em_table = md_tables((out / "results.md").read_text())[0]
    assert em_table[0] == ["Method", "NQ", "Single-hop Avg.", "MuSiQue", "Multi-hop Avg."]
    assert em_table[1][0] == "AT2PO-tiny"
    assert "| AT2PO-tiny |" in capsys.readouterr().out


def test_evaluate_greedy_in_batches_gives_the_same_records(assets, full_run):
    cfg = make_cfg(assets)
    tokenizer = load_tokenizer(cfg.model)
    engine = build_engine(cfg, load_model(cfg.model).eval(), tokenizer)
    samples = [Sample(row.id, row.question, row.golds) for row in DATA["nq"]]
    assert len(samples) == 5
    batches = []
    batched = evaluate_greedy(engine, samples, batch_size=2, on_batch=batches.append)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [r for b in batches for r in b] == batched
    whole = evaluate_greedy(engine, samples)
    assert batched == whole
    # The same records `at2po eval` wrote for nq (there in batches of 3), through JSON.
    out, _ = full_run
    assert json.loads(json.dumps(batched)) == read_jsonl(out / "nq.jsonl")
    assert [set(r) for r in batched] == [RECORD_KEYS] * 5
    assert mean_metrics(batched, ["em", "f1"]) == pytest.approx(
        {k: sum(r[k] for r in batched) / 5 for k in ("em", "f1")})
    # meta is recorded when a sample has one.
    [rec] = evaluate_greedy(engine, [Sample("m", DATA["nq"][0].question, DATA["nq"][0].golds, {"hops": 1})])
    assert rec["meta"] == {"hops": 1} and {k: v for k, v in rec.items() if k not in ("id", "meta")} == {
        k: v for k, v in batched[0].items() if k != "id"}
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_greedy(engine, samples, batch_size=0)


# -- infrastructure failures (issue 14): never a normal-looking table, redone on resume -----------------
class _DownThenUp(LocalSearchTool):
    """The real BM25 search, but while ``down`` every call fails as an unreachable retriever does."""

    def __init__(self):
        super().__init__(index_dir=None, corpus_path=None, index=BM25Index(CORPUS), topk=2)
        self.down = True

    def run(self, query):
        if self.down:
            return ToolResult("search failed: could not connect", ok=False, error="connection", infra=True)
        return super().run(query)


def test_resume_redoes_records_whose_search_failed_for_infrastructure_reasons(assets, full_run, tmp_path,
                                                                              rolled_out_ids, capsys):
    cfg, out, tool = make_cfg(assets), tmp_path / "out", _DownThenUp()
    first = evaluate(cfg, datasets(assets), out, name="tiny", batch_size=3, tools=[tool], progress=False)
    failed = {r["id"] for d in DATA for r in read_jsonl(out / f"{d}.jsonl") if r["infra_failures"]}
    assert failed and sum(r["infra_failures"] for r in first["datasets"].values()) > 0
    assert "for infrastructure reasons, redone on the next resume" in capsys.readouterr().out
    wrong_kept = {r["id"] for d in DATA for r in read_jsonl(out / f"{d}.jsonl")
                  if not r["infra_failures"] and not r["em"]}

    rolled_out_ids.clear()
    tool.down = False
    resumed = evaluate(cfg, datasets(assets), out, name="tiny", batch_size=3, tools=[tool], progress=False)
    assert sorted(rolled_out_ids) == sorted(failed)  # exactly the infrastructure failures, none of the wrong answers
    assert not wrong_kept & set(rolled_out_ids)
    assert resumed == full_run[1]  # the numbers of a run that never saw the outage


def test_eval_with_an_unreachable_retriever_stops_before_writing_results(assets, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_cfg(assets, "tools.search.backend=http", f"tools.search.retriever_url=http://127.0.0.1:{port}")
    with pytest.raises(ToolServiceError, match=f"retriever_url: .*127.0.0.1:{port}.*start the retriever"):
        evaluate(cfg, datasets(assets), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.md").exists()


def test_eval_stops_when_the_retriever_fails_every_call_in_a_row(assets, tmp_path):
    class Dies(_DownThenUp):
        def failing(self):
            return "tools.search: the retriever failed 20 calls in a row" if self.calls else None

        def run(self, query):
            self.calls = getattr(self, "calls", 0) + 1
            return super().run(query)

    out = tmp_path / "out"
    with pytest.raises(ToolServiceError, match="failed 20 calls in a row"):
        evaluate(make_cfg(assets), datasets(assets), out, batch_size=5, tools=[Dies()], progress=False)
    assert read_jsonl(out / "nq.jsonl") == [] and not (out / "results.md").exists()


def test_an_index_that_fails_mid_eval_stops_it_instead_of_counting_as_the_models_queries(assets, tmp_path):
    """An index whose hits point past its passages failed every search with "list index out of range",
    reported as "tool calls failed (the model's input: empty or bad queries)" under a table of EM."""
    tool = LocalSearchTool(BM25Index(CORPUS), topk=2)
    tool.index.search = lambda queries, topk: [[(len(CORPUS), 1.0)] for _ in queries]  # a hit past the passages
    out = tmp_path / "out"
    with pytest.raises(ToolServiceError, match=r"tools.search: the local index failed \(IndexError: list index out "
                                               r"of range\); rebuild"):
        evaluate(make_cfg(assets), datasets(assets), out, batch_size=5, tools=[tool], progress=False)
    assert read_jsonl(out / "nq.jsonl") == [] and not (out / "results.md").exists()


def test_a_question_longer_than_the_context_counts_as_wrong_and_is_not_generated(assets, full_run, tmp_path,
                                                                                rolled_out_ids, capsys):
    # The tiny model's context is 2048 tokens; this question alone is longer.
    rows = [DATA["bamboogle"][0], QARow("long", "Which country is Quovia in? " * 400, ("Belmark",))]
    write_qa_file(rows, tmp_path / "bb.jsonl")
    # batch_size=1: the long question is a batch of its own, with nothing to generate.
    results = evaluate(make_cfg(assets), [("bamboogle", tmp_path / "bb.jsonl")], tmp_path / "out", name="tiny",
                       batch_size=1, progress=False)
    assert rolled_out_ids == [DATA["bamboogle"][0].id]
    assert "warning: bamboogle: 1 of 2 questions do not fit the model's context and count as wrong (ids: long)" \
        in capsys.readouterr().out
    on_disk = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "bamboogle.jsonl")}
    short, long = on_disk[DATA["bamboogle"][0].id], on_disk["long"]
    full_records = {r["id"]: r for r in read_jsonl(full_run[0] / "bamboogle.jsonl")}
    assert short == full_records[short["id"]]  # the other question is rolled_out_ids as usual
    assert long["id"] == "long" and long["em"] == long["f1"] == long["reward"] == 0.0 and long["prediction"] is None
    assert long["skipped"].endswith("+ rollout.max_response_tokens=200 > the model's context of 2048 tokens")
    # The denominator is the dataset's size: EM = (short's EM + 0) / 2.
    assert results["datasets"]["bamboogle"]["n"] == 2
    assert results["datasets"]["bamboogle"]["em"] == pytest.approx(100 * short["em"] / 2)


def test_evaluate_greedy_context_rule_at_its_boundary(assets, full_run, monkeypatch):
    """Which samples the context rule skips, the exact skipped record, and that the others keep
    their order and records (whatever comes first in a batch)."""
    cfg = make_cfg(assets)
    tokenizer = load_tokenizer(cfg.model)
    engine = build_engine(cfg, load_model(cfg.model).eval(), tokenizer)
    validated = []
    original = engine.validate

    def counting(prompts):
        validated.append([p.sample.id for p in prompts])
        return original(prompts)

    monkeypatch.setattr(engine, "validate", counting)
    nq = {r["id"]: r for r in read_jsonl(full_run[0] / "nq.jsonl")}
    short = [Sample(row.id, row.question, row.golds) for row in DATA["nq"][:2]]
    n_short = max(len(engine.prompt(s).prompt_ids) for s in short)
    long = Sample("long", "Which country is Quovia in? " * 10, ("Belmark", "X"), {"hops": 2})
    n_long = len(engine.prompt(long).prompt_ids)
    assert n_long > n_short
    budget = cfg.rollout.max_response_tokens
    # context = the longest short prompt + the budget: those fit exactly (<=), the long one does not.
    records = evaluate_greedy(engine, [long, *short], context=n_short + budget)
    assert validated == [[s.id for s in short]]
    assert [r["id"] for r in records] == ["long", *(s.id for s in short)]
    assert records[1:] == [nq[s.id] for s in short]
    assert records[0] == {
        "id": "long", "prompt": long.prompt, "target": ["Belmark", "X"], "prediction": None, "reward": 0.0,
        "em": 0.0, "f1": 0.0, "format_ok": 0.0, "turns": 0, "tool_calls": 0, "tool_failures": 0,
        "infra_failures": 0, "response": "", "meta": {"hops": 2},
        "skipped": f"prompt of {n_long} tokens + rollout.max_response_tokens={budget} > the model's context of "
                   f"{n_short + budget} tokens"}
    # One token less of context: the longest short prompt no longer fits; a batch of only it
    # generates nothing.
    longest = max(short, key=lambda s: len(engine.prompt(s).prompt_ids))
    validated.clear()
    [rec] = evaluate_greedy(engine, [longest], context=n_short + budget - 1)
    assert validated == [] and rec["id"] == longest.id and rec["skipped"].startswith(f"prompt of {n_short} tokens")
    assert mean_metrics([], ["em"]) == {"em": 0.0}


@pytest.mark.parametrize("options, em", [("{reward: em}", 0.0), ("{reward: atpo_em}", 0.0),
                                         ("{reward: atpo_em, score_observations: true}", 100.0)])
def test_eval_scores_the_models_own_answer_not_one_quoted_in_a_passage(assets, tmp_path, monkeypatch, options, em):
    # The gold answer is in the index only, quoted in the protocol's tags; the model (scripted)
    # searches, then answers "Mila Tarn" to one question and nothing to the other.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": "Belmark <think> x </think> <answer> The final answer is "
                                  "\\[ \\boxed{Belmark} \\] </answer>"}) + "\n")
    data = tmp_path / "bamboogle.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": q, "golden_answers": ["Belmark"]}) + "\n"
                            for i, q in (("a", "Which country is Quovia in?"), ("b", "Which country is Drelto in?"))))
    monkeypatch.setattr("at2po.rollout.generator.build_generator", lambda name, model, tok, **kw: SearchThenOwnTurn(tok))
    parser = argparse.ArgumentParser(prog="at2po")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--dataset", f"bamboogle={data}", "--out", str(out), f"task.options={options}",
                              f"model.path={assets / 'model'}", f"tools.search.corpus_file={corpus}",
                              "rollout.max_response_tokens=200", "trainer.progress=false"])
    assert args.func(args) == 0
    records = read_jsonl(out / "bamboogle.jsonl")
    assert all("boxed{Belmark}" in r["response"] for r in records)  # the passage was seen
    assert json.loads((out / "results.json").read_text())["datasets"]["bamboogle"]["em"] == em
    if em == 0.0:
        assert [r["prediction"] for r in records] == ["Mila Tarn", None]


def test_resume_refuses_records_of_another_file_under_the_same_dataset_name(assets, tmp_path, rolled_out_ids):
    """A resume under the same name but from another file kept the first file's records for the
    ids both files have and reported a mix of the two."""
    first, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_qa_file(DATA["nq"][:2], first)
    moved = DATA["triviaqa"][1:2] + DATA["nq"][1:3]
    write_qa_file([QARow(f"nq{i}", r.question, r.golds) for i, r in enumerate(moved)], other)
    cfg, out = make_cfg(assets), tmp_path / "out"
    evaluate(cfg, {"nq": first}, out, limit=1, progress=False)
    before = (out / "nq.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"nq.jsonl holds records of another file than dataset 'nq' is now read from "
                                         r"\(1 of 1 differ; id nq0: 'Which country is Quovia in\?' then, 'What "
                                         r"flows through Quovia\?' now\): pass --no-resume"):
        evaluate(cfg, {"nq": other}, out, progress=False)
    assert (out / "nq.jsonl").read_bytes() == before  # nothing rewritten
    # The same file resumes (a --limit run is a prefix of it); --no-resume starts the other one over.
    rolled_out_ids.clear()
    evaluate(cfg, {"nq": first}, out, progress=False)
    assert rolled_out_ids == ["nq1"]
    evaluate(cfg, {"nq": other}, out, resume=False, progress=False)
    assert [r["prompt"] for r in read_jsonl(out / "nq.jsonl")] == [r.question for r in moved]
