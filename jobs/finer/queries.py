"""Queries over a scene graph: their elements, truth, minimal edits and wording.

A `Query` is a tuple of clauses of one kind:
- ``multi_obj``: ``("obj", shape)`` — "a circle";
- ``multi_attr``: ``("attr", shape, colour, size)`` (``size`` None when the world has one size) — "a large red circle";
- ``multi_rel``: ``("rel", shape, relation, shape)`` — "a circle to the left of a square";
- ``wh``: one ``("wh", shape, colour)`` fact — "the circle is red" (its question asks the colour).

The *elements* of a query are its slots (`slots`): each object, attribute and relation it names. A
minimal edit (`edit`) replaces exactly one slot's value; `holds` decides a query against a scene.
"""

from __future__ import annotations

from typing import Any

from explab.errors import ExplabError
from jobs.finer.scenes import RELATIONS, Scene

Clause = tuple[Any, ...]
Query = tuple[Clause, ...]
KINDS = ("multi_obj", "multi_attr", "multi_rel", "wh")
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def clause_holds(scene: Scene, clause: Clause) -> bool:
    tag = clause[0]
    if tag == "obj":
        return bool(scene.find(shape=clause[1]))
    if tag == "attr":
        _, shape, colour, size = clause
        return bool(scene.find(shape=shape, colour=colour, size=size))
    if tag == "rel":
        _, a, rel, b = clause
        subj, obj = scene.find(shape=a), scene.find(shape=b)
        return any(scene.related(x, rel, y) for x in subj for y in obj if x is not y)
    if tag == "wh":
        _, shape, colour = clause
        return bool(scene.find(shape=shape, colour=colour))
    raise ExplabError(f"unknown clause {clause!r}: use obj, attr, rel or wh clauses")


def holds(scene: Scene, query: Query) -> bool:
    """True when every clause of ``query`` is true of ``scene``."""
    return all(clause_holds(scene, c) for c in query)


def slots(query: Query) -> list[tuple[int, int, str]]:
    """The editable elements: (clause index, field index, vocabulary name) per named element."""
    out = []
    for i, c in enumerate(query):
        tag = c[0]
        if tag == "obj":
            out.append((i, 1, "shape"))
        elif tag == "attr":
            out.append((i, 2, "colour"))
            if c[3] is not None:
                out.append((i, 3, "size"))
        elif tag == "rel":
            out += [(i, 1, "shape"), (i, 2, "relation"), (i, 3, "shape")]
        elif tag == "wh":
            out += [(i, 1, "shape"), (i, 2, "colour")]
    return out


def granularity(query: Query) -> int:
    """How many elements the query names: objects (each once) + attributes + relations."""
    objects = {c[1] for c in query} | {c[3] for c in query if c[0] == "rel"}
    attributes = sum(1 for c in query if c[0] == "attr" for v in c[2:] if v is not None)
    attributes += sum(1 for c in query if c[0] == "wh")
    relations = sum(1 for c in query if c[0] == "rel")
    return len(objects) + attributes + relations


def edit(query: Query, slot: tuple[int, int, str], value: Any) -> Query:
    i, j, _ = slot
    clause = list(query[i])
    clause[j] = value
    return tuple(tuple(clause) if k == i else c for k, c in enumerate(query))


def differences(a: Query, b: Query) -> int:
    """How many elements two queries of the same structure differ in."""
    if len(a) != len(b) or any(x[0] != y[0] or len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ExplabError("the two queries have different structures: compare a query with its own edits")
    return sum(u != v for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True))


def single_edits(query: Query, vocab: dict[str, list[str]]) -> list[Query]:
    """Every query that replaces exactly one element of ``query`` by another value of its vocabulary
    (an object never by one the query already names in another clause)."""
    out = []
    named = {c[1] for c in query} | {c[3] for c in query if c[0] == "rel"}
    for slot in slots(query):
        i, j, name = slot
        banned = {query[i][j]}
        if name == "shape":
            banned |= {query[i][1], query[i][3]} if query[i][0] == "rel" else named
        out += [edit(query, slot, value) for value in vocab[name] if value not in banned]
    return out


# ---- wording -------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def clause_text(clause: Clause) -> str:
    tag = clause[0]
    if tag == "obj":
        return f"{_article(clause[1])} {clause[1]}"
    if tag == "attr":
        _, shape, colour, size = clause
        words = " ".join(w for w in (size, colour, shape) if w)
        return f"{_article(words)} {words}"
    if tag == "rel":
        _, a, rel, b = clause
        return f"{_article(a)} {a} {_REL_TEXT[rel]} {_article(b)} {b}"
    _, shape, colour = clause
    return f"the {shape} is {colour}"


def phrase(query: Query) -> str:
    """"a circle, a square and a triangle" — the clauses in order."""
    parts = [clause_text(c) for c in query]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


QUESTION_TEMPLATES = (
    "Can you see {} in the image?",
    "Is there {} in this image?",
    "Does the image show {}?",
    "Do you see {} here?",
    "Looking at the picture, can you find {}?",
)


def ask(query: Query, template: int = 0) -> str:
    """The question for ``query``: a yes/no check, or for a wh fact the colour of its object."""
    if query[0][0] == "wh":
        return f"What colour is the {query[0][1]}?"
    return QUESTION_TEMPLATES[template].format(phrase(query))


def yes(query: Query) -> str:
    if query[0][0] == "wh":
        return f"The {query[0][1]} is {query[0][2]}."
    return f"Yes, I can see {phrase(query)}."


def no_but(asked: Query, true: Query) -> str:
    """The answer rejecting ``asked`` and naming what the image shows instead (``true``)."""
    if asked[0][0] == "wh":
        return f"There is no {asked[0][1]}, but the {true[0][1]} is {true[0][2]}."
    return f"No, but I can see {phrase(true)}."


def absent(query: Query) -> str:
    """wh only: the answer that the asked object is missing, naming nothing else."""
    return f"There is no {query[0][1]} in the image."


def relations_vocab() -> list[str]:
    return list(RELATIONS)
