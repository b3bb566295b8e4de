"""Retrieval-augmented personalization: the user's most similar past turns, with the responses
they preferred, go into the prompt as examples of the style to follow (embedding retrieval)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from explab.config import Section
from jobs.apm.embed import cosine
from jobs.apm.llm import chat, fill, generate_texts
from jobs.apm.methods.base import Method, Turn, UserView


class RagConfig(Section):
    k: int = Field(4, ge=1)  # past turns retrieved per prompt


class RAG(Method):
    name = "rag"

    def fit(self, view: UserView) -> None:
        self.turns: list[Turn] = list(view.history)
        self.keys = self.mctx.embedder.embed([t.prompt for t in self.turns]) if self.turns else None

    def retrieve(self, prompts: list[str]) -> list[list[Turn]]:
        if not self.turns:
            return [[] for _ in prompts]
        sims = cosine(self.mctx.embedder.embed(prompts), self.keys)
        k = min(self.cfg.k, len(self.turns))
        # most similar first; ties broken by history order
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return [[self.turns[i] for i in row] for row in order]

    def respond_all(self, prompts: list[str]) -> list[str]:
        templates: dict[str, Any] = self.mctx.prompts["rag"]
        requests = []
        for prompt, turns in zip(prompts, self.retrieve(prompts), strict=True):
            examples = "\n".join(fill(templates["example"], "rag.example", prompt=t.prompt, response=t.chosen)
                                 for t in turns)
            user = fill(templates["user"], "rag.user", examples=examples, prompt=prompt)
            requests.append(chat(user, self.mctx.prompts.get("baseline_system", ""), self.params("respond", prompt)))
        return [texts[0] for texts in generate_texts(self.mctx.llm, requests)]
