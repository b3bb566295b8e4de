"""The job's figures: polylogue examples, probe AUROC vs baselines, accuracy vs alpha per stage."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def polylogue_examples(frames: dict[str, pd.DataFrame], traits: dict[str, list[str]], layers: dict[str, int],
                       n_examples: int, seed: int) -> Any:
    """Cosine series of a few correct (green) and incorrect (red) responses; rows: models, cols: the
    traits of each model (``traits[model]``, in the order of its frame's cosine columns)."""
    plt = _plt()
    rng = np.random.default_rng(seed)
    cols = max(len(t) for t in traits.values())
    fig, axes = plt.subplots(len(frames), cols, figsize=(3.2 * cols, 2.6 * len(frames)), squeeze=False, sharex="row")
    for row, (model, frame) in enumerate(frames.items()):
        layer, k = layers[model], len(traits[model])
        for correct, color in ((True, "tab:green"), (False, "tab:red")):
            pool = np.flatnonzero((frame["correct"] == correct).to_numpy() & (frame["n_tokens"] > 0).to_numpy())
            picks = rng.choice(pool, size=min(n_examples, len(pool)), replace=False) if len(pool) else []
            for i in picks:
                r = frame.iloc[int(i)]
                cos = np.asarray(r[f"cos_{layer}"]).reshape(r["n_tokens"], k)
                para = np.asarray(r["paragraph"])
                starts = np.flatnonzero(np.diff(para)) + 1
                for j, ax in enumerate(axes[row][:k]):
                    ax.plot(cos[:, j], color=color, alpha=0.7, lw=0.9,
                            label=("correct" if correct else "incorrect") if i == picks[0] else None)
                    for s in starts:
                        ax.axvline(s, color=color, ls=":", lw=0.6, alpha=0.5)
        for j, ax in enumerate(axes[row][:k]):
            ax.set_title(f"{model} · {traits[model][j]} (layer {layer})", fontsize=8)
            ax.set_xlabel("generated token")
            ax.axhline(0.0, color="grey", lw=0.5)
        axes[row][0].set_ylabel("cos(h, v)")
        axes[row][0].legend(fontsize=7)
    fig.suptitle("polylogue: trait alignment over the response (dotted: paragraph starts)", fontsize=9)
    fig.tight_layout()
    return fig


def probe_bars(probe: pd.DataFrame) -> Any:
    """Cross-validated AUROC of the polylogue probe and the baselines (first layer of each model)."""
    plt = _plt()
    models = list(dict.fromkeys(probe["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = probe[probe.model == model]
        mine = mine[mine.layer == mine.layer.iloc[0]]
        colors = ["tab:blue" if f == "polylogue" else "tab:cyan" if f.startswith("trait:") else "tab:grey"
                  for f in mine.feature_set]
        x = np.arange(len(mine))
        ax.bar(x, mine["auroc"].fillna(0.0), yerr=mine["auroc_std"].fillna(0.0), color=colors, capsize=2)
        ax.axhline(0.5, color="black", ls="--", lw=0.8, label="chance")
        ax.set_xticks(x, mine["feature_set"], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("cross-validated AUROC")
        ax.set_title(f"{model}: predicting correctness (layer {int(mine.layer.iloc[0])})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def steering_curves(steering: pd.DataFrame) -> Any:
    """Accuracy vs alpha, one line per stage (paragraph), one panel per (model, trait)."""
    plt = _plt()
    panels = [(m, t) for m in dict.fromkeys(steering["model"]) for t in dict.fromkeys(
        steering.loc[(steering.model == m) & (steering.trait != "none"), "trait"])]
    cols = min(3, max(1, len(panels)))
    rows = int(np.ceil(max(1, len(panels)) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax, (model, trait) in zip(axes.ravel(), panels, strict=False):
        mine = steering[(steering.model == model) & (steering.trait == trait)]
        base = float(steering.loc[(steering.model == model) & (steering.setting == 0), "accuracy"].iloc[0])
        for stage, group in mine.groupby("stage"):
            pts = pd.concat([group[["alpha", "accuracy"]], pd.DataFrame({"alpha": [0.0], "accuracy": [base]})])
            pts = pts.sort_values("alpha")
            ax.plot(pts["alpha"], pts["accuracy"], marker="o", ms=3, label=f"paragraph {stage}")
        ax.axhline(base, color="grey", ls="--", lw=0.8)
        ax.set_title(f"{model} · steer {trait}", fontsize=8)
        ax.set_xlabel("α")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
