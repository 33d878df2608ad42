"""The arithmetic task: generated word problems, numeric-match reward, jsonl loading, and
demonstrations that really run the python sandbox."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import warnings

import pytest

from at2po.agent import ANSWER_FORMAT, Action, AgentProtocol, format_observation
from at2po.rewards import check_format
from at2po.tasks import TASKS, Sample, build_task
from at2po.tasks.arithmetic import (
    MENTAL_SLIP_RATE,
    ArithmeticConfig,
    ArithmeticTask,
    demonstration,
    generate_problems,
    numeric_match,
    parse_number,
    write_problems,
)
from at2po.tools import PythonTool
from at2po.tools.python_sandbox import PYTHON_DESCRIPTION

SMALL = ArithmeticConfig(seed=5, n_train=60, n_test=20)
TASK = ArithmeticTask()


def describing_python_tool() -> PythonTool:
    """The python tool for tests that only parse and score text: it never runs code here, so
    these tests need no sandbox (weak isolation is allowed and its warning silenced where the
    host has none); the demonstration tests below run the real sandbox."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PythonTool(unsafe_allow_weak_isolation=True)


PROTOCOL = AgentProtocol([describing_python_tool()])  # constructing the tool starts no process
BAKERY = {
    "id": "bakery",
    "question": "A baker makes 17 trays of 23 rolls and sells 45 rolls. How many rolls are left?",
    "answer": 346,
    "steps": 2,
    "expression": "17 * 23 - 45",
}


# -- an independent evaluator of the stored expressions ---------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> tuple[Fraction, int]:
    """(value, number of operations) of an expression of integer literals and + - * /; raises
    AssertionError on anything else, on an inexact division or on a negative intermediate value."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](walk(node.left), walk(node.right))
            assert value.denominator == 1, f"inexact division in {expression!r}"
            assert value >= 0, f"negative intermediate value in {expression!r}"
            return value
        assert isinstance(node, ast.Constant) and type(node.value) is int, f"unexpected {ast.dump(node)}"
        return Fraction(node.value)

    tree = ast.parse(expression, mode="eval")
    return walk(tree.body), sum(isinstance(n, ast.BinOp) for n in ast.walk(tree))


def test_the_evaluator_computes_and_refuses():
    assert evaluate("17 * 23 - 45") == (346, 2)
    assert evaluate("(7 * 8 + 4) / 6") == (10, 3)
    for bad in ("7 / 2", "3 - 5", "__import__('os')", "2 ** 3"):
        with pytest.raises(AssertionError):
            evaluate(bad)


# -- generation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems() -> dict[str, list[dict]]:
    return generate_problems(ArithmeticConfig())


def test_generation_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = generate_problems(SMALL), generate_problems(SMALL)
    assert a == b
    other = generate_problems(ArithmeticConfig(seed=6, n_train=60, n_test=20))
    assert [r["question"] for r in other["train"]] != [r["question"] for r in a["train"]]
    assert [r["question"] for r in other["test"]] != [r["question"] for r in a["test"]]


def test_the_test_split_does_not_depend_on_the_train_size():
    small = generate_problems(ArithmeticConfig(seed=5, n_train=10, n_test=20))
    assert small["test"] == generate_problems(SMALL)["test"]
    assert len(small["train"]) == 10


def test_splits_are_disjoint_and_ids_unique(problems):
    train, test = problems["train"], problems["test"]
    assert (len(train), len(test)) == (1000, 200)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in train}) == 1000
    assert [r["id"] for r in train] == [f"arith-train-{i}" for i in range(1000)]
    assert [r["id"] for r in test] == [f"arith-test-{i}" for i in range(200)]


def test_every_answer_is_the_integer_its_expression_evaluates_to(problems):
    for row in problems["train"] + problems["test"]:
        value, operations = evaluate(row["expression"])
        assert type(row["answer"]) is int and row["answer"] >= 0, row
        assert value == row["answer"], row
        assert operations == row["steps"], row
        # The question states exactly the numbers the expression uses.
        assert Counter(re.findall(r"\d+", row["question"])) == Counter(re.findall(r"\d+", row["expression"])), row


def test_step_counts_stay_within_bounds_and_every_template_is_used(problems):
    rows = problems["train"] + problems["test"]
    assert {r["steps"] for r in rows} == {1, 2, 3}
    shapes = {re.sub(r"\d+", "N", r["expression"]) for r in rows}
    assert len(shapes) == 12  # four templates per step count
    two = generate_problems(ArithmeticConfig(n_train=50, n_test=10, min_steps=2, max_steps=2))
    assert {r["steps"] for r in two["train"] + two["test"]} == {2}
    small = generate_problems(ArithmeticConfig(n_train=200, n_test=0, max_operand=9))
    assert all(int(n) <= 9 * 9 for r in small["train"] for n in re.findall(r"\d+", r["question"]))
    assert small["test"] == []


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"n_train": -1}, "n_train"),
        ({"n_test": True}, "n_test"),
        ({"seed": 1.5}, "seed"),
        ({"min_steps": 0}, "min_steps"),
        ({"max_steps": 4}, "max_steps"),
        ({"min_steps": 3, "max_steps": 2}, "max_steps"),
        ({"max_operand": 1}, "max_operand"),
    ],
)
def test_config_errors_name_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        ArithmeticConfig(**fields)


def test_a_too_small_problem_space_is_an_error_not_a_hang():
    # max_operand=3 and one step allow 4 + 3 + 4 + 4 = 15 distinct questions.
    with pytest.raises(ValueError, match="could only draw 15 distinct train problems of 100"):
        generate_problems(ArithmeticConfig(n_train=100, n_test=0, max_steps=1, max_operand=3))


# -- numeric answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, target, expected",
    [
        ("346", 346, True),
        ("346.0", 346, True),
        ("1,234", 1234, True),
        ("$12", 12, True),
        ("\\frac{3}{4}", 0.75, True),
        ("3/4", 0.75, True),
        ("-5", -5, True),
        ("345", 346, False),
        ("abc", 1, False),
        ("", 0, False),
        ("12.", 12, True),
        # beyond the brief's table
        (" 346 ", 346, True),
        ("\u22125", -5, True),
        ("-\\$12", -12, True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("0.3333333", "1/3", True),  # floats compare with relative tolerance 1e-6
        ("0.33", "1/3", False),
        ("1/3", "2/6", True),  # fractions compare exactly
        ("1e3", 1000, True),
        ("346.01", 346, False),
        ("12,34", 1234, False),  # not a thousands grouping
        ("3/0", 0, False),
        ("5", True, False),  # a bool is not a number
        ("9" * 5000, 1, False),  # longer than int() accepts: no exception
        ("1" + "0" * 400, 1e300, False),  # too large for a float: no exception
    ],
)
def test_numeric_match(answer, target, expected):
    assert numeric_match(answer, target) is expected


def test_parse_number_keeps_integers_and_fractions_exact():
    assert parse_number("1,234") == Fraction(1234) and isinstance(parse_number("1,234"), Fraction)
    assert parse_number("-\\frac{3}{4}") == Fraction(-3, 4)
    assert parse_number("12.5") == 12.5 and isinstance(parse_number("12.5"), float)
    assert parse_number("1e999") is None  # not finite
    assert parse_number("3 apples") is None


# -- prompt and reward -------------------------------------------------------------------------------
def _sample(target=346) -> Sample:
    return TASK.sample_from_dict({**BAKERY, "answer": target}, "here")


VALID = (
    "<think> 17 * 23 - 45 </think> <python>\nprint(17 * 23 - 45)\n</python> <result>\n346\n</result>"
    " <think> Done. </think> <answer> The answer is \\boxed{346} </answer>"
)


def test_prompt_parts():
    sample = _sample()
    assert TASK.user_message(sample) == f"Problem: {BAKERY['question']}"
    assert TASK.system_prompt([describing_python_tool()]) == f"{ArithmeticTask.instructions} {PYTHON_DESCRIPTION} {ANSWER_FORMAT}"


def test_a_valid_right_answer_scores_1():
    score = TASK.score(VALID, _sample(), PROTOCOL)
    assert (score.reward, dict(score.metrics), score.answer, score.reason) == (
        1.0,
        {"correct": 1.0, "format_ok": 1.0},
        "346",
        "",
    )
    assert TASK.score(VALID, _sample("346"), PROTOCOL).reward == 1.0  # a string target
    assert TASK.score(VALID.replace("{346}", "{346.0}"), _sample(), PROTOCOL).reward == 1.0


def test_an_invalid_format_scores_minus_1_but_correctness_is_still_measured():
    response = "<answer> The answer is \\boxed{346} </answer>"
    score = TASK.score(response, _sample(), PROTOCOL)
    assert (score.reward, dict(score.metrics)) == (-1.0, {"correct": 1.0, "format_ok": 0.0})
    assert score.reason == "missing <think>...</think>"
    no_box = TASK.score("<think> x </think> <answer> 346 </answer>", _sample(), PROTOCOL)
    assert (no_box.reward, no_box.metrics["correct"], no_box.answer) == (-1.0, 0.0, None)


def test_a_wrong_number_scores_0():
    score = TASK.score(VALID.replace("{346}", "{345}"), _sample(), PROTOCOL)
    assert (score.reward, dict(score.metrics), score.answer) == (0.0, {"correct": 0.0, "format_ok": 1.0}, "345")
    garbage = VALID.replace("{346}", "{" + "9" * 5000 + "}")
    assert TASK.score(garbage, _sample(), PROTOCOL).reward == 0.0


def test_tags_of_tools_that_are_not_enabled_are_plain_text():
    response = "<think> Search it. </think> <search> 17 * 23 - 45 </search> <answer> The answer is \\boxed{346} </answer>"
    score = TASK.score(response, _sample(), PROTOCOL)
    assert (score.reward, dict(score.metrics)) == (1.0, {"correct": 1.0, "format_ok": 1.0})
    # With search enabled (the default tool set) the same text is an unanswered call.
    assert check_format(response) == (False, "<search> call not followed by <result>")


# -- loading -----------------------------------------------------------------------------------------
def test_write_and_load_round_trip(tmp_path: Path):
    rows = generate_problems(SMALL)["test"]
    path = write_problems(rows, tmp_path / "sub" / "test.jsonl")
    samples = TASK.load(path)
    assert [(s.id, s.prompt, s.target, dict(s.meta)) for s in samples] == [
        (r["id"], r["question"], r["answer"], {"steps": r["steps"]}) for r in rows
    ]


def test_id_defaults_to_the_location_and_steps_are_optional():
    sample = TASK.sample_from_dict({"question": " Two plus two? ", "answer": "4"}, "f.jsonl:3")
    assert (sample.id, sample.prompt, sample.target, dict(sample.meta)) == ("f.jsonl:3", "Two plus two?", "4", {})


GOOD = json.dumps({"id": "a", "question": "What is 2 + 2?", "answer": 4})


@pytest.mark.parametrize(
    "line, message",
    [
        (json.dumps({"id": "b", "answer": 3}), "field 'question' is missing or empty"),
        (json.dumps({"question": "  ", "answer": 3}), "field 'question' is missing or empty"),
        (json.dumps({"question": "Q?", "answer": "abc"}), "field 'answer' must be a number"),
        (json.dumps({"question": "Q?"}), "field 'answer' must be a number"),
        (json.dumps({"question": "Q?", "answer": True}), "field 'answer' must be a number"),
        (json.dumps({"question": "Q?", "answer": 3, "steps": 0}), "field 'steps' must be a positive integer"),
        ("[1, 2]", "expected a JSON object, got list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
        TASK.load(path)


# -- demonstrations (three real sandbox runs) --------------------------------------------------------
@pytest.fixture(scope="module")
def python_tool() -> PythonTool:
    return PythonTool()


@pytest.mark.sandbox
def test_demonstration_runs_python_and_scores_1(python_tool):
    demo = demonstration(BAKERY, python_tool)
    (call, observation), (final, last) = demo.pieces
    assert PROTOCOL.parse(call) == Action("python", "print(17 * 23 - 45)")
    assert observation == format_observation("346") == " <result>\n346\n</result>"
    assert final.startswith(" <think>") and final.endswith("<answer> The answer is \\boxed{346} </answer>")
    assert last == ""
    assert TASK.score(demo.text, _sample(), PROTOCOL).reward == 1.0


@pytest.mark.sandbox
def test_demonstration_of_a_division_prints_an_integer(python_tool):
    row = {"id": "bouquets", "answer": 10, "steps": 3, "expression": "(7 * 8 + 4) / 6", "question": "Q?"}
    demo = demonstration(row, python_tool)
    assert PROTOCOL.parse(demo.pieces[0][0]).query == "print((7 * 8 + 4) // 6)"
    assert demo.pieces[0][1] == format_observation("10")
    assert TASK.score(demo.text, TASK.sample_from_dict(row, "x"), PROTOCOL).reward == 1.0


@pytest.mark.sandbox
def test_demonstration_refuses_a_row_whose_answer_python_does_not_print(python_tool):
    with pytest.raises(ValueError, match="python printed '346' .* expected 347"):
        demonstration({**BAKERY, "answer": 347}, python_tool)


def _no_tool(query: str):
    raise AssertionError("a mental demonstration must not call the tool")


def test_mental_demonstrations_skip_the_tool_and_sometimes_slip():
    rows = generate_problems(SMALL)["train"]
    demos = [demonstration(r, _no_tool, mental=True) for r in rows]
    assert demos == [demonstration(r, _no_tool, mental=True) for r in rows]  # seeded
    assert demos != [demonstration(r, _no_tool, mental=True, seed=1) for r in rows]
    rewards = []
    for row, demo in zip(rows, demos):
        assert len(demo.pieces) == 1 and "<python>" not in demo.text
        assert demo.text.startswith(f"<think> {row['expression']} = ")
        score = TASK.score(demo.text, TASK.sample_from_dict(row, "x"), PROTOCOL)
        assert score.metrics["format_ok"] == 1.0
        assert int(score.answer) >= 0 and abs(int(score.answer) - row["answer"]) <= 2
        rewards.append(score.reward)
    slips = rewards.count(0.0) / len(rewards)
    assert set(rewards) == {0.0, 1.0} and abs(slips - MENTAL_SLIP_RATE) < 0.15


# -- registry ----------------------------------------------------------------------------------------
def test_the_task_is_registered():
    assert TASKS["arithmetic"] is ArithmeticTask
    task = build_task("arithmetic")
    assert isinstance(task, ArithmeticTask)
    assert (task.tools, task.metrics) == (("python",), ("correct", "format_ok"))
    with pytest.raises(ValueError, match="task.options for 'arithmetic'"):
        build_task("arithmetic", bogus=1)
