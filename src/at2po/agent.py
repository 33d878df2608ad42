"""The agent's text/token protocol (spec §1): prompt, actions, observations.

A trajectory is: prompt ids, then turns. Each turn the policy generates until a stop string
(``</search>``, ``</python>``, ``</answer>``) or EOS; ``parse_action`` reads that turn's text; for a
tool call the environment appends an observation ``" <result>\\n...\\n</result>"`` as ids from
``encode_observation`` (loss mask 0) and the policy continues right after it. Generated ids are
never re-encoded. No model code here.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Action",
    "MAX_CODE_CHARS",
    "MAX_QUERY_CHARS",
    "PYTHON_TOOL_PROMPT",
    "STOP_STRINGS",
    "SYSTEM_PROMPT",
    "TOOL_LIMIT_MESSAGE",
    "TOOL_LIMIT_NOTICE",
    "build_system_prompt",
    "decode_ids",
    "encode_observation",
    "format_error_observation",
    "format_observation",
    "parse_action",
    "render_prompt",
]

# The paper's system prompt (Figure 6), verbatim, including its typo ("as your want").
SYSTEM_PROMPT = (
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

PYTHON_TOOL_PROMPT = (
    "You can also run Python code by writing it within <python> </python> tags; whatever the "
    "code prints is returned to you within <result> </result> tags, so use print() to see values."
)


def build_system_prompt(python_tool: bool = False) -> str:
    """The paper's system prompt, plus the python-tool sentence when that tool is enabled."""
    return f"{SYSTEM_PROMPT} {PYTHON_TOOL_PROMPT}" if python_tool else SYSTEM_PROMPT


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------


def _as_id_list(encoded: Any) -> list[int]:
    """Plain list[int] from whatever apply_chat_template returned (list, nested list, dict-like)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):  # tensor / array
        encoded = encoded.tolist()
    encoded = list(encoded)
    if encoded and isinstance(encoded[0], (list, tuple)):  # a batch of one conversation
        encoded = list(encoded[0])
    return [int(i) for i in encoded]


def render_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str = SYSTEM_PROMPT,
    **chat_template_kwargs: Any,
) -> list[int]:
    """Prompt ids for one question. The user message is ``"Question: {question}"``.

    With a chat template: ``[system, user]`` messages rendered with
    ``add_generation_prompt=True`` (extra keyword arguments, e.g. ``enable_thinking``, go to the
    template). Without one (base models), the plain-text layout::

        System: {system_prompt}

        User: Question: {question}

        Assistant:

    encoded without the tokenizer's post-processing, preceded by BOS if the tokenizer has one
    (so no EOS or other suffix is appended to a prompt the model must continue).
    """
    user = f"Question: {question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **chat_template_kwargs,
        )
        return _as_id_list(encoded)
    text = f"System: {system_prompt}\n\nUser: {user}\n\nAssistant:"
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------

STOP_STRINGS = ["</search>", "</python>", "</answer>"]

# Bounds on what reaches a tool: a runaway generation must not become a 100 KB search request.
# Longer inputs are cut to the bound and still executed (no error is set).
MAX_QUERY_CHARS = 2000
MAX_CODE_CHARS = 20000
_LIMITS = {"search": MAX_QUERY_CHARS, "python": MAX_CODE_CHARS}


@dataclass(frozen=True)
class Action:
    """What a turn asked for.

    kind: "search" / "python" (a tool call, ``query`` is the stripped inner text), "answer"
    (the trajectory ends; ``query`` is None), or "none" (no complete action: plain text, EOS,
    an unclosed tag; the trajectory ends).
    error: None when well formed. For a tool kind with an error (e.g. "empty query"), the caller
    should not run the tool but append ``format_error_observation(error)`` and go on; for
    "answer"/"none" it only describes the problem (the reward's format check judges it).
    """

    kind: Literal["search", "python", "answer", "none"]
    query: str | None = None
    error: str | None = None


def parse_action(text: str) -> Action:
    """Read one turn's generated text. Never raises.

    * ``<answer>`` anywhere in the turn -> "answer" (error "unclosed <answer>" if no
      ``</answer>`` follows it);
    * else the tool call whose closing tag (``</search>`` or ``</python>``) comes last; its query
      is the text between that closing tag and the nearest opening tag of the same tool before
      it, so ``<search><search>x</search>`` gives "x" (python code is dedented first), stripped
      and cut to MAX_QUERY_CHARS / MAX_CODE_CHARS. Empty query -> error "empty query";
      a closing tag without an opening one -> "none" with an error;
    * else an opening tool tag without its closing tag -> "none", error "unclosed <search>";
    * else "none" without error.
    """
    answer_at = text.find("<answer>")
    if answer_at >= 0:
        closed = text.find("</answer>", answer_at) >= 0
        return Action("answer", None, None if closed else "unclosed <answer>")

    close_at, tool = max((text.rfind(f"</{t}>"), t) for t in _LIMITS)
    if close_at >= 0:
        open_at = text.rfind(f"<{tool}>", 0, close_at)
        if open_at < 0:
            return Action("none", None, f"</{tool}> without <{tool}>")
        query = text[open_at + len(f"<{tool}>") : close_at]
        if tool == "python":
            query = textwrap.dedent(query)  # keep code runnable when the whole block is indented
        query = query.strip()[: _LIMITS[tool]]
        return Action(tool, query, None if query else "empty query")

    for t in _LIMITS:
        if f"<{t}>" in text:
            return Action("none", None, f"unclosed <{t}>")
    return Action("none")


# ---------------------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------------------

TOOL_LIMIT_MESSAGE = "tool call limit reached, answer with what you have"


def format_observation(body: str) -> str:
    """Wrap a tool's output as the spec's observation: ``" <result>\\n" + body + "\\n</result>"``.

    A literal ``</result>`` inside the body is defused (``</ result>``) so the block always ends
    where the environment ended it; the reward's format check relies on that.
    """
    return " <result>\n" + body.replace("</result>", "</ result>") + "\n</result>"


def format_error_observation(message: str) -> str:
    """Observation telling the model its tool call failed; the trajectory goes on."""
    return format_observation(f"Error: {message}")


# The masked observation shown instead of running a tool once the call limit is exceeded.
TOOL_LIMIT_NOTICE = format_observation(TOOL_LIMIT_MESSAGE)


def encode_observation(tokenizer: Any, text: str) -> list[int]:
    """Observation ids to append after the generated ids (no BOS/EOS or other special tokens)."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def decode_ids(tokenizer: Any, ids: Iterable[int], drop_ids: Iterable[int] = ()) -> str:
    """Decode generated ids to text without raising.

    Special tokens are kept (``skip_special_tokens=False``) because some tag tokens, such as
    Qwen3's ``<think>``, are added tokens; only pad and EOS ids (plus ``drop_ids``, e.g. the
    generation config's extra EOS ids) are removed, as are ids outside the vocabulary. Invalid
    UTF-8 byte sequences come out as U+FFFD. Returns "" if decoding fails anyway.
    """
    drop = {int(i) for i in drop_ids}
    for special in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(special, int):
            drop.add(special)
        elif special is not None:  # some tokenizers report a list of EOS ids
            drop.update(int(i) for i in special)
    try:
        vocab_size = len(tokenizer)
        kept = [i for i in (int(x) for x in ids) if 0 <= i < vocab_size and i not in drop]
        return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except Exception:  # noqa: BLE001 -- a rollout must never crash on decoding
        return ""
