"""Summary features of a polylogue series (per trait), the probes' inputs.

Per trait series ``x`` (T,) with paragraph labels: mean, std, min, max, slope (least squares over
normalised time t/(T-1), so it does not scale with length), first- and last-window means, the means
of paragraphs 0..n-1 and of the last paragraph. Undefined values (an empty response, a paragraph the
response never reached, the slope of one token) are NaN; the probes impute them inside each fold.
"""

from __future__ import annotations

import numpy as np

BASE = ("mean", "std", "min", "max", "slope", "first", "last")


def feature_names(n_paragraphs: int) -> list[str]:
    return [*BASE, *(f"para{k}" for k in range(n_paragraphs)), "last_para"]


def summary(x: np.ndarray, paragraphs: np.ndarray, window: int, n_paragraphs: int) -> np.ndarray:
    """The features of one series, in `feature_names` order."""
    x = np.asarray(x, dtype=np.float64)
    t = len(x)
    out = np.full(len(BASE) + n_paragraphs + 1, np.nan)
    if t == 0:
        return out
    slope = np.polyfit(np.linspace(0.0, 1.0, t), x, 1)[0] if t > 1 else np.nan
    out[: len(BASE)] = [x.mean(), x.std(), x.min(), x.max(), slope, x[:window].mean(), x[-window:].mean()]
    paragraphs = np.asarray(paragraphs)
    for k in range(n_paragraphs):
        mask = paragraphs == k
        if mask.any():
            out[len(BASE) + k] = x[mask].mean()
    out[-1] = x[paragraphs == paragraphs.max()].mean()
    return out


def series_features(series: np.ndarray, paragraphs: np.ndarray, window: int, n_paragraphs: int) -> np.ndarray:
    """(T, K) series -> (K * F,) features, trait-major."""
    series = np.asarray(series, dtype=np.float64)
    return np.concatenate([summary(series[:, k], paragraphs, window, n_paragraphs) for k in range(series.shape[1])])
