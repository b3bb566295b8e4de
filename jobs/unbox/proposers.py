"""Proposers: where new descriptors of a class come from, given the scored memory so far.

``proposer.kind`` picks one (the seam where tests inject a scripted double):

- ``llm`` (the method): `LLMProposer` asks the shared `Generator` with the meta-prompts of
  ``prompts.yaml`` (round 0: K diverse descriptors of the class; later rounds: the top-M memory,
  lowest score first, and a request for K descriptors that score higher) and parses one
  descriptor per line;
- ``scripted``: `ScriptedProposer`, a seeded word recombiner for planted tests: round 0 draws
  random word sets from a vocabulary; later rounds mutate a top memory entry (swap, add or drop a
  word) or merge the words of two of them. It sees only the memory (descriptors and scores).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import Field

from explab.config import Section
from explab.errors import ConfigError
from explab.models import ModelSpec
from explab.seeds import derive_seed, rng_for
from explab.servers import ServerOptions

PROMPTS = Path(__file__).parent / "prompts.yaml"
PROMPT_KEYS = ("system", "first", "memory", "memory_line")


@dataclass(frozen=True)
class Scored:
    descriptor: str
    score: float


class ProposerConfig(Section):
    kind: Literal["llm", "scripted"] = "llm"
    model: ModelSpec = ModelSpec(name="Qwen/Qwen2.5-7B-Instruct")
    server: ServerOptions = ServerOptions()
    prompts: str = str(PROMPTS)  # a YAML with system / first / memory / memory_line
    samples: int = Field(1, ge=1)  # completions per request (their lines are pooled)
    temperature: float = Field(1.0, ge=0.0)
    max_tokens: int = Field(400, ge=1)
    max_chars: int = Field(160, ge=8)  # longer lines are cut at a word boundary
    template: str = "a photo of a {cls}"  # a line without the class name gets "<template>, " in front
    vocabulary: list[str] = Field(default_factory=list)  # scripted: the words it recombines
    max_words: int = Field(3, ge=1)  # scripted: most words per descriptor


class Proposer(Protocol):
    def propose(self, cls: str, memory: Sequence[Scored], k: int, *, round: int, attempt: int,
                seen: set[str]) -> list[str]:
        """Up to ``k`` new descriptors of ``cls``; ``memory``: top-M scored so far, lowest first."""
        ...


def load_prompts(path: str | Path) -> dict[str, str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"proposer.prompts {str(path)!r} does not exist: give a YAML with {', '.join(PROMPT_KEYS)}")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in PROMPT_KEYS if not isinstance(data.get(k), str)]
    if missing:
        raise ConfigError(f"proposer.prompts {str(path)!r} lacks {missing}: give each as a string")
    return {k: data[k] for k in PROMPT_KEYS}


def clean_line(line: str, cls: str, template: str, max_chars: int) -> str | None:
    """One descriptor from one line of LLM output (bullets, numbers and quotes stripped), or None."""
    line = "".join(ch for ch in line if ch.isprintable() and ch != "\ufffd")
    line = re.sub(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s*", "", line).strip().strip("\"'`").strip()
    line = re.sub(r"\s+", " ", line).rstrip(" .,;:")
    if sum(ch.isalpha() for ch in line) < 3:
        return None
    if cls.lower() not in line.lower():
        line = f"{template.format(cls=cls)}, {line}"
    if len(line) > max_chars:
        line = line[:max_chars].rsplit(" ", 1)[0]
    return line


def key(descriptor: str) -> str:
    """The form two descriptors are compared in for exact duplicates."""
    return re.sub(r"[^a-z0-9]+", " ", descriptor.lower()).strip()


class LLMProposer:
    def __init__(self, handle: Any, cfg: ProposerConfig, seed: int):
        self.handle, self.cfg, self.seed = handle, cfg, seed
        self.prompts = load_prompts(cfg.prompts)

    def messages(self, cls: str, memory: Sequence[Scored], k: int) -> list[dict[str, str]]:
        p = self.prompts
        if memory:
            lines = "\n".join(p["memory_line"].format(descriptor=m.descriptor, score=m.score) for m in memory)
            user = p["memory"].format(cls=cls, k=k, memory=lines)
        else:
            user = p["first"].format(cls=cls, k=k)
        return [{"role": "system", "content": p["system"]}, {"role": "user", "content": user}]

    def propose(self, cls: str, memory: Sequence[Scored], k: int, *, round: int, attempt: int,
                seen: set[str]) -> list[str]:
        params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens, "n": self.cfg.samples,
                  "seed": derive_seed(self.seed, "unbox-llm", cls, round, attempt) % (2**63)}
        result = self.handle.generate([{"messages": self.messages(cls, memory, k), "params": params}])[0]
        out: list[str] = []
        for completion in result.completions:
            for line in completion.text.splitlines():
                d = clean_line(line, cls, self.cfg.template, self.cfg.max_chars)
                if d is not None and key(d) not in seen and key(d) not in {key(x) for x in out}:
                    out.append(d)
        return out


class ScriptedProposer:
    """The scripted double (see the module docstring); deterministic in (seed, class, round, attempt)."""

    def __init__(self, cfg: ProposerConfig, seed: int):
        if len(cfg.vocabulary) < 2:
            raise ConfigError("proposer.vocabulary: the scripted proposer needs at least 2 words to recombine")
        self.cfg, self.seed = cfg, seed

    def text(self, cls: str, words: Sequence[str]) -> str:
        return f"{self.cfg.template.format(cls=cls)} with " + " and ".join(words)

    def words_of(self, descriptor: str) -> list[str]:
        vocab = set(self.cfg.vocabulary)
        return [w for w in re.findall(r"[a-z]+", descriptor.lower()) if w in vocab]

    def propose(self, cls: str, memory: Sequence[Scored], k: int, *, round: int, attempt: int,
                seen: set[str]) -> list[str]:
        rng = rng_for(self.seed, "unbox-scripted", cls, round, attempt)
        vocab, top = list(self.cfg.vocabulary), [self.words_of(m.descriptor) for m in memory][-3:]
        out: list[str] = []
        for _ in range(50 * k):
            if len(out) == k:
                break
            if not top:
                words = list(rng.choice(vocab, size=min(2, len(vocab)), replace=False))
            else:
                words = list(top[rng.integers(len(top))])
                op = rng.integers(4)
                if op == 0 and words:  # swap one word
                    words[rng.integers(len(words))] = str(rng.choice(vocab))
                elif op == 1:  # add a word
                    words.append(str(rng.choice(vocab)))
                elif op == 2 and len(words) > 1:  # drop a word
                    words.pop(int(rng.integers(len(words))))
                else:  # merge with another top entry
                    words += list(top[rng.integers(len(top))])
            words = list(dict.fromkeys(str(w) for w in words))[: self.cfg.max_words]
            d = self.text(cls, words or [str(rng.choice(vocab))])
            if key(d) not in seen and key(d) not in {key(x) for x in out}:
                out.append(d)
        return out


def build_proposer(cfg: ProposerConfig, ctx: Any | None, seed: int) -> Proposer:
    """``ctx``: the run's context (``ctx.model`` opens the shared Generator); not needed for ``scripted``."""
    if cfg.kind == "scripted":
        return ScriptedProposer(cfg, seed)
    load_prompts(cfg.prompts)
    return LLMProposer(ctx.model(cfg.model, "generator", cfg.server), cfg, seed)
