"""Local interventions: the tokens of one object from its prompt token's attention map.

As in the authors' code, the map (image tokens,) of the object's first text token at one transformer block
(head mean) is first closed as a grey-scale image (a ``kernel`` x ``kernel`` max-pool dilation, then the same
erosion) to fill small holes, then thresholded to the tokens holding the top ``mass`` share of the closed map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from explab.errors import ExplabError


def top_mass(weights: np.ndarray, mass: float) -> np.ndarray:
    """The smallest set of entries (largest first) whose sum reaches ``mass`` of the total."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if not 0 < mass <= 1:
        raise ExplabError(f"attention mass {mass} is not in (0, 1]: give a share such as 0.8")
    order = np.argsort(-w, kind="stable")
    cum = np.cumsum(w[order]) / max(w.sum(), 1e-30)
    count = int(np.searchsorted(cum, mass - 1e-12) + 1)
    keep = np.zeros(w.shape, dtype=bool)
    keep[order[: min(count, len(w))]] = True
    return keep


def close(values: np.ndarray, kernel: int) -> np.ndarray:
    """Morphological closing of a 2-D map with max-pools (dilation, then erosion), as float64; on a boolean
    mask this is the binary closing (0/1)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ExplabError(f"closing kernel {kernel}: give an odd size such as 3 or 5")
    x = np.asarray(values, dtype=np.float64)
    if kernel == 1:
        return x
    t = torch.as_tensor(x)[None, None]
    dilated = F.max_pool2d(t, kernel, stride=1, padding=kernel // 2)
    return (-F.max_pool2d(-dilated, kernel, stride=1, padding=kernel // 2))[0, 0].numpy()


def attention_mask(attention: np.ndarray, grid: tuple[int, int], mass: float, kernel: int) -> np.ndarray:
    """(tokens,) boolean mask of the object from its (tokens,) attention map on a (rows, cols) token grid."""
    attention = np.asarray(attention, dtype=np.float64).ravel()
    if attention.size != grid[0] * grid[1]:
        raise ExplabError(f"an attention map of {attention.size} tokens for a {grid[0]}x{grid[1]} token grid")
    return top_mass(close(attention.reshape(grid), kernel), mass).ravel()


def first_token(offsets: list[tuple[int, int]], prompt: str, word: str) -> int:
    """Position of the first token of ``word`` in ``prompt`` from the tokenizer's character offsets."""
    start = prompt.find(word)
    if start < 0 or not word:
        raise ExplabError(f"object {word!r} does not occur in the prompt {prompt!r}: put the object's word in it")
    end = start + len(word)
    for position, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            return position
    raise ExplabError(f"no token of {prompt!r} covers {word!r}: check the tokenizer's offsets")
