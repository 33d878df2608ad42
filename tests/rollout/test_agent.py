"""The agent protocol: prompt rendering, action parsing, observations, robust decoding.

The tokenizer is a tiny byte-level BPE trained here, so no download is needed.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from at2po.agent import (
    TOOL_LIMIT_MESSAGE,
    TOOL_LIMIT_NOTICE,
    Action,
    AgentProtocol,
    decode_ids,
    encode_observation,
    format_error_observation,
    format_observation,
    render_prompt,
)
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT as SYSTEM_PROMPT
from at2po.tasks.search_qa import SearchQATask
from at2po.tools.base import Tool, ToolResult
from at2po.tools.python_sandbox import PYTHON_DESCRIPTION as PYTHON_TOOL_PROMPT
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import LocalSearchTool

# The old module-level protocol (search + python enabled) is now an AgentProtocol of those tools.
PROTOCOL = AgentProtocol([LocalSearchTool, PythonTool])
parse_action = PROTOCOL.parse
MAX_QUERY_CHARS = 2000  # the old agent.MAX_QUERY_CHARS
MAX_CODE_CHARS = 20000  # the old agent.MAX_CODE_CHARS


def _question(question: str) -> str:
    """The search-QA user message of a question (formerly added by render_prompt)."""
    return SearchQATask().user_message(Sample("q", question, ("gold",)))

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _train_tokenizer() -> Tokenizer:
    subjects = ["The capital of France", "Jane Doe", "The river Nile", "Mount Everest", "Film X"]
    facts = ["is Paris", "was born in 1970", "flows north", "is 8849 metres high", "was directed by Jane"]
    sentences = [
        f"{s} {f}. <think> step {i} </think> <search> {s} </search> <result> Page {i % 3 + 1}: {f} </result>"
        f" <answer> \\boxed{{{f}}} </answer>"
        for i, (s, f) in enumerate((s, f) for s in subjects for f in facts)
    ] * 12
    sentences += [SYSTEM_PROMPT, PYTHON_TOOL_PROMPT, "Question: who?", "System: User: Assistant:"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences, trainer)
    return tok


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    return _train_tokenizer()


@pytest.fixture()
def tokenizer(raw_tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------


def test_system_prompts() -> None:
    assert SYSTEM_PROMPT.startswith("You are a helpful assistant that can solve the given question")
    example = "<think> This is the reasoning process. </think> <search> search query here </search>"
    assert example in SYSTEM_PROMPT
    assert "<answer> The final answer is \\[ \\boxed{answer here} \\] </answer>." in SYSTEM_PROMPT
    assert SYSTEM_PROMPT.endswith("enclosed within \\boxed{} with latex format.")
    task = SearchQATask()
    assert task.system_prompt([LocalSearchTool]) == SYSTEM_PROMPT
    assert task.system_prompt([LocalSearchTool, PythonTool]) == SYSTEM_PROMPT + " " + PYTHON_TOOL_PROMPT
    assert "<python> </python>" in PYTHON_TOOL_PROMPT


def test_render_prompt_plain_fallback(tokenizer) -> None:
    assert not tokenizer.chat_template
    ids = render_prompt(tokenizer, _question("  Who directed Film X? "), SYSTEM_PROMPT)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    expected = f"System: {SYSTEM_PROMPT}\n\nUser: Question: Who directed Film X?\n\nAssistant:"
    assert _text(tokenizer, ids[1:]) == expected
    assert ids[1:] == tokenizer.encode(expected, add_special_tokens=False)


def test_render_prompt_plain_without_bos(raw_tokenizer) -> None:
    no_bos = PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="</s>")
    ids = render_prompt(no_bos, _question("q"), system_prompt="Be brief.")
    assert _text(no_bos, ids) == "System: Be brief.\n\nUser: Question: q\n\nAssistant:"


def test_render_prompt_chat_template(tokenizer) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = render_prompt(tokenizer, _question("Who directed Film X?"), SYSTEM_PROMPT)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert _text(tokenizer, ids) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nQuestion: Who directed Film X?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_render_prompt_passes_template_kwargs(tokenizer) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = render_prompt(tokenizer, _question("q"), system_prompt="S", enable_thinking=False)
    assert _text(tokenizer, ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


class _DictTemplateTokenizer:
    """apply_chat_template returning a dict with a batch dimension (some transformers versions)."""

    chat_template = "anything"

    def apply_chat_template(self, messages, **kwargs):
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[1]["content"] == "Question: q"
        assert kwargs["add_generation_prompt"] and kwargs["tokenize"]
        return {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]}


def test_render_prompt_accepts_dict_output() -> None:
    assert render_prompt(_DictTemplateTokenizer(), _question("q"), SYSTEM_PROMPT) == [5, 6, 7]


# ---------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------


def test_stop_strings() -> None:
    assert PROTOCOL.stop_strings == ("</search>", "</python>", "</answer>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think> a </think> <search>  Film X director \n</search>", Action("search", "Film X director")),
        ("<think> a </think> <python>\nprint(1)\n</python>", Action("python", "print(1)")),
        ("<python>\n    x = 1\n    print(x)\n</python>", Action("python", "x = 1\nprint(x)")),  # dedented
        ("<search> a </search> <python> b </python>", Action("python", "b")),  # closes last
        ("<python> b </python> <search> a </search>", Action("search", "a")),
        ("<search><search>x</search>", Action("search", "x")),  # nested: innermost
        ("<search> old </search> <search> new </search>", Action("search", "new")),
        ("<think> a </think> <answer> \\boxed{Paris} </answer>", Action("answer")),
        ("<answer> \\boxed{Paris}", Action("answer", None, "unclosed <answer>")),
        ("<answer> x </answer> <search> y </search>", Action("answer")),  # an answer wins
        ("<search>   </search>", Action("search", "", "empty query")),
        ("<search></search>", Action("search", "", "empty query")),
        ("<think> a </think> <search> Film X dir", Action("none", None, "unclosed <search>")),
        ("<python> print(", Action("none", None, "unclosed <python>")),
        ("Film X </search>", Action("none", None, "</search> without <search>")),
        ("<think> just thinking </think>", Action("none")),
        ("", Action("none")),
    ],
)
def test_parse_action(text: str, expected: Action) -> None:
    assert parse_action(text) == expected


def test_parse_action_bounds_long_queries() -> None:
    query = "x" * 100_000
    assert LocalSearchTool.max_input_chars == MAX_QUERY_CHARS
    assert PythonTool.max_input_chars == MAX_CODE_CHARS
    assert parse_action(f"<search>{query}</search>") == Action("search", "x" * MAX_QUERY_CHARS)
    code = "y" * 100_000
    assert parse_action(f"<python>{code}</python>") == Action("python", "y" * MAX_CODE_CHARS)


def test_parse_action_replacement_characters() -> None:
    garbled = b"<search> caf\xc3 \xff\xfe </search>".decode("utf-8", errors="replace")
    action = parse_action(garbled)
    assert action.kind == "search" and action.error is None
    assert action.query == "caf\ufffd \ufffd\ufffd"
    assert parse_action("\x00<search>\udcff</search>") == Action("search", "\udcff")


# ---------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------


def test_observation_strings() -> None:
    assert format_observation("Page 1: a\nPage 2: b") == " <result>\nPage 1: a\nPage 2: b\n</result>"
    assert format_observation("") == " <result>\n\n</result>"
    assert format_observation("x </result> y") == " <result>\nx </ result> y\n</result>"
    assert TOOL_LIMIT_MESSAGE == "tool call limit reached, answer with what you have"
    assert TOOL_LIMIT_NOTICE == " <result>\ntool call limit reached, answer with what you have\n</result>"
    assert format_error_observation("search failed: timeout") == (
        " <result>\nError: search failed: timeout\n</result>"
    )


def test_encode_observation(tokenizer) -> None:
    text = format_observation("Page 1: Jane Doe was born in 1970.")
    ids = encode_observation(tokenizer, text)
    assert all(type(i) is int for i in ids)
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert _text(tokenizer, ids) == text


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def test_decode_ids_drops_pad_and_eos_keeps_tags(tokenizer) -> None:
    body = tokenizer.encode("<think> a </think> <search> Nile </search>", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = body + [im_end, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
    assert decode_ids(tokenizer, ids) == "<think> a </think> <search> Nile </search><|im_end|>"
    assert decode_ids(tokenizer, ids, drop_ids=[im_end]) == "<think> a </think> <search> Nile </search>"
    assert decode_ids(tokenizer, iter(body)) == "<think> a </think> <search> Nile </search>"


def test_decode_ids_never_raises(tokenizer) -> None:
    ok = tokenizer.encode("Paris", add_special_tokens=False)
    assert decode_ids(tokenizer, [-1, *ok, 10**9]) == "Paris"  # out-of-vocabulary ids dropped
    partial = tokenizer.encode("日", add_special_tokens=False)[:1]  # half a UTF-8 sequence
    assert "\ufffd" in decode_ids(tokenizer, partial)
    assert decode_ids(tokenizer, []) == ""

    class Broken:
        pad_token_id = None
        eos_token_id = [0, 1]

        def __len__(self) -> int:
            return 10

        def decode(self, *args, **kwargs):
            raise RuntimeError("boom")

    assert decode_ids(Broken(), [3, 4]) == ""


# ---------------------------------------------------------------------------------------------
# AgentProtocol built from tool classes
# ---------------------------------------------------------------------------------------------


class CalcTool(Tool):
    """A custom tool defined here: short inputs, no dedent."""

    name = "calc"
    description = "You can compute within <calc> </calc> tags."
    max_input_chars = 5
    dedent_input = False

    def run(self, query: str) -> ToolResult:
        return ToolResult(text=query, ok=True)


class _Named:
    """A bare tool spec (what AgentProtocol reads: name, max_input_chars, dedent_input)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_input_chars = 10
        self.dedent_input = False


def test_protocol_stop_strings_follow_tool_order() -> None:
    assert AgentProtocol([PythonTool, LocalSearchTool]).stop_strings == ("</python>", "</search>", "</answer>")
    assert AgentProtocol([LocalSearchTool, CalcTool]).stop_strings == ("</search>", "</calc>", "</answer>")
    assert AgentProtocol([CalcTool]).stop_strings == ("</calc>", "</answer>")
    assert AgentProtocol([CalcTool()]).stop_strings == ("</calc>", "</answer>")  # instances work too
    assert AgentProtocol([CalcTool, PythonTool]).tool_names == ("calc", "python")


def test_protocol_custom_tool_is_parsed_and_cut() -> None:
    protocol = AgentProtocol([CalcTool])
    assert protocol.parse("<think> a </think> <calc>  1+2+3+4  </calc>") == Action("calc", "1+2+3")
    assert protocol.parse("<calc>12</calc>") == Action("calc", "12")
    # Not dedented (dedent_input False): the indentation of the second line stays; 5 chars kept.
    assert protocol.parse("<calc>\n  a\n  b\n</calc>") == Action("calc", "a\n  b")
    assert protocol.parse("<calc> </calc>") == Action("calc", "", "empty query")
    assert protocol.parse("<calc> 1+") == Action("none", None, "unclosed <calc>")
    assert protocol.parse("1+1 </calc>") == Action("none", None, "</calc> without <calc>")
    assert protocol.parse("<answer> \\boxed{2} </answer> <calc> 1 </calc>") == Action("answer")
    # With search enabled as well, the call whose closing tag comes last wins.
    both = AgentProtocol([LocalSearchTool, CalcTool])
    assert both.parse("<calc> 1 </calc> <search> a </search>") == Action("search", "a")
    assert both.parse("<search> a </search> <calc> 1 </calc>") == Action("calc", "1")


def test_protocol_disabled_tool_tags_are_plain_text() -> None:
    protocol = AgentProtocol([CalcTool])
    assert protocol.parse("<think> a </think> <search> Film X </search>") == Action("none")
    assert protocol.parse("<python>\nprint(1)\n</python>") == Action("none")
    assert protocol.parse("<search> Film X") == Action("none")  # no "unclosed <search>" error
    assert protocol.parse("Film X </search>") == Action("none")
    # A disabled tool's closing tag after a call does not hide the call.
    assert protocol.parse("<calc>7</calc> </search>") == Action("calc", "7")
    assert PROTOCOL.parse("<calc>7</calc> </search>") == Action("none", None, "</search> without <search>")
    search_only = AgentProtocol([LocalSearchTool])
    assert search_only.parse("<python> print(1) </python>") == Action("none")
    assert search_only.parse("<search> a </search> <python> b </python>") == Action("search", "a")


def test_protocol_without_tools_parses_only_answers() -> None:
    protocol = AgentProtocol([])
    assert protocol.stop_strings == ("</answer>",)
    assert protocol.tool_names == ()
    assert protocol.parse("<think> a </think> <answer> \\boxed{Paris} </answer>") == Action("answer")
    assert protocol.parse("<answer> \\boxed{Paris}") == Action("answer", None, "unclosed <answer>")
    assert protocol.parse("<search> Film X </search>") == Action("none")
    assert protocol.parse("<python> print(1) </python>") == Action("none")
    assert protocol.parse("<search> Film X") == Action("none")
    assert protocol.parse("") == Action("none")
    assert AgentProtocol().stop_strings == ("</answer>",)


@pytest.mark.parametrize("reserved", ["answer", "think", "result"])
def test_protocol_rejects_reserved_tool_names(reserved: str) -> None:
    with pytest.raises(ValueError, match=f"'{reserved}' is reserved"):
        AgentProtocol([_Named(reserved)])
    with pytest.raises(ValueError, match="reserved"):
        AgentProtocol([LocalSearchTool, _Named(reserved)])


def test_protocol_rejects_two_tools_with_one_name() -> None:
    with pytest.raises(ValueError, match="two enabled tools are named 'search'"):
        AgentProtocol([LocalSearchTool, PythonTool, LocalSearchTool])
    with pytest.raises(ValueError, match="'calc'"):
        AgentProtocol([CalcTool, _Named("calc")])


def test_protocol_check_format_uses_its_tools() -> None:
    calc_call = "<think> a </think> <calc> 1+1 </calc> <result>\n2\n</result> <answer> \\boxed{2} </answer>"
    assert AgentProtocol([CalcTool]).check_format(calc_call) == (True, "")
    ok, reason = PROTOCOL.check_format(calc_call)
    assert not ok and reason == "<result> without a preceding tool call"


def test_render_prompt_passes_user_message_whole(tokenizer) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = render_prompt(tokenizer, "  Who? ", "S")
    assert _text(tokenizer, ids) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n  Who? <|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(TypeError):
        render_prompt(tokenizer, "Who?")  # the system prompt is required
