"""The judge of trait expression and coherence (a `Generator` call) and the persona-vectors filter."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from jobs.polylogue.catalog import load_trait, prompts

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_score(text: str) -> float:
    """A 0-100 judge score from the judge's reply; NaN for REFUSAL or a reply with no valid number."""
    if "REFUSAL" in text.upper()[:16]:
        return math.nan
    match = _NUMBER.search(text)
    if not match:
        return math.nan
    value = float(match.group())
    return value if 0.0 <= value <= 100.0 else math.nan


def number_tokens(hooked: Any) -> dict[int, int]:
    """Token id → value for every number 0-100 the judge's tokenizer writes as one token (with or
    without a leading space), read through the HookedModel server's own tokenization."""
    texts = [t for n in range(101) for t in (str(n), f" {n}")]
    results = hooked.forward([{"text": t, "add_special_tokens": False} for t in texts])
    out: dict[int, int] = {}
    for text, result in zip(texts, results, strict=True):
        if len(result.token_ids) == 1:
            out.setdefault(int(result.token_ids[0]), int(text))
    return out


def weighted_score(logits: np.ndarray, numbers: dict[int, int], min_mass: float = 0.25) -> float:
    """The persona-vectors score: the judge's next-token probabilities over the number tokens 0-100,
    renormalised, times their values; NaN when those tokens hold less than ``min_mass`` of the
    probability (the judge meant something else, e.g. REFUSAL)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    ids = np.fromiter(numbers, dtype=np.int64)
    values = np.fromiter(numbers.values(), dtype=np.float64)
    mass = float(p[ids].sum()) if len(ids) else 0.0
    if mass < min_mass:
        return math.nan
    return float((p[ids] * values).sum() / mass)


def judge_batch(batch: pd.DataFrame, *, judge: Any, max_tokens: int, coherence: bool,
                numbers: dict[int, int] | None = None, min_mass: float = 0.25) -> pd.DataFrame:
    """Ray Data batch function: score each response's trait expression (and coherence).

    Without ``numbers``: the first number of the judge's greedy reply (a Generator). With
    ``numbers`` (`number_tokens`): ``judge`` is a HookedModel and the score is `weighted_score`
    of its next-token logits after the same prompt.
    """
    params = {"temperature": 0.0, "max_tokens": max_tokens}
    requests, slots = [], []
    for i, row in enumerate(batch.itertuples(index=False)):
        trait = load_trait(row.trait)
        requests.append(_ask(trait.eval_prompt.format(question=row.question, answer=row.response)))
        slots.append((i, "trait_score"))
        if coherence:
            requests.append(_ask(prompts().coherence.format(question=row.question, answer=row.response)))
            slots.append((i, "coherence"))
    out = batch.copy()
    out["trait_score"] = np.nan
    out["coherence"] = np.nan
    if numbers is not None:
        results = judge.forward([{**r, "return_logits": "last"} for r in requests]) if requests else []
        scores = [weighted_score(r.logits, numbers, min_mass) for r in results]
    else:
        results = judge.generate(requests, params) if requests else []
        scores = [parse_score(r.completions[0].text) for r in results]
    for (i, column), score in zip(slots, scores, strict=True):
        out.iloc[i, out.columns.get_loc(column)] = score
    return out


def _ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def keep_pairs(frame: pd.DataFrame, threshold: float, coherence: float | None) -> pd.Series:
    """Persona-vectors filter over paired responses (same trait, pair, question, sample):
    keep both when pos >= threshold, neg < 100 - threshold and (if judged) both are coherent."""
    key = ["trait", "pair", "question_index", "sample"]
    pos = frame[frame.polarity == "pos"].set_index(key)
    neg = frame[frame.polarity == "neg"].set_index(key)
    both = pos.merge(neg, left_index=True, right_index=True, suffixes=("_pos", "_neg"))
    ok = (both.trait_score_pos >= threshold) & (both.trait_score_neg < 100.0 - threshold)
    if coherence is not None:
        ok &= (both.coherence_pos >= coherence) & (both.coherence_neg >= coherence)
    kept = set(both.index[ok.to_numpy(bool)])
    keys = zip(frame.trait, frame.pair, frame.question_index, frame["sample"], strict=True)
    return pd.Series([k in kept for k in keys], index=frame.index, dtype=bool)
