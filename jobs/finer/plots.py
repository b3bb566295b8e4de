"""The job's figures: paired accuracy per split before/after tuning, and accuracy against granularity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paired_by_split(table: pd.DataFrame) -> Any:
    """Grouped bars: paired accuracy per split (x), one bar per (model, variant)."""
    plt = _plt()
    splits = list(dict.fromkeys(table["split"]))
    variants = list(dict.fromkeys(zip(table["model"], table["variant"], strict=True)))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(splits) * max(1, len(variants)) / 2), 3.6))
    width = 0.8 / max(len(variants), 1)
    for k, (model, variant) in enumerate(variants):
        sub = table[(table["model"] == model) & (table["variant"] == variant)].set_index("split")
        values = [float(sub["paired_accuracy"].get(s, np.nan)) for s in splits]
        ax.bar(np.arange(len(splits)) + k * width, values, width, label=f"{model.split('/')[-1]} · {variant}")
    ax.set_xticks(np.arange(len(splits)) + width * (len(variants) - 1) / 2, splits, rotation=20)
    ax.set_ylabel("paired accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def granularity(table: pd.DataFrame) -> Any:
    """Row and paired accuracy against how many elements the query names, one line per (model, variant)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for (model, variant), sub in table.groupby(["model", "variant"], sort=False):
        sub = sub.sort_values("granularity")
        label = f"{model.split('/')[-1]} · {variant}"
        axes[0].plot(sub["granularity"], sub["row_accuracy"], marker="o", label=label)
        axes[1].plot(sub["granularity"], sub["paired_accuracy"], marker="o", label=label)
    axes[0].set_title("row accuracy")
    axes[1].set_title("paired accuracy")
    for ax in axes:
        ax.set_xlabel("granularity (elements named)")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
