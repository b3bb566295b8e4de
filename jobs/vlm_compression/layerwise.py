"""Layerwise pruning (ShortGPT): block influence from calibration captures, delete the least influential blocks.

BI_i = sum over tokens (and samples) of 1 - cos(h_in_i, h_out_i), from the block's own input and output
hidden states (hooked directly, so the final norm does not enter the last block's score). A NaN cosine
(a zero vector) counts as 0.5, as in the authors' code; a token the block leaves bit-identical has
cosine exactly 1. The angular variant removes the contiguous run of n blocks whose input and output
are closest in angular distance arccos(cos)/pi (mean over tokens).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explab.errors import ConfigError
from jobs.vlm_compression.backbone import blocks, text_config


def _cosine(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token cosine (float64) with NaN -> 0.5 and unchanged tokens exactly 1."""
    a, b = h_in.double().reshape(-1, h_in.shape[-1]), h_out.double().reshape(-1, h_out.shape[-1])
    cos = F.cosine_similarity(a, b, dim=-1, eps=0.0)
    cos = torch.nan_to_num(cos, nan=0.5)
    return torch.where((a == b).all(-1) & (a.norm(dim=-1) > 0), torch.ones_like(cos), cos)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """sum over tokens of 1 - cos(h_in, h_out) for one block on one sample ([T, d] each)."""
    return float((1.0 - _cosine(h_in, h_out)).sum())


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Mean over tokens of arccos(cos(h_in, h_out)) / pi."""
    return float(torch.arccos(_cosine(h_in, h_out).clamp(-1.0, 1.0)).mean() / math.pi)


def n_blocks_to_remove(n_layers: int, ratio: float) -> int:
    """round(ratio x n_layers); at least one block must stay."""
    n = int(round(ratio * n_layers))
    if n >= n_layers:
        raise ConfigError(f"compression ratio {ratio} removes all {n_layers} blocks: use a smaller ratio")
    return n


def select_blocks(bi: np.ndarray, n: int) -> list[int]:
    """The n blocks with the lowest influence (ShortGPT's argsort[:n]; ties keep the lower index)."""
    return sorted(int(i) for i in np.argsort(np.asarray(bi), kind="stable")[:n])


def select_angular(distances: np.ndarray, n: int) -> list[int]:
    """The contiguous run of n blocks [l, l+n) with the smallest ``distances[l]`` (the angular
    distance between the input of block l and the output of block l+n-1)."""
    if n == 0:
        return []
    start = int(np.argmin(np.asarray(distances)))
    return list(range(start, start + n))


def remove_blocks(model: nn.Module, indices: list[int]) -> None:
    """Delete decoder blocks ``indices`` in place; renumber the rest and update the config (layer count,
    per-layer types), so the model saves and reloads as an ordinary checkpoint with fewer layers."""
    layers = blocks(model)
    drop = set(indices)
    if not drop:
        return
    if max(drop) >= len(layers) or min(drop) < 0:
        raise ConfigError(f"blocks {sorted(drop)} out of range for a {len(layers)}-block model")
    kept = [block for i, block in enumerate(layers) if i not in drop]
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None)
    for new, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    layers_parent = layers
    while len(layers_parent):
        del layers_parent[-1]
    for block in kept:
        layers_parent.append(block)
    cfg.num_hidden_layers = len(kept)
    if types is not None:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in drop]
