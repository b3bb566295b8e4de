"""Robustness over the n continuations of an item, length overhead, doubt rates, and their aggregates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

# one trajectory group = one perturbed trace (its n continuations)
ITEM_KEYS = ["model", "size_b", "domain", "item_id", "intervention", "category", "tau_target", "marker"]
SUMMARY_KEYS = ["model", "size_b", "domain", "intervention", "category", "tau_target", "marker"]


def robustness(correct: Sequence[bool]) -> dict[str, float]:
    """Over an item's n samples: k correct; robust at least once (k ≥ 1), by majority (k > n/2), in all (k = n)."""
    n, k = len(correct), int(sum(bool(c) for c in correct))
    return {"n": n, "k_correct": k, "at_least_once": float(n > 0 and k >= 1),
            "majority": float(n > 0 and k >= n // 2 + 1), "all": float(n > 0 and k == n)}


def relative_change(new: float, old: float) -> float:
    """(new − old) / old; NaN when ``old`` is 0 (nothing to compare with)."""
    return (new - old) / old if old else math.nan


def authors_length_overhead(complete: int, inserted: int, original: int) -> float:
    """The authors' length overhead of one completion: (max(0, complete − inserted) − original) /
    original, where complete = perturbed prefix + continuation and inserted = the intervention's
    text; NaN when ``original`` is 0."""
    return relative_change(max(0, complete - inserted), original)


def doubt_rate(flags: Sequence[str]) -> float:
    """Share of units the judge said doubt the prior reasoning (unparsable counts as no); NaN without units."""
    return sum(f == "yes" for f in flags) / len(flags) if len(flags) else math.nan


def item_robustness(traj: pd.DataFrame) -> pd.DataFrame:
    """One row per perturbed trace: robustness over its samples, mean length overhead and doubt."""
    rows = []
    for key, g in traj.groupby(ITEM_KEYS, dropna=False, sort=True):
        rows.append({**dict(zip(ITEM_KEYS, key, strict=True)), "tau_actual": float(g["tau_actual"].iloc[0]),
                     **robustness(g["correct"].tolist()),
                     "length_overhead": float(g["length_overhead"].mean()),
                     "length_change": float(g["length_change"].mean()),
                     "authors_length_overhead": float(g["authors_length_overhead"].mean()),
                     "doubt_rate": float(g["doubt_rate"].mean()), "doubt_any": float(g["doubt_any"].mean())})
    return pd.DataFrame(rows)


def _aggregate(items: pd.DataFrame, traj: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    it = items.groupby(keys, dropna=False, sort=True).agg(
        items=("item_id", "size"), at_least_once=("at_least_once", "mean"), majority=("majority", "mean"),
        all=("all", "mean"), mean_k_correct=("k_correct", "mean"), tau_actual=("tau_actual", "mean"))
    tr = traj.groupby(keys, dropna=False, sort=True).agg(
        samples=("correct", "size"), accuracy=("correct", "mean"),
        length_overhead_pct=("length_overhead", "mean"), length_change_pct=("length_change", "mean"),
        authors_length_overhead_pct=("authors_length_overhead", "mean"),
        continuation_chars=("continuation_chars", "mean"), doubt_rate_after=("doubt_rate", "mean"),
        doubt_any_after=("doubt_any", "mean"),
        judge_unparsable=("verdict", lambda v: float((v == "unparsable").mean())),
        judge_rule_changed=("judge_rule_changed", "mean"))
    out = it.join(tr).reset_index()
    out[["length_overhead_pct", "length_change_pct", "authors_length_overhead_pct"]] *= 100.0
    return out


def summarize(traj: pd.DataFrame, cut_doubt: pd.DataFrame | None = None) -> pd.DataFrame:
    """Accuracy and robustness by model × domain × intervention × τ × marker (domain "all": every
    domain), length overhead in %, doubt after the cut (in the continuations) and, from ``cut_doubt``,
    before the cut (the kept prefix) and in the unperturbed remainder at the same τ."""
    traj = traj.assign(correct=traj["correct"].astype(float), doubt_any=traj["doubt_any"].astype(float))
    items = item_robustness(traj)
    parts = [_aggregate(items, traj, SUMMARY_KEYS),
             _aggregate(items.assign(domain="all"), traj.assign(domain="all"), SUMMARY_KEYS)]
    summary = pd.concat(parts, ignore_index=True)
    if cut_doubt is not None and len(cut_doubt):
        keys = ["model", "domain", "tau_target"]
        before = pd.concat([cut_doubt, cut_doubt.assign(domain="all")]).groupby(keys, dropna=False).agg(
            doubt_rate_before=("doubt_rate_prefix", "mean"), doubt_rate_unperturbed=("doubt_rate_remainder", "mean"))
        summary = summary.merge(before.reset_index(), on=keys, how="left")
    return summary.sort_values(SUMMARY_KEYS, na_position="first").reset_index(drop=True)


def doubt_vs_recovery(traj: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of continuations that express doubt vs those that do not, per model × intervention × marker."""
    keys = ["model", "intervention", "category", "marker"]
    t = traj.assign(correct=traj["correct"].astype(float), doubt=traj["doubt_any"].astype(bool))
    out = t.groupby([*keys, "doubt"], dropna=False, sort=True).agg(
        samples=("correct", "size"), accuracy=("correct", "mean"), doubt_rate=("doubt_rate", "mean"))
    return out.reset_index()


def headline(traj: pd.DataFrame, summary: pd.DataFrame) -> dict[str, float]:
    """The run's final metrics (plain trajectories, i.e. without a forced-doubt marker, unless named)."""
    base = traj[traj["marker"] == ""]
    forced = traj[traj["marker"] != ""]
    s = summary[(summary["domain"] == "all") & (summary["marker"] == "")]
    out = {"trajectories": float(len(traj)), "accuracy": _mean(base["correct"]),
           "majority_robustness": _mean(s["majority"]), "at_least_once_robustness": _mean(s["at_least_once"]),
           "all_robustness": _mean(s["all"]), "length_overhead_pct": _mean(s["length_overhead_pct"]),
           "authors_length_overhead_pct": _mean(s["authors_length_overhead_pct"]),
           "doubt_rate_after": _mean(base["doubt_rate"]), "judge_unparsable": _mean(traj["verdict"] == "unparsable"),
           "judge_rule_changed": _mean(traj["judge_rule_changed"])}
    if "doubt_rate_before" in s:
        out["doubt_rate_before"] = _mean(s["doubt_rate_before"])
    for category, g in base.groupby("category"):
        out[f"accuracy_{category}"] = _mean(g["correct"])
    if len(forced):
        out["forced_doubt_accuracy"] = _mean(forced["correct"])
        out["forced_doubt_delta"] = out["forced_doubt_accuracy"] - out["accuracy"]
    return out


def _mean(values: pd.Series | np.ndarray) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan
