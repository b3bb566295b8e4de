"""Stage 2: alignment layers f (image) and g (text) trained on the pairs plus unpaired batches.

loss = InfoNCE(f(x_i), g(y_i)) on a batch of pairs (symmetric, temperature τ)
     + λ · KL-OT(K_s, K_t) on an unpaired batch of B images and B texts (drawn independently),
where K_s = f(X_u) g(Y_u)ᵀ (cosines of the students) and K_t the teacher's cosines on the same
batch; KL-OT = KL(Sinkhorn(K_t, ε_t) ‖ Sinkhorn(K_s, ε_s)) with the implicit gradient (`ot.kl_ot`).
``target`` = ``gw`` / ``fgw`` replaces the teacher's Sinkhorn plan by POT's (fused)
Gromov-Wasserstein plan between the intra-modal similarity matrices of the raw encoder features
(started from the teacher's plan). λ = 0 is the pairs-only contrastive baseline.
``unpaired_loss`` = ``pseudo`` is the semi-supervised pseudo-labelling baseline instead of KL-OT:
on each unpaired batch, the teacher's mutual nearest neighbours (optionally above a cosine
threshold) become pseudo-pairs with the same InfoNCE as the real pairs, weighted by λ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from explab.config import Section
from jobs.sotalign.ot import gromov_plan, kl_ot, kl_ot_to_plan, round_to_marginals, sinkhorn
from jobs.sotalign.teacher import LinearTeacher


class AlignConfig(Section):
    layer: Literal["linear", "mlp"] = "mlp"
    hidden: int = Field(1024, ge=1)  # MLP width
    dim: int = Field(512, ge=1)  # shared space
    epochs: int = Field(20, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_pairs: int = Field(256, ge=2)
    batch_unpaired: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.05, gt=0)  # InfoNCE τ
    lam: float = Field(1.0, ge=0)  # weight of KL-OT on unpaired batches
    eps_s: float = Field(0.05, gt=0)  # ε of the students' plan
    eps_t: float = Field(0.005, gt=0)  # ε of the teacher's plan
    sinkhorn_iters: int = Field(100, ge=1)
    symmetric: bool = True  # the final symmetrising half-step
    target: Literal["sinkhorn", "gw", "fgw"] = "sinkhorn"  # the target plan on unpaired batches
    gw_alpha: float = Field(0.5, ge=0, le=1)  # fgw: weight of the structure term
    gw_epsilon: float | None = None  # entropic (F)GW if set, else POT's exact CG solver
    unpaired_loss: Literal["klot", "pseudo"] = "klot"  # pseudo: teacher pseudo-pairs + InfoNCE (a baseline)
    pseudo_threshold: float | None = Field(None, ge=-1, le=1)  # pseudo: minimum teacher cosine of a pseudo-pair
    init: Literal["random", "teacher"] = "random"  # teacher: linear f, g start as the teacher's maps (dim = its dim)
    device: str = "auto"  # where f, g train: auto (cuda when the process sees a GPU, else cpu), cpu, cuda


class Tower(nn.Module):
    def __init__(self, d_in: int, cfg: AlignConfig):
        super().__init__()
        if cfg.layer == "linear":
            self.net: nn.Module = nn.Linear(d_in, cfg.dim)
        else:
            self.net = nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


class Aligner(nn.Module):
    """f and g plus the per-modality standardisation (fitted on all, paired and unpaired, features)."""

    def __init__(self, d_x: int, d_y: int, cfg: AlignConfig, stats: dict[str, np.ndarray]):
        super().__init__()
        self.f, self.g = Tower(d_x, cfg), Tower(d_y, cfg)
        for name, value in stats.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def image(self, X: Any) -> torch.Tensor:
        return self.f((torch.as_tensor(X, dtype=torch.float32, device=self.mx.device) - self.mx) / self.sx)

    def text(self, Y: Any) -> torch.Tensor:
        return self.g((torch.as_tensor(Y, dtype=torch.float32, device=self.my.device) - self.my) / self.sy)

    @torch.no_grad()
    def embed(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        was_training = self.training
        self.eval()
        out = self.image(X).cpu().numpy(), self.text(Y).cpu().numpy()
        self.train(was_training)
        return out


def info_nce(zx: torch.Tensor, zy: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = zx @ zy.T / temperature
    target = torch.arange(len(zx), device=zx.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def pseudo_pairs(K_t: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i and columns j that are each other's nearest neighbour under the teacher's similarities
    ``K_t`` (images × texts), and at least ``threshold`` similar if given: the pseudo-pairs."""
    j = K_t.argmax(dim=1)
    i = torch.arange(len(K_t), device=K_t.device)
    keep = K_t.argmax(dim=0)[j] == i
    if threshold is not None:
        keep &= K_t[i, j] >= threshold
    return i[keep], j[keep]


def _stats(*mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Z = np.concatenate([m for m in mats if len(m)])
    return Z.mean(0), Z.std(0).mean() + 1e-8  # one scale per modality keeps the geometry


def train_alignment(pairs_x: np.ndarray, pairs_y: np.ndarray, unpaired_x: np.ndarray, unpaired_y: np.ndarray,
                    cfg: AlignConfig, teacher: LinearTeacher | None, *, seed: int = 0,
                    on_epoch: Callable[[int, Aligner, dict[str, float]], None] | None = None) -> Aligner:
    """Train f, g. With ``cfg.lam == 0`` (or no unpaired data / no teacher) only the pairs are used."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mx, sx = _stats(pairs_x, unpaired_x)
    my, sy = _stats(pairs_y, unpaired_y)
    if cfg.init == "teacher":
        if cfg.layer != "linear" or teacher is None:
            raise ValueError("init=teacher needs layer=linear and a teacher")
        cfg = cfg.model_copy(update={"dim": teacher.dim})
    model = Aligner(pairs_x.shape[1], pairs_y.shape[1], cfg, {"mx": mx, "sx": sx, "my": my, "sy": sy})
    if cfg.init == "teacher":
        with torch.no_grad():  # (x - mx)/sx · (sx W) + (mx - mean) W = (x - mean) W
            for tower, W, m, s, mean in ((model.f, teacher.W_x, mx, sx, teacher.mean_x),
                                         (model.g, teacher.W_y, my, sy, teacher.mean_y)):
                tower.net.weight.copy_(torch.as_tensor((W * s).T, dtype=torch.float32))
                tower.net.bias.copy_(torch.as_tensor((m - mean) @ W, dtype=torch.float32))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_ot = cfg.lam > 0 and teacher is not None and len(unpaired_x) >= 2 and len(unpaired_y) >= 2

    def tensor(a: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)

    Px, Py = tensor(pairs_x), tensor(pairs_y)
    if use_ot:
        Ux, Uy = tensor(unpaired_x), tensor(unpaired_y)
        Tx = nn.functional.normalize(tensor(teacher.image(unpaired_x)), dim=-1)
        Ty = nn.functional.normalize(tensor(teacher.text(unpaired_y)), dim=-1)
    for epoch in range(cfg.epochs):
        model.train()
        totals = {"loss": 0.0, "contrastive": 0.0, "klot": 0.0}
        for _ in range(cfg.steps_per_epoch):
            idx = torch.randperm(len(Px), generator=gen)[: cfg.batch_pairs].to(device)
            loss_c = info_nce(model.image(Px[idx]), model.text(Py[idx]), cfg.temperature)
            loss = loss_c
            if use_ot:
                bx = torch.randperm(len(Ux), generator=gen)[: cfg.batch_unpaired].to(device)
                by = torch.randperm(len(Uy), generator=gen)[: cfg.batch_unpaired].to(device)
                if cfg.unpaired_loss == "pseudo":
                    pi, pj = pseudo_pairs(Tx[bx] @ Ty[by].T, cfg.pseudo_threshold)
                    if len(pi) < 2:  # InfoNCE needs negatives: this batch adds nothing
                        loss_ot = torch.zeros((), device=device)
                    else:
                        loss_ot = info_nce(model.image(Ux[bx][pi]), model.text(Uy[by][pj]), cfg.temperature)
                else:
                    K_s = model.image(Ux[bx]) @ model.text(Uy[by]).T
                    K_t = Tx[bx] @ Ty[by].T
                    loss_ot = _klot(K_s, K_t, Ux[bx], Uy[by], cfg)
                loss = loss + cfg.lam * loss_ot
                totals["klot"] += float(loss_ot.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            totals["loss"] += float(loss.detach())
            totals["contrastive"] += float(loss_c.detach())
        if on_epoch is not None:
            on_epoch(epoch, model, {k: v / cfg.steps_per_epoch for k, v in totals.items()})
    model.eval()
    return model


def _klot(K_s: torch.Tensor, K_t: torch.Tensor, bx: torch.Tensor, by: torch.Tensor, cfg: AlignConfig) -> torch.Tensor:
    if cfg.target == "sinkhorn":
        return kl_ot(K_s, K_t, cfg.eps_s, cfg.eps_t, cfg.sinkhorn_iters, cfg.symmetric)
    P0, _ = sinkhorn(K_t.double(), cfg.eps_t, cfg.sinkhorn_iters, symmetric=cfg.symmetric)
    nx, ny = nn.functional.normalize(bx, dim=-1), nn.functional.normalize(by, dim=-1)
    plan = gromov_plan(nx @ nx.T, ny @ ny.T, K_cross=K_t if cfg.target == "fgw" else None,
                       alpha=cfg.gw_alpha, epsilon=cfg.gw_epsilon, G0=round_to_marginals(P0.cpu().numpy()))
    plan = torch.as_tensor(plan, dtype=K_s.dtype, device=K_s.device)
    return kl_ot_to_plan(K_s, plan, cfg.eps_s, cfg.sinkhorn_iters, cfg.symmetric)
