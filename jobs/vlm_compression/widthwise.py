"""Widthwise pruning (LLM-Pruner, block-wise): Taylor importance of dependency groups, local per-layer ratio.

Dependency groups of decoder block i (the hidden size is never pruned):
- attention: one KV group = its ``G = n_heads / n_kv_heads`` query heads (rows of ``q_proj``), its key and
  value head (rows of ``k_proj``, ``v_proj``) and the matching columns of ``o_proj``; with G = 1 (MHA)
  that is one head with q/k/v/o tied;
- MLP: one channel = a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

A fused projection (Phi-3's ``qkv_proj`` = [q; k; v] rows, ``gate_up_proj`` = [gate; up] rows) is split into
those row blocks (`backbone.Layout`) for the groups and fused back when pruned, so the pruned model keeps the
architecture's own layout.

Importance of a group (LLM-Pruner's ``taylor`` with ``grouping_strategy=sum``): the sum over the group's
weights (and biases) of a per-weight salience from the SFT loss gradient g on calibration samples:
``first`` |W g|, ``second`` |W^2 F| with F the per-sample accumulated g^2, ``mix`` first - second / 2,
``vectorize`` |sum W g|. Each layer in the prunable range removes the same local share of its groups;
the share is the smallest that brings the decoder blocks to the target size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from explab.errors import ConfigError
from explab.models import override_config
from jobs.vlm_compression.backbone import Layout, blocks, head_dim, layout, text_config

Salience = Literal["first", "second", "mix", "vectorize"]


@dataclass
class Gradients:
    """Per-parameter sums over calibration samples of the gradient (g) and of its square (g2)."""

    g: dict[str, torch.Tensor] = field(default_factory=dict)
    g2: dict[str, torch.Tensor] = field(default_factory=dict)


def accumulate_gradients(model: nn.Module, losses: Iterable[Callable[[], torch.Tensor]]) -> Gradients:
    """Backward each sample's loss (``losses`` yields closures) and sum g and g^2 of the decoder
    blocks' parameters over samples; g is the gradient of the mean loss."""
    named = {n: p for n, p in model.named_parameters() if n.startswith(_blocks_prefix(model))}
    closures = list(losses)
    if not closures:
        raise ConfigError("widthwise pruning needs calibration samples: set width.n_samples >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    grads = Gradients({n: torch.zeros_like(p) for n, p in named.items()},
                      {n: torch.zeros_like(p) for n, p in named.items()})
    for loss_fn in closures:
        model.zero_grad(set_to_none=True)
        (loss_fn() / len(closures)).backward()
        for n, p in named.items():
            if p.grad is not None:
                grads.g[n] += p.grad
                grads.g2[n] += (p.grad * len(closures)) ** 2  # the per-sample gradient's square
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return grads


def _blocks_prefix(model: nn.Module) -> str:
    layers = blocks(model)
    return next(n for n, m in model.named_modules() if m is layers) + "."


def salience(weight: torch.Tensor, g: torch.Tensor, g2: torch.Tensor, kind: Salience) -> torch.Tensor:
    """Per-weight salience (``vectorize`` returns W g, summed and made absolute per group later)."""
    w = weight.detach().double()
    if kind in ("first", "vectorize"):
        s = w * g.double()
        return s if kind == "vectorize" else s.abs()
    second = (w * w * g2.double()).abs()
    if kind == "second":
        return second
    return (w * g.double()).abs() - 0.5 * second


@dataclass
class LayerGroups:
    """Importance of the groups of one block: ``attn[k]`` per KV group, ``mlp[c]`` per channel."""

    attn: torch.Tensor
    mlp: torch.Tensor


def group_importance(model: nn.Module, grads: Gradients, kind: Salience = "first") -> list[LayerGroups]:
    """Group importances of every decoder block (see the module docstring). A fused linear's salience is
    computed once and split into its roles' row blocks."""
    prefix = _blocks_prefix(model)
    hd = head_dim(model)
    out = []
    for i in range(len(blocks(model))):
        lay = layout(model, i)
        cache: dict[str, torch.Tensor] = {}

        def per_linear(path: str, lay: Layout = lay, cache: dict = cache, i: int = i) -> torch.Tensor:
            """[out, in (+1 for the bias)] salience of the linear at ``path``."""
            if path not in cache:
                linear = lay.block.get_submodule(path)
                parts_ = [linear.weight] + ([linear.bias.unsqueeze(-1)] if linear.bias is not None else [])
                names = ["weight"] + (["bias"] if linear.bias is not None else [])
                sal = [salience(t, grads.g[f"{prefix}{i}.{path}.{n}"].reshape(t.shape),
                                grads.g2[f"{prefix}{i}.{path}.{n}"].reshape(t.shape), kind)
                       for t, n in zip(parts_, names, strict=True)]
                cache[path] = torch.cat(sal, dim=-1)
            return cache[path]

        def rows(role: str, lay: Layout = lay) -> torch.Tensor:
            proj = lay.roles[role]
            return per_linear(proj.path)[proj.offset:proj.offset + proj.size]

        def cols(role: str, lay: Layout = lay) -> torch.Tensor:  # an output projection's weight columns
            linear = lay.linear(role)
            return per_linear(lay.roles[role].path)[:, :linear.in_features].T

        n_kv = lay.roles["k"].size // hd
        attn_terms = [rows("q").reshape(n_kv, -1), rows("k").reshape(n_kv, -1), rows("v").reshape(n_kv, -1),
                      cols("o").reshape(n_kv, -1)]
        n_ch = lay.roles["gate"].size
        mlp_terms = [rows("gate").reshape(n_ch, -1), rows("up").reshape(n_ch, -1), cols("down").reshape(n_ch, -1)]
        out.append(LayerGroups(attn=_reduce(attn_terms, kind), mlp=_reduce(mlp_terms, kind)))
    return out


def _reduce(terms: list[torch.Tensor], kind: Salience) -> torch.Tensor:
    total = sum(t.sum(-1) for t in terms)
    return total.abs() if kind == "vectorize" else total


# ---------------------------------------------------------------- sizes and the local ratio


def group_sizes(model: nn.Module) -> tuple[int, int]:
    """Parameters of one attention KV group and of one MLP channel (equal in every block)."""
    lay = layout(model, 0)
    hd = head_dim(model)
    d = text_config(model).hidden_size
    g = lay.roles["q"].size // lay.roles["k"].size  # query heads per KV group
    bias = sum(hd * (g if role == "q" else 1) for role in ("q", "k", "v") if lay.linear(role).bias is not None)
    attn_size = (2 * g + 2) * hd * d + bias  # q rows, k and v rows, o columns
    mlp_size = 3 * d + sum(1 for role in ("gate", "up") if lay.linear(role).bias is not None)
    return attn_size, mlp_size


@dataclass
class WidthPlan:
    """Which groups each block loses: ``attn[i]`` KV-group indices, ``mlp[i]`` channel indices."""

    attn: dict[int, list[int]]
    mlp: dict[int, list[int]]
    layer_ratio: float
    removed_parameters: int


def plan(importance: list[LayerGroups], model: nn.Module, target_removed: int, attn_layers: tuple[int, int],
         mlp_layers: tuple[int, int]) -> WidthPlan:
    """The smallest local ratio r (each prunable block removes floor(r x groups) of its least important
    attention KV groups and MLP channels, keeping at least one of each) that removes at least
    ``target_removed`` parameters. ``*_layers`` are end-exclusive block ranges."""
    attn_size, mlp_size = group_sizes(model)
    a_idx = range(*attn_layers)
    m_idx = range(*mlp_layers)
    n_blocks = len(importance)
    for lo, hi, what in ((attn_layers[0], attn_layers[1], "attn_layers"), (mlp_layers[0], mlp_layers[1], "mlp_layers")):
        if not 0 <= lo < hi <= n_blocks:
            raise ConfigError(f"width.{what} [{lo}, {hi}) is not a block range of this {n_blocks}-block model: "
                              f"pick 0 <= start < end <= {n_blocks}")

    def counts(r: float) -> tuple[int, int, int]:
        na = min(int(r * len(importance[0].attn)), len(importance[0].attn) - 1)
        nm = min(int(r * len(importance[0].mlp)), len(importance[0].mlp) - 1)
        return na, nm, na * attn_size * len(a_idx) + nm * mlp_size * len(m_idx)

    candidates = sorted({k / len(importance[0].attn) for k in range(len(importance[0].attn) + 1)}
                        | {k / len(importance[0].mlp) for k in range(len(importance[0].mlp) + 1)})
    chosen = next((r for r in candidates if counts(r)[2] >= target_removed), None)
    if chosen is None:
        raise ConfigError(f"widthwise pruning of blocks {attn_layers}/{mlp_layers} cannot remove {target_removed} "
                          "parameters: widen width.attn_layers / width.mlp_layers or lower the ratio")
    na, nm, removed = counts(chosen)
    return WidthPlan(
        attn={i: _lowest(importance[i].attn, na) for i in a_idx},
        mlp={i: _lowest(importance[i].mlp, nm) for i in m_idx},
        layer_ratio=chosen, removed_parameters=removed,
    )


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:n])


# ---------------------------------------------------------------- applying a plan


def _keep_rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def _keep_cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _complement(n: int, drop: list[int]) -> torch.Tensor:
    gone = set(drop)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def _keep_roles(lay: Layout, keep: dict[str, torch.Tensor]) -> None:
    """Keep the given rows of each role; the roles of one fused linear are fused back in their order."""
    by_path: dict[str, list[torch.Tensor]] = {}
    for role, rows in keep.items():
        proj = lay.roles[role]
        by_path.setdefault(proj.path, []).append(rows + proj.offset)
    for path, chunks in by_path.items():
        lay.replace(path, _keep_rows(lay.block.get_submodule(path), torch.cat(chunks)))


def apply(model: nn.Module, width_plan: WidthPlan) -> None:
    """Remove the planned groups in place (new, smaller ``nn.Linear`` modules; weights copied). A fused
    attention (Phi-3's ``qkv_proj``), which splits its projection by its config's head count, gets the
    layer's head counts as its own config fields (`explab.models.override_config`)."""
    hd = head_dim(model)
    for i, drop in width_plan.attn.items():
        if not drop:
            continue
        lay = layout(model, i)
        n_kv = lay.roles["k"].size // hd
        g = lay.roles["q"].size // lay.roles["k"].size
        kv_keep = _complement(n_kv, drop)
        kv_rows = (kv_keep[:, None] * hd + torch.arange(hd)).reshape(-1)
        q_rows = (kv_keep[:, None] * g * hd + torch.arange(g * hd)).reshape(-1)
        _keep_roles(lay, {"q": q_rows, "k": kv_rows, "v": kv_rows})
        lay.replace(lay.roles["o"].path, _keep_cols(lay.linear("o"), q_rows))
        heads = {"num_heads": len(kv_keep) * g, "num_key_value_heads": len(kv_keep)}
        for name, value in heads.items():
            if hasattr(lay.attn, name):
                setattr(lay.attn, name, value)
        if lay.roles["q"].path == lay.roles["k"].path:
            override_config(lay.attn, num_attention_heads=heads["num_heads"],
                            num_key_value_heads=heads["num_key_value_heads"])
    for i, drop in width_plan.mlp.items():
        if not drop:
            continue
        lay = layout(model, i)
        keep = _complement(lay.roles["gate"].size, drop)
        _keep_roles(lay, {"gate": keep, "up": keep})
        lay.replace(lay.roles["down"].path, _keep_cols(lay.linear("down"), keep))
        if hasattr(lay.mlp, "intermediate_size"):
            lay.mlp.intermediate_size = len(keep)
