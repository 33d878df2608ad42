"""No silent failure in training (issue 14): a dead retriever stops the run before a step is
trained on its error messages, tool failures are counted per step, and prompts that cannot fit
the model's context are skipped, counted and named (or stop the run when none fits). The reward
judges the policy's own tokens: an answer quoted in a retrieved passage earns nothing (issue 30)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from at2po.tools.base import Tool, ToolResult
from at2po.tools.health import ToolServiceError
from at2po.training.trainer import Trainer, read_metrics
from conftest import PoisonedSearch, SearchThenAnswer, SearchThenOwnTurn, make_run_cfg, tiny_search_qa_assets

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_search_qa_assets(tmp_path_factory.mktemp("assets"))


class Flaky(Tool):
    """A search tool whose service fails (infra) for the first ``down`` calls, then answers."""

    name = "search"

    def __init__(self, down, trip_after=None):
        self.down, self.calls, self.streak, self.trip_after = down, 0, 0, trip_after

    def run(self, query):
        self.calls += 1
        if self.calls <= self.down:
            self.streak += 1
            return ToolResult("search failed: could not connect", ok=False, error="connection", infra=True)
        self.streak = 0
        return ToolResult("Page 1: Zorbex was founded by Mila Tarn.", ok=True)

    def failing(self):
        return f"retriever failed {self.streak} calls in a row" if self.trip_after and self.streak >= self.trip_after \
            else None


def test_an_unreachable_retriever_stops_training_at_start(assets, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_run_cfg(assets, tmp_path / "run", "tools.search.backend=http",
                       f"tools.search.retriever_url=http://127.0.0.1:{port}")
    with pytest.raises(ToolServiceError, match=f"127.0.0.1:{port}/retrieve.*Connection refused.*start the retriever"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def searching_trainer(cfg, tool):
    trainer = Trainer(cfg, tools=[tool])
    trainer.engine.generator = trainer.generator = SearchThenAnswer(trainer.tokenizer)
    return trainer


def test_infrastructure_failures_are_counted_per_step_and_printed(assets, tmp_path, capsys):
    # 2 prompts x (3 chains + 2 re-sampled turns) = 10 searches a step; the service is down for the first 3.
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=2", "rollout.max_response_tokens=200", val=False)
    tool = Flaky(down=3)
    searching_trainer(cfg, tool).fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert tool.calls == 20 and [r["rollout/tool_calls"] for r in rows] == [10, 10]
    assert [r["rollout/tool_infra_failures"] for r in rows] == [3, 0]
    assert [r["rollout/tool_failures"] for r in rows] == [3, 0]
    assert "rollout/tool_failures=3" in capsys.readouterr().out


def test_a_service_that_keeps_failing_stops_the_run_before_the_update(assets, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=2", "rollout.max_response_tokens=200", val=False)
    trainer = searching_trainer(cfg, Flaky(down=10**9, trip_after=4))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ToolServiceError, match="retriever failed 10 calls in a row"):
        trainer.fit()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == []


def test_prompts_longer_than_the_context_are_skipped_counted_and_named(assets, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"id": "short", "question": "Who founded Zorbex?", "golden_answers": ["Mila Tarn"]},
            {"id": "huge", "question": "Who? " + "word " * 5000, "golden_answers": ["x"]},
            {"id": "short2", "question": "Where was Mila Tarn born?", "golden_answers": ["Quovia"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_run_cfg(assets, tmp_path / "run", f"data.train_file={data}", f"data.val_file={data}")
    trainer = Trainer(cfg)
    assert [r.id for r in trainer.train_rows] == ["short", "short2"] == [r.id for r in trainer.val_rows]
    out = capsys.readouterr().out
    assert "data.train_file: skipping 1 of 3 rows that do not fit" in out and "ids: huge" in out
    assert "rollout.max_response_tokens=40 > the model's context of 2048 tokens" in out
    # Every process skips the same rows, but only the main one says so.
    from accelerate import Accelerator

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Accelerator, "is_main_process", property(lambda self: False))
        other = Trainer(make_run_cfg(assets, tmp_path / "other", f"data.train_file={data}", f"data.val_file={data}"))
    assert [r.id for r in other.train_rows] == ["short", "short2"] == [r.id for r in other.val_rows]
    assert capsys.readouterr().out == ""
    # A budget that no prompt fits: the run stops at start with the fix.
    with pytest.raises(ValueError, match="data.train_file: no row fits .*lower rollout.max_response_tokens"):
        Trainer(make_run_cfg(assets, tmp_path / "run2", "rollout.max_response_tokens=2040"))


@pytest.mark.parametrize("reward", ["em", "f1", "atpo_em", "atpo_em_eval"])
def test_an_answer_quoted_in_an_observation_earns_no_credit(assets, tmp_path, reward):
    # Gold "Belmark" sits only in the passage; the policy answers "Mila Tarn" or nothing.
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": q, "golden_answers": ["Belmark"]}) + "\n"
                            for i, q in (("a", "Which country is Quovia in?"), ("b", "Which country is Drelto in?"))))

    def run(name, *extra):
        cfg = make_run_cfg(assets, tmp_path / name, "trainer.steps=1", "rollout.max_response_tokens=200",
                           f"data.train_file={data}", f"task.options={{reward: {reward}{''.join(extra)}}}", val=False)
        trainer = Trainer(cfg, tools=[PoisonedSearch()])
        trainer.engine.generator = trainer.generator = SearchThenOwnTurn(trainer.tokenizer)
        trainer.fit()
        return read_metrics(tmp_path / name / "metrics.jsonl")[0]

    own = run("own")
    assert own["rollout/tool_calls"] > 0
    assert own["reward/em"] == own["reward/f1"] == 0.0
    assert own["reward/mean"] <= 0.0
    if reward in ("em", "f1"):  # the wrong answer has a valid format and scores 0, the missing one -1
        assert own["reward/mean"] == -0.5 and own["reward/format_ok"] == 0.5
    # The authors' reading (observations scored too): their validation scorer takes the passage's
    # answer, the first answer block, for both questions.
    if reward == "atpo_em_eval":
        theirs = run("theirs", ", score_observations: true")
        assert theirs["reward/em"] == 1.0
