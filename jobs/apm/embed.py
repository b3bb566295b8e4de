"""Text embedders for retrieval (RAG), the textual optimizer's proxy score and the router's features.

- ``hashing``: signed feature hashing of lower-cased words and word bigrams, log term frequency,
  L2-normalised. No model, deterministic, offline: the default for tests and tiny runs.
- ``hooked``: mean- or last-token-pooled hidden states at a hook point (default ``final``) from the
  shared HookedModel server of ``model`` (e.g. Qwen/Qwen3-Embedding-0.6B with last pooling).
- ``sentence_transformers``: a sentence-transformers model through the platform's encoders
  (`explab.models.load_encoder`), if that package is installed.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from explab.config import Section
from explab.errors import ConfigError
from explab.interventions import Capture, PointName
from explab.models import EncoderSpec, ModelSpec, load_encoder
from explab.servers import ServerOptions
from explab.vectors import unit_rows

_WORD = re.compile(r"[a-z0-9']+")


class EmbedderConfig(Section):
    kind: Literal["hashing", "hooked", "sentence_transformers"] = "hashing"
    dim: int = Field(1024, ge=16)  # hashing only
    model: ModelSpec | None = None  # hooked / sentence_transformers
    point: PointName = "final"  # hooked: the hook point whose activations are pooled
    pooling: Literal["mean", "last"] = "mean"
    server: ServerOptions = ServerOptions()

    @model_validator(mode="after")
    def _needs_model(self) -> EmbedderConfig:
        if self.kind != "hashing" and self.model is None:
            raise ValueError(f"embedder kind {self.kind!r} needs `model` (e.g. model: {{name: tiny:llama}})")
        return self


class HashingEmbedder:
    def __init__(self, dim: int = 1024):
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            feats = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            counts: dict[int, float] = {}
            for f in feats:
                h = zlib.crc32(f.encode())
                idx, sign = h % self.dim, 1.0 if (h >> 31) & 1 else -1.0
                counts[idx] = counts.get(idx, 0.0) + sign
            for idx, c in counts.items():
                out[row, idx] = np.sign(c) * np.log1p(abs(c))
        return unit_rows(out)


class HookedEmbedder:
    """Pooled activations from the shared HookedModel server (picklable: it holds a server handle)."""

    def __init__(self, handle: Any, point: str, pooling: str):
        self.handle, self.point, self.pooling = handle, point, pooling

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        capture = [Capture(point=self.point)]
        results = self.handle.forward([{"text": t or " ", "interventions": capture} for t in texts])
        acts = [np.asarray(r.captures[self.point], dtype=np.float32) for r in results]
        pooled = np.stack([a.mean(axis=0) if self.pooling == "mean" else a[-1] for a in acts])
        return unit_rows(pooled)


class EncoderEmbedder:
    """A sentence-transformers model as a platform encoder (`explab.models.load_encoder`), loaded on first use.

    Picklable: the loaded encoder is dropped when pickled and loaded again where it is used.
    """

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self._encoder: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_encoder": None}

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = load_encoder(self.spec)
        return unit_rows(self._encoder.encode(list(texts), "text"))


def make_embedder(cfg: EmbedderConfig, ctx: Any) -> Any:
    if cfg.kind == "hashing":
        return HashingEmbedder(cfg.dim)
    if cfg.kind == "hooked":
        return HookedEmbedder(ctx.model(cfg.model, "hooked", cfg.server), cfg.point, cfg.pooling)
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise ConfigError("embedder.kind: sentence_transformers is not installed: pip install sentence-transformers, "
                          "or use kind: hooked / hashing") from None
    return EncoderEmbedder(EncoderSpec(model=cfg.model, kind="sentence_transformers"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``a`` and ``b`` (both already L2-normalised)."""
    return a @ b.T
