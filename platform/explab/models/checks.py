"""Checks of model-dependent input, each one line: before Ray starts (`preflight`: the models a
config names can be loaded at all) and once a model is known (`check_layers`: indices within its
depth), so that bad input fails before any work instead of as a traceback inside a server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from explab.errors import ConfigError, ModelError
from explab.models.spec import ModelSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
CONFIG_FILES = ("config.json", "open_clip_config.json")


def model_specs(value: Any, where: str = "") -> Iterator[tuple[str, ModelSpec]]:
    """Every `ModelSpec` inside a config (nested sections, lists, dicts) with its dotted field."""
    if isinstance(value, ModelSpec):
        yield where, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from model_specs(getattr(value, name), f"{where}.{name}" if where else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from model_specs(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from model_specs(item, f"{where}.{i}" if where else str(i))


def check_spec(spec: ModelSpec, field: str = "model", *, local_paths: bool = True) -> None:
    """A ``tiny:`` family that exists; with ``local_paths``, a path-like name that is a model
    directory with a config and weights (or a file). Hub ids are left to the loader."""
    from explab.models.tiny import TINY_FAMILIES

    if spec.is_tiny:
        if spec.family not in TINY_FAMILIES:
            raise ModelError(f"field '{field}': unknown tiny model family {spec.name!r}: use one of "
                             + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
        return
    if not local_paths:
        return
    path = Path(spec.name).expanduser()
    if not (spec.name.startswith(("/", ".", "~")) or path.exists()):
        return  # a hub id
    if path.is_file():
        return
    if not path.is_dir():
        raise ModelError(f"field '{field}': model path {spec.name!r} does not exist: give an existing model "
                         "directory, a Hugging Face id, or a tiny:<family> preset")
    if not any((path / name).is_file() for name in CONFIG_FILES):
        raise ModelError(f"field '{field}': model directory {spec.name!r} has no config.json or "
                         "open_clip_config.json: point at a directory written by save_pretrained")
    files = [*path.glob("*"), *path.glob("*/*")]
    if not any(f.suffix in WEIGHT_SUFFIXES and f.is_file() for f in files):
        raise ModelError(f"field '{field}': model directory {spec.name!r} holds no weights (no "
                         f"{', '.join('*' + s for s in WEIGHT_SUFFIXES)}): finish the download or point at "
                         "the directory that has them")


def preflight(config: Any, *, local_paths: bool = True) -> None:
    """`check_spec` on every model a job's config names (before Ray starts)."""
    for field, spec in model_specs(config):
        check_spec(spec, field, local_paths=local_paths)


def check_layers(layers: int | Iterable[int], n_layers: int, field: str = "layer", model: str = "the model",
                 *, negative: bool = False) -> None:
    """Each of ``layers`` names a block of a model with ``n_layers`` blocks (0 .. n_layers-1, and
    with ``negative`` also -n_layers .. -1 counted from the end); one line naming ``field`` otherwise."""
    values = [layers] if isinstance(layers, int) else list(layers)
    low = -n_layers if negative else 0
    for layer in values:
        if not low <= int(layer) < n_layers:
            allowed = f"0..{n_layers - 1}" + (f", or {-n_layers}..-1 from the end" if negative else "")
            raise ConfigError(f"field '{field}': layer {layer} out of range for {model}, which has {n_layers} blocks "
                              f"({allowed}): pick a layer in range")
