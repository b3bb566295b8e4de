"""Image cells as PIL images: one conversion for every place that reads images from data."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ExplabError


def to_pil(item: Any) -> Any:
    """A PIL RGB image from a PIL image, an HWC/HW array, encoded bytes, a path, or an HF image dict."""
    from PIL import Image

    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(item))).convert("RGB")
    if isinstance(item, (str, Path)):
        return Image.open(item).convert("RGB")
    arr = np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW → HWC
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ExplabError(f"image cell of shape {arr.shape} is not an HW or HWC image")
    return Image.fromarray(arr).convert("RGB")
