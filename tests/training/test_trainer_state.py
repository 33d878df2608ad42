"""What a checkpoint holds and what loading it restores, through Trainer.save_checkpoint and
Trainer.load_checkpoint directly (no training step): every random stream, the prompt position,
the step, the weights; and the reseeding when the world size changed since the save."""

import re
import random
import time

import numpy as np
import pytest
import torch

from at2po.training.run_dir import CHECKPOINT_STATE
from at2po.training.trainer import Trainer
from conftest import make_run_cfg, tiny_search_qa_assets

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_search_qa_assets(tmp_path_factory.mktemp("state_assets"))


def weights(tr):
    return {k: v.detach().clone() for k, v in tr.accelerator.unwrap_model(tr.model).state_dict().items()}


def draws(tr):
    """One draw from every random stream a resumed run must continue, and the sampler's RNG state."""
    return (random.random(), float(np.random.rand()), float(torch.rand(1)),
            float(torch.rand(1, generator=tr.shuffle_rng)), float(tr.engine.rng.random()),
            tr.generator.get_rng_state().tolist())


def test_checkpoint_contents_and_a_direct_load_restore_everything(assets, tmp_path):
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    tr.sampler.take(2)
    tr.step = 3
    saved_weights = weights(tr)
    ckpt = tr.save_checkpoint()
    assert ckpt == tmp_path / "run" / "checkpoints" / "step_000003"
    state = torch.load(ckpt / CHECKPOINT_STATE, weights_only=False)
    assert set(state) == {"step", "optimizer", "scheduler", "sampler", "rng", "shuffle_rng", "engine_rng",
                          "generator_rng", "rank_states"}
    assert state["step"] == 3 and state["sampler"] == {"epoch": 0, "pos": 2, "n": 3}
    assert state["engine_rng"] == tr.engine.rng.bit_generator.state
    assert torch.equal(state["shuffle_rng"], tr.shuffle_rng.get_state())
    assert torch.equal(state["generator_rng"], tr.generator.get_rng_state())
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    # One process: rank_states[0] holds the same streams as the top-level keys.
    assert len(state["rank_states"]) == 1
    rank0 = state["rank_states"][0]
    assert set(rank0) == {"rng", "shuffle_rng", "engine_rng", "generator_rng"}
    assert rank0["engine_rng"] == state["engine_rng"] and torch.equal(rank0["shuffle_rng"], state["shuffle_rng"])
    assert torch.equal(rank0["generator_rng"], state["generator_rng"])
    assert torch.equal(rank0["rng"]["torch"], state["rng"]["torch"]) and rank0["rng"]["python"] == state["rng"]["python"]
    assert (ckpt / "config.yaml").exists() and list(ckpt.glob("*.safetensors")) and (ckpt / "tokenizer.json").exists()

    expected = draws(tr)  # what comes next after the save
    # Move every stream and the weights, then load the checkpoint by path (read here, not passed in).
    _moved(tr)
    tr.load_checkpoint(ckpt)
    assert tr.step == 3 and tr.sampler.state_dict() == {"epoch": 0, "pos": 2, "n": 3}
    for k, v in weights(tr).items():
        assert torch.equal(v, saved_weights[k]), k
    assert draws(tr) == expected

    # A directory without weights does not read back.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^no \*\.safetensors weights$"):
        tr._read_checkpoint(tmp_path / "empty")


def test_a_checkpoint_of_another_world_size_reseeds_every_stream_from_seed_step_rank(assets, tmp_path, capsys):
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0", "trainer.seed=5"))
    tr.step = 4
    ckpt = tr.save_checkpoint()
    state = torch.load(ckpt / CHECKPOINT_STATE, weights_only=False)
    state["rank_states"] = state["rank_states"] * 2  # as if two processes had written it
    torch.save(state, ckpt / CHECKPOINT_STATE)
    generator_state = tr.generator.get_rng_state()

    tr.load_checkpoint(ckpt)
    got = draws(tr)
    assert f"{ckpt} was written by 2 process(es), resuming with 1" in capsys.readouterr().out

    seed = [5, 4, 0]  # (trainer.seed, step, rank)
    random.seed(str(seed))
    np.random.seed(seed)
    torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    shuffle = torch.Generator().manual_seed(int(np.random.SeedSequence([*seed, 1]).generate_state(1)[0]))
    engine = np.random.default_rng([*seed, 2])
    # The sampler's stream is not reseeded (it is the same as before the load).
    assert got == (random.random(), float(np.random.rand()), float(torch.rand(1)),
                   float(torch.rand(1, generator=shuffle)), float(engine.random()), generator_state.tolist())


def test_fit_refuses_a_used_output_dir_unless_overwrite(assets, tmp_path):
    from at2po.training.run_dir import RUN_MARKER, RunDirError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7}\n')
    (out / "notes.txt").write_text("mine")
    (out / RUN_MARKER).write_text("")  # an earlier at2po run: --overwrite may replace its run files
    tr = Trainer(make_run_cfg(assets, out, "trainer.save_every=0"))
    with pytest.raises(RunDirError, match="is not empty"):
        tr.fit(stop_after=0)
    assert (out / "metrics.jsonl").read_text() == '{"step": 7}\n'  # nothing touched
    assert tr.fit(overwrite=True, stop_after=0) == {"history": [], "step": 0}
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert (out / "metrics.jsonl").read_text() == "" and (out / "config.yaml").exists()


def test_fit_validates_before_training_and_logs_it_as_step_0(assets, tmp_path):
    from at2po.training.trainer import read_metrics

    out = tmp_path / "run"
    tr = Trainer(make_run_cfg(assets, out, "trainer.save_every=0", "trainer.val_before_train=true",
                              "data.val_size=2", "rollout.max_response_tokens=12"))
    assert tr.val_records == []  # no validation yet: no records
    t0 = time.perf_counter()
    result = tr.fit(stop_after=0)
    wall = time.perf_counter() - t0
    assert result["step"] == 0 and len(result["history"]) == 1
    assert 0 < result["history"][0]["time/val"] <= wall
    logged = read_metrics(out / "metrics.jsonl")
    assert logged == result["history"] and logged[0]["step"] == 0
    assert {"val/em", "val/f1", "val/turns", "val/tool_calls"} <= set(logged[0])
    assert len(tr.val_records) == 2
    assert logged[0]["val/turns"] == pytest.approx(sum(r["turns"] for r in tr.val_records) / 2)


def test_train_step_order_and_rollout_metrics(assets, tmp_path):
    """One step: rollout, then the generator's sleep (an engine sharing the GPU frees memory), then
    the update; its rollout and reward metrics against naive sums over the rollout it made."""
    from at2po.training.trainer import build_train_batch

    from at2po.tasks.base import Score

    import copy

    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    # A reward that varies on the random policy's output (odd length wins) in the second tree of
    # the step, and is constant in the first: some advantages are exactly 0, others are not.
    first = tr.train_rows[copy.deepcopy(tr.sampler).take(2)[0]].id
    reward = lambda response, sample: 1.0 if sample.id == first else float(len(response) % 2)
    tr.task.score = lambda response, sample, protocol: Score(
        reward(response, sample), {"em": reward(response, sample), "f1": 0.5, "format_ok": 1.0}, None, "")
    events, results = [], []
    rollout, update = tr.engine.rollout, tr._update

    def recording_rollout(prompts, **kw):
        events.append("rollout")
        results.append(rollout(prompts, **kw))
        return results[-1]

    tr.engine.rollout = recording_rollout
    tr.generator.sleep = lambda: events.append("sleep")
    tr._update = lambda batch, n_trees: events.append(("update", n_trees)) or update(batch, n_trees)
    lr = tr.scheduler.get_last_lr()[0]
    t0 = time.perf_counter()
    m = tr.train_step()
    wall = time.perf_counter() - t0
    assert events == ["rollout", "sleep", ("update", 2)] and tr.step == 1
    res = results[0]
    scored = [r.score for r in res.rows if not r.duplicate]
    assert m["reward/mean"] == pytest.approx(sum(s.reward for s in scored) / len(scored))
    for k in ("em", "f1", "format_ok"):
        assert m[f"reward/{k}"] == pytest.approx(sum(s.metrics[k] for s in scored) / len(scored)), k
    nll = [-lp for tree in res.trees for node in tree.nodes[1:] for lp, keep in zip(node.gen_logprobs, node.gen_mask)
           if keep]
    assert m["rollout/token_nll"] == pytest.approx(sum(nll) / len(nll))
    assert m["rollout/generation_calls"] == res.generation_calls
    assert m["rollout/leaves_per_tree"] == pytest.approx(sum(s.leaves for s in res.stats) / 2)
    assert m["rollout/depth_max"] == max(s.depth for s in res.stats)
    for k in ("generated_tokens", "prefill_tokens", "tool_calls", "tool_failures", "tool_infra_failures"):
        assert m[f"rollout/{k}"] == sum(getattr(s, k) for s in res.stats), k
    adv = build_train_batch(res, tr.cfg.algo)[0]
    a = adv.advantages[adv.response_mask.bool()].double()
    assert a.abs().max() > 0 and len({s.reward for s in scored}) == 2
    assert 0 < float((a == 0).double().mean()) < 1 and not (a == 1).any()
    assert m["adv/mean"] == pytest.approx(float(a.mean()))
    assert m["adv/std"] == pytest.approx(float(a.std()))  # sample std (n - 1)
    assert m["adv/abs_max"] == pytest.approx(float(a.abs().max()))
    assert m["adv/zero_frac"] == pytest.approx(float((a == 0).double().mean()))
    assert 0 < m["time/rollout"] < m["time/step"] <= wall
    assert m["time/update"] == pytest.approx(m["time/step"] - m["time/rollout"])
    assert m["perf/gen_tokens_per_s"] == pytest.approx(m["rollout/generated_tokens"] / m["time/rollout"])
    assert m["lr"] == lr and m["loss/updates"] == 2.0 and m["loss/grad_norm"] > 0


def test_optimizer_and_schedule_follow_the_config(assets, tmp_path):
    tr = Trainer(make_run_cfg(assets, tmp_path / "a", "optim.lr=0.02", "optim.betas=[0.8, 0.95]",
                              "optim.weight_decay=0.3"))
    (group,) = tr.optimizer.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.95), 0.3)
    assert tr.scheduler.get_last_lr() == [0.02]  # no warm-up: the configured lr from the first step
    warm = Trainer(make_run_cfg(assets, tmp_path / "b", "optim.lr=0.02", "optim.warmup_steps=4"))
    lrs = []
    for _ in range(5):
        lrs.append(warm.scheduler.get_last_lr()[0])
        warm.optimizer.step()
        warm.scheduler.step()
    assert lrs == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02])


def test_prompts_too_long_for_the_context_are_skipped_with_a_printed_warning(assets, tmp_path, capsys):
    import json

    rows = [json.loads(l) for l in (assets / "train.jsonl").read_text().splitlines()]
    rows.append({"id": "long", "question": "why " * 2100, "golden_answers": ["x"]})  # > 2048 positions alone
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", f"data.train_file={data}", f"data.val_file={data}"))
    assert [r.id for r in tr.train_rows] == [r["id"] for r in rows[:-1]]
    assert [r.id for r in tr.val_rows] == [r["id"] for r in rows[:-1]]
    out = capsys.readouterr().out
    assert out.count(f"skipping 1 of {len(rows)} rows that do not fit") == 2
    assert "warning: data.train_file:" in out and "warning: data.val_file:" in out and "ids: long" in out
    # A validation set of only too-long rows leaves validation off (the training set decides the run).
    only_long = tmp_path / "val.jsonl"
    only_long.write_text(json.dumps(rows[-1]) + "\n")
    tr = Trainer(make_run_cfg(assets, tmp_path / "run2", f"data.val_file={only_long}"))
    assert tr.val_rows == [] and len(tr.train_rows) == len(rows) - 1
    assert "warning: data.val_file: skipping 1 of 1 rows" in capsys.readouterr().out


def test_progress_bar_names_the_run_and_shows_the_reward(assets, tmp_path, capsys, monkeypatch):
    """The bar counts trainer.steps, starts at the resumed step, and shows the last reward."""
    import tqdm.auto

    made, postfixes = [], []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            if kwargs.get("desc") == "AT²PO":
                made.append(kwargs)
            super().__init__(*args, **kwargs)

        def set_postfix_str(self, s="", refresh=True):
            if self.desc.startswith("AT²PO"):
                postfixes.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    run = tmp_path / "run"
    Trainer(make_run_cfg(assets, run, "trainer.progress=true", "trainer.steps=1")).fit()
    capsys.readouterr()
    history = Trainer(make_run_cfg(assets, run, "trainer.progress=true", "trainer.steps=2")).fit(resume=True)["history"]
    bar = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if l.startswith("AT²PO")]
    assert bar[0].startswith("AT²PO:  50%") and "| 1/2 [" in bar[0]
    assert bar[-1].startswith("AT²PO: 100%") and "| 2/2 [" in bar[-1]
    assert bar[-1].endswith(f"reward {history[-1]['reward/mean']:.3f}]")
    # During each step's rollout the bar says which phase and turn is generating for how many
    # trajectories; after the step, the reward.
    kinds = "".join("r" if p.startswith("reward ") else "g" for p in postfixes)
    assert re.fullmatch(r"(g+r){2}", kinds), postfixes
    assert all(re.fullmatch(r"phase \d+-\d+ turn \d+: \d+ generating", p) for p in postfixes if not p.startswith("reward "))
    assert made == [dict(total=1, initial=0, desc="AT²PO", disable=False, dynamic_ncols=True),
                    dict(total=2, initial=1, desc="AT²PO", disable=False, dynamic_ncols=True)]
    # Off with trainer.progress=false, and on every process but the main one.
    Trainer(make_run_cfg(assets, tmp_path / "quiet", "trainer.steps=1")).fit(stop_after=0)
    other = Trainer(make_run_cfg(assets, tmp_path / "other", "trainer.progress=true", "trainer.steps=1"))
    other.is_main = False
    other.fit(stop_after=0)
    assert [m["disable"] for m in made[2:]] == [True, True]


def _moved(tr):
    """Move every random stream, the prompt position, the step and the weights away from a save."""
    draws(tr)
    tr.generator.set_rng_state(torch.Generator().manual_seed(123).get_state())
    tr.sampler.take(1)
    tr.step = 9
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.5)


def test_a_checkpoint_without_rank_states_restores_its_top_level_streams(assets, tmp_path, capsys):
    """Checkpoints written before rank_states existed hold one process's streams at the top level."""
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    tr.sampler.take(1)
    tr.step = 2
    ckpt = tr.save_checkpoint()
    expected = draws(tr)
    state = torch.load(ckpt / CHECKPOINT_STATE, weights_only=False)
    del state["rank_states"]
    torch.save(state, ckpt / CHECKPOINT_STATE)
    _moved(tr)
    capsys.readouterr()
    tr.load_checkpoint(ckpt)
    assert draws(tr) == expected and tr.step == 2
    assert "process(es)" not in capsys.readouterr().out  # same world size: no reseeding


def test_weights_of_another_model_are_refused_naming_the_keys(assets, tmp_path):
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    ckpt = tr.save_checkpoint()
    weights, state = tr._read_checkpoint(ckpt)
    model = tr.accelerator.unwrap_model(tr.model)
    assert "lm_head.weight" not in weights and model.config.tie_word_embeddings  # tied: saved once
    order = [k for k in model.state_dict() if k in weights]
    wrong = {k: v for k, v in weights.items() if k not in order[:4]}
    wrong.update({"extra.a": weights[order[0]], "extra.b": weights[order[0]], "extra.c": weights[order[0]],
                  "extra.d": weights[order[0]]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        tr.load_checkpoint(ckpt, (wrong, state))
    unexpected = sorted(set(wrong) - set(model.state_dict()), key=list(wrong).index)[:3]
    assert str(err.value) == (f"checkpoint {ckpt} does not match the model: missing {order[:3]}, "
                              f"unexpected {unexpected}")
    # Only one kind of mismatch is enough to refuse.
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra.a'\]$"):
        tr.load_checkpoint(ckpt, ({**weights, "extra.a": weights[order[0]]}, state))
    with pytest.raises(ValueError, match=rf"missing \['{order[0]}'\], unexpected \[\]$"):
        tr.load_checkpoint(ckpt, ({k: v for k, v in weights.items() if k != order[0]}, state))
    # An untied head missing from the weights is a mismatch too.
    model.config.tie_word_embeddings = False
    try:
        with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\], unexpected \[\]$"):
            tr.load_checkpoint(ckpt, (weights, state))
    finally:
        model.config.tie_word_embeddings = True
    tr.load_checkpoint(ckpt, (weights, state))  # the checkpoint itself loads
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_separate_generation_model_receives_the_loaded_weights(assets, tmp_path):
    """Under FSDP the generator samples from an unsharded copy (Trainer._gen_model): a load must
    refresh it, or the resumed run would sample from the pre-resume policy."""
    import copy

    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    saved = weights(tr)
    ckpt = tr.save_checkpoint()
    _moved(tr)
    tr._gen_model = copy.deepcopy(tr.accelerator.unwrap_model(tr.model))
    tr.load_checkpoint(ckpt)
    for k, v in tr._gen_model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_under_fsdp_the_generator_samples_from_an_unsharded_copy_that_follows_the_updates(assets, tmp_path,
                                                                                          monkeypatch):
    """FSDP faked on one process: the trainer builds a separate, frozen, eval-mode copy of the policy
    for the generator, equal to it at the start and after every update."""
    import at2po.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "is_fsdp", lambda acc: True)
    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0", "optim.lr=1e-2"))
    policy, gen = tr.accelerator.unwrap_model(tr.model), tr._gen_model
    assert gen is not None and gen is not policy and tr.generator.model is gen
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())
    start = weights(tr)
    assert all(torch.equal(v, start[k]) for k, v in gen.state_dict().items())
    tr.train_step()
    now = weights(tr)
    assert any(not torch.equal(now[k], start[k]) for k in now)  # the policy moved ...
    assert all(torch.equal(v, now[k]) for k, v in gen.state_dict().items())  # ... and the copy with it


def test_under_fsdp_the_full_state_goes_to_load_full_state(assets, tmp_path, monkeypatch):
    """The FSDP branch's plumbing (FSDP itself needs GPUs): weights and optimizer state go to
    ``load_full_state`` with this trainer's accelerator, model and optimizer, and nothing is loaded
    into the module or optimizer directly."""
    import at2po.training.trainer as trainer_module

    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    tr.step = 1
    ckpt = tr.save_checkpoint()
    weights_read, state = tr._read_checkpoint(ckpt)
    _moved(tr)
    moved = weights(tr)
    calls = []
    monkeypatch.setattr(trainer_module, "is_fsdp", lambda acc: True)
    monkeypatch.setattr(trainer_module, "load_full_state", lambda *args: calls.append(args))
    monkeypatch.setattr(tr.optimizer, "load_state_dict", lambda s: calls.append(("optimizer", s)))
    tr.load_checkpoint(ckpt, (weights_read, state))
    ((acc, model, optimizer, w, optim_state),) = calls
    assert acc is tr.accelerator and model is tr.model and optimizer is tr.optimizer
    assert w is weights_read and optim_state is state["optimizer"]
    assert all(torch.equal(v, moved[k]) for k, v in weights(tr).items())  # not loaded a second time
    assert tr.step == 1


def test_each_process_seeds_its_streams_from_seed_plus_rank(assets, tmp_path, monkeypatch):
    """Process r of a run with trainer.seed s draws what process 0 of a run with seed s + r draws
    (global RNGs, the engine's), its own mini-batch shuffle (s + 7919 r), and the same prompt order
    as every other process (the sampler's seed is s alone). The rank is faked on one process."""
    from accelerate import Accelerator

    extra = ["trainer.save_every=0", "trainer.mini_batch_prompts=2"]
    ref = Trainer(make_run_cfg(assets, tmp_path / "ref", *extra, "trainer.seed=4"))
    expected = list(draws(ref))
    expected[3] = float(torch.rand(1, generator=torch.Generator().manual_seed(3 + 7919)))
    rank0 = Trainer(make_run_cfg(assets, tmp_path / "rank0", *extra, "trainer.seed=3"))
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 1))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    rank1 = Trainer(make_run_cfg(assets, tmp_path / "rank1", *extra, "trainer.seed=3"))
    assert list(draws(rank1)) == expected
    assert rank1.sampler.take(3) == rank0.sampler.take(3)
    assert rank1._my_share(list("abcdef")) == list("bdf")


def test_the_prompt_order_follows_trainer_seed_and_data_shuffle(assets, tmp_path):
    """The trainer's prompt sampler walks the rows in the seeded permutation of epoch 0 (numpy's
    default_rng([seed, epoch])), or in file order with data.shuffle=false."""
    n = 3
    orders = {}
    for seed in (0, 5):
        tr = Trainer(make_run_cfg(assets, tmp_path / f"s{seed}", "trainer.save_every=0", f"trainer.seed={seed}"))
        assert len(tr.train_rows) == n
        orders[seed] = tr.sampler.take(n)
        assert orders[seed] == np.random.default_rng([seed, 0]).permutation(n).tolist()
    assert orders[0] != orders[5]  # the seed matters (these two seeds give different permutations)
    plain = Trainer(make_run_cfg(assets, tmp_path / "plain", "trainer.save_every=0", "trainer.seed=5",
                                 "data.shuffle=false"))
    assert plain.sampler.take(n) == [0, 1, 2]


def test_fit_validates_logs_and_saves_on_their_schedules(assets, tmp_path):
    """trainer.steps=4, val_every=2, log_every=3, save_every=3: validation after step 2 and once
    after the last step (not twice), a log line at steps 2 (validation), 3 and 4, checkpoints at 3
    and 4 (the last step always), every step in the history; the bar is gone afterwards."""
    from at2po.training.trainer import read_metrics

    run = tmp_path / "run"
    tr = Trainer(make_run_cfg(assets, run, "trainer.steps=4", "trainer.val_every=2", "trainer.log_every=3",
                              "trainer.save_every=3", "trainer.keep_checkpoints=0", "data.val_size=1",
                              "rollout.max_response_tokens=12"))
    validated, validate = [], tr.validate
    tr.validate = lambda: validated.append(tr.step) or validate()
    history = tr.fit()["history"]
    assert validated == [2, 4]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["step"] for h in history if "val/em" in h] == [2, 4]
    logged = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in logged] == [2, 3, 4] and logged == [h for h in history if h["step"] in (2, 3, 4)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    assert tr._bar is None
    tr._rollout_progress("validation", 1, 1)  # a rollout after fit (e.g. an evaluation) has no bar to update


def test_under_fsdp_a_save_writes_the_gathered_weights_and_optimizer_state(assets, tmp_path, monkeypatch):
    """The FSDP branch of save_checkpoint (FSDP itself needs GPUs): the weights and the optimizer
    state written are what full_state_dict and full_optimizer_state gathered from this trainer's
    accelerator, model and optimizer, not the local module's."""
    import at2po.training.trainer as trainer_module
    from safetensors.torch import load_file

    tr = Trainer(make_run_cfg(assets, tmp_path / "run", "trainer.save_every=0"))
    calls = []
    local = weights(tr)
    gathered = {k: v + 1 for k, v in local.items() if k != "lm_head.weight"}  # tied head: saved once
    optim_state = {"state": {}, "param_groups": [{"lr": 0.5, "params": []}]}

    def full_state_dict(acc, model):
        calls.append(("weights", acc, model))
        return gathered

    def full_optimizer_state(acc, model, optimizer):
        calls.append(("optimizer", acc, model, optimizer))
        return optim_state

    monkeypatch.setattr(trainer_module, "is_fsdp", lambda acc: True)
    monkeypatch.setattr(trainer_module, "full_state_dict", full_state_dict)
    monkeypatch.setattr(trainer_module, "full_optimizer_state", full_optimizer_state)
    ckpt = tr.save_checkpoint()
    assert calls == [("weights", tr.accelerator, tr.model), ("optimizer", tr.accelerator, tr.model, tr.optimizer)]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved.keys() == gathered.keys() and all(torch.equal(saved[k], gathered[k]) for k in saved)
    assert torch.load(ckpt / CHECKPOINT_STATE, weights_only=False)["optimizer"] == optim_state
    assert all(torch.equal(v, local[k]) for k, v in weights(tr).items())  # the module itself is untouched
