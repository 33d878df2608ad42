"""One process of the multi-process tests (tests/training/test_distributed.py), started by
``accelerate launch``. Not a test module.

    python dist_worker.py train  ASSETS OUT TAG [overrides...]   # fit(resume=True); every process
        appends what it contributes to each metrics reduction to OUT/debug/TAG_rank<r>.jsonl
    python dist_worker.py update ASSETS OUT TAG [overrides...]   # one step on scripted rollouts;
        the main process saves the updated weights to OUT/TAG_weights.pt (reductions recorded too)
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest helpers

from conftest import ANSWER, SEARCH, StatelessGenerator, make_run_cfg  # noqa: E402

from at2po.rollout.generator import Generation  # noqa: E402
from at2po.training.trainer import Trainer  # noqa: E402


class ContextKeyedGenerator(StatelessGenerator):
    """Scripted turns that depend only on the context and how often it was asked before, so that
    any split of the prompts over processes yields the same rollouts."""

    def __init__(self, tok):
        self.tok, self.eos_token_id = tok, tok.eos_token_id
        self.seen: dict[bytes, int] = {}

    def generate(self, contexts, params, max_new_tokens=None):
        out = []
        for ctx in contexts:
            key = repr(list(ctx)).encode()
            k = self.seen.get(key, 0)
            self.seen[key] = k + 1
            pick = zlib.crc32(key + str(k).encode()) % 3
            text = [SEARCH.format(q="Mila Tarn"), ANSWER.format(a="Mila Tarn"), ANSWER.format(a="Quovia river")][pick]
            ids = self.tok.encode(text, add_special_tokens=False)
            stop = "</search>" if pick == 0 else None
            out.append(Generation(ids if stop else ids + [self.eos_token_id], [-1.0] * (len(ids) + (not stop)),
                                  "stop" if stop else "eos", stop))
        return out


def record_reductions(trainer: Trainer, path: Path) -> None:
    """Append each local contribution to a metrics reduction, labelled with the step it is logged at."""
    reduce, train_step, validate = trainer._reduce, trainer.train_step, trainer.validate
    label = {"step": 0}

    def step():
        label["step"] = trainer.step + 1
        return train_step()

    def val():
        label["step"] = trainer.step
        return validate()

    def keep(local):
        with path.open("a") as f:
            f.write(json.dumps({"step": label["step"], **local.as_dict()}) + "\n")
        return reduce(local)

    trainer._reduce, trainer.train_step, trainer.validate = keep, step, val


def count_gradient_allreduces(trainer: Trainer) -> list[int]:
    """Count DDP's gradient all-reduces (one per bucket per synchronised backward); [] when the
    model is not DDP-wrapped (one process)."""
    calls: list[int] = []
    if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, hook)
    return calls


def main() -> None:
    torch.set_num_threads(1)
    mode, assets, out, tag, *overrides = sys.argv[1:]
    assets, out = Path(assets), Path(out)
    cfg = make_run_cfg(assets, out / "run", *overrides)
    trainer = Trainer(cfg)
    rank = trainer.accelerator.process_index
    (out / "debug").mkdir(parents=True, exist_ok=True)
    record_reductions(trainer, out / "debug" / f"{tag}_rank{rank}.jsonl")
    if mode == "train":
        trainer.fit(resume=True)
    elif mode == "update":
        trainer.generator = trainer.engine.generator = ContextKeyedGenerator(trainer.tokenizer)
        for group in trainer.optimizer.param_groups:  # eps ≫ |g|: the first Adam step is ≈ lr·g
            group["eps"] = 1.0
        allreduces = count_gradient_allreduces(trainer)
        metrics = trainer.train_step()
        if trainer.is_main:
            weights = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
            torch.save({"weights": weights, "metrics": metrics, "allreduces": allreduces}, out / f"{tag}_weights.pt")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    trainer.end()
    assert not torch.distributed.is_initialized()  # end() released the group


if __name__ == "__main__":
    main()
    # Everything the tests read is on disk. Leave without interpreter finalisation: with torch
    # 2.13, a gloo group that DDP has wrapped a model with keeps its worker threads after
    # destroy_process_group (measured), so they are torn down during finalisation, where a
    # finished worker was once seen to abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
