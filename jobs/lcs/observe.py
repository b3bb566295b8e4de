"""Step 4: reading colour off a latent during denoising, and comparing it with the decoded images.

Each token's subspace coordinates at step t are normalised to the last step, mapped to HSL by the
geometry and to RGB: a (rows x cols) colour map, one colour per packed token (FLUX: a 2x2 latent patch,
16x16 pixels at 512²). Images are compared at the same resolution by averaging their pixel blocks.
"""

from __future__ import annotations

import numpy as np

from explab.errors import ExplabError
from jobs.lcs.colours import delta_e00, hsl_to_rgb
from jobs.lcs.geometry import Geometry
from jobs.lcs.normalisation import Normalisation
from jobs.lcs.subspace import Subspace


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of packed tokens for an image of (height, width)."""
    rows = int(round(np.sqrt(tokens * height / width)))
    if rows == 0 or tokens % rows or height % rows or width % (tokens // rows):
        raise ExplabError(f"{tokens} latent tokens do not tile a {height}x{width} image: check the image size")
    return rows, tokens // rows


def token_colours(tokens: np.ndarray, step: int, subspace: Subspace, geometry: Geometry,
                  norm: Normalisation) -> np.ndarray:
    """(N, 3) RGB in [0, 1]: each token of a step-``step`` latent read as a colour."""
    coords = norm.normalise(subspace.coordinates(tokens), step)
    hsl = geometry.lcs_to_hsl(coords)
    hsl[:, 1:] = hsl[:, 1:].clip(0, 1)
    return hsl_to_rgb(hsl)


def block_means(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols, 3) mean RGB in [0, 1] of each pixel block of a uint8 (H, W, 3) image."""
    rows, cols = grid
    h, w = image.shape[:2]
    x = np.asarray(image, dtype=np.float64) / 255
    return x.reshape(rows, h // rows, cols, w // cols, 3).mean((1, 3))


def compare(colour_map: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """ΔE00 between two (rows, cols, 3) maps: the mean per cell, and between the two global mean colours."""
    return {"pixel": float(delta_e00(colour_map, reference).mean()),
            "mean": float(delta_e00(colour_map.reshape(-1, 3).mean(0), reference.reshape(-1, 3).mean(0)))}
