"""The AT²PO trainer: one step = tree rollout → rewards → advantages → policy update.

Built on Hugging Face Accelerate (each process rolls out its own share of the step's prompts).
Every objective and credit variant of docs/method.md is a config setting (see at2po.config);
the task, tools and generator backend come from the registries through ``at2po.factory``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
from at2po.rollout.generator import sequence_logprobs

CHECKPOINT_STATE = "trainer_state.pt"


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
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = d["epoch"], d["pos"]


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


def response_log_probs(model, batch: TrainBatch, temperature: float) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under ``model`` (right-padded like the batch)."""
    per_row = sequence_logprobs(model, batch.sequences, batch.response_starts, temperature=temperature)
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=per_row[0].device)
    for i, lp in enumerate(per_row):  # scatter rows into the padded layout
        out[i, : lp.shape[0]] = lp
    return out


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
                                "time/step") if k in metrics]
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
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


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
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / CHECKPOINT_STATE).is_file())
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
        rank = self.accelerator.process_index
        random.seed(tc.seed + rank)
        np.random.seed(tc.seed + rank)
        torch.manual_seed(tc.seed + rank)

        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = load_model(cfg.model, self.accelerator.device).eval()
            self.ref_model.requires_grad_(False)

        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / oc.warmup_steps) if oc.warmup_steps else 1.0)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

        self.task = build_task(cfg)
        if not cfg.data.train_file:
            raise ValueError(f"data.train_file is empty: give a data file of the {cfg.task.name!r} task")
        self.train_rows = self.task.load(cfg.data.train_file)
        self.val_rows = self.task.load(cfg.data.val_file) if cfg.data.val_file else []
        if cfg.data.val_size:
            self.val_rows = self.val_rows[: cfg.data.val_size]
        self.val_records: list[dict[str, Any]] = []  # this process's records of the last validation
        self.sampler = PromptSampler(len(self.train_rows), tc.seed, cfg.data.shuffle)
        self.shuffle_rng = torch.Generator().manual_seed(tc.seed + 7919 * rank)

        self.tools = tools if tools is not None else build_tools(cfg, self.task)
        self.engine = build_engine(cfg, self.accelerator.unwrap_model(self.model), self.tokenizer, task=self.task,
                                   tools=self.tools, seed=tc.seed + rank, progress=self._rollout_progress)
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
        """Write checkpoints/step_XXXXXX atomically: a temp dir renamed into place when complete."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp_step_{self.step:06d}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.accelerator.unwrap_model(self.model).save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        save_config(self.cfg, tmp / "config.yaml")
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": _rng_state(),
            "shuffle_rng": self.shuffle_rng.get_state(),
            "engine_rng": self.engine.rng.bit_generator.state,
            "generator_rng": self.generator.get_rng_state(),
        }
        torch.save(state, tmp / CHECKPOINT_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step_*") if (p / CHECKPOINT_STATE).is_file())
        for old in done[: -self.cfg.trainer.keep_checkpoints] if self.cfg.trainer.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        model = self.accelerator.unwrap_model(self.model)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing means a wrong checkpoint.
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        state = torch.load(path / CHECKPOINT_STATE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        self.engine.rng.bit_generator.state = state["engine_rng"]
        self.generator.set_rng_state(state["generator_rng"])
        self.step = state["step"]

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
        local = torch.tensor([[float(r[k]) for k in keys] for r in self.val_records], dtype=torch.float64)
        local = local.reshape(-1, len(keys))
        allrows = self.accelerator.gather_for_metrics(local) if self.accelerator.num_processes > 1 else local
        n = max(len(allrows), 1)
        return {**{f"val/{k}": float(allrows[:, i].sum()) / n for i, k in enumerate(keys)},
                "time/val": time.perf_counter() - t0}

    def train_step(self) -> dict[str, float]:
        cfg, tc = self.cfg, self.cfg.trainer
        t0 = time.perf_counter()
        idx = self._my_share(self.sampler.take(tc.prompts_per_step))
        prompts = [self.engine.prompt(self.train_rows[i]) for i in idx]
        result = self.engine.rollout(prompts)
        t_rollout = time.perf_counter() - t0
        sleep = getattr(self.generator, "sleep", None)
        if sleep is not None:  # an inference engine on the training GPU frees its memory for the update
            sleep()

        batch, adv_stats = build_train_batch(result, cfg.algo)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step's update uses (the scheduler steps inside it)
        update = self._update(batch, n_trees=len(prompts))
        totals = result.totals()
        scores = [r.score for r in result.rows if not r.duplicate]
        n_rows = max(len(scores), 1)
        dt = time.perf_counter() - t0
        metrics = {
            "reward/mean": sum(s.reward for s in scores) / n_rows,
            **{f"reward/{k}": sum(float(s.metrics[k]) for s in scores) / n_rows for k in self.task.metrics},
            **adv_stats,
            **update,
            "rollout/generated_tokens": totals["generated_tokens"],
            "rollout/prefill_tokens": totals["prefill_tokens"],
            "rollout/tool_calls": totals["tool_calls"],
            "rollout/tool_failures": totals["tool_failures"],
            "rollout/leaves_per_tree": totals["leaves"] / max(len(prompts), 1),
            "rollout/depth_max": totals["depth_max"],
            "rollout/token_nll": _mean_nll(result),
            "rollout/generation_calls": float(result.generation_calls),
            "time/rollout": t_rollout,
            "time/update": dt - t_rollout,
            "time/step": dt,
            "perf/gen_tokens_per_s": totals["generated_tokens"] / max(t_rollout, 1e-9),
            **{f"time/phase_{k}": v for k, v in result.phase_seconds.items()},
            "lr": lr,
        }
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
            if rows:
                plan.append((rows, [rows[m:m + tc.micro_batch_rows] for m in range(0, len(rows), tc.micro_batch_rows)]))
        return plan

    def _recompute_old_log_probs(self, batch: TrainBatch, plan) -> dict[str, float]:
        """Replace the sampler's log-probs by the trainer's own (no grad), micro-batch by micro-batch
        exactly as the first epoch will run them, so that every first-epoch ratio starts at 1
        (docs/method.md §6). Returns the sampler-vs-trainer mismatch, and applies the truncated
        importance-sampling correction of the advantages when ``algo.rollout_correction``."""
        algo, device = self.cfg.algo, self.accelerator.device
        rollout_lp = batch.old_log_probs.clone()
        with torch.no_grad():
            for _, micros in plan:
                for rows in micros:
                    lp = response_log_probs(self.model, batch.rows(rows), self.cfg.rollout.temperature)
                    batch.old_log_probs[rows] = (lp.float() * batch.response_mask[rows].to(device)).cpu()
        m = logprob_mismatch(rollout_lp, batch.old_log_probs, batch.response_mask, batch.turn_ids,
                             algo.clip_low, algo.clip_high)
        metrics = {f"rollout/logprob_{k}": v for k, v in m.items()}
        if algo.rollout_correction:
            # Truncated importance sampling: the data came from the sampler's distribution, the
            # objective is the trainer's; weight each token by min(π_trainer / π_sampler, cap).
            mask = batch.response_mask.bool()
            weight = torch.exp(batch.old_log_probs - rollout_lp).clamp(max=algo.rollout_correction_cap)
            weight = torch.where(mask, weight, torch.zeros_like(weight))
            batch.advantages.mul_(weight)
            trained = weight[mask]
            metrics["rollout/tis_weight_mean"] = float(trained.mean()) if trained.numel() else 0.0
            metrics["rollout/tis_capped_frac"] = (
                float((trained >= algo.rollout_correction_cap).float().mean()) if trained.numel() else 0.0)
        return metrics

    def _update(self, batch: TrainBatch, n_trees: int) -> dict[str, float]:
        """PPO epochs over mini-batches of whole trees, accumulating micro-batch gradients."""
        cfg, tc, algo = self.cfg, self.cfg.trainer, self.cfg.algo
        acc = self.accelerator
        device = acc.device
        model = self.model
        model.train()
        sums: dict[str, float] = {}
        n_updates = 0
        plans = [self._epoch_plan(batch, n_trees) for _ in range(tc.ppo_epochs)]
        extra = self._recompute_old_log_probs(batch, plans[0]) if algo.recompute_old_logprobs else {}
        for plan in plans:
            for rows, micros in plan:
                mini = batch.rows(rows)
                weight_den = float(len(rows)) if algo.loss_agg != "token-mean" else float(mini.response_mask.sum().clamp(min=1))
                stats_mb: dict[str, float] = {}
                for micro_rows in micros:
                    micro = batch.rows(micro_rows)
                    mask = micro.response_mask.to(device)
                    logp = response_log_probs(model, micro, cfg.rollout.temperature)
                    loss, m = policy_loss(
                        logp, micro.old_log_probs.to(device), micro.advantages.to(device), mask,
                        level=algo.loss_level, clip_low=algo.clip_low, clip_high=algo.clip_high,
                        turn_ids=micro.turn_ids.to(device), agg=algo.loss_agg, log_ratio_max=algo.log_ratio_max,
                    )
                    if self.ref_model is not None:
                        with torch.no_grad():
                            ref = response_log_probs(self.ref_model, micro, cfg.rollout.temperature)
                        kl = aggregate(kl_penalty(logp, ref, algo.kl_kind), mask, algo.loss_agg)
                        loss = loss + algo.kl_coef * kl
                        m["kl_ref"] = float(kl.detach())
                    w = (len(micro.sequences) if algo.loss_agg != "token-mean" else float(mask.sum())) / weight_den
                    acc.backward(loss * w)
                    m["policy"] = float(loss.detach())
                    for k, v in m.items():
                        stats_mb[k] = stats_mb.get(k, 0.0) + w * v
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats_mb["grad_norm"] = float(grad_norm)
                for k, v in stats_mb.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        # The next rollout samples from the updated policy (a no-op for a backend that runs the
        # training module itself, a weight copy for one that does not).
        self.generator.load_weights(acc.unwrap_model(model))
        return {f"loss/{k}": v / max(n_updates, 1) for k, v in sums.items()} | {"loss/updates": float(n_updates)} | extra

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train for trainer.steps (or until ``stop_after`` steps of this call, for tests)."""
        from tqdm.auto import tqdm

        cfg, tc = self.cfg, self.cfg.trainer
        if resume:
            ckpt = latest_checkpoint(self.out_dir)
            if ckpt is not None:
                self.load_checkpoint(ckpt)
                if self.is_main:
                    print(f"resumed from {ckpt} at step {self.step}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
            # A fresh run starts a fresh log; a resumed one drops what was logged after its checkpoint.
            kept = [r for r in read_metrics(self.out_dir / "metrics.jsonl") if r["step"] <= self.step] if self.step else []
            (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
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


def _mean_nll(result: RolloutResult) -> float:
    tot, n = 0.0, 0
    for tree in result.trees:
        for node in tree.nodes[1:]:
            lp = [p for p, m in zip(node.gen_logprobs, node.gen_mask) if m]
            tot -= sum(lp)
            n += len(lp)
    return tot / max(n, 1)


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    trainer = Trainer(cfg)
    return trainer.fit(resume=resume)
