"""Step 3: per-step normalisation ("alphas and betas") of subspace coordinates during denoising.

From plain coloured scenes, C[w, t] = (mean over tokens of z_t - mu) B^T for every scene w and step t:
alpha_t = mean_w C[w, t]; beta_t = mean_w |C[w, t] - alpha_t| (per axis), divided by its value at the
last step T. A coordinate at step t reads as a final-latent coordinate through
C_hat = (C - alpha_t) / beta_t * beta_T + alpha_T (beta_T = 1 after the division).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explab.errors import ExplabError


@dataclass(frozen=True)
class Normalisation:
    """``alphas`` and ``betas`` (steps x k); ``steps`` are the capture steps they belong to (last = reference)."""

    steps: list[int]
    alphas: np.ndarray
    betas: np.ndarray

    def _row(self, step: int) -> int:
        if step not in self.steps:
            raise ExplabError(f"no normalisation for step {step}: it was fitted on steps {self.steps}")
        return self.steps.index(step)

    def normalise(self, coords: np.ndarray, step: int) -> np.ndarray:
        r = self._row(step)
        return (np.asarray(coords) - self.alphas[r]) / self.betas[r] * self.betas[-1] + self.alphas[-1]

    def denormalise(self, coords: np.ndarray, step: int) -> np.ndarray:
        r = self._row(step)
        return (np.asarray(coords) - self.alphas[-1]) / self.betas[-1] * self.betas[r] + self.alphas[r]


def fit_normalisation(coords: np.ndarray, steps: list[int]) -> Normalisation:
    """``coords``: (scenes, steps, k) token-mean subspace coordinates, steps ascending (the last is T)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[1] != len(steps) or coords.shape[0] < 2:
        raise ExplabError(f"coordinates of shape {coords.shape} for {len(steps)} steps: "
                          "give (scenes >= 2, steps, k)")
    alphas = coords.mean(0)
    spread = np.abs(coords - alphas).mean(0)
    if (spread[-1] <= 0).any():
        raise ExplabError("the scenes' final latents do not vary along some colour axis: use differently "
                          "coloured scenes")
    return Normalisation(steps=list(steps), alphas=alphas, betas=np.maximum(spread, 1e-12) / spread[-1])
