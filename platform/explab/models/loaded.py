"""What a load returns (`LoadedModel`) and the steps every loader shares: device and dtype
resolution, the kind check and the finishing touches. Below `loader` and `tiny`, which both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from explab.errors import ModelError
from explab.models.spec import ModelSpec

KINDS = ("causal_lm", "vlm", "clip", "vae", "diffusion")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to feed it.

    ``tokenizer`` is None for a VAE; ``processor`` is the LLaVA processor, the open_clip image
    transform, or a diffusers ``VaeImageProcessor`` (None for causal LMs). ``source`` says where it
    came from (``tiny:<family>``, an absolute path, or ``hub:<id>``). For kind ``diffusion``,
    ``model`` is the whole diffusers pipeline (FLUX or Stable Diffusion / SDXL), ``tokenizer`` the
    one whose positions its attention maps index (FLUX: the T5 ``tokenizer_2``) and ``processor``
    its ``image_processor``.
    """

    model: Any
    tokenizer: Any
    processor: Any
    kind: str
    spec: ModelSpec
    source: str
    revision: str | None

    @property
    def device(self) -> torch.device:
        if self.kind == "diffusion":
            return self.model.device
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        if self.kind == "diffusion":
            return self.model.dtype
        return next(self.model.parameters()).dtype


def resolve_device(spec: ModelSpec | str) -> torch.device:
    """The torch device of a spec (or of a device string): ``auto`` is cuda when there is one, else cpu.

    The one device resolution of the platform: model loading, encoders and jobs that place their
    own tensors (e.g. ezpc's projection) all call it.
    """
    device = spec if isinstance(spec, str) else spec.device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ModelError(
            f"bad model device {device!r} ({err}): use auto, cpu, cuda or cuda:<n>"
        ) from err


def resolve_dtype(spec: ModelSpec | str, device: torch.device) -> torch.dtype:
    """The compute dtype of a spec (or of a dtype name): ``auto`` is bfloat16 on cuda, else float32."""
    dtype = spec if isinstance(spec, str) else spec.dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"bad model dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling `ModelSpec.dtype` uses)."""
    return str(dtype).removeprefix("torch.")


def finish(
    model: Any,
    tokenizer: Any,
    processor: Any,
    kind: str,
    spec: ModelSpec,
    source: str,
    revision: str | None = None,
) -> LoadedModel:
    """Common last steps: check the kind, eval mode, pad token + left padding, resolved revision."""
    check_kind(spec, kind)
    if kind == "diffusion":  # a pipeline: every module in eval mode; its tokenizers keep right padding
        for component in model.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return LoadedModel(model, tokenizer, processor, kind, spec, source, revision or spec.revision)
    model.eval()
    for tok in (tokenizer, getattr(processor, "tokenizer", None)):
        if hasattr(tok, "padding_side"):  # an HF tokenizer (not open_clip's)
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"
    revision = revision or getattr(getattr(model, "config", None), "_commit_hash", None) or spec.revision
    return LoadedModel(model, tokenizer, processor, kind, spec, source, revision)


def check_kind(spec: ModelSpec, kind: str) -> None:
    if spec.kind not in ("auto", kind):
        raise ModelError(
            f"model {spec.name!r} is a {kind} model but the spec asks for kind={spec.kind!r}: "
            f"set kind to {kind!r} or 'auto', or name a {spec.kind} model"
        )


def vae_processor(model: Any) -> Any:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=2 ** (len(model.config.block_out_channels) - 1))
