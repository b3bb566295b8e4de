"""polylogue: persona vectors as dynamic signals during reasoning.

Per model: (1) persona vectors from contrastive system prompts (optionally judge-filtered), at every
layer; (2) the polylogue — per generated token of each MMLU-Pro reasoning response, the cosine and
projection of the hidden state on every persona vector, with paragraphs and correctness; (3) probes
from polylogue features to correctness against equal-dimension activation baselines; (4)
paragraph-conditioned steering, accuracy vs unsteered. See README.md for the map to the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.data import plain_frame
from explab.errors import ConfigError
from explab.job import Job
from explab.runs import RunContext
from jobs.polylogue import plots
from jobs.polylogue.config import Config, ModelEntry
from jobs.polylogue.data import load_questions, synthetic_mmlu_pro
from jobs.polylogue.persona import extract, load_vectors, vector_metadata
from jobs.polylogue.probes import evaluate
from jobs.polylogue.series import long_table, run_series
from jobs.polylogue.steering import run_steering

ARRAY_COLUMNS = ("cos_", "proj_", "rcos_", "rproj_", "mean_", "paragraph")  # per-token data: the polylogue table


def check_layers(entry: ModelEntry, n_layers: int, steering_layer: int | None, index: int) -> None:
    for layer in [*entry.layers, *([steering_layer] if steering_layer is not None else [])]:
        if not 0 <= layer < n_layers:
            field = ("steering.layer" if layer == steering_layer and layer not in entry.layers
                     else f"models.{index}.layers")
            raise ConfigError(f"{field}: layer {layer} is out of range for {entry.spec.name!r}, which has "
                              f"{n_layers} blocks (0..{n_layers - 1}): pick a layer in range (middle layers work best)")


def random_directions(rng: np.random.Generator, draws: int, k: int, d: int) -> np.ndarray:
    """(draws, k, d) random unit directions: the equal-dimension baseline of the persona vectors."""
    dirs = rng.standard_normal((draws, k, d))
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


def polylogue_and_probes(config: Config, ctx: RunContext, entry: ModelEntry, questions: list[dict[str, Any]],
                         vectors: dict[str, np.ndarray], generator: Any, hooked: Any,
                         store: dict[str, Any]) -> dict[str, float]:
    """Steps 2 and 3 for one model: the polylogue of every question's response, then the probes
    (over the traits that have a vector: a trait the judge left too thin was skipped)."""
    traits, tag = [t for t in config.persona.traits if t in vectors], entry.tag
    d = next(iter(vectors.values())).shape[1]
    per_layer = {layer: np.stack([vectors[t][layer] for t in traits]) for layer in entry.layers}
    rdirs = random_directions(ctx.rng, config.probe.random_draws, len(traits), d)
    frame = run_series(questions, generator=generator, hooked=hooked, layers=entry.layers, vectors=per_layer,
                       random_dirs=rdirs, section=config.polylogue, seed=ctx.seed)
    store["polylogue"].append(long_table(frame, traits, entry.layers, tag))
    store["responses"].append(frame.drop(columns=[c for c in frame.columns if c.startswith(ARRAY_COLUMNS)])
                              .assign(model=tag))
    store["frames"][tag] = frame
    store["traits"][tag] = traits
    store["plot_layers"][tag] = entry.layers[0]

    probe, coef = evaluate(frame, traits, entry.layers, config.probe, ctx.seed, config.probe.random_draws)
    store["probe"].append(probe.assign(model=tag))
    store["coef"].append(coef.assign(model=tag))
    first = probe[probe.layer == entry.layers[0]].set_index("feature_set")["auroc"]
    return {"accuracy": float(frame["correct"].mean()), "n_responses": float(len(frame)),
            "auroc_polylogue": first["polylogue"], "auroc_pca": first["pca(mean activation)"],
            "auroc_random": first["random directions"], "auroc_length": first["length"],
            "auroc_shuffled": first["polylogue (shuffled labels)"]}


def run_model(config: Config, ctx: RunContext, entry: ModelEntry, index: int, questions: list[dict[str, Any]],
              store: dict[str, Any]) -> dict[str, float]:
    traits, tag = config.persona.traits, entry.tag
    hooked = ctx.model(entry.spec, "hooked", entry.hooked)
    n_layers = int(hooked.describe()["n_layers"])
    check_layers(entry, n_layers, config.steering.layer, index)
    needs_generator = not config.persona.load or config.polylogue.enabled
    generator = ctx.model(entry.spec, "generator", entry.generator) if needs_generator else None

    # 1. persona vectors (or those of an earlier run)
    if config.persona.load:
        vectors = load_vectors(config.persona.load, tag, traits, n_layers)
    else:
        judge = None
        if config.judge.enabled:
            kind = "hooked" if config.judge.score == "weighted" else "generator"  # weighted: next-token logits
            own = entry.hooked if kind == "hooked" else entry.generator
            judge = ctx.model(config.judge.model or entry.spec, kind,
                              config.judge.server if config.judge.model else own)
        vectors, responses = extract(generator=generator, judge=judge, hooked=hooked, n_layers=n_layers,
                                     section=config.persona, judge_cfg=config.judge, seed=ctx.seed + index,
                                     system_in_user=entry.system_in_user)
        store["persona_responses"].append(responses.drop(columns=["prompt_ids", "response_ids"]).assign(model=tag))
        store["metadata"] = vector_metadata(traits, pd.concat(store["persona_responses"]))
    store["vectors"].update({f"{tag}/{t}": v for t, v in vectors.items()})
    ctx.save_artifact("persona_vectors", store["vectors"], store.get("metadata") or vector_metadata(traits, None))
    store["persona_layers"].append(pd.DataFrame(
        [{"model": tag, "trait": t, "layer": i, "norm": float(np.linalg.norm(v[i]))} for t, v in vectors.items()
         for i in range(n_layers)]))

    # 2-3. the polylogue and the correctness probes
    metrics: dict[str, float] = {"traits_skipped": float(len(traits) - len(vectors))}
    if config.polylogue.enabled:
        metrics |= polylogue_and_probes(config, ctx, entry, questions, vectors, generator, hooked, store)

    # 4. paragraph-conditioned steering
    if config.steering.enabled and any(t in vectors for t in config.steering_traits()):
        layer = config.steering.layer if config.steering.layer is not None else entry.layers[0]
        steer_traits = [t for t in config.steering_traits() if t in vectors]  # skipped traits stay out
        per_trait = {t: vectors[t][layer] for t in steer_traits}
        answers, summary = run_steering(questions, hooked=hooked, vectors=per_trait, layer=layer,
                                        traits=steer_traits, alphas=config.steering_alphas(), cfg=config.steering,
                                        seed=ctx.seed)
        store["steering"].append(summary.assign(model=tag))
        store["steering_responses"].append(answers.assign(model=tag))
        steered = summary[summary.setting != 0]
        metrics |= {"steering_baseline_accuracy": float(summary["baseline_accuracy"].iloc[0]),
                    "steering_best_delta": float(steered["delta"].max()),
                    "steering_mean_delta": float(steered["delta"].mean())}
    ctx.log(step=index, **metrics)
    return metrics


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    questions = load_questions(ctx, config.data.spec, config.data.split, config.data.n_questions,
                               config.data.categories, config.data.options)
    store: dict[str, Any] = {k: [] for k in ("persona_responses", "persona_layers", "polylogue", "responses",
                                             "probe", "coef", "steering", "steering_responses")}
    store |= {"vectors": {}, "frames": {}, "plot_layers": {}, "traits": {}}
    per_model = {}
    for index, entry in enumerate(config.models):
        per_model[entry.tag] = run_model(config, ctx, entry, index, questions, store)

    for name, key in (("persona_responses", "persona_responses"), ("persona_layers", "persona_layers"),
                      ("polylogue", "polylogue"), ("responses", "responses"), ("probe", "probe"),
                      ("probe_coefficients", "coef"), ("steering", "steering"),
                      ("steering_responses", "steering_responses")):
        if store[key]:
            ctx.save_table(name, plain_frame(pd.concat(store[key], ignore_index=True)))
    if store["frames"]:
        ctx.save_plot("polylogue_examples", plots.polylogue_examples(
            store["frames"], store["traits"], store["plot_layers"], config.polylogue.examples, ctx.seed))
        ctx.save_plot("probe_auroc", plots.probe_bars(pd.concat(store["probe"], ignore_index=True)))
    if store["steering"]:
        ctx.save_plot("steering_accuracy", plots.steering_curves(pd.concat(store["steering"], ignore_index=True)))

    result = {k: float(np.nanmean([m[k] for m in per_model.values()]))
              if any(np.isfinite(m[k]) for m in per_model.values())
              else float("nan") for k in next(iter(per_model.values()))}
    if len(per_model) > 1:
        result |= {f"{tag}.{k}": v for tag, m in per_model.items() for k, v in m.items()}
    return result


JOB = Job(
    name="polylogue",
    description="Persona vectors as dynamic signals: the polylogue time series, correctness probes, "
                "stage-aware steering.",
    config=Config,
    run=run,
    synthetic={"mmlu_pro": synthetic_mmlu_pro},
)
