"""The semantic search of one class: activation maximisation in the space of text descriptors.

Each round the proposer gives up to K new descriptors (deduplicated against every earlier one,
re-asked up to ``max_attempts`` times when duplicates leave fewer than K); the renderer draws N
images per descriptor from the same N slot seeds (so scores are comparable across descriptors
and rounds); the black box scores each descriptor as

    s(d) = mean_i p(y | x_i) − λ · mean_i max_{c ≠ y} p(c | x_i)

(λ = ``specificity``; λ = 0 is the plain class probability). The top-M descriptors so far, lowest
score first, are the memory the proposer sees next round. The search stops after T rounds, or
when the best score has not improved by more than ``min_improvement`` for ``patience`` rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from explab.config import Section
from jobs.unbox.blackbox import BlackBox
from jobs.unbox.dedup import Deduper
from jobs.unbox.proposers import Proposer, Scored, key
from jobs.unbox.renderers import Renderer


class SearchConfig(Section):
    descriptors: int = Field(10, ge=1)  # K per round
    images: int = Field(4, ge=1)  # N renders per descriptor
    rounds: int = Field(10, ge=1)  # T
    memory: int = Field(20, ge=1)  # M descriptors fed back
    patience: int | None = Field(3, ge=1)  # rounds without improvement before stopping (None: run all T)
    min_improvement: float = Field(0.0, ge=0.0)
    specificity: float = Field(0.0, ge=0.0)  # λ
    max_attempts: int = Field(3, ge=1)  # proposer calls per round to fill K after deduplication
    parallel_classes: int = Field(4, ge=1)  # classes searched at once (their requests share the servers)


@dataclass
class ClassSearch:
    """What one class's search produced: every scored descriptor, and the best score per round."""

    cls: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # round, descriptor, score, p_class, p_other
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round, best, best_so_far, n_descriptors
    stopped: str = "rounds"  # "rounds" or "patience"

    def ranked(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: (-r["score"], r["round"], r["descriptor"]))

    def memory(self, m: int) -> list[Scored]:
        top = self.ranked()[:m]
        return [Scored(r["descriptor"], r["score"]) for r in reversed(top)]


def score_descriptors(descriptors: Sequence[str], seeds: Sequence[int], *, renderer: Renderer, box: BlackBox,
                      target: int, specificity: float, purpose: str = "search"
                      ) -> tuple[list[dict[str, float]], list[list[np.ndarray]]]:
    """Render N images per descriptor and score them through the black box (see the module docstring)."""
    images = renderer.render(descriptors, seeds)
    flat = [im for ims in images for im in ims]
    if not flat:
        return [], images
    probs = box.predict_proba(flat, purpose).reshape(len(descriptors), len(seeds), -1)
    p_class = probs[..., target]
    others = np.delete(probs, target, axis=-1)
    p_other = others.max(axis=-1) if others.shape[-1] else np.zeros_like(p_class)
    top1 = probs.argmax(axis=-1) == target
    out = [{"p_class": float(p_class[i].mean()), "p_other": float(p_other[i].mean()),
            "top1": float(top1[i].mean()),
            "score": float(p_class[i].mean() - specificity * p_other[i].mean())} for i in range(len(descriptors))]
    return out, images


def search_class(cls: str, target: int, *, proposer: Proposer, renderer: Renderer, box: BlackBox,
                 deduper: Deduper, cfg: SearchConfig, seeds: Sequence[int],
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> ClassSearch:
    """Search descriptors that maximise class ``cls`` (output index ``target``) of the black box."""
    out = ClassSearch(cls)
    best, stale = -np.inf, 0
    for t in range(cfg.rounds):
        memory = out.memory(cfg.memory)
        seen = {key(r["descriptor"]) for r in out.rows}
        fresh: list[str] = []
        for attempt in range(cfg.max_attempts):
            need = cfg.descriptors - len(fresh)
            proposals = proposer.propose(cls, memory, need, round=t, attempt=attempt,
                                         seen=seen | {key(d) for d in fresh})
            fresh += deduper.accept(proposals, need)
            if len(fresh) >= cfg.descriptors:
                break
        scores, _ = score_descriptors(fresh, seeds, renderer=renderer, box=box, target=target,
                                      specificity=cfg.specificity)
        for d, s in zip(fresh, scores, strict=True):
            out.rows.append({"round": t, "descriptor": d, **s})
        round_best = max((s["score"] for s in scores), default=-np.inf)
        improved = round_best > best + cfg.min_improvement
        best = max(best, round_best)
        stale = 0 if improved else stale + 1
        row = {"round": t, "best": float(round_best) if scores else float("nan"), "best_so_far": float(best),
               "n_descriptors": len(fresh)}
        out.rounds.append(row)
        if on_round is not None:
            on_round({"cls": cls, **row})
        if cfg.patience is not None and stale >= cfg.patience:
            out.stopped = "patience"
            break
    return out
