"""The README documents every config field; the paper configs load and carry the spec's values."""

import dataclasses
from pathlib import Path

import pytest

from at2po.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_field_with_its_default():
    readme = (ROOT / "README.md").read_text()
    cfg = Config()
    for section in dataclasses.fields(Config):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            line = next((l for l in readme.splitlines() if l.startswith(f"| `{key}` |")), None)
            assert line is not None, f"README has no row for {key}"
            value = getattr(sub, f.name)
            value = list(value) if isinstance(value, tuple) else value
            shown = repr(value) if isinstance(value, str) else str(value)
            assert f"`{shown}`" in line, f"README row of {key} does not show its default {shown}"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_paper_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
    assert cfg.trainer.steps == 240 and cfg.trainer.prompts_per_step == 64 and cfg.trainer.mini_batch_prompts == 8
    assert cfg.rollout.max_response_tokens == 6192 and cfg.tools.topk == 3
    if name.startswith("at2po"):
        r = cfg.rollout
        assert (r.n_initial, r.expansion_rounds, r.top_k, r.samples_per_tree) == (10, 2, 6, 22)
        assert (cfg.algo.loss_level, cfg.algo.clip_low, cfg.algo.clip_high) == ("turn", 3e-3, 4e-3)
        assert cfg.algo.kl_coef == 0.0 and cfg.algo.turn_credit
    else:
        assert cfg.rollout.expansion_rounds == 0 and cfg.rollout.n_initial == 16 and not cfg.algo.turn_credit
