"""The authors' reward, reimplemented rule for rule (quirks included) to compare with the paper.

``SearchQATask(reward="atpo_em")`` trains on it and ``reward="atpo_em_eval"`` reports it the way
the authors' validation loop does. Our own scorer (``at2po.rewards``: ``check_format`` +
``extract_answer`` + EM) stays the default: it is stricter and has none of the quirks below.
Pure text functions, no torch. Written from a reading of the authors' reference scorer; no code
of theirs is reused.

What the scorer reads
---------------------
In the authors' pipeline the reward function gets the decoded RESPONSE only (the prompt is
decoded separately and not passed), i.e. every generated turn plus the observation blocks
`` <result>\\n...\\n</result>`` their environment inserted after each tool call, decoded with
special tokens skipped, so a passage that quotes ``<answer> \\boxed{x} </answer>`` can be scored
as the answer. Our functions read whatever text they are given; the engine gives them the
policy's own tokens with every observation an empty ``<result>`` block (pad/EOS removed, other
special tokens kept, which changes nothing here because only the literal tags below are looked
at), unless ``task.options.score_observations`` asks for the whole response as theirs reads it
(docs/method.md §6.7). Their scorer also strips a trailing
EOS string after the format check; with special tokens skipped there is none, and nothing below
depends on the end of the text, so that step is left out.

Their rules (training mode, ``atpo_em``)
-----------------------------------------
Format (``atpo_check_format``), checked in this order on the WHOLE response, observation
contents included; the first failing rule gives score -1 and EM 0:

1. ``<think>`` and ``</think>`` occur equally often (counted as substrings; their order and
   nesting are not checked, so ``</think> ... <think>`` passes), and at least once.
2. ``<answer>`` and ``</answer>`` occur exactly once each.
3. For each tool tag, first ``search`` then ``python``: scanning from the start, every ``<tag>``
   needs a ``</tag>`` after it, a ``<result>`` after it and a ``</result>`` after that
   ``<result>``, with ``</tag>`` before ``<result>``; the scan resumes after that
   ``</result>``. So a call without observation fails, and so does a ``<result>`` inside the
   call; but a second ``<tag>`` before the first ``</tag>``, a stray ``</tag>``, a ``<result>``
   with no call, or one ``<result>`` shared by a ``<search>`` and a ``<python>`` call all pass,
   and a tool tag quoted in an observation (e.g. ``<python>`` in a retrieved passage) is taken
   as a call.
4. ``<answer>`` comes before ``</answer>``; the text from ``<answer>`` to ``</answer>``
   contains ``\\boxed{`` and, anywhere, a ``}``. Nothing else: the answer may sit inside a
   think block, and any text may follow ``</answer>``.

Answer (``atpo_extract_answer``):

5. The block is the text between the FIRST ``<answer>`` and the next ``</answer>``.
6. If the block contains ``\\boxed`` followed by a space anywhere, the answer is the text after
   the LAST ``\\boxed `` up to the first ``$`` (or the end of the block), taken as is: this
   wins over any ``\\boxed{...}``, and trailing words or ``\\]`` stay in the answer.
7. Otherwise the last ``\\boxed`` (or, only if there is none, the last ``\\fbox``) starts a
   brace scan: ``{`` counts +1, ``}`` counts -1 (escaped braces included), and the first ``}``
   that brings the count back to 0 closes it. The answer is what lies between ``\\boxed{`` and
   that ``}``, verbatim: ``\\text{}`` and other commands are NOT unwrapped and no whitespace is
   stripped. No closing brace (unbalanced), ``\\fbox``, or anything between ``\\boxed`` and
   ``{`` (``\\boxed\\n{``) is an extraction error: score -1, EM 0.

Scoring (``atpo_score``):

8. Normalisation is SQuAD's (lower-case, drop ASCII punctuation, drop a/an/the, collapse
   whitespace), so ``\\text{Paris}`` becomes "textparis".
9. EM: 1 if the normalised answer equals any normalised gold.
10. F1: token F1, maximised over golds; a gold is skipped (F1 0) when the answer or that gold
    normalises to "yes", "no" or "noanswer" and the two differ, and when they share no token
    (so two answers that both normalise to "" have EM 1 but F1 0).
11. Score: F1 + 0.1 if F1 > 0 and the response contains both ``</search>`` and ``</python>``
    (anywhere, observation contents included); else EM if F1 > 0; else 0. So a partly right
    answer scores 0 with one tool but F1 + 0.1 with both, and a fully right one 1.1.

Validation mode (``atpo_em_eval``)
-----------------------------------
The same computation with rules 1-4 not enforced (their verdict is still computed; we report
it as ``format_ok``). It is NOT plain EM: score is -1 when there is no ``<answer>...</answer>``
or the box cannot be extracted (rules 5-7), and rule 11 applies, bonus included (1.1, or
F1 + 0.1). With several answer blocks the first one counts. The authors log this score as the
validation reward, and EM alongside it.

Differences to our scorer (``at2po.rewards``)
----------------------------------------------
* Ours parses tags in order (think pairs must nest properly, each call must be followed
  directly by its ``<result>``, tags inside ``<result>`` blocks are skipped, tools that are not
  enabled are plain text); theirs counts and searches substrings over the whole text, quoted
  tags included, and always knows exactly ``search`` and ``python``.
* Ours rejects an answer inside ``<think>``, tags inside ``<answer>`` and words after
  ``</answer>``; theirs allows all three.
* Ours uses the LAST answer block and the last balanced ``\\boxed{...}`` (``\\boxed Paris``,
  ``\\fbox`` and unbalanced boxes give no answer), unwraps ``\\text{}``-style commands, treats
  ``\\{``/``\\}`` as literal and strips whitespace; theirs as in rules 5-7.
* Our F1 gives 1 when both sides normalise to ""; it has no yes/no rule. Our reward is EM (or
  F1) with no tool bonus and never exceeds 1.

Environment differences (not the scorer's): their rollout appends a plain-text notice (no
``<result>``) when the tool-call limit is hit, ends a trajectory on an empty query or a failed
tool, and does not stop at ``</answer>``; ours wraps every notice or error in ``<result>`` and
stops at ``</answer>``. Scores of such trajectories are therefore not comparable one to one.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AtpoScore",
    "atpo_check_format",
    "atpo_em",
    "atpo_em_eval",
    "atpo_exact_match",
    "atpo_extract_answer",
    "atpo_f1",
    "atpo_format_ok",
    "atpo_normalize",
    "atpo_score",
]

MULTI_TOOL_BONUS = 0.1  # added to F1 when both </search> and </python> occur (rule 11)
_TOOL_TAGS = ("search", "python")  # rule 3: fixed, whatever tools the agent has
_POLAR = frozenset({"yes", "no", "noanswer"})  # rule 10
_PUNCT = frozenset(string.punctuation)
_ARTICLE_RE = re.compile(r"\b(?:a|an|the)\b")  # word boundaries, so "the—end" loses "the"


# ---------------------------------------------------------------------------------------------
# format (rules 1-4)
# ---------------------------------------------------------------------------------------------


def _tool_calls_ok(text: str, tag: str) -> str:
    """Rule 3 for one tool tag: "" when it holds, else the reason."""
    opener, closer = f"<{tag}>", f"</{tag}>"
    pos = 0
    while (call := text.find(opener, pos)) >= 0:
        close = text.find(closer, call)
        obs = text.find("<result>", call)
        obs_end = text.find("</result>", obs) if obs >= 0 else -1
        if close < 0 or obs < 0 or obs_end < 0:
            return f"{tag}/result tags are incomplete"
        if close > obs:
            return f"{tag}/result tags are in the wrong order"
        pos = obs_end
    return ""


def atpo_check_format(response: str) -> tuple[bool, str]:
    """The authors' format verdict (rules 1-4 of the module docstring): (valid, reason), reason
    "" when valid."""
    n_think, n_unthink = response.count("<think>"), response.count("</think>")
    if n_think != n_unthink:
        return False, "<think> and </think> counts differ"
    if n_think == 0:
        return False, "no <think>"
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return False, "not exactly one <answer> and one </answer>"
    for tag in _TOOL_TAGS:
        reason = _tool_calls_ok(response, tag)
        if reason:
            return False, reason
    start, end = response.find("<answer>"), response.find("</answer>")
    if start > end:
        return False, "</answer> before <answer>"
    block = response[start:end]
    if "\\boxed{" not in block or "}" not in block:
        return False, "no \\boxed{} in <answer>"
    return True, ""


def atpo_format_ok(response: str) -> bool:
    """True when the authors' format check (rules 1-4) accepts ``response``."""
    return atpo_check_format(response)[0]


# ---------------------------------------------------------------------------------------------
# answer extraction (rules 5-7)
# ---------------------------------------------------------------------------------------------


def _first_answer_block(response: str) -> str | None:
    start = response.find("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = response.find("</answer>", start)
    return None if end < 0 else response[start:end]


def _unbox(block: str) -> tuple[str | None, str]:
    """Rules 6-7 on an answer block: (answer, "") or (None, reason)."""
    if "\\boxed " in block:
        return block.rsplit("\\boxed ", 1)[1].split("$", 1)[0], ""
    at = block.rfind("\\boxed")
    if at < 0:
        at = block.rfind("\\fbox")
        if at < 0:
            return None, "no \\boxed in <answer>"
    depth = 0
    for i in range(at, len(block)):
        if block[i] == "{":
            depth += 1
        elif block[i] == "}":
            depth -= 1
            if depth == 0:
                boxed = block[at : i + 1]
                if not boxed.startswith("\\boxed{"):
                    return None, f"cannot unbox {boxed[:20]!r}"
                return boxed[len("\\boxed{") : -1], ""
    return None, "unbalanced \\boxed"


def _extract(response: str) -> tuple[str | None, str]:
    block = _first_answer_block(response)
    if block is None:
        return None, "no <answer>...</answer>"
    return _unbox(block)


def atpo_extract_answer(response: str) -> str | None:
    """The authors' answer (rules 5-7): the box of the FIRST answer block, verbatim; None when
    they would fail to extract one (their score is then -1)."""
    return _extract(response)[0]


# ---------------------------------------------------------------------------------------------
# normalisation and metrics (rules 8-10)
# ---------------------------------------------------------------------------------------------


def atpo_normalize(s: str) -> str:
    """SQuAD normalisation, as the authors apply it (rule 8)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLE_RE.sub(" ", s).split())


def _gold_list(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def atpo_exact_match(prediction: str, golds: str | Iterable[str]) -> float:
    """Rule 9."""
    pred = atpo_normalize(prediction)
    return float(any(pred == atpo_normalize(g) for g in _gold_list(golds)))


def atpo_f1(prediction: str, golds: str | Iterable[str]) -> float:
    """Rule 10: their token F1 (yes/no/noanswer rule; 0 when nothing is shared, even "" vs "")."""
    pred = atpo_normalize(prediction)
    best = 0.0
    for gold in map(atpo_normalize, _gold_list(golds)):
        if (pred in _POLAR or gold in _POLAR) and pred != gold:
            continue
        pred_tokens, gold_tokens = pred.split(), gold.split()
        shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if shared == 0:
            continue
        precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------------------------------------
# the score (rule 11) and the two modes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AtpoScore:
    """Everything the authors' scorer decides about one response."""

    score: float  # their reward: -1, 0, EM, or F1 + 0.1
    em: float  # their EM (0 when the score is -1)
    f1: float  # their F1 (0 when the score is -1)
    answer: str | None  # their extracted answer, None when extraction failed
    format_ok: bool  # their format verdict (computed in both modes, enforced only in training)
    reason: str  # "" when scored from the answer with a valid format, else what went wrong


def atpo_score(response: str, golds: str | Iterable[str], *, validate: bool = False) -> AtpoScore:
    """The authors' scorer: training mode (format enforced) or, with ``validate=True``, their
    validation mode (format not enforced). See the module docstring for the rules."""
    format_ok, format_reason = atpo_check_format(response)
    if not format_ok and not validate:
        return AtpoScore(-1.0, 0.0, 0.0, None, False, f"bad format: {format_reason}")
    answer, reason = _extract(response)
    if answer is None:
        return AtpoScore(-1.0, 0.0, 0.0, None, format_ok, reason)
    em, f1 = atpo_exact_match(answer, golds), atpo_f1(answer, golds)
    if f1 > 0 and "</search>" in response and "</python>" in response:
        score = f1 + MULTI_TOOL_BONUS
    elif f1 > 0:
        score = em
    else:
        score = 0.0
    note = "" if format_ok else f"bad format (not enforced): {format_reason}"
    return AtpoScore(score, em, f1, answer, format_ok, note)


def atpo_em(response: str, golds: str | Iterable[str]) -> tuple[float, float, str | None]:
    """The authors' training reward: (score, EM, answer); score -1 when they reject the format
    or cannot extract the box, else rule 11 (multi-tool bonus included)."""
    out = atpo_score(response, golds)
    return out.score, out.em, out.answer


def atpo_em_eval(response: str, golds: str | Iterable[str]) -> tuple[float, float, str | None]:
    """The authors' validation mode: (score, EM, answer) without the format gate; score is still
    -1 when no answer can be extracted, and the multi-tool bonus still applies."""
    out = atpo_score(response, golds, validate=True)
    return out.score, out.em, out.answer
