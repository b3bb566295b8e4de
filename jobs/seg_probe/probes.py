"""Linear segmentation probes on frozen token grids (pure PyTorch, no Ray).

A probe is a 1x1 linear classifier D -> C applied to every token of an (H_t, W_t, D) grid, trained
with cross-entropy and AdamW on the same schedule for every layer. Two label conventions (SPECS-2 §3):

- ``tokens``: the pixel labels are reduced to the token grid by a majority vote per patch
  (`downsample_labels`) and the probe is trained and scored per token;
- ``upsample``: the probe's logits are bilinearly upsampled to the label resolution and trained and
  scored per pixel.

Features are standardised per dimension with the training set's mean and standard deviation (part
of the probe, so the same probe applies to re-extracted features): LLM residual streams carry a few
huge dimensions that otherwise dominate a plain AdamW run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from explab.config import Section

LabelMode = Literal["tokens", "upsample"]


class ProbeSchedule(Section):
    """The one training schedule every layer's probe gets."""

    mode: LabelMode = "tokens"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(4096, ge=1)  # tokens per step (tokens mode) or images x 64 (upsample mode)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    standardize: bool = True


@dataclass
class LinearProbe:
    """``logits = ((x - mean) / std) @ weight.T + bias`` per token."""

    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)
    mean: Tensor  # (D,)
    std: Tensor  # (D,)

    def logits(self, grids: Tensor) -> Tensor:
        """(N, H_t, W_t, D) -> (N, C, H_t, W_t)."""
        x = (grids.float() - self.mean) / self.std
        return (x @ self.weight.T + self.bias).permute(0, 3, 1, 2)

    def predict(self, grids: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Class per token (N, H_t, W_t), or per pixel of ``size`` with logits upsampled bilinearly."""
        out = self.logits(grids)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out.argmax(1)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).contiguous() for k in ("weight", "bias", "mean", "std")}


def downsample_labels(labels: Tensor, grid: tuple[int, int], n_classes: int, ignore_index: int) -> Tensor:
    """(N, H, W) pixel labels -> (N, H_t, W_t): the majority class of each patch's labelled pixels.

    A patch with no labelled pixel gets ``ignore_index``. Patch borders follow adaptive pooling, so
    H need not be a multiple of H_t.
    """
    valid = (labels >= 0) & (labels < n_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0), n_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None].float()
    counts = F.adaptive_avg_pool2d(onehot, grid)  # (N, C, H_t, W_t) fractions of the patch
    out = counts.argmax(1)
    out[counts.sum(1) <= 0] = ignore_index
    return out


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) labels -> (N, *size) by nearest neighbour (labels are never interpolated)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def train_probe(grids: Tensor, labels: Tensor, n_classes: int, schedule: ProbeSchedule, *, ignore_index: int,
                seed: int = 0) -> LinearProbe:
    """Fit a probe on (N, H_t, W_t, D) features.

    ``labels`` are (N, H_t, W_t) in ``tokens`` mode, (N, H, W) pixel labels in ``upsample`` mode.
    """
    gen = torch.Generator().manual_seed(seed)
    x = grids.float()
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if schedule.standardize:
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(d), torch.ones(d)
    layer = torch.nn.Linear(d, n_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    z = (x - mean) / std
    if schedule.mode == "tokens":
        keep = (labels >= 0) & (labels < n_classes)
        zt, yt = z[keep], labels[keep]
        n = len(yt)
        for _ in range(schedule.epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, schedule.batch_size):
                idx = order[i:i + schedule.batch_size]
                loss = F.cross_entropy(layer(zt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        n, per = len(z), max(1, schedule.batch_size // 64)
        size = tuple(labels.shape[-2:])
        for _ in range(schedule.epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, per):
                idx = order[i:i + per]
                logits = layer(z[idx]).permute(0, 3, 1, 2)
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, labels[idx], ignore_index=ignore_index)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return LinearProbe(layer.weight.detach().clone(), layer.bias.detach().clone(), mean, std)


def segmentation_scores(pred: Tensor, target: Tensor, n_classes: int, ignore_index: int) -> dict[str, float]:
    """mIoU (torchmetrics, macro over classes present in prediction or target) and pixel accuracy."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    miou = MulticlassJaccardIndex(num_classes=n_classes, ignore_index=ignore_index, average="macro")
    acc = MulticlassAccuracy(num_classes=n_classes, ignore_index=ignore_index, average="micro")
    p, t = pred.reshape(-1), target.reshape(-1)
    return {"miou": float(miou(p, t)), "pixel_acc": float(acc(p, t))}


def confusion(pred: Tensor, target: Tensor, n_classes: int, ignore_index: int) -> Tensor:
    """(C, C) counts: row = true class, column = predicted class (ignored pixels dropped)."""
    keep = (target != ignore_index) & (target >= 0) & (target < n_classes)
    idx = target[keep] * n_classes + pred[keep].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def position_accuracy(pred: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-token accuracy against raster position: (H_t*W_t,) accuracy and labelled-token counts."""
    p, t = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    valid = t != ignore_index
    hits = ((p == t) & valid).sum(0).float()
    counts = valid.sum(0)
    return hits / counts.clamp_min(1), counts


def spatial_consistency(pred: Tensor) -> float:
    """Fraction of 4-neighbour token pairs (right and down) that get the same predicted class."""
    right = pred[:, :, 1:] == pred[:, :, :-1]
    down = pred[:, 1:, :] == pred[:, :-1, :]
    return float((right.sum() + down.sum()) / (right.numel() + down.numel()))
