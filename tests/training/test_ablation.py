"""The ablation benchmark in its --quick setting: every row through the real trainer, at equal budget,
one file per (variant, row, seed), resumable, and parallel across processes."""

import json
import os
from pathlib import Path

import pytest

from conftest import load_script

from at2po.evidence.stats import slug, tables_from_files

ablation = load_script("benchmarks/ablation.py")
CREDIT_ROWS, ROWS, REFERENCE, main = ablation.CREDIT_ROWS, ablation.ROWS, ablation.REFERENCE, ablation.main


def row_files(out: Path, variant: str = "standard") -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "runs" / variant).glob("*/seed0.json")}


def check_budget(rows: dict[str, dict], budget: float, checkpoints: list[float]) -> None:
    for name, row in rows.items():
        step_tokens = [s["rollout/generated_tokens"] for s in row["step_metrics"]]
        assert row["steps"] == len(step_tokens) >= 1, name
        assert row["generated_tokens"] == sum(step_tokens), name
        # Reached the budget, and stopped at the step that reached it.
        assert budget <= row["generated_tokens"] < budget + step_tokens[-1], name
        assert [p["tokens"] for p in row["curve"]][-1] == row["generated_tokens"], name
        assert row["checkpoints"] == checkpoints, name
        assert len(row["curve"]) == len(checkpoints), name
        # Per-hop EM is measured on the validation questions under the trainer's limits: its
        # overall EM is the trainer's greedy validation EM.
        assert row["by_hop_after"]["em"] == pytest.approx(row["val_after"]["val/em"]), name


def test_quick_ablation_with_credit_rows_resumes_where_it_stopped(tmp_path):
    results = main(["--quick", "--credit", "--out", str(tmp_path)])
    rows = row_files(tmp_path)
    # value/entropy_softmax is the full row's config: no run of its own, the tables read the full row.
    assert set(rows) == {slug(n) for n in [*ROWS, *CREDIT_ROWS] if n != "value/entropy_softmax"} | {"warm-start"}
    assert results["sweep"]["plan"]["aliases"] == {"standard": {"value/entropy_softmax": REFERENCE}}
    warm = rows.pop("warm-start")
    full = rows[slug(REFERENCE)]
    # The budget is the full AT²PO row's tokens over the quick setting's trainer.steps.
    assert full["steps"] == 2 and full["checkpoints"][-1] == full["generated_tokens"]
    check_budget(rows, full["generated_tokens"], full["checkpoints"])
    chain_rows = [name for name, ovr in ROWS.items() if "rollout.expansion_rounds=0" in ovr]
    chains = results["sweep"]["settings"]["chains"]
    assert chain_rows and all(f"rollout.n_initial={chains}" in rows[slug(n)]["spec"]["row_overrides"] for n in chain_rows)
    # Paired: every row of the seed starts from the same warm start, with the same seed.
    assert all(r["em_before"] == warm["val"]["val/em"] for r in rows.values())
    assert len({json.dumps(r["spec"]["assets"]) for r in rows.values()}) == 1
    pk = warm["pass_at_k"]
    assert pk["samples"] == 2 and len(pk["per_question"]) == warm["questions"]["val"] == 4
    assert all(n == 2 for _, _, n, _ in pk["per_question"])

    assert {p.name for p in tmp_path.iterdir()} >= {"sweep.json", "tables.json", "ablation.md", "curves.png", "effects.png"}
    tables = json.loads((tmp_path / "tables.json").read_text())
    assert list(tables["standard"]["progressive"]) == list(ROWS)
    assert list(tables["standard"]["credit"]) == list(CREDIT_ROWS)
    md = (tmp_path / "ablation.md").read_text().splitlines()
    for name in [*ROWS, *CREDIT_ROWS]:
        assert sum(line.startswith(f"| {name} |") for line in md) == 1, name

    # A sweep killed after the full row: two result files never written, a half-written temporary left.
    killed = [tmp_path / "runs" / "standard" / slug(n) / "seed0.json" for n in ("chain GSPO", "td")]
    for path in killed:
        path.unlink()
    stale = tmp_path / "runs" / "standard" / "td" / ".seed0.json.tmp-999999"
    stale.write_text("{")
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("seed0.json")}
    again = main(["--quick", "--credit", "--out", str(tmp_path)])
    assert sorted(again["report"]["run"]) == ["standard/chain-gspo/seed0", "standard/td/seed0"]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing recomputed
    assert all(p.is_file() for p in killed) and not stale.exists()
    assert json.loads((tmp_path / "tables.json").read_text()) == json.loads(json.dumps(tables_from_files(tmp_path)))
    assert [i["jobs_run"] for i in again["sweep"]["invocations"]] == [14, 2]


def test_parallel_workers_run_the_hard_variant_at_a_fixed_budget(tmp_path):
    main(["--quick", "--variants", "hard", "--rows", "chain-grpo", "entropy-tree-atpo", "--budget", "150",
          "--workers", "2", "--out", str(tmp_path)])
    rows = row_files(tmp_path, "hard")
    warm = rows.pop("warm-start")
    assert set(rows) == {"chain-grpo", "entropy-tree-atpo"}
    check_budget(rows, 150, [75.0, 150.0])
    # The hard variant's questions are all 3-hop, held out and in training; the warm start's
    # demonstrations had none (its world, corpus and model are the standard variant's).
    assert set(warm["by_hop"]) == {"em", "em_3hop"}
    assert {hops for _, hops, _, _ in warm["pass_at_k"]["per_question"]} == {3}
    train = [json.loads(line) for line in (tmp_path / "cache" / "seed0" / "hard" / "train.jsonl").open()]
    assert train and {r["metadata"]["hops"] for r in train} == {3}
    assert not (tmp_path / "cache" / "seed0" / "hard" / "corpus.jsonl").exists()
    # The variant's longer run gives way to --quick's settings.
    assert rows["chain-grpo"]["spec"]["overrides"].index("trainer.steps=60") < \
        rows["chain-grpo"]["spec"]["overrides"].index("trainer.steps=2")
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["invocations"][0]["workers"] == 2 and sweep["invocations"][0]["jobs_run"] == 4
    # Every file records the environment of the worker that made it: one torch thread each, and
    # the same fingerprint, so the tables pair all of them.
    made = [*rows.values(), warm, json.loads((tmp_path / "cache" / "seed0" / "assets" / "environment.json").read_text())]
    assert {r["environment"]["torch_threads"] for r in made[:-1]} == {1}
    assert len({r["environment"]["fingerprint"] for r in made[:-1]}) == 1
    assert made[-1]["packages"]["torch"] == made[0]["environment"]["packages"]["torch"]
    tables = tables_from_files(tmp_path)["hard"]
    assert tables["environments"][made[0]["environment"]["fingerprint"]]["runs"] == 3
    assert tables["components"] == [] or all("excluded_seeds" not in c for c in tables["components"])


def test_report_only_rewrites_the_report_from_the_files(tmp_path, capsys):
    import shutil

    pilot = Path(ablation.__file__).parent / "results" / "evidence-pilot-2026-12-02"
    shutil.copytree(pilot, tmp_path / "sweep")
    (tmp_path / "sweep" / "tables.json").unlink()
    (tmp_path / "sweep" / "ablation.md").write_text("")
    main(["--report-only", "--out", str(tmp_path / "sweep")])
    assert json.loads((tmp_path / "sweep" / "tables.json").read_text()) == json.loads((pilot / "tables.json").read_text())
    assert (tmp_path / "sweep" / "ablation.md").read_text() == (pilot / "ablation.md").read_text()
    for missing in (["--out", str(tmp_path / "nothing")], []):
        with pytest.raises(SystemExit):
            main(["--report-only", *missing])
        assert "--report-only needs --out" in capsys.readouterr().err


def test_task_variants_change_only_the_questions():
    from dataclasses import replace

    from at2po.evidence.runner import SPLIT_FIELDS
    from at2po.tasks.multihop import build_world

    for name, variant in ablation.VARIANTS.items():
        assert set(variant["world"]) <= SPLIT_FIELDS, name
        base = ablation.assets_config(1, quick=False).world
        world, other = build_world(base), build_world(replace(base, **{k: tuple(v) for k, v in variant["world"].items()}))
        assert other.corpus == world.corpus and other.facts == world.facts, name


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    assets = tmp_path / "cache" / "seed0" / "assets"
    assets.mkdir(parents=True)
    made = ablation.assets_dict(ablation.assets_config(0, quick=False))  # a full-size warm start
    (assets / "sft_log.json").write_text(json.dumps({"config": made}))
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path)])
    assert "built with other settings" in capsys.readouterr().err
    assert (assets / "sft_log.json").is_file()  # the user's files stay

    row = tmp_path / "runs" / "standard" / "warm-start" / "seed0.json"
    row.parent.mkdir(parents=True)
    row.write_text(json.dumps({"spec": {"pass_k_samples": 99}}))
    (assets / "sft_log.json").write_text(json.dumps({"config": ablation.assets_dict(ablation.assets_config(0, True))}))
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path)])
    assert "was made with other settings" in capsys.readouterr().err


def test_a_running_sweep_holds_its_folder(tmp_path, capsys):
    (tmp_path / ".lock").write_text(str(os.getpid()))
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path)])
    assert f"another sweep (pid {os.getpid()})" in capsys.readouterr().err
    (tmp_path / ".lock").write_text("999999999")  # a process that is gone: a stale lock is taken over
    assert ablation.sweep_lock(tmp_path).__enter__().path.read_text() == str(os.getpid())


@pytest.mark.parametrize("argv, message", [
    (["--rows", "nope"], "unknown row"),
    (["--rows", "chain-grpo"], "without --budget"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--seeds", "1", "1"], "distinct"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--pass-k-samples", "-1"], "--pass-k-samples must be >= 0"),
    (["--variants", "harder"], "invalid choice"),
    (["--set", "algo.loss_level=bogus"], "algo.loss_level"),
])
def test_bad_command_lines_say_what_is_wrong(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_a_failed_job_blocks_only_the_jobs_that_need_it(tmp_path):
    from at2po.evidence.runner import plan_jobs, run_jobs

    good = ablation.assets_dict(ablation.assets_config(1, quick=True))

    def assets(seed):  # seed 0's warm start cannot be built: its config has an unknown field
        return {**good, "seed": seed, "bogus": 1} if seed == 0 else good

    variants = {"standard": {"world": {}, "overrides": [*ablation.COMMON_OVERRIDES, *ablation.QUICK_OVERRIDES]}}
    jobs = plan_jobs(tmp_path, [0, 1], assets, variants, {REFERENCE: ROWS[REFERENCE]}, REFERENCE, {}, None, 0)
    logged = []
    report = run_jobs(jobs, 1, logged.append)
    assert list(report["failed"]) == ["assets/seed0"] and "bogus" in report["failed"]["assets/seed0"]
    assert report["blocked"] == ["standard/warm-start/seed0", "standard/at2po-full/seed0"]
    assert report["run"] == ["assets/seed1", "standard/warm-start/seed1", "standard/at2po-full/seed1"]
    assert not (tmp_path / "runs" / "standard" / "warm-start" / "seed0.json").exists()
    assert (tmp_path / "runs" / "standard" / "at2po-full" / "seed1.json").is_file()
    assert any("Traceback" in line for line in logged)


def _tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_verify_reruns_a_finished_run_and_finds_where_a_file_departs(tmp_path, capsys):
    from at2po.evidence.replay import compare_runs

    out = tmp_path / "sweep"
    main(["--quick", "--rows", "chain-grpo", REFERENCE, "--out", str(out)])
    before = _tree_digest(out)
    # On the machine that made them, a row (its budget read from the reference row's file) and a
    # warm start are reproduced to the last bit, from the cached warm-started model.
    runs = ["standard/chain-grpo/seed0", "standard/warm-start/seed0"]
    reports = main(["--out", str(out), "--verify", *runs])["verify"]
    assert [r["identical"] for r in reports] == [True, True] and [r["assets"] for r in reports] == ["reused"] * 2
    assert reports[0]["fresh"]["step_metrics"][-1]["loss/policy"] == reports[0]["recorded"]["step_metrics"][-1]["loss/policy"]
    assert reports[0]["fingerprints"]["here"] == reports[0]["fingerprints"]["recorded"]
    assert capsys.readouterr().out.count("reproduced exactly") == 2
    assert _tree_digest(out) == before  # the sweep's folder is only read

    # A file that departs from what its job gives (a planted edit of step 2's reward) is caught,
    # at that step; timings alone are not outcomes.
    path = out / "runs" / "standard" / "chain-grpo" / "seed0.json"
    edited = json.loads(path.read_text())
    edited["step_metrics"][1]["reward/mean"] += 0.125
    path.write_text(json.dumps(edited))
    report = main(["--out", str(out), "--verify", "standard/chain-grpo/seed0"])["verify"][0]
    assert not report["identical"] and report["differences"] == ["step_metrics"]
    assert report["first_step"] == 2 and report["step_differences"] == ["reward/mean"]
    assert "NOT reproduced" in capsys.readouterr().out
    slower = {**report["fresh"], "seconds": 1e9, "step_metrics": [{**s, "time/step": 1e9} for s in report["fresh"]["step_metrics"]]}
    assert compare_runs(report["fresh"], slower)["identical"]

    path.write_text(json.dumps(before_row := json.loads(before[str(path.relative_to(out))])))
    # A cache whose warm start was built with other settings than the run's is not reused, and
    # not touched: the warm start is rebuilt in the scratch folder.
    log = out / "cache" / "seed0" / "assets" / "sft_log.json"
    other = json.loads(log.read_text())
    other["config"]["sft_steps"] += 1
    log.write_text(json.dumps(other))
    report = main(["--out", str(out), "--verify", "standard/chain-grpo/seed0"])["verify"][0]
    assert report["assets"] == "rebuilt" and report["identical"], report["differences"]
    assert json.loads(log.read_text()) == other
    # Without the cache (a fresh clone of a committed sweep) the warm start is rebuilt from the
    # file's spec; on the same machine the row is still reproduced exactly.
    import shutil

    shutil.rmtree(out / "cache")
    report = main(["--out", str(out), "--verify", "standard/chain-grpo/seed0"])["verify"][0]
    assert report["assets"] == "rebuilt" and report["identical"], report["differences"]
    assert report["fresh"]["em_after"] == before_row["em_after"]
    assert not (out / "cache").exists()


@pytest.mark.parametrize("run, message", [
    ("chain-grpo/seed0", "give it as VARIANT/ROW/seedN"),
    ("standard/chain-grpo/seed7", "no file"),
])
def test_verify_names_a_run_that_is_not_there(tmp_path, run, message, capsys):
    (tmp_path / "runs" / "standard" / "chain-grpo").mkdir(parents=True)
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--verify", run])
    assert message in capsys.readouterr().err
    for missing in (["--out", str(tmp_path / "none")], []):
        with pytest.raises(SystemExit):
            main([*missing, "--verify", run])
        assert "--verify needs --out" in capsys.readouterr().err
