"""Evaluation through a shared `HookedModel`: the MC prompt with its image, greedy decoding of at most
two tokens, the answer letter parsed.

Greedy decoding runs as forward passes of the server (the servers' ``generate`` takes no images): the
first pass returns the greedy next token; when it holds no letter a second pass continues the
assistant turn with it (``assistant_prefix``) for the second token. As the parser takes the first
letter, a first token that holds one decides the answer and the second pass is skipped; a special
token (end of turn, decoded as "") ends the answer.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from jobs.finer.benchmark import mc_prompt
from jobs.finer.metrics import parse_letter

MAX_NEW_TOKENS = 2


def _request(row: dict[str, Any], image: Any, prefix: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": mc_prompt(row["question"], list(row["choices"]))}],
            "images": [image], "assistant_prefix": prefix, "return_logits": "last"}


def answer(handle: Any, rows: list[dict[str, Any]], images: dict[str, Any], chunk: int = 64) -> list[str]:
    """The greedy answer (at most ``MAX_NEW_TOKENS`` tokens) of the served model to each MC row."""
    texts = [""] * len(rows)
    pending = list(range(len(rows)))
    stopped: set[int] = set()
    for _ in range(MAX_NEW_TOKENS):
        if not pending:
            break
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            results = handle.forward([_request(rows[i], images[rows[i]["image_id"]], texts[i]) for i in part])
            for i, result in zip(part, results, strict=True):
                if not result.next_token:
                    stopped.add(i)
                texts[i] += result.next_token or ""
        pending = [i for i in pending if parse_letter(texts[i]) < 0 and i not in stopped]
    return texts


def evaluate(handle: Any, items: pd.DataFrame, images: dict[str, Any]) -> pd.DataFrame:
    """``items`` with the model's ``response`` and parsed ``pred`` (-1: invalid)."""
    rows = items.to_dict("records")
    responses = answer(handle, rows, images)
    return items.assign(response=responses, pred=[parse_letter(t) for t in responses])
