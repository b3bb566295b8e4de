"""Optimal transport for SOTAlign: log-domain Sinkhorn, the KL-OT divergence, Gromov-Wasserstein plans.

- `sinkhorn(K, eps)`: the entropic plan for the cost ``-K`` between uniform marginals, computed
  in the log domain (~100 alternating updates of the dual potentials) and finished with the
  symmetrising half-step of the authors' public code (both potentials averaged with one more
  update, so both marginals are nearly, neither exactly, met).
- `kl_ot(K_s, K_t)`: KL(P_t ‖ P_s) with P_s = Sinkhorn(K_s, ε_s) and P_t = Sinkhorn(K_t, ε_t). Its
  gradient w.r.t. K_s is (P_s − P_t)/ε_s (implicit differentiation of the entropic OT dual at the
  fixed point), applied by `KLOTFunction` without backpropagating through the iterations.
- `gromov_plan(...)`: a target plan from POT's (fused) Gromov-Wasserstein between intra-modal
  similarity matrices, usable in place of the teacher's Sinkhorn plan (`kl_ot_to_plan`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sinkhorn(K: torch.Tensor, eps: float | torch.Tensor, n_iters: int = 100, *, symmetric: bool = True,
             tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plan between uniform marginals for the cost ``-K`` (``K`` a similarity matrix).

    P_ij = exp(K_ij/eps + f_i + g_j), the dual potentials f, g found by alternating log-domain
    updates; ``tol`` stops early once the row marginals are met to that mean absolute error.
    ``K`` may carry leading batch dimensions (``eps`` then broadcasts, e.g. one per matrix).
    Returns ``(P, log P)``. No gradient flows through this function (use `kl_ot`).
    """
    eps_t = torch.as_tensor(eps, dtype=K.dtype, device=K.device)
    if bool((eps_t <= 0).any()):
        raise ValueError(f"Sinkhorn epsilon must be > 0, got {eps}")
    with torch.no_grad():
        logits = K.detach() / (eps_t[..., None, None] if eps_t.ndim else eps_t)
        n, m = logits.shape[-2:]
        log_a, log_b = -math.log(n), -math.log(m)
        f = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
        g = torch.zeros(logits.shape[:-2] + (m,), dtype=logits.dtype, device=logits.device)
        for it in range(n_iters):
            f = log_a - torch.logsumexp(logits + g[..., None, :], dim=-1)
            g = log_b - torch.logsumexp(logits + f[..., :, None], dim=-2)
            if tol is not None and it % 10 == 9:
                rows = torch.exp(logits + f[..., :, None] + g[..., None, :]).sum(dim=-1)
                if (rows - 1.0 / n).abs().mean() < tol:
                    break
        if symmetric:  # one more update of each potential from the current pair, averaged in
            f_next = log_a - torch.logsumexp(logits + g[..., None, :], dim=-1)
            g_next = log_b - torch.logsumexp(logits + f[..., :, None], dim=-2)
            f, g = 0.5 * (f + f_next), 0.5 * (g + g_next)
        log_p = logits + f[..., :, None] + g[..., None, :]
        return log_p.exp(), log_p


class KLOTFunction(torch.autograd.Function):
    """KL(P_t ‖ Sinkhorn(K_s, ε_s)) with the implicit gradient (P_s − P_t)/ε_s w.r.t. K_s.

    ``target`` is the teacher's plan P_t itself, or (with ``eps_t``) the teacher's similarity
    matrix K_t, whose plan is then solved together with the students' in one batched Sinkhorn.
    """

    @staticmethod
    def forward(ctx, K_s: torch.Tensor, target: torch.Tensor, eps_s: float, n_iters: int,  # type: ignore[override]
                symmetric: bool, eps_t: float | None = None) -> torch.Tensor:
        if eps_t is None:
            P_t = target
            P_s, log_p_s = sinkhorn(K_s, eps_s, n_iters, symmetric=symmetric)
        else:
            eps = torch.tensor([eps_s, eps_t], dtype=K_s.dtype, device=K_s.device)
            P, log_p = sinkhorn(torch.stack([K_s.detach(), target]), eps, n_iters, symmetric=symmetric)
            P_s, log_p_s, P_t = P[0], log_p[0], P[1]
        loss = torch.xlogy(P_t, P_t).sum() - (P_t * log_p_s).sum()
        ctx.save_for_backward(P_s, P_t)
        ctx.eps_s = eps_s
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        P_s, P_t = ctx.saved_tensors
        return grad * (P_s - P_t) / ctx.eps_s, None, None, None, None, None


def kl_ot_to_plan(K_s: torch.Tensor, P_t: torch.Tensor, eps_s: float = 0.05, n_iters: int = 100,
                  symmetric: bool = True) -> torch.Tensor:
    """KL(P_t ‖ P_s) for a given target plan ``P_t`` (rows/columns summing to 1/n, 1/m)."""
    return KLOTFunction.apply(K_s, P_t.detach().to(K_s.dtype), float(eps_s), int(n_iters), bool(symmetric))


def kl_ot(K_s: torch.Tensor, K_t: torch.Tensor, eps_s: float = 0.05, eps_t: float = 0.005,
          n_iters: int = 100, symmetric: bool = True) -> torch.Tensor:
    """The KL-OT divergence: KL(Sinkhorn(K_t, ε_t) ‖ Sinkhorn(K_s, ε_s)), differentiable in K_s."""
    return KLOTFunction.apply(K_s, K_t.detach().to(K_s.dtype), float(eps_s), int(n_iters), bool(symmetric),
                              float(eps_t))


def round_to_marginals(P: np.ndarray) -> np.ndarray:
    """The nearby plan with exactly uniform marginals (Altschuler et al.'s rounding), e.g. a start for POT."""
    P = np.asarray(P, dtype=np.float64)
    n, m = P.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    P = P * np.minimum(a / np.maximum(P.sum(1), 1e-300), 1.0)[:, None]
    P = P * np.minimum(b / np.maximum(P.sum(0), 1e-300), 1.0)[None, :]
    err_a, err_b = a - P.sum(1), b - P.sum(0)
    if err_a.sum() > 0:
        P = P + np.outer(err_a, err_b) / err_a.sum()
    return P


def gromov_plan(S_x: np.ndarray | torch.Tensor, S_y: np.ndarray | torch.Tensor, *,
                K_cross: np.ndarray | torch.Tensor | None = None, alpha: float = 0.5,
                epsilon: float | None = None, G0: np.ndarray | None = None, max_iter: int = 200) -> np.ndarray:
    """A transport plan from POT's Gromov-Wasserstein on intra-modal similarity matrices.

    ``S_x`` (n × n) and ``S_y`` (m × m) are similarities within each modality (cosine), turned
    into costs 1 − S. With ``K_cross`` (n × m cross-modal similarities, e.g. the teacher's) the
    fused variant mixes the cost −K_cross with the structure term by ``alpha`` (weight of the
    structure). ``epsilon`` selects the entropic solver; ``G0`` a starting plan (GW is
    non-convex: start it from the teacher's Sinkhorn plan). Uniform marginals.
    """
    import ot

    C1 = 1.0 - _np(S_x)
    C2 = 1.0 - _np(S_y)
    p = np.full(C1.shape[0], 1.0 / C1.shape[0])
    q = np.full(C2.shape[0], 1.0 / C2.shape[0])
    G0 = None if G0 is None else np.asarray(G0, dtype=np.float64)
    if K_cross is None:
        if epsilon is None:
            return ot.gromov.gromov_wasserstein(C1, C2, p, q, "square_loss", G0=G0, max_iter=max_iter)
        return ot.gromov.entropic_gromov_wasserstein(C1, C2, p, q, "square_loss", epsilon=epsilon, G0=G0,
                                                     max_iter=max_iter)
    M = -_np(K_cross)
    M = M - M.min()
    if epsilon is None:
        return ot.gromov.fused_gromov_wasserstein(M, C1, C2, p, q, "square_loss", alpha=alpha, G0=G0,
                                                  max_iter=max_iter)
    return ot.gromov.entropic_fused_gromov_wasserstein(M, C1, C2, p, q, "square_loss", epsilon=epsilon,
                                                       alpha=alpha, G0=G0, max_iter=max_iter)


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
