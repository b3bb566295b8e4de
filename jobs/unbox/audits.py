"""Audits of what the search found: slice discovery (with validation on real groups) and fidelity.

**Slices.** For a class, each attribute axis (e.g. background: {water: "on water", land: "in a
forest"}) turns the class's top ``bases`` descriptors into one variant per value (``"<descriptor>,
<phrase>"``); each variant is scored like a search descriptor (same N slot seeds). A value's score
is the mean over the bases; its delta is that minus the mean of the axis's other values; the axis's
gap is max − min. The favoured value (none when the gap is 0) is the slice the classifier leans on,
and the axis with the largest gap is the attribute discovered for the class.

**Validation.** On a labelled set with group columns (Waterbirds' place, CelebA's Male), the
black box classifies every image; for each (class, axis, value) the accuracy on images of that
class in that group, the gap favoured − other groups, and whether the least favoured value is
the class's worst group.

**Fidelity.** Held-out renders (seeds never used by the search) of the top descriptors of each
class are classified: top-1 rate (argmax is the class) and mean p(class); the plain class prompt
(the template alone) is the baseline row (rank 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from explab.config import Section
from explab.errors import ConfigError
from jobs.unbox.blackbox import BlackBox
from jobs.unbox.renderers import Renderer
from jobs.unbox.search import score_descriptors


class AxisConfig(Section):
    name: str  # e.g. background
    values: dict[str, str]  # value -> phrase appended to a descriptor, e.g. {water: "on water"}


class GroupColumn(Section):
    column: str  # the dataset column holding this axis (e.g. place, Male)
    values: dict[str, Any]  # axis value -> the column's value for it, e.g. {water: 1, land: 0}


class ValidationConfig(Section):
    spec: str  # hf:<name>[:<config>], parquet:<path>, synthetic:unbox_groups
    split: str = "test"
    limit: int | None = Field(None, ge=1)
    image_column: str = "image"
    label_column: str = "label"
    labels: dict[str, Any] = Field(default_factory=dict)  # class name -> label value (default: its index)
    groups: dict[str, GroupColumn]  # axis name -> its column
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the dataset reader


class SlicesConfig(Section):
    enabled: bool = True
    bases: int = Field(3, ge=1)  # top descriptors per class turned into variants
    axes: list[AxisConfig] = Field(default_factory=lambda: [
        AxisConfig(name="background", values={"water": "on water", "land": "on land"})])
    validation: ValidationConfig | None = None


class FidelityConfig(Section):
    enabled: bool = True
    top: int = Field(5, ge=1)  # top descriptors per class
    images: int = Field(4, ge=1)  # held-out renders each


def slice_scores(cls: str, target: int, bases: Sequence[str], axes: Sequence[AxisConfig], seeds: Sequence[int], *,
                 renderer: Renderer, box: BlackBox, specificity: float) -> pd.DataFrame:
    """One row per (axis, value) of one class: score, delta, favoured, axis gap and rank (see the docstring)."""
    rows = []
    for axis in axes:
        variants = [(value, f"{b}, {phrase}") for value, phrase in axis.values.items() for b in bases]
        scores, _ = score_descriptors([v for _, v in variants], seeds, renderer=renderer, box=box, target=target,
                                      specificity=specificity, purpose="slices")
        by_value = {value: float(np.mean([s["score"] for (v, _), s in zip(variants, scores, strict=True)
                                           if v == value])) for value in axis.values}
        gap = max(by_value.values()) - min(by_value.values())
        favoured = max(by_value, key=by_value.get)
        for value, score in by_value.items():
            others = [s for v, s in by_value.items() if v != value]
            rows.append({"class": cls, "attribute": axis.name, "value": value, "phrase": axis.values[value],
                         "score": score, "delta": score - float(np.mean(others)),
                         "favoured": value == favoured and gap > 0,
                         "attribute_gap": gap, "n_bases": len(bases)})
    frame = pd.DataFrame(rows)
    order = frame.drop_duplicates("attribute").sort_values("attribute_gap", ascending=False)["attribute"].tolist()
    frame["attribute_rank"] = frame["attribute"].map({a: i + 1 for i, a in enumerate(order)})
    return frame


def discovered(slices: pd.DataFrame) -> pd.DataFrame:
    """Per class: the attribute with the largest gap and its favoured value."""
    top = slices[(slices["attribute_rank"] == 1) & slices["favoured"]]
    return top[["class", "attribute", "value", "attribute_gap"]].reset_index(drop=True)


def validate_slices(slices: pd.DataFrame, cfg: ValidationConfig, box: BlackBox, classes: Sequence[str],
                    seed: int) -> pd.DataFrame:
    """``slices`` with per-group accuracies of the black box on a labelled grouped set (see the docstring)."""
    from explab.data import read_rows
    from explab.images import to_pil

    rows = read_rows(cfg.spec, seed=seed, split=cfg.split, limit=cfg.limit, **cfg.kwargs)
    if not rows:
        raise ConfigError(f"slices.validation: {cfg.spec!r} split {cfg.split!r} has no rows")
    for col in [cfg.image_column, cfg.label_column] + [g.column for g in cfg.groups.values()]:
        if col not in rows[0]:
            raise ConfigError(f"slices.validation: {cfg.spec!r} has no column {col!r} (it has {sorted(rows[0])})")
    all_classes = list(box.classes)
    labels = {c: cfg.labels.get(c, all_classes.index(c)) for c in classes}
    probs = box.predict_proba([np.asarray(to_pil(r[cfg.image_column])) for r in rows], "validation")
    predicted = np.asarray(all_classes)[probs.argmax(axis=1)]
    label = np.asarray([r[cfg.label_column] for r in rows], dtype=object)
    out = []
    for _, s in slices.iterrows():
        group = cfg.groups.get(s["attribute"])
        extra: dict[str, Any] = {"acc_slice": np.nan, "acc_rest": np.nan, "acc_gap": np.nan, "n_slice": 0}
        if group is not None and s["value"] in group.values:
            is_class = label == labels[s["class"]]
            column = np.asarray([r[group.column] for r in rows], dtype=object)
            in_slice = is_class & (column == group.values[s["value"]])
            rest = is_class & ~(column == group.values[s["value"]])
            correct = predicted == s["class"]
            extra = {"acc_slice": _accuracy(correct, in_slice), "acc_rest": _accuracy(correct, rest),
                     "n_slice": int(in_slice.sum())}
            extra["acc_gap"] = extra["acc_slice"] - extra["acc_rest"]
        out.append({**s.to_dict(), **extra})
    frame = pd.DataFrame(out)
    worst = frame.dropna(subset=["acc_slice"]).sort_values("acc_slice").groupby(["class", "attribute"]).head(1)
    frame["worst_group"] = frame.index.isin(worst.index)
    least = frame.sort_values("score").groupby(["class", "attribute"]).head(1)
    frame["least_favoured"] = frame.index.isin(least.index)
    return frame


def _accuracy(correct: np.ndarray, mask: np.ndarray) -> float:
    return float(correct[mask].mean()) if mask.any() else float("nan")


def fidelity(ranked: dict[str, list[str]], targets: dict[str, int], template: str, seeds: Sequence[int], *,
             renderer: Renderer, box: BlackBox) -> tuple[pd.DataFrame, dict[str, list[list[np.ndarray]]]]:
    """Held-out renders of each class's top descriptors (and the plain class prompt) classified by the box."""
    rows, renders = [], {}
    for cls, descriptors in ranked.items():
        prompts = [template.format(cls=cls)] + list(descriptors)
        scores, images = score_descriptors(prompts, seeds, renderer=renderer, box=box, target=targets[cls],
                                           specificity=0.0, purpose="fidelity")
        renders[cls] = images[1:]
        for rank, (d, s) in enumerate(zip(prompts, scores, strict=True)):
            rows.append({"class": cls, "rank": rank, "descriptor": d, "baseline": rank == 0,
                         "top1_rate": s["top1"], "mean_p": s["p_class"], "n_images": len(seeds)})
    return pd.DataFrame(rows), renders
