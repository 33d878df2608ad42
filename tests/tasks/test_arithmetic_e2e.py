"""The arithmetic task end to end on CPU: generated problems, a warm start on tool-using
demonstrations (the real sandboxed python tool), then RL steps with the real trainer."""

import json

import pytest

from at2po.agent import AgentProtocol, render_prompt
from at2po.config import load_config
from at2po.tasks.arithmetic import ArithmeticConfig, ArithmeticTask, demonstration, generate_problems, write_problems
from at2po.tasks.base import Sample
from at2po.tiny import build_tiny_model, save_pretrained_dir, train_tokenizer
from at2po.tools import PythonTool
from at2po.training.sft import SFTExample, sft_warm_start
from at2po.training.trainer import Trainer, read_metrics

pytestmark = pytest.mark.sandbox  # the demonstrations and the rollouts run the real python tool


@pytest.fixture(scope="module")
def warm_started(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    problems = generate_problems(ArithmeticConfig(seed=3, n_train=24, n_test=4, max_steps=1, max_operand=20))
    write_problems(problems["train"], out / "train.jsonl")
    write_problems(problems["test"], out / "test.jsonl")
    task, tool = ArithmeticTask(), PythonTool()
    system_prompt = task.system_prompt([tool])
    demos = [(row, demonstration(row, tool)) for row in problems["train"]]
    samples = [Sample(row["id"], row["question"], row["answer"]) for row in problems["train"]]
    tokenizer = train_tokenizer([system_prompt, *(task.user_message(s) for s in samples), *(d.text for _, d in demos)],
                                vocab_size=400)
    model = build_tiny_model(tokenizer, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=96, seed=0)
    examples = [SFTExample(render_prompt(tokenizer, task.user_message(s), system_prompt), d.pieces)
                for s, (_, d) in zip(samples, demos)]
    history = sft_warm_start(model, tokenizer, examples, steps=120, batch_size=8, lr=1e-2, seed=0, progress=False)
    save_pretrained_dir(model, tokenizer, out / "model")
    return out, history, problems


def test_arithmetic_warm_start_then_rl(warm_started):
    out, history, problems = warm_started
    # The warm start learned the demonstrations' protocol.
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    cfg = load_config(None, [
        "task.name=arithmetic", f"model.path={out / 'model'}", f"data.train_file={out / 'train.jsonl'}",
        f"data.val_file={out / 'test.jsonl'}", f"trainer.output_dir={out / 'run'}",
        "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
        "rollout.chunk_tokens=40", "rollout.max_response_tokens=160", "rollout.max_turns=3",
        "rollout.tool_workers=2", "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "trainer.micro_batch_rows=8", "trainer.val_every=0", "trainer.save_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "optim.lr=1e-4",
    ])
    trainer = Trainer(cfg)
    assert [t.name for t in trainer.tools] == ["python"]  # the task's own tool, from the registry
    assert trainer.engine.protocol.stop_strings == ("</python>", "</answer>")
    result = trainer.fit()
    rows = read_metrics(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    before = rows[0]
    # Greedy validation of the warm start: valid answers that used the sandboxed tool.
    assert before["val/format_ok"] >= 0.5 and before["val/tool_calls"] >= 0.5
    for r in rows[1:]:
        assert {"reward/mean", "reward/correct", "reward/format_ok", "loss/policy"} <= set(r)
        assert r["rollout/tool_calls"] >= 1 and r["rollout/tool_failures"] < r["rollout/tool_calls"]
    assert "val/correct" in rows[-1] and result["step"] == 2

    # The reward the trainer saw is the task's score of the decoded response: recompute one row.
    protocol = AgentProtocol(trainer.tools)
    records = trainer.val_records
    assert len(records) == len(problems["test"])
    for rec, row in zip(records, problems["test"]):
        score = ArithmeticTask().score(rec["response"], Sample(row["id"], row["question"], row["answer"]), protocol)
        assert (score.reward, score.metrics["correct"]) == (rec["reward"], rec["correct"])
    json.dumps(records)  # per-row records are JSON-serialisable (eval files, reports)
