"""Textual prompt optimization: a per-user system prompt optimized from the history by an LLM loop.

OPRO/APE-style: each round, the optimizer LLM (the base LLM itself) sees the current best system
prompt, its score, and a fresh sample of history turns (request, preferred and rejected response),
and proposes ``candidates`` new system prompts. A candidate's score is a proxy of the user's
preference computed from the history alone: on ``eval_turns`` held-in turns, how much closer the
base LLM's response under that system prompt is to the preferred response than to the rejected
ones (cosine similarity of embeddings). The best prompt found answers the new prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from explab.config import Section
from explab.seeds import rng_for
from jobs.apm.embed import cosine
from jobs.apm.llm import chat, extract_prompt, fill, generate_texts
from jobs.apm.methods.base import Method, Turn, UserView


class PromptOptConfig(Section):
    rounds: int = Field(3, ge=0)  # optimizer rounds
    candidates: int = Field(4, ge=1)  # system prompts proposed per round
    examples: int = Field(4, ge=1)  # history turns shown to the optimizer per round
    eval_turns: int = Field(6, ge=1)  # history turns the proxy score is computed on
    temperature: float = Field(1.0, ge=0.0)  # optimizer sampling temperature
    max_prompt_tokens: int = Field(200, ge=8)


class TextualPromptOptimization(Method):
    name = "prompt_opt"

    def fit(self, view: UserView) -> None:
        cfg: PromptOptConfig = self.cfg
        self.system = self.mctx.prompts.get("baseline_system", "")
        self.trace: list[dict[str, Any]] = []
        turns = list(view.history)
        if not turns or cfg.rounds == 0:
            self.score = float("nan")
            return
        rng = rng_for("prompt_opt", self.mctx.seed)
        eval_idx = rng.choice(len(turns), size=min(cfg.eval_turns, len(turns)), replace=False)
        self.eval_turns = [turns[i] for i in sorted(eval_idx)]
        self._targets = self._embed_targets(self.eval_turns)
        self.score = self.proxy([self.system])[0]
        self.trace.append({"round": 0, "prompt": self.system, "score": self.score})
        templates = self.mctx.prompts["optimizer"]
        for r in range(1, cfg.rounds + 1):
            shown = [turns[i] for i in rng.choice(len(turns), size=min(cfg.examples, len(turns)), replace=False)]
            examples = "\n".join(
                fill(templates["example"], "optimizer.example", prompt=t.prompt, chosen=t.chosen,
                     rejected=t.rejected[int(rng.integers(len(t.rejected)))] if t.rejected else "")
                for t in shown)
            meta = fill(templates["user"], "optimizer.user", score=self.score, current=self.system, examples=examples)
            request = chat(meta, "", {**self.params("optimize", r, n=cfg.candidates, temperature=cfg.temperature),
                                      "max_tokens": cfg.max_prompt_tokens})
            proposals = [extract_prompt(t) for t in generate_texts(self.mctx.llm, [request])[0]]
            proposals = [p for p in dict.fromkeys(proposals) if p and p != self.system]
            for prompt, score in zip(proposals, self.proxy(proposals), strict=True):
                self.trace.append({"round": r, "prompt": prompt, "score": score})
                if score > self.score:
                    self.system, self.score = prompt, score

    def _embed_targets(self, turns: list[Turn]) -> list[tuple[np.ndarray, np.ndarray]]:
        emb = self.mctx.embedder
        chosen = emb.embed([t.chosen for t in turns])
        return [(chosen[i], emb.embed(list(t.rejected)) if t.rejected else np.zeros((0, chosen.shape[1])))
                for i, t in enumerate(turns)]

    def proxy(self, systems: list[str]) -> list[float]:
        """Mean over eval turns of cos(response, preferred) - mean cos(response, rejected), per system prompt."""
        if not systems:
            return []
        requests = [chat(t.prompt, s, self.params("proxy", t.prompt)) for s in systems for t in self.eval_turns]
        texts = [r[0] for r in generate_texts(self.mctx.llm, requests)]
        emb = self.mctx.embedder.embed(texts).reshape(len(systems), len(self.eval_turns), -1)
        scores = []
        for s in range(len(systems)):
            per_turn = []
            for j, (chosen, rejected) in enumerate(self._targets):
                r = emb[s, j][None]
                neg = float(cosine(r, rejected).mean()) if len(rejected) else 0.0
                per_turn.append(float(cosine(r, chosen[None])[0, 0]) - neg)
            scores.append(float(np.mean(per_turn)))
        return scores

    def respond_all(self, prompts: list[str]) -> list[str]:
        return self.ask(prompts, self.system)

    def info(self) -> dict[str, Any]:
        return {"system_prompt": self.system, "proxy_score": self.score, "proposals": len(self.trace)}
