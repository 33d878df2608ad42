"""The trainer's parts that run without a Trainer: prompt order, batch padding and slicing, the
advantage statistics of a batch, per-row log-probs in the padded layout, the metrics log, the
token NLL of a rollout and the RNG snapshot. Values are hand-computed; no model is trained."""

import json
import math
import random

import numpy as np
import pytest
import torch

from at2po.algorithms.tree import LEAF, TurnTree
from at2po.config import AlgoConfig, load_config
from at2po.rollout.engine import LeafRow, RolloutResult, TreeStats
from at2po.training.logprobs import sequence_logprobs
from at2po.tasks.base import Score
from at2po.tiny import build_tiny_model, synthetic_agent_texts, train_tokenizer
from at2po.training import trainer as trainer_module
from at2po.training.trainer import (
    MetricsLogger,
    PromptSampler,
    TrainBatch,
    _nll_sum,
    _pad,
    _rng_state,
    _set_rng_state,
    build_train_batch,
    latest_checkpoint,
    plot_metrics,
    read_metrics,
    response_log_probs,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# -- prompt order -------------------------------------------------------------------------------------


def test_prompt_sampler_walks_seeded_epochs_and_resumes_mid_epoch():
    sampler = PromptSampler(5, seed=3)
    first = [int(i) for i in np.random.default_rng([3, 0]).permutation(5)]
    second = [int(i) for i in np.random.default_rng([3, 1]).permutation(5)]
    assert first != second  # each epoch has its own order
    assert sampler.take(3) == first[:3]
    assert sampler.state_dict() == {"epoch": 0, "pos": 3, "n": 5}
    assert sampler.take(4) == first[3:] + second[:2]  # crosses into epoch 1
    assert sampler.state_dict() == {"epoch": 1, "pos": 2, "n": 5}
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict({"epoch": 1, "pos": 2, "n": 5})
    assert resumed.take(3) == second[2:]
    assert resumed.state_dict() == {"epoch": 2, "pos": 0, "n": 5}
    # Another training set size (a forced resume): a new epoch of the new set begins.
    other = PromptSampler(4, seed=3)
    other.load_state_dict({"epoch": 1, "pos": 2, "n": 5})
    assert other.state_dict() == {"epoch": 2, "pos": 0, "n": 4}
    assert other.take(4) == [int(i) for i in np.random.default_rng([3, 2]).permutation(4)]
    # A state without "n" (older checkpoints) keeps its position.
    old = PromptSampler(5, seed=3)
    old.load_state_dict({"epoch": 0, "pos": 4})
    assert old.take(1) == first[4:]


def test_prompt_sampler_without_shuffle_and_empty_set():
    sampler = PromptSampler(3, seed=9, shuffle=False)
    assert sampler.take(7) == [0, 1, 2, 0, 1, 2, 0]
    assert sampler.state_dict() == {"epoch": 2, "pos": 1, "n": 3}
    assert PromptSampler(3, seed=9).take(0) == []
    assert PromptSampler(1, seed=0).take(2) == [0, 0]
    with pytest.raises(ValueError, match="^the training set is empty$"):
        PromptSampler(0, seed=0)


# -- batches ------------------------------------------------------------------------------------------


def test_pad_right_pads_to_the_widest_row_with_the_dtype():
    out = _pad([np.array([1.5, 2.5]), np.array([3.0]), np.array([])], 0.0, torch.float32)
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.5, 2.5], [3.0, 0.0], [0.0, 0.0]]
    ids = _pad([np.array([4, 5, 6]), np.array([7])], -1, torch.long)
    assert ids.dtype == torch.long and ids.tolist() == [[4, 5, 6], [7, -1, -1]]
    # Only empty rows (or none): one column of padding, never a zero-width tensor.
    assert _pad([np.array([]), np.array([])], -1, torch.long).tolist() == [[-1], [-1]]
    assert tuple(_pad([], 0.0, torch.float32).shape) == (0, 1)
    # Large ids survive (no float round-trip for integer tensors).
    assert _pad([np.array([2**53 + 1])], 0, torch.long).item() == 2**53 + 1


def _score(r):
    return Score(r, {"em": r, "f1": r, "format_ok": 1.0}, None, "")


def _two_tree_result():
    """Tree 0: a -> b (r = 1), c (r = 0); tree 1: d (r = 2), e (r = 4). Three single/two-turn rows."""
    t0 = TurnTree([1, 2])
    a = t0.add_turn(0, obs_ids=[], gen_ids=[3, 4], gen_logprobs=[-1.0, -2.0])
    b = t0.add_turn(a, obs_ids=[9], gen_ids=[5], gen_logprobs=[-0.5], status=LEAF)
    c = t0.add_turn(0, obs_ids=[], gen_ids=[6], gen_logprobs=[-3.0], status=LEAF)
    t1 = TurnTree([7])
    d = t1.add_turn(0, obs_ids=[], gen_ids=[8, 8, 8], gen_logprobs=[-0.1, -0.2, -0.3], status=LEAF)
    e = t1.add_turn(0, obs_ids=[], gen_ids=[9], gen_logprobs=[-0.4], status=LEAF)
    rows = []
    for t, tree, leaf, r in ((0, t0, b, 1.0), (1, t1, d, 2.0), (0, t0, c, 0.0), (1, t1, e, 4.0)):
        tree.nodes[leaf].reward = r
        rows.append(LeafRow(t, tree.leaf_sequence(leaf), _score(r)))
    return RolloutResult([t0, t1], rows, [TreeStats(), TreeStats()], {}, 0)


def test_build_train_batch_lays_out_rows_and_reports_advantage_statistics():
    result = _two_tree_result()
    batch, stats = build_train_batch(result, AlgoConfig(advantage="grpo"))
    assert batch.sequences == [[1, 2, 3, 4, 9, 5], [7, 8, 8, 8], [1, 2, 6], [7, 9]]
    assert batch.response_starts == [2, 1, 2, 1]
    assert batch.tree_of_row.tolist() == [0, 1, 0, 1] and batch.tree_of_row.dtype == np.int64
    assert batch.response_mask.tolist() == [[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(batch.old_log_probs, torch.tensor(
        [[-1.0, -2.0, 0.0, -0.5], [-0.1, -0.2, -0.3, 0.0], [-3.0, 0, 0, 0], [-0.4, 0, 0, 0]]))
    assert batch.turn_ids.tolist() == [[0, 0, -1, 1], [0, 0, 0, -1], [0, -1, -1, -1], [0, -1, -1, -1]]
    h = 1 / (1 + 1e-6)  # every tree has two leaves: normalised rewards are +-1 / (1 + eps)
    torch.testing.assert_close(batch.advantages, torch.tensor(
        [[h, h, 0, h], [-h, -h, -h, 0], [-h, 0, 0, 0], [h, 0, 0, 0]]))
    # The statistics over trained tokens, on raw rewards (asymmetric, with a zero): 1 1 1 | 2 2 2 | 0 | 4.
    _, stats = build_train_batch(result, AlgoConfig(advantage="grpo", normalize_leaves=False))
    trained = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 0.0, 4.0]
    mean = sum(trained) / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in trained) / 7)  # torch's unbiased std
    assert stats == pytest.approx({"adv/mean": mean, "adv/std": std, "adv/abs_max": 4.0, "adv/zero_frac": 1 / 8})
    # Row selection keeps every field aligned.
    sub = batch.rows([2, 0])
    assert sub.sequences == [batch.sequences[2], batch.sequences[0]] and sub.response_starts == [2, 2]
    assert sub.tree_of_row.tolist() == [0, 0]
    for name in ("response_mask", "old_log_probs", "advantages", "turn_ids"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[[2, 0]]), name


def test_advantage_statistics_of_degenerate_batches():
    result = _two_tree_result()
    for row in result.rows:  # equal rewards within each tree: every advantage is 0
        result.trees[row.tree].nodes[row.sequence.leaf].reward = 1.0
    _, stats = build_train_batch(result, AlgoConfig(advantage="grpo"))
    assert stats == {"adv/mean": 0.0, "adv/std": 0.0, "adv/abs_max": 0.0, "adv/zero_frac": 1.0}
    one = RolloutResult(result.trees[1:], [LeafRow(0, result.rows[3].sequence, _score(4.0))], [TreeStats()], {}, 0)
    one.trees[0].nodes[result.rows[3].sequence.leaf].reward = 4.0
    one.trees[0].nodes[result.rows[1].sequence.leaf].reward = 2.0
    _, stats = build_train_batch(one, AlgoConfig(advantage="grpo"))
    h = 1 / (1 + 1e-6)
    assert stats == pytest.approx({"adv/mean": h, "adv/std": 0.0, "adv/abs_max": h, "adv/zero_frac": 0.0}, abs=1e-6)


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(synthetic_agent_texts(100), vocab_size=300)
    return build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def test_response_log_probs_scatter_rows_into_the_padded_layout(tiny, monkeypatch):
    seqs = [[5, 6, 7, 8, 9], [5, 6, 10], [5, 11, 12, 13]]
    starts = [2, 2, 1]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    batch = TrainBatch(seqs, starts, np.zeros(3, dtype=np.int64), mask, torch.zeros(3, 3), torch.zeros(3, 3),
                       torch.zeros(3, 3, dtype=torch.long))
    with torch.no_grad():
        out = response_log_probs(tiny, batch, 0.8)
        rows = sequence_logprobs(tiny, seqs, starts, temperature=0.8)
    assert out.shape == (3, 3) and out.dtype == torch.float32
    for i, lp in enumerate(rows):
        torch.testing.assert_close(out[i, : len(lp)], lp)
        assert (out[i, len(lp):] == 0).all()
    # share_prefix=False runs every row in full (one forward pass): no prefix is ever long enough.
    seen = []
    real = trainer_module.sequence_logprobs
    monkeypatch.setattr(trainer_module, "sequence_logprobs",
                        lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    with torch.no_grad():
        response_log_probs(tiny, batch, 0.8, share_prefix=False)
        response_log_probs(tiny, batch, 0.8, chunk_tokens=7, tree_packing=True)
    off = {"chunk_tokens": 0, "tree_packing": False}
    assert seen == [{"temperature": 0.8, "min_shared_prefix": trainer_module.sys.maxsize, **off},
                    {"temperature": 0.8, "chunk_tokens": 7, "tree_packing": True}]


# -- logs ---------------------------------------------------------------------------------------------


def test_metrics_logger_appends_json_lines_and_prints_the_key_metrics(tmp_path, capsys):
    cfg = load_config(None, ["trainer.tensorboard=false"])
    logger = MetricsLogger(tmp_path, cfg)
    logger.log(1, {"reward/mean": 0.25, "loss/policy": -0.123456, "other": 3.0})
    logger.log(2, {"val/em": 0.5}, console=False)
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward/mean": 0.25, "loss/policy": -0.123456, "other": 3.0}, {"step": 2, "val/em": 0.5}]
    assert capsys.readouterr().out == "step 1: reward/mean=0.25  loss/policy=-0.1235\n"
    # A disabled logger (not the main process) writes and prints nothing.
    quiet = MetricsLogger(tmp_path / "other", cfg, enabled=False)
    quiet.log(1, {"reward/mean": 1.0})
    quiet.close()
    assert not (tmp_path / "other").exists() and capsys.readouterr().out == ""


def test_the_console_line_shows_the_key_metrics_in_a_fixed_order(tmp_path, capsys):
    keys = ["reward/mean", "reward/em", "val/em", "loss/policy", "loss/clipfrac", "loss/turn_kl_entropy",
            "rollout/leaves_per_tree", "rollout/tool_calls", "rollout/tool_failures", "time/step"]
    metrics = {k: (i + 1) / 8 for i, k in enumerate(reversed(keys))}  # given in another order
    metrics["loss/kl_ref"] = 9.0  # not a key metric: in the JSONL only
    logger = MetricsLogger(tmp_path, load_config(None, ["trainer.tensorboard=false"]))
    logger.log(7, metrics)
    assert capsys.readouterr().out == "step 7: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in keys) + "\n"
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 7, **metrics}]


def test_metrics_logger_writes_tensorboard_when_asked(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    logger = MetricsLogger(tmp_path, load_config(None, ["trainer.tensorboard=true"]))
    logger.log(3, {"reward/mean": 0.5}, console=False)
    logger.log(4, {"reward/mean": 0.75, "loss/policy": -1.0}, console=False)
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(3, 0.5), (4, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("loss/policy")] == [(4, -1.0)]


def test_metrics_logger_sends_to_wandb_when_asked(tmp_path, monkeypatch):
    """W&B is an explicit opt-in (trainer.wandb): a stand-in module records what it receives."""
    import sys
    import types

    from at2po.config import config_to_dict

    calls = []

    class Run:
        def log(self, metrics, step=None):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["trainer.tensorboard=false", "trainer.wandb=true", "trainer.wandb_project=glue"])
    logger = MetricsLogger(tmp_path, cfg)
    logger.log(2, {"reward/mean": 0.5}, console=False)
    logger.close()
    assert calls == [("init", {"project": "glue", "config": config_to_dict(cfg), "dir": str(tmp_path)}),
                     ("log", {"reward/mean": 0.5}, 2), ("finish",)]


def test_read_metrics_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text(json.dumps({"step": 1, "a": 1.0}) + "\n" + '{"step": 2, "a": 2.' + "\n" + json.dumps({"step": 3}) + "\n")
    assert read_metrics(str(path)) == [{"step": 1, "a": 1.0}, {"step": 3}]


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 20, "val/em": 0.1}) + "\n" for s in range(1, 13)))
    out = plot_metrics(path, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nll_sum_counts_only_sampled_tokens():
    tree = TurnTree([1])
    a = tree.add_turn(0, obs_ids=[], gen_ids=[2, 3], gen_logprobs=[-1.0, -2.0])
    tree.add_turn(a, obs_ids=[4], gen_ids=[5], gen_logprobs=[-0.5], status=LEAF)
    other = TurnTree([1])
    other.add_turn(0, obs_ids=[], gen_ids=[6, 7, 8], gen_logprobs=[-0.25, -0.25, -0.5], status=LEAF)
    tree.nodes[a].gen_mask = [1, 0]  # a token that is not trained (e.g. a tool-limit notice's) does not count
    result = RolloutResult([tree, other], [], [TreeStats(), TreeStats()], {}, 0)
    assert _nll_sum(result) == (1.0 + 0.5 + 0.25 + 0.25 + 0.5, 5)
    assert _nll_sum(RolloutResult([], [], [], {}, 0)) == (0.0, 0)


def test_rng_state_round_trip_and_latest_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = _rng_state()
    assert set(state) == {"python", "numpy", "torch", "cuda"}
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn
    assert latest_checkpoint(tmp_path) is None


def test_cuda_rng_is_restored_only_when_saved_and_a_gpu_is_there(monkeypatch):
    """The CUDA streams (this CPU machine has none: the calls are recorded)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0 state"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _rng_state()["cuda"] is None  # saved only where there is a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _rng_state()["cuda"] == ["gpu0 state"]
    state = _rng_state()
    for saved, available, restored in ((["gpu0"], True, True), (None, True, False), (["gpu0"], False, False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        calls.clear()
        _set_rng_state({**state, "cuda": saved})
        assert calls == ([["gpu0"]] if restored else []), (saved, available)


def test_plot_metrics_draws_each_panel(tmp_path, monkeypatch):
    """The six panels: title, data, markers for short series, a 5-step moving average for noisy
    series of >= 10 points (not for held-out EM), and a 12 x 6 inch figure at 110 dpi."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = [{"step": s, "reward/mean": (s % 7) / 7} for s in range(1, 31)]  # exactly 30 points: no markers
    for s in range(1, 13):
        rows[s - 1]["reward/em"] = (s % 3) / 3  # 12 points
    for s in range(2, 22, 2):
        rows[s - 1]["val/em"] = s / 100  # 10 points, but held-out EM is never averaged
    for s in range(1, 10):
        rows[s - 1]["loss/clipfrac"] = s / 50  # 9 points: too few for an average
    for s in range(1, 11):
        rows[s - 1]["loss/turn_kl_entropy"] = s / 10  # exactly 10 points: averaged
    for s in (1, 2, 3):
        rows[s - 1]["rollout/generated_tokens"] = 100 * s
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    png = plot_metrics(path, tmp_path / "curves.png")

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1320, 660)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["train reward", "train EM", "held-out EM (greedy)", "clip fraction",
                                               "H_turn", "generated tokens / step"]
    assert all(ax.get_xlabel() == "step" for ax in axes)
    assert all(ax.xaxis.get_gridlines()[0].get_visible() and ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
               for ax in axes)

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def moving_average(ys, w=5):
        return [sum(ys[i:i + w]) / w for i in range(len(ys) - w + 1)]

    for ax, key, marker, averaged in zip(axes, ["reward/mean", "reward/em", "val/em", "loss/clipfrac",
                                                "loss/turn_kl_entropy", "rollout/generated_tokens"],
                                         ["None", "o", "o", "o", "o", "o"], [True, True, False, False, True, False]):
        xs, ys = series(key)
        raw = ax.lines[0]
        assert list(raw.get_xdata()) == xs and list(raw.get_ydata()) == pytest.approx(ys), key
        assert raw.get_marker() == marker and (raw.get_markersize() == 3 or marker == "None"), key
        assert raw.get_alpha() == (1.0 if key == "val/em" else 0.35), key
        assert len(ax.lines) == (2 if averaged else 1), key
        if averaged:
            ma = ax.lines[1]
            assert list(ma.get_xdata()) == xs[4:] and list(ma.get_ydata()) == pytest.approx(moving_average(ys)), key
            assert (ma.get_color(), ma.get_linewidth(), ma.get_label()) == ("C0", 2, "5-step mean"), key
            legend = ax.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == ["5-step mean"]
            assert legend.get_texts()[0].get_fontsize() == 7
        else:
            assert ax.get_legend() is None
    # A metric that was never logged leaves its panel empty.
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png")
    assert [len(ax.lines) for ax in figures[1].axes] == [1, 0, 0, 0, 0, 0]


def test_train_builds_one_trainer_and_passes_every_flag_to_fit(monkeypatch, tmp_path):
    """``train`` is the CLI's entry: a fresh run by default; resume, overwrite and force_resume
    reach ``Trainer.fit`` unchanged (the real path runs in the CLI and resume tests). Before the
    trainer is built it checks the output directory (test_run_dir: refusals)."""
    from types import SimpleNamespace

    import at2po.training.trainer as trainer_module

    calls = []

    class Recorder:
        def __init__(self, cfg, **kwargs):
            calls.append(("init", cfg, kwargs))

        def fit(self, **kwargs):
            calls.append(("fit", kwargs))
            return {"step": len(calls)}

        def end(self):
            calls.append(("end",))

    monkeypatch.setattr(trainer_module, "Trainer", Recorder)
    cfg = SimpleNamespace(trainer=SimpleNamespace(output_dir=str(tmp_path / "run")))
    assert trainer_module.train(cfg) == {"step": 2}
    assert calls == [("init", cfg, {}), ("fit", {"resume": False, "overwrite": False, "force_resume": False}), ("end",)]
    calls.clear()
    trainer_module.train(cfg, resume=True, overwrite=True, force_resume=True)
    assert calls[1] == ("fit", {"resume": True, "overwrite": True, "force_resume": True})
    calls.clear()
    trainer_module.train(cfg, False, True, False)
    assert calls[1] == ("fit", {"resume": False, "overwrite": True, "force_resume": False})
    calls.clear()
    trainer_module.train(cfg, True, False, True)
    assert calls[1] == ("fit", {"resume": True, "overwrite": False, "force_resume": True})


def test_end_on_one_process_leaves_a_process_group_it_does_not_own(tmp_path):
    """vLLM's in-process engine sets up a 1-process group and destroys it at its shutdown: a
    one-process run's end() must leave it (the 2-process tests check that end() releases
    Accelerate's own group)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate import Accelerator

    from at2po.training.trainer import Trainer

    ours = not dist.is_initialized()  # in a full run an earlier test's vLLM engine may hold one already
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group = dist.group.WORLD
    try:
        Trainer.end(SimpleNamespace(accelerator=Accelerator(cpu=True)))
        assert dist.is_initialized() and dist.group.WORLD is group
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()


def test_metrics_logger_without_tensorboard_says_so_and_keeps_the_jsonl(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    logger = MetricsLogger(tmp_path, load_config(None, ["trainer.tensorboard=true"]))
    assert capsys.readouterr().out == ("tensorboard is not installed: pip install tensorboard (metrics still go "
                                       "to metrics.jsonl)\n")
    logger.log(1, {"reward/mean": 0.5}, console=False)
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


def test_advantage_statistics_of_two_tokens_and_of_no_rows():
    result = _two_tree_result()
    # Rows c (tree 0) and e (tree 1) alone: one trained token each, raw rewards 0 and 4.
    two = RolloutResult(result.trees, [result.rows[2], result.rows[3]], result.stats, {}, 0)
    _, stats = build_train_batch(two, AlgoConfig(advantage="grpo", normalize_leaves=False))
    assert stats == pytest.approx({"adv/mean": 2.0, "adv/std": math.sqrt(8.0), "adv/abs_max": 4.0, "adv/zero_frac": 0.5})
    # No rows at all: an empty batch (one padding column) and zero statistics.
    batch, stats = build_train_batch(RolloutResult([], [], [], {}, 0), AlgoConfig())
    assert batch.sequences == [] and tuple(batch.response_mask.shape) == (0, 1)
    assert stats == {"adv/mean": 0.0, "adv/std": 0.0, "adv/abs_max": 0.0, "adv/zero_frac": 0.0}
