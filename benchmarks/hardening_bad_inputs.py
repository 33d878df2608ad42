"""Replay the bad inputs of issue 14 against two source trees and write a before -> after table.

    PYTHONPATH=src python benchmarks/hardening_bad_inputs.py --before /tmp/before/src --after src \\
        --out benchmarks/results/hardening-2026-12-02

``--before`` is a copy of ``src/`` from before the change (e.g. ``git archive <commit> src | tar -x``).
Every case runs the real CLI (``python -m at2po.cli``) in a subprocess, or the real retriever
server, with each tree on PYTHONPATH, in a fresh scratch directory, and records what a user
sees: the exit code, a traceback or the one error line, and the effect on files where that is
the point (a run directory's checkpoints and metrics). Writes ``bad-inputs.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import kill9_resume as tiny_run  # noqa: E402  (the same tiny search-QA run and config)


def cli(src: Path, args: list[str], cwd: Path, timeout: float = 300) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "at2po.cli", *args], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    return {"rc": rc, "out": out, "err": err, "seconds": round(time.monotonic() - t0, 1)}


def seen(r: dict) -> str:
    """What the user sees, in one cell."""
    err_lines = [l for l in r["err"].splitlines() if l.strip() and "it/s]" not in l and not l.startswith("[retriever]")]
    err_lines = [l.replace("  (AT2PO_DEBUG=1 for the traceback)", "") for l in err_lines]
    if r["rc"] == "timeout":
        return f"still running after {r['seconds']}s (killed)"
    if "Traceback (most recent call last)" in r["err"]:
        # The exception line: the last one that is not indented (a YAML error adds a caret line).
        last = [l for l in err_lines if not l.startswith((" ", "\t"))]
        return f"exit {r['rc']}, traceback: `{_cut(last[-1] if last else '')}`"
    if r["rc"] == 0:
        return "exit 0, no error"
    return f"exit {r['rc']}: `{_cut(err_lines[-1] if err_lines else r['out'].strip().splitlines()[-1:])}`"


def _cut(s, n=150) -> str:
    s = str(s).replace("|", "\\|").replace("`", "'")
    return s if len(s) <= n else s[: n - 3] + "..."


def run_files(run: Path) -> str:
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
    rows = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").is_file() else 0
    return f"checkpoints {','.join(c[-2:] for c in ckpts) or 'none'}; {rows} metric rows"


# -- cases ------------------------------------------------------------------------------------------
def config_case(override: str):
    def case(src, work, assets):
        return seen(cli(src, ["config", override], work))
    return case


def bad_yaml(src, work, assets):
    (work / "bad.yaml").write_text("model: [unclosed\n")
    return seen(cli(src, ["train", "--config", str(work / "bad.yaml")], work))


def config_is_dir(src, work, assets):
    return seen(cli(src, ["train", "--config", str(work)], work))


def config_not_utf8(src, work, assets):
    (work / "latin1.yaml").write_bytes("model:\n  path: caf\u00e9\n".encode("latin-1"))
    return seen(cli(src, ["train", "--config", str(work / "latin1.yaml")], work))


def train_not_utf8(src, work, assets):
    (work / "latin1.jsonl").write_bytes('{"id": "1", "question": "caf\u00e9?", "golden_answers": ["a"]}\n'
                                        .encode("latin-1"))
    return seen(cli(src, ["eval", "--dataset", f"x={work / 'latin1.jsonl'}", f"model.path={assets / 'model'}",
                          f"tools.search.corpus_file={assets / 'corpus.jsonl'}", "--out", str(work / "e")], work))


def missing_model_path(src, work, assets):
    return seen(cli(src, ["train", f"data.train_file={assets / 'train.jsonl'}",
                          f"tools.search.corpus_file={assets / 'corpus.jsonl'}"], work))


def output_dir_case(kind):
    def case(src, work, assets):
        target = work / "a_file" if kind == "file" else Path("/sys/at2po_run")
        if kind == "file":
            target.write_text("x")
        return seen(cli(src, ["train", "--config", str(assets / "config.yaml"), "trainer.steps=1",
                              f"trainer.output_dir={target}"], work))
    return case


def retriever_case(args_of):
    def case(src, work, assets):
        return seen(cli(src, args_of(work, assets), work))
    return case


def serve_bad_port(src, work, assets):
    r = cli(src, ["retriever", "build", "--corpus", str(assets / "corpus.jsonl"), "--out", str(work / "idx")], work)
    assert r["rc"] == 0, r["err"]
    return seen(cli(src, ["retriever", "serve", "--index", str(work / "idx"), "--port", "99999"], work, timeout=120))


def stop_word_corpus(work, assets):
    (work / "stop.jsonl").write_text('{"id": 1, "contents": "the of and"}\n{"id": 2, "contents": "a an the"}\n')
    return ["retriever", "build", "--corpus", str(work / "stop.jsonl"), "--out", str(work / "idx")]


def dup_ids(work, assets):
    (work / "dup.jsonl").write_text('{"id": "a", "contents": "river"}\n{"id": "a", "contents": "town"}\n')
    return ["retriever", "build", "--corpus", str(work / "dup.jsonl"), "--out", str(work / "idx")]


_BASE: dict[str, Path] = {}


def base_run(src: Path, work: Path, assets: Path) -> Path:
    """A finished 2-step run made by this source tree (checkpoints 1 and 2), copied for a case."""
    key = str(src)
    if key not in _BASE:
        path = work.parent / f"base_{len(_BASE)}"
        r = cli(src, ["train", "--config", str(assets / "config.yaml"), "trainer.steps=2",
                      f"trainer.output_dir={path}"], work.parent)
        assert r["rc"] == 0, r["err"][-2000:]
        _BASE[key] = path
    run = work / "run"
    shutil.copytree(_BASE[key], run)
    return run


def train(src, work, assets, run, *extra, resume=True):
    return cli(src, ["train", "--config", str(assets / "config.yaml"), f"trainer.output_dir={run}", *extra,
                     *(["--resume"] if resume else [])], work)


def fresh_into_existing(src, work, assets):
    run = base_run(src, work, assets)
    before = run_files(run)
    r = train(src, work, assets, run, "trainer.steps=1", resume=False)
    return f"{seen(r)}; old run: {before} -> {run_files(run)}"


def truncated_checkpoint(src, work, assets):
    run = base_run(src, work, assets)
    f = run / "checkpoints" / "step_000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = train(src, work, assets, run, "trainer.steps=3")
    said = [l for l in r["out"].splitlines() if l.startswith(("skipping", "resumed"))]
    return f"{seen(r)}; {_cut(' / '.join(said), 200) or 'no resume message'}"


def stale_temp(src, work, assets):
    run = base_run(src, work, assets)
    tmp = run / "checkpoints" / ".tmp_step_000003_4242"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 1000)
    r = train(src, work, assets, run, "trainer.steps=2")
    return f"{seen(r)}; temp dir {'still there' if tmp.exists() else 'removed'}"


def resume_other_train_file(src, work, assets):
    run = base_run(src, work, assets)
    (work / "one.jsonl").write_text('{"id": "x", "question": "Who founded Zorbex?", "golden_answers": ["Mila Tarn"]}\n')
    return seen(train(src, work, assets, run, "trainer.steps=4", f"data.train_file={work / 'one.jsonl'}"))


def resume_changed_algo(src, work, assets):
    run = base_run(src, work, assets)
    return seen(train(src, work, assets, run, "trainer.steps=3", "algo.clip_high=0.2"))


def resume_steps_below(src, work, assets):
    run = base_run(src, work, assets)
    r = train(src, work, assets, run, "trainer.steps=1")
    return f"{seen(r)}; {run_files(run)}"


def long_question(src, work, assets):
    q = "What is it? " + "lorem ipsum dolor " * 5600  # ~100 KB
    (work / "long.jsonl").write_text(json.dumps({"id": "long", "question": q, "golden_answers": ["x"]}) + "\n")
    r = cli(src, ["train", "--config", str(assets / "config.yaml"), "trainer.steps=1", "trainer.val_before_train=false",
                  f"data.train_file={work / 'long.jsonl'}", f"data.val_file={work / 'long.jsonl'}",
                  f"trainer.output_dir={work / 'run'}"], work, timeout=600)
    step = [l for l in r["out"].splitlines() if l.startswith("step 1:")]
    return f"{seen(r)} after {r['seconds']}s" + (f"; `{_cut(step[0], 120)}`" if step else "")


# -- retriever service ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, src: Path, index: Path, cwd: Path) -> None:
        import requests

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "at2po.cli", "retriever", "serve", "--index", str(index),
                                      "--port", str(self.port), "--log-level", "warning"], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/health", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("the retriever did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def big_corpus(work: Path) -> Path:
    words = "river town bridge lake castle forest mountain valley harbour market".split()
    with open(work / "big.jsonl", "w") as f:
        for i in range(2000):
            text = " ".join(words[(i * k) % len(words)] for k in range(1, 40)) + f" item{i} " + "filler text " * 40
            f.write(json.dumps({"id": str(i), "contents": text}) + "\n")
    return work / "big.jsonl"


def huge_request(src, work, assets):
    import requests

    r = cli(src, ["retriever", "build", "--corpus", str(big_corpus(work)), "--out", str(work / "idx")], work)
    assert r["rc"] == 0, r["err"]
    server = Server(src, work / "idx", work)
    try:
        waits = []
        done = threading.Event()

        def poll_health():
            while not done.is_set():
                t0 = time.monotonic()
                requests.get(f"{server.url}/health", timeout=120)
                waits.append(time.monotonic() - t0)
                time.sleep(0.2)

        poller = threading.Thread(target=poll_health)
        poller.start()
        t0 = time.monotonic()
        resp = requests.post(f"{server.url}/retrieve", json={"queries": ["river town bridge"] * 1024, "topk": 1000},
                             timeout=600)
        seconds = time.monotonic() - t0
        done.set()
        poller.join()
        return (f"HTTP {resp.status_code}, {len(resp.content) / 1e6:.1f} MB in {seconds:.1f}s; "
                f"/health waited up to {max(waits):.2f}s")
    finally:
        server.close()


def allowed_large_request(src, work, assets):
    """The largest request the new limits let through (64 x topk 1000 = 64000 hits): /health meanwhile."""
    import requests

    r = cli(src, ["retriever", "build", "--corpus", str(big_corpus(work)), "--out", str(work / "idx")], work)
    assert r["rc"] == 0, r["err"]
    server = Server(src, work / "idx", work)
    try:
        waits, done = [], threading.Event()

        def poll_health():
            while not done.is_set():
                t0 = time.monotonic()
                requests.get(f"{server.url}/health", timeout=120)
                waits.append(time.monotonic() - t0)
                time.sleep(0.05)

        poller = threading.Thread(target=poll_health)
        poller.start()
        t0 = time.monotonic()
        resp = requests.post(f"{server.url}/retrieve", json={"queries": ["river town bridge"] * 64, "topk": 1000},
                             timeout=600)
        seconds = time.monotonic() - t0
        done.set()
        poller.join()
        return (f"HTTP {resp.status_code}, {len(resp.content) / 1e6:.1f} MB in {seconds:.1f}s; "
                f"/health waited up to {max(waits):.2f}s ({len(waits)} polls)")
    finally:
        server.close()


def empty_queries(src, work, assets):
    import requests

    r = cli(src, ["retriever", "build", "--corpus", str(assets / "corpus.jsonl"), "--out", str(work / "idx")], work)
    assert r["rc"] == 0, r["err"]
    server = Server(src, work / "idx", work)
    try:
        resp = requests.post(f"{server.url}/retrieve", json={"queries": [], "topk": 3})
        return f"HTTP {resp.status_code} `{_cut(resp.text, 120)}`"
    finally:
        server.close()


def eval_unreachable(src, work, assets):
    port = _free_port()
    r = cli(src, ["eval", "--dataset", f"nq={assets / 'train.jsonl'}", f"model.path={assets / 'model'}",
                  "tools.search.backend=http", f"tools.search.retriever_url=http://127.0.0.1:{port}",
                  "rollout.max_response_tokens=48", "--out", str(work / "e")], work)
    table = "writes results.md" if (work / "e" / "results.md").exists() else "no results.md"
    return f"{seen(r)}; {table}"


CASES = [
    ("`optim.warmup_steps=-1`", config_case("optim.warmup_steps=-1")),
    ("`tools.search.max_passage_chars=-1` (the review's `tools.max_passage_chars`)",
     config_case("tools.search.max_passage_chars=-1")),
    ("`data.val_size=-1`", config_case("data.val_size=-1")),
    ("`tools.python.timeout=0` (the review's `tools.python_timeout`)", config_case("tools.python.timeout=0")),
    ("`optim.betas=[0.9]`", config_case("optim.betas=[0.9]")),
    ("`optim.lr=.nan`", config_case("optim.lr=.nan")),
    ("bad YAML (`train --config`)", bad_yaml),
    ("config path is a directory", config_is_dir),
    ("config file not UTF-8", config_not_utf8),
    ("data file not UTF-8 (`eval --dataset`)", train_not_utf8),
    ("missing `model.path`", missing_model_path),
    ("`trainer.output_dir` is a file", output_dir_case("file")),
    ("`trainer.output_dir` not writable (`/sys/at2po_run`: refused even to root)", output_dir_case("ro")),
    ("`retriever serve --port 99999` (a valid index)", serve_bad_port),
    ("`retriever build --corpus <dir>`", retriever_case(lambda w, a: ["retriever", "build", "--corpus", str(w),
                                                                        "--out", str(w / "idx")])),
    ("stop-word-only corpus", retriever_case(stop_word_corpus)),
    ("duplicate passage ids", retriever_case(dup_ids)),
    ("fresh run into an existing `output_dir`", fresh_into_existing),
    ("`--resume` with a truncated newest checkpoint", truncated_checkpoint),
    ("`--resume` with a stale `.tmp_step_*` dir", stale_temp),
    ("`--resume` with another `train_file`", resume_other_train_file),
    ("`--resume` with `algo.clip_high` changed", resume_changed_algo),
    ("`--resume` with `trainer.steps` below the checkpoint", resume_steps_below),
    ("100 KB question, longer than the model's context (2048)", long_question),
    ("`POST /retrieve {queries: [1024 x], topk: 1000}` (2000 docs)", huge_request),
    ("`POST /retrieve {queries: [64 x], topk: 1000}`: the largest allowed, /health meanwhile", allowed_large_request),
    ("`POST /retrieve {queries: []}` (Search-R1's agent)", empty_queries),
    ("`at2po eval` with an unreachable retriever", eval_unreachable),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=ROOT / "src")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hardening-2026-12-02")
    parser.add_argument("--work", type=Path, default=Path("/tmp/at2po_bad_inputs"))
    parser.add_argument("--only", help="run the cases whose label contains one of these comma-separated texts")
    args = parser.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)  # the script's own scratch directory
    assets = args.work / "assets"
    tiny_run.build_assets(assets)
    tiny_run.write_config(assets, steps=2)
    rows = []
    for i, (label, case) in enumerate(CASES):
        if args.only and not any(o in label for o in args.only.split(",")):
            continue
        row = {"input": label}
        for tag, src in (("before", args.before), ("after", args.after)):
            work = args.work / f"{tag}_{i}"
            work.mkdir(parents=True)
            try:
                row[tag] = case(src.resolve(), work, assets)
            except Exception as e:  # a case that cannot run is reported, not hidden
                row[tag] = f"(case failed: {type(e).__name__}: {_cut(e)})"
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "bad-inputs.json"
    if args.only and saved.is_file():  # a partial rerun replaces its rows in the full table
        fresh = {r["input"]: r for r in rows}
        order = {label: i for i, (label, _) in enumerate(CASES)}
        merged = {r["input"]: r for r in json.loads(saved.read_text()) if r["input"] in order} | fresh
        rows = sorted(merged.values(), key=lambda r: order[r["input"]])
    saved.write_text(json.dumps(rows, indent=1))
    lines = ["| bad input | before | after |", "|---|---|---|"]
    lines += [f"| {r['input']} | {r['before']} | {r['after']} |" for r in rows]
    (args.out / "bad-inputs.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
