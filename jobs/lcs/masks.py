"""Local interventions: the tokens of one object from its prompt token's attention map.

The map (image tokens,) of the object's first text token at one transformer block (head mean) is
thresholded to the tokens holding the top ``mass`` share of the attention, and the binary mask is
closed (a ``kernel`` x ``kernel`` max-pool dilation, then the same erosion) to fill small holes.
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


def close(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Morphological closing of a 2-D boolean mask with max-pools (dilation, then erosion)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ExplabError(f"closing kernel {kernel}: give an odd size such as 3 or 5")
    if kernel == 1:
        return np.asarray(mask, dtype=bool)
    x = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    dilated = F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
    eroded = -F.max_pool2d(-dilated, kernel, stride=1, padding=kernel // 2)
    return eroded[0, 0].numpy() > 0.5


def attention_mask(attention: np.ndarray, grid: tuple[int, int], mass: float, kernel: int) -> np.ndarray:
    """(tokens,) boolean mask of the object from its (tokens,) attention map on a (rows, cols) token grid."""
    attention = np.asarray(attention, dtype=np.float64).ravel()
    if attention.size != grid[0] * grid[1]:
        raise ExplabError(f"an attention map of {attention.size} tokens for a {grid[0]}x{grid[1]} token grid")
    return close(top_mass(attention, mass).reshape(grid), kernel).ravel()


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
