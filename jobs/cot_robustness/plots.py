"""Figures: accuracy vs τ per intervention, length overhead, doubt vs recovery, forced doubt, size."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from jobs.cot_robustness.perturbations import INTERVENTIONS


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(names: Any) -> list[str]:
    return [n for n in INTERVENTIONS if n in set(names)]


def accuracy_vs_tau(summary: pd.DataFrame) -> Any:
    plt = _plt()
    s = summary[(summary["domain"] == "all") & (summary["marker"] == "")]
    models = list(dict.fromkeys(s["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        m = s[s["model"] == model]
        for name in _order(m["intervention"]):
            g = m[m["intervention"] == name].sort_values("tau_target")
            ax.plot(g["tau_target"], g["accuracy"], marker="o", label=name)
        ax.set_title(model)
        ax.set_xlabel("intervention timestep τ")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("accuracy after the intervention")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return fig


def _grouped_bars(ax: Any, table: pd.DataFrame, label: Any) -> None:
    """One group of bars per row of ``table`` (x axis), one bar per column, labelled ``label(column)``."""
    width = 0.8 / max(len(table.columns), 1)
    x = np.arange(len(table.index))
    for k, column in enumerate(table.columns):
        ax.bar(x + k * width, table[column].fillna(0.0), width, label=label(column))
    ax.set_xticks(x + width * (len(table.columns) - 1) / 2, table.index, rotation=30, ha="right")


def length_overhead(summary: pd.DataFrame) -> Any:
    plt = _plt()
    s = summary[(summary["domain"] == "all") & (summary["marker"] == "")]
    g = s.groupby(["intervention", "model"])["authors_length_overhead_pct"].mean().unstack("model")
    g = g.reindex(_order(g.index))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _grouped_bars(ax, g, str)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("length overhead, the authors' (%)")
    ax.legend(fontsize=7)
    return fig


def doubt_vs_recovery(summary: pd.DataFrame, recovery: pd.DataFrame) -> Any:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    s = summary[(summary["domain"] == "all") & (summary["marker"] == "")]
    g = s.groupby(["model", "intervention"], as_index=False)[["doubt_any_after", "accuracy"]].mean()
    for name in _order(g["intervention"]):
        p = g[g["intervention"] == name]
        left.scatter(p["doubt_any_after"], p["accuracy"], label=name)
    left.set_xlabel("continuations expressing doubt (share)")
    left.set_ylabel("accuracy")
    left.legend(fontsize=7)
    r = recovery[recovery["marker"] == ""].groupby(["intervention", "doubt"])["accuracy"].mean().unstack("doubt")
    r = r.reindex(_order(r.index))
    x = np.arange(len(r.index))
    for k, flag in enumerate([False, True]):
        values = r[flag].fillna(0.0) if flag in r else np.zeros(len(x))
        right.bar(x + 0.4 * k, values, 0.4, label="doubt" if flag else "no doubt")
    right.set_xticks(x + 0.2, r.index, rotation=30, ha="right")
    right.set_ylabel("accuracy")
    right.legend(fontsize=7)
    return fig


def forced_doubt(summary: pd.DataFrame) -> Any:
    plt = _plt()
    s = summary[summary["domain"] == "all"]
    g = s.groupby(["intervention", "marker"])["accuracy"].mean().unstack("marker")
    g = g.reindex(_order(g.index))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _grouped_bars(ax, g, lambda marker: f"+ {marker!r}" if marker else "no marker")
    ax.set_ylabel("accuracy")
    ax.set_title("forced-doubt ablation")
    ax.legend(fontsize=7)
    return fig


def robustness_vs_size(summary: pd.DataFrame) -> Any:
    plt = _plt()
    s = summary[(summary["domain"] == "all") & (summary["marker"] == "")]
    g = s.groupby(["model", "category"], dropna=False).agg(size_b=("size_b", "first"), majority=("majority", "mean"))
    g = g.reset_index()
    models = list(dict.fromkeys(g.sort_values("size_b", na_position="first")["model"]))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for category in ("benign", "neutral", "adversarial"):
        p = g[g["category"] == category].set_index("model").reindex(models)
        ax.plot(range(len(models)), p["majority"], marker="o", label=category)
    sizes = g.drop_duplicates("model").set_index("model")["size_b"].reindex(models)
    ax.set_xticks(range(len(models)), [f"{m}\n{s:g}B" if s == s and s is not None else m
                                       for m, s in zip(models, sizes, strict=True)], fontsize=7)
    ax.set_ylabel("majority robustness")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    return fig


def save_all(ctx: Any, summary: pd.DataFrame, recovery: pd.DataFrame) -> list[str]:
    figures = {
        "accuracy_vs_tau": accuracy_vs_tau(summary),
        "length_overhead": length_overhead(summary),
        "doubt_vs_recovery": doubt_vs_recovery(summary, recovery),
        "forced_doubt": forced_doubt(summary),
        "robustness_vs_size": robustness_vs_size(summary),
    }
    for name, fig in figures.items():
        ctx.save_plot(name, fig)
    return list(figures)
