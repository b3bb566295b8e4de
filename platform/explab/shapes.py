"""Coloured-shape images: the platform's one generator of small labelled images for synthetic datasets.

``shape_rows`` draws ``n`` images, one filled shape each on a noisy grey background, classes
(one per colour × shape) balanced and shuffled. Rows are ``{"image": HWC uint8 array, "label":
class index, "class_name": "red circle", "colour": "red", "shape": "circle", "shape_label":
index of the shape in ``shapes``, "caption": "a red circle"}``. ``stream`` picks an independent
draw for the same seed (train and test sets, paired and unpaired sets). Jobs expose it under
their own ``synthetic:`` names with the columns they need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from explab.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")


def class_names(colours: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """``"<colour> <shape>"`` for every pair, colour-major: class ``i`` is
    ``colours[i // len(shapes)]`` with ``shapes[i % len(shapes)]``."""
    bad = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if bad:
        raise ConfigError(f"coloured shapes: unknown colour/shape {', '.join(map(str, bad))}: use colours from "
                          f"{', '.join(COLOURS)} and shapes from {', '.join(SHAPES)}")
    return [f"{c} {s}" for c in colours for s in shapes]


def shape_mask(shape: str, hw: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """The exact (H, W) boolean mask of a filled ``shape`` of ``radius`` at ``centre`` (row, col), in pixels."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]] + 0.5
    dy, dx, r = yy - centre[0], xx - centre[1], radius
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    w = r * 0.35  # cross
    return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))


def draw(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` × ``size`` image: a noisy grey background and one filled shape."""
    grey = rng.integers(90, 170)
    img = np.clip(grey + rng.normal(0, 12, (size, size, 3)), 0, 255)
    r = rng.uniform(0.22, 0.36) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    mask = shape_mask(shape, (size, size), (cy, cx), r)
    shade = rng.uniform(0.85, 1.1)
    img[mask] = np.clip(np.asarray(colour) * shade + rng.normal(0, 6, (int(mask.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def shape_rows(*, n: int, seed: int = 0, stream: int = 0, size: int = 32,
               colours: Sequence[str] = ("red", "green", "blue", "yellow"),
               shapes: Sequence[str] = SHAPES) -> list[dict[str, Any]]:
    """``n`` coloured-shape images, classes balanced and shuffled (see the module docstring)."""
    names = class_names(colours, shapes)
    rng = np.random.default_rng([seed, stream, 7])
    labels = rng.permutation(np.arange(n) % len(names))
    rows = []
    for label in labels:
        colour, shape = names[label].split(" ")
        rows.append({"image": draw(shape, COLOURS[colour], size, rng), "label": int(label),
                     "class_name": names[label], "colour": colour, "shape": shape,
                     "shape_label": list(shapes).index(shape), "caption": f"a {colour} {shape}"})
    return rows
