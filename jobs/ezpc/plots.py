"""EZPC's figures: loss curves, top-concept bar charts, accuracy retained per dataset, faithfulness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: dict[str, list[float]], title: str, best_epoch: int | None = None) -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    epochs = np.arange(len(history["total"]))
    for ax, key in zip(axes, ("total", "matching", "reconstruction"), strict=True):
        ax.plot(epochs, history[key], lw=1.2)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", lw=1)
        ax.set_title(f"{key} loss")
        ax.set_xlabel("epoch")
        ax.set_yscale("log" if min(history[key]) > 0 else "linear")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def explanation_bars(table: pd.DataFrame, images: dict[int, Any], class_names: Sequence[str], title: str) -> Any:
    """One panel per image: the image (when given) and its top concepts' contributions."""
    plt = _plt()
    ids = list(dict.fromkeys(table["image"].tolist()))
    has_images = bool(images)
    cols = 2 if has_images else 1
    fig, axes = plt.subplots(len(ids), cols, figsize=(4.5 * cols + 1, 2.6 * len(ids)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]} if has_images else None)
    for row, image_id in enumerate(ids):
        part = table[table["image"] == image_id].sort_values("rank")
        pred = int(part["predicted"].iloc[0])
        label = int(part["label"].iloc[0])
        truth = class_names[label] if 0 <= label < len(class_names) else "?"
        bar_ax = axes[row, -1]
        y = np.arange(len(part))
        bar_ax.barh(y, part["contribution"], color="#2E8B57")
        bar_ax.set_yticks(y, part["concept"].tolist(), fontsize=8)
        bar_ax.invert_yaxis()
        bar_ax.set_xlabel("contribution to the predicted class's logit", fontsize=8)
        bar_ax.set_title(f"image {image_id}: predicted {class_names[pred]!r} (true {truth!r})", fontsize=9)
        if has_images:
            ax = axes[row, 0]
            if image_id in images:
                ax.imshow(images[image_id])
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_retained(results: pd.DataFrame) -> Any:
    """Grouped bars per (dataset, backbone): CLIP's and the bottleneck's zero-shot accuracy."""
    plt = _plt()
    labels = [f"{d}\n{b}" for d, b in zip(results["dataset"], results["backbone_short"], strict=True)]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 1.5), 3.6))
    ax.bar(x - 0.2, results["acc_clip"], 0.4, label="CLIP zero-shot")
    ax.bar(x + 0.2, results["acc_ezpc"], 0.4, label="through the concept bottleneck")
    for xi, (a, r) in enumerate(zip(results["acc_ezpc"], results["retained"], strict=True)):
        ax.text(xi + 0.2, a, f"{100 * r:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("accuracy (all classes)")
    ax.set_title("zero-shot accuracy retained through the concepts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def faithfulness(table: pd.DataFrame) -> Any:
    """Prediction flip rate vs k when deleting the top-k concepts or k random ones, per pair."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (dataset, backbone), part in table.groupby(["dataset", "backbone_short"], sort=False):
        line = ax.plot(part["k"], part["topk_flip"], marker="o", label=f"{dataset} / {backbone}: top-k")[0]
        ax.plot(part["k"], part["random_flip"], marker="x", ls="--", color=line.get_color(), label="  random k")
    ax.set_xlabel("concepts deleted (k)")
    ax.set_ylabel("predictions changed")
    ax.set_title("faithfulness: deleting the top-k vs k random concepts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def transfer(table: pd.DataFrame) -> Any:
    """Accuracy retained when the A learned on one dataset (rows) classifies another's images (columns)."""
    plt = _plt()
    groups = list(table.groupby("backbone_short", sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups) + 0.6, 3.2), squeeze=False)
    for ax, (backbone, part) in zip(axes[0], groups, strict=True):
        grid = part.pivot(index="source", columns="target", values="retained")
        values = grid.to_numpy()
        image = ax.imshow(values, vmin=0.0, vmax=max(1.0, float(np.nanmax(values))), cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{100 * value:.0f}%", ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=8)
        ax.set_xlabel("target (images, class names)")
        ax.set_ylabel("source of A")
        ax.set_title(f"{backbone}: accuracy retained", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def region_heatmaps(images: Sequence[Any], maps: np.ndarray, concepts: Sequence[Sequence[str]],
                    captions: Sequence[str], title: str) -> Any:
    """One row per image: the image, then each of its top concepts' heatmap ([0, 1]) over it."""
    plt = _plt()
    n, m = maps.shape[:2]
    fig, axes = plt.subplots(n, m + 1, figsize=(2.3 * (m + 1), 2.4 * n + 0.4), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(captions[i], fontsize=8)
        for j in range(m):
            ax = axes[i, j + 1]
            ax.imshow(images[i])
            ax.imshow(maps[i, j], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
            ax.set_title(concepts[i][j], fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
