"""The task (environment) interface: what the rollout engine, trainer and evaluator see of a task.

A task turns a data row into the first prompt, owns its reward and names the tools it uses:

* ``load(path)`` reads a data file into :class:`Sample` rows (validated, errors name file and line);
* ``system_prompt(tools)`` and ``user_message(sample)`` make the prompt (rendered with the
  tokenizer's chat template by ``at2po.agent.render_prompt``);
* ``score(response, sample, protocol)`` returns a :class:`Score`: the scalar reward the policy
  is trained on plus named metrics (``em``, ``f1``, ``format_ok``, ...), logged as
  ``reward/<metric>`` during training and ``val/<metric>`` in validation;
* ``tools``: the names of the tools it uses when the config does not say otherwise.

A new task is one class decorated with ``@register_task`` (see docs/architecture.md); the
config selects it with ``task.name`` and passes ``task.options`` to its constructor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from at2po.agent import AgentProtocol

__all__ = ["Demonstration", "Sample", "Score", "TASKS", "Task", "build_task", "register_task"]


@dataclass(frozen=True)
class Sample:
    """One data row: an id (unique within a data set), the task's input text, and what the
    reward compares with (``target``: e.g. the gold answers, or a number). ``meta`` carries
    anything else a report may break results down by (e.g. the hop count)."""

    id: str
    prompt: str
    target: Any
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """A scored trajectory: ``reward`` trains the policy; ``metrics`` are reported (means over
    rows); ``answer`` is the extracted final answer (None when there is none); ``reason`` says
    why the format was rejected ("" when it was not)."""

    reward: float
    metrics: Mapping[str, float]
    answer: str | None = None
    reason: str = ""


class Task(ABC):
    """Base class of tasks. Subclasses set ``name``, ``tools`` and ``metrics`` and implement
    ``sample_from_dict``, ``system_prompt``, ``user_message`` and ``score``."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]] = ()  # tool names used when tools.enabled is empty
    metrics: ClassVar[tuple[str, ...]] = ()  # the keys of Score.metrics, in report order
    instructions: ClassVar[str] = ""  # the first sentence(s) of the default system prompt
    # What ``score`` is given: False, the policy's own tokens with each observation reduced to an
    # empty <result> block (a passage that quotes an answer is not the policy's answer); True,
    # the whole response, observation contents included (the ATPO authors' and Search-R1's scorers).
    score_observations: bool = False

    # -- data ------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> list[Sample]:
        """Rows of a jsonl file (one JSON object a line) through ``sample_from_dict``."""
        from at2po.data import read_jsonl

        samples = [self.sample_from_dict(record, where) for where, record in read_jsonl(path)]
        if not samples:
            raise ValueError(f"{path}: no rows")
        return samples

    @abstractmethod
    def sample_from_dict(self, record: Any, where: str) -> Sample:
        """Validate one record; errors are ValueErrors that start with ``where`` ("file:line")."""

    # -- prompt ----------------------------------------------------------------------------------
    def system_prompt(self, tools: Sequence[Any]) -> str:
        """The system prompt for these enabled tools (each has ``name`` and ``description``):
        by default ``instructions``, every tool's sentence, then the answer format."""
        from at2po.agent import ANSWER_FORMAT

        return " ".join(p for p in (self.instructions, *(t.description for t in tools), ANSWER_FORMAT) if p)

    @abstractmethod
    def user_message(self, sample: Sample) -> str:
        """The first user message of a sample."""

    def atpo_messages(self, sample: Sample, system_prompt: str | None, backspace_quirk: bool) -> list[dict[str, str]]:
        """``data.prompt_layout=atpo``: the first messages as the ATPO authors' data files hold
        them (``system_prompt``: ``data.system_prompt``, None for the task's own text). Only a
        task that reproduces their data has this layout (search QA)."""
        raise ValueError(f"data.prompt_layout=atpo renders the ATPO authors' search-QA prompt; task "
                         f"{self.name!r} has no such prompt: set data.prompt_layout=chat")

    def check_atpo_layout(self) -> None:
        """Raise the error of ``atpo_messages`` when this task has no ATPO layout."""
        if type(self).atpo_messages is Task.atpo_messages:
            self.atpo_messages(Sample("", "", None), None, False)

    # -- reward ----------------------------------------------------------------------------------
    @abstractmethod
    def score(self, response: str, sample: Sample, protocol: AgentProtocol) -> Score:
        """Score the decoded response: the policy's turns after the prompt, each observation
        as an empty ``<result>`` block (with ``score_observations``, the observations' text
        too). Never raises on model output: malformed text is a low reward, not an exception."""


@dataclass(frozen=True)
class Demonstration:
    """An ideal (or deliberately sloppy) trajectory for a warm start, split where the environment
    takes over: ``pieces[i] = (generated, observation)``, a turn the policy writes, then the
    observation the environment appends after it ("" after the final turn). Concatenated they are
    the response text (the reward reads it with each observation's content left out);
    ``at2po.training.sft.SFTExample`` takes the pieces."""

    pieces: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return "".join(generated + observation for generated, observation in self.pieces)


# -- registry ---------------------------------------------------------------------------------------
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under its ``name`` (``task.name`` in the config)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute 'name'")
    TASKS[cls.name] = cls
    return cls


def build_task(name: str, **options: Any) -> Task:
    """Construct a registered task; ``options`` (``task.options``) go to its constructor."""
    import at2po.tasks  # noqa: F401 -- registers the built-in tasks

    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not a registered task; choose one of {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**options)
    except TypeError as exc:
        raise ValueError(f"task.options for {name!r}: {exc}") from None
