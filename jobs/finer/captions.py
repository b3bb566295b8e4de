"""Benchmark construction from captions through an LLM: the served `Generator` reads each caption into a
scene graph (objects with colour and size, relations between them) as JSON; `parse_graph` accepts only a
well-formed graph in the world's vocabulary, and everything else (no JSON, wrong keys, unknown words,
dangling relations) is a skipped caption, counted with its reason, never a crash. A parsed graph is a
`Scene` whose relations are the stated ones (closed world: what the caption does not state is false), so
the minimal-edit negatives and the paired items come from `benchmark.probe` / `benchmark.items` exactly as
for synthetic scenes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import numpy as np

from explab.errors import ExplabError
from jobs.finer.benchmark import BuildConfig, Probe, probe
from jobs.finer.scenes import Obj, Scene

GRAPH_PROMPT = (
    "Read the image caption and write its scene graph as one JSON object and nothing else, in the form\n"
    '{{"objects": [{{"name": "<object>", "colour": "<colour>", "size": "<size>"}}], '
    '"relations": [{{"subject": "<object>", "relation": "<relation>", "object": "<object>"}}]}}\n'
    "Use only these words. Objects: {shapes}. Colours: {colours}. Sizes: {sizes}. Relations: {relations}.\n"
    "List every object once; list only relations the caption states.\n"
    "Caption: {caption}"
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class GraphError(ExplabError):
    """An LLM's scene-graph output that the strict parser refuses."""


def graph_prompt(caption: str, vocab: dict[str, list[str]]) -> str:
    return GRAPH_PROMPT.format(caption=caption, shapes=", ".join(vocab["shape"]), colours=", ".join(vocab["colour"]),
                               sizes=", ".join(vocab["size"]), relations=", ".join(vocab["relation"]))


def _word(entry: dict[str, Any], key: str, allowed: list[str], where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise GraphError(f"{where}: {key} {value!r} is not one of {allowed}")
    return value.strip().lower()


def parse_graph(text: str, vocab: dict[str, list[str]]) -> Scene:
    """The scene graph in ``text`` (one JSON object, optionally in a ```json fence) as a `Scene`.

    Raises `GraphError` unless ``text`` is exactly ``{"objects": [...], "relations": [...]}`` with at least
    one object, every object a distinct ``name`` of the vocabulary with a ``colour`` (and ``size``, default
    the first size) of the vocabulary, every relation between two listed, different objects."""
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise GraphError(f"not JSON ({err.msg} at {err.pos})") from None
    if not isinstance(data, dict) or set(data) - {"objects", "relations"} or "objects" not in data:
        raise GraphError(f"expected an object with keys objects[, relations], got {str(data)[:80]!r}")
    entries, triples = data["objects"], data.get("relations", [])
    if not isinstance(entries, list) or not entries or not isinstance(triples, list):
        raise GraphError("objects must be a non-empty list and relations a list")
    objects: list[Obj] = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise GraphError(f"object {k} is not a JSON object")
        name = _word(entry, "name", vocab["shape"], f"object {k}")
        colour = _word(entry, "colour", vocab["colour"], f"object {k}")
        size = _word(entry, "size", vocab["size"], f"object {k}") if entry.get("size") else vocab["size"][0]
        objects.append(Obj(shape=name, colour=colour, size=size, row=0, col=k))
    names = [o.shape for o in objects]
    if len(set(names)) != len(names):
        raise GraphError(f"objects {names} repeat a name: each object once")
    stated = []
    for k, entry in enumerate(triples):
        if not isinstance(entry, dict):
            raise GraphError(f"relation {k} is not a JSON object")
        subject = _word(entry, "subject", names, f"relation {k}")
        target = _word(entry, "object", names, f"relation {k}")
        rel = _word(entry, "relation", vocab["relation"], f"relation {k}")
        if subject == target:
            raise GraphError(f"relation {k} relates {subject!r} to itself")
        stated.append((names.index(subject), rel, names.index(target)))
    return Scene(objects=tuple(objects), grid=1, stated=tuple(sorted(set(stated))))


def extract(generator: Any, captions: dict[str, str], vocab: dict[str, list[str]],
            max_tokens: int = 256) -> tuple[dict[str, Scene], Counter]:
    """Greedy scene graphs of ``captions`` (image id -> caption) from a served `Generator`; the refused
    outputs are counted by reason (the parser's message up to its first colon)."""
    ids = list(captions)
    requests = [{"messages": [{"role": "user", "content": graph_prompt(captions[i], vocab)}],
                 "params": {"temperature": 0.0, "max_tokens": max_tokens}} for i in ids]
    graphs: dict[str, Scene] = {}
    skipped: Counter = Counter()
    for image_id, result in zip(ids, generator.generate(requests) if ids else [], strict=True):
        try:
            graphs[image_id] = parse_graph(result.completions[0].text, vocab)
        except GraphError as err:
            skipped[str(err).split(":")[0].split(" (")[0]] += 1
    return graphs, skipped


def caption_probes(graphs: dict[str, Scene], build: BuildConfig, vocab: dict[str, list[str]],
                   rng: np.random.Generator) -> tuple[list[Probe], int]:
    """One probe per graph and kind, as for synthetic scenes; how many (graph, kind) gave none."""
    probes, skipped = [], 0
    for image_id, scene in graphs.items():
        for kind in build.kinds:
            p = probe(scene, image_id, kind, vocab, build, rng)
            if p is None:
                skipped += 1
            else:
                probes.append(p)
    return probes, skipped


def describe(scene: Scene) -> str:
    """A caption of a synthetic scene naming every object with its attributes and every relation
    between neighbours in the object order (what a dense caption would say)."""
    from jobs.finer import queries as q
    from jobs.finer.scenes import relations

    parts = [q.clause_text(("attr", o.shape, o.colour, o.size)) for o in scene.objects]
    text = "The image shows " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    facts = [q.clause_text(("rel", a.shape, r, b.shape)) for a, r, b in relations(scene)
             if scene.objects.index(b) == scene.objects.index(a) + 1]
    return text + "." + "".join(f" There is {f}." for f in facts)
