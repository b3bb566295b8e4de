"""seg_probe's figures: mIoU across the three stages, per-position accuracy, knockout vs control, masks."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STAGE_COLOURS = {"encoder": "tab:blue", "adapter": "tab:red", "llm": "tab:green"}


def miou_by_layer(table: pd.DataFrame) -> Any:
    """mIoU and pixel accuracy against depth (encoder -> adapter -> LLM), one colour per stage."""
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(table) + 3), 3.5))
    for stage, part in table.groupby("stage", sort=False):
        ax.plot(part["depth"], part["miou"], "o-", color=STAGE_COLOURS.get(stage), label=f"{stage} mIoU")
        ax.plot(part["depth"], part["pixel_acc"], "x:", color=STAGE_COLOURS.get(stage), alpha=0.6)
    ax.set_xticks(table["depth"], table["name"], rotation=90, fontsize=7)
    ax.set_ylabel("mIoU (o) / pixel acc (x)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def position_accuracy(table: pd.DataFrame) -> Any:
    """Per-token accuracy against raster position, one line per (layer, attention, probes)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if not table.empty:
        for (name, attention, probes), part in table.groupby(["name", "attention", "probes"], sort=False):
            style = "-" if attention == "causal" else "--"
            ax.plot(part["position"], part["accuracy"], style, label=f"{name} {attention} ({probes} probes)")
        ax.legend(fontsize=7)
    ax.set_xlabel("image token (raster position)")
    ax.set_ylabel("token accuracy")
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def knockout(table: pd.DataFrame) -> Any:
    """Mean accuracy change on the query tokens per re-probed layer: knockout vs random-key control."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if table.empty:
        ax.text(0.5, 0.5, "no confused pair had both queries and keys", ha="center", va="center")
    else:
        means = table.groupby(["knock_layer", "probe_layer"])[["delta_knockout", "delta_control"]].mean()
        labels = [f"ko@{k}\nprobe {p}" for k, p in means.index]
        x = np.arange(len(means))
        ax.bar(x - 0.2, means["delta_knockout"], 0.4, label="knockout")
        ax.bar(x + 0.2, means["delta_control"], 0.4, label="control (random keys)")
        ax.set_xticks(x, labels, fontsize=7)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    ax.set_ylabel("accuracy change on queries")
    fig.tight_layout()
    return fig


def _colour(labels: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20" if n_classes <= 20 else "nipy_spectral")
    rgb = cmap((labels % max(n_classes, 1)) / max(n_classes - 1, 1))[..., :3]
    rgb[labels == ignore_index] = 0
    return rgb


def masks(val: Any, probed: Any, names: list[str], n_images: int, n_classes: int, ignore_index: int,
          class_names: list[str] | None) -> Any:
    """For the first validation images: ground truth, then the probe's predicted mask at each chosen layer."""
    labels = val.labels().numpy()
    n = min(n_images, len(labels))
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.6 * (len(names) + 1), 1.6 * n + 0.3), squeeze=False)
    for i in range(n):
        panels = [("ground truth", labels[i]), *[(nm, probed.pixel_pred[nm][i].numpy()) for nm in names]]
        for j, (title, lab) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(_colour(lab, n_classes, ignore_index), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    if class_names and n_classes <= 12:
        fig.suptitle("  ".join(f"{k}={c}" for k, c in enumerate(class_names)), fontsize=6)
    fig.tight_layout()
    return fig
