"""Calibration through the shared `HookedModel`: every block's input and output hidden states on calibration
samples, reduced to ShortGPT's block influence and the angular distances of runs of blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from explab.interventions import Capture, points
from explab.servers import ForwardRequest
from jobs.vlm_compression.layerwise import angular_distance, block_influence


def block_captures(n_layers: int) -> list[Capture]:
    """Captures at every position of each block's input (``resid_pre``) and the last block's output: block
    i's output is block i+1's input, so L + 1 captures give every block's input and output."""
    last = Capture(point=points.resid_post(n_layers - 1))
    return [Capture(point=points.resid_pre(i)) for i in range(n_layers)] + [last]


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
            states = [torch.from_numpy(np.array(result.captures[points.resid_pre(i)])) for i in range(n_layers)]
            states.append(torch.from_numpy(np.array(result.captures[points.resid_post(n_layers - 1)])))
            ins, outs = states[:-1], states[1:]
            for i in range(n_layers):
                bi[i] += block_influence(ins[i], outs[i])
                for n in range(1, n_layers - i + 1):
                    sums[i, n] += angular_distance(ins[i], outs[i + n - 1])
    for i in range(n_layers):
        for n in range(1, n_layers - i + 1):
            angular[i, n] = sums[i, n] / len(reqs)
    return bi, angular
