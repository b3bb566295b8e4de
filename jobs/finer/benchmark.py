"""Benchmark construction: scene graph -> positive query -> minimal-edit negatives -> paired MC items.

A `Probe` is one positive query about an image (true for its scene graph) with four negatives, each a
single-element edit that is false for the scene. From a probe come two 5-option multiple-choice rows
on the same image (`items`):

- ``<kind>_pos`` asks the positive: the right option accepts it ("Yes, I can see P."), the four
  distractors reject it for one of the negatives ("No, but I can see N_j.");
- ``<kind>_neg`` asks the first negative N_1 (a fine-grained negative query): the right option rejects
  it and names the truth ("No, but I can see P."), the distractors are the hallucination that accepts
  it ("Yes, I can see N_1.") and three rejections that name other false edits of N_1.

Every option names a query one edit away from the question, so only the image decides the answer.
``wh`` probes ask the colour of an object; their negative asks about an object that is not there.
Training pairs (`training_pairs`) come from the same probes: the authors' "pos-or-neg" mode asks the
positive or the negative question at random, with the accepted and the rejected answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from explab.config import Section
from explab.errors import ConfigError
from jobs.finer import queries as q
from jobs.finer.scenes import COLOURS, RELATIONS, SHAPES, SIZES, Scene, SceneConfig, random_scene, relations, render

LETTERS = "ABCDE"
N_OPTIONS = 5
MC_PROMPT = ("Select the best answer for the multiple-choice question.\n{question}\n{options}\n"
             "Please answer with a single capital letter (A, B, C, D, or E):")


@dataclass(frozen=True)
class Probe:
    image_id: str
    kind: str
    positive: q.Query
    negatives: tuple[q.Query, ...]  # 4 single-element edits of `positive`, false; [0] is asked in the neg row
    neg_distractors: tuple[q.Query, ...]  # 3 single-element edits of negatives[0], false, not the positive


class BuildConfig(Section):
    """Which probes each scene yields and how the MC rows are laid out."""

    kinds: list[Literal["multi_obj", "multi_attr", "multi_rel", "wh"]] = Field(
        default_factory=lambda: list(q.KINDS), min_length=1)
    max_objects_named: int = Field(3, ge=1)  # multi_obj / multi_attr: 1..this many objects
    max_relations: int = Field(3, ge=1, le=3)  # multi_rel: 1..this many relations (the authors: <= 3)
    shuffle_options: bool = True  # a seeded order per row; False: the order `option_order` names
    # with shuffle_options False: "alphabetical" (by option text) or "vocabulary" (by the elements the option
    # names, in the world's fixed order of colours, shapes, sizes, relations: with one element varying, as in
    # a one-object colour world, option k always names the k-th colour)
    option_order: Literal["alphabetical", "vocabulary"] = "alphabetical"


def vocabulary(scene_config: SceneConfig) -> dict[str, list[str]]:
    return {"shape": list(scene_config.shapes), "colour": list(scene_config.colours),
            "size": list(scene_config.sizes), "relation": q.relations_vocab()}


def _positive(scene: Scene, kind: str, build: BuildConfig, sized: bool, rng: np.random.Generator) -> q.Query | None:
    objs = list(scene.objects)
    if kind in ("multi_obj", "multi_attr"):
        k = int(rng.integers(1, min(len(objs), build.max_objects_named) + 1))
        chosen = [objs[i] for i in rng.permutation(len(objs))[:k]]
        if kind == "multi_obj":
            return tuple(("obj", o.shape) for o in chosen)
        return tuple(("attr", o.shape, o.colour, o.size if sized else None) for o in chosen)
    if kind == "multi_rel":
        triples = [(a.shape, r, b.shape) for a, r, b in relations(scene)]
        if not triples:
            return None
        k = int(rng.integers(1, min(len(triples), build.max_relations) + 1))
        return tuple(("rel", *triples[i]) for i in sorted(rng.permutation(len(triples))[:k]))
    o = objs[int(rng.integers(len(objs)))]
    return (("wh", o.shape, o.colour),)


def probe(scene: Scene, image_id: str, kind: str, vocab: dict[str, list[str]], build: BuildConfig,
          rng: np.random.Generator) -> Probe | None:
    """One probe of ``kind`` on ``scene``, or None when the scene cannot give four false edits."""
    positive = _positive(scene, kind, build, len(vocab["size"]) > 1, rng)
    if positive is None:
        return None
    false = [e for e in q.single_edits(positive, vocab) if not q.holds(scene, e)]
    order = rng.permutation(len(false))
    false = [false[i] for i in order]
    if kind == "wh":
        premise = [e for e in false if e[0][1] != positive[0][1] and not scene.find(shape=e[0][1])]
        colour = [e for e in false if e[0][1] == positive[0][1]]
        if not premise or len(colour) < 3:
            return None
        negatives = (premise[0], *colour[:3])
        asked = premise[0]
        shape = asked[0][1]
        others = [c for c in vocab["colour"] if c != positive[0][2]]
        distractors = tuple((("wh", shape, c),) for c in others[:3])
        return Probe(image_id, kind, positive, negatives, distractors)
    if len(false) < N_OPTIONS - 1:
        return None
    negatives = tuple(false[: N_OPTIONS - 1])
    asked = negatives[0]
    second = [e for e in q.single_edits(asked, vocab) if e != positive and not q.holds(scene, e)]
    if len(second) < N_OPTIONS - 2:
        return None
    picks = rng.permutation(len(second))[: N_OPTIONS - 2]
    return Probe(image_id, kind, positive, negatives, tuple(second[i] for i in picks))


def _named_options(p: Probe, polarity: str) -> tuple[str, list[tuple[str, q.Query]]]:
    """The question and its five options with the query each option names, the right one first."""
    if polarity == "pos":
        if p.kind == "wh":
            wrong = [(q.yes(n), n) for n in p.negatives[1:]] + [(q.absent(p.positive), ())]
        else:
            wrong = [(q.no_but(p.positive, n), n) for n in p.negatives]
        return q.ask(p.positive), [(q.yes(p.positive), p.positive), *wrong]
    asked = p.negatives[0]
    if p.kind == "wh":
        claimed = ((*asked[0][:2], p.positive[0][2]),)
        wrong = [(q.yes(claimed), claimed)] + [(q.yes(d), d) for d in p.neg_distractors]
    else:
        wrong = [(q.yes(asked), asked)] + [(q.no_but(asked, d), d) for d in p.neg_distractors]
    return q.ask(asked), [(q.no_but(asked, p.positive), p.positive), *wrong]


def row_options(p: Probe, polarity: str) -> tuple[str, list[str]]:
    """The question and its five options, the right one first."""
    question, named = _named_options(p, polarity)
    return question, [text for text, _ in named]


_WORLD_ORDER = {w: i for i, w in enumerate([*COLOURS, *SHAPES, *SIZES, *RELATIONS])}


def _world_key(text_and_query: tuple[str, q.Query]) -> tuple[Any, ...]:
    """Sort key of an option: the world-order indices of the elements its query names, then its text."""
    text, query = text_and_query
    return (tuple(tuple(_WORLD_ORDER.get(x, -1) for x in clause[1:] if x is not None) for clause in query), text)


def _order(named: list[tuple[str, q.Query]], rng: np.random.Generator, build: BuildConfig) -> np.ndarray:
    """The permutation that lays out a row's options (``order[k]`` = index into ``named`` shown k-th)."""
    if build.shuffle_options:
        return rng.permutation(N_OPTIONS)
    if build.option_order == "vocabulary":
        return np.asarray(sorted(range(len(named)), key=lambda i: _world_key(named[i])))
    return np.argsort([text for text, _ in named])


def mc_prompt(question: str, choices: list[str]) -> str:
    """The benchmark's multiple-choice prompt, as the authors word it."""
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return MC_PROMPT.format(question=question, options=options)


def _encode(query: q.Query) -> str:
    return json.dumps([list(c) for c in query])


def items(p: Probe, rng: np.random.Generator, build: BuildConfig, split: str, source: str) -> list[dict[str, Any]]:
    """The two MC rows of a probe (pos first), with their provenance."""
    rows = []
    for polarity in ("pos", "neg"):
        question, named = _named_options(p, polarity)
        options = [text for text, _ in named]
        if len(set(options)) != N_OPTIONS:
            raise ConfigError(f"probe {p.image_id}/{p.kind} gave repeated options: enlarge the vocabulary")
        order = _order(named, rng, build)
        choices = [options[i] for i in order]
        asked = p.positive if polarity == "pos" else p.negatives[0]
        rows.append({
            "item_id": f"{p.image_id}-{p.kind}-{polarity}",
            "pair_id": f"{p.image_id}-{p.kind}",
            "image_id": p.image_id,
            "kind": p.kind,
            "polarity": polarity,
            "qtype": f"{p.kind}_{polarity}",
            "question": question,
            "choices": choices,
            "gt_index": int(np.flatnonzero(np.asarray(order) == 0)[0]),
            "granularity": q.granularity(asked),
            "positive": _encode(p.positive),
            "asked": _encode(asked),
            "negatives": json.dumps([json.loads(_encode(n)) for n in p.negatives]),
            "split": split,
            "source": source,
        })
    return rows


def training_pairs(p: Probe, image: Any, rng: np.random.Generator, mode: str, fmt: str,
                   build: BuildConfig) -> list[dict[str, Any]]:
    """Preference rows (trl's conversational format) from a probe on a training image.

    ``mode``: ``pon`` (the positive or the negative question, at random — the authors' main mode),
    ``both`` (both questions), ``neg`` (the negative question only). ``fmt``: ``answer`` (the authors'
    templates: accept "Yes, I can see P" / "No, but I can see P", reject the opposite claim) or
    ``letter`` (the MC row itself, the right letter over the hallucinated one)."""
    polarities = {"pon": [("pos", "neg")[int(rng.integers(2))]], "both": ["pos", "neg"], "neg": ["neg"]}[mode]
    out = []
    for polarity in polarities:
        if fmt == "letter":
            row = items(p, rng, build, "train", "synthetic")[0 if polarity == "pos" else 1]
            prompt = mc_prompt(row["question"], row["choices"])
            question, options = row_options(p, polarity)
            wrong = options[1] if polarity == "neg" else options[1 + int(rng.integers(N_OPTIONS - 1))]
            chosen, rejected = LETTERS[row["gt_index"]], LETTERS[row["choices"].index(wrong)]
        else:
            template = int(rng.integers(len(q.QUESTION_TEMPLATES)))
            asked = p.positive if polarity == "pos" else p.negatives[0]
            prompt = q.ask(asked, template)
            if polarity == "pos":
                other = p.negatives[int(rng.integers(1, len(p.negatives))) if p.kind == "wh" else 0]
                chosen = q.yes(p.positive)
                rejected = q.yes(other) if p.kind == "wh" else q.no_but(p.positive, other)
            else:
                chosen = q.no_but(asked, p.positive)
                rejected = q.yes(((*asked[0][:2], p.positive[0][2]),)) if p.kind == "wh" else q.yes(asked)
        out.append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "images": [image],
            "polarity": polarity,
            "kind": p.kind,
        })
    return out


@dataclass
class Synthetic:
    """Rendered scenes and their probes, by split."""

    images: dict[str, np.ndarray]
    scenes: dict[str, Scene]
    probes: dict[str, list[Probe]]  # split -> probes
    skipped: int  # (scene, kind) combinations that could not give four false edits


def synthetic(scene_config: SceneConfig, build: BuildConfig, n_images: dict[str, int], seed: int) -> Synthetic:
    """``n_images[split]`` scenes per split, each probed once per kind (seeded)."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(scene_config)
    images, scenes, probes, skipped = {}, {}, {}, 0
    for split, n in n_images.items():
        probes[split] = []
        for i in range(n):
            image_id = f"{split}-{i:05d}"
            scene = random_scene(rng, scene_config)
            scenes[image_id] = scene
            images[image_id] = render(scene, scene_config.image_size, scene_config.noise, rng)
            for kind in build.kinds:
                p = probe(scene, image_id, kind, vocab, build, rng)
                if p is None:
                    skipped += 1
                else:
                    probes[split].append(p)
    return Synthetic(images=images, scenes=scenes, probes=probes, skipped=skipped)
