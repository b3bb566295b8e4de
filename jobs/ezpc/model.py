"""The EZPC projection A (d × k) and its training.

A starts at Cᵀ (the L2-normalised concept embeddings, one per column) and is trained on the image
embeddings V (n × d) against the class embeddings T (classes × d) with

    loss = MSE(A, Cᵀ) + λ · KL( softmax(s · V Tᵀ) ‖ softmax(s · V A Aᵀ Tᵀ) )

(``s`` = ``logit_scale``; the authors use the raw cosines, s = 1). For SigLIP backbones, whose
zero-shot probabilities are per-class sigmoids σ(s·cos + b) with a learned logit bias b, the
``sigmoid`` objective replaces the softmax KL by the sum over classes of the Bernoulli KLs
between σ(s·V Tᵀ + b) and σ(s·V A Aᵀ Tᵀ + b); under the softmax a bias would cancel, under the
sigmoid it does not. Adam, full batch by default,
every column of A renormalised to unit norm after each step, and the A with the lowest epoch
loss is kept. Pure PyTorch: no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from explab.models import resolve_device
from explab.threads import torch_threads


@dataclass
class TrainResult:
    A: np.ndarray  # (d, k), the best A (lowest total loss), unit-norm columns
    best_epoch: int  # 0-based epoch whose loss was lowest
    best: dict[str, float]  # matching / reconstruction / total loss of the kept A
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch: matching, reconstruction, total


def normalize_columns(A: torch.Tensor, eps: float = 1e-8, tol: float = 1e-6) -> torch.Tensor:
    """A with unit-norm columns; columns already unit up to ``tol`` (float rounding) are left as they
    are, so that A = Cᵀ is an exact fixed point (otherwise Adam amplifies the rounding of repeated
    renormalisation into lr-sized steps even when the loss is exactly zero)."""
    norms = A.norm(dim=0, keepdim=True)
    return A / torch.where((norms - 1).abs() > tol, norms + eps, torch.ones_like(norms))


def bottleneck_logits(V: torch.Tensor, A: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """(V A)(T A)ᵀ = V A Aᵀ Tᵀ, evaluated as V (A (Aᵀ Tᵀ)) so no n × k matrix is formed."""
    return V @ (A @ (A.T @ T.T))


Objective = Literal["softmax", "sigmoid"]


def sigmoid_kl(z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of Σ_classes KL(Bernoulli(σ(z_p)) ‖ Bernoulli(σ(z_q))), from logits."""
    p = torch.sigmoid(z_p)
    kl = p * (F.logsigmoid(z_p) - F.logsigmoid(z_q)) + (1 - p) * (F.logsigmoid(-z_p) - F.logsigmoid(-z_q))
    return kl.sum(dim=1).mean()


def ezpc_loss(A: torch.Tensor, C: torch.Tensor, V: torch.Tensor, T: torch.Tensor, lam: float,
              logit_scale: float = 1.0, clip_log_probs: torch.Tensor | None = None, *,
              objective: Objective = "softmax", logit_bias: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matching, reconstruction, total) for one batch ``V``.

    matching = mean squared difference of A and Cᵀ; reconstruction = KL(P_clip ‖ P_ezpc) averaged
    over the images (``batchmean``); ``clip_log_probs`` may be passed precomputed (softmax only).
    Logits are ``logit_scale · cos + logit_bias``; the bias only matters to the ``sigmoid`` objective.
    """
    matching = F.mse_loss(A, C.T)
    z_clip = logit_scale * (V @ T.T) + logit_bias
    z_ezpc = logit_scale * bottleneck_logits(V, A, T) + logit_bias
    if objective == "sigmoid":
        reconstruction = sigmoid_kl(z_clip, z_ezpc)
    elif objective == "softmax":
        if clip_log_probs is None:
            clip_log_probs = F.log_softmax(z_clip, dim=1)
        ezpc_log_probs = F.log_softmax(z_ezpc, dim=1)
        reconstruction = F.kl_div(ezpc_log_probs, clip_log_probs, reduction="batchmean", log_target=True)
    else:
        raise ValueError(f"objective must be softmax or sigmoid, not {objective!r}")
    return matching, reconstruction, matching + lam * reconstruction


def logit_params(model: torch.nn.Module) -> tuple[float, float]:
    """An open_clip model's zero-shot logit scale exp(t) and bias b (0 for CLIP, which has none):
    its logits are exp(t)·cos + b, as `open_clip.CLIP.get_logits` computes them."""
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    bias = getattr(model, "logit_bias", None)
    return scale, (0.0 if bias is None else float(bias.detach().reshape(-1)[0]))


def train_projection(C: np.ndarray, V: np.ndarray, T: np.ndarray, *, lam: float = 1.0, lr: float = 0.01,
                     epochs: int = 10_000, batch_size: int | None = None, logit_scale: float = 1.0,
                     seed: int = 0, device: str = "auto", threads: int | None = None, callback=None,
                     callback_every: int = 100, objective: Objective = "softmax", logit_bias: float = 0.0
                     ) -> TrainResult:
    """Learn A from concepts ``C`` (k × d), image embeddings ``V`` (n × d), class embeddings ``T``.

    ``batch_size`` None (the paper's setting) is full batch; otherwise the images are shuffled into
    mini-batches each epoch (seeded) and the epoch's loss is the mean over its batches.
    ``callback(epoch, matching, reconstruction, total)`` is called every ``callback_every`` epochs
    and at the last one. ``threads`` sets torch's intra-op threads for the call (restored after):
    small problems run fastest on one, and on a busy machine more threads can be far slower.
    """
    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    with torch_threads(threads):
        return _train(C, V, T, lam=lam, lr=lr, epochs=epochs, batch_size=batch_size, logit_scale=logit_scale,
                      seed=seed, device=device, callback=callback, callback_every=callback_every,
                      objective=objective, logit_bias=logit_bias)


def _train(C: np.ndarray, V: np.ndarray, T: np.ndarray, *, lam: float, lr: float, epochs: int,
           batch_size: int | None, logit_scale: float, seed: int, device: str, callback, callback_every: int,
           objective: Objective, logit_bias: float) -> TrainResult:
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    Ct = torch.as_tensor(np.asarray(C), dtype=torch.float32, device=dev)
    Vt = torch.as_tensor(np.asarray(V), dtype=torch.float32, device=dev)
    Tt = torch.as_tensor(np.asarray(T), dtype=torch.float32, device=dev)
    A = torch.nn.Parameter(Ct.T.clone())
    optimizer = torch.optim.Adam([A], lr=lr)
    n = Vt.shape[0]
    full = batch_size is None or batch_size >= n
    clip_log_probs = F.log_softmax(logit_scale * (Vt @ Tt.T), dim=1)  # constant: CLIP's own distribution (softmax)

    history: dict[str, list[float]] = {"matching": [], "reconstruction": [], "total": []}
    best_total, best_epoch, best_A = float("inf"), 0, A.detach().clone()
    best: dict[str, float] = {}
    for epoch in range(epochs):
        if full:
            batches = [slice(None)]
        else:
            order = torch.randperm(n, generator=gen).to(dev)
            batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        sums = torch.zeros(3, device=dev)
        start_A = A.detach().clone()  # the A this epoch's (full-batch) loss is measured at
        for idx in batches:
            matching, reconstruction, total = ezpc_loss(A, Ct, Vt[idx], Tt, lam, logit_scale, clip_log_probs[idx],
                                                        objective=objective, logit_bias=logit_bias)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                A.copy_(normalize_columns(A))
                sums += torch.stack([matching, reconstruction, total]).detach()
        m, r, t = (sums / len(batches)).tolist()
        history["matching"].append(m)
        history["reconstruction"].append(r)
        history["total"].append(t)
        if t < best_total:
            best_total, best_epoch = t, epoch
            best_A = start_A if full else A.detach().clone()
            best = {"matching": m, "reconstruction": r, "total": t}
        if callback is not None and (epoch % callback_every == 0 or epoch == epochs - 1):
            callback(epoch, m, r, t)
    return TrainResult(A=best_A.cpu().numpy(), best_epoch=best_epoch, best=best, history=history)
