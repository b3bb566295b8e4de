"""Evaluation: cross-modal retrieval (R@1/5/10 both ways) and zero-shot classification."""

from __future__ import annotations

import numpy as np


def normalize(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float64)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def recall_at(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Row i's correct column is i: the fraction of rows whose correct column ranks in the top k."""
    sim = np.asarray(sim)
    if not np.isfinite(sim).all():  # diverged embeddings: NaN compares false and would rank first
        return {k: float("nan") for k in ks}
    correct = np.diag(sim)[:, None]
    rank = (sim > correct).sum(axis=1)  # ties count in the query's favour
    return {k: float((rank < k).mean()) for k in ks}


def retrieval(img: np.ndarray, txt: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image→text and text→image recall@k for matched rows, and the mean R@1 of both directions."""
    sim = normalize(img) @ normalize(txt).T
    i2t, t2i = recall_at(sim, ks), recall_at(sim.T, ks)
    out = {f"i2t_r{k}": i2t[k] for k in ks} | {f"t2i_r{k}": t2i[k] for k in ks}
    out["r1"] = 0.5 * (i2t[ks[0]] + t2i[ks[0]])
    return out


def zero_shot(img: np.ndarray, class_txt: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of assigning each image to the most similar class-prompt embedding."""
    sim = normalize(img) @ normalize(class_txt).T
    if not np.isfinite(sim).all():  # argmax would pick the first NaN: undefined, not a prediction
        return float("nan")
    pred = sim.argmax(axis=1)
    return float((pred == np.asarray(labels)).mean())
