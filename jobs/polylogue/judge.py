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


def judge_batch(batch: pd.DataFrame, *, judge: Any, max_tokens: int, coherence: bool) -> pd.DataFrame:
    """Ray Data batch function: score each response's trait expression (and coherence), greedily."""
    params = {"temperature": 0.0, "max_tokens": max_tokens}
    requests, slots = [], []
    for i, row in enumerate(batch.itertuples(index=False)):
        trait = load_trait(row.trait)
        requests.append(_ask(trait.eval_prompt.format(question=row.question, answer=row.response)))
        slots.append((i, "trait_score"))
        if coherence:
            requests.append(_ask(prompts().coherence.format(question=row.question, answer=row.response)))
            slots.append((i, "coherence"))
    results = judge.generate(requests, params) if requests else []
    out = batch.copy()
    out["trait_score"] = np.nan
    out["coherence"] = np.nan
    for (i, column), result in zip(slots, results, strict=True):
        out.iloc[i, out.columns.get_loc(column)] = parse_score(result.completions[0].text)
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
