"""The agent's text/token protocol (docs/method.md §1): prompt, actions, observations.

A trajectory is: prompt ids, then turns. Each turn the policy generates until a stop string
(``</TOOL>`` of every enabled tool, ``</answer>``) or EOS; the protocol's ``parse`` reads that
turn's text; for a tool call the environment appends an observation
``" <result>\\n...\\n</result>"`` as ids from ``encode_observation`` (loss mask 0) and the policy
continues right after it. Generated ids are never re-encoded. No model code here.

:class:`AgentProtocol` derives everything tool-specific (stop strings, action parsing, the
format check) from the enabled tools' self-descriptions (``at2po.tools.base.Tool``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ANSWER_FORMAT",
    "ANSWER_TAG",
    "Action",
    "ATPO_TOOL_LIMIT_NOTICE",
    "AgentProtocol",
    "TOOL_LIMIT_MESSAGE",
    "atpo_tool_input",
    "TOOL_LIMIT_NOTICE",
    "decode_ids",
    "encode_observation",
    "format_error_observation",
    "format_observation",
    "render_messages",
    "render_prompt",
]

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
    user_message: str,
    system_prompt: str,
    **chat_template_kwargs: Any,
) -> list[int]:
    """Prompt ids for one sample: a system prompt and the user message (a task's
    ``user_message``, e.g. ``"Question: {question}"`` for search QA), rendered by
    ``render_messages``."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_message}]
    return render_messages(tokenizer, messages, **chat_template_kwargs)


def render_messages(tokenizer: Any, messages: list[dict[str, str]], **chat_template_kwargs: Any) -> list[int]:
    """Prompt ids for a sample's first messages (``{"role", "content"}`` dicts).

    With a chat template: the messages rendered with ``add_generation_prompt=True`` (extra
    keyword arguments, e.g. ``enable_thinking``, go to the template) and encoded without special
    tokens. Without one (base models), the plain-text layout::

        System: {system_prompt}

        User: {user_message}

        Assistant:

    (one ``Role: content`` block per message) encoded without the tokenizer's post-processing,
    preceded by BOS if the tokenizer has one (so no EOS or other suffix is appended to a prompt
    the model must continue).
    """
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **chat_template_kwargs,
        )
        return _as_id_list(encoded)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------

ANSWER_TAG = "answer"  # the terminal action of every task: <answer> ... </answer>
# The protocol in one sentence, for system prompts composed from tool descriptions.
ANSWER_FORMAT = (
    "Before every action, reason within <think> </think> tags; give the final answer within "
    "<answer> </answer> tags, with the exact answer in \\boxed{} inside them, for example "
    "<answer> The answer is \\boxed{42} </answer>."
)
# Tags that belong to the protocol itself; no tool may take these names.
RESERVED_TAGS = ("think", "answer", "result")


class ToolSpec(Protocol):
    """What the protocol reads from a tool (``at2po.tools.base.Tool`` has these attributes)."""

    name: str
    max_input_chars: int
    dedent_input: bool


@dataclass(frozen=True)
class Action:
    """What a turn asked for.

    kind: the name of a tool (a tool call; ``query`` is its stripped inner text), "answer"
    (the trajectory ends; ``query`` is None), or "none" (no complete action: plain text, EOS,
    an unclosed tag; the trajectory ends).
    error: None when well formed. For a tool call with an error (e.g. "empty query"), the caller
    should not run the tool but append ``format_error_observation(error)`` and go on; for
    "answer"/"none" it only describes the problem (the reward's format check judges it).
    """

    kind: str
    query: str | None = None
    error: str | None = None


class AgentProtocol:
    """The text protocol of a set of enabled tools: stop strings, action parsing, format check.

    ``AgentProtocol([])`` is a tool-less agent (think, then answer). ``stop_at_answer=False``
    leaves ``</answer>`` out of the stop strings (``rollout.stop_at_answer``, the authors'
    behaviour): an answer turn then runs to its EOS.
    """

    def __init__(self, tools: Iterable[ToolSpec] = (), stop_at_answer: bool = True) -> None:
        self.tools: dict[str, ToolSpec] = {}
        for tool in tools:
            if tool.name in RESERVED_TAGS:
                raise ValueError(f"tool name {tool.name!r} is reserved by the agent protocol")
            if tool.name in self.tools:
                raise ValueError(f"two enabled tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        self.tool_names: tuple[str, ...] = tuple(self.tools)
        answer_stop = (f"</{ANSWER_TAG}>",) if stop_at_answer else ()
        self.stop_strings: tuple[str, ...] = (*(f"</{n}>" for n in self.tool_names), *answer_stop)

    def parse(self, text: str, stop: str | None = None) -> Action:
        """Read one turn's generated text. Never raises.

        * a turn whose generation stopped on a tool's closing tag (``stop``, e.g. "</search>")
          is that tool call, as in the authors' code, even if it mentions ``<answer>`` earlier;
        * ``<answer>`` anywhere in the turn -> "answer" (error "unclosed <answer>" if no
          ``</answer>`` follows it);
        * else the tool call whose closing tag comes last; its query is the text between that
          closing tag and the nearest opening tag of the same tool before it, so
          ``<search><search>x</search>`` gives "x" (dedented first for tools that ask for it),
          stripped and cut to the tool's ``max_input_chars``. Empty query -> error "empty query";
          a closing tag without an opening one -> "none" with an error;
        * else an opening tool tag without its closing tag -> "none", error "unclosed <tool>";
        * else "none" without error.
        """
        stopped_on = stop[2:-1] if stop and stop.startswith("</") and stop.endswith(">") else None
        if stopped_on in self.tools:
            return self._tool_call(text, stopped_on)
        answer_at = text.find(f"<{ANSWER_TAG}>")
        if answer_at >= 0:
            closed = text.find(f"</{ANSWER_TAG}>", answer_at) >= 0
            return Action(ANSWER_TAG, None, None if closed else f"unclosed <{ANSWER_TAG}>")

        if self.tools:
            close_at, name = max((text.rfind(f"</{n}>"), n) for n in self.tool_names)
            if close_at >= 0:
                return self._tool_call(text, name)

        for name in self.tool_names:
            if f"<{name}>" in text:
                return Action("none", None, f"unclosed <{name}>")
        return Action("none")

    def _tool_call(self, text: str, name: str) -> Action:
        """The call of tool ``name`` whose closing tag comes last in ``text``."""
        close_at = text.rfind(f"</{name}>")
        open_at = text.rfind(f"<{name}>", 0, close_at)
        if open_at < 0:
            return Action("none", None, f"</{name}> without <{name}>")
        tool = self.tools[name]
        query = text[open_at + len(f"<{name}>") : close_at]
        if tool.dedent_input:
            query = textwrap.dedent(query)
        query = query.strip()[: tool.max_input_chars]
        return Action(name, query, None if query else "empty query")

    def check_format(self, response: str) -> tuple[bool, str]:
        """The format rule of docs/method.md §1 for these tools (``at2po.rewards.check_format``)."""
        from at2po.rewards import check_format

        return check_format(response, tool_names=self.tool_names)


# ---------------------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------------------

TOOL_LIMIT_MESSAGE = "tool call limit reached, answer with what you have"


def format_observation(body: str, defuse: bool = True) -> str:
    """Wrap a tool's output as an observation (docs/method.md §1): ``" <result>\\n" + body + "\\n</result>"``.

    A literal ``</result>`` inside the body is defused (``</ result>``) so the block always ends
    where the environment ended it; the reward's format check relies on that. ``defuse=False``
    keeps the body as it is (``rollout.env_compat=atpo``: the authors do not defuse).
    """
    return " <result>\n" + (body.replace("</result>", "</ result>") if defuse else body) + "\n</result>"


# What the reward reads in place of an observation: where the environment's output came, without
# its content (docs/method.md §1).
EMPTY_OBSERVATION = format_observation("")


def format_error_observation(message: str) -> str:
    """Observation telling the model its tool call failed; the trajectory goes on."""
    return format_observation(f"Error: {message}")


# The masked observation shown instead of running a tool once the call limit is exceeded.
TOOL_LIMIT_NOTICE = format_observation(TOOL_LIMIT_MESSAGE)

# rollout.env_compat=atpo: the ATPO authors' notice for a call beyond the limit, plain masked text
# appended inside the same turn, which then goes on (docs/method.md §6.7a).
ATPO_TOOL_LIMIT_NOTICE = (" I have reached the tool call limit and cannot make further tool calls. Let me provide "
                          "the final answer based on the information I have gathered so far. \n\n")


def atpo_tool_input(context_text: str, name: str) -> str:
    """The input of a call of tool ``name`` as the ATPO authors read it (``rollout.env_compat=atpo``):
    in the decoded context (prompt, every earlier turn and observation, this turn), the text
    between the last ``</name>`` and the last ``<name>`` before it, stripped; "" when either tag
    is missing. A turn that closes a tag it never opened thus gets a query that reaches back into
    earlier turns or the prompt. Not cut to a length bound."""
    close_at = context_text.rfind(f"</{name}>")
    open_at = context_text.rfind(f"<{name}>", 0, max(close_at, 0))
    if close_at < 0 or open_at < 0:
        return ""
    return context_text[open_at + len(f"<{name}>") : close_at].strip()


def encode_observation(tokenizer: Any, text: str) -> list[int]:
    """Observation ids to append after the generated ids (no BOS/EOS or other special tokens)."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def decode_ids(tokenizer: Any, ids: Iterable[int], drop_ids: Iterable[int] = (), keep_eos: bool = False) -> str:
    """Decode generated ids to text without raising.

    Special tokens are kept (``skip_special_tokens=False``) because some tag tokens, such as
    Qwen3's ``<think>``, are added tokens; only pad and EOS ids (plus ``drop_ids``, e.g. the
    generation config's extra EOS ids) are removed, unless ``keep_eos`` (the whole context as
    the ATPO authors decode it), as are ids outside the vocabulary. Invalid UTF-8 byte sequences
    come out as U+FFFD. Returns "" if decoding fails anyway.
    """
    drop = {int(i) for i in drop_ids}
    for special in () if keep_eos else (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
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
