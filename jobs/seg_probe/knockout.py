"""Attention knockout between image tokens of a confused class pair, and its random-key control.

At an LLM layer l the probe confuses some class pairs (A true, B predicted). For one image and one
pair: the *queries* are the image tokens whose true class is A and that the probe misclassifies; the
*keys* are the tokens of class A it classifies correctly. The knockout blocks attention from those
queries to those keys in the LLM layers from l on (or a window of them); the control blocks as many
image-token keys drawn at random among the other image tokens (neither queries nor true keys). Both
are `explab.interventions.Knockout` specs over image-token ordinals (raster order in the grid),
applied as additive float masks by the platform. The later layers are then re-probed with the same
probes and the accuracy on the query tokens is compared with the unmodified run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from explab.interventions import Knockout, Positions


def confused_pairs(conf: Tensor, top: int, min_count: int = 1) -> list[tuple[int, int, int]]:
    """The ``top`` off-diagonal cells of a confusion matrix (row = true, column = predicted): (A, B, count)."""
    c = conf.clone()
    c.fill_diagonal_(0)
    flat = c.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    n = c.shape[0]
    out = []
    for idx in order[:top].tolist():
        if int(flat[idx]) < min_count:
            break
        out.append((idx // n, idx % n, int(flat[idx])))
    return out


@dataclass(frozen=True)
class KnockoutSets:
    """Image-token ordinals (raster order) of one image: knocked-out queries, their keys, the control keys."""

    queries: list[int]
    keys: list[int]
    control: list[int]


def knockout_sets(pred: Tensor, target: Tensor, a: int, b: int | None, rng: np.random.Generator,
                  ) -> KnockoutSets | None:
    """Queries: tokens of true class ``a`` predicted wrongly (as ``b`` when given); keys: tokens of ``a`` predicted
    right; control: as many random other image tokens. None when the image has no query or no key."""
    p, t = pred.reshape(-1), target.reshape(-1)
    wrong = (t == a) & (p != a) if b is None else (t == a) & (p == b)
    right = (t == a) & (p == a)
    queries = torch.nonzero(wrong)[:, 0].tolist()
    keys = torch.nonzero(right)[:, 0].tolist()
    if not queries or not keys:
        return None
    others = sorted(set(range(len(t))) - set(queries) - set(keys))
    control = sorted(rng.choice(others, size=min(len(keys), len(others)), replace=False).tolist()) if others else []
    return KnockoutSets(queries, keys, control)


def knockout_spec(layers: list[int], queries: list[int], keys: list[int]) -> Knockout:
    """Block attention from image tokens ``queries`` to image tokens ``keys`` in ``layers``."""
    return Knockout(layers=layers, queries=Positions(kind="image", indices=queries),
                    keys=Positions(kind="image", indices=keys))


def knockout_layers(layer: int, n_layers: int, window: int | None) -> list[int]:
    """LLM layers the knockout acts in: from ``layer`` on (``window`` None) or the next ``window`` layers."""
    end = n_layers if window is None else min(n_layers, layer + window)
    return list(range(layer, end))
