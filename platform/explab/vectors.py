"""Row-wise vector helpers shared by the jobs (embeddings are compared by cosine everywhere)."""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with every vector along the last axis scaled to unit L2 norm; all-zero rows stay zero
    (their norm is clipped at ``EPS``). Keeps ``x``'s floating dtype."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS).astype(x.dtype, copy=False)
