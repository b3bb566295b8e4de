"""Atomic file writes: a crash leaves either the old file or the new one, never half a file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from explab import mirror

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; a file in the mirror of
    an object-store runs dir is uploaded at once (`explab.mirror`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mirror.upload(path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf) as None and numpy scalars as Python ones,
    so that it is valid JSON (which has no NaN or Infinity)."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if hasattr(data, "item") and getattr(data, "ndim", None) == 0:  # numpy / torch scalars
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_json(path: str | Path, data: Any) -> Path:
    """Valid JSON: non-finite floats are written as null (see `json_safe`)."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def write_parquet(path: str | Path, frame: Any) -> Path:
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    return atomic_write(path, lambda p: frame.to_parquet(p, index=False))


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def write_figure(path: str | Path, figure: Any, dpi: int = 120) -> Path:
    import matplotlib.pyplot as plt

    def _save(p: Path) -> None:
        figure.savefig(p, dpi=dpi, bbox_inches="tight", format="png")

    try:
        return atomic_write(path, _save)
    finally:
        plt.close(figure)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed `atomic_write` calls left under ``folder``
    (``.<name>.<random>.tmp``); returns what was removed. Call it only on folders nothing writes to."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
