"""Tiny, locally built tokenizers and models (no hub downloads).

Used by the tests and by the quickstart: a byte-level BPE tokenizer trained in-process on the
given texts, with Qwen-style ChatML markers and the agent tags as single tokens, and a
random-init causal LM of a real Hugging Face architecture sized to that tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END)

# Regular (non-special) added tokens: each encodes to one id and decodes back to its text.
AGENT_TAGS: tuple[str, ...] = (
    "<search>",
    "</search>",
    "<result>",
    "</result>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<python>",
    "</python>",
    "\\boxed{",
)

# Qwen-style ChatML (without Qwen's implicit default system message).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    added_tokens: Sequence[str] = AGENT_TAGS,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    ``special_tokens`` get the first ids, in order, and must contain ``EOS_TOKEN`` (the EOS, also
    used as pad, as in Qwen). ``added_tokens`` are regular tokens: one id each, decoded as text.
    The vocabulary may come out smaller than ``vocab_size`` when the texts have few merges.
    Text is NFC-normalised (as Qwen's tokenizer does), so decode(encode(s)) == s for NFC text.
    """
    if EOS_TOKEN not in special_tokens:
        raise ValueError(f"special_tokens must contain the EOS token {EOS_TOKEN!r}")
    backend = Tokenizer(models.BPE())
    # Exactly Qwen2's normalizer and pre-tokenizer: transformers 5 loads a saved qwen2 model
    # directory with Qwen2Tokenizer, which rebuilds this pipeline and ignores tokenizer.json's.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # Every byte is in the vocabulary, so any text round-trips (byte-level fallback).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[t for t in special_tokens if t != EOS_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-init fp32 causal LM ("qwen2" or "llama") whose vocabulary matches ``tokenizer``.

    Embeddings are tied to the LM head, as in the small Qwen2.5 models: at this size an untied
    head would be most of the parameters. The global torch RNG is left untouched.
    """
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if arch == "qwen2":
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        # HF init zeroes the padding_idx row; pad is EOS here, and a zero EOS row would pin the
        # (tied) EOS logit at exactly 0 for every input.
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.pad_token_id].normal_(0.0, config.initializer_range)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(torch.float32).eval()


def save_pretrained_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Write model and tokenizer into one directory, loadable with ``from_pretrained(path)``."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


_SUBJECTS = ("the river", "a small town", "the old library", "Marie Curie", "the first bridge", "a quiet lake")
_VERBS = ("was built in", "is located near", "was founded by", "flows through", "was named after")
_OBJECTS = ("the capital", "1887", "a famous painter", "the northern hills", "two brothers", "Zürich")


def synthetic_agent_texts(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` short ReAct-style transcripts using every agent tag: a corpus to train a tiny tokenizer on."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        fact = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        answer = rng.choice(_OBJECTS)
        texts.append(
            f"<think> I need to check whether {fact}. </think> <search> {fact} </search> "
            f"<result>\nPage 1: {fact.capitalize()}.\n</result> "
            f"<python> print({rng.randint(0, 999)} + {rng.randint(0, 999)}) </python> "
            f"<answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>"
        )
    return texts
