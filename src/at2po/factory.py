"""One place that builds what a run needs from a config: policy, tokenizer, task, tools, engine.

Training (``at2po train``, the quickstart, the ablation), evaluation (``at2po eval``) and the
benchmarks all build through these functions, so a new task, tool or generator backend,
registered by name, is usable everywhere without touching the callers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from at2po.config import Config, ModelConfig

if TYPE_CHECKING:
    import torch

    from at2po.rollout.engine import TreeRolloutEngine
    from at2po.tasks.base import Task
    from at2po.tools.base import Tool

__all__ = ["build_engine", "build_task", "build_tools", "load_model", "load_tokenizer"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _local_dir(field: str, value: str) -> Path | None:
    """``value`` as a local directory, None for a hub id ("org/name"), or a one-line error for a
    local path that does not exist (HF would report it as a malformed repo id)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{field}={value} is a file: point it at a model directory")
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value:
        raise ValueError(f"{field}={value} does not exist: point it at a Hugging Face model directory (or hub id)")
    return None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The HF tokenizer of ``model.tokenizer_path`` (default ``model.path``), with a pad token."""
    from transformers import AutoTokenizer

    if not cfg.path:
        raise ValueError("model.path is empty: point it at a Hugging Face model directory (or hub id)")
    field = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
    local = _local_dir(field, cfg.tokenizer_path or cfg.path)
    if local is not None and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{field}={local} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
                         "tokenizer there, or set model.tokenizer_path to a directory that has one")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or cfg.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_chat_template(tokenizer, field, cfg.tokenizer_path or cfg.path, local)
    return tokenizer


def _check_chat_template(tokenizer: Any, field: str, cfg_value: str, local: Path | None) -> None:
    """A chat template that is not valid Jinja fails when the first prompt is rendered, deep in a
    run, with a message that names no file: render a one-message chat now and name the file."""
    from jinja2 import TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as e:
        if local is None:
            where = f"the chat template of {field}={cfg_value}"
        elif (local / "chat_template.jinja").is_file():
            where = str(local / "chat_template.jinja")
        else:
            where = f"the chat_template of {local / 'tokenizer_config.json'}"
        raise ValueError(f"{where}: line {e.lineno}: not a valid Jinja chat template ({e.message}): fix it or "
                         "copy the base model's template") from None


def _check_safetensors(path: Path) -> None:
    """Read the header of every ``*.safetensors`` file of a local model directory, so that a damaged
    one (cut short, empty, overwritten) is named instead of failing inside transformers."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is damaged ({str(e).splitlines()[0]}): copy it again from where it came "
                             "from (or point model.path at an intact checkpoint)") from None


def load_model(cfg: ModelConfig, device: Any = None) -> torch.nn.Module:
    """The HF causal LM of ``model.path`` in ``model.dtype`` (on ``device`` when given)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not cfg.path:
        raise ValueError("model.path is empty: point it at a Hugging Face model directory (or hub id)")
    local = _local_dir("model.path", cfg.path)
    if local is not None:
        _check_safetensors(local)
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; 4.x has only the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model if device is None else model.to(device)


def build_task(cfg: Config) -> Task:
    """The task of ``task.name`` with ``task.options``."""
    from at2po.tasks.base import build_task as build

    return build(cfg.task.name, **cfg.task.options)


def build_tools(cfg: Config, task: Task) -> list[Tool]:
    """The enabled tools: ``tools.enabled``, or the task's own when that is null."""
    from at2po.tools import build_tool

    names = task.tools if cfg.tools.enabled is None else cfg.tools.enabled
    if len(set(names)) != len(names):
        raise ValueError(f"tools.enabled names a tool twice: {list(names)}")
    return [build_tool(name, **_tool_options(cfg, name)) for name in names]


def _tool_options(cfg: Config, name: str) -> dict:
    import inspect

    from at2po.tools import TOOLS

    options = cfg.tools.tool_options(name)
    # A tool whose builder takes ``env_compat`` reproduces the environment rollout.env_compat names.
    builder = TOOLS.get(name)
    if builder is not None and "env_compat" in inspect.signature(builder).parameters:
        options["env_compat"] = cfg.rollout.env_compat
    # The round abandons a call after rollout.tool_timeout; a longer python timeout would leave
    # the sandbox running after its round returned.
    if name == "python" and options["timeout"] > cfg.rollout.tool_timeout:
        warnings.warn(f"tools.python.timeout={options['timeout']:g} is capped at "
                      f"rollout.tool_timeout={cfg.rollout.tool_timeout:g} seconds", stacklevel=3)
        options["timeout"] = cfg.rollout.tool_timeout
    return options


def build_engine(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    task: Task | None = None,
    tools: list[Tool] | None = None,
    seed: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> TreeRolloutEngine:
    """The rollout engine over a generator of ``rollout.backend`` for ``model``.

    ``task``/``tools`` default to those of the config; ``seed`` (default ``trainer.seed``) seeds
    the generator's sampling. The system prompt is ``data.system_prompt`` or the task's own, laid out
    as ``data.prompt_layout`` says.
    """
    from at2po.rollout.engine import TreeRolloutEngine
    from at2po.rollout.generator import build_generator

    rows, tokens = model.get_input_embeddings().num_embeddings, len(tokenizer)
    if rows < tokens:  # a token id beyond the embedding fails as an IndexError in the first forward pass
        raise ValueError(f"model.path={cfg.model.path}: the model's embedding has {rows} rows but the tokenizer "
                         f"({cfg.model.tokenizer_path or cfg.model.path}) has {tokens} tokens: use the tokenizer the "
                         "model was trained with (model.tokenizer_path), or resize the model's embeddings to it")
    task = task if task is not None else build_task(cfg)
    tools = tools if tools is not None else build_tools(cfg, task)
    generator = build_generator(cfg.rollout.backend, model, tokenizer,
                                seed=cfg.trainer.seed if seed is None else seed, config=cfg)
    return TreeRolloutEngine(generator, tokenizer, tools, task, cfg.rollout, progress=progress,
                             system_prompt=cfg.data.system_prompt or None, prompt_layout=cfg.data.prompt_layout,
                             atpo_backspace_quirk=cfg.data.atpo_backspace_quirk)
