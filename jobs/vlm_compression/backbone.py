"""Where the language backbone's parts sit in a causal LM or LLaVA-style VLM: blocks, attention, MLP.

The decoder blocks are found with `explab.interventions.resolve_arch` (the platform's one table of
architecture paths); each block must hold a Llama-style ``self_attn`` (``q/k/v/o_proj``) and ``mlp``
(``gate/up/down_proj``), which covers Llama, Vicuna, Mistral, Qwen2 and SmolLM2 backbones.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from explab.errors import ModelError
from explab.interventions import resolve_arch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``'s language backbone."""
    layers = resolve_arch(model).layers
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no decoder blocks: prune a causal LM or a LLaVA-style VLM")
    return layers


def text_config(model: nn.Module) -> Any:
    """The language backbone's HF config (``text_config`` of a VLM)."""
    return model.config.get_text_config()


def parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(attention, MLP) of one decoder block; a fused (qkv / gate_up) block is refused."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    ok = attn is not None and mlp is not None and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN) \
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP)
    if not ok:
        raise ModelError(
            f"decoder block {type(block).__name__} has no separate q/k/v/o and gate/up/down projections "
            "(fused qkv_proj / gate_up_proj are not split here): prune a Llama/Qwen2-style backbone"
        )
    return attn, mlp


def head_dim(model: nn.Module) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def block_parameters(model: nn.Module) -> int:
    """Parameters of all decoder blocks (what layerwise and widthwise pruning remove from)."""
    return sum(p.numel() for p in blocks(model).parameters())
