"""The APM benchmark: vocabularies, the hidden mapping C, and users.

- Attributes ``A`` and principles ``P`` are vocabularies (``vocab/*.yaml``).
- ``C`` (|A| × |P|, entries in {-1, 0, +1}) is drawn from the seed alone: every principle is liked
  by ``likes_per_principle`` random attributes and disliked by as many others, so each column sums
  to zero. C carries no semantics (it is redrawn per seed) and, being column-balanced, gives no
  population-wide preference: a principle is as likely to be liked as disliked by a random user.
  (That is what makes "history shuffled across users" a null control.)
- A user is a random set of attributes; its hidden preferences are ``w = sign(sum_a C[a])``
  (+1 preferred, -1 dispreferred, 0 indifferent). Users with no preference at all are redrawn.

Everything here is private to the benchmark: methods get a `methods.base.UserView` (history and
prompts) and never a `World`, `User` or C. The run stores C only under ``artifacts/private/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from explab.errors import ConfigError
from explab.seeds import rng_for

JOB_DIR = Path(__file__).parent


# ---- vocabularies --------------------------------------------------------------------------
@dataclass(frozen=True)
class Attribute:
    name: str
    description: str
    voice: tuple[str, ...]


@dataclass(frozen=True)
class Principle:
    name: str
    description: str
    instruction: str
    markers: tuple[str, ...]


@dataclass(frozen=True)
class Vocab:
    attributes: tuple[Attribute, ...]
    principles: tuple[Principle, ...]
    topics: tuple[str, ...]
    questions: tuple[str, ...]

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(name)


def job_path(path: str | Path) -> Path:
    """A config path: absolute, or relative to the job folder (``vocab/...``, ``prompts/...``)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else JOB_DIR / path


def read_yaml_file(path: str | Path, field: str) -> dict[str, Any]:
    where = job_path(path)
    if not where.is_file():
        raise ConfigError(f"{field}: file {str(path)!r} does not exist: "
                          "give a path relative to jobs/apm/ or an absolute one")
    try:
        data = yaml.safe_load(where.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{field}: {where} is not valid YAML: fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {where} must hold a mapping")
    return data


def _subset(items: tuple[Any, ...], names: list[str] | None, field: str) -> tuple[Any, ...]:
    if names is None:
        return items
    known = {i.name: i for i in items}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"{field}: unknown name(s) {', '.join(missing)}: use names from the vocabulary file "
                          f"({', '.join(known)})")
    return tuple(known[n] for n in names)


def load_vocab(attributes_file: str, principles_file: str, topics_file: str,
               attributes: list[str] | None = None, principles: list[str] | None = None) -> Vocab:
    """Read the vocabularies; ``attributes``/``principles`` pick a subset by name (None: all)."""
    a_data = read_yaml_file(attributes_file, "benchmark.attributes_file")
    p_data = read_yaml_file(principles_file, "benchmark.principles_file")
    t_data = read_yaml_file(topics_file, "benchmark.topics_file")
    try:
        attrs = tuple(Attribute(a["name"], a.get("description", a["name"]), tuple(a.get("voice") or [a["name"]]))
                      for a in a_data["attributes"])
        princs = tuple(Principle(p["name"], p["description"], p["instruction"], tuple(p.get("markers") or ()))
                       for p in p_data["principles"])
        topics = tuple(str(t) for t in t_data["topics"])
        questions = tuple(str(q) for q in t_data.get("questions") or ["Can you help me with {topic}?"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"vocabulary files: missing or malformed entry ({err}): each attribute needs a name, "
                          "each principle a name, description and instruction, and topics a list") from None
    for kind, items in (("attribute", attrs), ("principle", princs)):
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"vocabulary: duplicate {kind} names: make each name unique")
    attrs = _subset(attrs, attributes, "benchmark.attributes")
    princs = _subset(princs, principles, "benchmark.principles")
    if len(attrs) < 2 or len(princs) < 2 or not topics:
        raise ConfigError("vocabulary: need at least 2 attributes, 2 principles and 1 topic")
    if any("{topic}" not in q for q in questions):
        raise ConfigError("vocabulary: every question template in the topics file needs a {topic} field")
    return Vocab(attrs, princs, topics, questions)


# ---- the hidden mapping C and the users -----------------------------------------------------------
def draw_mapping(seed: int, n_attributes: int, n_principles: int, likes_per_principle: int = 1) -> np.ndarray:
    """C (|A| × |P|, int8 in {-1, 0, +1}): a deterministic function of ``seed``, column-balanced."""
    if 2 * likes_per_principle > n_attributes:
        raise ConfigError(f"benchmark.likes_per_principle={likes_per_principle} needs at least "
                          f"{2 * likes_per_principle} attributes (have {n_attributes}): lower it")
    rng = rng_for("apm-C", seed)
    C = np.zeros((n_attributes, n_principles), dtype=np.int8)
    for p in range(n_principles):
        rows = rng.choice(n_attributes, size=2 * likes_per_principle, replace=False)
        C[rows[:likes_per_principle], p] = 1
        C[rows[likes_per_principle:], p] = -1
    return C


@dataclass(frozen=True)
class User:
    """A simulated user (private to the benchmark): its attributes and hidden preferences."""

    user_id: str
    index: int
    attributes: tuple[int, ...]
    preferences: tuple[int, ...]  # w over principles: +1 preferred, -1 dispreferred, 0 indifferent


@dataclass(frozen=True)
class World:
    """One seed's benchmark instance: C, the users, and the vocabulary. Never given to a method."""

    seed: int
    vocab: Vocab
    C: np.ndarray
    users: tuple[User, ...]

    def preferred(self, user: User) -> list[Principle]:
        return [p for p, w in zip(self.vocab.principles, user.preferences, strict=True) if w > 0]

    def disliked(self, user: User) -> list[Principle]:
        return [p for p, w in zip(self.vocab.principles, user.preferences, strict=True) if w < 0]

    def attribute_names(self, user: User) -> list[str]:
        return [self.vocab.attributes[a].name for a in user.attributes]

    def private_record(self) -> dict[str, Any]:
        """What the run stores under artifacts/private/: C and every user's attributes and preferences."""
        return {
            "seed": self.seed,
            "attributes": [a.name for a in self.vocab.attributes],
            "principles": [p.name for p in self.vocab.principles],
            "C": self.C.tolist(),
            "users": [{"user": u.user_id, "attributes": self.attribute_names(u), "preferences": list(u.preferences)}
                      for u in self.users],
        }


def user_preferences(C: np.ndarray, attributes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.sign(C[list(attributes)].sum(axis=0)))


def build_world(vocab: Vocab, seed: int, n_users: int, attributes_per_user: int,
                likes_per_principle: int = 1) -> World:
    """C and ``n_users`` users for ``seed`` (deterministic)."""
    n_a, n_p = len(vocab.attributes), len(vocab.principles)
    if not 1 <= attributes_per_user <= n_a:
        raise ConfigError(f"benchmark.attributes_per_user={attributes_per_user}: must be between 1 and {n_a}")
    C = draw_mapping(seed, n_a, n_p, likes_per_principle)
    rng = rng_for("apm-users", seed)
    users = []
    for i in range(n_users):
        for _ in range(1000):
            attrs = tuple(sorted(int(a) for a in rng.choice(n_a, size=attributes_per_user, replace=False)))
            prefs = user_preferences(C, attrs)
            if any(prefs):
                break
        else:
            raise ConfigError("benchmark: could not draw a user with any preference: raise likes_per_principle")
        users.append(User(f"u{i:03d}", i, attrs, prefs))
    return World(seed, vocab, C, tuple(users))


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (n >= 2): user i gets user perm[i]'s history."""
    if n < 2:
        raise ConfigError("benchmark.shuffle_histories needs at least 2 users")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm
