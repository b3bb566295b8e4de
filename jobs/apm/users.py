"""Simulated users: they write prompts in their own voice, and build their history by choosing, for
each past prompt, the candidate response they prefer (by their hidden preferences, i.e. by C).

History candidates come from the candidate LLM (by default the first base LLM) under random
principle-conditioned system prompts, so they differ in style; the user's choice among them is the
only place C enters the history. The held-out (test) prompts are written the same way.
Prompts: ``prompts/user.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from explab.config import Section
from explab.errors import ConfigError
from explab.seeds import derive_seed, rng_for
from jobs.apm.benchmark import Principle, Vocab, read_yaml_file
from jobs.apm.llm import RoleConfig, chat, fill, generate_texts
from jobs.apm.methods.base import Turn

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class UserPrompts:
    def __init__(self, path: str):
        data = read_yaml_file(path, "user.prompts")
        try:
            self.write_system = str(data["write_prompt"].get("system", ""))
            self.write_user = str(data["write_prompt"]["user"])
            self.choose_system = str(data["choose"].get("system", ""))
            self.choose_user = str(data["choose"]["user"])
            self.candidate = str(data["candidate"])
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"user.prompts: {path} needs write_prompt.user, choose.user "
                              "and candidate templates") from None
        sample = {"attributes": "a", "topic": "t", "question": "q", "attribute_descriptions": "d", "preferred": "p",
                  "disliked": "d", "prompt": "p", "n": 2, "candidates": "c", "letter": "A", "text": "t"}
        for name, template in (("write_prompt.system", self.write_system), ("write_prompt.user", self.write_user),
                               ("choose.system", self.choose_system), ("choose.user", self.choose_user),
                               ("candidate", self.candidate)):
            fill(template, f"user.prompts {name}", **sample)


@dataclass(frozen=True)
class Persona:
    """What the simulated user knows about itself (private to the benchmark side)."""

    user_id: str
    index: int
    attributes: tuple[str, ...]
    attribute_descriptions: tuple[str, ...]
    liked: tuple[Principle, ...]
    disliked: tuple[Principle, ...]


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    history: tuple[Turn, ...]
    test_prompts: tuple[str, ...]
    choice_failures: int  # choices the user LLM answered unparsably (a seeded random pick was used)


class SimulationConfig(Section):
    n_history: int = Field(16, ge=0)
    n_test: int = Field(8, ge=1)
    n_candidates: int = Field(4, ge=2, le=26)  # candidate responses per history prompt
    principles_per_candidate: tuple[int, int] = (1, 2)  # each candidate's style asks for this many principles
    prompt_max_tokens: int = Field(96, ge=8)


def _traits(principles: tuple[Principle, ...]) -> str:
    return "; ".join(f"{p.name} ({p.description})" for p in principles) or "none"


def write_prompts(user_llm: Any, role: RoleConfig, templates: UserPrompts, vocab: Vocab, persona: Persona,
                  seed: int, n: int, tag: str, max_tokens: int = 96) -> list[str]:
    rng = rng_for("apm-topics", seed, persona.index, tag)
    topics = rng.choice(len(vocab.topics), size=n, replace=n > len(vocab.topics))
    requests, fallbacks = [], []
    for i, t in enumerate(topics):
        topic = vocab.topics[int(t)]
        question = vocab.questions[int(rng.integers(len(vocab.questions)))].format(topic=topic)
        values = {"attributes": ", ".join(persona.attributes), "topic": topic, "question": question,
                  "attribute_descriptions": "; and ".join(persona.attribute_descriptions)}
        params = role.params(derive_seed(seed, persona.user_id, tag, i), max_tokens=max_tokens)
        requests.append(chat(fill(templates.write_user, "user.write_prompt.user", **values),
                             fill(templates.write_system, "user.write_prompt.system", **values), params))
        fallbacks.append(question)
    texts = generate_texts(user_llm, requests)
    return [" ".join(t[0].split()) or q for t, q in zip(texts, fallbacks, strict=True)]


def parse_choice(text: str, n: int) -> int | None:
    valid = LETTERS[:n]
    m = re.search(rf"\b([{valid}])\b", text.strip())
    return LETTERS.index(m.group(1)) if m else None


def simulate_user(persona: Persona, user_llm: Any, user_role: RoleConfig, candidate_llm: Any,
                  candidate_role: RoleConfig, templates: UserPrompts, vocab: Vocab, cfg: SimulationConfig,
                  seed: int) -> UserRecord:
    """Write the user's history and test prompts, generate candidates, let the user choose."""
    written = write_prompts(user_llm, user_role, templates, vocab, persona, seed, cfg.n_history + cfg.n_test, "prompts",
                            cfg.prompt_max_tokens)
    history_prompts, test_prompts = written[: cfg.n_history], written[cfg.n_history:]
    rng = rng_for("apm-candidates", seed, persona.index)
    lo, hi = cfg.principles_per_candidate
    if not 1 <= lo <= hi <= len(vocab.principles):
        raise ConfigError(f"benchmark.simulation.principles_per_candidate={[lo, hi]}: need 1 <= low <= high <= "
                          f"{len(vocab.principles)}")
    requests = []
    for i, prompt in enumerate(history_prompts):
        for j in range(cfg.n_candidates):
            size = int(rng.integers(lo, hi + 1))
            picks = rng.choice(len(vocab.principles), size=size, replace=False)
            system = " ".join(vocab.principles[int(k)].instruction for k in sorted(picks))
            requests.append(chat(prompt, system,
                                 candidate_role.params(derive_seed(seed, persona.user_id, "cand", i, j))))
    texts = [t[0] for t in generate_texts(candidate_llm, requests)]
    choose = []
    for i, prompt in enumerate(history_prompts):
        cands = texts[i * cfg.n_candidates:(i + 1) * cfg.n_candidates]
        block = "\n".join(fill(templates.candidate, "user.candidate", letter=LETTERS[j], text=c)
                          for j, c in enumerate(cands))
        values = {"preferred": _traits(persona.liked), "disliked": _traits(persona.disliked), "prompt": prompt,
                  "n": len(cands), "candidates": block}
        params = user_role.params(derive_seed(seed, persona.user_id, "choose", i), max_tokens=8, temperature=0.0)
        choose.append(chat(fill(templates.choose_user, "user.choose.user", **values),
                           fill(templates.choose_system, "user.choose.system", **values), params))
    failures, history = 0, []
    for i, answer in enumerate(generate_texts(user_llm, choose)):
        cands = texts[i * cfg.n_candidates:(i + 1) * cfg.n_candidates]
        pick = parse_choice(answer[0], len(cands))
        if pick is None:
            failures += 1
            pick = int(rng_for("apm-choice-fallback", seed, persona.index, i).integers(len(cands)))
        history.append(Turn(history_prompts[i], cands[pick], tuple(c for j, c in enumerate(cands) if j != pick)))
    return UserRecord(persona.user_id, tuple(history), tuple(test_prompts), failures)
