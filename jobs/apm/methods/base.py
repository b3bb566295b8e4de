"""What a personalization method is, and all it may see.

A method gets a `MethodContext` (the base LLM, an embedder, the public principle vocabulary, the
method prompts and sampling settings) when it is built, then ``fit(view)`` with a `UserView` —
the user's opaque id and history (past prompts with the preferred and the rejected responses) —
and ``respond(prompt)`` for each held-out prompt. Neither type has a field for the user's
attributes, preferences or the mapping C: those live only in `jobs.apm.benchmark.World`, which
no method receives (the oracle alone is built with the user's preferences, as a reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from explab.seeds import derive_seed
from jobs.apm.benchmark import Principle
from jobs.apm.llm import RoleConfig, chat, generate_texts


@dataclass(frozen=True)
class Turn:
    """One past exchange: the user's prompt, the response they preferred, and the ones they did not."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...]


@dataclass(frozen=True)
class UserView:
    """Everything a method may know about a user."""

    user_id: str
    history: tuple[Turn, ...]


@dataclass
class MethodContext:
    llm: Any  # the base LLM: a generator-like object (shared server handle or scripted)
    embedder: Any
    role: RoleConfig  # the base LLM's sampling settings
    prompts: dict[str, Any]  # prompts/methods.yaml
    principles: tuple[Principle, ...]  # the public vocabulary P (not C)
    seed: int  # derived from (run seed, user, model): common random numbers across methods
    options: dict[str, Any] = field(default_factory=dict)


class Method:
    name = "method"

    def __init__(self, mctx: MethodContext, cfg: Any = None):
        self.mctx = mctx
        self.cfg = cfg

    def fit(self, view: UserView) -> None:
        """Learn from the user's history (the baseline ignores it)."""

    def respond(self, prompt: str) -> str:
        return self.respond_all([prompt])[0]

    def respond_all(self, prompts: list[str]) -> list[str]:
        """Responses to many prompts (methods batch their LLM calls here)."""
        return [self.respond(p) for p in prompts]

    def info(self) -> dict[str, Any]:
        """What the method learned, for the run's tables (e.g. an optimized prompt)."""
        return {}

    # helpers
    def params(self, *key: Any, n: int = 1, temperature: float | None = None) -> dict[str, Any]:
        return self.mctx.role.params(derive_seed(self.mctx.seed, *key), n=n, temperature=temperature)

    def ask(self, prompts: list[str], system: str = "") -> list[str]:
        """One response per prompt from the base LLM with ``system`` (the seeds depend on the prompt only)."""
        requests = [chat(p, system, self.params("respond", p)) for p in prompts]
        return [texts[0] for texts in generate_texts(self.mctx.llm, requests)]
