"""LoRA adapters (PEFT) on the policy: ``model.lora_rank > 0`` trains low-rank adapters on
``model.lora_target_modules`` and leaves the base weights frozen, so that a policy whose full
optimizer state would not fit one device can still be trained on it (README, "Scaling out")."""

from __future__ import annotations

from pathlib import Path

import torch

from at2po.config import ModelConfig


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("model.lora_rank > 0 needs PEFT: pip install 'at2po[lora]' (or set model.lora_rank=0)") from None
    return peft


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """``model`` wrapped with fresh adapters (B = 0: the wrapped model computes what ``model`` did)."""
    peft = _peft()
    lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:  # PEFT names the modules it could not find
        raise ValueError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: {e}") from None


def load_adapter_weights(model: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """Load a checkpoint's adapter weights (as ``save_pretrained`` of the PEFT model wrote them)."""
    peft = _peft()
    if not weights:
        raise ValueError(f"checkpoint {path} has no adapter weights: was it written by a run with model.lora_rank > 0?")
    result = peft.set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"checkpoint {path} does not match the adapters: missing {missing[:3]}, unexpected {unexpected[:3]}")
