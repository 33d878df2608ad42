"""GPU benchmark (a few minutes on one H100/H200): a random-init model shaped like Qwen3-0.6B.

    python benchmarks/bench_gpu.py                          # on a CUDA machine
    python benchmarks/bench_gpu.py --backends hf,vllm       # HF and vLLM generation (pip install 'at2po[vllm]')
    python benchmarks/bench_gpu.py --tiny                   # smoke run of the same code on CPU

Measures generation throughput of each backend (``--backends``; HFGenerator: batched sampling
with KV cache; vllm: the in-process vLLM engine) at each batch size of ``--gen-batches``, one training step
(forward + backward of the response log-probs and the ATPO loss) in tokens/s, and the loss's
share of the step. Prints one JSON line with the card's name.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from at2po.algorithms.losses import policy_loss, turn_ids_from_mask
from at2po.rollout.generator import HFGenerator, SamplingParams


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--gen-batches", default="64,256", help="comma-separated generation batch sizes")
    ap.add_argument("--backends", default="hf", help="comma-separated generator backends: hf, vllm")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-len", type=int, default=2048)
    args = ap.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from at2po.tiny import synthetic_agent_texts, train_tokenizer

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=1000, head_dim=32)  # vLLM: head dim >= 32
        args.gen_batches, args.ctx, args.new, args.train_batch, args.train_len = "4", 32, 16, 2, 64
    else:  # Qwen3-0.6B's shape
        shape = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     intermediate_size=3072, vocab_size=151936, head_dim=128)
    tok = train_tokenizer(synthetic_agent_texts(50), vocab_size=300)  # only its EOS id is used
    torch.manual_seed(0)
    cfg = Qwen3Config(**shape, max_position_embeddings=8192, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
           "params_M": round(n_params / 1e6, 1), "torch": torch.__version__}

    # Generation: random contexts, no stop strings, EOS made (nearly) impossible so rows run to the limit.
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id].zero_()
    batches = [int(b) for b in args.gen_batches.split(",")]
    ctxs = torch.randint(300, shape["vocab_size"], (max(batches), args.ctx)).tolist()
    params = SamplingParams(max_new_tokens=args.new)
    out.update(gen_ctx=args.ctx, gen_new=args.new)
    for backend in args.backends.split(","):
        if backend == "hf":
            gen = HFGenerator(model, tok, seed=0, eos_token_ids=[-1])
        else:  # the engine shares the GPU with the trainer's model, as in training
            from at2po.rollout.vllm_backend import VLLMGenerator

            t0 = time.perf_counter()
            gen = VLLMGenerator(model, tok, seed=0)
            out[f"{backend}_build_seconds"] = round(time.perf_counter() - t0, 1)
        gen.generate(ctxs[:2], SamplingParams(max_new_tokens=4))  # warm-up
        for batch in batches:
            sync()
            t0 = time.perf_counter()
            res = gen.generate(ctxs[:batch], params)
            sync()
            dt = time.perf_counter() - t0
            n_tok = sum(len(r.token_ids) for r in res)
            out[f"{backend}_gen_b{batch}_tokens_per_s"] = round(n_tok / dt, 1)
            out[f"{backend}_gen_b{batch}_seconds"] = round(dt, 2)
        if hasattr(gen, "close"):
            gen.close()
    if "vllm" in args.backends and "hf" in args.backends:
        for batch in batches:
            out[f"vllm_over_hf_b{batch}"] = round(out[f"vllm_gen_b{batch}_tokens_per_s"] / out[f"hf_gen_b{batch}_tokens_per_s"], 2)

    # One training step: forward + backward over (B, T), ATPO loss over the second half (the response).
    model.train()
    model.gradient_checkpointing_enable()
    B, T = args.train_batch, args.train_len
    ids = torch.randint(300, shape["vocab_size"], (B, T), device=device)
    resp = T // 2
    mask = torch.ones(B, resp, dtype=torch.long, device=device)
    mask[:, ::97] = 0  # observation gaps split turns
    adv = torch.randn(B, resp, device=device)
    old = None

    def step():
        nonlocal old
        logits = model(input_ids=ids).logits[:, T - resp - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, T - resp:, None]).squeeze(-1)
        if old is None:
            old = logp.detach() + 0.001
        sync()
        t_loss = time.perf_counter()
        loss, _ = policy_loss(logp, old, adv, mask, level="turn", turn_ids=turn_ids_from_mask(mask))
        sync()
        t_loss = time.perf_counter() - t_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return t_loss

    step()  # warm-up
    sync()
    t0 = time.perf_counter()
    t_loss = step()
    sync()
    dt = time.perf_counter() - t0
    # Loss fwd+bwd alone, on detached log-probs of the same shape.
    lp = old.clone().requires_grad_(True)
    sync()
    t1 = time.perf_counter()
    loss, _ = policy_loss(lp, old, adv, mask, level="turn")
    loss.backward()
    sync()
    t_loss_fb = time.perf_counter() - t1
    out.update(train_batch=B, train_len=T, step_seconds=round(dt, 3), train_tokens_per_s=round(B * T / dt, 1),
               loss_fwd_seconds=round(t_loss, 4), loss_fwd_bwd_seconds=round(t_loss_fb, 4),
               loss_share_of_step=round(t_loss_fb / dt, 4))
    if device == "cuda":
        out["max_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
