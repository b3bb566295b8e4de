"""Plots: block influence per block, relative score vs compression per method, recovery vs data fraction."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_influence(importance: pd.DataFrame, removed: list[int] | None = None) -> Any:
    plt = _plt()
    bi = importance[importance["kind"] == "block"].sort_values("layer")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(bi) + 2), 3.2))
    colours = ["tab:red" if removed and int(i) in removed else "tab:blue" for i in bi["layer"]]
    ax.bar(bi["layer"], bi["score"], color=colours)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block influence (sum of 1 - cos)")
    ax.set_title("ShortGPT block influence (red: removed first)")
    fig.tight_layout()
    return fig


def relative_vs_compression(avg: pd.DataFrame) -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pruned = avg[avg["method"] != "unpruned"]
    for (method, recovery, fraction), group in pruned.groupby(["method", "recovery", "fraction"]):
        group = group.sort_values("ratio")
        label = f"{method}, {recovery}" + (f" ({fraction:g})" if recovery != "none" else "")
        ax.plot(group["ratio"], group["avg_relative"], marker="o", linestyle="-" if recovery == "none" else "--",
                label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("compression of the decoder blocks")
    ax.set_ylabel("mean score relative to unpruned")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def recovery_vs_fraction(avg: pd.DataFrame) -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pruned = avg[avg["method"] != "unpruned"]
    zero = pruned[pruned["recovery"] == "none"]
    trained = pruned[pruned["recovery"] != "none"]
    for (method, ratio, recovery), group in trained.groupby(["method", "ratio", "recovery"]):
        group = group.sort_values("fraction")
        line = ax.plot(group["fraction"], group["avg_relative"], marker="o", label=f"{method} {ratio:g}, {recovery}")
        base = zero[(zero["method"] == method) & (zero["ratio"] == ratio)]["avg_relative"]
        if len(base):
            ax.axhline(float(base.iloc[0]), color=line[0].get_color(), linestyle=":", linewidth=0.8)
    if len(trained) and np.all(trained["fraction"] > 0):
        ax.set_xscale("log")
    ax.set_xlabel("fraction of the training data")
    ax.set_ylabel("mean score relative to unpruned")
    ax.set_title("recovery (dotted: zero-shot)")
    if len(trained):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
