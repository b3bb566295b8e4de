"""`ModelSpec`: how every job and server names a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Kind = Literal["auto", "causal_lm", "vlm", "clip", "vae", "diffusion"]


class ModelSpec(BaseModel):
    """A model named by Hugging Face id, local path, ``tiny:<family>`` preset, or GGUF checkpoint.

    A GGUF checkpoint is a ``.gguf`` file path, a directory plus ``gguf_file``, or a packaged short
    name such as ``smollm2-135m-instruct`` (see `explab.models.gguf`).

    ``tiny`` holds config overrides for a ``tiny:`` preset (e.g. ``{"num_hidden_layers": 6,
    "hidden_size": 512}``) so benchmarks can build a bigger random model of the same family.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="HF id, local dir, tiny:<family>, .gguf file, or a packaged short name")
    gguf_file: str | None = Field(default=None, description="the .gguf file inside the directory `name`")
    dtype: Dtype = "auto"
    revision: str | None = None
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1"
    trust_remote_code: bool = False
    kind: Kind = "auto"
    tiny: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, value: ModelSpec | str | dict[str, Any]) -> ModelSpec:
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        return cls.model_validate(value)

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith("tiny:")

    @property
    def family(self) -> str | None:
        return self.name.split(":", 1)[1] if self.is_tiny else None

    @property
    def key(self) -> str:
        """A short stable identifier (used to name shared server actors)."""
        payload = json.dumps(self.model_dump(), sort_keys=True, default=str)
        digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)[-40:]
        return f"{base}-{digest}"
