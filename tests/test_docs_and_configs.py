"""The README documents every config field; the paper configs load and carry the spec's values."""

import dataclasses
from pathlib import Path

import pytest

from at2po.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _leaf_fields(obj, prefix):
    """(dotted key, default) of every config field, sub-sections (tools.search.*) included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_readme_documents_every_config_field_with_its_default():
    readme = (ROOT / "README.md").read_text()
    keys = list(_leaf_fields(Config(), ""))
    assert ("tools.search.backend", "bm25") in keys and ("task.name", "search_qa") in keys  # the walk recurses
    for key, value in keys:
        line = next((l for l in readme.splitlines() if l.startswith(f"| `{key}` |")), None)
        assert line is not None, f"README has no row for {key}"
        value = list(value) if isinstance(value, tuple) else value
        shown = repr(value) if isinstance(value, str) else str(value)
        assert f"`{shown}`" in line, f"README row of {key} does not show its default {shown}"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_paper_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
    assert cfg.trainer.steps == 240 and cfg.trainer.prompts_per_step == 64 and cfg.trainer.mini_batch_prompts == 8
    assert cfg.rollout.max_response_tokens == 6192 and cfg.tools.search.topk == 3
    assert cfg.task.name == "search_qa" and cfg.tools.search.backend == "http"
    if name.startswith("at2po"):
        r = cfg.rollout
        assert (r.n_initial, r.expansion_rounds, r.top_k, r.samples_per_tree) == (10, 2, 6, 22)
        assert (cfg.algo.loss_level, cfg.algo.clip_low, cfg.algo.clip_high) == ("turn", 3e-3, 4e-3)
        assert cfg.algo.kl_coef == 0.0 and cfg.algo.advantage == "tree"
    else:
        assert cfg.rollout.expansion_rounds == 0 and cfg.rollout.n_initial == 16 and cfg.algo.advantage == "grpo"
    # Trained with the authors' scorer, so with their prompt, turn endings and environment replies.
    assert cfg.task.options["reward"] == "atpo_em"
    assert (cfg.data.prompt_layout, cfg.data.atpo_backspace_quirk) == ("atpo", True)
    assert (cfg.rollout.stop_at_answer, cfg.rollout.env_compat) == (False, "atpo")
    # The authors' GRPO baseline aggregates over all tokens; their ATPO loss per sequence.
    assert cfg.algo.loss_agg == ("token-mean" if name.startswith("grpo") else "seq-mean-token-mean")


def test_the_quickstart_keeps_todays_prompt_turn_endings_and_environment(tmp_path):
    from at2po.quickstart import quickstart_config

    cfg = quickstart_config(tmp_path / "assets", tmp_path / "out", 0, [])
    assert (cfg.data.prompt_layout, cfg.rollout.stop_at_answer, cfg.rollout.env_compat) == ("chat", True, "at2po")
