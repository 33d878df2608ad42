"""The ``at2po`` trainer mode of verl's v1 trainer (``trainer.v1.trainer_mode=at2po``).

verl's synchronous v1 trainer (``sync``) with one step changed: the advantage step. The stock step
fetches a fixed list of fields from the transfer queue, takes each row's reward from ``rm_scores``
(for a multi-output agent loop, the last output's reward copied to every output) and calls the
estimator with ``uid`` as its only non-tensor field. This one also fetches ``extra_fields``, puts
each leaf's own reward (``at2po_leaf_reward``, written by the ``at2po_tree`` agent loop) on the last
token of its row, writes those scores back as the row's ``rm_scores``, and calls the estimator with
the tree fields (``at2po_node_path``, ``at2po_node_entropy``) and one tree id per agent-loop run
(``{uid}_{session}``: with ``rollout.n > 1`` one uid would hold several trees).

With ``AT2PO_VERL_DUMP_DIR`` set, each step writes what the advantage step read and computed to
``$AT2PO_VERL_DUMP_DIR/advantage_step_{k}.pt`` (what the CI checks compare with at2po's own credit).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from at2po.integrations.verl import NODE_ENTROPY, NODE_PATH, compute_advantage
from at2po.integrations.verl.agent_loop import LEAF_REWARD

__all__ = ["AT2PO_TRAINER", "DUMP_ENV", "TreeTrainer", "leaf_scores", "tree_ids_from_keys"]

AT2PO_TRAINER = "at2po"
DUMP_ENV = "AT2PO_VERL_DUMP_DIR"
_FIELDS = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "extra_fields"]


def tree_ids_from_keys(keys) -> np.ndarray:
    """The tree of each row: verl's v1 keys are ``{uid}_{session}_{output}`` and one agent-loop run
    (one session) grows one tree."""
    ids = []
    for key in keys:
        parts = str(key).rsplit("_", 2)
        if len(parts) != 3:
            raise ValueError(f"transfer-queue key {key!r} is not verl's '{{uid}}_{{session}}_{{output}}'")
        ids.append(f"{parts[0]}_{parts[1]}")
    return np.array(ids, dtype=object)


def leaf_scores(extra_fields: list[dict], lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) scores with each row's own leaf reward on its last response token (where verl
    puts an outcome reward), from the rows' ``extra_fields``; ``lengths`` are the response lengths."""
    scores = torch.zeros((len(lengths), width), dtype=torch.float32)
    for row, (extra, length) in enumerate(zip(extra_fields, lengths)):
        if not isinstance(extra, dict) or LEAF_REWARD not in extra or NODE_PATH not in extra:
            raise ValueError(f"row {row} has no {LEAF_REWARD}/{NODE_PATH} in extra_fields: trainer.v1.trainer_mode=at2po "
                             "trains rows of the at2po_tree agent loop (actor_rollout_ref.rollout.agent.default_agent_loop=at2po_tree)")
        scores[row, max(int(length), 1) - 1] = float(extra[LEAF_REWARD])
    return scores


@register_trainer(AT2PO_TRAINER)
class TreeTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer whose advantage step feeds the tree estimator each leaf's own
    reward and the tree fields (module docstring)."""

    def init(self):
        algo = self.config.algorithm
        if algo.use_kl_in_reward:
            raise ValueError("algorithm.use_kl_in_reward=true is not supported by trainer.v1.trainer_mode=at2po "
                             "(AT²PO uses no KL term): set it to false")
        return super().init()

    def _compute_advantage(self, batch, metrics: dict):
        dumping = bool(os.environ.get(DUMP_ENV))
        fields = _FIELDS + (["responses", "reward_model"] if dumping else [])
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        truths = data.pop("reward_model").tolist() if dumping else None
        nested_mask = data["response_mask"]
        extra = data.pop("extra_fields")
        extra = extra.tolist() if hasattr(extra, "tolist") else list(extra)
        uids = data.pop("uid")
        uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
        proto = DataProto(batch=data.to_padded_tensor())
        mask = proto.batch["response_mask"]
        stock_scores = proto.batch["rm_scores"].clone()  # the last output's reward, copied by verl's worker
        scores = leaf_scores(extra, nested_mask.offsets().diff().tolist(), mask.shape[1])
        proto.batch["token_level_scores"] = scores
        proto.batch["token_level_rewards"] = scores
        proto.non_tensor_batch["uid"] = tree_ids_from_keys(batch.keys)
        proto.non_tensor_batch[NODE_PATH] = _object_rows([np.asarray(e[NODE_PATH], dtype=np.int64) for e in extra])
        proto.non_tensor_batch[NODE_ENTROPY] = _object_rows([np.asarray(e[NODE_ENTROPY], dtype=np.float64) for e in extra])

        # Rollout correction as verl's own step does it (decoupled mode only).
        corr = self.config.algorithm.get("rollout_correction", None)
        bypass = corr and corr.get("bypass_mode", False)
        corrected = corr is not None and "rollout_log_probs" in proto.batch and not bypass
        if corrected:
            proto, corr_metrics = compute_rollout_correction_and_add_to_batch(proto, corr)
            metrics.update(corr_metrics)

        proto = compute_advantage(proto, self.config.algorithm, estimator=self.config.algorithm.adv_estimator)
        if dumping:
            _dump(self.global_steps, batch.keys, uids, proto, extra, stock_scores, truths)

        fields = ["advantages", "returns", "rm_scores"]
        proto.batch["rm_scores"] = scores
        if corrected:
            fields.append("response_mask")
            if "rollout_is_weights" in proto.batch:
                fields.append("rollout_is_weights")
        out = TensorDict({f: response_to_nested(proto.batch[f], nested_mask) for f in fields}, batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out)


def _object_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding one array per row (``np.array`` of equal-length arrays would
    make a 2-D array instead, which DataProto's row indexing would not keep per row)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _dump(step, keys, uids, proto, extra, stock_scores, truths) -> None:
    folder = os.environ[DUMP_ENV]
    Path(folder).mkdir(parents=True, exist_ok=True)
    b = proto.batch
    torch.save({
        "keys": list(keys), "uid": list(uids), "tree": list(proto.non_tensor_batch["uid"]),
        NODE_PATH: [e[NODE_PATH] for e in extra], NODE_ENTROPY: [e[NODE_ENTROPY] for e in extra],
        LEAF_REWARD: [e[LEAF_REWARD] for e in extra], "duplicate": [e.get("at2po_duplicate") for e in extra],
        "tree_generated_tokens": [e.get("at2po_tree_generated_tokens") for e in extra],
        "response_mask": b["response_mask"].cpu(), "token_level_rewards": b["token_level_rewards"].cpu(),
        "stock_rm_scores": stock_scores.cpu(), "advantages": b["advantages"].cpu(),
        "old_log_probs": b["old_log_probs"].cpu(), "rollout_log_probs": b["rollout_log_probs"].cpu(),
        "responses": b["responses"].cpu(), "reward_model": truths,
    }, Path(folder) / f"advantage_step_{step}.pt")
