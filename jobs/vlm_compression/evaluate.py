"""Evaluation through a `HookedModel` server: multiple-choice / yes-no VQA by the logits of the options'
first tokens at the answer position, and perplexity of held-out text; scores relative to the unpruned model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.servers import ForwardRequest
from jobs.vlm_compression.data import Item
from jobs.vlm_compression.prompts import option_tokens, question_text


def vqa_accuracy(hooked: Any, loaded: Any, items: list[Item], batch: int = 16) -> dict[str, float]:
    """Accuracy per benchmark: the option whose first token has the highest logit is the answer."""
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        reqs = [ForwardRequest(text=question_text(loaded, it), images=None if it.image is None else [it.image],
                               return_logits="last") for it in chunk]
        for it, result in zip(chunk, hooked.forward(reqs), strict=True):
            ids = option_tokens(loaded, it.options)
            picked = int(np.argmax(np.asarray(result.logits)[ids]))
            correct.setdefault(it.benchmark, []).append(picked == it.answer)
    return {name: float(np.mean(hits)) for name, hits in correct.items()}


def perplexity(hooked: Any, loaded: Any, texts: list[str], batch: int = 16) -> float:
    """exp of the mean next-token negative log-likelihood over all tokens of ``texts``."""
    nll, count = 0.0, 0
    tok = loaded.tokenizer
    for start in range(0, len(texts), batch):
        ids = [tok(t)["input_ids"] for t in texts[start:start + batch]]
        results = hooked.forward([ForwardRequest(token_ids=s, return_logits="all") for s in ids])
        for seq, result in zip(ids, results, strict=True):
            logits = np.asarray(result.logits, dtype=np.float64)[:-1]
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
            count += len(seq) - 1
    return float(np.exp(nll / max(count, 1)))


def scores(hooked: Any, loaded: Any, items: list[Item], texts: list[str], batch: int = 16) -> dict[str, float]:
    """Every benchmark's accuracy and ``perplexity``."""
    return {**vqa_accuracy(hooked, loaded, items, batch), "perplexity": perplexity(hooked, loaded, texts, batch)}


def relative(score: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Score relative to the unpruned model (perplexity: base / pruned, so higher is better everywhere);
    NaN where the base scores 0."""
    out = {}
    for name, value in score.items():
        ref = base[name]
        if name == "perplexity":
            out[name] = ref / value if value > 0 else float("nan")
        else:
            out[name] = value / ref if ref > 0 else float("nan")
    return out


def rows(tags: dict[str, Any], score: dict[str, float], base: dict[str, float]) -> list[dict[str, Any]]:
    rel = relative(score, base)
    return [{**tags, "benchmark": name, "score": value, "relative": rel[name]} for name, value in score.items()]


def average_relative(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's AVG-%: mean relative score over the VQA benchmarks (perplexity excluded), per setting."""
    keys = ["method", "ratio", "recovery", "fraction"]
    vqa = table[table["benchmark"] != "perplexity"]
    avg = vqa.groupby(keys, as_index=False, dropna=False)["relative"].mean()
    return avg.rename(columns={"relative": "avg_relative"})
