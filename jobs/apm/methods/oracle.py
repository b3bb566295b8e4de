"""The oracle: knows the user's hidden preferences (from C) and asks for them outright.

It is the benchmark's reference ceiling, not a personalization method: it is built by the job with
the preferred and disliked principles and ignores the history.
"""

from __future__ import annotations

from jobs.apm.benchmark import Principle
from jobs.apm.llm import fill
from jobs.apm.methods.base import Method, MethodContext


class Oracle(Method):
    name = "oracle"

    def __init__(self, mctx: MethodContext, liked: list[Principle], disliked: list[Principle]):
        super().__init__(mctx)
        templates = mctx.prompts["oracle"]
        parts = [fill(templates["prefer"], "oracle.prefer", instruction=p.instruction, description=p.description)
                 for p in liked]
        parts += [fill(templates["avoid"], "oracle.avoid", instruction=p.instruction, description=p.description)
                  for p in disliked]
        self.system = " ".join(parts)

    def respond_all(self, prompts: list[str]) -> list[str]:
        return self.ask(prompts, self.system)

    def info(self) -> dict[str, str]:
        return {"system_prompt": self.system}
