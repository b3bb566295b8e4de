"""Renderers: descriptors to images, N per descriptor, one fixed seed per image slot.

The job picks one by ``renderer.kind`` (the seam where tests inject a deterministic double):

- ``diffuser`` (the method): the shared `Diffuser` server renders every (descriptor, seed) pair;
  the requests of one call go out together, so the server batches them (and the requests of
  classes searched in parallel) into pipeline calls;
- ``words``: `WordRenderer`, a deterministic painter for planted tests: each listed word in a
  descriptor paints a region (background ring or centre) in a colour, over seeded grey noise.
  It knows nothing of any classifier; it is the "test renderer" of the issue.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from explab.config import Section
from explab.models import ModelSpec
from explab.seeds import rng_for
from explab.servers import ServerOptions

COLOUR_RGB = {"red": (200, 40, 40), "green": (40, 170, 50), "blue": (40, 70, 210)}


class WordPaint(Section):
    region: Literal["background", "center"]
    colour: Literal["red", "green", "blue"]


def default_words() -> dict[str, WordPaint]:
    water = {w: WordPaint(region="background", colour="blue") for w in ("water", "lake", "sea", "ocean", "river")}
    land = {w: WordPaint(region="background", colour="green") for w in ("forest", "grass", "meadow", "tree")}
    return {**water, **land, "red": WordPaint(region="center", colour="red")}


class RendererConfig(Section):
    kind: Literal["diffuser", "words"] = "diffuser"
    model: ModelSpec = ModelSpec(name="black-forest-labs/FLUX.1-schnell")
    server: ServerOptions = ServerOptions()
    steps: int = Field(4, ge=1)  # FLUX.1-schnell / SDXL-Turbo are few-step models
    guidance: float = 0.0
    size: tuple[int, int] | None = None  # (height, width); None: the pipeline's default
    negative_prompt: str | None = None  # Stable Diffusion only
    max_sequence_length: int | None = Field(256, ge=1, le=512)  # FLUX's T5 length (ignored for SD)
    words: dict[str, WordPaint] = Field(default_factory=default_words)  # kind words: word -> painted region
    image_size: int = Field(32, ge=8)  # kind words: square image side


class Renderer(Protocol):
    def render(self, descriptors: Sequence[str], seeds: Sequence[int]) -> list[list[np.ndarray]]:
        """For each descriptor, one uint8 (H, W, 3) image per seed (in seed order)."""
        ...


class DiffuserRenderer:
    """Text-to-image through the shared `Diffuser` (a `ServerHandle` of kind diffuser)."""

    def __init__(self, handle: Any, cfg: RendererConfig):
        self.handle, self.cfg = handle, cfg
        self.family = handle.describe().get("family")

    def render(self, descriptors: Sequence[str], seeds: Sequence[int]) -> list[list[np.ndarray]]:
        common: dict[str, Any] = {"steps": self.cfg.steps, "guidance": self.cfg.guidance, "size": self.cfg.size}
        if self.family == "flux":
            common["max_sequence_length"] = self.cfg.max_sequence_length
        elif self.cfg.negative_prompt is not None:
            common["negative_prompt"] = self.cfg.negative_prompt
        requests = [{"prompt": d, "seed": int(s), **common} for d in descriptors for s in seeds]
        results = self.handle.generate(requests) if requests else []
        n = len(seeds)
        return [[np.asarray(r.image) for r in results[i * n:(i + 1) * n]] for i in range(len(descriptors))]


class WordRenderer:
    """Deterministic painter (see the module docstring): the same (descriptor, seed) gives the same image."""

    def __init__(self, words: dict[str, WordPaint], size: int = 32):
        self.words, self.size = {w.lower(): p for w, p in words.items()}, size

    def paint(self, descriptor: str, seed: int) -> np.ndarray:
        rng = rng_for("words-renderer", descriptor, seed)
        s = self.size
        image = rng.normal(128, 12, size=(s, s, 3))
        center = np.zeros((s, s), dtype=bool)
        center[s // 4: s - s // 4, s // 4: s - s // 4] = True
        for token in re.findall(r"[a-z]+", descriptor.lower()):
            paint = self.words.get(token)
            if paint is not None:
                where = center if paint.region == "center" else ~center
                image[where] = np.asarray(COLOUR_RGB[paint.colour]) + rng.normal(0, 12, size=(int(where.sum()), 3))
        return np.clip(image, 0, 255).astype(np.uint8)

    def render(self, descriptors: Sequence[str], seeds: Sequence[int]) -> list[list[np.ndarray]]:
        return [[self.paint(d, int(s)) for s in seeds] for d in descriptors]


def build_renderer(cfg: RendererConfig, ctx: Any | None) -> Renderer:
    """``ctx``: the run's context (``ctx.model`` opens the shared Diffuser); not needed for ``words``."""
    if cfg.kind == "words":
        return WordRenderer(cfg.words, cfg.image_size)
    return DiffuserRenderer(ctx.model(cfg.model, "diffuser", cfg.server), cfg)
