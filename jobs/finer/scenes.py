"""Synthetic scenes with known scene graphs: coloured shapes on a grid, rendered in code.

A `Scene` is a few `Obj`s (shape, colour, size) in distinct cells of a ``grid x grid`` layout; every
object has its own shape and its own colour, so "the red circle" names one object. The scene graph
is the scene itself: objects, their attributes, and the spatial relations between any two objects
(`relations`, read off the cells). `render` draws it as an HxWx3 uint8 image (numpy only), so every
benchmark item and training pair built from it has an answer that can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from explab.config import Section
from explab.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "column")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")


class SceneConfig(Section):
    """The synthetic world: vocabulary, layout and how many objects a scene holds."""

    colours: list[str] = Field(default_factory=lambda: list(COLOURS)[:6], min_length=2)
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES), min_length=1)  # 1: a colour-only world
    sizes: list[str] = Field(default_factory=lambda: list(SIZES), min_length=1)
    grid: int = Field(3, ge=2, le=6)  # cells per side
    min_objects: int = Field(2, ge=1)
    max_objects: int = Field(3, ge=1)
    image_size: int = Field(32, ge=16)
    noise: float = Field(0.0, ge=0.0)  # std of per-pixel Gaussian noise (0-255 scale)

    @model_validator(mode="after")
    def _check(self) -> SceneConfig:
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        unknown += [s for s in self.sizes if s not in SIZES]
        if unknown:
            raise ValueError(f"unknown vocabulary {unknown}: choose from {list(COLOURS)}, {list(SHAPES)}, "
                             f"{list(SIZES)}")
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects is below min_objects: raise max_objects")
        room = min(len(self.colours), len(self.shapes), self.grid * self.grid)
        if self.max_objects > room:
            raise ValueError(f"max_objects {self.max_objects} exceeds what the vocabulary and grid hold ({room}): "
                             "lower max_objects or add colours/shapes/cells")
        return self


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects in cells. ``stated`` (a graph read from a caption, `captions.parse_graph`): the relations as
    (subject index, relation, object index) triples, the only true ones; None: read off the cells."""

    objects: tuple[Obj, ...]
    grid: int
    stated: tuple[tuple[int, str, int], ...] | None = None

    def related(self, a: Obj, rel: str, b: Obj) -> bool:
        """Whether ``a rel b`` holds: a stated triple, or the cells' relation (`relation_holds`)."""
        if self.stated is None:
            return relation_holds(a, rel, b)
        return (self.objects.index(a), rel, self.objects.index(b)) in self.stated

    def find(self, shape: str | None = None, colour: str | None = None, size: str | None = None) -> list[Obj]:
        """The objects matching every given attribute."""
        return [o for o in self.objects
                if (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
                and (size is None or o.size == size)]

    def to_dict(self) -> dict:
        return {"grid": self.grid, "objects": [o.__dict__ for o in self.objects],
                "stated": None if self.stated is None else [list(t) for t in self.stated]}


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    """Spatial relations between cells: strictly left/right by column, above/below by row."""
    if rel == "left of":
        return a.col < b.col
    if rel == "right of":
        return a.col > b.col
    if rel == "above":
        return a.row < b.row
    if rel == "below":
        return a.row > b.row
    raise ConfigError(f"unknown relation {rel!r}: use one of {list(RELATIONS)}")


def relations(scene: Scene) -> list[tuple[Obj, str, Obj]]:
    """Every true (subject, relation, object) triple of the scene."""
    return [(a, r, b) for a in scene.objects for b in scene.objects if a is not b
            for r in RELATIONS if scene.related(a, r, b)]


def random_scene(rng: np.random.Generator, config: SceneConfig) -> Scene:
    """Distinct shapes, colours and cells per object, drawn from ``rng``."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = rng.choice(config.shapes, size=n, replace=False)
    colours = rng.choice(config.colours, size=n, replace=False)
    cells = rng.choice(config.grid * config.grid, size=n, replace=False)
    objs = tuple(Obj(shape=str(s), colour=str(c), size=str(rng.choice(config.sizes)),
                     row=int(k) // config.grid, col=int(k) % config.grid)
                 for s, c, k in zip(shapes, colours, cells, strict=True))
    return Scene(objects=objs, grid=config.grid)


def _mask(shape: str, n: int, scale: float) -> np.ndarray:
    """A boolean n x n mask of ``shape`` filling ``scale`` of the cell."""
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    c = n / 2
    r = scale * n / 2
    dy, dx = ys - c, xs - c
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "triangle":
        top, bottom = c - r, c + r
        half = (ys - top) / (2 * r) * r
        return (ys >= top) & (ys <= bottom) & (np.abs(dx) <= half)
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= r**2) & (d >= (0.55 * r) ** 2)
    if shape == "bar":
        return (np.abs(dy) <= r * 0.4) & (np.abs(dx) <= r)
    if shape == "column":
        return (np.abs(dx) <= r * 0.4) & (np.abs(dy) <= r)
    if shape == "cross":
        arm = r * 0.35
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ConfigError(f"unknown shape {shape!r}: use one of {list(SHAPES)}")


def render(scene: Scene, size: int = 32, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a ``size x size x 3`` uint8 image on a dark grey background."""
    image = np.full((size, size, 3), 40.0)
    cell = size // scene.grid
    for o in scene.objects:
        scale = 0.95 if o.size == "large" else 0.55
        mask = _mask(o.shape, cell, scale)
        y0, x0 = o.row * cell, o.col * cell
        image[y0:y0 + cell, x0:x0 + cell][mask] = COLOURS[o.colour]
    if noise > 0:
        image = image + (rng or np.random.default_rng(0)).normal(0.0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
