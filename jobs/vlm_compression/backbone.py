"""Where the language backbone's parts sit in a causal LM or LLaVA-style VLM: blocks, attention, MLP.

The decoder blocks are found with `explab.interventions.resolve_arch` (the platform's one table of
architecture paths); each block must hold a Llama-style ``self_attn`` (``q/k/v/o_proj``) and ``mlp``
(``gate/up/down_proj``), which covers Llama, Vicuna, Mistral, Qwen2 and SmolLM2 backbones, or Phi-3's fused
``qkv_proj`` and ``gate_up_proj``: `Layout` names every projection by role as a row block of a linear, so
widthwise pruning splits fused ones into their row blocks and writes the kept rows back into one linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from explab.errors import ModelError
from explab.interventions import resolve_arch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FUSED_ATTN = ("qkv_proj", "o_proj")
FUSED_MLP = ("gate_up_proj", "down_proj")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``'s language backbone."""
    layers = resolve_arch(model).layers
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no decoder blocks: prune a causal LM or a LLaVA-style VLM")
    return layers


def text_config(model: nn.Module) -> Any:
    """The language backbone's HF config (``text_config`` of a VLM)."""
    return model.config.get_text_config()


@dataclass
class Projection:
    """One logical projection of a block: rows ``[offset, offset + size)`` of the linear at ``path`` (the
    whole linear unless it is fused, like Phi-3's ``qkv_proj`` holding q, k and v row blocks in that order)."""

    path: str
    offset: int
    size: int


@dataclass
class Layout:
    """The projections of one decoder block by role (q, k, v, o, gate, up, down) and its two halves."""

    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    roles: dict[str, Projection]
    fused: bool

    def linear(self, role: str) -> nn.Linear:
        return self.block.get_submodule(self.roles[role].path)

    def replace(self, path: str, module: nn.Module) -> None:
        """Put ``module`` at ``path`` (a linear of this block)."""
        owner, _, name = path.rpartition(".")
        setattr(self.block.get_submodule(owner), name, module)


def _linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def parts(block: nn.Module, head: int | None = None) -> Layout:
    """The projections of one decoder block: Llama-style separate ``q/k/v/o_proj`` and ``gate/up/down_proj``,
    or Phi-3-style fused ``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj`` (gate rows, then up);
    ``head`` (the head size) is needed to split a fused qkv."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    roles: dict[str, Projection] = {}
    fused = False
    if attn is not None and _linears(attn, ATTN):
        roles |= {r: Projection(f"self_attn.{r}_proj", 0, getattr(attn, f"{r}_proj").out_features)
                  for r in ("q", "k", "v", "o")}
    elif attn is not None and _linears(attn, FUSED_ATTN) and head is not None:
        n_kv = int(attn.num_key_value_heads)
        kv = n_kv * head
        q = attn.qkv_proj.out_features - 2 * kv
        roles |= {"q": Projection("self_attn.qkv_proj", 0, q), "k": Projection("self_attn.qkv_proj", q, kv),
                  "v": Projection("self_attn.qkv_proj", q + kv, kv),
                  "o": Projection("self_attn.o_proj", 0, attn.o_proj.out_features)}
        fused = True
    if mlp is not None and _linears(mlp, MLP):
        roles |= {r: Projection(f"mlp.{r}_proj", 0, getattr(mlp, f"{r}_proj").out_features)
                  for r in ("gate", "up", "down")}
    elif mlp is not None and _linears(mlp, FUSED_MLP):
        n = mlp.gate_up_proj.out_features // 2
        roles |= {"gate": Projection("mlp.gate_up_proj", 0, n), "up": Projection("mlp.gate_up_proj", n, n),
                  "down": Projection("mlp.down_proj", 0, mlp.down_proj.out_features)}
        fused = True
    if len(roles) != 7:
        raise ModelError(
            f"decoder block {type(block).__name__} has neither separate q/k/v/o and gate/up/down projections nor "
            "fused qkv_proj / gate_up_proj with o_proj / down_proj: prune a Llama/Qwen2/Phi-3-style backbone"
        )
    return Layout(block, attn, mlp, roles, fused)


def layout(model: nn.Module, i: int) -> Layout:
    """`parts` of block ``i`` of ``model``."""
    return parts(blocks(model)[i], head_dim(model))


def head_dim(model: nn.Module) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def block_parameters(model: nn.Module) -> int:
    """Parameters of all decoder blocks (what layerwise and widthwise pruning remove from)."""
    return sum(p.numel() for p in blocks(model).parameters())
