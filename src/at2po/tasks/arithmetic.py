"""A second built-in task: arithmetic word problems solved with the ``<python>`` tool.

Problems are generated here from a seed (no downloads): English word problems over 1-3
operations (+, -, x, and a division that comes out even), e.g. "A baker makes 17 trays of 23
rolls and sells 45 rolls. How many rolls are left?" (17 * 23 - 45 = 346). Every answer is a
non-negative integer; each row also stores the arithmetic ``expression`` it was built from.
Reward (the paper's scheme, with a numeric match instead of EM): 1 when the format is valid
and the last ``\\boxed{}`` in ``<answer>`` equals the target as a number, 0 when it is valid but
wrong, -1 when the format is invalid. Metrics: ``correct`` (computed even when the format is
invalid) and ``format_ok``. ``demonstration`` writes tool-using trajectories (or sloppy mental
ones) for an SFT warm start.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from at2po.agent import format_observation
from at2po.rewards import extract_answer
from at2po.tasks.base import Demonstration, Sample, Score, Task, register_task

if TYPE_CHECKING:
    from at2po.agent import AgentProtocol
    from at2po.tools.base import ToolResult

__all__ = [
    "MENTAL_SLIP_RATE",
    "ArithmeticConfig",
    "ArithmeticTask",
    "demonstration",
    "generate_problems",
    "numeric_match",
    "parse_number",
    "write_problems",
]

# ---------------------------------------------------------------------------------------------
# Problem generation
# ---------------------------------------------------------------------------------------------

MAX_STEPS = 3  # the templates cover 1 to 3 operations

# Drawing stops when this many draws in a row repeat questions already drawn: the configured
# space of problems is (nearly) exhausted.
_MAX_DUPLICATE_RUN = 1000


@dataclass
class ArithmeticConfig:
    """Size and difficulty of the generated problems; they are a deterministic function of it.

    ``max_operand`` bounds every number drawn for a quantity; a dividend is the product of two
    such numbers, so that the division comes out even.
    """

    seed: int = 0
    n_train: int = 1000
    n_test: int = 200
    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 99

    def __post_init__(self) -> None:
        for name in ("seed", "n_train", "n_test", "min_steps", "max_steps", "max_operand"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("n_train", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_steps <= MAX_STEPS:
            raise ValueError(f"min_steps must be in [1, {MAX_STEPS}], got {self.min_steps}")
        if not self.min_steps <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be in [min_steps={self.min_steps}, {MAX_STEPS}], got {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")


# A template draws its numbers (each in [2, top], except amounts taken away, which may be 1)
# and returns (question, expression, answer). The answer is computed here rather than by
# evaluating the expression, so that the tests' evaluation of the expression checks both.
_Template = Callable[[random.Random, int], tuple[str, str, int]]


def _n(rng: random.Random, top: int) -> int:
    return rng.randint(2, top)


def _library(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b = _n(rng, top), _n(rng, top)
    return f"A library has {a} books and buys {b} more. How many books does it have now?", f"{a} + {b}", a + b


def _apples(rng: random.Random, top: int) -> tuple[str, str, int]:
    a = _n(rng, top)
    b = rng.randint(1, a - 1)
    question = f"A farmer picks {a} apples and sells {b} of them. How many apples does the farmer have left?"
    return question, f"{a} - {b}", a - b


def _pencil_boxes(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b = _n(rng, top), _n(rng, top)
    return f"Each box holds {a} pencils. How many pencils are in {b} boxes?", f"{a} * {b}", a * b


def _stickers(rng: random.Random, top: int) -> tuple[str, str, int]:
    each, k = _n(rng, top), _n(rng, top)
    question = f"{each * k} stickers are shared equally among {k} children. How many stickers does each child get?"
    return question, f"{each * k} / {k}", each


def _bakery(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b = _n(rng, top), _n(rng, top)
    c = rng.randint(1, min(top, a * b - 1))
    question = f"A baker makes {a} trays of {b} rolls and sells {c} rolls. How many rolls are left?"
    return question, f"{a} * {b} - {c}", a * b - c


def _orange_crates(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b, c = _n(rng, top), _n(rng, top), _n(rng, top)
    question = (
        f"A shop receives {a} crates in the morning and {b} crates in the afternoon, each holding {c} "
        "oranges. How many oranges does it receive?"
    )
    return question, f"({a} + {b}) * {c}", (a + b) * c


def _marble_bags(rng: random.Random, top: int) -> tuple[str, str, int]:
    each, k, c = _n(rng, top), _n(rng, top), _n(rng, top)
    question = (
        f"{each * k} marbles are split equally into {k} bags, and then {c} more marbles are put into one "
        "of the bags. How many marbles does that bag hold now?"
    )
    return question, f"{each * k} / {k} + {c}", each + c


def _theater(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b, c = _n(rng, top), _n(rng, top), _n(rng, top)
    question = f"A theater has {a} rows of {b} seats and {c} extra folding chairs. How many people can sit down?"
    return question, f"{a} * {b} + {c}", a * b + c


def _school_pencils(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b, c = _n(rng, top), _n(rng, top), _n(rng, top)
    d = rng.randint(1, min(top, a * b * c - 1))
    question = (
        f"A school orders {a} boxes, each with {b} packs of {c} pencils, and hands out {d} pencils. "
        "How many pencils are left?"
    )
    return question, f"{a} * {b} * {c} - {d}", a * b * c - d


def _bouquets(rng: random.Random, top: int) -> tuple[str, str, int]:
    a, b, k = _n(rng, top), _n(rng, top), _n(rng, top)
    # The extra tulips make the total a multiple of k; some c in [1, k] always does.
    c = rng.choice([x for x in range(1, top + 1) if (a * b + x) % k == 0])
    question = (
        f"A gardener plants {a} rows of {b} tulips plus {c} more tulips, then ties them equally into {k} "
        "bouquets. How many tulips are in each bouquet?"
    )
    return question, f"({a} * {b} + {c}) / {k}", (a * b + c) // k


def _cinema(rng: random.Random, top: int) -> tuple[str, str, int]:
    a = _n(rng, top)
    b = rng.randint(1, a - 1)
    c, d = _n(rng, top), _n(rng, top)
    question = (
        f"A cinema sells {a} tickets, {b} of which are refunded. Each remaining ticket costs {c} dollars, "
        f"and the snack bar takes {d} dollars. How many dollars does the cinema take in?"
    )
    return question, f"({a} - {b}) * {c} + {d}", (a - b) * c + d


def _cookie_boxes(rng: random.Random, top: int) -> tuple[str, str, int]:
    each, k, b = _n(rng, top), _n(rng, top), _n(rng, top)
    c = rng.randint(1, min(top, each * b - 1))
    question = (
        f"{each * k} cookies are packed equally into {k} boxes. A cafe buys {b} boxes and serves {c} "
        "cookies. How many cookies does the cafe have left?"
    )
    return question, f"{each * k} / {k} * {b} - {c}", each * b - c


_TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (_library, _apples, _pencil_boxes, _stickers),
    2: (_bakery, _orange_crates, _marble_bags, _theater),
    3: (_school_pencils, _bouquets, _cinema, _cookie_boxes),
}


def generate_problems(cfg: ArithmeticConfig | None = None) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "test": rows}; a row is {"id", "question", "answer", "steps", "expression"}.

    The step count is uniform in [min_steps, max_steps], then the template uniform among those
    with that many steps. Question texts are unique across both splits. Raises ValueError when
    the configured space has too few distinct problems for n_train + n_test.
    """
    cfg = cfg or ArithmeticConfig()
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {}
    # The test split is drawn first, from its own stream, so that it depends neither on n_train
    # nor on the train draws: a larger training set keeps the same benchmark.
    for split, count in (("test", cfg.n_test), ("train", cfg.n_train)):
        rng = random.Random(f"arithmetic-{cfg.seed}-{split}")
        rows: list[dict[str, Any]] = []
        duplicate_run = 0
        while len(rows) < count:
            steps = rng.randint(cfg.min_steps, cfg.max_steps)
            question, expression, answer = rng.choice(_TEMPLATES[steps])(rng, cfg.max_operand)
            if question in seen:
                duplicate_run += 1
                if duplicate_run == _MAX_DUPLICATE_RUN:
                    raise ValueError(
                        f"could only draw {len(rows)} distinct {split} problems of {count}; raise max_operand, "
                        f"widen [min_steps, max_steps] or lower n_{split}"
                    )
                continue
            duplicate_run = 0
            seen.add(question)
            rows.append(
                {
                    "id": f"arith-{split}-{len(rows)}",
                    "question": question,
                    "answer": answer,
                    "steps": steps,
                    "expression": expression,
                }
            )
        splits[split] = rows
    return {"train": splits["train"], "test": splits["test"]}


def write_problems(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as jsonl (one object a line), the format ``ArithmeticTask.load`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Numeric answers
# ---------------------------------------------------------------------------------------------

# A sign, then an optional dollar sign (plain or LaTeX-escaped), then the number itself.
_SIGNED_RE = re.compile(r"(?P<sign>[+-]?)\s*(?:\\?\$)?\s*(?P<body>.*)", re.S)
_FRACTION_RE = re.compile(r"\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d+)\s*/\s*(\d+)")
# Digits grouped by thousands ("1,234") or not, then optional decimals and exponent.
_DECIMAL_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")


def parse_number(text: str) -> Fraction | float | None:
    """The number ``text`` writes, or None. Never raises.

    Integers and fractions ("346", "1,234", "3/4", "\\frac{3}{4}") give an exact Fraction;
    numbers with a decimal point or an exponent ("12.0", "0.75", "1e3") give a float. A leading
    sign and "$", surrounding spaces and one trailing full stop ("12.") are allowed.
    """
    s = text.strip().replace("\u2212", "-")  # the typographic minus sign counts as "-"
    s = s.removesuffix(".").rstrip()
    m = _SIGNED_RE.fullmatch(s)
    assert m is not None  # the pattern matches every string
    sign, body = -1 if m["sign"] == "-" else 1, m["body"]
    try:
        if frac := _FRACTION_RE.fullmatch(body):
            numerator, denominator = (int(g) for g in frac.groups() if g is not None)
            return sign * Fraction(numerator, denominator) if denominator else None
        if _DECIMAL_RE.fullmatch(body):
            digits = body.replace(",", "")
            if "." in digits or "e" in digits.lower():
                value = sign * float(digits)
                return value if math.isfinite(value) else None
            return sign * Fraction(int(digits))
    except ValueError:  # int() refuses numbers of more than 4300 digits
        return None
    return None


def _as_number(value: Any) -> Fraction | float | None:
    """A target (a number from the data, or a string that writes one) as a number, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return parse_number(value)
    return None


def numeric_match(answer: str, target: Any, rel_tol: float = 1e-6) -> bool:
    """Whether ``answer`` writes the number ``target`` (an int, float, Fraction or numeric string).

    Integers and fractions compare exactly; when either side is a float (or written with a
    decimal point), they compare with relative tolerance ``rel_tol``, so "12.0" matches 12 and
    "0.3333333" matches "1/3". An answer that is not a number matches nothing.
    """
    a, b = parse_number(answer), _as_number(target)
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol)
    except OverflowError:  # a Fraction too large for a float equals no finite float
        return False


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@register_task
class ArithmeticTask(Task):
    """Arithmetic word problems; the target is a number, matched by ``numeric_match``."""

    name = "arithmetic"
    tools = ("python",)
    metrics = ("correct", "format_ok")
    instructions = (
        "Solve the given math word problem. Do the arithmetic with Python rather than in your head, "
        "and give the final answer as a number."
    )

    def sample_from_dict(self, record: Any, where: str) -> Sample:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question' is missing or empty")
        answer = record.get("answer")
        if _as_number(answer) is None:
            raise ValueError(f"{where}: field 'answer' must be a number or a string that writes one, got {answer!r}")
        meta: dict[str, Any] = {}
        if "steps" in record:
            steps = record["steps"]
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"{where}: field 'steps' must be a positive integer, got {steps!r}")
            meta["steps"] = steps
        # The target keeps the data's own form (JSON-serialisable); numeric_match parses it.
        return Sample(str(record.get("id", where)), question.strip(), answer, meta)

    def user_message(self, sample: Sample) -> str:
        return f"Problem: {sample.prompt}"

    def score(self, response: str, sample: Sample, protocol: AgentProtocol) -> Score:
        format_ok, reason = protocol.check_format(response)
        answer = extract_answer(response)
        correct = answer is not None and numeric_match(answer, sample.target)
        reward = float(correct) if format_ok else -1.0
        return Score(reward, {"correct": float(correct), "format_ok": float(format_ok)}, answer, reason)


# ---------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------

# Share of mental demonstrations that answer off by 1 or 2: the habit of skipping the tool
# then costs reward, which RL can learn to avoid.
MENTAL_SLIP_RATE = 0.3


def demonstration(
    problem: Mapping[str, Any],
    tool: Callable[[str], ToolResult],
    *,
    mental: bool = False,
    seed: int = 0,
) -> Demonstration:
    """The ideal trajectory for a generated ``problem`` row: compute its expression with one
    ``<python>`` call, read the printed value, answer with it.

    ``tool`` (e.g. ``PythonTool()``) is really called, so the observation is exactly what the
    environment would insert; raises ValueError if it does not print the row's answer.

    With ``mental=True``, a sloppy one instead: no tool call, the expression is "computed" in
    the think step and the answer is off by 1 or 2 for a share ``MENTAL_SLIP_RATE`` of the
    problems (which ones depends on ``seed`` and the row's id). ``tool`` is not called.
    """
    expression, answer = problem["expression"], problem["answer"]
    if mental:
        rng = random.Random(f"{seed}-{problem['id']}")
        value = answer
        if rng.random() < MENTAL_SLIP_RATE:
            delta = rng.choice((-2, -1, 1, 2))
            value = answer + delta if answer + delta >= 0 else answer - delta
        turn = f"<think> {expression} = {value}. </think> <answer> The answer is \\boxed{{{value}}} </answer>"
        return Demonstration(((turn, ""),))
    # Floor division prints an int ("12", not "12.0"); every division of a problem is exact.
    code = f"print({expression.replace('/', '//')})"
    result = tool(code)
    if not result.ok or result.text != str(answer):
        raise ValueError(f"python printed {result.text!r} for {code!r}, expected {answer}")
    call = f"<think> The problem asks for {expression}. I compute it with Python. </think> <python>\n{code}\n</python>"
    # Turns after an observation start with a space: "</result> <think> ...".
    final = f" <think> Python printed {answer}. </think> <answer> The answer is \\boxed{{{answer}}} </answer>"
    return Demonstration(((call, format_observation(result.text)), (final, "")))
