"""Run directories and checkpoints that never lose a user's results.

What a run directory (``trainer.output_dir``) holds: ``config.yaml``, ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/step_XXXXXX/`` (weights, tokenizer, ``config.yaml``,
``trainer_state.pt`` and ``manifest.json``). The rules (docs/architecture.md, "Run directories"):

- one run at a time: the run's main process holds an exclusive lock on ``.at2po-run.lock`` for
  as long as it trains; a second run, an ``--overwrite`` or a ``--resume`` into the directory
  meanwhile refuses and names the holder's PID. The kernel drops the lock when its process ends,
  however it ends, so a killed run leaves no stale lock behind;
- a fresh run refuses a directory that already holds anything, unless ``overwrite``, which is
  refused too unless the directory holds an at2po run (its ``.at2po-run`` marker, written by
  every run); then the run's own files above are removed, nothing else;
- a resume loads the newest checkpoint that reads back completely and names each newer one it
  skipped; temp directories of saves that never finished are removed first;
- a resume compares the checkpoint's config with the current one: a change that alters the
  algorithm, the data or their order refuses unless ``force_resume``; operational settings
  (logging, saving, validation, the retriever's address, ``trainer.steps`` upwards) may change;
- a save that fails (a full disk) removes its temp directory and stops with a message naming
  the last complete checkpoint.

The trainer calls these functions; none of them knows the model or the optimizer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINT_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"  # written last inside the temp dir: file sizes of the complete checkpoint
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")
RUN_MARKER = ".at2po-run"  # written by every run: --overwrite deletes only directories that hold it
RUN_LOCK = ".at2po-run.lock"  # flock-ed by the main process of the run training in the directory
TMP_PREFIX = ".tmp_step_"

# Dotted config keys whose change leaves the trained weights and the data order as they are.
# Every other key is compared on resume.
RESUMABLE_CHANGES = frozenset({
    "trainer.steps", "trainer.output_dir", "trainer.save_every", "trainer.keep_checkpoints",
    "trainer.val_every", "trainer.val_before_train", "trainer.log_every", "trainer.tensorboard",
    "trainer.wandb", "trainer.wandb_project", "trainer.progress",
    "data.val_file", "data.val_size",
    "rollout.tool_workers", "rollout.tool_timeout",
    "model.gradient_checkpointing",
    "tools.search.retriever_url", "tools.search.max_consecutive_failures",
})


class RunDirError(ValueError):
    """A run directory problem the user fixes (a one-line CLI error)."""


# -- one run at a time --------------------------------------------------------------------------
def lock_holder(out_dir: str | Path) -> int | None:
    """The PID of the process whose run holds ``out_dir``'s lock, None when no run holds it or
    this process does (0 when a holder has not written its PID yet). Takes no lock."""
    path = Path(out_dir) / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"trainer.output_dir={out_dir}: cannot read {RUN_LOCK} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid_in(fd)
        return None if pid == os.getpid() else pid
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int:
    """The holder's PID written in an open lock file, 0 when it has not been written yet."""
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def _in_use(out_dir: Path, pid: int) -> RunDirError:
    holder = f"process {pid}" if pid else "another process"
    return RunDirError(f"trainer.output_dir={out_dir} is in use by another at2po run ({holder}): wait for it "
                       "to finish or stop it, or choose another output_dir")


class RunLock:
    """An exclusive lock on a run directory for the life of one run (``flock`` on RUN_LOCK, with
    the holder's PID written into the file). ``acquire`` refuses with the holder's PID."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        _check_dir(self.out_dir)
        fd = os.open(self.out_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise _in_use(self.out_dir, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_not_in_use(out_dir: str | Path) -> None:
    """Refuse a directory another run holds (every process of a run calls this before its main
    process takes the lock, so that all of them stop together)."""
    pid = lock_holder(out_dir)
    if pid is not None:
        raise _in_use(Path(out_dir), pid)


def mark_run(out_dir: str | Path) -> None:
    """Write the marker that tells a later ``--overwrite`` this directory holds an at2po run."""
    (Path(out_dir) / RUN_MARKER).write_text("an at2po run directory: at2po train --overwrite may replace its run files\n")


# -- fresh runs ------------------------------------------------------------------------------------
def _check_dir(out_dir: Path) -> None:
    """``out_dir`` exists as a directory we can write into, or a RunDirError naming the cause."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"trainer.output_dir={out_dir} is not writable ({e.strerror or e}): "
                          "choose a directory you can write to") from None


def check_fresh(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a run from step 0 into a directory that another run holds, or that holds anything
    (a second run must not eat the first one's results) unless ``overwrite``, and ``overwrite`` of
    a directory that holds no at2po run. Changes nothing: every process of a multi-process run
    calls it, so that all of them stop together."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"trainer.output_dir={out_dir} is a file, not a directory: choose another path")
    check_not_in_use(out_dir)
    held = [p for p in out_dir.iterdir() if p.name != RUN_LOCK] if out_dir.is_dir() else []
    if not overwrite and held:
        raise RunDirError(
            f"trainer.output_dir={out_dir} is not empty: pass --resume to continue the run in it, "
            "--overwrite to start over (deletes its checkpoints and logs), or choose another output_dir")
    if overwrite and held and not (out_dir / RUN_MARKER).is_file():
        raise RunDirError(
            f"trainer.output_dir={out_dir} holds no at2po run (no {RUN_MARKER} file), so --overwrite deletes "
            f"nothing there: choose another output_dir, or empty it yourself (a run made before at2po wrote the "
            f"marker has none: create an empty {RUN_MARKER} in it to let --overwrite replace it)")


def prepare_fresh(out_dir: str | Path, overwrite: bool = False) -> None:
    """Make ``out_dir`` ready for a run from step 0 (``check_fresh``); with ``overwrite`` the run
    files of RUN_FILES are removed, nothing else. One process does this."""
    out_dir = Path(out_dir)
    check_fresh(out_dir, overwrite)
    if overwrite and out_dir.is_dir():
        for name in (*RUN_FILES, RUN_MARKER):
            p = out_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    _check_dir(out_dir)


# -- checkpoints -----------------------------------------------------------------------------------
def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Remove temp directories of saves that never completed (killed, disk full); returns them."""
    root = Path(out_dir) / "checkpoints"
    stale = sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Every renamed-into-place checkpoint directory, complete or not, oldest first."""
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def completed_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories that hold their trainer state, oldest first (validity is checked
    on reading)."""
    return [p for p in checkpoint_dirs(out_dir) if (p / CHECKPOINT_STATE).is_file()]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path) -> None:
    """Flush every file of a finished checkpoint to disk and record its size: a later truncation
    or a lost file is then seen before anything is loaded."""
    sizes = {}
    for p in sorted(ckpt_dir.iterdir()):
        if p.is_file():
            _fsync(p)
            sizes[p.name] = p.stat().st_size
    (ckpt_dir / MANIFEST).write_text(json.dumps({"sizes": sizes}, indent=1))
    _fsync(ckpt_dir / MANIFEST)


def check_manifest(ckpt_dir: Path) -> None:
    """Raise ValueError when a file the manifest lists is missing or has another size. A checkpoint
    of an earlier version (no manifest) is checked by reading it only."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return
    try:
        sizes = json.loads(path.read_text())["sizes"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{MANIFEST} is unreadable") from None
    for name, size in sizes.items():
        f = ckpt_dir / name
        if not f.is_file():
            raise ValueError(f"{name} is missing")
        if f.stat().st_size != size:
            raise ValueError(f"{name} has {f.stat().st_size} bytes, {size} when saved")


def save_atomically(out_dir: str | Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint ``step`` through ``write(tmp_dir)`` into a temp dir, flush it, rename it into
    place, then drop all but the newest ``keep`` (0 keeps all). A failing write (e.g. ENOSPC)
    removes the temp dir and raises a RunDirError naming the last complete checkpoint."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{TMP_PREFIX}{step:06d}_{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        write_manifest(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint must not fill the disk for the next try
        # torch.save reports a full disk as a RuntimeError of its stream writer, not as OSError:
        # "failed writing file ..." or, when a write came up short, "unexpected pos N vs M".
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or \
            any(m in str(e) for m in ("No space left", "failed writing", "unexpected pos"))
        if not (full or isinstance(e, OSError)):
            raise
        done = completed_checkpoints(out_dir)
        last = f"the last complete checkpoint is {done[-1]}" if done else "no checkpoint is complete yet"
        why = "the disk is full" if full else (e.strerror or str(e))
        raise RunDirError(f"could not save the checkpoint of step {step} in {root}: {why}; {last} "
                          "(free space, then rerun with --resume)") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    if keep > 0:
        for old in completed_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_finite_weights(ckpt: Path, weights: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf: it reads back, but a run resumed from
    it samples from NaN probabilities. It is not skipped like a damaged one, because training
    diverged before it was saved and the user decides what to resume from."""
    import torch

    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    earlier = [p for p in completed_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    fix = (f"move it out of {ckpt.parent} to resume from {earlier[-1]}" if earlier
           else "no earlier checkpoint: start over with --overwrite")
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise RunDirError(f"checkpoint {ckpt} holds NaN/inf weights ({bad[0]}{more}): training diverged before it was "
                      f"saved; {fix} (a lower optim.lr may keep it from diverging again)")


def load_newest_valid(out_dir: str | Path, read: Callable[[Path], Any],
                      say: Callable[[str], None] = print) -> tuple[Path, Any] | None:
    """``(checkpoint, read(checkpoint))`` of the newest checkpoint that reads back completely, or
    None when there is none. Each newer one that fails is skipped with a line saying why."""
    skipped = []
    for ckpt in reversed(checkpoint_dirs(out_dir)):  # named when skipped, even without its trainer state
        try:
            if not (ckpt / CHECKPOINT_STATE).is_file():
                raise FileNotFoundError(f"no {CHECKPOINT_STATE}")
            check_manifest(ckpt)
            loaded = read(ckpt)
        except RunDirError:  # readable but unusable (NaN weights): the user decides
            raise
        except Exception as e:  # any damage (truncation, a lost file, garbage) skips the checkpoint
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            say(f"skipping checkpoint {ckpt}: it does not read back ({reason})")
            skipped.append(ckpt)
            continue
        return ckpt, loaded
    if skipped:
        raise RunDirError(f"no checkpoint in {Path(out_dir) / 'checkpoints'} reads back "
                          f"({len(skipped)} damaged): start over with --overwrite or another output_dir")
    return None


# -- config of a resumed run -----------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every key (outside RESUMABLE_CHANGES) whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        # A key added by a later version of at2po, still at the value the old run used implicitly.
        if key not in a:
            continue
        changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def check_resume_config(ckpt: Path, current: dict, step: int, force: bool,
                        say: Callable[[str], None] = print) -> None:
    """Refuse a resume whose config would change the algorithm or the data (unless ``force``), and
    one whose trainer.steps is below the checkpoint's step (always: nothing would be trained)."""
    import yaml

    steps = current["trainer"]["steps"]
    if steps < step:
        raise RunDirError(f"trainer.steps={steps} is below the checkpoint's step {step} ({ckpt}): "
                          f"set trainer.steps >= {step}, or start a new run in another output_dir")
    path = ckpt / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        if not force:
            raise RunDirError(f"{path} is missing or unreadable, so the resume cannot be checked against it: "
                              "pass --force-resume to resume anyway")
        say(f"warning: {path} is unreadable; resuming unchecked (--force-resume)")
        return
    changes = config_changes(saved, current)
    if not changes:
        return
    listed = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
    if not force:
        raise RunDirError(f"the config differs from the run's in {ckpt} in what changes the training ({listed}): "
                          "undo the change, start a new run in another output_dir, or pass --force-resume")
    say(f"warning: resuming with a changed config (--force-resume): {listed}")


def check_data_size(saved_rows: int | None, rows: int, force: bool, say: Callable[[str], None] = print) -> None:
    """The same data.train_file path may hold other rows now: the data order would change."""
    if saved_rows is None or saved_rows == rows:
        return
    message = f"data.train_file now has {rows} usable rows, the checkpoint's run had {saved_rows}"
    if not force:
        raise RunDirError(f"{message}: restore the file, start a new run in another output_dir, or pass --force-resume")
    say(f"warning: {message}; resuming with a new epoch over the new rows (--force-resume)")


def rewrite_metrics(path: str | Path, last_step: int) -> None:
    """Keep the metrics rows up to ``last_step`` (a resumed run replays what came after its
    checkpoint); a line cut short by a kill is dropped. Atomic: a kill mid-way keeps the old file."""
    path = Path(path)
    kept = []
    if last_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
