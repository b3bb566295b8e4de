"""Recurring concepts: the words that the top descriptors of a class share.

For each class, the descriptors are tokenised into lower-case words (stop words, the class name's
words and the descriptor template's words dropped). For every word that occurs in the top-k
descriptors: its count there, its frequency (share of the top-k descriptors holding it), and its
lift: the mean score of all the class's descriptors that hold it minus the mean of those that do
not (a positive lift is a concept the classifier rewards).
"""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
from pydantic import Field

from explab.config import Section

STOP_WORDS = frozenset("""a an the of in on at to with and or for from by near under over its his her their
this that these those is are was were be being it as into onto while some very photo image picture showing
shows shown there one two""".split())


class ConceptsConfig(Section):
    top: int = Field(10, ge=1)  # top descriptors per class the concepts are counted in
    min_count: int = Field(2, ge=1)  # a concept must occur in this many top descriptors


def words(descriptor: str, drop: frozenset[str] = frozenset()) -> list[str]:
    """The content words of a descriptor, once each, in order."""
    found = [w for w in re.findall(r"[a-z][a-z'-]+", descriptor.lower()) if w not in STOP_WORDS and w not in drop]
    return list(dict.fromkeys(found))


def recurring(descriptors: pd.DataFrame, cls: str, template: str, cfg: ConceptsConfig) -> pd.DataFrame:
    """``descriptors``: one class's ranked rows (descriptor, score, rank); the concept table of that class."""
    drop = frozenset(re.findall(r"[a-z]+", (cls + " " + template.replace("{cls}", "")).lower()))
    sets = [set(words(d, drop)) for d in descriptors["descriptor"]]
    top = sets[: cfg.top]
    counts = Counter(w for s in top for w in s)
    rows = []
    scores = descriptors["score"].to_numpy()
    for w, n in counts.items():
        if n < cfg.min_count:
            continue
        has = [w in s for s in sets]
        with_w = scores[has]
        without = scores[[not h for h in has]]
        rows.append({"class": cls, "concept": w, "count": n, "frequency": n / len(top),
                     "score_with": float(with_w.mean()),
                     "score_without": float(without.mean()) if len(without) else float("nan"),
                     "lift": float(with_w.mean() - without.mean()) if len(without) else float("nan")})
    frame = pd.DataFrame(rows, columns=["class", "concept", "count", "frequency", "score_with", "score_without",
                                        "lift"])
    frame = frame.sort_values(["count", "lift", "concept"], ascending=[False, False, True], na_position="last")
    return frame.assign(rank=range(1, len(frame) + 1)).reset_index(drop=True)
