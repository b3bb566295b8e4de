"""Step 4: paragraph-conditioned ("stage-aware") steering.

Setting (trait, stage k, alpha): while the HookedModel generates, add ``alpha * v_trait`` to
``blocks.{layer}.resid_post`` only at generated positions whose token lies in paragraph ``k`` (the
platform's ``paragraph`` position set: the forwards that sample the tokens of paragraph k). Every
setting and the unsteered baseline answer the same questions with the same sampling seeds, through
the same decode loop, so the accuracy difference is the steering's effect.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.interventions import Positions, Steer, paragraph_index, points
from jobs.polylogue.data import extract_answer, question_prompt


def direction(vector: np.ndarray, mode: str) -> np.ndarray:
    """The added direction: the unit persona vector ("unit") or the raw mean difference ("raw")."""
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector) if mode == "unit" else vector


def steer_spec(vector: np.ndarray, layer: int, stage: int, alpha: float) -> Steer:
    """Add ``alpha * vector`` at ``blocks.{layer}.resid_post`` on the tokens of paragraph ``stage``."""
    return Steer(point=points.resid_post(int(layer)), vector=vector, alpha=float(alpha),
                 positions=Positions(kind="paragraph", paragraph=int(stage)))


def settings(traits: list[str], stages: list[int], alphas: list[float]) -> list[dict[str, Any]]:
    """The unsteered baseline (setting 0) then every (trait, stage, alpha) with alpha != 0."""
    out = [{"setting": 0, "trait": "none", "stage": -1, "alpha": 0.0}]
    for trait in traits:
        for stage in stages:
            for alpha in alphas:
                if alpha != 0.0:
                    out.append({"setting": len(out), "trait": trait, "stage": stage, "alpha": float(alpha)})
    return out


def steering_batch(batch: pd.DataFrame, *, hooked: Any, vectors: dict[str, np.ndarray], layer: int,
                   params: dict[str, Any], seed: int) -> pd.DataFrame:
    """Ray Data batch function: generate each (setting, question) on the HookedModel and score it."""
    rows = list(batch.itertuples(index=False))
    requests = []
    for r in rows:
        steer = [] if r.alpha == 0.0 else [steer_spec(vectors[r.trait], layer, r.stage, r.alpha)]
        requests.append({"messages": [{"role": "user", "content": question_prompt(r._asdict())}],
                         "params": {**params, "seed": seed + int(r.position)}, "interventions": steer})
    results = hooked.generate(requests)
    out = []
    for r, res in zip(rows, results, strict=True):
        text = res.completions[0].text
        pred = extract_answer(text, len(r.options))
        out.append({"setting": int(r.setting), "trait": r.trait, "stage": int(r.stage), "alpha": float(r.alpha),
                    "question_id": r.question_id, "position": int(r.position), "answer": r.answer,
                    "pred": pred or "", "correct": bool(pred == r.answer), "text": text,
                    "n_tokens": len(res.completions[0].token_ids), "reached": paragraph_index(text) >= r.stage})
    return pd.DataFrame(out)


def run_steering(questions: list[dict[str, Any]], *, hooked: Any, vectors: dict[str, np.ndarray], layer: int,
                 traits: list[str], alphas: list[float], cfg: Any, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-response table, per-setting summary with accuracy change vs unsteered)."""
    import ray.data

    chosen = questions[: cfg.n_questions or len(questions)]
    added = {t: direction(vectors[t], cfg.vector) for t in traits}
    items = [{**s, **q, "position": i} for s in settings(traits, cfg.stages, alphas) for i, q in enumerate(chosen)]
    params = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    responses = ray.data.from_items(items).map_batches(
        steering_batch, batch_size=cfg.batch_size, batch_format="pandas",
        fn_kwargs={"hooked": hooked, "vectors": added, "layer": layer, "params": params, "seed": seed},
    ).to_pandas().sort_values(["setting", "position"]).reset_index(drop=True)
    base = responses[responses.setting == 0].set_index("position")
    responses["changed"] = [text != base.at[pos, "text"]
                            for pos, text in zip(responses.position, responses.text, strict=True)]
    summary = responses.groupby(["setting", "trait", "stage", "alpha"], as_index=False).agg(
        n=("correct", "size"), accuracy=("correct", "mean"), reached=("reached", "mean"), changed=("changed", "mean"),
        mean_tokens=("n_tokens", "mean"))
    summary["baseline_accuracy"] = float(base["correct"].mean())
    summary["delta"] = summary["accuracy"] - summary["baseline_accuracy"]
    summary["layer"] = layer
    summary["vector"] = cfg.vector
    return responses, summary
