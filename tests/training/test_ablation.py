"""The ablation benchmark in its --quick setting: every row through the real trainer, at equal budget."""

import json

import pytest

from conftest import load_script

ablation = load_script("benchmarks/ablation.py")
CREDIT_ROWS, ROWS, main = ablation.CREDIT_ROWS, ablation.ROWS, ablation.main


def check_budget(seed_result):
    budget = seed_result["budget_tokens"]
    for name, row in seed_result["rows"].items():
        step_tokens = [s["rollout/generated_tokens"] for s in row["step_metrics"]]
        assert row["steps"] == len(step_tokens) >= 1, name
        assert row["generated_tokens"] == sum(step_tokens), name
        # Reached the budget, and stopped at the step that reached it.
        assert budget <= row["generated_tokens"] < budget + step_tokens[-1], name
        assert [p["tokens"] for p in row["curve"]][-1] == row["generated_tokens"], name
        assert len(row["curve"]) == len(seed_result["checkpoints"]), name
        # Per-hop EM is measured on the validation questions under the trainer's limits: its
        # overall EM is the trainer's greedy validation EM.
        assert row["by_hop_after"]["em"] == pytest.approx(row["val_after"]["val/em"]), name


def test_quick_ablation_with_credit_rows(tmp_path):
    results = main(["--quick", "--credit", "--out", str(tmp_path)])
    seed = results["seeds"]["0"]
    assert set(seed["rows"]) == set(ROWS) | set(CREDIT_ROWS)
    check_budget(seed)
    # The budget is the full AT²PO row's tokens over the quick setting's trainer.steps.
    assert seed["rows"]["AT²PO (full)"]["steps"] == 2
    assert seed["budget_tokens"] == seed["rows"]["AT²PO (full)"]["generated_tokens"]
    assert seed["rows"]["value/entropy_softmax"]["same_run_as"] == "AT²PO (full)"
    chain_rows = [name for name, ovr in ROWS.items() if "rollout.expansion_rounds=0" in ovr]
    assert chain_rows and all(f"rollout.n_initial={seed['chains']}" in seed["rows"][n]["overrides"] for n in chain_rows)

    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "ablation.md", "curves.png"}
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["main"].keys() == ROWS.keys()
    md = (tmp_path / "ablation.md").read_text().splitlines()
    for name in [*ROWS, *CREDIT_ROWS]:
        assert sum(line.startswith(f"| {name} |") for line in md) == 1, name


def test_fixed_budget_applies_to_every_row(tmp_path):
    results = main(["--quick", "--budget", "150", "--rows", "chain-grpo", "at2po-full", "--out", str(tmp_path)])
    seed = results["seeds"]["0"]
    assert list(results["summary"]["main"]) == ["chain GRPO", "AT²PO (full)"]
    assert seed["budget_tokens"] == 150
    check_budget(seed)


@pytest.mark.parametrize("argv, message", [
    (["--rows", "nope"], "unknown row"),
    (["--rows", "chain-grpo"], "without --budget"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--seeds", "1", "1"], "distinct"),
    (["--set", "algo.loss_level=bogus"], "algo.loss_level"),
])
def test_bad_command_lines_say_what_is_wrong(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
