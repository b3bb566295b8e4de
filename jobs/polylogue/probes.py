"""Step 3: probes — polylogue features -> logistic regression -> P(correct), cross-validated AUROC.

Baselines in the same table, each through the same cross-validation: PCA of the mean activation with
as many components as the polylogue has features (PCA fitted inside each training fold), the same
features computed on random directions instead of persona vectors (averaged over draws), response
length alone, per-trait polylogue probes, and the polylogue with shuffled labels (a chance control).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from jobs.polylogue.features import feature_names, series_features


def make_probe(C: float, pca_dim: int | None = None) -> Pipeline:
    """Impute (fold mean) -> standardize -> logistic regression; with ``pca_dim``: PCA instead of the
    scaler (components keep their variance: standardizing would blow the last, numerical-noise
    components of a small fold up to unit variance)."""
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="mean", keep_empty_features=True))]
    steps.append(("scale", StandardScaler()) if pca_dim is None else ("pca", PCA(n_components=pca_dim)))
    steps.append(("logreg", LogisticRegression(C=C, max_iter=5000)))
    return Pipeline(steps)


def cross_validate(X: np.ndarray, y: np.ndarray, *, folds: int, C: float, seed: int,
                   pca_dim: int | None = None) -> dict[str, Any]:
    """Out-of-fold AUROC (pooled and per-fold spread) and accuracy of a logistic-regression probe."""
    y = np.asarray(y, dtype=int)
    minority = int(min(y.sum(), len(y) - y.sum()))
    base = {"n": len(y), "dim": int(X.shape[1]) if pca_dim is None else pca_dim, "positives": int(y.sum())}
    if minority < 2:
        return {**base, "auroc": np.nan, "auroc_std": np.nan, "accuracy": np.nan,
                "status": f"needs >= 2 responses of each class (correct: {int(y.sum())} of {len(y)})"}
    splitter = StratifiedKFold(n_splits=min(folds, minority), shuffle=True, random_state=seed)
    scores = np.zeros(len(y))
    fold_aurocs, dims = [], []
    for train, test in splitter.split(X, y):
        dim = None if pca_dim is None else max(1, min(pca_dim, len(train) - 1, X.shape[1]))
        dims.append(dim)
        probe = make_probe(C, dim).fit(X[train], y[train])
        scores[test] = probe.predict_proba(X[test])[:, 1]
        if len(set(y[test])) == 2:
            fold_aurocs.append(roc_auc_score(y[test], scores[test]))
    if pca_dim is not None:
        base["dim"] = int(min(dims))  # fewer components than asked when a fold has too few responses
    return {**base, "auroc": float(roc_auc_score(y, scores)), "auroc_std": float(np.std(fold_aurocs)),
            "accuracy": float(np.mean((scores >= 0.5) == y)), "status": "ok"}


def series_matrix(frame: pd.DataFrame, column: str, k: int, window: int, n_paragraphs: int,
                  draw: int | None = None) -> np.ndarray:
    """(n_responses, K * F) features of the flattened series in ``column`` (random series: pick ``draw``)."""
    rows = []
    for values, t, para in zip(frame[column], frame["n_tokens"], frame["paragraph"], strict=True):
        values = np.asarray(values, dtype=np.float64)
        if t == 0:  # an empty response: every feature is undefined (imputed in the fold)
            series = np.zeros((0, k))
        else:
            series = values.reshape(-1, t, k)[draw] if draw is not None else values.reshape(t, k)
        rows.append(series_features(series, np.asarray(para), window, n_paragraphs))
    return np.stack(rows)


def evaluate(frame: pd.DataFrame, traits: list[str], layers: list[int], cfg: Any, seed: int,
             draws: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(probe table, coefficient table) for every layer of one model's responses."""
    y = frame["correct"].to_numpy(int)
    k, names = len(traits), feature_names(cfg.paragraphs)
    f = len(names)
    kind = "cos" if cfg.series == "cosine" else "proj"
    rows, coefs = [], []

    def run(layer: int, feature_set: str, X: np.ndarray, labels: np.ndarray = y, pca_dim: int | None = None) -> dict:
        res = cross_validate(X, labels, folds=cfg.folds, C=cfg.C, seed=seed, pca_dim=pca_dim)
        return {"layer": layer, "feature_set": feature_set, **res}

    for layer in layers:
        X = series_matrix(frame, f"{kind}_{layer}", k, cfg.window, cfg.paragraphs)
        rows.append(run(layer, "polylogue", X))
        for i, trait in enumerate(traits):
            rows.append(run(layer, f"trait:{trait}", X[:, i * f:(i + 1) * f]))
        shuffled = np.random.default_rng(seed).permutation(y)
        rows.append(run(layer, "polylogue (shuffled labels)", X, shuffled))
        random = [run(layer, "random directions", series_matrix(frame, f"r{kind}_{layer}", k, cfg.window,
                                                                    cfg.paragraphs, draw=d)) for d in range(draws)]
        aurocs = np.array([r["auroc"] for r in random])
        rows.append({**random[0], "auroc": float(np.mean(aurocs)), "auroc_std": float(np.std(aurocs)),
                     "accuracy": float(np.mean([r["accuracy"] for r in random])), "draws": draws})
        means = np.stack([np.asarray(m, dtype=np.float64) for m in frame[f"mean_{layer}"]])
        rows.append(run(layer, "pca(mean activation)", means, pca_dim=X.shape[1]))
        length = frame[["n_tokens", "n_paragraphs"]].to_numpy(np.float64)
        rows.append(run(layer, "length", length))
        if len(set(y)) == 2:  # which traits/features carry the signal: the probe fitted on every response
            probe = make_probe(cfg.C).fit(X, y)
            weights = probe.named_steps["logreg"].coef_[0]
            for i, w in enumerate(weights):
                coefs.append({"layer": layer, "trait": traits[i // f], "feature": names[i % f], "coef": float(w)})
    table = pd.DataFrame(rows)
    table["chance_accuracy"] = float(max(y.mean(), 1 - y.mean()))
    coef = pd.DataFrame(coefs, columns=["layer", "trait", "feature", "coef"])
    if len(coef):
        coef = coef.reindex(coef["coef"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return table, coef
