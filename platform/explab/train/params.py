"""Which parameters train: a named subset (everything else frozen), or LoRA adapters through peft."""

from __future__ import annotations

from typing import Any

from torch import nn

from explab.errors import ConfigError
from explab.train.config import LoraConfig


def select_trainable(model: nn.Module, fragments: list[str]) -> list[str]:
    """Freeze every parameter whose dotted name contains none of ``fragments``; returns the names
    that still train. Empty ``fragments``: leave ``requires_grad`` as it is (all, or the adapters
    of a LoRA model). A fragment that matches no parameter is a `ConfigError`."""
    names = [name for name, _ in model.named_parameters()]
    if fragments:
        for fragment in fragments:
            if not any(fragment in name for name in names):
                roots = sorted(
                    {
                        name.split(".")[0] if not name.startswith("model.") else ".".join(name.split(".")[:2])
                        for name in names
                    }
                )
                raise ConfigError(
                    f"trainer.trainable: no parameter name contains {fragment!r}: "
                    f"pick a fragment of a parameter name (modules: {', '.join(roots)})"
                )
        for name, param in model.named_parameters():
            param.requires_grad_(any(fragment in name for fragment in fragments))
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ConfigError(
            "nothing to train: every parameter is frozen; check trainer.trainable and trainer.lora"
        )
    return trainable


def add_lora(model: nn.Module, config: LoraConfig) -> Any:
    """Wrap ``model`` in peft LoRA adapters on ``config.target_modules``; only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise ConfigError(
            f"trainer.lora.target_modules: no module named {missing[0]!r} in this model: "
            f"use module names such as q_proj, v_proj"
        )
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )
    return get_peft_model(model, peft_config)


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """The trainable parameters of ``model`` (DDP wrapper unwrapped), detached on CPU, by name."""
    model = unwrap(model)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DeepSpeed engine) wrapper."""
    return getattr(model, "module", model)
