"""Launched by tests/training/test_logprobs.py with torch.distributed.run (2 processes, gloo on
CPU): for each saved model, shard it with torch's ``fully_shard`` (FSDP2: each decoder layer, then
the root), run this rank's rows through ``sequence_logprobs`` (tree-packed, chunked output
head), backpropagate Σ w·log-prob, gather the full gradients (``p.grad.full_tensor()``) and save
them from rank 0; every rank saves its own log-probs. Not a test module.

    python -m torch.distributed.run --nproc_per_node 2 logprobs_fsdp_worker.py SPEC.json OUT_DIR MODEL_DIR...

SPEC.json: {"temperature": T, "chunk_tokens": k, "ranks": [{"sequences", "starts", "weights"} per rank]}.
Writes OUT_DIR/<model dir name>_grads.pt (rank 0) and OUT_DIR/<model dir name>_values_rank<r>.pt.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from at2po.training.logprobs import sequence_logprobs


def main() -> None:
    spec_file, out, *model_dirs = sys.argv[1:]
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = spec["ranks"][rank]
    for model_dir in map(Path, model_dirs):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(p.to_local().shape != p.shape for p in model.parameters()), "fully_shard left every parameter whole"
        lps = sequence_logprobs(model, mine["sequences"], mine["starts"], spec["temperature"],
                                chunk_tokens=spec["chunk_tokens"], tree_packing=True)
        loss = sum((torch.tensor(w, dtype=torch.float32) * lp).sum() for w, lp in zip(mine["weights"], lps))
        loss.backward()
        grads = {name: p.grad.full_tensor().detach().clone() for name, p in model.named_parameters()}  # collectives
        torch.save([lp.detach() for lp in lps], Path(out) / f"{model_dir.name}_values_rank{rank}.pt")
        if rank == 0:
            torch.save(grads, Path(out) / f"{model_dir.name}_grads.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
