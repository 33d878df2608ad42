"""Hand-worked checks of the authors' scorer as reimplemented in at2po.tasks.atpo_scorer.

Every expected (score, EM) below was derived by hand from the rules in that module's docstring
(rule numbers in the comments). Responses are built as our engine assembles them: generated
turns plus observation blocks `` <result>\\n...\\n</result>``.
"""

from __future__ import annotations

import pytest

from at2po.agent import AgentProtocol, format_observation
from at2po.tasks.atpo_scorer import (
    atpo_check_format,
    atpo_em,
    atpo_em_eval,
    atpo_extract_answer,
    atpo_f1,
    atpo_format_ok,
    atpo_normalize,
    atpo_score,
)
from at2po.tasks.base import Sample, build_task
from at2po.tasks.search_qa import REWARD_METRICS, SearchQATask
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import LocalSearchTool

PROTOCOL = AgentProtocol([LocalSearchTool, PythonTool])

T = "<think> t </think> "
SEARCH = "<search> capital of France </search>" + format_observation("Paris is the capital of France.")
PYTHON = "<python> print(2 + 2) </python>" + format_observation("4")


def A(boxed: str) -> str:  # noqa: N802 -- reads like a tag
    return f"<answer> {boxed} </answer>"


PARIS = A("\\boxed{Paris}")
TWO_P = (2 * 0.5 * 1.0) / (0.5 + 1.0)  # F1 of "Paris France" vs "Paris": P = 1/2, R = 1

# (id, response, golds, expected (score, EM) in training mode, expected (score, EM) in eval mode)
CASES = [
    # --- the plain cases -------------------------------------------------------------------
    ("search_correct", T + SEARCH + T + PARIS, "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("no_tool_correct", T + PARIS, "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("wrong_answer", T + SEARCH + T + A("\\boxed{London}"), "Paris", (0.0, 0.0), (0.0, 0.0)),
    ("several_golds", T + A("\\boxed{France}"), ("Paris", "France"), (1.0, 1.0), (1.0, 1.0)),
    # --- multi-tool bonus (rule 11) ----------------------------------------------------------
    ("both_tools_correct", T + SEARCH + T + PYTHON + T + PARIS, "Paris", (1.1, 1.0), (1.1, 1.0)),
    ("python_only_correct", T + PYTHON + T + PARIS, "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("both_tools_wrong", T + SEARCH + PYTHON + T + A("\\boxed{London}"), "Paris", (0.0, 0.0), (0.0, 0.0)),
    # partial answer: F1 = 2/3 > 0, so both tools give F1 + 0.1 while one tool gives EM = 0
    ("both_tools_partial", T + SEARCH + PYTHON + T + A("\\boxed{Paris France}"), "Paris",
     (TWO_P + 0.1, 0.0), (TWO_P + 0.1, 0.0)),
    ("one_tool_partial", T + SEARCH + T + A("\\boxed{Paris France}"), "Paris", (0.0, 0.0), (0.0, 0.0)),
    # the bonus looks for the closing tags anywhere, observation text included
    ("closing_python_tag_in_result", T + "<search> q </search>" + format_observation("see </python> docs") + T + PARIS,
     "Paris", (1.1, 1.0), (1.1, 1.0)),
    # one <result> shared by a search and a python call satisfies both call checks (rule 3)
    ("shared_result", T + "<search> q </search> <python> x </python>" + format_observation("r") + T + PARIS,
     "Paris", (1.1, 1.0), (1.1, 1.0)),
    # --- think tags (rule 1) -------------------------------------------------------------------
    ("no_think", SEARCH + PARIS, "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("unpaired_think", "<think> a </think> <think> b " + PARIS, "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("reversed_think_pair", "</think> a <think> " + PARIS, "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("answer_inside_think", "<think> so " + PARIS + " </think>", "Paris", (1.0, 1.0), (1.0, 1.0)),
    # --- tool call / result order (rule 3) -------------------------------------------------------
    ("search_without_result", T + "<search> q </search> " + T + PARIS, "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("result_inside_search", T + "<search> q" + format_observation("doc") + " </search> " + PARIS,
     "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("double_search_opener", T + "<search> a <search> b </search>" + format_observation("doc") + T + PARIS,
     "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("result_without_call", T + format_observation("stray") + T + PARIS, "Paris", (1.0, 1.0), (1.0, 1.0)),
    # tags quoted inside an observation count: a "<python>" with no "</python>" anywhere fails
    ("python_tag_in_result", T + "<search> q </search>" + format_observation("the <python> module") + T + PARIS,
     "Paris", (-1.0, 0.0), (1.0, 1.0)),
    # ... and an "<answer>" in a passage makes two <answer> tags (rule 2); eval reads the first
    # block, which runs from the quoted tag to the real </answer> and still ends in \boxed{Paris}
    ("answer_tag_in_result", T + "<search> q </search>" + format_observation("wrap it in <answer> tags") + T + PARIS,
     "Paris", (-1.0, 0.0), (1.0, 1.0)),
    # --- answer blocks (rules 2, 4, 5) ----------------------------------------------------------
    ("two_answer_blocks", T + A("\\boxed{London}") + " " + PARIS, "Paris", (-1.0, 0.0), (0.0, 0.0)),
    ("think_tag_after_answer", T + PARIS + " Hope this helps! <think>", "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("words_after_answer", T + PARIS + " Hope this helps.", "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("answer_tags_reversed", T + "</answer> \\boxed{Paris} <answer>", "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    ("no_answer", T + SEARCH + T, "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    ("no_box", T + A("Paris"), "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    # --- \boxed forms (rules 4, 6, 7) -------------------------------------------------------------
    ("boxed_space", T + A("\\boxed Paris"), "Paris", (-1.0, 0.0), (1.0, 1.0)),
    ("boxed_space_to_dollar", T + A("$\\boxed Paris$ is the capital"), "Paris", (-1.0, 0.0), (1.0, 1.0)),
    # without "$" the space form keeps everything to the end of the block: "paris is capital"
    ("boxed_space_trailing_words", T + A("\\boxed Paris is the capital"), "Paris", (-1.0, 0.0), (0.0, 0.0)),
    ("boxed_space_display_math", T + A("\\[ \\boxed Paris \\]"), "Paris", (-1.0, 0.0), (1.0, 1.0)),
    # a "\boxed " anywhere in the block wins over a \boxed{...}; the format passes on \boxed{London}
    ("boxed_space_beats_braces", T + A("\\boxed{London} or \\boxed Paris"), "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("boxed_text", T + A("\\boxed{\\text{Paris}}"), "Paris", (0.0, 0.0), (0.0, 0.0)),  # "textparis"
    ("boxed_nested_braces", T + A("\\boxed{{Paris}}"), "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("last_box_wins", T + A("\\boxed{London} then \\boxed{Paris}"), "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("last_box_wins_wrong", T + A("\\boxed{Paris} then \\boxed{London}"), "Paris", (0.0, 0.0), (0.0, 0.0)),
    ("display_math", T + A("The final answer is \\[ \\boxed{Paris} \\]"), "Paris", (1.0, 1.0), (1.0, 1.0)),
    ("fbox", T + A("\\fbox{Paris}"), "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    ("unbalanced_no_brace", T + A("\\boxed{Paris"), "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    # a "}" elsewhere in the block lets the format pass; the brace scan still finds no close
    ("unbalanced_with_brace", T + A("\\text{x} \\boxed{Paris"), "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    ("boxed_newline_brace", T + A("\\boxed\n{Paris}"), "Paris", (-1.0, 0.0), (-1.0, 0.0)),
    # --- normalisation and F1 (rules 8-11) --------------------------------------------------------
    # both sides normalise to "": EM 1 but F1 0, so the score is 0
    ("empty_after_normalising", T + A("\\boxed{The}"), "the", (0.0, 1.0), (0.0, 1.0)),
    # "no" vs "no way": F1 is forced to 0 (yes/no rule), so even both tools give 0
    ("polar_answer", T + SEARCH + PYTHON + T + A("\\boxed{no}"), "no way", (0.0, 0.0), (0.0, 0.0)),
    ("polar_correct", T + SEARCH + PYTHON + T + A("\\boxed{Yes.}"), "yes", (1.1, 1.0), (1.1, 1.0)),
]


@pytest.mark.parametrize(
    ("response", "golds", "train", "evaluation"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hand_worked_table(response: str, golds, train: tuple[float, float], evaluation: tuple[float, float]) -> None:
    score, em, _ = atpo_em(response, golds)
    assert (score, em) == (pytest.approx(train[0]), train[1])
    score, em, _ = atpo_em_eval(response, golds)
    assert (score, em) == (pytest.approx(evaluation[0]), evaluation[1])


def test_table_size() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (PARIS, "Paris"),
        (A("\\boxed{\\text{Paris}}"), "\\text{Paris}"),  # not unwrapped
        (A("\\boxed{ Paris }"), " Paris "),  # not stripped
        (A("\\boxed Paris"), "Paris "),  # to the end of the block
        (A("$\\boxed Paris$ indeed"), "Paris"),
        (A("\\boxed{a} \\boxed{b}") + A("\\boxed{c}"), "b"),  # first block, last box
        (A("\\boxed{\\boxed{Paris}}"), "Paris"),  # the last \boxed is the inner one
        (A("\\boxed{\\{x\\}}"), "\\{x\\}"),  # escaped braces are counted like any brace
        (A("\\fbox{Paris}"), None),
        (A("\\boxed{Paris"), None),
        (A("Paris"), None),
        ("<answer> \\boxed{Paris}", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert atpo_extract_answer(response) == expected


def test_format_reasons() -> None:
    assert atpo_check_format(T + SEARCH + T + PARIS) == (True, "")
    assert atpo_check_format(PARIS) == (False, "no <think>")
    assert atpo_check_format("<think> " + PARIS) == (False, "<think> and </think> counts differ")
    assert atpo_check_format(T + PARIS + PARIS)[1] == "not exactly one <answer> and one </answer>"
    assert atpo_check_format(T + "<python> x </python> " + PARIS)[1] == "python/result tags are incomplete"
    assert atpo_check_format(T + "<search> q" + format_observation("d") + "</search>" + PARIS)[1] == (
        "search/result tags are in the wrong order"
    )
    assert atpo_check_format(T + A("\\boxed Paris"))[1] == "no \\boxed{} in <answer>"
    assert atpo_format_ok(T + A("{} \\boxed{Paris"))  # any "}" in the block will do
    assert not atpo_format_ok(T + A("\\boxed{Paris") + "}")  # ... but it must be in the block


def test_normalize_and_f1() -> None:
    assert atpo_normalize("The Eiffel-Tower!") == "eiffeltower"
    assert atpo_normalize("\\text{Paris}") == "textparis"
    assert atpo_normalize("the—end") == "—end"  # word boundary at a non-ASCII dash
    assert atpo_f1("the big cat", ["big dog", "red"]) == pytest.approx(0.5)
    assert atpo_f1("yes", "yes sir") == 0.0
    assert atpo_f1("", "") == 0.0


def test_score_details() -> None:
    out = atpo_score("<think> t </think>" + A("\\boxed{Paris}"), "Paris")
    assert (out.score, out.em, out.f1, out.answer, out.format_ok, out.reason) == (1.0, 1.0, 1.0, "Paris", True, "")
    bad = atpo_score(PARIS, "Paris")
    assert (bad.score, bad.answer, bad.format_ok, bad.reason) == (-1.0, None, False, "bad format: no <think>")
    ev = atpo_score(PARIS, "Paris", validate=True)
    assert (ev.score, ev.answer, ev.format_ok) == (1.0, "Paris", False)
    assert ev.reason.startswith("bad format (not enforced)")


# ---------------------------------------------------------------------------------------------
# through the task
# ---------------------------------------------------------------------------------------------


def _sample(golds) -> Sample:
    return Sample("q0", "What is the capital of France?", tuple(golds))


def test_task_atpo_em_both_tools() -> None:
    out = SearchQATask(reward="atpo_em").score(T + SEARCH + T + PYTHON + T + PARIS, _sample(["Paris"]), PROTOCOL)
    assert out.reward == pytest.approx(1.1)
    assert out.metrics == {"em": 1.0, "f1": 1.0, "format_ok": 1.0}
    assert tuple(out.metrics) == SearchQATask.metrics
    assert (out.answer, out.reason) == ("Paris", "")


def test_task_atpo_em_text_box_and_partial() -> None:
    response = T + SEARCH + T + A("\\boxed{\\text{Paris}}")
    out = SearchQATask(reward="atpo_em").score(response, _sample(["Paris"]), PROTOCOL)
    assert (out.reward, out.metrics, out.answer) == (0.0, {"em": 0.0, "f1": 0.0, "format_ok": 1.0}, "\\text{Paris}")
    assert SearchQATask(reward="em").score(response, _sample(["Paris"]), PROTOCOL).reward == 1.0  # ours unwraps
    # f1 is OUR F1 of their answer; the reward uses theirs (same value here) plus the bonus
    partial = SearchQATask(reward="atpo_em").score(
        T + SEARCH + PYTHON + T + A("\\boxed{Paris France}"), _sample(["Paris"]), PROTOCOL
    )
    assert partial.reward == pytest.approx(TWO_P + 0.1)
    assert partial.metrics == {"em": 0.0, "f1": pytest.approx(TWO_P), "format_ok": 1.0}


def test_task_atpo_em_bad_format_and_eval() -> None:
    response = SEARCH + PARIS  # no think
    out = SearchQATask(reward="atpo_em").score(response, _sample(["Paris"]), PROTOCOL)
    assert (out.reward, out.metrics, out.answer) == (-1.0, {"em": 0.0, "f1": 0.0, "format_ok": 0.0}, None)
    assert out.reason == "bad format: no <think>"
    ev = SearchQATask(reward="atpo_em_eval").score(response, _sample(["Paris"]), PROTOCOL)
    assert (ev.reward, ev.metrics, ev.answer) == (1.0, {"em": 1.0, "f1": 1.0, "format_ok": 0.0}, "Paris")
    assert all(type(v) is float for v in ev.metrics.values())


def test_reward_choices() -> None:
    assert REWARD_METRICS == ("em", "f1", "atpo_em", "atpo_em_eval")
    assert SearchQATask().reward == "em"
    assert build_task("search_qa", reward="atpo_em_eval").reward == "atpo_em_eval"
    with pytest.raises(ValueError, match="em, f1, atpo_em, atpo_em_eval") as err:
        build_task("search_qa", reward="nope")
    assert "'nope'" in str(err.value)
