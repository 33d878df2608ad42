"""The paper's task: answer a question with the help of a search tool (docs/method.md §1).

Data: FlashRAG jsonl (``{"id", "question", "golden_answers"}``) or Search-R1 parquet, read by
``at2po.datasets``. Reward (paper Eqs. 14-16): EM in {0, 1} (or token F1 with ``reward="f1"``)
of the last ``\\boxed{}`` inside ``<answer>`` when the response's format is valid, -1 when it
is not. Metrics: ``em``, ``f1`` (computed whenever an answer can be extracted, even when the
format is invalid) and ``format_ok``. The quickstart's synthetic multi-hop world
(``at2po.tasks.multihop``) writes its data in this task's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from at2po.rewards import exact_match, extract_answer, f1_score
from at2po.tasks.atpo_scorer import atpo_score
from at2po.tasks.base import Sample, Score, Task, register_task

if TYPE_CHECKING:
    from at2po.agent import AgentProtocol

__all__ = ["PAPER_SYSTEM_PROMPT", "SearchQATask", "atpo_question", "atpo_system_prompt"]

# The paper's system prompt (Figure 6), verbatim, including its typo ("as your want").
PAPER_SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of "
    "the wikipedia search tool. Given a question, you need to first think about the reasoning "
    "process in the mind and then provide the answer. During thinking, you can invoke the "
    "wikipedia search tool to search for fact information about specific topics if needed. You "
    "can search as many times as your want. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags respectively, and the search query and result "
    "are enclosed within <search> </search> and <result> </result> tags respectively. For "
    "example, <think> This is the reasoning process. </think> <search> search query here "
    "</search> <result> search result here </result> <think> This is the reasoning process. "
    "</think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last "
    "part of the answer, the final exact answer is enclosed within \\boxed{} with latex format."
)



def atpo_system_prompt(backspace_quirk: bool = True) -> str:
    """The prompt of the ATPO authors' data files (``data.prompt_layout=atpo``): the paper's text
    with a double space before the second ``<think>`` of the example, and, with
    ``backspace_quirk``, each ``\\boxed`` written as a backspace character and "oxed" (an escape
    in the authors' Python source turns the two characters ``\\b`` into U+0008)."""
    text = PAPER_SYSTEM_PROMPT.replace("</result> <think>", "</result>  <think>")
    return text.replace("\\boxed", "\x08oxed") if backspace_quirk else text


def atpo_question(question: str) -> str:
    """The question as the authors' data files hold it: stripped, with "?" appended unless it
    already ends with one."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


REWARD_METRICS = ("em", "f1", "atpo_em", "atpo_em_eval")


@register_task
class SearchQATask(Task):
    """Question answering with search. ``reward`` picks the scorer:

    * "em" (default): the paper's reward with our strict format check and answer extraction
      (``at2po.rewards``); use it to train and evaluate.
    * "f1": the same with token F1 in place of EM.
    * "atpo_em": the authors' training reward, quirks included (their looser format check, -1
      when it fails, EM, or F1 + 0.1 when both ``</search>`` and ``</python>`` occur); use it
      to reproduce their training signal.
    * "atpo_em_eval": their validation mode (no format gate, -1 only when no answer can be
      extracted, same bonus); use it to compare with the paper's numbers. For both atpo modes
      ``em`` is their EM, ``f1`` our F1 of their extracted answer and ``format_ok`` their
      format verdict (reported, not enforced, in eval mode).

    Every scorer reads the policy's own tokens, observations reduced to empty ``<result>``
    blocks; ``score_observations=True`` gives it the observations' text as well, as the authors'
    scorer reads it (a passage quoting ``<answer> \\boxed{x} </answer>`` can then be scored as
    the answer: docs/method.md §6.7).
    """

    name = "search_qa"
    tools = ("search",)
    metrics = ("em", "f1", "format_ok")
    instructions = "Answer the given question step by step."

    def __init__(self, reward: str = "em", score_observations: bool = False) -> None:
        if reward not in REWARD_METRICS:
            raise ValueError(f"task.options.reward={reward!r} is not one of {', '.join(REWARD_METRICS)}")
        if not isinstance(score_observations, bool):
            raise ValueError(f"task.options.score_observations={score_observations!r} must be true or false")
        self.reward = reward
        self.score_observations = score_observations

    def load(self, path: str | Path) -> list[Sample]:
        """jsonl through ``sample_from_dict`` (keeps each row's ``metadata``); parquet and json
        files through ``at2po.datasets.load_qa_file``."""
        if Path(path).suffix.lower() == ".jsonl":
            return super().load(path)
        from at2po.datasets import load_qa_file

        return [Sample(row.id, row.question, row.golds) for row in load_qa_file(path)]

    def sample_from_dict(self, record: Any, where: str) -> Sample:
        """A FlashRAG row ``{"id", "question", "golden_answers"}``; a ``metadata`` mapping (e.g.
        the synthetic world's hop count) becomes the sample's ``meta``."""
        from at2po.data import row_from_dict

        row = row_from_dict(record, where)
        meta = record.get("metadata")
        return Sample(row.id, row.question, row.golds, meta if isinstance(meta, dict) else {})

    def system_prompt(self, tools: Sequence[Any]) -> str:
        """The paper's prompt when search is enabled, followed by the other tools' sentences."""
        if not any(t.name == "search" for t in tools):
            return super().system_prompt(tools)
        return " ".join([PAPER_SYSTEM_PROMPT, *(t.description for t in tools if t.name != "search" and t.description)])

    def user_message(self, sample: Sample) -> str:
        return f"Question: {sample.prompt.strip()}"

    def atpo_messages(self, sample: Sample, system_prompt: str | None, backspace_quirk: bool) -> list[dict[str, str]]:
        """One system message, as in the authors' data: their prompt, ``"\\nuser\\n"``, then the
        question (``atpo_question``); ``system_prompt`` replaces their prompt when given."""
        prompt = atpo_system_prompt(backspace_quirk) if system_prompt is None else system_prompt
        return [{"role": "system", "content": f"{prompt}\nuser\n{atpo_question(sample.prompt)}"}]

    def score(self, response: str, sample: Sample, protocol: AgentProtocol) -> Score:
        if self.reward in ("atpo_em", "atpo_em_eval"):
            # The authors' scorer knows the search and python tags itself; protocol is unused.
            out = atpo_score(response, sample.target, validate=self.reward == "atpo_em_eval")
            f1 = f1_score(out.answer, sample.target) if out.answer is not None else 0.0
            metrics = {"em": out.em, "f1": f1, "format_ok": float(out.format_ok)}
            return Score(float(out.score), metrics, out.answer, out.reason)
        format_ok, reason = protocol.check_format(response)
        answer = extract_answer(response)
        em = exact_match(answer, sample.target) if answer is not None else 0.0
        f1 = f1_score(answer, sample.target) if answer is not None else 0.0
        reward = (em if self.reward == "em" else f1) if format_ok else -1.0
        return Score(reward, {"em": em, "f1": f1, "format_ok": float(format_ok)}, answer, reason)
