"""Synthetic checkable VQA for the tiny config: rendered coloured shapes with colour / shape / count questions.

Every image (``size`` x ``size`` RGB, uint8) shows 1-3 copies of one shape (square, disc or triangle) in one
colour on a black background, at seeded positions. Three benchmarks ask about it, each with one
checkable answer:

- ``shapes_colour``: "What colour are the shapes?" with lettered options (multiple choice);
- ``shapes_count``: "How many shapes are there?" with lettered options (multiple choice);
- ``shapes_yesno``: "Is there a <shape>?" answered yes / no (POPE-style, half of them true).

Training and calibration rows are chat conversations about such images (question + the answer);
`text_corpus` gives plain text sentences describing scenes, for perplexity and text-only backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
SHAPES = ("square", "disc", "triangle")
LETTERS = "ABC"
BENCHMARKS = ("shapes_colour", "shapes_count", "shapes_yesno")


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    image: np.ndarray


@dataclass
class Item:
    """One VQA question. Closed (multiple choice, yes/no): ``options`` are the candidate answers (each scored
    by its first token), ``answer`` the index of the right one. Open (DocVQA, GQA, free-form MathVista):
    no options, ``answer`` -1, ``answers`` the accepted reference strings, scored on a greedy generation.
    ``group`` / ``category``: MME's image and category (its acc+ needs both questions of one image)."""

    benchmark: str
    question: str
    options: list[str]
    answer: int
    image: np.ndarray | None
    answers: list[str] = field(default_factory=list)
    group: str = ""
    category: str = ""

    @property
    def open(self) -> bool:
        return not self.options


def _draw(img: np.ndarray, shape: str, cy: int, cx: int, r: int, rgb: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    if shape == "square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    elif shape == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:  # an upward triangle: width grows with the row inside the box
        mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = rgb


def scene(rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene: 1-3 non-overlapping shapes of one kind and colour in cells of a 2x2 grid."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    count = int(rng.integers(1, 4))
    img = np.zeros((size, size, 3), dtype=np.uint8)
    cell = size // 2
    r = max(2, size // 8)
    for k in rng.permutation(4)[:count]:
        cy, cx = (k // 2) * cell + cell // 2, (k % 2) * cell + cell // 2
        _draw(img, shape, cy, cx, r, COLOURS[colour])
    return Scene(colour, shape, count, img)


def _mc(question: str, options: list[str]) -> str:
    listed = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question} {listed} Answer with the letter."


def items_of(s: Scene, rng: np.random.Generator, image: bool = True) -> list[Item]:
    """The three questions about one scene (options in a seeded order). Without ``image`` the question
    starts with the scene's description (checkable by a text-only model)."""
    colours = list(rng.permutation(list(COLOURS)))
    counts = [str(c) for c in rng.permutation([1, 2, 3])]
    asked = str(rng.choice(SHAPES)) if rng.random() < 0.5 else s.shape
    lead = "" if image else describe(s) + " "
    img = s.image if image else None
    return [
        Item("shapes_colour", lead + _mc("What colour are the shapes?", colours), list(LETTERS[:3]),
             colours.index(s.colour), img),
        Item("shapes_count", lead + _mc("How many shapes are there?", counts), list(LETTERS[:3]),
             counts.index(str(s.count)), img),
        Item("shapes_yesno", lead + f"Is there a {asked}? Answer yes or no.", ["yes", "no"],
             0 if asked == s.shape else 1, img),
    ]


def vqa_items(n_scenes: int, seed: int, size: int = 32, image: bool = True) -> list[Item]:
    """``n_scenes`` scenes x the three benchmarks."""
    rng = np.random.default_rng(seed)
    return [it for _ in range(n_scenes) for it in items_of(scene(rng, size), rng, image)]


def messages(item: Item, with_answer: bool) -> list[dict[str, Any]]:
    """Chat turns for ``item`` (user turn with its image part, if any; the answer as the assistant turn)."""
    content: Any = item.question
    if item.image is not None:
        content = [{"type": "image"}, {"type": "text", "text": item.question}]
    turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if with_answer:
        turns.append({"role": "assistant", "content": item.answers[0] if item.open else item.options[item.answer]})
    return turns


def training_rows(n_scenes: int, seed: int, size: int = 32, image: bool = True) -> list[dict[str, Any]]:
    """Rows for `explab.train.supervised_loop`: ``{"messages", "images"}`` (answers as responses)."""
    rows = []
    for it in vqa_items(n_scenes, seed, size, image):
        row: dict[str, Any] = {"messages": messages(it, True)}
        if image:
            row["images"] = [it.image]
        rows.append(row)
    return rows


def describe(s: Scene) -> str:
    plural = "s" if s.count > 1 else ""
    return f"The picture shows {s.count} {s.colour} {s.shape}{plural} on a black background."


def text_corpus(n: int, seed: int) -> list[str]:
    """``n`` sentences describing random scenes (a small generated corpus for perplexity and KD)."""
    rng = np.random.default_rng(seed)
    return [describe(scene(rng, 8)) for _ in range(n)]
