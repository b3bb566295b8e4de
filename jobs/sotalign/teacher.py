"""Stage 1: a linear teacher fitted on the few pairs only, giving a coarse shared space.

Three selectable fits (``kind``), each returning maps ``image(X)`` and ``text(Y)`` into a shared
space of ``dim`` dimensions (inputs centred with the pair means; outputs L2-normalised when
used for similarities):

- ``cca``: regularised CCA — whiten each side with (C + reg·tr(C)/d·I)^{-1/2}, SVD of the whitened
  cross-covariance, keep the top ``dim`` canonical directions (weighted by their correlations);
- ``ridge``: ridge regression from image to text features (X W ≈ Y), followed by a PCA of the
  predicted text space down to ``dim``: image → (X W) V, text → Y V;
- ``procrustes``: PCA of each side to ``dim`` (whitened), then the orthogonal R minimising
  ‖X_p R − Y_p‖ (SVD of X_pᵀ Y_p): image → X_p R, text → Y_p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

TeacherKind = Literal["cca", "ridge", "procrustes"]


@dataclass
class LinearTeacher:
    kind: str
    mean_x: np.ndarray
    mean_y: np.ndarray
    W_x: np.ndarray  # (d_x, dim)
    W_y: np.ndarray  # (d_y, dim)

    def image(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_x) @ self.W_x

    def text(self, Y: np.ndarray) -> np.ndarray:
        return (np.asarray(Y, dtype=np.float64) - self.mean_y) @ self.W_y

    @property
    def dim(self) -> int:
        return self.W_x.shape[1]


def fit_teacher(X: np.ndarray, Y: np.ndarray, kind: TeacherKind = "cca", dim: int = 64,
                reg: float = 0.1) -> LinearTeacher:
    """Fit the ``kind`` teacher on paired rows ``X[i] ↔ Y[i]`` (``reg``: relative ridge strength)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"teacher needs paired matrices with the same number of rows, got {X.shape} and {Y.shape}")
    if len(X) < 2:
        raise ValueError("teacher needs at least 2 pairs")
    dim = int(min(dim, X.shape[1], Y.shape[1], len(X) - 1))
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    if kind == "cca":
        Wx, Wy = _cca(Xc, Yc, dim, reg)
    elif kind == "ridge":
        Wx, Wy = _ridge(Xc, Yc, dim, reg)
    elif kind == "procrustes":
        Wx, Wy = _procrustes(Xc, Yc, dim, reg)
    else:
        raise ValueError(f"unknown teacher kind {kind!r}: use cca, ridge or procrustes")
    return LinearTeacher(kind, mx, my, Wx, Wy)


def _inv_sqrt(C: np.ndarray, reg: float) -> np.ndarray:
    d = C.shape[0]
    C = C + reg * (np.trace(C) / d + 1e-12) * np.eye(d)
    w, V = np.linalg.eigh(C)
    return (V / np.sqrt(np.maximum(w, 1e-12))) @ V.T


def _cca(Xc: np.ndarray, Yc: np.ndarray, dim: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(Xc)
    Cxx, Cyy, Cxy = Xc.T @ Xc / n, Yc.T @ Yc / n, Xc.T @ Yc / n
    Sx, Sy = _inv_sqrt(Cxx, reg), _inv_sqrt(Cyy, reg)
    U, s, Vt = np.linalg.svd(Sx @ Cxy @ Sy, full_matrices=False)
    weight = np.sqrt(np.clip(s[:dim], 0.0, None))  # stronger correlations count more in the cosine
    return Sx @ U[:, :dim] * weight, Sy @ Vt[:dim].T * weight


def _ridge(Xc: np.ndarray, Yc: np.ndarray, dim: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    d = Xc.shape[1]
    Cxx = Xc.T @ Xc
    W = np.linalg.solve(Cxx + reg * (np.trace(Cxx) / d + 1e-12) * np.eye(d), Xc.T @ Yc)  # (d_x, d_y)
    _, _, Vt = np.linalg.svd(Xc @ W, full_matrices=False)
    V = Vt[:dim].T
    return W @ V, V


def _procrustes(Xc: np.ndarray, Yc: np.ndarray, dim: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    Px = _pca_whiten(Xc, dim, reg)
    Py = _pca_whiten(Yc, dim, reg)
    U, _, Vt = np.linalg.svd((Xc @ Px).T @ (Yc @ Py), full_matrices=False)
    return Px @ (U @ Vt), Py


def _pca_whiten(Zc: np.ndarray, dim: int, reg: float) -> np.ndarray:
    _, s, Vt = np.linalg.svd(Zc, full_matrices=False)
    var = s[:dim] ** 2 / len(Zc)
    return Vt[:dim].T / np.sqrt(var + reg * var.mean() + 1e-12)
