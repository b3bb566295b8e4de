"""Step 6: how close an object's colour came to the target: ΔE00 (CIEDE2000) and OpenCV-HLS ΔH, ΔS, ΔL
of the object's mean RGB inside its mask, summarised by colour family and by hue."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.errors import ExplabError
from jobs.lcs.colours import delta_e00, hls_deltas, rgb_to_hex


def upsample(mask: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
    """A (tokens,) token mask on a (rows, cols) grid as an (H, W) pixel mask."""
    m = np.asarray(mask, dtype=bool).reshape(grid)
    return np.repeat(np.repeat(m, height // grid[0], 0), width // grid[1], 1)


def evaluation_mask(segmenter: Any, image: np.ndarray, obj: str, token_mask: np.ndarray, grid: tuple[int, int],
                    mode: str) -> tuple[np.ndarray, str]:
    """The (H, W) mask an object's colour is measured in, and where it came from (``mask_source``).

    With a segmenter: its mask of ``obj`` ("segmenter"); where it finds none, and without a segmenter, the
    intervention's own tokens: the attention mask in local mode ("attention"), the whole image in global
    mode ("image"), with " (no segment)" added when a segmenter found nothing.
    """
    fallback = "attention" if mode == "local" else "image"
    if segmenter is not None:
        found = segmenter.mask(image, obj)
        if found is not None:
            return found, "segmenter"
        fallback += " (no segment)"
    return upsample(token_mask, grid, *image.shape[:2]), fallback


def object_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean RGB in [0, 1] of a uint8 (H, W, 3) image inside an (H, W) mask."""
    if not mask.any():
        raise ExplabError("an empty object mask: the object was not found in the image")
    return np.asarray(image, dtype=np.float64)[mask].mean(0) / 255


def colour_errors(rgb: np.ndarray, target: np.ndarray) -> dict[str, float | str]:
    d = hls_deltas(rgb, target)
    return {"dE00": float(delta_e00(rgb, target)), "dH": float(d["dH"]), "dS": float(d["dS"]),
            "dL": float(d["dL"]), "object_hex": rgb_to_hex(rgb)}


def summary(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean ΔE00, ΔH, ΔS, ΔL per group (and the count)."""
    metrics = ["dE00", "dH", "dS", "dL"]
    out = table.groupby(by, dropna=False)[metrics].mean().reset_index()
    out["n"] = table.groupby(by, dropna=False).size().to_numpy()
    return out
