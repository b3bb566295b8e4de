"""Evaluation through a `HookedModel` server: multiple-choice / yes-no VQA by the logits of the options'
first tokens at the answer position, open questions by a greedy answer, each benchmark under its scoring rule
(`benchmarks`), and perplexity of held-out text; scores relative to the unpruned model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.servers import ForwardRequest
from jobs.vlm_compression.benchmarks import score_all
from jobs.vlm_compression.data import Item
from jobs.vlm_compression.prompts import option_tokens, question_text


def predict(hooked: Any, loaded: Any, items: list[Item], batch: int = 16,
            max_new_tokens: int = 16) -> list[int | str]:
    """Each item's prediction: a closed item's option whose first token has the highest logit at the answer
    position; an open item's greedy answer (`greedy_answers`)."""
    out: list[int | str] = [0] * len(items)
    closed = [i for i, it in enumerate(items) if not it.open]
    for start in range(0, len(closed), batch):
        chunk = closed[start:start + batch]
        reqs = [ForwardRequest(text=question_text(loaded, items[i]),
                               images=None if items[i].image is None else [items[i].image], return_logits="last")
                for i in chunk]
        for i, result in zip(chunk, hooked.forward(reqs), strict=True):
            ids = option_tokens(loaded, items[i].options)
            out[i] = int(np.argmax(np.asarray(result.logits)[ids]))
    opened = [i for i, it in enumerate(items) if it.open]
    for start in range(0, len(opened), batch):
        chunk = opened[start:start + batch]
        for i, text in zip(chunk, greedy_answers(hooked, loaded, [items[i] for i in chunk], max_new_tokens),
                           strict=True):
            out[i] = text
    return out


def greedy_answers(hooked: Any, loaded: Any, items: list[Item], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers through the server's forward pass (which takes images; its generation does not): one
    request per unfinished item and step, the prompt plus the answer so far, until a special token or a
    line break."""
    prompts = [question_text(loaded, it) for it in items]
    answers = [""] * len(items)
    live = list(range(len(items)))
    for _ in range(max_new_tokens):
        if not live:
            break
        reqs = [ForwardRequest(text=prompts[i] + answers[i], images=None if items[i].image is None
                               else [items[i].image], return_logits="last") for i in live]
        still = []
        for i, result in zip(live, hooked.forward(reqs), strict=True):
            token = result.next_token or ""
            if not token or "\n" in token:
                continue
            answers[i] += token
            still.append(i)
        live = still
    return [a.strip() for a in answers]


def vqa_scores(hooked: Any, loaded: Any, items: list[Item], batch: int = 16,
               max_new_tokens: int = 16) -> dict[str, float]:
    """Every benchmark's score under its rule (`benchmarks.score_all`)."""
    return score_all(items, predict(hooked, loaded, items, batch, max_new_tokens))


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


def scores(hooked: Any, loaded: Any, items: list[Item], texts: list[str], batch: int = 16,
           max_new_tokens: int = 16) -> dict[str, float]:
    """Every benchmark's score and ``perplexity``."""
    return {**vqa_scores(hooked, loaded, items, batch, max_new_tokens),
            "perplexity": perplexity(hooked, loaded, texts, batch)}


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
