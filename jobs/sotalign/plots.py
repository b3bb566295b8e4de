"""Plots: R@1 vs the number of pairs per method, and the training curves."""

from __future__ import annotations

from typing import Any

import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def r1_vs_pairs(table: pd.DataFrame) -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if "zeroshot" in table else 1, figsize=(10 if "zeroshot" in table else 5, 3.6),
                             squeeze=False)
    for ax, metric, label in zip(axes[0], ("r1", "zeroshot"), ("retrieval R@1 (mean of both ways)",
                                                               "zero-shot accuracy"), strict=False):
        for (method, n_u), group in table.groupby(["method", "n_unpaired"]):
            group = group.sort_values("n_pairs")
            name = method if method != "full" else f"full ({n_u} unpaired)"
            ax.plot(group["n_pairs"], group[metric], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("number of pairs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SOTAlign: teacher vs pairs-only vs full")
    return fig


def training_curves(curves: pd.DataFrame) -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (method, n, n_u), group in curves.groupby(["method", "n_pairs", "n_unpaired"]):
        label = f"{method} N={n}" + (f" U={n_u}" if method == "full" else "")
        axes[0].plot(group["epoch"], group["r1"], label=label)
        axes[1].plot(group["epoch"], group["loss"], label=label)
    axes[0].set_ylabel("test R@1")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig
