"""Multi-process training: real 2-process runs (Accelerate launch, gloo on CPU), each bounded by a
timeout, plus the pure planning and reduction helpers they rely on."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.training.trainer import latest_checkpoint
from at2po.training.distributed import check_world_size, combine, pad_plans, std_from_moments
from conftest import write_search_qa_files

WORKER = Path(__file__).with_name("dist_worker.py")
CORPUS = ["Zorbex was founded by Mila Tarn.", "Mila Tarn was born in Quovia.", "Quovia is a city in Belmark.",
          "Drelto is a river that flows through Quovia."]
QUESTIONS = [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
             ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")]
RUN_TIMEOUT = 150  # seconds per launched run: a hang (unequal collectives) fails instead of blocking CI


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, QUESTIONS)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, *args) -> list[str]:
    if processes == 1:
        return [sys.executable, str(WORKER), *map(str, args)]
    # `--multi_gpu` is Accelerate's torchrun launcher; without a GPU each process picks gloo on CPU
    # (`--cpu` would start a single process). AT2PO_TEST_ACCELERATE_ARGS replaces it, e.g. with an
    # FSDP config on a machine with 2 GPUs (README, "Scaling out").
    launcher = shlex.split(os.environ.get("AT2PO_TEST_ACCELERATE_ARGS", "--multi_gpu --mixed_precision no"))
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *launcher,
            "--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(WORKER), *map(str, args)]


def _env() -> dict:
    # Loopback only: the processes share this machine, whatever its host name resolves to.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo"}


def launch(processes: int, *args) -> None:
    proc = subprocess.run(_command(processes, *args), env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def naive_reduction(records: list[dict]) -> dict[str, float]:
    """Sums add, means are Σ numerators / Σ weights, maxima take the max: written out by hand."""
    keys = {k for r in records for part in ("sums", "means", "maxima") for k in r[part]}
    out = {}
    for k in keys:
        if any(k in r["sums"] for r in records):
            out[k] = sum(r["sums"].get(k, 0.0) for r in records)
        elif any(k in r["means"] for r in records):
            num = sum(r["means"][k][0] for r in records if k in r["means"])
            den = sum(r["means"][k][1] for r in records if k in r["means"])
            out[k] = num / den if den else 0.0
        else:
            out[k] = max(r["maxima"][k] for r in records if k in r["maxima"])
    return out


SPT0 = ["rollout.samples_per_tree=0", "trainer.mini_batch_prompts=2", "trainer.steps=4", "trainer.save_every=1", "trainer.val_every=2",
        "data.val_size=3", "trainer.micro_batch_rows=2"]


@pytest.mark.usefixtures("single_thread")
def test_two_process_run_killed_and_resumed_logs_the_reduction_of_both_ranks(assets, tmp_path):
    out = tmp_path
    # Start the run and kill it (every process) as soon as a checkpoint is complete.
    proc = subprocess.Popen(_command(2, "train", assets, out, "a", *SPT0), env=_env(), 
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    while latest_checkpoint(out / "run") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill each process of the tree by id.
    launcher = psutil.Process(proc.pid)
    for p in [*launcher.children(recursive=True), launcher]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    err = proc.communicate(timeout=30)[1]
    killed_at = latest_checkpoint(out / "run")
    assert killed_at is not None, err[-3000:]
    assert killed_at.name != "step_000004", "the run ended before it was killed"
    # Resume with 2 processes: finishes every step (samples_per_tree=0 holds no hang).
    launch(2, "train", assets, out, "b", *SPT0)

    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    state = torch.load(out / "run" / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert len(state["rank_states"]) == 2  # both processes' RNG streams are in the checkpoint
    debug = {}
    for f in sorted((out / "debug").glob("*.jsonl")):
        tag, rank = f.stem.split("_rank")
        for line in f.read_text().splitlines():
            r = json.loads(line)
            debug.setdefault((tag, r["step"]), {}).setdefault(int(rank), []).append(r)
    resumed_from = int(killed_at.name.split("_")[1])
    assert min(s for t, s in debug if t == "b") == resumed_from + 1  # the resumed run did not redo a step
    for row in rows:
        per_rank = debug[("b", row["step"])] if ("b", row["step"]) in debug else debug[("a", row["step"])]
        assert sorted(per_rank) == [0, 1]
        records = per_rank[0] + per_rank[1]
        expected = naive_reduction(records)
        for k, v in expected.items():
            if not k.startswith("_"):
                assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (row["step"], k)
        assert row["adv/std"] == pytest.approx(
            std_from_moments(expected["_adv/sum"], expected["_adv/sum_sq"], expected["_adv/n"]), rel=1e-9)
        # Counts are sums over both ranks, and each rank contributed a nonzero share.
        calls = [sum(r["sums"].get("rollout/tool_calls", 0) for r in per_rank[k]) for k in (0, 1)]
        assert row["rollout/tool_calls"] == sum(calls)
        reward_rows = [next(r["means"]["reward/mean"][1] for r in per_rank[k] if "reward/mean" in r["means"])
                       for k in (0, 1)]
        assert min(reward_rows) > 0
        assert row["rollout/leaves_per_tree"] == pytest.approx(sum(reward_rows) / 2)  # 1 tree per rank
    # Validation: 3 rows split 2 + 1 over the ranks, the mean is over all 3 rows.
    # Any world size dividing the batch resumes: one process continues the 2-process run.
    launch(1, "train", assets, out, "c", *SPT0, "trainer.steps=5")
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    state = torch.load(out / "run" / "checkpoints" / "step_000005" / "trainer_state.pt", weights_only=False)
    assert len(state["rank_states"]) == 1 and state["sampler"] != torch.load(
        out / "run" / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)["sampler"]
    last = debug[("b", 4)]
    val_rows = [next(r["means"]["val/em"][1] for r in last[k] if "val/em" in r["means"]) for k in (0, 1)]
    assert val_rows == [2, 1] and "val/em" in rows[1] and "val/em" in rows[3]


@pytest.mark.usefixtures("single_thread")
def test_two_process_update_equals_the_one_process_update(assets, tmp_path):
    # Scripted turns (search or answer, by context). A tree whose chains never search has no
    # expansion candidate (no root fallback) and keeps its 3 chains; the others get 3 + 2 leaves.
    # In file order rank 0 holds prompts 0 and 2, rank 1 prompts 1 and 3: different row counts.
    args = ["rollout.samples_per_tree=0", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.root_fallback=false",
            "rollout.n_initial=3", "rollout.max_response_tokens=400", "rollout.chunk_tokens=64", "data.shuffle=false",
            "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4", "trainer.micro_batch_rows=2",
            "algo.loss_agg=token-mean", "optim.lr=1.0", "optim.grad_clip=1e6", "data.val_file=", "trainer.save_every=0"]
    launch(1, "update", assets, tmp_path, "one", *args)
    launch(2, "update", assets, tmp_path, "two", *args)
    one, two = (torch.load(tmp_path / f"{t}_weights.pt") for t in ("one", "two"))
    rows = [[next(r["means"]["reward/mean"][1] for r in map(json.loads, f.read_text().splitlines())
                  if "reward/mean" in r["means"])] for f in sorted((tmp_path / "debug").glob("two_rank*.jsonl"))]
    assert len(rows) == 2 and rows[0] != rows[1]  # unequal row counts: the padded plan is exercised
    # 8 and 10 rows in micro-batches of 2: 5 backward passes on each rank (rank 0 padded), one
    # gradient all-reduce (the tiny model fits one DDP bucket): no_sync on the 4 others.
    assert sorted(rows) == [[8.0], [10.0]]
    assert sum(two["allreduces"]) == 1 and one["allreduces"] == []
    assert one["metrics"]["rollout/tool_calls"] == two["metrics"]["rollout/tool_calls"]  # the same rollouts
    assert one["metrics"]["reward/mean"] == pytest.approx(two["metrics"]["reward/mean"])
    assert one["metrics"]["loss/policy"] == pytest.approx(two["metrics"]["loss/policy"], abs=1e-6)
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], atol=1e-6, rtol=0, msg=k)
    from safetensors.torch import load_file

    w0 = load_file(str(assets / "model" / "model.safetensors"))
    moved = max(float((one["weights"][k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-4  # the update is not negligible: equality is not that of two no-ops


# -- helpers, exactly ---------------------------------------------------------------------------------
def test_combine_weights_means_by_rows_not_by_process():
    a = {"sums": {"calls": 3.0}, "means": {"reward": [1.0, 1.0]}, "maxima": {"depth": 2.0}}
    b = {"sums": {"calls": 4.0}, "means": {"reward": [0.0, 3.0]}, "maxima": {"depth": 5.0}}
    out = combine([a, b])
    assert out == {"calls": 7.0, "reward": 0.25, "depth": 5.0}  # not (1.0 + 0.0) / 2
    assert combine([{"sums": {}, "means": {"x": [0.0, 0.0]}, "maxima": {}}]) == {"x": 0.0}


def test_std_from_moments_matches_torch():
    x = torch.tensor([0.5, -1.25, 3.0, 2.0, 0.0], dtype=torch.float64)
    assert std_from_moments(float(x.sum()), float((x * x).sum()), 5) == pytest.approx(float(x.std()))
    assert std_from_moments(2.0, 4.0, 1) == 0.0


def test_pad_plans_equalises_micro_batches_and_sums_denominators():
    # Rank 0: two mini-batches of 3 and 1 micro-batches; rank 1: 1 and 2; rank 1 lacks a third.
    mine = [[([0, 1, 2, 3, 4], [[0, 1], [2, 3], [4]]), ([5], [[5]]), ([], [])]]
    everyone = [([[3, 1, 0]], [[5.0, 1.0, 0.0]]), ([[1, 2]], [[2.0, 4.0]])]
    (plan,) = pad_plans(mine, everyone)
    assert plan == [([0, 1, 2, 3, 4], [[0, 1], [2, 3], [4]], 7.0), ([5], [[5], None], 5.0)]  # empty everywhere: dropped
    (other,) = pad_plans([[([0, 1], [[0, 1]]), ([2, 3, 4], [[2, 3], [4]])]], everyone)
    assert other == [([0, 1], [[0, 1], None, None], 7.0), ([2, 3, 4], [[2, 3], [4]], 5.0)]


def test_world_size_must_divide_the_batch():
    check_world_size(4, 2, 2)
    with pytest.raises(ValueError, match="trainer.prompts_per_step .3. must be a multiple of the number of processes .2."):
        check_world_size(3, 3, 2)
    with pytest.raises(ValueError, match="trainer.mini_batch_prompts .1. must be a multiple"):
        check_world_size(4, 1, 2)


def test_fsdp_asked_where_accelerate_cannot_run_it_is_an_error(assets, tmp_path, monkeypatch):
    """Accelerate enables FSDP only on GPU-like devices; on CPU it would silently run DDP."""
    from conftest import make_run_cfg
    from at2po.training.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for FSDP but this launch runs NO on cpu"):
        Trainer(make_run_cfg(assets, tmp_path / "run"))


def test_without_prefix_sharing_a_micro_batch_is_one_forward_whatever_its_rows(assets):
    """Under FSDP every forward is a collective: the count must not depend on the rows."""
    import numpy as np

    from at2po.factory import load_model
    from at2po.config import ModelConfig
    from at2po.training.trainer import TrainBatch, response_log_probs

    model = load_model(ModelConfig(path=str(assets / "model")))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    prompt = list(range(5, 45))  # a 40-token shared prompt: long enough to be shared by default
    seqs = [prompt + [50, 51, 52], prompt + [53, 54]]
    batch = TrainBatch(seqs, [40, 40], np.zeros(2, dtype=np.int64), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                       torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with torch.no_grad():
        shared = response_log_probs(model, batch, 1.0)
        n_shared = len(calls)
        full = response_log_probs(model, batch, 1.0, share_prefix=False)
    assert n_shared == 2 and len(calls) - n_shared == 1
    torch.testing.assert_close(full, shared, atol=1e-5, rtol=0)
