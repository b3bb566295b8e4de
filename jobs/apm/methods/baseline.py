"""The non-personalized baseline: the base LLM answers every prompt the same way for every user."""

from __future__ import annotations

from jobs.apm.methods.base import Method


class NonPersonalized(Method):
    name = "baseline"

    def respond_all(self, prompts: list[str]) -> list[str]:
        return self.ask(prompts, self.mctx.prompts.get("baseline_system", ""))
