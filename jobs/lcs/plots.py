"""LCS figures: the colour grid in the subspace, observed colour maps across steps, ΔE00 against the
intervention step, and before/after image grids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subspace_scatter(coords: np.ndarray, rgb: np.ndarray, anchors: dict[str, np.ndarray],
                     ratios: np.ndarray) -> Any:
    plt = _plt()
    fig = plt.figure(figsize=(6, 5.5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(coords[:, 0], coords[:, 1], coords[:, 2], c=np.clip(rgb, 0, 1), s=40, edgecolors="k", linewidths=0.3)
    for name, c in anchors.items():
        ax.text(c[0], c[1], c[2], name, fontsize=7)
    ax.plot(*np.stack([anchors["black"], anchors["white"]]).T, color="grey", lw=1, ls="--")
    ax.set_xlabel(f"PC1 ({ratios[0]:.1%})")
    ax.set_ylabel(f"PC2 ({ratios[1]:.1%})")
    ax.set_zlabel(f"PC3 ({ratios[2]:.1%})")
    ax.set_title("solid colours in the latent colour subspace")
    fig.tight_layout()
    return fig


def observation_maps(rows: list[tuple[str, list[np.ndarray], list[np.ndarray]]], steps: list[int]) -> Any:
    """Per observed image: the colour read off the latent (top) and the decoded latent (bottom) at each step."""
    plt = _plt()
    fig, axes = plt.subplots(2 * len(rows), len(steps), figsize=(1.6 * len(steps), 3.3 * len(rows)),
                             squeeze=False)
    for r, (title, maps, decoded) in enumerate(rows):
        for c, step in enumerate(steps):
            for k, (img, what) in enumerate(((maps[c], "latent colour"), (decoded[c], "decoded"))):
                ax = axes[2 * r + k, c]
                ax.imshow(np.clip(img, 0, 1) if img.dtype != np.uint8 else img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and k == 0:
                    ax.set_title(f"after step {step}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{title[:18]}\n{what}", fontsize=7)
    fig.tight_layout()
    return fig


def delta_e_vs_step(table: pd.DataFrame) -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steered = table[table["method"] != "none"]
    for (mode, method), group in steered.groupby(["mode", "method"]):
        means = group.groupby("step")["dE00"].mean()
        ax.plot(means.index, means.to_numpy(), marker="o", label=f"{mode}, {method}")
    base = table[table["method"] == "none"]["dE00"]
    if len(base):
        ax.axhline(base.mean(), color="grey", ls=":", label="no intervention")
    ax.set_xlabel("intervention after step")
    ax.set_ylabel("ΔE00 to target (mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def before_after(pairs: list[tuple[np.ndarray, np.ndarray, str, np.ndarray]]) -> Any:
    """Rows of (before, after, title, target RGB)."""
    plt = _plt()
    fig, axes = plt.subplots(len(pairs), 3, figsize=(5.5, 1.9 * len(pairs)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 4, 1]})
    for r, (before, after, title, target) in enumerate(pairs):
        for c, img in enumerate((before, after, np.full((4, 1, 3), np.clip(target, 0, 1)))):
            axes[r, c].imshow(img, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(title[:28], fontsize=7)
    axes[0, 0].set_title("before", fontsize=8)
    axes[0, 1].set_title("after", fontsize=8)
    axes[0, 2].set_title("target", fontsize=8)
    fig.tight_layout()
    return fig
