"""Calibration through the shared `HookedModel`: every block's input and output hidden states on calibration
samples, reduced to ShortGPT's block influence and the angular distances of runs of blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from explab.interventions import Capture, points
from explab.servers.hooked import ForwardRequest
from jobs.vlm_compression.layerwise import angular_distance, block_influence


def block_captures(n_layers: int) -> list[Capture]:
    """Captures of each block's input (``resid_pre``) and output (``resid_post``) at every position."""
    return [Capture(point=p(i)) for i in range(n_layers) for p in (points.resid_pre, points.resid_post)]


def requests(texts: list[str], images: list[Any | None], n_layers: int) -> list[ForwardRequest]:
    caps = block_captures(n_layers)
    return [ForwardRequest(text=t, images=None if img is None else [img], interventions=caps)
            for t, img in zip(texts, images, strict=True)]


def influence(hooked: Any, texts: list[str], images: list[Any | None], n_layers: int,
              batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(BI [L], angular [L, L+1]): BI_i summed over tokens and samples; ``angular[l, n]`` the mean over
    samples of the angular distance between the input of block l and the output of block l+n-1
    (NaN where the run leaves the model)."""
    bi = np.zeros(n_layers)
    angular = np.full((n_layers, n_layers + 1), np.nan)
    angular[:, 0] = 0.0
    sums = np.zeros((n_layers, n_layers + 1))
    reqs = requests(texts, images, n_layers)
    for start in range(0, len(reqs), batch):
        for result in hooked.forward(reqs[start:start + batch]):
            ins = [torch.from_numpy(result.captures[points.resid_pre(i)]) for i in range(n_layers)]
            outs = [torch.from_numpy(result.captures[points.resid_post(i)]) for i in range(n_layers)]
            for i in range(n_layers):
                bi[i] += block_influence(ins[i], outs[i])
                for n in range(1, n_layers - i + 1):
                    sums[i, n] += angular_distance(ins[i], outs[i + n - 1])
    for i in range(n_layers):
        for n in range(1, n_layers - i + 1):
            angular[i, n] = sums[i, n] / len(reqs)
    return bi, angular
