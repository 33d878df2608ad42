"""Hand-worked checks of the QA reward: normalisation, EM/F1, answer extraction, format rule."""

from __future__ import annotations

import time

import pytest

from at2po.agent import TOOL_LIMIT_NOTICE, AgentProtocol, format_error_observation, format_observation
from at2po.rewards import (
    check_format,
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
)
from at2po.tasks.base import TASKS, Sample, Score, build_task
from at2po.tasks.search_qa import SearchQATask
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import LocalSearchTool

# The old reward functions' agent: search and python enabled (tool classes work as specs).
PROTOCOL = AgentProtocol([LocalSearchTool, PythonTool])


def _sample(golds) -> Sample:
    return Sample("q0", "Where was the director of Film X born?", tuple([golds] if isinstance(golds, str) else golds))


def qa_reward(response: str, golds) -> Score:
    """The old rewards.qa_reward: SearchQATask's EM reward."""
    return SearchQATask(reward="em").score(response, _sample(golds), PROTOCOL)


def qa_f1_reward(response: str, golds) -> Score:
    """The old rewards.qa_f1_reward: SearchQATask's F1 reward."""
    return SearchQATask(reward="f1").score(response, _sample(golds), PROTOCOL)

ANSWER_PARIS = "<answer> The final answer is \\[ \\boxed{Paris} \\] </answer>"


def obs(body: str) -> str:
    return format_observation(body)


# A valid two-search trajectory as the environment assembles it: generated turns + observations.
TWO_SEARCHES = (
    "<think> I need the director of Film X first. </think> <search> Film X director </search>"
    + obs("Page 1: Film X (1999) was directed by Jane Doe.")
    + " <think> Now her birthplace. </think> <search> Jane Doe birthplace </search>"
    + obs("Page 1: Jane Doe was born in Paris.\nPage 2: Paris is the capital of France.")
    + " <think> She was born in Paris. </think> "
    + ANSWER_PARIS
)


# ---------------------------------------------------------------------------------------------
# normalisation and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Quick, Brown Fox!", "quick brown fox"),
        ("Theatre and an apple", "theatre and apple"),  # articles only as whole words
        ("A cat, an owl & the dog.", "cat owl dog"),
        ("the-end", "theend"),  # punctuation is removed before articles
        ("  multiple\n\twhitespace  ", "multiple whitespace"),
        ("ÉCOLE Normale", "école normale"),  # non-ASCII letters are lower-cased and kept
        ("“Paris”", "“paris”"),  # only ASCII punctuation is removed (SQuAD behaviour)
        ("東京 Tower", "東京 tower"),
        ("", ""),
        ("The", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", ["Louvre", "the  Eiffel"]) == 1.0
    assert exact_match("Eiffel Tower", ["Eiffel"]) == 0.0
    assert exact_match("x", []) == 0.0
    assert exact_match("paris", ("London", "Paris")) == 1.0  # any iterable of golds


def test_f1_score_hand_worked() -> None:
    # pred {big, cat} vs gold {big, dog}: 1 common token, P = R = 1/2 -> F1 = 1/2
    assert f1_score("the big cat", "big dog") == pytest.approx(0.5)
    # pred [big, big, cat] vs gold [big, cat]: 2 common, P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("big big cat", "big cat") == pytest.approx(0.8)
    # max over golds
    assert f1_score("the big cat", ["big dog", "Big cat."]) == pytest.approx(1.0)
    assert f1_score("red", "blue") == 0.0
    assert f1_score("red", []) == 0.0


def test_f1_score_empty_strings() -> None:
    assert f1_score("the", "a") == 1.0  # both normalise to empty
    assert f1_score("", "") == 1.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("Paris", "the") == 0.0


# ---------------------------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (ANSWER_PARIS, "Paris"),
        ("<answer> \\boxed{\\text{Paris}} </answer>", "Paris"),
        ("<answer> \\boxed{\\text{New} \\textbf{York}} </answer>", "New York"),
        ("<answer> \\boxed{\\frac{1}{2}} </answer>", "\\frac{1}{2}"),
        ("<answer> \\boxed{\\text{\\textbf{Nile}} river} </answer>", "Nile river"),
        ("<answer> \\boxed{a} then \\boxed{ b } </answer>", "b"),  # last \boxed in the block
        ("<answer> \\boxed{x} </answer> <answer> \\boxed{y} </answer>", "y"),  # last block
        ("<answer> \\boxed {spaced} </answer>", "spaced"),
        ("<answer> \\boxed{a\\}b} </answer>", "a\\}b"),  # escaped braces do not count
        ("<answer> \\boxed{ok} \\boxed{unbalanced </answer>", "ok"),
        ("<answer> \\boxed{} </answer>", ""),
        ("<answer> \\boxed{\\{} </answer>", "\\{"),  # an escape skips one character, not two
        ("<answer> \\boxed{1} </answer> \\boxed{2} </answer>", "1"),  # the block ends at its first </answer>
    ],
)
def test_extract_answer(response: str, expected: str) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        "no answer here \\boxed{Paris}",  # \boxed outside <answer> does not count
        "<answer> Paris </answer>",
        "<answer> \\boxed{Paris </answer>",
        "<answer> \\boxed{Paris}",  # unclosed block
        "",
    ],
)
def test_extract_answer_none(response: str) -> None:
    assert extract_answer(response) is None


def test_extract_answer_degenerate_input_is_linear() -> None:
    # thousands of unclosed \boxed{ (a runaway generation) must not take quadratic time
    response = "<think> t </think> <answer> \\boxed{ok} " + "\\boxed{" * 20_000 + " </answer>"
    start = time.perf_counter()
    assert extract_answer(response) == "ok"
    assert check_format(response) == (True, "")
    # Linear: ~0.07 s on a quiet 2-core machine. A quadratic scan would be ~2e8 Python steps
    # (minutes). 10 s leaves 100x headroom for a loaded CI machine (1 s once failed at load 300).
    assert time.perf_counter() - start < 10.0


# ---------------------------------------------------------------------------------------------
# format rule
# ---------------------------------------------------------------------------------------------


def test_valid_two_search_trajectory() -> None:
    assert check_format(TWO_SEARCHES) == (True, "")


def test_valid_minimal_and_trailers() -> None:
    base = "<think> easy </think> " + ANSWER_PARIS
    assert check_format(base) == (True, "")
    # free text between tags is allowed
    assert check_format("Okay. " + base) == (True, "")
    # whitespace, end-of-sequence markers and punctuation from an overhanging stop token
    for trailer in ["\n", "<|im_end|>", "<|endoftext|>\n", "</s>", ".", ".\n<|im_end|>"]:
        assert check_format(base + trailer) == (True, ""), trailer


def test_valid_search_inside_think_and_python_call() -> None:
    inside = "<think> let me check <search> q </search>" + obs("Page 1: x") + " ok </think> " + ANSWER_PARIS
    assert check_format(inside) == (True, "")
    python = "<think> compute </think> <python>\nprint(2 + 3)\n</python>" + obs("5") + " <think> 5 </think> "
    assert check_format(python + "<answer> \\boxed{5} </answer>") == (True, "")


def test_valid_with_tool_limit_notice_and_error_observation() -> None:
    calls = "".join(
        f"<think> step {i} </think> <search> q{i} </search>" + obs(f"Page 1: p{i}") for i in range(6)
    )
    seventh = "<think> once more </think> <search> q7 </search>" + TOOL_LIMIT_NOTICE
    failed = " <think> retry </think> <search> </search>" + format_error_observation("empty query")
    response = calls + seventh + failed + " <think> fine </think> " + ANSWER_PARIS
    assert check_format(response) == (True, "")


def test_observation_content_is_opaque() -> None:
    # tags inside retrieved text (even a defused "</result>") cannot break the format
    body = "Page 1: <answer> \\boxed{x} </answer> <think> </result> <search>"
    response = "<think> a </think> <search> q </search>" + obs(body) + " <think> b </think> " + ANSWER_PARIS
    assert check_format(response) == (True, "")


def test_empty_boxed_is_valid_format() -> None:
    assert check_format("<think> ? </think> <answer> \\boxed{} </answer>") == (True, "")


T = "<think> t </think> "
SEARCH = "<search> q </search>" + obs("Page 1: r")


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        # <think>
        (ANSWER_PARIS, "missing <think>...</think>"),
        (T + "<think> unfinished " + ANSWER_PARIS, "<answer> inside <think>"),
        (T + "<think> never closed", "unclosed <think>"),
        ("a </think> " + T + ANSWER_PARIS, "</think> without <think>"),
        ("<think> a <think> b </think> </think> " + ANSWER_PARIS, "nested <think>"),
        # <answer>
        (T + "The answer is Paris.", "missing <answer>...</answer>"),
        (T + ANSWER_PARIS + " <answer> \\boxed{Rome} </answer>", "more than one <answer>"),
        (T + "<answer> \\boxed{Paris}", "unclosed <answer>"),
        (T + "\\boxed{Paris} </answer>", "</answer> without <answer>"),
        (T + "<answer> <think> x </think> \\boxed{Paris} </answer>", "<think> inside <answer>"),
        (T + "<answer> The answer is Paris </answer>", "missing \\boxed{} in <answer>"),
        (T + "<answer> \\boxed{Paris </answer>", "missing \\boxed{} in <answer>"),
        # a \boxed{} anywhere but inside <answer> does not count (pinned: accepting one in a think
        # block, before the answer or in an observation survived every other case)
        ("<think> maybe \\boxed{Paris} </think> <answer> Paris </answer>", "missing \\boxed{} in <answer>"),
        (T + "\\boxed{Paris} <answer> Paris </answer>", "missing \\boxed{} in <answer>"),
        (T + "<search> q </search>" + obs("Page 1: \\boxed{Paris}") + " " + T + "<answer> Paris </answer>",
         "missing \\boxed{} in <answer>"),
        (T + ANSWER_PARIS + " Hope this helps!", "text after </answer>"),
        (T + ANSWER_PARIS + " <think> more </think>", "text after </answer>"),
        # tool calls and observations
        (T + "<search> q", "unclosed <search>"),
        (T + "<search> q " + ANSWER_PARIS, "<answer> inside <search>"),
        (T + "<search> q </search> " + ANSWER_PARIS, "<search> call not followed by <result>"),
        (T + "<search> q </search>", "<search> call not followed by <result>"),
        (T + "<python> 1 </python> " + T + ANSWER_PARIS, "<python> call not followed by <result>"),
        (T + "q </search>" + obs("r") + " " + ANSWER_PARIS, "</search> without <search>"),
        (T + "<result> made up </result> " + ANSWER_PARIS, "<result> without a preceding tool call"),
        (T + SEARCH + obs("again") + " " + ANSWER_PARIS, "<result> without a preceding tool call"),
        (T + "<search> q </search> <result> cut off", "unclosed <result>"),
        (T + SEARCH + " </result> " + ANSWER_PARIS, "</result> without <result>"),
        (T + "<search> q <python> x </python>", "<python> inside <search>"),
    ],
)
def test_format_violations(response: str, reason: str) -> None:
    assert check_format(response) == (False, reason)


# ---------------------------------------------------------------------------------------------
# rewards and registry
# ---------------------------------------------------------------------------------------------


def test_qa_reward_valid_correct_and_wrong() -> None:
    assert qa_reward(TWO_SEARCHES, ["paris", "Paris, France"]) == Score(
        reward=1.0, metrics={"em": 1.0, "f1": 1.0, "format_ok": 1.0}, answer="Paris", reason=""
    )
    wrong = qa_reward(TWO_SEARCHES, "Lyon")
    assert (wrong.reward, wrong.metrics["em"], wrong.metrics["f1"], wrong.metrics["format_ok"]) == (
        0.0, 0.0, 0.0, 1.0
    )
    assert (wrong.answer, wrong.reason) == ("Paris", "")


def test_qa_reward_invalid_format_is_minus_one() -> None:
    # correct answer but no <think>: reward -1; EM/F1 are still reported as metrics
    out = qa_reward(ANSWER_PARIS, "Paris")
    assert out == Score(
        reward=-1.0,
        metrics={"em": 1.0, "f1": 1.0, "format_ok": 0.0},
        answer="Paris",
        reason="missing <think>...</think>",
    )
    truncated = qa_reward("<think> searching <search> Jane", "Paris")
    assert (truncated.reward, truncated.metrics["em"], truncated.metrics["f1"], truncated.answer) == (
        -1.0, 0.0, 0.0, None
    )
    assert truncated.metrics["format_ok"] == 0.0
    assert truncated.reason == "unclosed <search>"


def test_qa_f1_reward() -> None:
    response = "<think> t </think> <answer> \\boxed{the big cat} </answer>"
    out = qa_f1_reward(response, "big dog")
    assert (out.reward, out.metrics["em"], out.metrics["f1"]) == (pytest.approx(0.5), 0.0, pytest.approx(0.5))
    assert qa_f1_reward(ANSWER_PARIS, "Paris").reward == -1.0


def test_score_metrics_keys_follow_task_metrics() -> None:
    out = qa_reward(TWO_SEARCHES, "Paris")
    assert tuple(out.metrics) == SearchQATask.metrics == ("em", "f1", "format_ok")
    assert all(type(v) is float for v in out.metrics.values())


def test_registry() -> None:
    # The reward is a task option now (task.options.reward), replacing the old reward registry.
    assert TASKS["search_qa"] is SearchQATask
    assert SearchQATask().reward == "em"
    assert build_task("search_qa").reward == "em"
    assert build_task("search_qa", reward="f1").reward == "f1"
    assert isinstance(build_task("search_qa", reward="f1"), SearchQATask)
    with pytest.raises(ValueError, match="em, f1") as err:
        SearchQATask(reward="accuracy")
    assert "'accuracy'" in str(err.value)
    with pytest.raises(ValueError, match="em, f1") as err:
        build_task("search_qa", reward="accuracy")
    assert "'accuracy'" in str(err.value)
    with pytest.raises(ValueError, match="search_qa"):
        build_task("search_qa", metric="em")  # an option the task does not take


# ---------------------------------------------------------------------------------------------
# format rule for other tool sets
# ---------------------------------------------------------------------------------------------


def test_check_format_custom_tool() -> None:
    calc = (
        "<think> add </think> <calc> 1+1 </calc>" + obs("2") + " <think> two </think> <answer> \\boxed{2} </answer>"
    )
    assert check_format(calc, tool_names=("calc",)) == (True, "")
    # with the default tools, <calc> is plain text and its <result> follows no tool call
    assert check_format(calc) == (False, "<result> without a preceding tool call")
    # <search> is plain text when only calc is enabled
    plain_search = T + "<search> q </search> " + ANSWER_PARIS
    assert check_format(plain_search, tool_names=("calc",)) == (True, "")
    assert check_format(plain_search) == (False, "<search> call not followed by <result>")
    assert check_format(T + "<search> q " + ANSWER_PARIS, tool_names=("calc",)) == (True, "")
    # but a search observation has no preceding (enabled) tool call
    assert check_format(TWO_SEARCHES, tool_names=("calc",)) == (False, "<result> without a preceding tool call")
    # the calc rules are those of any tool
    assert check_format(T + "<calc> 1+1 </calc> " + ANSWER_PARIS, tool_names=("calc",)) == (
        False, "<calc> call not followed by <result>"
    )
    assert check_format(T + "<calc> 1 <answer> \\boxed{1} </answer>", tool_names=("calc",)) == (
        False, "<answer> inside <calc>"
    )
    assert check_format(T + "<calc> 1", tool_names=("calc",)) == (False, "unclosed <calc>")


def test_check_format_without_tools() -> None:
    base = "<think> easy </think> " + ANSWER_PARIS
    assert check_format(base, tool_names=()) == (True, "")
    assert check_format(T + "<result> made up </result> " + ANSWER_PARIS, tool_names=()) == (
        False, "<result> without a preceding tool call"
    )
    assert check_format(TWO_SEARCHES, tool_names=()) == (False, "<result> without a preceding tool call")
    # tool tags are plain text without tools
    assert check_format(T + "<search> q </search> " + ANSWER_PARIS, tool_names=()) == (True, "")
    assert AgentProtocol([]).check_format(TWO_SEARCHES) == (False, "<result> without a preceding tool call")


def test_protocol_check_format_is_check_format_of_its_tools() -> None:
    assert PROTOCOL.check_format(TWO_SEARCHES) == check_format(TWO_SEARCHES) == (True, "")
    python = "<think> compute </think> <python>\nprint(2 + 3)\n</python>" + obs("5") + " <answer> \\boxed{5} </answer>"
    assert PROTOCOL.check_format(python) == (True, "")
    assert AgentProtocol([LocalSearchTool]).check_format(python) == (False, "<result> without a preceding tool call")
