"""Plots of method × model: mean agreement with 95% CI over seeds, and win rate against the baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _figure(n_groups: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(max(5.0, 1.2 * n_groups + 2), 3.8))


def _bars(ax: Any, summary: pd.DataFrame, methods: list[str], value: str, err: bool) -> None:
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(methods))
    for i, model in enumerate(models):
        part = summary[summary["model"] == model].set_index("method").reindex(methods)
        heights = part[value].to_numpy(dtype=float)
        yerr = None
        if err:
            yerr = np.vstack([heights - part["ci_low"].to_numpy(dtype=float),
                              part["ci_high"].to_numpy(dtype=float) - heights])
        ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, yerr=yerr, capsize=3, label=model)
    ax.set_xticks(x, methods, rotation=20)
    ax.legend(fontsize=8)


def method_model_scores(summary: pd.DataFrame, methods: list[str]) -> Any:
    fig, ax = _figure(len(methods))
    _bars(ax, summary, methods, "mean", err=True)
    ax.set_ylabel("agreement with hidden preferences")
    ax.set_ylim(0, 1)
    ax.set_title("APM: principle-wise judge agreement (mean ± 95% CI over seeds)")
    return fig


def win_rates(summary: pd.DataFrame, methods: list[str]) -> Any:
    fig, ax = _figure(len(methods))
    _bars(ax, summary, methods, "win_rate", err=False)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_ylabel("win rate vs non-personalized")
    ax.set_ylim(0, 1)
    ax.set_title("APM: pairwise win rate against the baseline")
    return fig
