"""Routing: a router trained on the user's history picks, for each new prompt, among responses of
principle-conditioned strategies.

Strategies: the default (no system prompt) and one system prompt per principle of the public
vocabulary (its instruction), or per pair of principles with ``max_principles: 2``. The router is
a Bradley-Terry preference model over response features: P(a preferred to b) =
sigmoid(theta . (phi(a) - phi(b))), fitted by L2-regularised logistic regression on every
(preferred, rejected) pair of the history. For a new prompt the base LLM answers under every
strategy and the router returns the candidate with the highest theta . phi.

Features ``phi``: the text embedder (``embedding``), hand-made style statistics (``style``: length,
sentences, punctuation, lists, pronouns, ...), or both.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Literal

import numpy as np
from pydantic import Field

from explab.config import Section
from jobs.apm.llm import chat, generate_texts
from jobs.apm.methods.base import Method, UserView


class RoutingConfig(Section):
    features: Literal["embedding", "style", "both"] = "embedding"
    l2: float = Field(1.0, gt=0.0)  # inverse of sklearn's C
    max_principles: int = Field(1, ge=1, le=2)  # principles combined in one strategy


_SENT = re.compile(r"[.!?]+")


def style_features(texts: list[str]) -> np.ndarray:
    rows = []
    for t in texts:
        words = t.split()
        n = max(len(words), 1)
        sentences = max(len(_SENT.findall(t)), 1)
        low = t.lower()
        rows.append([
            np.log1p(len(words)), np.log1p(sentences), len(words) / sentences,
            t.count("!") / sentences, t.count("?") / sentences, t.count(",") / n, t.count(":") / sentences,
            sum(line.lstrip()[:1] in "-*•" or line.lstrip()[:2].rstrip(".").isdigit() for line in t.splitlines()),
            sum(w in ("i", "me", "my") for w in low.split()) / n, sum(w in ("you", "your") for w in low.split()) / n,
            sum("'" in w for w in words) / n, float(np.mean([len(w) for w in words])) if words else 0.0,
            sum(c.isupper() for c in t) / max(len(t), 1), sum(c.isdigit() for c in t) / max(len(t), 1),
        ])
    return np.asarray(rows, dtype=np.float64)


class Routing(Method):
    name = "routing"

    def strategies(self) -> list[tuple[str, str]]:
        base = self.mctx.prompts.get("baseline_system", "")
        out = [("default", base)]
        for size in range(1, self.cfg.max_principles + 1):
            for combo in itertools.combinations(self.mctx.principles, size):
                out.append(("+".join(p.name for p in combo), " ".join([base, *(p.instruction for p in combo)]).strip()))
        return out

    def features(self, texts: list[str]) -> np.ndarray:
        parts = []
        if self.cfg.features in ("embedding", "both"):
            parts.append(np.asarray(self.mctx.embedder.embed(texts), dtype=np.float64))
        if self.cfg.features in ("style", "both"):
            s = style_features(texts)
            parts.append((s - self._mu) / self._sd if hasattr(self, "_mu") else s)
        return np.concatenate(parts, axis=1)

    def fit(self, view: UserView) -> None:
        from sklearn.linear_model import LogisticRegression

        pairs = [(t.chosen, r) for t in view.history for r in t.rejected]
        self.theta: np.ndarray | None = None
        self.picks: dict[str, int] = {}
        if not pairs:
            return
        if self.cfg.features in ("style", "both"):
            s = style_features([t for pair in pairs for t in pair])
            self._mu, self._sd = s.mean(axis=0), s.std(axis=0) + 1e-6
        chosen = self.features([c for c, _ in pairs])
        rejected = self.features([r for _, r in pairs])
        diff = chosen - rejected
        keep = np.abs(diff).sum(axis=1) > 0  # identical responses carry no preference
        if not keep.any():
            return
        x = np.concatenate([diff[keep], -diff[keep]])
        y = np.concatenate([np.ones(keep.sum()), np.zeros(keep.sum())])
        model = LogisticRegression(C=1.0 / self.cfg.l2, fit_intercept=False, max_iter=2000)
        model.fit(x, y)
        self.theta = model.coef_[0]

    def respond_all(self, prompts: list[str]) -> list[str]:
        strategies = self.strategies()
        requests = [chat(p, system, self.params("respond", p)) for p in prompts for _, system in strategies]
        texts = [r[0] for r in generate_texts(self.mctx.llm, requests)]
        out = []
        for i in range(len(prompts)):
            cands = texts[i * len(strategies):(i + 1) * len(strategies)]
            if self.theta is None:
                best = 0  # nothing learned: the default strategy
            else:
                utility = self.features(cands) @ self.theta
                best = int(np.argmax(utility))  # ties: the earliest strategy (default first)
            name = strategies[best][0]
            self.picks[name] = self.picks.get(name, 0) + 1
            out.append(cands[best])
        return out

    def info(self) -> dict[str, Any]:
        top = max(self.picks, key=self.picks.get) if self.picks else ""
        return {"top_strategy": top, "strategy_counts": ",".join(f"{k}:{v}" for k, v in sorted(self.picks.items()))}
