"""Image tokens as spatial grids (H_t x W_t x D), per vision-language family.

A capture at a tower point (``vision.blocks.{i}``, ``projector``) holds one row per tower input (an
image or a tile) and a language-model capture with ``Positions(kind="image")`` holds a row's image
tokens in order. :func:`grid_layouts` says, for each such row, which of its entries form each grid:
an :class:`ImageGrid` maps every cell (r, c) to an entry of the row, in the image's raster order.

- LLaVA / InternVL: one grid per image (InternVL: per tile), CLS dropped from tower rows.
- LLaVA-NeXT: tower and projector rows are tiles; in the LLM each image gives two grids, the base
  view and the unpadded high-resolution view (its ``image_newline`` column dropped).
- Qwen2-VL / Qwen2.5-VL: the vision tower packs every image's patches into one row, in 2x2 merge
  units that Qwen2.5-VL reorders into attention windows; the grids undo that order. The tower grid
  has one cell per patch, the projector (merger) and LLM grids one per merged 2x2 unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from explab.errors import ExplabError


@dataclass(frozen=True)
class ImageGrid:
    """``index[r, c]``: the entry of a captured row at grid cell (r, c) (raster order of the image)."""

    index: Tensor  # (H_t, W_t) long

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.index.shape[0]), int(self.index.shape[1])

    def take(self, row: Tensor) -> Tensor:
        """The (H_t, W_t, ...) grid of ``row`` (entries x ...)."""
        return row[self.index.to(row.device)]


def _raster(h: int, w: int, start: int = 0, stride: int | None = None) -> ImageGrid:
    rows = torch.arange(h)[:, None] * (stride or w)
    return ImageGrid(start + rows + torch.arange(w)[None, :])


def _square(n: int, where: str) -> ImageGrid:
    """n tokens as a square grid; n = side^2 + 1 drops a leading CLS token."""
    for cls in (0, 1):
        side = math.isqrt(n - cls)
        if side > 0 and side * side == n - cls:
            return _raster(side, side, start=cls)
    raise ExplabError(f"{where}: {n} tokens are not a square grid of patches (plus CLS): not an image row")


def _family(model: nn.Module) -> str:
    family = getattr(getattr(model, "config", None), "model_type", "")
    if family not in ("llava", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl"):
        raise ExplabError(
            f"image grids: {type(model).__name__} ({family or 'no model_type'}) is not a supported "
            "vision-language family: use LLaVA, LLaVA-NeXT, InternVL or Qwen2(.5)-VL"
        )
    return family


def grid_layouts(
    model: nn.Module, point: str, row_sizes: list[int], inputs: Mapping[str, Tensor]
) -> list[list[ImageGrid]]:
    """The grids of each captured row at ``point``.

    ``row_sizes``: entries per captured row (tower: tokens per tower row; LLM points: image tokens per
    sequence, captured with ``Positions(kind="image")``). ``inputs``: the forward's vision inputs
    (``pixel_values``, ``image_sizes`` for LLaVA-NeXT, ``image_grid_thw`` for Qwen-VL).
    """
    family = _family(model)
    tower = point == "projector" or point.startswith("vision.")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen(model, point, row_sizes, inputs, tower)
    if tower:
        return [[_square(n, point)] for n in row_sizes]
    cfg = model.config
    if family == "llava_next":
        return _llava_next_lm(model, row_sizes, inputs)
    per = int(cfg.image_seq_length)  # llava: per image; internvl: per tile
    out = []
    for n in row_sizes:
        if n % per:
            raise ExplabError(f"{point!r}: {n} image tokens in a row is not a multiple of {per} per image")
        out.append([_shift(_square(per, point), k * per) for k in range(n // per)])
    return out


def _shift(grid: ImageGrid, by: int) -> ImageGrid:
    return ImageGrid(grid.index + by)


def _llava_next_lm(model: nn.Module, row_sizes: list[int], inputs: Mapping[str, Tensor]) -> list[list[ImageGrid]]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    newline = getattr(getattr(model, "model", model), "image_newline", None) is not None
    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise ExplabError("LLaVA-NeXT image grids need the forward's `image_sizes` (from its processor)")
    images = iter(sizes.tolist())
    out = []
    for n in row_sizes:
        grids, used = [], 0
        while used < n:
            size = next(images)
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            h, w = unpad_image(torch.empty(1, nph * side, npw * side), size).shape[1:]
            grids += [_raster(side, side, used), _raster(h, w, used + side * side, w + int(newline))]
            used += side * side + h * (w + int(newline))
        out.append(grids)
    return out


def _qwen(
    model: nn.Module, point: str, row_sizes: list[int], inputs: Mapping[str, Tensor], tower: bool
) -> list[list[ImageGrid]]:
    from transformers.vision_utils import get_vision_window_index

    vc = model.config.vision_config
    m = vc.spatial_merge_size
    thw = inputs.get("image_grid_thw")
    if thw is None:
        raise ExplabError("Qwen-VL image grids need the forward's `image_grid_thw` (from its processor)")
    # unit u (raster over the merged grid of every image in turn) sits at slot inv[u] of the tower
    if model.config.model_type == "qwen2_5_vl":
        window, _ = get_vision_window_index(thw.cpu(), m, vc.window_size, vc.patch_size)
        inv = torch.argsort(window)
    else:
        inv = torch.arange(int((thw.prod(-1) // (m * m)).sum()))
    grids, base = [], 0
    for t, h, w in thw.tolist():
        hm, wm = h // m, w // m
        for k in range(t):
            units = base + k * hm * wm + torch.arange(hm * wm).view(hm, wm)
            if not tower:
                grids.append(_raster(hm, wm))
            elif point == "projector":
                grids.append(ImageGrid(inv[units]))
            else:  # one cell per patch: unit slot * m^2 + offset inside the 2x2 unit
                r, c = torch.arange(h)[:, None], torch.arange(w)[None, :]
                slot = inv[units[r // m, c // m]]
                grids.append(ImageGrid(slot * m * m + (r % m) * m + c % m))
        base += t * hm * wm
    if tower:
        return [grids]  # the tower packs all images into one row
    return _split_rows(grids, row_sizes, point)


def _split_rows(grids: list[ImageGrid], row_sizes: list[int], point: str) -> list[list[ImageGrid]]:
    """Assign the images' grids (in batch order) to sequences by their image-token counts."""
    out, it = [], iter(grids)
    for n in row_sizes:
        row, used = [], 0
        while used < n:
            g = next(it, None)
            if g is None:
                raise ExplabError(f"{point!r}: more image tokens than the images' grids cover")
            row.append(_shift(g, used))
            used += g.index.numel()
        out.append(row)
    return out
