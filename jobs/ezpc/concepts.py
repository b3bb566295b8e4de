"""Concept vocabularies and class names.

A vocabulary comes from concept files or from an LLM through the shared `Generator` server,
prompted per class name. Concept files are in Label-free CBM's formats: text with one phrase per
line (``#`` comments), or JSON ``{class: [phrases]}`` (its GPT outputs). A file is named by a
path, by a name in this package's ``concepts/`` folder, or by an http(s) URL, fetched once into
the explab cache (`fetch`). Either way the phrases are cleaned, deduplicated and sorted (as the
authors do), and an optional seeded subset of ``size`` concepts is kept (the vocabulary-size
ablation). LLM vocabularies are cached on disk, keyed by the generator, prompts and class names,
so the trials of a sweep generate once. `filter_vocabulary` is Label-free CBM's filter over CLIP
embeddings (length, closeness to a class name, near-duplicates, image activation).
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


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


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
    """The phrases of a concept file: JSON ``{class: [phrases]}`` (or a JSON list) when it parses as
    JSON, else the non-empty lines without ``#`` comments; whitespace collapsed."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix != ".txt" and text.lstrip().startswith(("{", "["))):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"concept file {path} is not valid JSON (line {err.lineno}): give LF-CBM's "
                              "{class: [concepts]} JSON or a text file with one concept per line") from None
        values = data.values() if isinstance(data, dict) else [data]
        if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in values):
            raise ConfigError(f"concept file {path}: JSON must map each class to a list of concept strings")
        return [" ".join(c.split()) for v in values for c in v if c.strip()]
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        line = " ".join(line.split())
        if line:
            out.append(line)
    return out


def fetch(url: str, cache_dir: Path, timeout: float = 30.0) -> Path:
    """The local copy of the concept file at ``url``, downloaded into ``cache_dir`` on first use (with the
    cache on an object store: taken from there when another node fetched it, and uploaded when written)."""
    import urllib.error
    import urllib.request

    from explab import mirror

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:] or "concepts"
    path = cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
    if mirror.pull_entry(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ExplabError(f"could not fetch concept file {url} ({reason}): download it and give its local path "
                          "in datasets[].concepts instead") from None
    from explab import store

    store.atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def locate(name: str, cache_dir: Path | None = None) -> Path:
    """A concept file's local path: `fetch` for a URL (into ``cache_dir``), else `resolve_file`."""
    if is_url(name):
        if cache_dir is None:
            from explab.paths import cache_dir as explab_cache

            cache_dir = explab_cache("ezpc-concepts")
        return fetch(name, cache_dir / "files")
    return resolve_file(name)


def from_files(files: Sequence[str], cache_dir: Path | None = None) -> list[str]:
    """The deduplicated, sorted phrases of concept files (names, paths or URLs; see `locate`)."""
    if not files:
        raise ConfigError("concepts.files is empty: name at least one concept file (or set concepts.source: llm)")
    phrases: list[str] = []
    for name in files:
        phrases += read_phrases(locate(name, cache_dir))
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
    """``make()`` once per key: non-empty rows are kept as JSON under ``cache_dir`` (None: no cache); with the
    cache on an object store, one node's answers serve every node (`explab.mirror.pull_entry`)."""
    from explab import mirror

    if cache_dir is None:
        return make()
    path = cache_dir / f"{key}.json"
    if mirror.pull_entry(path):
        return json.loads(path.read_text())
    rows = make()
    if rows:  # an empty answer is an error upstream, not something to remember
        from explab import store

        store.write_json(path, rows)
    return rows


# ---- Label-free CBM's filter, over CLIP embeddings -----------------------------------------------
def filter_vocabulary(concepts: Sequence[str], C: np.ndarray, T: np.ndarray, *, max_chars: int | None = None,
                      max_class_similarity: float | None = None, max_concept_similarity: float | None = None,
                      V: np.ndarray | None = None, min_activation: float | None = None,
                      activation_top: int = 5) -> list[str]:
    """Why each concept is dropped ("" = kept), applying Label-free CBM's filters in its order.

    ``C`` (k × d) are the concepts' and ``T`` (classes × d) the class names' L2-normalised text
    embeddings, ``V`` (n × d) training image embeddings. A concept is dropped when it is longer than
    ``max_chars`` characters (``"length"``); when its cosine to some class name exceeds
    ``max_class_similarity`` (``"class"``); when it is a near-duplicate of a kept concept, cosine above
    ``max_concept_similarity`` (``"duplicate"``: of near-identical concepts the one more similar to
    all the others on average is kept, the more general one, as LF-CBM does); or when the mean of its
    ``activation_top`` highest cosines with the training images is below ``min_activation``
    (``"activation"``: nothing in the images shows it). None switches a filter off.
    """
    k = len(concepts)
    if C.shape[0] != k:
        raise ValueError(f"{k} concepts but {C.shape[0]} embeddings")
    reason = ["" for _ in range(k)]
    if max_chars is not None:
        reason = ["length" if not r and len(c) > max_chars else r for r, c in zip(reason, concepts, strict=True)]
    if max_class_similarity is not None and len(T):
        close = (C @ T.T).max(axis=1) > max_class_similarity
        reason = ["class" if not r and hit else r for r, hit in zip(reason, close, strict=True)]
    if max_concept_similarity is not None:
        alive = np.array([not r for r in reason])
        S = C @ C.T
        mean_sim = (S.sum(axis=1) - np.diag(S)) / max(k - 1, 1)
        kept: list[int] = []
        for j in np.argsort(-mean_sim, kind="stable"):  # the most general concepts claim their place first
            if not alive[j]:
                continue
            if kept and S[j, kept].max() > max_concept_similarity:
                reason[j] = "duplicate"
            else:
                kept.append(int(j))
    if min_activation is not None:
        if V is None or not len(V):
            raise ValueError("min_activation needs training image embeddings V")
        top = min(activation_top, len(V))
        acts = np.sort(V @ C.T, axis=0)[-top:].mean(axis=0)
        reason = ["activation" if not r and a < min_activation else r for r, a in zip(reason, acts, strict=True)]
    return reason


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
