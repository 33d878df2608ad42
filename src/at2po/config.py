"""Configuration: dataclasses that map 1:1 to YAML sections and `key.sub=value` overrides.

Light on purpose: importing it loads no model code, rollout engine or HTTP client, so
``at2po config`` and ``at2po --help`` stay fast and a core-only install can read configs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from at2po.algorithms.advantages import ADVANTAGE_ESTIMATORS
from at2po.algorithms.credit import ADV_MODES, VALUE_MODES
from at2po.algorithms.expansion import EXPANSION_MODES
from at2po.algorithms.losses import AGGS, KL_KINDS, LEVELS


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory (or hub id when you are online); the tokenizer is read from it too
    tokenizer_path: str = ""  # defaults to `path`
    dtype: str = "float32"  # float32 | bfloat16 (weights and compute of the policy)
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (PEFT, extra `lora`) instead of every weight
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (lora_alpha / lora_rank)·B·A
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank and not self.lora_target_modules:
            raise ValueError("model.lora_target_modules is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]")


@dataclass
class TaskConfig:
    name: str = "search_qa"  # a registered task (at2po.tasks): search_qa | arithmetic | your own
    options: dict = field(default_factory=dict)  # keyword arguments of the task, e.g. {reward: f1} for search_qa

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("task.name is empty: name a registered task, e.g. search_qa or arithmetic")


PROMPT_LAYOUTS = ("chat", "atpo")
ENV_COMPAT = ("at2po", "atpo")


@dataclass
class DataConfig:
    train_file: str = ""  # the task's data: FlashRAG jsonl / Search-R1 parquet for search_qa
    val_file: str = ""  # held-out rows for greedy validation (optional)
    val_size: int = 0  # 0 = every validation row
    shuffle: bool = True
    system_prompt: str = ""  # empty = the task's own (search_qa: the paper's, Figure 6, plus other tools' lines)
    # chat: [system prompt, user message] with the chat template; atpo: the ATPO authors' layout,
    # one system message "{their prompt}\nuser\n{question}?" (search_qa only; docs/method.md §6.10)
    prompt_layout: str = "chat"
    # atpo layout: reproduce the authors' f-string escape that turns "\boxed" into a backspace
    # character + "oxed" (twice in their prompt); false writes "\boxed" (docs/method.md §6.10)
    atpo_backspace_quirk: bool = True

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (0 = every row), got {self.val_size}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"data.prompt_layout={self.prompt_layout!r} is not one of {', '.join(PROMPT_LAYOUTS)}")


@dataclass
class SearchToolConfig:
    backend: str = "bm25"  # bm25 (local corpus) | http (Search-R1 /retrieve server)
    corpus_file: str = ""  # jsonl {"id", "contents"} for bm25
    index_dir: str = ""  # a saved BM25 index (instead of corpus_file)
    retriever_url: str = "http://127.0.0.1:8000"  # for http
    topk: int = 3
    max_passage_chars: int = 1000
    max_consecutive_failures: int = 20  # http: stop the run after this many failed calls in a row; 0 = never

    def __post_init__(self) -> None:
        if self.max_consecutive_failures < 0:
            raise ValueError(f"tools.search.max_consecutive_failures must be >= 0 (0 = never stop), "
                             f"got {self.max_consecutive_failures}")
        if self.backend not in ("bm25", "http"):
            raise ValueError(f"tools.search.backend={self.backend!r} is not one of bm25, http")
        if self.topk < 1:
            raise ValueError(f"tools.search.topk must be >= 1, got {self.topk}")
        if self.max_passage_chars < 1:
            raise ValueError(f"tools.search.max_passage_chars must be >= 1, got {self.max_passage_chars}")
        if self.backend == "http" and not self.retriever_url.startswith(("http://", "https://")):
            raise ValueError(f"tools.search.retriever_url={self.retriever_url!r} must start with http:// or https://")


@dataclass
class PythonToolConfig:
    timeout: float = 5.0  # wall-clock seconds per call (capped at rollout.tool_timeout)
    # Run without the kernel-level sandbox where it cannot be set up (audit hooks only: NOT safe
    # against hostile code). False: the tool refuses to start and says what is missing.
    unsafe_allow_weak_isolation: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 86_400:  # also refuses nan and inf (the tool's own check)
            raise ValueError(f"tools.python.timeout must be > 0 and at most 86400 seconds, got {self.timeout}")


@dataclass
class ToolsConfig:
    enabled: list[str] | None = None  # tool names; null = the task's own tools, [] = none
    search: SearchToolConfig = field(default_factory=SearchToolConfig)
    python: PythonToolConfig = field(default_factory=PythonToolConfig)
    options: dict = field(default_factory=dict)  # options of plug-in tools by name: {my_tool: {key: value}}

    def __post_init__(self) -> None:
        builtin = sorted(k for k in self.options if dataclasses.is_dataclass(getattr(self, k, None)))
        if builtin:
            raise ValueError(f"tools.options.{builtin[0]} would be ignored: set tools.{builtin[0]}.* instead")

    def tool_options(self, name: str) -> dict:
        """The keyword arguments of tool ``name``: its section for a built-in, else ``options[name]``."""
        section = getattr(self, name, None)
        if dataclasses.is_dataclass(section):
            return dataclasses.asdict(section)
        opts = self.options.get(name, {})
        if not isinstance(opts, dict):
            raise ValueError(f"tools.options.{name} must be a mapping of keyword arguments, got {opts!r}")
        return dict(opts)


@dataclass
class VLLMConfig:
    """The vLLM generator backend (``rollout.backend: vllm``); read only by that backend."""

    gpu_memory_utilization: float = 0.5  # GPU share for vLLM's weights and KV cache (the rest trains)
    kv_cache_gib: float = 0.0  # KV cache size in GiB; 0 = what gpu_memory_utilization leaves on GPU, 1 GiB on CPU
    enable_sleep_mode: bool = False  # GPU: free vLLM's memory during each update, wake it for the next rollout
    enable_prefix_caching: bool = True  # reuse the KV cache of shared prefixes (a tree's prompt and turns)
    max_model_len: int = 0  # longest context + continuation; 0 = the model's max_position_embeddings
    max_num_seqs: int = 0  # sequences decoded together; 0 = vLLM's default
    dtype: str = "auto"  # auto = the policy's dtype; float32 | bfloat16 | float16
    enforce_eager: bool | None = None  # null: eager on CPU, CUDA graphs on GPU

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("kv_cache_gib", "max_model_len", "max_num_seqs"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.vllm.{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.vllm.dtype={self.dtype!r} is not one of auto, float32, bfloat16, float16")


@dataclass
class RolloutConfig:
    """Tree shape, limits and the generator backend. Defaults are the paper's (docs/method.md §2, §5)."""

    n_initial: int = 10  # M: independent chains from each root
    expansion_rounds: int = 2  # L: 0 gives a plain chain rollout
    top_k: int = 6  # K: siblings added per tree and round
    samples_per_tree: int = 22  # N: leaves returned per tree (0 keeps every leaf)
    alpha: float = 0.05  # branching penalty of the expansion score
    root_fallback: bool = True  # the root competes in the selection: fresh chains when < K turns qualify (authors)
    expansion_mode: str = "entropy"  # "entropy" or "random"
    max_tool_calls: int = 6  # a further call gets the masked limit notice instead
    max_turns: int = 10  # hard stop for a trajectory that never answers
    chunk_tokens: int = 512  # new tokens per generation call; a turn that reaches it goes on in the next call
    max_response_tokens: int = 6192  # response budget of a whole trajectory (tokens after the prompt)
    temperature: float = 1.0
    top_p: float = 1.0
    tool_workers: int = 8  # threads running one turn's tool calls
    tool_timeout: float = 30.0  # seconds per tool call
    schedule: str = "async"  # "async": each tree starts its next phase as soon as its own is done; "sync": all wait; "stream": requests one by one (vllm)
    seed: int = 0
    backend: str = "hf"  # generator backend (at2po.rollout.generator.GENERATOR_BACKENDS): hf | vllm
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # settings of the vllm backend
    # false: only tool tags stop a generation, so an answer turn runs to its EOS, which is trained (authors)
    stop_at_answer: bool = True
    # at2po: our environment replies; atpo: the ATPO authors' (limit notice in the same turn, an
    # empty or failed call ends the trajectory, their search observations; docs/method.md §6.7a)
    env_compat: str = "at2po"

    def __post_init__(self) -> None:
        if self.env_compat not in ENV_COMPAT:
            raise ValueError(f"rollout.env_compat={self.env_compat!r} is not one of {', '.join(ENV_COMPAT)}")
        if self.schedule not in ("async", "sync", "stream"):
            raise ValueError(f"rollout.schedule={self.schedule!r} is not one of async, sync, stream")
        for name in ("n_initial", "max_turns", "chunk_tokens", "max_response_tokens", "tool_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("expansion_rounds", "top_k", "samples_per_tree", "max_tool_calls"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        if self.expansion_mode not in EXPANSION_MODES:
            raise ValueError(f"rollout.expansion_mode={self.expansion_mode!r} is not one of {', '.join(EXPANSION_MODES)}")
        if not 0 < self.tool_timeout <= 86_400:  # also refuses nan and inf
            raise ValueError(f"rollout.tool_timeout must be > 0 and at most 86400 seconds, got {self.tool_timeout}")
        if self.alpha < 0:
            raise ValueError(f"rollout.alpha (the branching penalty) must be >= 0, got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0 (validation is greedy on its own), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"rollout.seed must be >= 0, got {self.seed}")




@dataclass
class AlgoConfig:
    """Objective and credit assignment. Every row of the paper's ablation is a setting here."""

    loss_level: str = "turn"  # turn (ATPO) | sequence (GSPO) | token (GRPO)
    clip_low: float = 3e-3
    clip_high: float = 4e-3
    loss_agg: str = "seq-mean-token-mean"
    log_ratio_max: float = 10.0
    advantage: str = "tree"  # advantage estimator: tree (turn-wise credit) | grpo (leaf reward on every token)
    value_mode: str = "entropy_softmax"  # tree: entropy_softmax | entropy_linear | child_mean | leaf_mean
    adv_mode: str = "value"  # tree: value | td | global | td_global
    normalize_leaves: bool = True
    kl_coef: float = 0.0  # KL to a frozen reference policy (0 in the paper's AT²PO runs)
    kl_kind: str = "low_var_kl"
    recompute_old_logprobs: bool = True  # the trainer's own forward pass gives π_old (authors); false: the sampler's
    rollout_correction: bool = False  # truncated importance weights min(π_trainer/π_sampler, cap) on the advantages
    rollout_correction_cap: float = 2.0

    def __post_init__(self) -> None:
        checks = (("loss_level", LEVELS), ("loss_agg", AGGS), ("value_mode", VALUE_MODES),
                  ("adv_mode", ADV_MODES), ("kl_kind", KL_KINDS), ("advantage", tuple(ADVANTAGE_ESTIMATORS)))
        for name, choices in checks:
            if getattr(self, name) not in choices:
                raise ValueError(f"algo.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        # An estimator option that the chosen estimator does not read must stay at its default:
        # a setting that would be silently ignored is an error.
        used = ADVANTAGE_ESTIMATORS[self.advantage].options
        for f in dataclasses.fields(self):
            if f.name in ("value_mode", "adv_mode", "normalize_leaves") and f.name not in used \
                    and getattr(self, f.name) != f.default:
                raise ValueError(f"algo.{f.name}={getattr(self, f.name)!r} has no effect with "
                                 f"algo.advantage={self.advantage!r}; remove it or use algo.advantage=tree")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.rollout_correction and not self.recompute_old_logprobs:
            raise ValueError("algo.rollout_correction needs the trainer's log-probs: set algo.recompute_old_logprobs=true")
        if not self.rollout_correction_cap >= 1:
            raise ValueError(f"algo.rollout_correction_cap must be >= 1, got {self.rollout_correction_cap}")
        if not self.log_ratio_max > 0:
            raise ValueError(f"algo.log_ratio_max must be > 0, got {self.log_ratio_max}")


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
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0 (0 = no warm-up), got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be a list of 2 values, got {list(self.betas)}")
        self.betas = tuple(float(b) for b in self.betas)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")


@dataclass
class TrainerConfig:
    steps: int = 240
    prompts_per_step: int = 64
    mini_batch_prompts: int = 8  # PPO mini-batch, in prompts (all of a prompt's leaves go together)
    ppo_epochs: int = 1
    micro_batch_rows: int = 8  # rows per forward/backward; gradients accumulate up to a mini-batch
    # > 0: micro-batches hold at most this many tokens as the forward runs them (distinct tokens
    # with tree_packing, rows x longest row without) instead of micro_batch_rows rows; a longer
    # row runs alone (counted in perf/rows_over_token_budget). verl: ppo_max_token_len_per_gpu.
    micro_batch_tokens: int = 0
    tree_packing: bool = True  # a micro-batch's rows as one trie-packed sequence: each shared token once
    logprob_chunk_tokens: int = 1024  # positions per chunk through the output head; 0 = full logits
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
        for name in ("seed", "save_every", "keep_checkpoints", "val_every", "micro_batch_tokens",
                     "logprob_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not self.output_dir.strip():
            raise ValueError("trainer.output_dir is empty: name the run's directory")
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(
                f"trainer.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"trainer.mini_batch_prompts ({self.mini_batch_prompts})"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.rollout.env_compat == "atpo" and not self.algo.recompute_old_logprobs:
            raise ValueError("rollout.env_compat=atpo trains an EOS that the sampler did not draw (after an empty "
                             "tool call), which has no sampler log-prob: set algo.recompute_old_logprobs=true")


# -- (de)serialisation ----------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated field type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
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
        if not math.isfinite(value):  # NaN passes every range check; inf is no setting either
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return value


# Keys of earlier versions and what replaced them: an old config fails with the way forward.
RENAMED_KEYS = {
    "rollout.max_turn_tokens": "rollout.chunk_tokens (a turn that reaches it now goes on in the next call)",
    "algo.turn_credit": "algo.advantage (true -> tree, false -> grpo)",
    "algo.reward_fn": "task.options.reward (qa_em -> em, qa_f1 -> f1)",
    "tools.corpus_file": "tools.search.corpus_file",
    "tools.index_dir": "tools.search.index_dir",
    "tools.retriever_url": "tools.search.retriever_url",
    "tools.topk": "tools.search.topk",
    "tools.max_passage_chars": "tools.search.max_passage_chars",
    "tools.python_timeout": "tools.python.timeout",
}


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in RENAMED_KEYS:
            raise ValueError(f"config key {key!r} was replaced by {RENAMED_KEYS[key]}")
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


def _yaml_load(text: str):
    """``yaml.safe_load`` that refuses a mapping with a key twice (plain YAML keeps the last one
    silently, so a repeated section or key would drop the user's earlier settings)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e) -> str:
    return getattr(e, "problem", None) or str(e).splitlines()[0]


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
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); to pass it "
                             f"as text, quote it in YAML: {key}=\"'...'\"") from None
        if "#" in raw and "#" not in repr(value):
            # YAML reads " #" as the start of a comment: "runs/exp #2" would silently become "runs/exp".
            raise ValueError(f"override {item!r}: ' #' starts a YAML comment, which would drop the rest of the "
                             f"value; quote it in YAML to keep the '#': {key}=\"'...'\"")
        d[parts[-1]] = value
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
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a directory; give a YAML file")
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:  # read, not only regular files: /dev/null, or a pipe such as bash's <(...)
            data = _yaml_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ValueError(f"config file {where}: not valid YAML ({_yaml_problem(e)})") from None
        if data is None:
            raise ValueError(f"config file {path} is empty (or only comments): give a YAML mapping of sections "
                             "(model, data, ...), or leave out --config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
