"""Evaluation: cross-modal retrieval (R@1/5/10 both ways) and zero-shot classification."""

from __future__ import annotations

import numpy as np

from explab.vectors import unit_rows


def recall_at(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Row i's correct column is i: the fraction of rows whose correct column ranks in the top k."""
    sim = np.asarray(sim)
    if not np.isfinite(sim).all():  # diverged embeddings: NaN compares false and would rank first
        return {k: float("nan") for k in ks}
    correct = np.diag(sim)[:, None]
    rank = (sim > correct).sum(axis=1)  # ties count in the query's favour
    return {k: float((rank < k).mean()) for k in ks}


def grouped_recall(sim: np.ndarray, groups: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict, dict]:
    """Recall@k with several texts per image: ``sim`` is (images × texts), text j shows image
    ``groups[j]``. Image→text: a hit when any of the image's texts ranks in the top k (the rank of
    its best one); text→image: a hit when its own image ranks in the top k. Ties favour the query."""
    sim, groups = np.asarray(sim), np.asarray(groups)
    own = groups[None, :] == np.arange(sim.shape[0])[:, None]  # (images, texts): text j belongs to image i
    best = np.where(own, sim, -np.inf).max(axis=1)
    i2t_rank = (np.where(own, -np.inf, sim) > best[:, None]).sum(axis=1)
    t2i_rank = (sim.T > sim[groups, np.arange(len(groups))][:, None]).sum(axis=1)
    return ({k: float((i2t_rank < k).mean()) for k in ks}, {k: float((t2i_rank < k).mean()) for k in ks})


def retrieval(img: np.ndarray, txt: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
              groups: np.ndarray | None = None) -> dict[str, float]:
    """Image→text and text→image recall@k, and the mean R@1 of both directions. Without ``groups``
    row i of each matches; with ``groups`` (COCO: 5 captions an image) text j shows image
    ``groups[j]`` and every caption of an image counts as correct (`grouped_recall`)."""
    sim = unit_rows(np.asarray(img, np.float64)) @ unit_rows(np.asarray(txt, np.float64)).T
    if groups is None:
        i2t, t2i = recall_at(sim, ks), recall_at(sim.T, ks)
    else:
        i2t, t2i = grouped_recall(sim, groups, ks)
    out = {f"i2t_r{k}": i2t[k] for k in ks} | {f"t2i_r{k}": t2i[k] for k in ks}
    out["r1"] = 0.5 * (i2t[ks[0]] + t2i[ks[0]])
    return out


def zero_shot(img: np.ndarray, class_txt: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of assigning each image to the most similar class-prompt embedding."""
    sim = unit_rows(np.asarray(img, np.float64)) @ unit_rows(np.asarray(class_txt, np.float64)).T
    if not np.isfinite(sim).all():  # argmax would pick the first NaN: undefined, not a prediction
        return float("nan")
    pred = sim.argmax(axis=1)
    return float((pred == np.asarray(labels)).mean())
