"""Descriptor deduplication: exact (normalised text) and by text-embedding cosine similarity.

One `Deduper` per class search. A descriptor is accepted when its normalised text is new and, with
an encoder, its L2-normalised text embedding has cosine ≤ ``threshold`` to every descriptor
accepted before (the paper's design: 0.9). Embeddings come from `explab.models.load_encoder` (any
text tower: ``st:<sentence-transformers id>``, ``open_clip:<arch>/<tag>``, ``tiny:clip``); one
encoder is shared by the classes searched in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from explab.config import Section
from explab.models import EncoderSpec, load_encoder
from jobs.unbox.proposers import key


class DedupConfig(Section):
    encoder: EncoderSpec | None = EncoderSpec.of("st:sentence-transformers/all-MiniLM-L6-v2")  # None: exact only
    threshold: float = Field(0.9, gt=-1.0, le=1.0)


class TextEmbedder:
    """A thread-safe ``embed(texts) -> (n, d)`` of unit vectors over one loaded text encoder."""

    def __init__(self, spec: EncoderSpec):
        self.encoder, self.lock = load_encoder(spec), threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self.lock:
            v = np.asarray(self.encoder.encode(list(texts), "text"), dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)


class Deduper:
    def __init__(self, embedder: TextEmbedder | None, threshold: float):
        self.embedder, self.threshold = embedder, threshold
        self.keys: set[str] = set()
        self.vectors = np.zeros((0, 0))

    def accept(self, candidates: Sequence[str], limit: int) -> list[str]:
        """The first ``limit`` candidates that duplicate nothing accepted (now or before); registers them."""
        first = {}
        for c in candidates:  # exact duplicates (same normalised text) never reach the encoder
            if key(c) not in self.keys:
                first.setdefault(key(c), c)
        fresh = list(first.values())
        vectors = self.embedder.embed(fresh) if self.embedder is not None and fresh else None
        out: list[str] = []
        for i, c in enumerate(fresh):
            if len(out) == limit:
                break
            if vectors is not None:
                v = vectors[i]
                if len(self.vectors) and float((self.vectors @ v).max()) > self.threshold:
                    continue
                self.vectors = v[None] if not len(self.vectors) else np.vstack([self.vectors, v])
            self.keys.add(key(c))
            out.append(c)
        return out
