"""The job's figures: best score per round, top descriptors with their renders, slice gaps."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def best_per_round(rounds: pd.DataFrame):
    """Best score of each round (dots) and best so far (line), one colour per class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (cls, g) in enumerate(rounds.groupby("class", sort=False)):
        colour = f"C{i % 10}"
        ax.plot(g["round"], g["best_so_far"], "-", color=colour, label=cls)
        ax.plot(g["round"], g["best"], "o", color=colour, alpha=0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("descriptor score")
    ax.set_title("semantic search: best so far (line), round best (dots)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def descriptor_grid(renders: dict[str, list[tuple[str, float, list[np.ndarray]]]]):
    """One row per (class, top descriptor): its held-out renders, titled with the descriptor and score."""
    plt = _plt()
    rows = [(cls, d, s, ims) for cls, items in renders.items() for d, s, ims in items]
    n_cols = max((len(ims) for *_, ims in rows), default=1)
    fig, axes = plt.subplots(max(len(rows), 1), n_cols, figsize=(1.8 * n_cols + 2.5, 1.9 * max(len(rows), 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (cls, d, s, ims) in enumerate(rows):
        for c, im in enumerate(ims):
            axes[r, c].imshow(im)
        text = f"[{cls}] {d} ({s:.2f})".encode("ascii", "replace").decode()  # the plot font has no other glyphs
        label = "\n".join(textwrap.wrap(text, 40)[:4])
        axes[r, 0].set_title(label, fontsize=6, loc="left")
    fig.tight_layout()
    return fig


def slice_gaps(slices: pd.DataFrame):
    """Delta of each attribute value's score per class (and the validated accuracy gap when there is one)."""
    plt = _plt()
    labels = [f"{r['class']}: {r['attribute']}={r['value']}" for _, r in slices.iterrows()]
    y = np.arange(len(slices))
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(slices) + 1.5))
    ax.barh(y - 0.2, slices["delta"], height=0.4, label="score delta (search)")
    if "acc_gap" in slices and slices["acc_gap"].notna().any():
        ax.barh(y + 0.2, slices["acc_gap"].fillna(0.0), height=0.4, label="accuracy gap (validation)")
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_title("slice discovery")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
