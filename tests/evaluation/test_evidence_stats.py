"""The sweep statistics (at2po.evidence.stats) against hand-computed and brute-force values, and the
recomputation of every committed sweep's tables from its per-seed files."""

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from conftest import load_script

from at2po.evidence import stats
from at2po.evidence.stats import bootstrap_ci, markdown_tables, paired, pass_at_k, tables_from_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 2, 0), (4, 2, 5), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_bootstrap_of_two_seeds_is_the_exact_resampling_distribution():
    # Resampled means of [0, 1]: 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4): the 2.5% / 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # Equal differences leave nothing to resample.
    assert bootstrap_ci([0.03] * 7) == pytest.approx((0.03, 0.03))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_interval_matches_the_normal_interval_for_many_seeds():
    rng = random.Random(1)
    diffs = [rng.gauss(0.02, 0.05) for _ in range(400)]
    lo, hi = bootstrap_ci(diffs)
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert lo < mean < hi
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.15 * se)
    assert bootstrap_ci(diffs) == (lo, hi)  # fixed seed: a recomputation gives the same digits


def test_paired_uses_the_common_seeds_and_counts_wins():
    p = paired({0: 0.5, 1: 0.6, 2: 0.4, 5: 0.9}, {0: 0.4, 1: 0.6, 2: 0.5, 3: 0.1})
    assert p["seeds"] == [0, 1, 2]
    assert p["diffs"] == pytest.approx([0.1, 0.0, -0.1])
    assert p["mean"] == pytest.approx(0.0)
    assert (p["wins"], p["ties"], p["losses"]) == (1, 1, 1)
    assert not p["resolved"]
    assert paired({0: 0.5}, {1: 0.5}) == {"n": 0}
    clear = paired({s: 0.5 + 0.1 for s in range(10)}, {s: 0.5 for s in range(10)})
    assert clear["resolved"] and clear["ci95"] == pytest.approx([0.1, 0.1])


def test_paired_leaves_out_seeds_whose_runs_were_made_in_different_environments():
    envs = {0: ("a", "a"), 1: ("a", "b"), 2: (None, "a"), 3: ("b", "b")}
    p = paired({0: 0.5, 1: 0.9, 2: 0.6, 3: 0.4}, {0: 0.4, 1: 0.1, 2: 0.6, 3: 0.5}, envs)
    assert p["seeds"] == [0, 2, 3] and p["diffs"] == pytest.approx([0.1, 0.0, -0.1])
    assert p["excluded_seeds"] == [1] and p["unrecorded_seeds"] == [2]
    assert paired({1: 0.9}, {1: 0.1}, {1: ("a", "b")}) == {"n": 0, "excluded_seeds": [1]}
    # No record at all: every seed counts, and every one is listed as unchecked.
    assert paired({0: 0.5}, {0: 0.4})["unrecorded_seeds"] == [0]


# -- a hand-made sweep folder ------------------------------------------------------------------------
def _row_file(em_before, em_after, tokens=100.0, budget=95.0):
    return {"em_before": em_before, "em_after": em_after, "by_hop_after": {"em": em_after, "em_3hop": em_after / 2},
            "generated_tokens": tokens, "tool_calls": 10.0, "steps": 3, "seconds": 2.0, "checkpoints": [50.0, budget],
            "curve": [{"step": 1, "tokens": 50.0, "em": em_before}, {"step": 3, "tokens": tokens, "em": em_after}]}


def _write_sweep(out: Path) -> None:
    ref, tree, chain = "AT²PO (full)", "entropy tree + ATPO", "chain GRPO"
    plan = {"seeds": [0, 1, 2], "variants": ["standard"], "reference_row": ref,
            "tables": {"progressive": [chain, tree, ref], "credit": ["value/entropy_softmax", "td"]},
            "aliases": {"standard": {"value/entropy_softmax": ref}},
            "components": [["no credit → turn credit", tree, ref]], "variant_descriptions": {"standard": "test"}}
    (out / "runs").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"plan": plan, "settings": {}, "invocations": []}))
    em = {ref: [0.5, 0.6, 0.7], tree: [0.4, 0.6, 0.8], chain: [0.3, 0.5, 0.4], "td": [0.5, 0.7, 0.8]}
    warm = [0.2, 0.3, 0.4]
    for seed in range(3):
        w = out / "runs" / "standard" / "warm-start" / f"seed{seed}.json"
        w.parent.mkdir(parents=True, exist_ok=True)
        w.write_text(json.dumps({"val": {"val/em": warm[seed]}, "by_hop": {"em": warm[seed], "em_3hop": 0.0},
                                 "pass_at_k": {"samples": 2, "pass@1": 0.1 * seed, "pass@2": 0.2 * seed,
                                               "by_hop": {"3": {"pass@1": 0.0, "pass@2": 0.1}}}}))
        for row, values in em.items():
            if row == chain and seed == 2:
                continue  # a sweep in progress: this file is not written yet
            f = out / "runs" / "standard" / stats.slug(row) / f"seed{seed}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(_row_file(warm[seed], values[seed], tokens=100.0 + seed)))


def test_tables_from_hand_made_files(tmp_path):
    _write_sweep(tmp_path)
    t = tables_from_files(tmp_path)["standard"]

    w = t["warm_start"]
    assert w["n"] == 3 and w["em_mean"] == pytest.approx(0.3) and w["em_std"] == pytest.approx(0.1)
    assert w["pass_at_k"] == pytest.approx({"pass@1": 0.1, "pass@2": 0.2})
    assert w["pass_at_k_by_hop"]["3"] == pytest.approx({"pass@1": 0.0, "pass@2": 0.1})

    full = t["progressive"]["AT²PO (full)"]
    assert full["em_mean"] == pytest.approx(0.6) and full["em_std"] == pytest.approx(0.1)
    assert full["delta_warm_mean"] == pytest.approx(0.3)
    assert full["em_3hop_mean"] == pytest.approx(0.3)
    assert full["generated_tokens_mean"] == pytest.approx(101.0)
    assert full["max_overshoot"] == pytest.approx(102.0 - 95.0)
    assert full["curve_tokens"] == pytest.approx([0.0, 50.0, 101.0])
    assert full["curve_em"] == pytest.approx([0.3, 0.3, 0.6])
    assert "vs_reference" not in full

    tree = t["progressive"]["entropy tree + ATPO"]["vs_reference"]  # diffs -0.1, 0, +0.1
    assert tree["mean"] == pytest.approx(0.0) and (tree["wins"], tree["ties"], tree["losses"]) == (1, 1, 1)
    chain = t["progressive"]["chain GRPO"]  # two seeds done: diffs -0.2, -0.1
    assert chain["n"] == 2 and chain["vs_reference"]["diffs"] == pytest.approx([-0.2, -0.1])
    assert chain["vs_reference"]["ci95"] == pytest.approx([-0.2, -0.1])
    assert chain["vs_reference"]["losses"] == 2 and chain["vs_reference"]["resolved"]

    # The alias row reads the full row's files: a zero difference on every seed.
    alias = t["credit"]["value/entropy_softmax"]
    assert alias["em"] == full["em"] and alias["vs_reference"]["diffs"] == [0.0, 0.0, 0.0]
    td = t["credit"]["td"]["vs_reference"]
    assert td["diffs"] == pytest.approx([0.0, 0.1, 0.1]) and (td["wins"], td["ties"]) == (2, 1)

    (comp,) = t["components"]
    assert comp["component"] == "no credit → turn credit"
    assert comp["diffs"] == pytest.approx([0.1, 0.0, -0.1])

    md = markdown_tables(tables_from_files(tmp_path), json.loads((tmp_path / "sweep.json").read_text()))
    assert "| chain GRPO | 2 | 0.400 ± 0.141 | +0.150 | -0.150 [-0.200, -0.100] | 0/0/2 |" in md
    assert "| no credit → turn credit | entropy tree + ATPO → AT²PO (full) | 3 | +0.000" in md


def test_tables_pair_only_runs_of_one_environment(tmp_path):
    _write_sweep(tmp_path)
    ref, tree = "AT²PO (full)", "entropy tree + ATPO"

    def stamp(row: str, seed: int, fp: str) -> None:
        f = tmp_path / "runs" / "standard" / stats.slug(row) / f"seed{seed}.json"
        run = json.loads(f.read_text())
        run["environment"] = {"fingerprint": fp, "cpu_model": f"cpu-{fp}", "torch_cpu_capability": "AVX2",
                              "at2po_source": "src1"}
        f.write_text(json.dumps(run))

    for seed in range(3):
        stamp(ref, seed, "a")
        stamp(tree, seed, "b" if seed == 1 else "a")  # seed 1 of this row ran on another machine
    stamp("td", 0, "a")
    t = tables_from_files(tmp_path)["standard"]
    vs = t["progressive"][tree]["vs_reference"]  # diffs -0.1, (0 left out), +0.1
    assert vs["seeds"] == [0, 2] and vs["excluded_seeds"] == [1] and vs["mean"] == pytest.approx(0.0)
    (comp,) = t["components"]  # the same pair, the other way round
    assert comp["seeds"] == [0, 2] and comp["diffs"] == pytest.approx([0.1, -0.1]) and comp["excluded_seeds"] == [1]
    assert t["credit"]["td"]["vs_reference"]["unrecorded_seeds"] == [1, 2]
    assert t["environments"]["a"] == {"runs": 6, "cpu_model": "cpu-a", "torch_cpu_capability": "AVX2",
                                      "at2po_source": ["src1"]}
    assert t["environments"]["b"]["runs"] == 1 and t["environments"]["unrecorded"] == 3 + 2 + 2  # warm, chain, td
    md = markdown_tables(tables_from_files(tmp_path), json.loads((tmp_path / "sweep.json").read_text()))
    assert "`a` (cpu-a, AVX2): 6 runs; `b` (cpu-b, AVX2): 1 runs; 7 runs without a record" in md
    assert "different environments): entropy tree + ATPO vs the reference (seeds 1); no credit → turn credit (seeds 1)." in md
    assert "| entropy tree + ATPO | 3 | 0.600 ± 0.200 | +0.300 | +0.000 [-0.100, +0.100] | 1/0/1 |" in md


def test_stats_command_line(tmp_path, capsys):
    assert stats.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _write_sweep(tmp_path)
    assert stats.main([str(tmp_path)]) == 0
    assert "| td | 3 |" in capsys.readouterr().out


COMMITTED = sorted(p.parent for p in (ROOT / "benchmarks" / "results").glob("*/sweep.json"))


@pytest.mark.parametrize("sweep_dir", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_sweep_tables_are_recomputed_from_their_files(sweep_dir):
    """Every entry of a committed sweep's tables.json and ablation.md comes from its per-seed files."""
    recomputed = tables_from_files(sweep_dir)
    assert json.loads(json.dumps(recomputed)) == json.loads((sweep_dir / "tables.json").read_text())
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    ablation = load_script("benchmarks/ablation.py")
    assert markdown_tables(recomputed, sweep, ablation.PAPER_EM) in (sweep_dir / "ablation.md").read_text()
