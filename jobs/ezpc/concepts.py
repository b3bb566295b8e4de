"""Concept vocabularies and class names.

A vocabulary comes from concept files (one phrase per line, ``#`` comments; a name without a path
is a file in this package's ``concepts/`` folder) or from an LLM through the shared `Generator`
server, prompted per class name. Either way the phrases are cleaned, deduplicated and sorted (as
the authors do), and an optional seeded subset of ``size`` concepts is kept (the vocabulary-size
ablation). LLM vocabularies are cached on disk, keyed by the generator, prompts and class names,
so the trials of a sweep generate once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ConfigError, ExplabError

CONCEPT_DIR = Path(__file__).parent / "concepts"

# Our own wording, in the spirit of the per-class prompts that produced the authors' vocabularies
# (Label-free CBM's "important features", "superclasses" and "things around" questions).
DEFAULT_PROMPTS = (
    'List the most important visual features for recognizing something as a "{cls}". '
    "Answer with one short phrase per line and nothing else.",
    'List a few broader categories that a "{cls}" belongs to. '
    "Answer with one short phrase per line and nothing else.",
    'List the things most commonly seen around a "{cls}". '
    "Answer with one short phrase per line and nothing else.",
)

_BULLET = re.compile(r"^\s*(?:[-*•·‣▪–—]+|\(?\d+[.):]|\(?[a-zA-Z][.)])\s*")


def resolve_file(name: str, what: str = "concept file") -> Path:
    """A path as given, else a file of that name in ``jobs/ezpc/concepts/`` (``.txt`` optional)."""
    path = Path(name).expanduser()
    candidates = ([path] if path.is_absolute() or "/" in name
                  else [CONCEPT_DIR / name, CONCEPT_DIR / f"{name}.txt", path])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONCEPT_DIR.glob("*.txt"))) or "none"
    raise ConfigError(f"{what} {name!r} not found: give a path or one of jobs/ezpc/concepts/ ({known})")


def read_phrases(path: Path) -> list[str]:
    """Non-empty lines of ``path`` without ``#`` comments, whitespace collapsed."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0]
        line = " ".join(line.split())
        if line:
            out.append(line)
    return out


def from_files(files: Sequence[str]) -> list[str]:
    if not files:
        raise ConfigError("concepts.files is empty: name at least one concept file (or set concepts.source: llm)")
    phrases: list[str] = []
    for name in files:
        phrases += read_phrases(resolve_file(name))
    return finalize(phrases)


def finalize(phrases: Sequence[str]) -> list[str]:
    """Deduplicate (case-insensitively, keeping the first spelling) and sort."""
    seen: dict[str, str] = {}
    for p in phrases:
        seen.setdefault(p.lower(), p)
    return sorted(seen.values(), key=str.lower)


def subset(concepts: Sequence[str], size: int | None, seed: int) -> list[str]:
    """A seeded random subset of ``size`` concepts, in vocabulary order (None or ≥ k: all)."""
    if size is None or size >= len(concepts):
        return list(concepts)
    if size < 1:
        raise ConfigError(f"concepts.size must be at least 1 (got {size})")
    keep = np.sort(np.random.default_rng(seed).permutation(len(concepts))[:size])
    return [concepts[i] for i in keep]


# ---- the LLM path -------------------------------------------------------------------------------
def parse_listing(text: str, max_chars: int, max_words: int) -> list[str]:
    """Phrases from an LLM answer: one per line (or comma-separated), bullets and numbers stripped."""
    out = []
    for line in text.replace("\r", "\n").split("\n"):
        parts = line.split(",") if line.count(",") >= 2 else [line]
        for part in parts:
            phrase = _BULLET.sub("", part).strip().strip("\"'`*.:;").strip()
            phrase = " ".join(phrase.split()).lower()
            if not phrase or len(phrase) > max_chars or len(phrase.split()) > max_words:
                continue
            if not any(c.isalpha() for c in phrase) or not phrase.isprintable():
                continue
            if phrase.endswith(":") or phrase.startswith(("here are", "sure", "answer")):
                continue
            out.append(phrase)
    return out


def generate(handle: Any, classes: Sequence[str], prompts: Sequence[str], *, max_tokens: int, seed: int,
             max_chars: int, max_words: int, per_prompt: int | None) -> list[dict[str, str]]:
    """Ask the Generator ``handle`` every prompt for every class (greedy); rows of (concept, cls, prompt)."""
    requests, meta = [], []
    for cls in classes:
        for i, prompt in enumerate(prompts):
            requests.append({"messages": [{"role": "user", "content": prompt.format(cls=cls)}],
                             "params": {"temperature": 0.0, "max_tokens": max_tokens, "seed": seed}})
            meta.append((cls, i))
    results = handle.generate(requests)
    rows = []
    for (cls, i), result in zip(meta, results, strict=True):
        phrases = parse_listing(result.completions[0].text, max_chars, max_words)
        for phrase in phrases[:per_prompt]:
            if phrase != cls.lower():
                rows.append({"concept": phrase, "cls": cls, "prompt": str(i)})
    return rows


def llm_cache_key(generator: Any, prompts: Sequence[str], classes: Sequence[str], **settings: Any) -> str:
    payload = {"generator": generator, "prompts": list(prompts), "classes": list(classes), **settings}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_generation(cache_dir: Path | None, key: str, make: Any) -> list[dict[str, str]]:
    """``make()`` once per key: non-empty rows are kept as JSON under ``cache_dir`` (None: no cache)."""
    if cache_dir is None:
        return make()
    path = cache_dir / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = make()
    if rows:  # an empty answer is an error upstream, not something to remember
        from explab import store

        store.write_json(path, rows)
    return rows


# ---- class names --------------------------------------------------------------------------------
def clean_class_name(name: str) -> str:
    """Readable class names from dataset label names: ``001.Black_footed_Albatross`` → ``Black footed
    Albatross``, ``/a/airfield`` → ``airfield``, ``tench, Tinca tinca`` → ``tench``."""
    name = str(name)
    if name.startswith("/"):
        name = "/".join(name.split("/")[2:])  # Places365: /a/apartment_building/outdoor
        name = name.replace("/", " ")
    name = re.sub(r"^\d+[._ ]", "", name)
    name = name.split(",")[0]
    return " ".join(name.replace("_", " ").split())


def hf_label_names(spec: str, label_column: str) -> list[str]:
    """The names of a Hugging Face dataset's ``ClassLabel`` column (`explab.data.class_label_names`)."""
    from explab.data import class_label_names

    names = class_label_names(spec, label_column)
    if not names:
        raise ExplabError(f"could not read ClassLabel names for column {label_column!r} of {spec!r} (no dataset "
                          "metadata, or not a ClassLabel): list the class names in the dataset's `classes` field")
    return names
