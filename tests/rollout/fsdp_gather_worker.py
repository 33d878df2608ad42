"""Launched by tests/rollout/test_vllm_backend.py with torch.distributed.run (2 processes, gloo on
CPU): shard a saved model with torch's ``fully_shard`` (FSDP2), take one SGD step on the shards,
gather the full parameters as the trainer does under FSDP (``get_model_state_dict`` with
``full_state_dict=True``) and save them from rank 0.

    python -m torch.distributed.run --nproc_per_node 2 fsdp_gather_worker.py MODEL_DIR OUT LR TOKEN_IDS
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, out, lr, ids = sys.argv[1], sys.argv[2], float(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")]
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [p for p in model.parameters() if p.to_local().shape != p.shape]
    assert sharded, "fully_shard left every parameter whole"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = torch.tensor([ids])
    model(batch, labels=batch).loss.backward()
    opt.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        torch.save({name: tensor.detach().clone() for name, tensor in full.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
