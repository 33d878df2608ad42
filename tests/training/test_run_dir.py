"""Run directories keep the user's results (issue 14): a second fresh run is refused, a damaged
checkpoint is skipped, stale temp dirs go, a resume that would change the training is refused,
a full disk stops the run without leaving a temp dir behind. Judged by the files and weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from at2po.config import save_config
from at2po.training import run_dir
from at2po.training.run_dir import RunDirError, config_changes, prepare_fresh, rewrite_metrics
from at2po.training.trainer import Trainer, latest_checkpoint
from conftest import make_run_cfg, tiny_search_qa_assets

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_search_qa_assets(tmp_path_factory.mktemp("assets"))


def cfg(assets, out, *extra):
    return make_run_cfg(assets, out, "trainer.keep_checkpoints=0", *extra, val=False)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(assets, tmp_path_factory):
    """A finished 2-step run and its final weights (the reference of every resume below)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    trainer = Trainer(cfg(assets, out, "trainer.steps=2"))
    trainer.fit()
    return out, weights(trainer)


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_fresh_run_refuses_a_non_empty_output_dir_and_changes_nothing(assets, two_steps, tmp_path):
    run = copy_run(two_steps[0], tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(RunDirError, match="is not empty: pass --resume .* --overwrite .* another output_dir"):
        Trainer(cfg(assets, run, "trainer.steps=1")).fit()
    assert snapshot(run) == before
    # --overwrite starts over: the run's own files are replaced, anything else of the user's stays.
    (run / "notes.txt").write_text("mine")
    Trainer(cfg(assets, run, "trainer.steps=1")).fit(overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_output_dir_that_is_a_file_or_not_writable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        prepare_fresh(f)
    with pytest.raises(RunDirError, match="is not writable"):
        prepare_fresh("/proc/at2po_run")  # refused even to root


def test_resume_skips_a_truncated_newest_checkpoint_and_replays_to_the_same_weights(assets, two_steps, tmp_path,
                                                                                    capsys):
    run = copy_run(two_steps[0], tmp_path / "run")
    newest = run / "checkpoints" / "step_000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    stale = run / "checkpoints" / ".tmp_step_000003_4242"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 64)
    capsys.readouterr()
    trainer = Trainer(cfg(assets, run, "trainer.steps=2"))
    trainer.fit(resume=True)
    out = capsys.readouterr().out
    assert f"removed {stale}" in out and not stale.exists()
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_000002'}" in out
    assert f"resumed from {run / 'checkpoints' / 'step_000001'} at step 1" in out
    for k, v in weights(trainer).items():
        assert torch.equal(v, two_steps[1][k]), k
    assert latest_checkpoint(run).name == "step_000002"


def test_resume_names_a_newest_checkpoint_that_lost_its_trainer_state(assets, two_steps, tmp_path, capsys):
    """A checkpoint directory without trainer_state.pt was passed over without a word (the
    README promises every skipped checkpoint is named)."""
    run = copy_run(two_steps[0], tmp_path / "run")
    (run / "checkpoints" / "step_000002" / run_dir.CHECKPOINT_STATE).unlink()
    capsys.readouterr()
    Trainer(cfg(assets, run, "trainer.steps=2")).fit(resume=True)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_000002'}: it does not read back (no trainer_state.pt)" in out
    assert f"resumed from {run / 'checkpoints' / 'step_000001'} at step 1" in out


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(assets, two_steps, tmp_path):
    run = copy_run(two_steps[0], tmp_path / "run")
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="no checkpoint .* reads back \\(2 damaged\\)"):
        Trainer(cfg(assets, run, "trainer.steps=3")).fit(resume=True)


@pytest.mark.parametrize("override, message", [
    ("algo.clip_high=0.2", "algo.clip_high: 0.004 -> 0.2"),
    ("rollout.top_k=1", "rollout.top_k: 2 -> 1"),
    ("trainer.seed=3", "trainer.seed: 0 -> 3"),
])
def test_resume_refuses_a_change_of_the_training_unless_forced(assets, two_steps, tmp_path, override, message):
    run = copy_run(two_steps[0], tmp_path / "run")
    with pytest.raises(RunDirError, match=f"config differs .*{message}.*--force-resume"):
        Trainer(cfg(assets, run, "trainer.steps=3", override)).fit(resume=True)
    assert latest_checkpoint(run).name == "step_000002"


def test_resume_with_another_train_file_refuses_and_forced_does_not_crash(assets, two_steps, tmp_path, capsys):
    run = copy_run(two_steps[0], tmp_path / "run")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "question": "Who founded Zorbex?", "golden_answers": ["Mila Tarn"]}) + "\n")
    with pytest.raises(RunDirError, match="data.train_file"):
        Trainer(cfg(assets, run, "trainer.steps=3", f"data.train_file={other}")).fit(resume=True)
    Trainer(cfg(assets, run, "trainer.steps=3", f"data.train_file={other}")).fit(resume=True, force_resume=True)
    assert "warning: resuming with a changed config (--force-resume): data.train_file" in capsys.readouterr().out
    assert latest_checkpoint(run).name == "step_000003"


def test_a_train_file_whose_rows_changed_under_the_same_path_refuses(assets, two_steps, tmp_path, capsys):
    import shutil

    run = copy_run(two_steps[0], tmp_path / "run")
    data = tmp_path / "assets"
    shutil.copytree(assets, data)
    with open(data / "train.jsonl", "a") as f:  # one more row, same path as far as the config goes
        f.write(json.dumps({"id": "9", "question": "What flows through Quovia?", "golden_answers": ["Drelto"]}) + "\n")
    moved = cfg(assets, run, "trainer.steps=3")
    moved.data.train_file = str(assets / "train.jsonl")  # the config is unchanged ...
    trainer = Trainer(cfg(data, run, "trainer.steps=3"))
    trainer.cfg = moved  # ... while the rows are those of the grown file
    with pytest.raises(RunDirError, match="data.train_file now has 4 usable rows, the checkpoint's run had 3"):
        trainer.fit(resume=True)
    quiet = Trainer(cfg(data, run, "trainer.steps=3"))  # another process of the same forced resume
    quiet.cfg, quiet.is_main = moved, False
    capsys.readouterr()
    assert quiet.fit(resume=True, force_resume=True, stop_after=0)["step"] == 2
    assert capsys.readouterr().out == ""
    assert trainer.fit(resume=True, force_resume=True)["step"] == 3  # forced: a new epoch over the new rows
    assert ("warning: data.train_file now has 4 usable rows, the checkpoint's run had 3; resuming with a new "
            "epoch over the new rows (--force-resume)") in capsys.readouterr().out
    assert trainer.sampler.state_dict()["n"] == 4


def test_steps_below_the_checkpoint_refuse_and_operational_changes_resume(assets, two_steps, tmp_path):
    run = copy_run(two_steps[0], tmp_path / "run")
    with pytest.raises(RunDirError, match="trainer.steps=1 is below the checkpoint's step 2"):
        Trainer(cfg(assets, run, "trainer.steps=1")).fit(resume=True, force_resume=True)
    # Logging, saving and validation settings, and more steps, are not changes of the training.
    Trainer(cfg(assets, run, "trainer.steps=3", "trainer.log_every=2", "trainer.save_every=3",
                "rollout.tool_workers=1")).fit(resume=True)
    assert latest_checkpoint(run).name == "step_000003"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_resume_refuses_a_checkpoint_with_non_finite_weights_and_names_the_previous_one(assets, two_steps, tmp_path,
                                                                                         bad):
    from safetensors.torch import load_file, save_file

    run = copy_run(two_steps[0], tmp_path / "run")
    newest = run / "checkpoints" / "step_000002"
    w = load_file(newest / "model.safetensors")
    w["model.norm.weight"][0] = bad  # same size: the manifest still holds
    save_file(w, newest / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(run)
    with pytest.raises(RunDirError, match=r"step_000002 holds NaN/inf weights \(model.norm.weight\): .* move it out "
                                          r"of .*checkpoints to resume from .*step_000001"):
        Trainer(cfg(assets, run, "trainer.steps=3")).fit(resume=True)
    assert snapshot(run) == before  # nothing removed or rewritten
    shutil.move(newest, tmp_path / "diverged")
    Trainer(cfg(assets, run, "trainer.steps=3")).fit(resume=True)
    assert latest_checkpoint(run).name == "step_000003"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed"),  # torch.save's
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs "
                                                "4180")])  # torch.save's, when a write comes up short
def test_a_full_disk_during_a_save_leaves_no_temp_dir_and_names_the_last_checkpoint(assets, two_steps, tmp_path,
                                                                                    monkeypatch, error):
    run = copy_run(two_steps[0], tmp_path / "run")
    trainer = Trainer(cfg(assets, run, "trainer.steps=3"))
    real = trainer._write_checkpoint

    def disk_full(tmp):
        real(tmp)  # most of the checkpoint is written, then the disk fills up
        raise error

    monkeypatch.setattr(trainer, "_write_checkpoint", disk_full)
    with pytest.raises(RunDirError, match="step 3 .* the disk is full; the last complete checkpoint is .*step_000002"):
        trainer.fit(resume=True)
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert latest_checkpoint(run).name == "step_000002"
    monkeypatch.undo()
    Trainer(cfg(assets, run, "trainer.steps=3")).fit(resume=True)  # space is back: the resume works
    assert latest_checkpoint(run).name == "step_000003"


def test_config_changes_lists_what_alters_training_only():
    saved = {"algo": {"clip_high": 0.004}, "trainer": {"steps": 2, "log_every": 1}, "task": {"options": {"r": 1}},
             "data": {"train_file": "a", "val_file": "v"}}
    current = {"algo": {"clip_high": 0.004, "new_field": 1}, "trainer": {"steps": 9, "log_every": 5},
               "task": {"options": {"r": 2}}, "data": {"train_file": "a", "val_file": "w"}}
    # A field a later version added is not a change; options compare as a whole.
    assert config_changes(saved, current) == ["task.options: {'r': 1} -> {'r': 2}"]


def test_rewrite_metrics_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    rewrite_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    rewrite_metrics(path, 0)
    assert path.read_text() == ""


def test_a_checkpoint_whose_file_lost_bytes_fails_its_manifest(two_steps, tmp_path):
    ckpt = copy_run(two_steps[0], tmp_path / "run") / "checkpoints" / "step_000001"
    run_dir.check_manifest(ckpt)
    with open(ckpt / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ValueError, match="tokenizer.json has"):
        run_dir.check_manifest(ckpt)


def test_a_resume_reads_the_chosen_checkpoint_once(assets, two_steps, tmp_path, capsys):
    """The checkpoint validated by the resume is the one loaded, not read a second time (a
    checkpoint of a real model is gigabytes)."""
    run = copy_run(two_steps[0], tmp_path / "run")
    trainer = Trainer(cfg(assets, run, "trainer.steps=2"))
    reads, read = [], trainer._read_checkpoint
    trainer._read_checkpoint = lambda path: reads.append(path) or read(path)
    assert trainer.fit(resume=True) == {"history": [], "step": 2}
    assert reads == [run / "checkpoints" / "step_000002"]
    for k, v in weights(trainer).items():
        assert torch.equal(v, two_steps[1][k]), k
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().out


def test_resume_into_a_missing_nested_dir_starts_from_step_0(assets, tmp_path, capsys):
    run = tmp_path / "a" / "b" / "run"
    assert Trainer(cfg(assets, run, "trainer.steps=1")).fit(resume=True, stop_after=0) == {"history": [], "step": 0}
    assert f"no checkpoint in {run}: starting from step 0" in capsys.readouterr().out
    assert (run / "config.yaml").is_file()


def test_a_process_other_than_the_main_one_prints_and_writes_nothing(assets, two_steps, tmp_path, capsys):
    """Only the main process talks and writes run files; the others validate, resume and train
    silently (a forced resume past a damaged checkpoint included)."""
    run = copy_run(two_steps[0], tmp_path / "resumed")
    newest = run / "checkpoints" / "step_000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    before = snapshot(run)
    trainer = Trainer(cfg(assets, run, "trainer.steps=2", "algo.clip_high=0.2"))
    capsys.readouterr()
    trainer.is_main = False
    assert trainer.fit(resume=True, force_resume=True, stop_after=0)["step"] == 1
    assert capsys.readouterr().out == "" and snapshot(run) == before
    # The main process says what the other one did not.
    trainer = Trainer(cfg(assets, run, "trainer.steps=2", "algo.clip_high=0.2"))
    trainer.fit(resume=True, force_resume=True, stop_after=0)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "warning: resuming with a changed config" in out and "resumed from" in out

    run = tmp_path / "a" / "run"
    trainer = Trainer(make_run_cfg(assets, run, "trainer.val_before_train=true", "data.val_size=1",
                                   "trainer.tensorboard=true", "trainer.steps=1"))
    capsys.readouterr()
    trainer.is_main = False
    result = trainer.fit(resume=True, stop_after=0)
    assert [h["step"] for h in result["history"]] == [0] and "val/em" in result["history"][0]
    assert capsys.readouterr().out == ""
    assert run.is_dir() and list(run.iterdir()) == []


def test_a_run_without_a_train_file_names_the_field(assets, tmp_path):
    with pytest.raises(ValueError) as err:
        Trainer(cfg(assets, tmp_path / "run", "data.train_file="))
    assert str(err.value) == "data.train_file is empty: give a data file of the 'search_qa' task"
    assert not (tmp_path / "run").exists()


# -- one run at a time ---------------------------------------------------------------------------------
HOLD = ("import sys, time\n"
        "from at2po.training.run_dir import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n")


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of tmp_path / 'run', as a run in progress does."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_directory_another_run_holds_is_refused_until_its_holder_is_killed(assets, two_steps, tmp_path, holder):
    """A fresh run, --overwrite and --resume into a directory whose lock another process holds
    refuse, name that process and change nothing; once the holder dies (SIGKILL: no clean-up
    of its own) the kernel has dropped the lock and a resume takes the directory over."""
    run, proc = holder
    shutil.copytree(two_steps[0], run, dirs_exist_ok=True, ignore=shutil.ignore_patterns(run_dir.RUN_LOCK))
    before = snapshot(run)
    in_use = rf"^trainer.output_dir={run} is in use by another at2po run \(process {proc.pid}\)"
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunDirError, match=in_use):
            Trainer(cfg(assets, run, "trainer.steps=3")).fit(**kwargs)
    with pytest.raises(RunDirError, match=in_use):
        run_dir.RunLock(run).acquire()
    assert snapshot(run) == before
    proc.kill()
    proc.wait()
    assert run_dir.lock_holder(run) is None
    Trainer(cfg(assets, run, "trainer.steps=3")).fit(resume=True)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert run_dir.lock_holder(run) is None  # released when the run ended


def test_overwrite_deletes_only_a_directory_that_holds_an_at2po_run(assets, tmp_path):
    """A directory at2po never wrote, even one whose files carry a run's names, is not replaced:
    --overwrite refuses and every file stays; a run directory (its marker) is replaced."""
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/model.bin"):
        (mine / name).write_text(f"the user's {name}")
    before = snapshot(mine)
    with pytest.raises(RunDirError, match=rf"^trainer.output_dir={mine} holds no at2po run \(no .at2po-run file\)"):
        Trainer(cfg(assets, mine, "trainer.steps=1")).fit(overwrite=True)
    assert snapshot(mine) == before
    (mine / run_dir.RUN_MARKER).write_text("")  # the documented way to hand an old run over
    Trainer(cfg(assets, mine, "trainer.steps=1")).fit(overwrite=True)
    assert [p.name for p in (mine / "checkpoints").iterdir()] == ["step_000001"]
    assert (mine / run_dir.RUN_MARKER).is_file()


def test_a_second_cli_run_into_a_training_directory_refuses_and_the_first_ends_intact(assets, tmp_path):
    """Two real `at2po train` processes into one output_dir: while the first trains, a second
    fresh run, an --overwrite and a --resume each exit with a one-line error naming the first's
    PID; the first run's metrics and checkpoints come out as if it had been alone."""
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    save_config(cfg(assets, run, "trainer.steps=8", "trainer.keep_checkpoints=0"), config)
    train = [sys.executable, "-m", "at2po.cli", "train", "--config", str(config)]
    first = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not run_dir.lock_holder(run) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_dir.lock_holder(run) == first.pid, first.stderr.read() if first.poll() is not None else ""
        # Frozen while the others try (SIGSTOP keeps its lock), so that it cannot finish first on a
        # busy machine; it goes on afterwards.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            attempts = [subprocess.run(train + extra, capture_output=True, text=True, timeout=240)
                        for extra in ([], ["--overwrite"], ["--resume"])]
        finally:
            os.kill(first.pid, signal.SIGCONT)
        for second in attempts:
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert lines == [f"at2po train: error: trainer.output_dir={run} is in use by another at2po run "
                             f"(process {first.pid}): wait for it to finish or stop it, or choose another output_dir"
                             "  (AT2PO_DEBUG=1 for the traceback)"], second.stderr
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s:06d}" for s in range(1, 9)]
