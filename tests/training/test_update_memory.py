"""The update's log-prob path at Qwen3's vocabulary (151,936 tokens) keeps its peak memory to a
few chunks of logits, not the rows' full (rows x T x V) logits.

Measured in a fresh subprocess as the growth of the peak RSS over what the model and batch already
hold, after a warm-up call: Linux's VmHWM, reset to the current RSS just before the call (writing 5
to /proc/self/clear_refs; ru_maxrss would not do: exec keeps the parent's high-water mark). A bound
derived from the chunk size, not a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

V = 151_936
ROWS, PROMPT, RESPONSE, CHUNK, WIDTH = 2, 128, 1024, 128, 64

CHILD = f"""
import json, torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from at2po.training.logprobs import sequence_logprobs
torch.manual_seed(0)
config = Qwen3Config(vocab_size={V}, hidden_size={WIDTH}, intermediate_size={2 * WIDTH}, num_hidden_layers=2,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)
model = Qwen3ForCausalLM(config).float().train()
seqs = [torch.randint(0, {V}, ({PROMPT + RESPONSE},)).tolist() for _ in range({ROWS})]
starts = [{PROMPT}] * {ROWS}
def call(rows, chunk, packed):
    lps = sequence_logprobs(model, rows, starts[:len(rows)], chunk_tokens=chunk, tree_packing=packed)
    sum(lp.sum() for lp in lps).backward()
    model.zero_grad(set_to_none=True)
call([s[:{PROMPT} + 32] for s in seqs], 16, MODE)  # warm-up: kernels, allocator, grads' first allocation
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
call(seqs, {CHUNK}, MODE)
print(json.dumps({{"growth_mib": (status("VmHWM") - before) / 1024, "before_mib": before / 1024}}))
"""


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "tree-packed"])
def test_the_chunked_path_peaks_at_a_few_chunks_of_logits_at_qwen3s_vocabulary(packed):
    out = subprocess.run([sys.executable, "-c", CHILD.replace("MODE", str(packed))], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    mib = 2**20
    chunk_logits = CHUNK * V * 4 / mib  # one chunk's fp32 logits: 74 MiB
    full_logits = ROWS * RESPONSE * V * 4 / mib  # the rows' fp32 logits: 1,187 MiB (the full path keeps ~2.5x)
    # Live at once in a chunk's backward: its logits, their log-softmax, its gradient and one
    # temporary; plus the activations and gradients of a 2-layer, 64-wide model (tens of MiB) and
    # allocator slack. A regression to full logits exceeds it by a wide margin.
    bound = 5 * chunk_logits + 200
    assert growth <= bound, f"peak grew by {growth:.0f} MiB, bound {bound:.0f} MiB (full logits: {full_logits:.0f} MiB)"
    assert bound < full_logits / 2
