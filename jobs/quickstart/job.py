"""quickstart: the platform end to end on one model — capture, a contrastive direction, steering.

1. Capture the residual stream at ``blocks.{layer}.resid_post`` for contrastive texts (trait
   expressed vs suppressed) through the shared HookedModel server; the direction is the mean
   difference (the persona-vector recipe in miniature).
2. Stream the questions through Ray Data; each batch calls the same server to generate with the
   direction added at ``layer`` (strength α, generated positions only) and to capture the last
   block's residual at every step.
3. Report, per α, the mean projection of the generated tokens' last-layer residuals on the
   direction, and how many tokens changed vs α = 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from explab.config import JobConfig
from explab.interventions import Capture, Steer, points
from explab.job import Job
from explab.models import ModelSpec, check_layers
from explab.runs import RunContext
from explab.servers import ServerOptions


class Config(JobConfig):
    model: ModelSpec = ModelSpec(name="tiny:llama")
    server: ServerOptions = ServerOptions()
    layer: int = Field(0, ge=0)
    readout_layer: int = -1  # where the effect is read (-1: the last block)
    positive: list[str] = Field(min_length=1, default=[
        "I am completely certain of this answer.",
        "Without any doubt, the result is correct.",
        "I know exactly what the answer is.",
        "This is definitely true, I am sure.",
    ])
    negative: list[str] = Field(min_length=1, default=[
        "I am not sure about this answer at all.",
        "Maybe the result is wrong, I doubt it.",
        "I really do not know what the answer is.",
        "This might be false, I am unsure.",
    ])
    questions: list[str] = Field(min_length=1, default=[
        "What is the capital of France?",
        "How many legs does a spider have?",
        "Why is the sky blue?",
        "What is 12 times 12?",
        "Who wrote Hamlet?",
        "What is the boiling point of water?",
    ])
    alphas: list[float] = Field([-8.0, -4.0, 0.0, 4.0, 8.0], min_length=1)
    alpha: float | None = None  # one steering strength (a sweep's field): replaces alphas with [0, alpha]
    max_tokens: int = Field(16, ge=1)
    batch_size: int = Field(3, ge=1)


def contrastive_direction(hooked: Any, point: str, positive: list[str], negative: list[str]) -> np.ndarray:
    """Mean over texts of the token-mean activation at ``point``: positive minus negative."""
    capture = [Capture(point=point)]
    results = hooked.forward([{"text": t, "interventions": capture} for t in positive + negative])
    means = np.stack([r.captures[point].mean(axis=0) for r in results])
    return means[: len(positive)].mean(axis=0) - means[len(positive):].mean(axis=0)


def steered_batch(batch: dict[str, np.ndarray], *, hooked: Any, steer_point: str, read_point: str,
                  unit: list[float], alpha: float, max_tokens: int) -> dict[str, np.ndarray]:
    """A Ray Data batch function: generate each question with steering, read the projection."""
    interventions: list[Capture | Steer] = [Capture(point=read_point, per_step=True)]
    if alpha != 0.0:
        interventions.append(Steer(point=steer_point, vector=unit, alpha=alpha, positions="generated"))
    requests = [{"messages": [{"role": "user", "content": q}], "interventions": interventions,
                 "params": {"temperature": 0.0, "max_tokens": max_tokens}} for q in batch["question"]]
    results = hooked.generate(requests)
    direction = np.asarray(unit)
    projections, texts, tokens = [], [], []
    for result in results:
        states = result.captures[0][read_point][1:]  # row 0 samples the first token, before steering starts
        projections.append(float((states @ direction).mean()) if len(states) else float("nan"))
        texts.append(result.completions[0].text)
        tokens.append(" ".join(map(str, result.completions[0].token_ids)))
    return {"question": batch["question"], "projection": np.asarray(projections), "text": np.asarray(texts),
            "tokens": np.asarray(tokens)}


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import ray.data

    hooked = ctx.model(config.model, "hooked", config.server)
    n_layers = hooked.describe()["n_layers"]
    check_layers(config.layer, n_layers, "layer", config.model.name)
    check_layers(config.readout_layer, n_layers, "readout_layer", config.model.name, negative=True)
    steer_point = points.resid_post(config.layer)
    read_point = points.resid_post(config.readout_layer % n_layers)

    direction = contrastive_direction(hooked, steer_point, config.positive, config.negative)
    unit = direction / np.linalg.norm(direction)
    ctx.save_artifact("direction", {steer_point: direction.astype(np.float32)})

    alphas = config.alphas if config.alpha is None else sorted({0.0, config.alpha})
    rows = []
    baseline_tokens: dict[str, str] = {}
    questions = ray.data.from_items([{"question": q} for q in config.questions])
    progress = ctx.progress(len(alphas), "steering strengths")
    for step, alpha in enumerate(sorted(alphas, key=lambda a: (a != 0.0, a))):
        out = questions.map_batches(
            steered_batch, batch_size=config.batch_size, batch_format="numpy",
            fn_kwargs={"hooked": hooked, "steer_point": steer_point, "read_point": read_point,
                       "unit": unit.tolist(), "alpha": alpha, "max_tokens": config.max_tokens},
        ).to_pandas()
        if alpha == 0.0:
            baseline_tokens = dict(zip(out["question"], out["tokens"], strict=True))
        for q, proj, text, toks in zip(out["question"], out["projection"], out["text"], out["tokens"], strict=True):
            base = baseline_tokens.get(q)
            changed = float(np.mean([a != b for a, b in zip(toks.split(), base.split(), strict=False)]))
            rows.append({"alpha": alpha, "question": q, "projection": proj, "changed": changed, "text": text})
        ctx.log(step=step, alpha=alpha, mean_projection=float(out["projection"].mean()))
        progress.advance()

    table = pd.DataFrame(rows).sort_values(["alpha", "question"]).reset_index(drop=True)
    ctx.save_table("steering", table)
    summary = table.groupby("alpha", as_index=False).agg(projection=("projection", "mean"), changed=("changed", "mean"))
    ctx.save_table("summary", summary)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(summary["alpha"], summary["projection"], marker="o")
    ax.set_xlabel("steering strength α")
    ax.set_ylabel(f"projection at {read_point}")
    ax.set_title(f"{config.model.name}: steering along a contrastive direction")
    ctx.save_plot("projection_vs_alpha", fig)

    slope = float(np.polyfit(summary["alpha"], summary["projection"], 1)[0]) if len(summary) > 1 else float("nan")
    monotonic = float(np.all(np.diff(summary["projection"].to_numpy()) > 0))
    result = {"slope": slope, "monotonic": monotonic, "direction_norm": float(np.linalg.norm(direction)),
              "changed_at_max_alpha": float(summary["changed"].iloc[-1])}
    if config.alpha is not None:  # the sweep's view: the effect at this one strength
        at = summary.loc[summary["alpha"] == config.alpha].iloc[0]
        result.update(projection_at_alpha=float(at["projection"]), changed_at_alpha=float(at["changed"]))
    return result


JOB = Job(
    name="quickstart",
    description="Platform tour: capture, a contrastive direction and steering through the shared HookedModel server.",
    config=Config,
    run=run,
)
