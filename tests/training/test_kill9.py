"""SIGKILL at random points of a real `at2po train` process, resumed each time, ends with the
uninterrupted run's weights (bit for bit) and metrics (scripts/kill9_resume.py runs 10 kills)."""

from __future__ import annotations

import random

from conftest import load_script

kill9 = load_script("scripts/kill9_resume.py")


def test_two_sigkills_and_resumes_end_where_an_uninterrupted_run_ends(tmp_path):
    kill9.build_assets(tmp_path / "assets")
    config = kill9.write_config(tmp_path / "assets", steps=8)
    _, startup, step_seconds = kill9.run_reference(config, tmp_path / "ref", steps=8)
    # Each kill within 2 steps of a run's start: two runs cannot finish 8 steps, so both kills land.
    result = kill9.kill_loop(config, tmp_path / "killed", kills=2, step_seconds=step_seconds, startup_seconds=startup,
                             rng=random.Random(1), window_steps=2.0)
    events = result["events"]
    assert [e["killed"] for e in events] == [True, True, False], events
    assert not any(e["skipped"] or e["error"] for e in events), events
    comparison = kill9.compare(tmp_path / "ref", tmp_path / "killed", steps=8)
    assert comparison["weights_equal"] and comparison["metrics_equal"], comparison
    assert comparison["metric_rows"] == [9, 9]  # step 0's validation, then one row per step
