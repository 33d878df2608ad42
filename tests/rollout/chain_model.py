"""A real Qwen2 model that writes a planned text, for tests of the generators' stop checks.

The tokenizer has no merges, so every ASCII character is one token (a tag such as ``</search>``
is 9 tokens and a chunk boundary can fall after any of them); ``single`` texts are one token
each. The model's layers add nothing to the residual stream (attention and MLP outputs are
zero), so its next token depends only on the current one: each token of ``chain`` is followed,
with log-prob ~0, by the next one, and the last by EOS. The tokens of a chain are distinct, so
the text it writes is fixed whatever the context before its first token, and a continued call
goes on exactly where the last one stopped.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from at2po.tiny import train_tokenizer


def char_tokenizer(single: tuple[str, ...] = ()):
    """Every byte one token (no merges); each text of ``single`` one token too."""
    tok = train_tokenizer(["x"], vocab_size=200, added_tokens=single)
    assert len(tok.encode("</search>", add_special_tokens=False)) == 9
    return tok


def chain_model(tok, chain: list[int], *, hidden: int = 64, margin: float = 25.0, seed: int = 0) -> Qwen2ForCausalLM:
    """A model that, after token ``chain[i]``, writes ``chain[i + 1]`` (after the last: EOS).

    Head dimension 32 (2 heads over 64), the smallest vLLM's CPU attention takes; untied LM head.
    """
    if len(set(chain)) != len(chain):
        raise ValueError("the chain's tokens must be distinct: the next token depends on the current one only")
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 1.0, generator=gen)
        # Orthonormal directions for the chain's tokens: no other chain token scores near the next one.
        q, _ = torch.linalg.qr(torch.randn(hidden, len(chain), generator=gen))
        emb[chain] = q.T * hidden ** 0.5
        head = model.lm_head.weight
        head.zero_()
        for cur, nxt in zip(chain, [*chain[1:], tok.eos_token_id]):
            head[nxt] += emb[cur] / emb[cur].norm() * margin / hidden ** 0.5
    return model.eval()
