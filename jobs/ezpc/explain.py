"""Explanations through the concept bottleneck.

With image embeddings V (n × d), class embeddings T (classes × d) and the learned A (d × k):
concept activations V A, class concept profiles T A, logits (V A)(T A)ᵀ, and the explanation of
an image's prediction c is the per-concept contribution (V A)_j · (T A)_{c,j}; the contributions
sum to the logit of c, so the top ones are what the prediction rests on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def activations(V: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Concept activations of images (or texts): V A, (n × k)."""
    return V @ A


def profiles(T: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Class concept profiles: T A, (classes × k)."""
    return T @ A


def logits(V: np.ndarray, A: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Zero-shot logits through the bottleneck: (V A)(T A)ᵀ, (n × classes)."""
    return activations(V, A) @ profiles(T, A).T


def contributions(act: np.ndarray, prof: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(n × k): concept j's contribution act_ij · prof_{classes_i, j} to class ``classes[i]``'s logit."""
    return act * prof[np.asarray(classes)]


def top_concepts(contrib: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n × k) of the k largest contributions per row, largest first, and their values."""
    k = min(k, contrib.shape[1])
    idx = np.argpartition(-contrib, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(contrib, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)


def explain(V: np.ndarray, A: np.ndarray, T: np.ndarray, concepts: Sequence[str], class_names: Sequence[str],
            k: int = 10, labels: np.ndarray | None = None, image_ids: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (image, rank): the top-k concepts behind each image's bottleneck prediction.

    Columns: image, label, predicted, rank, concept, contribution, activation, class_weight, logit
    (the predicted class's logit, of which the contributions are the parts).
    """
    act, prof = activations(V, A), profiles(T, A)
    z = act @ prof.T
    pred = z.argmax(axis=1)
    contrib = contributions(act, prof, pred)
    idx, vals = top_concepts(contrib, k)
    n, kk = idx.shape
    rows = np.repeat(np.arange(n), kk)
    flat = idx.reshape(-1)
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    frame = pd.DataFrame({
        "image": ids[rows],
        "label": (np.asarray(labels)[rows] if labels is not None else np.full(n * kk, -1)),
        "predicted": pred[rows],
        "predicted_name": [class_names[p] for p in pred[rows]],
        "rank": np.tile(np.arange(kk), n),
        "concept": [concepts[j] for j in flat],
        "concept_index": flat,
        "contribution": vals.reshape(-1),
        "activation": act[rows, flat],
        "class_weight": prof[pred[rows], flat],
        "logit": z[rows, pred[rows]],
    })
    return frame
