"""Frozen encoders: image and text towers that turn items into vectors (`Encoder`, `load_encoder`).

An encoder is a model: an `EncoderSpec` holds the `ModelSpec` that names it (and its device,
dtype, revision, ``trust_remote_code``, ``tiny`` overrides) plus what is particular to encoding:
which library reads it, how vectors are pooled and whether they are normalised. Device and dtype
come from the loader's one `resolve_device` / `resolve_dtype`; ``tiny:clip`` and local open_clip
directories load through `load_model`.

A spec is usually written as one string (a bare string is accepted wherever an `EncoderSpec` is),
or as a mapping with ``name`` plus options (``{name: "hf:facebook/dinov2-large", pooling: cls}``):

- ``tiny:clip`` — the offline random open_clip preset; image and text towers;
- ``open_clip:<arch>/<pretrained>`` — ``open_clip.create_model_and_transforms(arch,
  pretrained=...)``, e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``; ``open_clip:hf-hub:<org>/<repo>``;
- ``hf:<id-or-dir>`` — a Hugging Face vision encoder (``AutoModel`` + ``AutoImageProcessor``);
  ``pooling`` = ``cls`` | ``mean`` (patch tokens) | ``cls+mean`` | ``pooler``; models with
  ``get_image_features`` (HF CLIP/SigLIP) use it;
- ``st:<id-or-dir>`` — a sentence-transformers text encoder (``prompt`` is passed to ``encode``);
- a bare local directory — detected: ``open_clip_config.json`` → open_clip (via `load_model`),
  ``modules.json`` → sentence-transformers, ``config.json`` → HF vision.

Vectors are the encoder's raw outputs as float32 (``normalize: true`` L2-normalises them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import model_validator

from explab.config import Section
from explab.errors import ConfigError, ExplabError
from explab.images import to_pil
from explab.models.loaded import dtype_name, resolve_device, resolve_dtype
from explab.models.spec import ModelSpec

Modality = Literal["image", "text"]
EncoderKind = Literal["open_clip", "hf_vision", "sentence_transformers"]
_MODEL_FIELDS = ("device", "dtype", "revision", "trust_remote_code", "tiny")


class EncoderSpec(Section):
    """A frozen encoder: the model (`ModelSpec`) and how it encodes. See the module docstring."""

    model: ModelSpec
    kind: EncoderKind  # which library reads it (from the spelling: open_clip:, hf:, st:, or detected)
    pretrained: str | None = None  # open_clip's pretrained tag (open_clip:<arch>/<pretrained>)
    pooling: Literal["cls", "mean", "cls+mean", "pooler"] = "cls"  # HF vision encoders only
    normalize: bool = False  # L2-normalise the stored vectors
    prompt: str | None = None  # sentence-transformers: prompt prepended by encode()

    @model_validator(mode="before")
    @classmethod
    def _from_spelling(cls, data: Any) -> Any:
        """``"st:<id>"`` or ``{name: ..., device: ..., pooling: ...}`` → ``{model: {...}, kind: ...}``."""
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or "name" not in data:
            return data
        data = dict(data)
        name = data.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"encoder name {name!r} is not a string: use e.g. tiny:clip or st:<id>")
        model = {k: data.pop(k) for k in _MODEL_FIELDS if k in data}
        kind, model_name, pretrained = parse_encoder_name(name)
        if kind == "open_clip" and not name.startswith("open_clip:"):  # tiny:clip or a local directory
            model["kind"] = "clip"  # read by the platform's loader, `load_model`
        return {**data, "model": {"name": model_name, **model}, "kind": kind, "pretrained": pretrained}

    @classmethod
    def of(cls, value: EncoderSpec | str | dict[str, Any]) -> EncoderSpec:
        return value if isinstance(value, EncoderSpec) else cls.model_validate(value)

    @property
    def name(self) -> str:
        """The spec's one-string spelling (``open_clip:RN50/openai``, ``st:<id>``, ``tiny:clip``, a dir)."""
        name = self.model.name
        if self.kind == "open_clip":
            if self.loads_with_platform_loader:
                return name
            return f"open_clip:{name}" + (f"/{self.pretrained}" if self.pretrained else "")
        if Path(name).expanduser().is_dir():
            return name
        return f"{'hf' if self.kind == 'hf_vision' else 'st'}:{name}"

    @property
    def loads_with_platform_loader(self) -> bool:
        """``tiny:clip`` and local open_clip directories load through `explab.models.load_model`."""
        return self.kind == "open_clip" and self.model.kind == "clip"


def parse_encoder_name(name: str) -> tuple[EncoderKind, str, str | None]:
    """``name`` → (kind, model name, open_clip pretrained tag); a `ConfigError` names the schemes."""
    if name.startswith("tiny:"):
        if name != "tiny:clip":
            raise ConfigError(f"encoder {name!r}: the only tiny encoder is tiny:clip")
        return "open_clip", name, None
    if name.startswith("open_clip:"):
        rest = name.removeprefix("open_clip:")
        if rest.startswith("hf-hub:"):  # open_clip:hf-hub:org/repo names config and weights at once
            return "open_clip", rest, None
        arch, _, pretrained = rest.partition("/")
        return "open_clip", arch, pretrained or None
    if name.startswith("hf:"):
        return "hf_vision", name.removeprefix("hf:"), None
    if name.startswith("st:"):
        return "sentence_transformers", name.removeprefix("st:"), None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip", name, None
        if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
            return "sentence_transformers", name, None
        if (path / "config.json").is_file():
            return "hf_vision", name, None
        raise ConfigError(f"encoder directory {str(path)!r} has no open_clip_config.json, modules.json or "
                          "config.json: point at a saved open_clip, sentence-transformers or HF model")
    raise ConfigError(f"encoder {name!r} is not recognised: use tiny:clip, open_clip:<arch>/<pretrained>, "
                      "hf:<vision model id>, st:<sentence-transformers id> or an existing model directory")


class Encoder:
    """A loaded frozen encoder: ``encode(items, modality) -> (n, d) float32``.

    ``items`` are strings for ``text`` and images (anything `explab.images.to_pil` reads) for
    ``image``. `load_encoder` builds one; the embedding pipeline holds one per actor.
    """

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.kind = spec.kind
        self.device = resolve_device(spec.model)
        self.dtype = resolve_dtype(spec.model, self.device)
        self.modalities: tuple[str, ...]
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None
        try:
            getattr(self, f"_load_{self.kind}")()
        except ExplabError:
            raise
        except Exception as err:  # hub errors, bad directories, missing weights
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExplabError(f"could not load encoder {spec.name!r} ({type(err).__name__}: {reason}): "
                              "check the name, revision and network/cache, or use a local directory") from None

    # -- loading
    def _load_open_clip(self) -> None:
        if self.spec.loads_with_platform_loader:  # tiny:clip or a local open_clip directory
            from explab.models.loader import load_model

            model = self.spec.model.model_copy(update={"device": str(self.device),
                                                       "dtype": dtype_name(self.dtype)})
            loaded = load_model(model)
            self.model, self.tokenizer, self.processor = loaded.model, loaded.tokenizer, loaded.processor
        else:
            import open_clip

            arch = self.spec.model.name
            precision = {"float32": "fp32", "float16": "pure_fp16", "bfloat16": "pure_bf16"}[dtype_name(self.dtype)]
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=self.spec.pretrained, precision=precision, device=self.device)
            self.model, self.processor = model.eval(), preprocess
            self.tokenizer = open_clip.get_tokenizer(arch)
        self.modalities = ("image", "text")

    def _load_hf_vision(self) -> None:
        from transformers import AutoImageProcessor, AutoModel

        where = self.spec.model.name
        common = {"revision": self.spec.model.revision, "trust_remote_code": self.spec.model.trust_remote_code}
        model = AutoModel.from_pretrained(where, dtype=self.dtype, **common)
        self.model = model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(where, **common)
        self.modalities = ("image",)

    def _load_sentence_transformers(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(self.spec.model.name, device=str(self.device),
                                         revision=self.spec.model.revision,
                                         trust_remote_code=self.spec.model.trust_remote_code,
                                         model_kwargs={"dtype": self.dtype})
        self.model.eval()
        self.modalities = ("text",)

    # -- encoding
    def encode(self, items: Sequence[Any], modality: Modality) -> np.ndarray:
        import torch

        if modality not in self.modalities:
            raise ExplabError(f"encoder {self.spec.name!r} has no {modality} tower: it encodes "
                              f"{' and '.join(self.modalities)}")
        if len(items) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        with torch.inference_mode():
            out = getattr(self, f"_{self.kind}_{modality}")(list(items))
        out = out.float()
        if self.spec.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def _open_clip_image(self, images: list[Any]) -> Any:
        import torch

        pixels = torch.stack([self.processor(to_pil(im)) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)

    def _open_clip_text(self, texts: list[str]) -> Any:
        tokens = self.tokenizer([str(t) for t in texts]).to(self.device)
        return self.model.encode_text(tokens)

    def _hf_vision_image(self, images: list[Any]) -> Any:
        import torch

        pixels = self.processor(images=[to_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        if hasattr(self.model, "get_image_features"):
            feats = self.model.get_image_features(pixel_values=pixels)
            return feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        if self.spec.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ExplabError(f"encoder {self.spec.name!r} has no pooler output: use pooling cls or mean")
            return out.pooler_output
        cls = hidden[:, 0]
        skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        mean = hidden[:, skip:].mean(dim=1) if hidden.shape[1] > skip else cls
        return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=-1)}[self.spec.pooling]

    def _sentence_transformers_text(self, texts: list[str]) -> Any:
        return self.model.encode([str(t) for t in texts], prompt=self.spec.prompt, batch_size=len(texts),
                                 convert_to_tensor=True, show_progress_bar=False)


def load_encoder(spec: EncoderSpec | str | dict[str, Any]) -> Encoder:
    """Load ``spec`` in this process (the embedding pipeline's actors do the same)."""
    return Encoder(EncoderSpec.of(spec))
