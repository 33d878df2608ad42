"""dist_worker.py's ``update`` mode (one step on scripted rollouts, Accelerate launch), with each
process's micro-batch plan recorded: OUT/TAG_plan_rank<r>.json holds the plan of every epoch
_epoch_plan drew (mini-batches as [rows, micro-batches]) and the length of each row of that
process's batch. Started by tests/training/test_logprobs.py; not a test module.

    python logprobs_ddp_worker.py update ASSETS OUT TAG [overrides...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest

import dist_worker  # noqa: E402

from at2po.training.trainer import Trainer  # noqa: E402


class PlanRecordingTrainer(Trainer):
    def _epoch_plan(self, batch, n_trees):
        plan = super()._epoch_plan(batch, n_trees)
        out, tag = Path(sys.argv[3]), sys.argv[4]
        path = out / f"{tag}_plan_rank{self.accelerator.process_index}.json"
        kept = json.loads(path.read_text()) if path.exists() else {"plans": []}
        kept["plans"].append(plan)
        kept["lengths"] = [len(s) for s in batch.sequences]
        path.write_text(json.dumps(kept))
        return plan


if __name__ == "__main__":
    dist_worker.Trainer = PlanRecordingTrainer
    dist_worker.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dist_worker.py leaves (gloo's threads and interpreter finalisation)
