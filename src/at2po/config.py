"""Training configuration: dataclasses that map 1:1 to YAML sections and `key.sub=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from at2po.credit import ADV_MODES, VALUE_MODES
from at2po.losses import AGGS, KL_KINDS, LEVELS
from at2po.rollout.engine import RolloutConfig


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory (or hub id when you are online); the tokenizer is read from it too
    tokenizer_path: str = ""  # defaults to `path`
    dtype: str = "float32"  # float32 | bfloat16 (weights and compute of the policy)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r} is not one of float32, bfloat16, float16")


@dataclass
class DataConfig:
    train_file: str = ""  # FlashRAG jsonl ({"id", "question", "golden_answers"}) or Search-R1 parquet
    val_file: str = ""  # held-out questions for greedy validation (optional)
    val_size: int = 0  # 0 = every validation question
    shuffle: bool = True
    system_prompt: str = ""  # empty = the paper's system prompt (Figure 6), plus the python tool's line when enabled


@dataclass
class ToolsConfig:
    search: str = "bm25"  # bm25 (local corpus) | http (Search-R1 /retrieve server) | none
    corpus_file: str = ""  # jsonl {"id", "contents"} for bm25
    index_dir: str = ""  # a saved BM25 index (built from corpus_file when empty)
    retriever_url: str = "http://127.0.0.1:8000"  # for http
    topk: int = 3
    max_passage_chars: int = 1000
    python: bool = False  # enable the sandboxed <python> tool
    python_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.search not in ("bm25", "http", "none"):
            raise ValueError(f"tools.search={self.search!r} is not one of bm25, http, none")
        if self.topk < 1:
            raise ValueError(f"tools.topk must be >= 1, got {self.topk}")


@dataclass
class AlgoConfig:
    """Objective and credit assignment. Every row of the paper's ablation is a setting here."""

    loss_level: str = "turn"  # turn (ATPO) | sequence (GSPO) | token (GRPO)
    clip_low: float = 3e-3
    clip_high: float = 4e-3
    loss_agg: str = "seq-mean-token-mean"
    log_ratio_max: float = 10.0
    value_mode: str = "entropy_softmax"  # entropy_softmax | entropy_linear | child_mean | leaf_mean
    adv_mode: str = "value"  # value | td | global | td_global
    turn_credit: bool = True  # False: every token of a leaf gets the leaf's normalised reward (GRPO-style)
    normalize_leaves: bool = True
    kl_coef: float = 0.0  # KL to a frozen reference policy (0 in the paper's AT²PO runs)
    kl_kind: str = "low_var_kl"
    reward_fn: str = "qa_em"  # qa_em | qa_f1

    def __post_init__(self) -> None:
        checks = (("loss_level", LEVELS), ("loss_agg", AGGS), ("value_mode", VALUE_MODES),
                  ("adv_mode", ADV_MODES), ("kl_kind", KL_KINDS), ("reward_fn", ("qa_em", "qa_f1")))
        for name, choices in checks:
            if getattr(self, name) not in choices:
                raise ValueError(f"algo.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear warm-up, then constant (the paper: constant)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0, got {self.grad_clip}")
        self.betas = tuple(float(b) for b in self.betas)


@dataclass
class TrainerConfig:
    steps: int = 240
    prompts_per_step: int = 64
    mini_batch_prompts: int = 8  # PPO mini-batch, in prompts (all of a prompt's leaves go together)
    ppo_epochs: int = 1
    micro_batch_rows: int = 8  # rows per forward/backward; gradients accumulate up to a mini-batch
    seed: int = 0
    output_dir: str = "runs/at2po"
    save_every: int = 20  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    val_every: int = 20  # steps; 0 = no periodic validation
    val_before_train: bool = True
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "at2po"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "mini_batch_prompts", "ppo_epochs", "micro_batch_rows", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(
                f"trainer.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"trainer.mini_batch_prompts ({self.mini_batch_prompts})"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# -- (de)serialisation ----------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated field type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, typing.get_args(tp)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ValueError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)

    def fix(d):
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
            elif isinstance(v, dict):
                fix(v)
        return d

    return fix(out)


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    import yaml

    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key part")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        d[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- CLI overrides. Unknown keys and bad values raise ValueError naming the key."""
    import yaml

    data: dict = {}
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
