"""Models: name one by `ModelSpec` (HF id, local dir, or ``tiny:<family>``) and load it with `load_model`."""

from explab.models.loaded import LoadedModel, resolve_device, resolve_dtype
from explab.models.loader import load_model
from explab.models.spec import ModelSpec
from explab.models.tiny import TINY_FAMILIES, build_tiny, save_tiny

__all__ = [
    "TINY_FAMILIES", "LoadedModel", "ModelSpec", "build_tiny", "load_model", "resolve_device", "resolve_dtype",
    "save_tiny",
]
