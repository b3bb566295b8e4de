"""Models: name one by `ModelSpec` (HF id, local dir, or ``tiny:<family>``) and load it with `load_model`
(a structurally pruned checkpoint, written by `save_pruned`, included);
frozen encoders (`EncoderSpec` = a `ModelSpec` plus encoding options) load with `load_encoder`."""

from explab.models.checks import check_layers
from explab.models.encoders import Encoder, EncoderSpec, load_encoder
from explab.models.loaded import LoadedModel, resolve_device, resolve_dtype
from explab.models.loader import load_model
from explab.models.pruned import override_config, parameter_count, save_pruned
from explab.models.spec import ModelSpec
from explab.models.tiny import TINY_FAMILIES, build_tiny, save_tiny

__all__ = [
    "TINY_FAMILIES", "Encoder", "EncoderSpec", "LoadedModel", "ModelSpec", "build_tiny", "check_layers", "load_encoder",
    "load_model", "override_config", "parameter_count", "resolve_device", "resolve_dtype", "save_pruned", "save_tiny",
]
