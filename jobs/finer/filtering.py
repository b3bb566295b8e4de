"""The filtering pass of benchmark construction: keep only the pairs whose positive row a strong VLM
answers correctly (the authors drop items their filter model gets wrong on the positive, so a pair
measures hallucination on negatives, not failure to see the positive).

`filter_pairs` asks the filter model (a served `HookedModel`, as in evaluation) every ``_pos`` row and
keeps both rows of each pair whose positive it answers right; `kept_pairs` is the pure rule.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from jobs.finer.evaluate import evaluate


def kept_pairs(scored_pos: pd.DataFrame) -> set[str]:
    """The pair ids whose positive row (columns ``pair_id``, ``gt_index``, ``pred``) was answered right."""
    return set(scored_pos.loc[scored_pos["pred"] == scored_pos["gt_index"], "pair_id"])


def filter_pairs(handle: Any, items: pd.DataFrame, images: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, int]]:
    """``items`` reduced to the pairs the filter model answers right on the positive, and the counts
    (``pairs``, ``kept``, ``dropped``)."""
    pos = items[items["polarity"] == "pos"]
    keep = kept_pairs(evaluate(handle, pos, images)) if not pos.empty else set()
    kept = items[items["pair_id"].isin(keep)].reset_index(drop=True)
    pairs = int(items["pair_id"].nunique())
    return kept, {"pairs": pairs, "kept": len(keep), "dropped": pairs - len(keep)}
