"""``synthetic:ezpc_shapes``: small images of coloured shapes, one class per (colour, shape).

Rows are ``{"image": HWC uint8 array, "label": int, "class_name": "red circle"}``. ``part`` picks
an independent draw (train and test differ), seeded from the run's seed. Class ``i`` is
``f"{colours[i // len(shapes)]} {shapes[i % len(shapes)]}"`` (`class_names`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explab.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
DEFAULT_COLOURS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ("circle", "square", "triangle")
PARTS = {"train": 0, "test": 1, "validation": 2}


def class_names(colours: Any = DEFAULT_COLOURS, shapes: Any = DEFAULT_SHAPES) -> list[str]:
    _check(colours, shapes)
    return [f"{c} {s}" for c in colours for s in shapes]


def _check(colours: Any, shapes: Any) -> None:
    bad = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if bad:
        raise ConfigError(f"ezpc_shapes: unknown colour/shape {', '.join(map(str, bad))}: use colours from "
                          f"{', '.join(COLOURS)} and shapes from {', '.join(SHAPES)}")


def draw(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` × ``size`` image: a noisy grey background and one filled shape."""
    grey = rng.integers(90, 170)
    img = np.clip(grey + rng.normal(0, 12, (size, size, 3)), 0, 255)
    r = rng.uniform(0.22, 0.36) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif shape == "triangle":  # apex up
        mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:  # cross
        w = r * 0.35
        mask = ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    shade = rng.uniform(0.85, 1.1)
    img[mask] = np.clip(np.asarray(colour) * shade + rng.normal(0, 6, (int(mask.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def shapes_rows(*, seed: int = 0, n: int = 240, part: str = "train", size: int = 32,
                colours: Any = DEFAULT_COLOURS, shapes: Any = DEFAULT_SHAPES) -> list[dict[str, Any]]:
    """``n`` images, classes balanced and shuffled; ``part`` (train/test/validation) is an independent draw."""
    names = class_names(colours, shapes)
    if part not in PARTS:
        raise ConfigError(f"ezpc_shapes: part {part!r} is not one of {', '.join(PARTS)}")
    rng = np.random.default_rng([seed, PARTS[part], 7])
    labels = rng.permutation(np.arange(n) % len(names))
    rows = []
    for label in labels:
        colour, shape = names[label].split(" ")
        rows.append({"image": draw(shape, COLOURS[colour], size, rng), "label": int(label),
                     "class_name": names[label]})
    return rows
