"""Segmentation data: synthetic shape scenes with exact masks (tiny) and ADE20K in its Hugging Face form (paper).

Every row the job uses is ``{"image": (H, W, 3) uint8, "mask": (H, W) int64}`` with class ids in
``[0, n_classes)`` and ``ignore_index`` for unlabelled pixels.

- ``synthetic:seg_scenes``: 1-3 filled shapes (one class per shape kind, each with its own colour,
  shade jittered) on a textured background (low-frequency noise plus stripes of random angle and
  period), later shapes drawn over earlier ones; class 0 is the background. The mask is exact: it is
  the geometry the pixels were painted from (`explab.shapes.shape_mask`).
- ADE20K SceneParsing (``hf:zhoubolei/scene_parse_150``, or any copy with the same columns): the
  annotation is a PNG whose value 0 means "other" and 1..150 the SceneParsing classes;
  ``label_offset: -1`` maps them to 0..149 and 0 to ``ignore_index`` (the benchmark's convention).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explab.errors import ConfigError, ExplabError
from explab.images import to_pil
from explab.shapes import COLOURS, SHAPES, shape_mask

SCENE_CLASSES = ("background", *SHAPES)
_CLASS_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float background: smooth noise in a random earthy tint plus faint stripes."""
    coarse = rng.normal(0, 1, (size // 8 + 2, size // 8 + 2))
    smooth = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period)
    tint = rng.uniform(80, 160, 3)
    grey = 12 * smooth + 10 * stripes + rng.normal(0, 6, (size, size))
    return tint[None, None, :] + grey[..., None]


def scene(size: int, rng: np.random.Generator, max_shapes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image (size, size, 3) uint8, mask (size, size) int64 with 0 = background, k = SHAPES[k-1])."""
    img = texture(size, rng)
    mask = np.zeros((size, size), dtype=np.int64)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        k = int(rng.integers(len(SHAPES)))
        r = rng.uniform(0.14, 0.3) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        region = shape_mask(SHAPES[k], (size, size), (cy, cx), r)
        colour = np.asarray(COLOURS[_CLASS_COLOURS[k]], dtype=float) * rng.uniform(0.85, 1.1)
        img[region] = colour + rng.normal(0, 6, (int(region.sum()), 3))
        mask[region] = k + 1
    return np.clip(img, 0, 255).astype(np.uint8), mask


def scene_rows(*, n: int = 16, size: int = 64, max_shapes: int = 3, seed: int = 0,
               stream: int = 0) -> list[dict[str, Any]]:
    """``synthetic:seg_scenes``: ``n`` scenes (see the module docstring); ``stream`` draws an independent set."""
    if n < 1 or size < 8:
        raise ConfigError(f"seg_scenes needs n >= 1 and size >= 8 (got n={n}, size={size}): raise them")
    rng = np.random.default_rng([seed, stream, 18])
    rows = []
    for i in range(n):
        image, mask = scene(size, rng, max_shapes)
        rows.append({"index": i, "image": image, "mask": mask})
    return rows


def to_label(mask: Any, offset: int, ignore_index: int, n_classes: int) -> np.ndarray:
    """A dataset's annotation as (H, W) int64 class ids: ``value + offset``, out of range -> ``ignore_index``."""
    arr = np.asarray(to_pil(mask) if not isinstance(mask, np.ndarray) else mask)
    if arr.ndim == 3:  # a palette/RGB png whose first channel holds the class (ADE20K's HF form)
        arr = arr[..., 0]
    out = arr.astype(np.int64) + offset
    out[(out < 0) | (out >= n_classes)] = ignore_index
    return out


def check_hf_available(spec: str) -> None:
    """Refuse a Hugging Face dataset when the hub is offline and nothing is cached, in one line."""
    import os

    if spec.startswith("hf:") and os.environ.get("HF_HUB_OFFLINE") == "1":
        from datasets import load_dataset_builder

        name, _, config = spec[3:].partition(":")
        try:
            load_dataset_builder(name, config or None)
        except Exception:  # noqa: BLE001 - any failure means the data is not here
            raise ExplabError(f"dataset {spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                              "download it once with network access (or use data: synthetic:seg_scenes)") from None
