"""From principle-wise judge scores to the benchmark's numbers.

- Agreement of one judged principle with the user's hidden preference ``w`` (only principles the
  user cares about, ``w != 0``): ``(s - low) / (high - low)`` when preferred, ``(high - s) / (high - low)``
  when dispreferred; 1 = exactly what the user wants on that principle, 0 = the opposite.
- A response's score: the mean agreement over the user's principles. A user's score: the mean
  over their test prompts. A seed's score: the mean over users.
- Summary per (model, method): the mean over seeds (each seed has its own C) with a t-based 95%
  CI, the paired difference to the baseline with a paired t-test across seeds (the paper's
  significance) and across (seed, user) units, and the pairwise win rate against the baseline
  (per prompt; ties count one half).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

SCORE_KEYS = ["seed", "model", "user", "method", "prompt"]


def agreement(judge: Any, preference: Any, low: float = 1, high: float = 5) -> np.ndarray:
    s = (np.asarray(judge, dtype=float) - low) / (high - low)
    w = np.asarray(preference)
    return np.where(w > 0, s, np.where(w < 0, 1.0 - s, np.nan))


def score_table(rows: list[dict[str, Any]] | pd.DataFrame, low: float = 1, high: float = 5) -> pd.DataFrame:
    """Judge rows → scores (one row per seed, model, user, method, prompt, principle with w != 0)."""
    df = pd.DataFrame(rows)
    df = df[df["preference"] != 0].copy()
    df["score"] = agreement(df["judge"], df["preference"], low, high)
    return df.sort_values([*SCORE_KEYS, "principle"], kind="stable").reset_index(drop=True)


def prompt_scores(scores: pd.DataFrame) -> pd.DataFrame:
    return scores.groupby(SCORE_KEYS, as_index=False)["score"].mean()


def unit_scores(scores: pd.DataFrame, by: tuple[str, ...] = ("seed", "user")) -> pd.DataFrame:
    """Mean score per ``by`` unit (e.g. seed×user), model and method."""
    per_prompt = prompt_scores(scores)
    return per_prompt.groupby(["model", "method", *by], as_index=False)["score"].mean()


def seed_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over users of each user's mean score, per seed, model and method."""
    users = unit_scores(scores, ("seed", "user"))
    return users.groupby(["model", "method", "seed"], as_index=False)["score"].mean()


def t_interval(values: Any, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a t confidence interval; the interval is the point when n < 2."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def paired_p(diffs: Any) -> float:
    """Two-sided p-value of a one-sample t-test of paired differences against 0."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float("nan")
    if np.allclose(d, d[0]):
        return 1.0 if abs(d[0]) < 1e-12 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired_improvement(scores: pd.DataFrame, method: str, baseline: str = "baseline", model: str | None = None,
                       by: tuple[str, ...] = ("seed", "user"), level: float = 0.95) -> dict[str, float]:
    """Mean per-unit difference (method − baseline) with its t CI and p-value; units are ``by`` groups."""
    units = unit_scores(scores, by)
    if model is not None:
        units = units[units["model"] == model]
    wide = units.pivot_table(index=["model", *by], columns="method", values="score")
    diffs = (wide[method] - wide[baseline]).dropna()
    mean, low, high = t_interval(diffs, level)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": float(len(diffs)), "p": paired_p(diffs)}


def win_rates(scores: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Per model and method: share of prompts where the method's score beats the baseline's (ties ½)."""
    per_prompt = prompt_scores(scores)
    base = per_prompt[per_prompt["method"] == baseline].drop(columns="method").rename(columns={"score": "base"})
    merged = per_prompt.merge(base, on=["seed", "model", "user", "prompt"])
    merged["win"] = np.where(merged["score"] > merged["base"], 1.0,
                             np.where(merged["score"] < merged["base"], 0.0, 0.5))
    return merged.groupby(["model", "method"], as_index=False)["win"].mean().rename(columns={"win": "win_rate"})


def summarize(scores: pd.DataFrame, baseline: str = "baseline", alpha: float = 0.05,
              level: float = 0.95) -> pd.DataFrame:
    """One row per (model, method): mean ± CI over seeds, difference to the baseline and its significance."""
    per_seed = seed_scores(scores)
    wins = win_rates(scores, baseline) if baseline in set(scores["method"]) else None
    rows = []
    for (model, method), group in per_seed.groupby(["model", "method"], sort=False):
        mean, low, high = t_interval(group["score"], level)
        row: dict[str, Any] = {"model": model, "method": method, "n_seeds": len(group), "mean": mean,
                               "ci_low": low, "ci_high": high,
                               "sd": float(group["score"].std(ddof=1)) if len(group) > 1 else 0.0}
        base = per_seed[(per_seed["model"] == model) & (per_seed["method"] == baseline)]
        if len(base):
            paired = group.merge(base, on=["model", "seed"], suffixes=("", "_base"))
            diffs = paired["score"] - paired["score_base"]
            d_mean, d_low, d_high = t_interval(diffs, level)
            users = paired_improvement(scores, method, baseline, model=model, level=level)
            row.update(delta=d_mean, delta_ci_low=d_low, delta_ci_high=d_high, p_seeds=paired_p(diffs),
                       p_users=users["p"], n_units=int(users["n"]))
            row["significant"] = bool(method != baseline and row["p_seeds"] < alpha)
        if wins is not None:
            match = wins[(wins["model"] == model) & (wins["method"] == method)]
            row["win_rate"] = float(match["win_rate"].iloc[0]) if len(match) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
