"""Scoring helpers that tasks build their rewards from (docs/method.md §1, paper Eqs. 14-16).

All functions work on the decoded RESPONSE text: everything after the prompt, i.e. the policy's
turns interleaved with the observation blocks (`` <result>\\n...\\n</result>``) that the
environment inserted after each tool call. The rollout engine passes each observation block
empty, so only the policy's own tokens can be an answer (docs/method.md §1). Pure text; no torch. The rewards themselves belong
to the tasks (``at2po.tasks``): the paper's is

    reward = EM(answer, golds)  if the response format is valid
           = -1                  otherwise
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

__all__ = [
    "BUILTIN_TOOLS",
    "check_format",
    "exact_match",
    "extract_answer",
    "f1_score",
    "normalize_answer",
]

Golds = str | Iterable[str]

# ---------------------------------------------------------------------------------------------
# SQuAD-style answer normalisation and metrics
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    This is the standard SQuAD normalisation (the order matters: punctuation goes before
    articles, so "the-end" becomes "theend"). Only ASCII punctuation is removed, as in the
    reference metric; non-ASCII letters are lower-cased and kept.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def _as_gold_list(golds: Golds) -> list[str]:
    # Datasets store golds as a str, a list, or a numpy array of str: accept any iterable.
    if isinstance(golds, str):
        return [golds]
    return [str(g) for g in golds]


def exact_match(prediction: str, golds: Golds) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_gold_list(golds)))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty -> 1.0, one empty -> 0.0
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Golds) -> float:
    """Token-level F1 after normalisation, maximised over the gold answers (0.0 if none)."""
    return max((_token_f1(prediction, g) for g in _as_gold_list(golds)), default=0.0)


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\boxed\s*\{")
# Text-style wrappers that carry no meaning for the answer string.
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{")


def _matching_braces(s: str) -> dict[int, int]:
    """Map the index of every balanced '{' to the index of its '}' in one pass (a degenerate
    response with thousands of unclosed ``\\boxed{`` must not cost quadratic time).
    Escaped braces (``\\{``, ``\\}``) are literal characters and do not count.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _last_boxed(s: str) -> str | None:
    """Raw content of the last balanced ``\\boxed{...}`` in ``s``, or None."""
    pairs = _matching_braces(s)
    for m in reversed(list(_BOXED_RE.finditer(s))):
        close = pairs.get(m.end() - 1)
        if close is not None:
            return s[m.end() : close]
    return None


def _unwrap_text_commands(s: str) -> str:
    """Replace every balanced ``\\text{X}`` (and similar wrappers) by ``X``."""
    pairs = _matching_braces(s)
    drop: set[int] = set()
    for m in _TEXT_WRAPPER_RE.finditer(s):
        close = pairs.get(m.end() - 1)
        if close is not None:
            drop.update(range(m.start(), m.end()))
            drop.add(close)
    return "".join(ch for i, ch in enumerate(s) if i not in drop)


def _last_answer_block(response: str) -> str | None:
    """Content of the last closed ``<answer>...</answer>`` block, or None."""
    start = response.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = response.find("</answer>", start)
    if end < 0:
        return None
    return response[start:end]


def extract_answer(response: str) -> str | None:
    """The final answer: the last balanced ``\\boxed{...}`` inside the last closed
    ``<answer>...</answer>`` block, with ``\\text{}``-style wrappers removed and whitespace
    stripped. None when there is no such block or no balanced ``\\boxed{}`` in it.
    """
    block = _last_answer_block(response)
    if block is None:
        return None
    boxed = _last_boxed(block)
    if boxed is None:
        return None
    return _unwrap_text_commands(boxed).strip()


# ---------------------------------------------------------------------------------------------
# Format check
# ---------------------------------------------------------------------------------------------

BUILTIN_TOOLS = ("search", "python")  # the tool tags check_format knows when none are given


@lru_cache(maxsize=64)
def _tag_re(tool_names: tuple[str, ...]) -> re.Pattern[str]:
    names = "|".join(re.escape(n) for n in ("think", *tool_names, "result", "answer"))
    return re.compile(rf"</?(?:{names})>")

# End-of-sequence markers a caller may have decoded (<|im_end|>, <|endoftext|>, </s>, ...).
_EOS_MARKER_RE = re.compile(r"<\|[^<>|\s]*\|>|</s>|<eos>|<end_of_turn>")


def _tags(response: str, tag_re: re.Pattern[str]) -> tuple[list[tuple[str, int, int]], str | None]:
    """The response's tags in order as (tag, start, end), e.g. ("<search>", 10, 18).

    A whole observation block ``<result>...</result>`` is ONE "<result>" entry: its content is
    skipped, so tags quoted in retrieved passages or tool output cannot break the format, and
    any "</result>" entry left over is unmatched. The second element is an error reason when a
    ``<result>`` block is never closed.
    """
    tags: list[tuple[str, int, int]] = []
    pos = 0
    while (m := tag_re.search(response, pos)) is not None:
        end = m.end()
        if m.group(0) == "<result>":
            close = response.find("</result>", end)
            if close < 0:
                return tags, "unclosed <result>"
            end = close + len("</result>")
        tags.append((m.group(0), m.start(), end))
        pos = end
    return tags, None


def check_format(response: str, tool_names: Sequence[str] = BUILTIN_TOOLS) -> tuple[bool, str]:
    """Check the format rule of docs/method.md §1 on a decoded response, for an agent whose
    tools are ``tool_names``. Returns (valid, reason); reason is "" when valid, otherwise says
    what is wrong.

    The response is read as a sequence of tags (free text between tags is allowed):
      * ``<think>...</think>``: at least one pair; pairs do not nest and are all closed.
      * tool calls: ``<search>`` must be followed, as the next tags, by ``</search>``,
        ``<result>``, ``</result>``; the same for every tool's tag. Tags of tools that are not
        enabled are plain text. Tool calls may sit
        inside a think block (the paper's rule allows it). Tags inside the query are invalid.
      * ``<result>...</result>`` is an observation: it must directly follow a tool call
        (next tag after ``</search>``/``</python>``) and its content is not inspected, so the
        environment's error messages and the tool-limit notice (also wrapped in ``<result>``)
        keep the trajectory valid.
      * exactly one ``<answer>...</answer>``, outside any think block, with no tags inside and a
        balanced ``\\boxed{...}`` in it (empty content is allowed: it just scores EM 0).
      * after ``</answer>`` only whitespace, punctuation or end-of-sequence markers
        (``<|im_end|>``, ``</s>``...): no words, no tags.
    """
    tool_names = tuple(tool_names)
    openers = {f"<{n}>" for n in tool_names}
    closers = {f"</{n}>" for n in tool_names}
    tags, error = _tags(response, _tag_re(tool_names))
    if error:
        return False, error

    in_think = False
    open_tool: str | None = None  # tool whose closing tag we wait for
    awaiting_result: str | None = None  # tool that was closed and needs its <result>
    think_pairs = 0
    answer_span: tuple[int, int] | None = None  # (content start, content end)
    answer_open_at: int | None = None

    for tag, start, end in tags:
        if answer_open_at is not None and tag != "</answer>":
            return False, f"{tag} inside <answer>"
        if open_tool is not None and tag != f"</{open_tool}>":
            return False, f"{tag} inside <{open_tool}>"
        if awaiting_result is not None and tag != "<result>":
            return False, f"<{awaiting_result}> call not followed by <result>"

        if tag == "<think>":
            if in_think:
                return False, "nested <think>"
            in_think = True
        elif tag == "</think>":
            if not in_think:
                return False, "</think> without <think>"
            in_think = False
            think_pairs += 1
        elif tag in openers:
            open_tool = tag[1:-1]
        elif tag in closers:
            if open_tool is None:
                return False, f"{tag} without {tag.replace('/', '')}"
            awaiting_result, open_tool = open_tool, None
        elif tag == "<result>":
            if awaiting_result is None:
                return False, "<result> without a preceding tool call"
            awaiting_result = None
        elif tag == "</result>":
            return False, "</result> without <result>"
        elif tag == "<answer>":
            if answer_span is not None:
                return False, "more than one <answer>"
            if in_think:
                return False, "<answer> inside <think>"
            answer_open_at = end
        elif tag == "</answer>":
            if answer_open_at is None:
                return False, "</answer> without <answer>"
            answer_span = (answer_open_at, start)
            answer_open_at = None

    if open_tool is not None:
        return False, f"unclosed <{open_tool}>"
    if awaiting_result is not None:
        return False, f"<{awaiting_result}> call not followed by <result>"
    if answer_open_at is not None:
        return False, "unclosed <answer>"
    if in_think:
        return False, "unclosed <think>"
    if think_pairs == 0:
        return False, "missing <think>...</think>"
    if answer_span is None:
        return False, "missing <answer>...</answer>"
    if _last_boxed(response[answer_span[0] : answer_span[1]]) is None:
        return False, "missing \\boxed{} in <answer>"
    # Punctuation may trail because the token that completes the stop string can overhang it
    # (e.g. the token ">." ends "</answer>."); words or tags after the answer are invalid.
    trailer = _EOS_MARKER_RE.sub("", response[answer_span[1] + len("</answer>") :])
    if any(ch.isalnum() or ch in "<>" for ch in trailer):
        return False, "text after </answer>"
    return True, ""
