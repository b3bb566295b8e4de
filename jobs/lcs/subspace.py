"""Step 1: the latent colour subspace — solid-colour latents averaged over tokens, then PCA."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explab.errors import ExplabError


@dataclass(frozen=True)
class Subspace:
    """An orthonormal basis B (k x C) of the colour subspace and its origin mu (C).

    ``ratios`` holds the variance ratio of every principal component (the first k span the subspace)."""

    basis: np.ndarray
    mean: np.ndarray
    ratios: np.ndarray

    @property
    def k(self) -> int:
        return self.basis.shape[0]

    def coordinates(self, latents: np.ndarray) -> np.ndarray:
        """c = (z - mu) B^T for any (..., C) array."""
        return (np.asarray(latents, dtype=np.float64) - self.mean) @ self.basis.T


def colour_means(latents: np.ndarray) -> np.ndarray:
    """One C-vector per image: packed latents (n, tokens, C) averaged over the tokens."""
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 3:
        raise ExplabError(f"latents of shape {latents.shape}: give (images, tokens, channels)")
    return latents.mean(1)


def fit_subspace(means: np.ndarray, k: int = 3) -> Subspace:
    """PCA (scikit-learn, exact SVD) of the colour means: the top ``k`` components and every ratio."""
    from sklearn.decomposition import PCA

    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] <= k:
        raise ExplabError(f"{means.shape[0]} colour means for a {k}-d subspace: give more colours than k")
    pca = PCA(n_components=min(means.shape), svd_solver="full").fit(means)
    return Subspace(basis=pca.components_[:k].copy(), mean=pca.mean_.copy(), ratios=pca.explained_variance_ratio_)


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians) between the row spaces of ``a`` (k x C) and ``b`` (m x C)."""
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64).T)
    return np.arccos(np.linalg.svd(qa.T @ qb, compute_uv=False).clip(-1, 1))
