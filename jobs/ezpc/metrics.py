"""EZPC's measurements: zero-shot accuracy of CLIP and through the bottleneck, fidelity of the
bottleneck to CLIP, faithfulness of the explanations (deleting the top-k concepts vs k random ones),
how far A moved from the concept embeddings, and cross-dataset transfer of A."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.ezpc.explain import contributions, logits, top_concepts


def accuracy(z: np.ndarray, y: np.ndarray) -> float:
    return float((z.argmax(axis=1) == np.asarray(y)).mean()) if len(y) else float("nan")


def agreement(z_a: np.ndarray, z_b: np.ndarray) -> float:
    """Fraction of rows whose argmax (predicted class) is the same."""
    return float((z_a.argmax(axis=1) == z_b.argmax(axis=1)).mean()) if len(z_a) else float("nan")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(z_p: np.ndarray, z_q: np.ndarray, scale: float = 1.0) -> float:
    """Mean over rows of KL(softmax(scale·z_p) ‖ softmax(scale·z_q))."""
    lp, lq = _log_softmax(scale * z_p), _log_softmax(scale * z_q)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean()) if len(z_p) else float("nan")


def spearman(z_a: np.ndarray, z_b: np.ndarray) -> float:
    """Mean over rows of the Spearman correlation of the class rankings."""
    if len(z_a) == 0 or z_a.shape[1] < 2:
        return float("nan")
    ra = z_a.argsort(axis=1).argsort(axis=1).astype(float)
    rb = z_b.argsort(axis=1).argsort(axis=1).astype(float)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1)).clip(1e-12)
    return float(((ra * rb).sum(axis=1) / den).mean())


def kendall(z_a: np.ndarray, z_b: np.ndarray) -> float:
    """Mean over rows of Kendall's τ-b between the class rankings (beside Spearman, as the authors)."""
    from scipy.stats import kendalltau

    if len(z_a) == 0 or z_a.shape[1] < 2:
        return float("nan")
    taus = [kendalltau(a, b).statistic for a, b in zip(np.asarray(z_a), np.asarray(z_b), strict=True)]
    return float(np.nanmean(taus))


def column_alignment(A: np.ndarray, C: np.ndarray) -> np.ndarray:
    """cos(A_j, C_j) per concept (A's columns vs the concept embeddings, both unit norm)."""
    num = (A * C.T).sum(axis=0)
    den = np.linalg.norm(A, axis=0) * np.linalg.norm(C, axis=1)
    return num / den.clip(1e-12)


def zero_shot(z_clip: np.ndarray, z_ezpc: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None,
              scale: float = 1.0) -> dict[str, float]:
    """Accuracies, agreement and fidelity on the images, over ``classes`` (None: all columns).

    With ``classes``, only those logit columns compete and labels are mapped into that subset
    (the seen-only / unseen-only evaluations); images of other classes must be filtered out first.
    """
    y = np.asarray(y)
    if classes is not None:
        classes = np.asarray(classes)
        z_clip, z_ezpc = z_clip[:, classes], z_ezpc[:, classes]
        where = {c: i for i, c in enumerate(classes.tolist())}
        y = np.asarray([where[int(v)] for v in y], dtype=int)
    acc_clip, acc_ezpc = accuracy(z_clip, y), accuracy(z_ezpc, y)
    return {
        "n": float(len(y)),
        "acc_clip": acc_clip,
        "acc_ezpc": acc_ezpc,
        "retained": acc_ezpc / acc_clip if acc_clip > 0 else float("nan"),
        "agreement": agreement(z_clip, z_ezpc),
        "spearman": spearman(z_clip, z_ezpc),
        "kendall": kendall(z_clip, z_ezpc),
        "kl": kl(z_clip, z_ezpc, scale),
    }


def faithfulness(act: np.ndarray, prof: np.ndarray, ks: Sequence[int], rng: np.random.Generator
                 ) -> list[dict[str, float]]:
    """Delete the top-k contributing concepts of each image's prediction vs k random concepts.

    Deleting concept set S removes Σ_{j∈S} act_j · prof_{c,j} from every class c's logit. Per k:
    the fraction of predictions that change (``flip``) and the mean drop of the predicted class's
    logit (``drop``), for the top-k and for k random concepts (one random draw per image).
    """
    z = act @ prof.T
    pred = z.argmax(axis=1)
    n, k_all = act.shape
    contrib = contributions(act, prof, pred)
    order, _ = top_concepts(contrib, max(ks))
    random_order = np.argsort(rng.random((n, k_all)), axis=1)
    rows = []
    for k in ks:
        k = min(k, k_all)
        out = {"k": k}
        for name, idx in (("topk", order[:, :k]), ("random", random_order[:, :k])):
            mask = np.zeros_like(act, dtype=bool)
            np.put_along_axis(mask, idx, True, axis=1)
            delta = (act * mask) @ prof.T  # (n, classes): what the deleted concepts added to each logit
            after = z - delta
            out[f"{name}_flip"] = float((after.argmax(axis=1) != pred).mean())
            out[f"{name}_drop"] = float(delta[np.arange(n), pred].mean())
        rows.append(out)
    return rows


def transfer(projections: dict[str, np.ndarray], tests: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
             scale: float = 1.0) -> list[dict[str, Any]]:
    """Cross-dataset transfer: each source's learned A applied to each target's test images.

    ``projections``: source name → A (d × k, its own vocabulary); ``tests``: target name → (V, y, T)
    (L2-normalised test images, labels, the target's class embeddings). The bottleneck needs no
    shared vocabulary: target logits are (V A)(T A)ᵀ with the source's concepts. One row per
    (source, target), the diagonal (in-domain) included, with `zero_shot`'s metrics.
    """
    clip = {target: V @ T.T for target, (V, _, T) in tests.items()}
    rows = []
    for source, A in projections.items():
        for target, (V, y, T) in tests.items():
            rows.append({"source": source, "target": target, "in_domain": source == target,
                         **zero_shot(clip[target], logits(V, A, T), y, scale=scale)})
    return rows


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def gzsl(A: np.ndarray, T_seen: np.ndarray, V_seen: np.ndarray, y_seen: np.ndarray, T_unseen: np.ndarray,
         V_unseen: np.ndarray, y_unseen: np.ndarray) -> dict[str, float]:
    """Generalized zero-shot accuracy of CLIP and of the bottleneck A, as in the authors' transfer test.

    Seen: images of the source dataset (labels index ``T_seen``); unseen: the target's (labels index
    ``T_unseen``). ``acc_*_seen`` / ``acc_*_unseen`` let only that dataset's class names compete;
    the ``*_gzsl`` accuracies let all of them compete (the unseen labels shifted past the seen
    classes), and ``hm_*`` is the harmonic mean of the two generalized accuracies.
    """
    T_all = np.concatenate([T_seen, T_unseen])
    y_unseen_all = np.asarray(y_unseen) + len(T_seen)
    out: dict[str, float] = {}
    for who, score in (("clip", lambda V, T: V @ T.T), ("ezpc", lambda V, T: logits(V, A, T))):
        out[f"acc_{who}_seen"] = accuracy(score(V_seen, T_seen), y_seen)
        out[f"acc_{who}_unseen"] = accuracy(score(V_unseen, T_unseen), y_unseen)
        out[f"acc_{who}_seen_gzsl"] = accuracy(score(V_seen, T_all), y_seen)
        out[f"acc_{who}_unseen_gzsl"] = accuracy(score(V_unseen, T_all), y_unseen_all)
        out[f"hm_{who}"] = harmonic_mean(out[f"acc_{who}_seen_gzsl"], out[f"acc_{who}_unseen_gzsl"])
    out["agreement_unseen_gzsl"] = agreement(V_unseen @ T_all.T, logits(V_unseen, A, T_all))
    return out
