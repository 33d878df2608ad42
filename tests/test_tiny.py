import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from at2po.tiny import (
    AGENT_TAGS,
    EOS_TOKEN,
    IM_END,
    IM_START,
    build_tiny_model,
    save_pretrained_dir,
    synthetic_agent_texts,
    train_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "The river flows through the capital.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "<think> plan </think><search>who built it?</search> <result>\nPage 1: text\n</result>",
    "<answer> The final answer is \\[ \\boxed{1887} \\] </answer>",
    "Zürich, naïve café, 漢字, Ελληνικά, emoji 😀 and 12345 + 0.5",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(300))


def test_synthetic_texts_are_deterministic_and_use_every_tag():
    texts = synthetic_agent_texts(20, seed=3)
    assert texts == synthetic_agent_texts(20, seed=3)
    assert texts != synthetic_agent_texts(20, seed=4)
    assert all(tag in texts[0] for tag in AGENT_TAGS)


def test_special_tokens(tok):
    assert tok.eos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.pad_token_id
    for special in (EOS_TOKEN, IM_START, IM_END):
        assert len(tok.encode(special)) == 1
    assert tok.encode(f"{IM_START}user")[0] == tok.convert_tokens_to_ids(IM_START)


def test_agent_tags_are_single_regular_tokens(tok):
    for tag in AGENT_TAGS:
        ids = tok.encode(tag)
        assert len(ids) == 1, tag
        assert tag not in tok.all_special_tokens
        # Inside running text too, and they survive skip_special_tokens (they are not special).
        ids = tok.encode(f"a{tag}b")
        assert tok.convert_tokens_to_ids(tag) in ids
        assert tok.decode(ids, skip_special_tokens=True) == f"a{tag}b"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_eos_required():
    small = train_tokenizer(synthetic_agent_texts(300), vocab_size=300)
    assert small.backend_tokenizer.get_vocab_size(with_added_tokens=False) <= 300
    assert small.decode(small.encode(ROUND_TRIP_TEXTS[-1])) == ROUND_TRIP_TEXTS[-1]
    with pytest.raises(ValueError, match="EOS"):
        train_tokenizer(["hello"], special_tokens=(IM_START, IM_END))


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "<answer> \\boxed{Curie} </answer>"},
        {"role": "user", "content": "Sure?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWho?<|im_end|>\n"
        "<|im_start|>assistant\n<answer> \\boxed{Curie} </answer><|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tok.apply_chat_template(messages[:2], tokenize=False)
    assert without_prompt.endswith("Who?<|im_end|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(text)


@pytest.mark.parametrize("arch,model_type", [("qwen2", "qwen2"), ("llama", "llama")])
def test_build_tiny_model(tok, arch, model_type):
    model = build_tiny_model(tok, arch=arch, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    cfg = model.config
    assert cfg.model_type == model_type
    assert cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == cfg.pad_token_id == tok.eos_token_id
    assert cfg.num_key_value_heads == 2 and cfg.hidden_size == 32
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The EOS/pad embedding row is random like the others, not HF's zeroed padding row.
    assert model.get_input_embeddings().weight[tok.eos_token_id].abs().sum() > 0
    logits = model(torch.tensor([tok.encode("the river")])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_build_tiny_model_is_deterministic_and_keeps_global_rng(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_model(tok, seed=5)
    c = build_tiny_model(tok, seed=6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tok, arch="gpt9")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_and_load_offline(tok, tmp_path, monkeypatch, arch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_model(tok, arch=arch, hidden_size=32, intermediate_size=64)
    save_pretrained_dir(model, tok, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)

    ids = torch.tensor([tok.encode(ROUND_TRIP_TEXTS[2])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # transformers may load the tokenizer under another class (Qwen2Tokenizer for qwen2): it
    # must still tokenize exactly like the trained one.
    for text in ROUND_TRIP_TEXTS:
        assert loaded_tok.encode(text) == tok.encode(text)
        assert loaded_tok.decode(loaded_tok.encode(text)) == text
    assert len(loaded_tok) == len(tok)
    assert loaded_tok.eos_token_id == loaded_tok.pad_token_id == tok.eos_token_id
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded.generation_config.eos_token_id == tok.eos_token_id
