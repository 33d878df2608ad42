"""One training step at the paper's shapes (Qwen3's 151,936-token vocabulary, the paper's 22-leaf
trees, search results of hundreds of tokens a turn, responses into the thousands), run by
paper_shape_step.py in a fresh process (its --reduced trajectories: 1-3 searches, responses of
0.5-1.5k tokens; the full shapes are measured in the README's "Memory and speed at scale"): the step completes, the update trains, its forwards run
the trees' shared tokens once, and its peak memory stays within a bound derived from the chunk
size (not from a timing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

V = 151_936
CHUNK = 256  # trainer.logprob_chunk_tokens in paper_shape_step.py
BUDGET = 8192  # trainer.micro_batch_tokens there


def test_one_step_at_the_papers_shapes(tmp_path):
    script = Path(__file__).with_name("paper_shape_step.py")
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "--reduced"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # The paper's tree: N = 22 leaves; a long prompt; several searches per trajectory.
    assert r["rows"] == 22
    assert r["prompt_tokens"] >= 300
    assert max(r["response_tokens"]) >= 800 and sum(r["response_tokens"]) / 22 >= 500
    # Tree packing: the forwards ran at least the trees' distinct tokens (a token budget may cut a
    # tree between micro-batches, each then repeating the prefix it shares) and far fewer than the
    # rows hold.
    assert r["distinct_tokens"] <= r["forward_tokens"] < 0.8 * r["row_tokens"]
    assert r["rows_over_budget"] == 0
    # The update trained: rewards differ within the tree, so advantages, loss and gradient are not 0.
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert r["weights_moved"] > 1e-5  # beyond weight decay alone (lr 1e-3 x 0.01 x |w| ~ 1e-6)
    # Peak memory: a few chunks of fp32 logits (logits, log-softmax, their gradient, a temporary)
    # plus the 2-layer, 64-wide model's activations, the packed mask of one micro-batch and slack.
    mib = 2**20
    bound = 5 * CHUNK * V * 4 / mib + 300
    one_micro_batch_of_logits = BUDGET * V * 4 / mib  # what the full-logits path holds, ~2.5 times over
    assert r["peak_growth_mib"] <= bound < one_micro_batch_of_logits / 2, r
