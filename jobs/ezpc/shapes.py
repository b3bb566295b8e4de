"""``synthetic:ezpc_shapes``: small images of coloured shapes, one class per (colour, shape).

Rows are ``{"image": HWC uint8 array, "label": int, "class_name": "red circle"}``, drawn by the
platform's `explab.shapes.shape_rows`. ``part`` picks an independent draw (train and test differ),
seeded from the run's seed. Class ``i`` is ``f"{colours[i // len(shapes)]} {shapes[i % len(shapes)]}"``
(`class_names`).
"""

from __future__ import annotations

from typing import Any

from explab import shapes as platform_shapes
from explab.errors import ConfigError

DEFAULT_COLOURS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ("circle", "square", "triangle")
PARTS = {"train": 0, "test": 1, "validation": 2}


def class_names(colours: Any = DEFAULT_COLOURS, shapes: Any = DEFAULT_SHAPES) -> list[str]:
    return platform_shapes.class_names(colours, shapes)


def shapes_rows(*, seed: int = 0, n: int = 240, part: str = "train", size: int = 32,
                colours: Any = DEFAULT_COLOURS, shapes: Any = DEFAULT_SHAPES) -> list[dict[str, Any]]:
    """``n`` images, classes balanced and shuffled; ``part`` (train/test/validation) is an independent draw."""
    if part not in PARTS:
        raise ConfigError(f"ezpc_shapes: part {part!r} is not one of {', '.join(PARTS)}")
    rows = platform_shapes.shape_rows(n=n, seed=seed, stream=PARTS[part], size=size, colours=colours, shapes=shapes)
    return [{"image": r["image"], "label": r["label"], "class_name": r["class_name"]} for r in rows]
