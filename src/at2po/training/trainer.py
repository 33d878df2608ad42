"""The AT²PO trainer: one step = tree rollout → rewards → advantages → policy update.

Built on Hugging Face Accelerate (each process rolls out its own share of the step's prompts).
Every objective and credit variant of docs/method.md is a config setting (see at2po.config);
the task, tools and generator backend come from the registries through ``at2po.factory``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from at2po.algorithms.advantages import compute_advantages
from at2po.algorithms.losses import aggregate, kl_penalty, logprob_mismatch, policy_loss
from at2po.config import Config, config_to_dict, save_config
from at2po.evaluation.evaluator import evaluate_greedy
from at2po.factory import build_engine, build_task, build_tools, load_model, load_tokenizer
from at2po.rollout.engine import RolloutResult
from at2po.rollout.generator import common_prefix_length
from at2po.training.distributed import (
    LocalMetrics,
    all_gather_objects,
    check_fsdp_request,
    check_world_size,
    full_optimizer_state,
    full_state_dict,
    is_fsdp,
    load_full_state,
    pad_plans,
    reduce_metrics,
    std_from_moments,
)
from at2po.tools.health import check_tools, preflight_tools
from at2po.training.logprobs import head_fallback_reason, pack_rows, packing_fallback_reason, sequence_logprobs
from at2po.training.prompt_limits import drop_long_prompts
from at2po.training.run_dir import (CHECKPOINT_STATE, RunLock, check_data_size, check_finite_weights, check_fresh,
                                    check_not_in_use, check_resume_config, completed_checkpoints, load_newest_valid,
                                    mark_run, prepare_fresh, remove_stale_temps, rewrite_metrics, save_atomically)


# -- data order ------------------------------------------------------------------------------------
class PromptSampler:
    """Seeded epoch-wise shuffling with an explicit position, so a resumed run sees the same prompts."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order()
            out.append(int(order[self.pos]))
            self.pos += 1
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = d["epoch"], d["pos"]
        if d.get("n", self.n) != self.n:  # another training set (a forced resume): begin a new epoch of it
            self.epoch, self.pos = self.epoch + 1, 0


# -- batches -----------------------------------------------------------------------------------------
@dataclass
class TrainBatch:
    """Padded rows of one step. Response tensors are (B, T), right-padded."""

    sequences: list[list[int]]  # prompt + response ids per row
    response_starts: list[int]
    tree_of_row: np.ndarray
    response_mask: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    turn_ids: torch.Tensor

    def rows(self, idx: list[int]) -> "TrainBatch":
        return TrainBatch(
            [self.sequences[i] for i in idx], [self.response_starts[i] for i in idx], self.tree_of_row[idx],
            self.response_mask[idx], self.old_log_probs[idx], self.advantages[idx], self.turn_ids[idx],
        )


def _pad(arrays: list[np.ndarray], value, dtype) -> torch.Tensor:
    width = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), max(width, 1)), value, dtype=np.float64 if dtype.is_floating_point else np.int64)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.as_tensor(out, dtype=dtype)


def build_train_batch(result: RolloutResult, algo) -> tuple[TrainBatch, dict[str, float]]:
    """Per-token advantages of every leaf row from the estimator ``algo.advantage`` (docs/method.md §3)."""
    advs = compute_advantages(
        algo.advantage, [t.to_arrays() for t in result.trees],
        [(row.tree, row.sequence.leaf, row.sequence.token_node) for row in result.rows],
        value_mode=algo.value_mode, adv_mode=algo.adv_mode, normalize_leaves=algo.normalize_leaves,
    )
    seqs, starts, trees, masks, olds, tids = [], [], [], [], [], []
    for row in result.rows:
        tree = result.trees[row.tree]
        s = row.sequence
        seqs.append(tree.prompt_ids + s.response_ids.tolist())
        starts.append(len(tree.prompt_ids))
        trees.append(row.tree)
        masks.append(s.loss_mask)
        olds.append(s.old_log_probs)
        tids.append(s.turn_ids)
    batch = TrainBatch(
        seqs, starts, np.asarray(trees, dtype=np.int64), _pad(masks, 0, torch.long), _pad(olds, 0.0, torch.float32),
        _pad(advs, 0.0, torch.float32), _pad(tids, -1, torch.long),
    )
    m = batch.response_mask.bool()
    a = batch.advantages[m]
    stats = {
        "adv/mean": float(a.mean()) if a.numel() else 0.0,
        "adv/std": float(a.std()) if a.numel() > 1 else 0.0,
        "adv/abs_max": float(a.abs().max()) if a.numel() else 0.0,
        "adv/zero_frac": float((a == 0).float().mean()) if a.numel() else 0.0,
    }
    return batch, stats


def response_log_probs(model, batch: TrainBatch, temperature: float, share_prefix: bool = True, *,
                      chunk_tokens: int = 0, tree_packing: bool = False) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under ``model`` (right-padded like the batch), from
    one forward over the batch's rows (``at2po.training.logprobs.sequence_logprobs``: the output
    head in chunks of ``chunk_tokens`` positions, the rows trie-packed when ``tree_packing``).
    ``share_prefix=False`` runs one forward pass per call whatever the rows (FSDP: every process
    must run as many forwards as the others, and a shared prompt prefix adds one)."""
    kw = {} if share_prefix else {"min_shared_prefix": sys.maxsize}
    per_row = sequence_logprobs(model, batch.sequences, batch.response_starts, temperature=temperature,
                                chunk_tokens=chunk_tokens, tree_packing=tree_packing, **kw)
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=per_row[0].device)
    for i, lp in enumerate(per_row):  # scatter rows into the padded layout
        out[i, : lp.shape[0]] = lp
    return out


def forward_tokens(sequences: list[list[int]], packed: bool) -> int:
    """The tokens one forward over ``sequences`` runs: the trie's distinct tokens when packed, the
    padded rectangle (rows x longest row) when not."""
    if not sequences:
        return 0
    return len(pack_rows(sequences).tokens) if packed else len(sequences) * max(map(len, sequences))


def token_budget_micro_batches(sequences: list[list[int]], rows: list[int], budget: int,
                               packed: bool) -> tuple[list[list[int]], int]:
    """Split ``rows`` into micro-batches whose forward runs at most ``budget`` tokens (as
    :func:`forward_tokens` counts them), greedily in an order that keeps the count low: longest
    first when padded (similar lengths share a rectangle), lexicographic when packed (rows that
    share a prefix sit together, and a row's new tokens are its length minus its common prefix
    with the row before it). A row longer than the budget runs alone. Returns the micro-batches
    and how many rows exceeded the budget."""
    if packed:
        order = sorted(rows, key=lambda r: list(sequences[r]))
    else:
        order = sorted(rows, key=lambda r: -len(sequences[r]))
    micros: list[list[int]] = []
    current: list[int] = []
    cost = over = 0
    for r in order:
        seq = sequences[r]
        if packed:
            prev = sequences[current[-1]] if current else []
            grown = cost + len(seq) - common_prefix_length([prev, seq], min(len(prev), len(seq)))
        else:
            grown = (len(current) + 1) * (len(sequences[current[0]]) if current else len(seq))
        if current and grown > budget:
            micros.append(current)
            current, cost = [], 0
            grown = len(seq)
        current.append(r)
        cost = grown
        if len(seq) > budget:  # alone: close it at once
            over += 1
            micros.append(current)
            current, cost = [], 0
    if current:
        micros.append(current)
    return micros, over


# -- logging -----------------------------------------------------------------------------------------
class MetricsLogger:
    """Console, JSONL, TensorBoard and (optionally) W&B, one call per step."""

    def __init__(self, out_dir: Path, cfg: Config, enabled: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.trainer.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: pip install tensorboard (metrics still go to metrics.jsonl)")
        if cfg.trainer.wandb:
            import wandb  # an explicit opt-in: fail loudly if missing

            self.wandb = wandb.init(project=cfg.trainer.wandb_project, config=config_to_dict(cfg), dir=str(out_dir))

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if console:
            keys = [k for k in ("reward/mean", "reward/em", "val/em", "loss/policy", "loss/clipfrac",
                                "loss/turn_kl_entropy", "rollout/leaves_per_tree", "rollout/tool_calls",
                                "rollout/tool_failures", "time/step") if k in metrics]
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in keys))  # keeps bars intact

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def plot_metrics(jsonl: str | Path, png: str | Path) -> Path:
    """Training curves (reward, EM, validation EM, clip fraction, H_turn, tokens) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    panels = [("reward/mean", "train reward"), ("reward/em", "train EM"), ("val/em", "held-out EM (greedy)"),
              ("loss/clipfrac", "clip fraction"), ("loss/turn_kl_entropy", "H_turn"),
              ("rollout/generated_tokens", "generated tokens / step")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, alpha=1.0 if key == "val/em" else 0.35)
            if key != "val/em" and len(pts) >= 10:  # per-step metrics are noisy: add a moving average
                w = 5
                ma = np.convolve(ys, np.ones(w) / w, mode="valid")
                ax.plot(xs[w - 1:], ma, color="C0", lw=2, label=f"{w}-step mean")
                ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


# -- checkpoints ---------------------------------------------------------------------------------------
def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    done = completed_checkpoints(out_dir)
    return done[-1] if done else None


# -- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, *, tools: list | None = None):
        from accelerate import Accelerator

        self.cfg = cfg
        tc = cfg.trainer
        self.out_dir = Path(tc.output_dir)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        check_world_size(tc.prompts_per_step, tc.mini_batch_prompts, self.accelerator.num_processes)
        check_fsdp_request(self.accelerator)
        rank = self.accelerator.process_index
        random.seed(tc.seed + rank)
        np.random.seed(tc.seed + rank)
        torch.manual_seed(tc.seed + rank)

        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model)
        if cfg.model.lora_rank:
            from at2po.training.lora import apply_lora

            self.model = apply_lora(self.model, cfg.model)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = load_model(cfg.model, self.accelerator.device).eval()
            self.ref_model.requires_grad_(False)

        oc = cfg.optim
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(trainable, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / oc.warmup_steps) if oc.warmup_steps else 1.0)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        say = print if self.is_main else (lambda _: None)
        # The update's log-prob path (at2po.training.logprobs): both switches are exact where on;
        # a model that cannot take one runs the full path, and the log says why.
        self.tree_packing, self.chunk_tokens = tc.tree_packing, tc.logprob_chunk_tokens
        reason = packing_fallback_reason(self.model) if tc.tree_packing else None
        if reason:
            self.tree_packing = False
            say(f"trainer.tree_packing: off for this model ({reason}); rows run padded")
        reason = head_fallback_reason(self.model) if tc.logprob_chunk_tokens else None
        if reason:
            self.chunk_tokens = 0
            say(f"trainer.logprob_chunk_tokens: off for this model ({reason}); full logits are computed")
        # Under FSDP no process holds the whole policy, and the HF generator's forwards differ in
        # number between processes (collectives would hang): it samples from a full, unsharded
        # copy that receives the gathered weights after every update.
        self._gen_model = None
        if is_fsdp(self.accelerator):
            if cfg.model.lora_rank:
                raise ValueError("model.lora_rank > 0 with FSDP is not supported: LoRA is for one device; "
                                 "use full fine-tuning with FSDP or launch without FSDP")
            self._gen_model = load_model(cfg.model, self.accelerator.device).eval()
            self._gen_model.requires_grad_(False)

        self.task = build_task(cfg)
        if not cfg.data.train_file:
            raise ValueError(f"data.train_file is empty: give a data file of the {cfg.task.name!r} task")
        self.train_rows = self.task.load(cfg.data.train_file)
        self.val_rows = self.task.load(cfg.data.val_file) if cfg.data.val_file else []
        if cfg.data.val_size:
            self.val_rows = self.val_rows[: cfg.data.val_size]
        self.val_records: list[dict[str, Any]] = []  # this process's records of the last validation
        self.shuffle_rng = torch.Generator().manual_seed(tc.seed + 7919 * rank)

        self.tools = tools if tools is not None else build_tools(cfg, self.task)
        preflight_tools(self.tools)
        gen_model = self._gen_model if self._gen_model is not None else self.accelerator.unwrap_model(self.model)
        self.engine = build_engine(cfg, gen_model, self.tokenizer, task=self.task,
                                   tools=self.tools, seed=tc.seed + rank, progress=self._rollout_progress)
        self.train_rows = drop_long_prompts(self.engine, self.model, self.train_rows, "data.train_file", say)
        self.val_rows = drop_long_prompts(self.engine, self.model, self.val_rows, "data.val_file", say, allow_none=True)
        self.sampler = PromptSampler(len(self.train_rows), tc.seed, cfg.data.shuffle)
        self.generator = self.engine.generator
        self.step = 0
        self._bar = None

    # -- helpers -----------------------------------------------------------------------------

    def _rollout_progress(self, phase: str, turn: int, open_trajectories: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{phase} turn {turn}: {open_trajectories} generating")

    def _my_share(self, items: list) -> list:
        """This process's slice of a step's prompts (all of them on a single process)."""
        n, r = self.accelerator.num_processes, self.accelerator.process_index
        return items[r::n]

    # -- state ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_XXXXXX atomically: a temp dir renamed into place when complete
        (at2po.training.run_dir.save_atomically). The main process writes it; every process's RNG
        states travel in it."""
        self.accelerator.wait_for_everyone()
        rank_states = all_gather_objects(self.accelerator, self._rank_rng_state())
        fsdp = is_fsdp(self.accelerator)
        weights = full_state_dict(self.accelerator, self.model) if fsdp else None  # collectives
        optim_state = full_optimizer_state(self.accelerator, self.model, self.optimizer)
        if not self.is_main:
            return None
        # What the collectives above gathered, for _write_checkpoint (the main process only).
        self._gathered = {"weights": weights, "optimizer": optim_state, "rank_states": rank_states}
        try:
            return save_atomically(self.out_dir, self.step, self._write_checkpoint, self.cfg.trainer.keep_checkpoints)
        finally:
            self._gathered = None

    def _write_checkpoint(self, tmp: Path) -> None:
        gathered = self._gathered
        self.accelerator.unwrap_model(self.model).save_pretrained(tmp, safe_serialization=True,
                                                                  state_dict=gathered["weights"])
        self.tokenizer.save_pretrained(tmp)
        save_config(self.cfg, tmp / "config.yaml")
        state = {
            "step": self.step,
            "optimizer": gathered["optimizer"],
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": _rng_state(),
            "shuffle_rng": self.shuffle_rng.get_state(),
            "engine_rng": self.engine.rng.bit_generator.state,
            "generator_rng": self.generator.get_rng_state(),
            "rank_states": gathered["rank_states"],  # the RNG states above are rank_states[0]
        }
        torch.save(state, tmp / CHECKPOINT_STATE)

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict]:
        """(weights, trainer state) of a checkpoint, read completely before anything is applied."""
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError("no *.safetensors weights")
        weights = {}
        for f in files:
            weights.update(load_file(str(f)))
        state = torch.load(path / CHECKPOINT_STATE, weights_only=False)
        check_finite_weights(path, weights)
        return weights, state

    def load_checkpoint(self, path: str | Path, loaded: tuple[dict, dict] | None = None) -> None:
        path = Path(path)
        weights, state = loaded if loaded is not None else self._read_checkpoint(path)
        model = self.accelerator.unwrap_model(self.model)
        if self.cfg.model.lora_rank:
            from at2po.training.lora import load_adapter_weights

            load_adapter_weights(model, weights, path)
        elif is_fsdp(self.accelerator):
            load_full_state(self.accelerator, self.model, self.optimizer, weights, state["optimizer"])
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            # Tied embeddings are saved once; anything else missing means a wrong checkpoint.
            missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
            if missing or unexpected:
                raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if not is_fsdp(self.accelerator):
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        ranks = state.get("rank_states") or [{k: state[k] for k in ("rng", "shuffle_rng", "engine_rng", "generator_rng")}]
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        if len(ranks) == n:
            self._set_rank_rng_state(ranks[rank])
        else:
            # Another world size: processes hold other prompts than before, so the saved streams
            # have no counterpart; each process draws fresh ones from (seed, step, rank).
            seed = [self.cfg.trainer.seed, self.step, rank]
            random.seed(str(seed))
            np.random.seed(seed)
            torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            self.shuffle_rng.manual_seed(int(np.random.SeedSequence([*seed, 1]).generate_state(1)[0]))
            self.engine.rng = np.random.default_rng([*seed, 2])
            if self.is_main:
                print(f"{path} was written by {len(ranks)} process(es), resuming with {n}: prompts are split "
                      f"anew and each process's random streams are reseeded from (seed, step, rank)")
        if self._gen_model is not None:
            self._gen_model.load_state_dict(full_state_dict(self.accelerator, self.model))

    def _rank_rng_state(self) -> dict:
        return {"rng": _rng_state(), "shuffle_rng": self.shuffle_rng.get_state(),
                "engine_rng": self.engine.rng.bit_generator.state, "generator_rng": self.generator.get_rng_state()}

    def _set_rank_rng_state(self, s: dict) -> None:
        _set_rng_state(s["rng"])
        self.shuffle_rng.set_state(s["shuffle_rng"])
        self.engine.rng.bit_generator.state = s["engine_rng"]
        self.generator.set_rng_state(s["generator_rng"])

    # -- one step ------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Greedy validation (the shared evaluator) on data.val_file: the task's metrics, turns
        and tool calls per row, as ``val/<name>`` means over every process's rows. This process's
        per-row records stay in ``self.val_records``."""
        if not self.val_rows:
            return {}
        t0 = time.perf_counter()
        self.val_records = evaluate_greedy(self.engine, self._my_share(self.val_rows))
        keys = [*self.task.metrics, "turns", "tool_calls"]
        local = LocalMetrics()
        for k in keys:
            local.mean(f"val/{k}", sum(float(r[k]) for r in self.val_records), len(self.val_records))
        local.maxima["time/val"] = time.perf_counter() - t0
        return self._reduce(local)

    def _reduce(self, local: LocalMetrics) -> dict[str, float]:
        """Metrics over every process (one collective; every process must call it)."""
        return reduce_metrics(self.accelerator, local)

    def train_step(self) -> dict[str, float]:
        cfg, tc = self.cfg, self.cfg.trainer
        t0 = time.perf_counter()
        idx = self._my_share(self.sampler.take(tc.prompts_per_step))
        prompts = [self.engine.prompt(self.train_rows[i]) for i in idx]
        result = self.engine.rollout(prompts)
        check_tools(self.tools)  # stop before a step trained on a dead retriever's error messages
        t_rollout = time.perf_counter() - t0
        sleep = getattr(self.generator, "sleep", None)
        if sleep is not None:  # an inference engine on the training GPU frees its memory for the update
            sleep()

        batch, _ = build_train_batch(result, cfg.algo)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step's update uses (the scheduler steps inside it)
        update = self._update(batch, n_trees=len(prompts))
        totals = result.totals()
        scores = [r.score for r in result.rows if not r.duplicate]
        dt = time.perf_counter() - t0
        # Each process describes its share; the step's metrics combine every process's (sums of
        # counts, means over all rows or tokens, maxima), identical on every process.
        local = LocalMetrics()
        local.mean("reward/mean", sum(s.reward for s in scores), len(scores))
        for k in self.task.metrics:
            local.mean(f"reward/{k}", sum(float(s.metrics[k]) for s in scores), len(scores))
        a = batch.advantages[batch.response_mask.bool()].double()
        local.mean("adv/mean", float(a.sum()), a.numel())
        local.sums.update({"_adv/sum": float(a.sum()), "_adv/sum_sq": float((a * a).sum()), "_adv/n": float(a.numel())})
        local.maxima["adv/abs_max"] = float(a.abs().max()) if a.numel() else 0.0
        local.mean("adv/zero_frac", float((a == 0).sum()), a.numel())
        for k in ("generated_tokens", "prefill_tokens", "tool_calls", "tool_failures", "tool_infra_failures"):
            local.sums[f"rollout/{k}"] = totals[k]
        local.sums["rollout/generation_calls"] = float(result.generation_calls)
        local.mean("rollout/leaves_per_tree", totals["leaves"], len(prompts))
        local.maxima["rollout/depth_max"] = totals["depth_max"]
        local.mean("rollout/token_nll", *_nll_sum(result))
        local.maxima.update({"time/rollout": t_rollout, "time/update": dt - t_rollout, "time/step": dt, "lr": lr,
                             **{f"time/phase_{k}": v for k, v in result.phase_seconds.items()}})
        metrics = self._reduce(local)
        metrics["adv/std"] = std_from_moments(metrics.pop("_adv/sum"), metrics.pop("_adv/sum_sq"), metrics.pop("_adv/n"))
        metrics["perf/gen_tokens_per_s"] = metrics["rollout/generated_tokens"] / max(metrics["time/rollout"], 1e-9)
        metrics.update(update)
        self.step += 1
        return metrics

    def _epoch_plan(self, batch: TrainBatch, n_trees: int) -> list[tuple[list[int], list[list[int]]]]:
        """One PPO epoch: mini-batches of whole trees in a shuffled order, each as (its rows, its
        micro-batches' rows)."""
        tc = self.cfg.trainer
        order = torch.randperm(n_trees, generator=self.shuffle_rng).tolist()
        mb_trees = max(1, tc.mini_batch_prompts // self.accelerator.num_processes)
        plan = []
        for start in range(0, n_trees, mb_trees):
            trees = set(order[start:start + mb_trees])
            rows = [i for i, t in enumerate(batch.tree_of_row) if t in trees]
            # An empty mini-batch stays in place (processes align mini-batches by position);
            # pad_plans drops it when it is empty on every process.
            if tc.micro_batch_tokens:
                micros, _ = token_budget_micro_batches(batch.sequences, rows, tc.micro_batch_tokens,
                                                       self.tree_packing)
            else:
                micros = [rows[m:m + tc.micro_batch_rows] for m in range(0, len(rows), tc.micro_batch_rows)]
            plan.append((rows, micros))
        return plan

    def _log_probs(self, model, batch: TrainBatch, share_prefix: bool = True) -> torch.Tensor:
        return response_log_probs(model, batch, self.cfg.rollout.temperature, share_prefix=share_prefix,
                                  chunk_tokens=self.chunk_tokens, tree_packing=self.tree_packing)

    def _recompute_old_log_probs(self, batch: TrainBatch, plan) -> LocalMetrics:
        """Replace the sampler's log-probs by the trainer's own (no grad), micro-batch by micro-batch
        exactly as the first epoch will run them, so that every first-epoch ratio starts at 1
        (docs/method.md §6). Returns the sampler-vs-trainer mismatch, and applies the truncated
        importance-sampling correction of the advantages when ``algo.rollout_correction``.
        ``plan`` is the padded first epoch: padding micro-batches (None) run a forward pass too, so
        that every process runs as many forwards as the others (FSDP gathers weights in each)."""
        algo, device = self.cfg.algo, self.accelerator.device
        rollout_lp = batch.old_log_probs.clone()
        with torch.no_grad():
            for _, micros, *_ in plan:
                for rows in micros:
                    lp = self._log_probs(self.model, batch.rows(rows or [0]), share_prefix=not is_fsdp(self.accelerator))
                    if rows:
                        batch.old_log_probs[rows] = (lp.float() * batch.response_mask[rows].to(device)).cpu()
        m = logprob_mismatch(rollout_lp, batch.old_log_probs, batch.response_mask, batch.turn_ids,
                             algo.clip_low, algo.clip_high)
        mask = batch.response_mask.bool()
        n_tokens = int(mask.sum())
        n_turns = sum(len(set(batch.turn_ids[i][mask[i]].tolist())) for i in range(len(batch.sequences)))
        local = LocalMetrics()
        local.mean("rollout/logprob_diff_mean", m["diff_mean"] * n_tokens, n_tokens)
        local.maxima["rollout/logprob_diff_max"] = m["diff_max"]
        local.mean("rollout/logprob_turns_outside_clip", m["turns_outside_clip"] * n_turns, n_turns)
        if algo.rollout_correction:
            # Truncated importance sampling: the data came from the sampler's distribution, the
            # objective is the trainer's; weight each token by min(π_trainer / π_sampler, cap).
            # A token the sampler never drew (NaN: env_compat=atpo's EOS) keeps weight 1.
            ratio = torch.exp(batch.old_log_probs - rollout_lp).nan_to_num(nan=1.0)
            weight = torch.where(mask, ratio.clamp(max=algo.rollout_correction_cap), torch.zeros_like(ratio))
            batch.advantages.mul_(weight)
            trained = weight[mask].double()
            local.mean("rollout/tis_weight_mean", float(trained.sum()), trained.numel())
            # Capped: the ratio itself reached the cap (the clamped float32 weight, compared in
            # float64, would sit just below a cap such as 1.002 and never count).
            capped = ratio[mask] >= algo.rollout_correction_cap
            local.mean("rollout/tis_capped_frac", float(capped.sum()), trained.numel())
        return local

    def _share(self, batch: TrainBatch, rows: list[int]) -> float:
        """A set of rows' weight in the loss normalisation: rows, or trained tokens for token-mean."""
        if self.cfg.algo.loss_agg != "token-mean":
            return float(len(rows))
        return float(batch.response_mask[rows].sum()) if rows else 0.0

    def _update(self, batch: TrainBatch, n_trees: int) -> dict[str, float]:
        """PPO epochs over mini-batches of whole trees, accumulating micro-batch gradients.

        Every process runs the same number of mini-batches and micro-batches (padding with
        zero-weight ones), synchronises gradients once per mini-batch (``no_sync`` before, except
        under FSDP, where it would hold unsharded gradients), and weights each micro-batch by its
        share of the whole mini-batch over all processes: the update equals the one-process update
        on the same rows. Returns the update's metrics over all processes."""
        cfg, tc, algo = self.cfg, self.cfg.trainer, self.cfg.algo
        acc = self.accelerator
        device = acc.device
        model = self.model
        model.train()
        world = acc.num_processes
        fsdp = is_fsdp(acc)
        plans = [self._epoch_plan(batch, n_trees) for _ in range(tc.ppo_epochs)]
        # Rows over the token budget (each runs alone): one epoch's, like the forward tokens below.
        over_budget = sum(len(batch.sequences[r]) > tc.micro_batch_tokens for _, micros in plans[0]
                          for micro in micros for r in micro) if tc.micro_batch_tokens else 0
        # What one epoch's forwards run (for tokens/s and the packing's saving): counted on the
        # first epoch's plan, before padding.
        forward_total = sum(forward_tokens([batch.sequences[r] for r in micro], self.tree_packing)
                            for _, micros in plans[0] for micro in micros)
        if over_budget:
            print(f"warning: {over_budget} row(s) longer than trainer.micro_batch_tokens="
                  f"{tc.micro_batch_tokens} ran alone (process {acc.process_index})", file=sys.stderr)
        # One collective gives every process the others' micro-batch counts and loss denominators.
        mine = ([[len(micros) for _, micros in plan] for plan in plans],
                [[self._share(batch, rows) for rows, _ in plan] for plan in plans])
        everyone = all_gather_objects(acc, mine)
        plans = pad_plans(plans, everyone)
        local = self._recompute_old_log_probs(batch, plans[0]) if algo.recompute_old_logprobs else LocalMetrics()
        sums: dict[str, float] = {}
        grad_norms = 0.0
        n_updates = 0
        for plan in plans:
            for rows, micros, den in plan:
                den = max(den, 1.0)
                for i, micro_rows in enumerate(micros):
                    micro = batch.rows(micro_rows or [0])  # padding: any row, weight 0
                    mask = micro.response_mask.to(device)
                    last = i == len(micros) - 1
                    with contextlib.nullcontext() if last or fsdp else acc.no_sync(model):
                        logp = self._log_probs(model, micro, share_prefix=not fsdp)
                        loss, m = policy_loss(
                            logp, micro.old_log_probs.to(device), micro.advantages.to(device), mask,
                            level=algo.loss_level, clip_low=algo.clip_low, clip_high=algo.clip_high,
                            turn_ids=micro.turn_ids.to(device), agg=algo.loss_agg, log_ratio_max=algo.log_ratio_max,
                        )
                        if self.ref_model is not None:
                            with torch.no_grad():
                                ref = self._log_probs(self.ref_model, micro)
                            kl = aggregate(kl_penalty(logp, ref, algo.kl_kind), mask, algo.loss_agg)
                            loss = loss + algo.kl_coef * kl
                            m["kl_ref"] = float(kl.detach())
                        w = self._share(batch, micro_rows) / den if micro_rows else 0.0
                        # Gradients are averaged over processes: scale by their number.
                        acc.backward(loss * (w * world))
                    m["policy"] = float(loss.detach())
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + w * v
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                grad_norms += float(grad_norm)
                n_updates += 1
        # Each process's weighted stats are its part of the mini-batch means: they add up.
        local.sums.update({f"loss/{k}": v / max(n_updates, 1) for k, v in sums.items()})
        # The clipped norm is of the synchronised gradient: the same on every process.
        local.maxima.update({"loss/grad_norm": grad_norms / max(n_updates, 1), "loss/updates": float(n_updates)})
        local.sums.update({"perf/update_forward_tokens": float(forward_total),
                           "perf/rows_over_token_budget": float(over_budget)})
        metrics = self._reduce(local)
        # The next rollout samples from the updated policy (a no-op for a backend that runs the
        # training module itself, a weight copy for one that does not; under FSDP the gathered
        # weights go to the unsharded generation copy).
        if self._gen_model is not None:
            self._gen_model.load_state_dict(full_state_dict(acc, model))
            self.generator.load_weights(self._gen_model)
        else:
            self.generator.load_weights(acc.unwrap_model(model))
        return metrics

    # -- loop ----------------------------------------------------------------------------------
    def end(self) -> None:
        """Close a finished run: every process waits for the others, then the process group that
        Accelerate set up for them is released. Call it once, after the last collective: ``train``
        does. On one process nothing is released: a group that exists there is someone else's
        (vLLM's in-process engine makes one and destroys it at its own shutdown)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            self.accelerator.end_training()

    def fit(self, resume: bool = False, stop_after: int | None = None, *, overwrite: bool = False,
            force_resume: bool = False) -> dict[str, Any]:
        """Train for trainer.steps (or until ``stop_after`` steps of this call, for tests).

        A run refuses an output_dir another run holds; a fresh run refuses a non-empty one unless
        ``overwrite`` (of an at2po run only); a resume refuses a config change that alters the
        training unless ``force_resume`` (at2po.training.run_dir)."""
        say = print if self.is_main else (lambda _: None)
        # One run at a time in a directory: every process checks (a refusal stops them all), then
        # the main process holds the directory's lock until the run ends.
        if resume:
            check_not_in_use(self.out_dir)
        else:
            check_fresh(self.out_dir, overwrite=overwrite)  # includes check_not_in_use
        self.accelerator.wait_for_everyone()
        lock = RunLock(self.out_dir)
        if self.is_main:
            lock.acquire()  # refused only if another run took the lock since the check
        try:
            return self._fit(resume, stop_after, overwrite, force_resume, say)
        finally:
            lock.release()

    def _fit(self, resume, stop_after, overwrite, force_resume, say) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, tc = self.cfg, self.cfg.trainer
        if resume:
            if self.is_main:
                for p in remove_stale_temps(self.out_dir):
                    say(f"removed {p}: a checkpoint save that never finished")
            self.accelerator.wait_for_everyone()
            found = load_newest_valid(self.out_dir, self._read_checkpoint, say=say)
            if found is not None:
                ckpt, loaded = found
                check_resume_config(ckpt, config_to_dict(cfg), int(loaded[1]["step"]), force_resume, say=say)
                check_data_size(loaded[1]["sampler"].get("n"), len(self.train_rows), force_resume, say=say)
                self.load_checkpoint(ckpt, loaded)
                say(f"resumed from {ckpt} at step {self.step}")
            else:
                say(f"no checkpoint in {self.out_dir}: starting from step 0")
        elif self.is_main:
            prepare_fresh(self.out_dir, overwrite=overwrite)
        self.accelerator.wait_for_everyone()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            mark_run(self.out_dir)
            save_config(cfg, self.out_dir / "config.yaml")
            # A fresh run starts a fresh log; a resumed one drops what was logged after its checkpoint.
            rewrite_metrics(self.out_dir / "metrics.jsonl", self.step)
        logger = MetricsLogger(self.out_dir, cfg, enabled=self.is_main)
        history = []
        try:
            if self.step == 0 and tc.val_before_train and self.val_rows:
                v = self.validate()
                logger.log(0, v)
                history.append({"step": 0, **v})
            self._bar = tqdm(total=tc.steps, initial=self.step, desc="AT²PO", disable=not (tc.progress and self.is_main),
                             dynamic_ncols=True)
            done_here = 0
            while self.step < tc.steps and (stop_after is None or done_here < stop_after):
                metrics = self.train_step()
                done_here += 1
                if tc.val_every and self.step % tc.val_every == 0 and self.step < tc.steps:
                    metrics.update(self.validate())
                if self.step == tc.steps and self.val_rows:
                    metrics.update(self.validate())
                self._bar.update(1)
                self._bar.set_postfix_str(f"reward {metrics['reward/mean']:.3f}")
                if self.step % tc.log_every == 0 or "val/em" in metrics:
                    logger.log(self.step, metrics)
                history.append({"step": self.step, **metrics})
                if (tc.save_every and self.step % tc.save_every == 0) or self.step == tc.steps:
                    self.save_checkpoint()
            self._bar.close()
            self._bar = None
        finally:
            logger.close()
        return {"history": history, "step": self.step}


def _nll_sum(result: RolloutResult) -> tuple[float, int]:
    """Total negative log-prob of the sampled (trained) tokens, and their number."""
    tot, n = 0.0, 0
    for tree in result.trees:
        for node in tree.nodes[1:]:
            lp = [p for p, m in zip(node.gen_logprobs, node.gen_mask) if m and math.isfinite(p)]
            tot -= sum(lp)
            n += len(lp)
    return tot, n


def train(cfg: Config, resume: bool = False, overwrite: bool = False, force_resume: bool = False) -> dict[str, Any]:
    # Refuse a directory in use, or one a fresh run may not take, before minutes of model loading
    # (fit checks again, on every process, and takes the lock).
    if resume:
        check_not_in_use(cfg.trainer.output_dir)
    else:
        check_fresh(cfg.trainer.output_dir, overwrite=overwrite)  # includes check_not_in_use
    trainer = Trainer(cfg)
    result = trainer.fit(resume=resume, overwrite=overwrite, force_resume=force_resume)
    trainer.end()
    return result
