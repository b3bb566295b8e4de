"""finer: fine-grained negative queries (FINER) and FINER-Tuning.

1. Benchmark: synthetic scenes with known scene graphs -> positive queries -> minimal-edit negatives
   -> paired 5-option MC items of four kinds (`benchmark.py`); released benchmarks read into the same
   schema (`hub.py`).
2. Evaluation of each model through a shared `HookedModel` (the authors' MC prompt, greedy <= 2
   tokens, the letter parsed): paired accuracy, row accuracy, invalid share, accuracy vs granularity.
3. FINER-Tuning: pos-or-neg preference pairs from training scenes, DPO against the frozen base
   (`tuning.py`, `explab.train`), the tuned model re-evaluated; ablations (SFT, negatives-only, ...).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from explab.job import Job
from explab.models import ModelSpec
from explab.runs import RunContext
from explab.servers import stop_server
from explab.train import TrainerConfig, TrainResult
from jobs.finer import captions, filtering, hub, openended, plots, tuning
from jobs.finer.benchmark import Synthetic, items, synthetic, training_pairs, vocabulary
from jobs.finer.config import Config, HubBenchmark, TuningConfig
from jobs.finer.evaluate import evaluate
from jobs.finer.metrics import by_granularity, score, yes_no_scores


def _items(config: Config, data: Synthetic, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [row for p in data.probes.get("test", []) for row in items(p, rng, config.build, "test", "synthetic")]
    return pd.DataFrame(rows)


def _pairs(config: Config, variant: TuningConfig, data: Synthetic, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [row for p in data.probes.get("train", [])
            for row in training_pairs(p, data.images[p.image_id], rng, variant.mode, variant.format, config.build)]


def _caption_items(ctx: RunContext, config: Config, data: Synthetic) -> tuple[pd.DataFrame, dict[str, Any], dict]:
    """Items built from captions through the Generator (`captions.py`), their images and the counts."""
    source = config.captions
    if source.data == "synthetic":
        texts = {i: captions.describe(data.scenes[i]) for i in data.scenes if i.startswith("test-")}
        images = {i: data.images[i] for i in texts}
    else:
        ds = hub.fetch(HubBenchmark(name="captions", data=source.data, split=source.split, columns=source.columns,
                                    limit=source.limit))
        texts, images = {}, {}
        for k, ex in enumerate(ds):
            texts[f"caption-{k:05d}"] = str(ex["caption"])
            images[f"caption-{k:05d}"] = ex["image"]
    vocab = vocabulary(config.scenes)
    generator = ctx.model(source.generator, "generator", source.server or None)
    graphs, refused = captions.extract(generator, texts, vocab, source.max_tokens)
    probes, no_probe = captions.caption_probes(graphs, config.build, vocab, np.random.default_rng(config.seed + 3))
    rng = np.random.default_rng(config.seed + 4)
    rows = [row for p in probes for row in items(p, rng, config.build, "test", "captions")]
    counts = {"captions": len(texts), "graphs": len(graphs), "skipped": sum(refused.values()),
              "skipped_by_reason": dict(refused), "no_probe": no_probe, "items": len(rows)}
    return pd.DataFrame(rows), images, counts


def _score_rows(model: str, variant: str, scored: pd.DataFrame) -> tuple[list[dict], list[pd.DataFrame]]:
    rows, levels = [], []
    for benchmark, frame in scored.groupby("benchmark", sort=False):
        splits = [("all", frame)] + list(frame.groupby("kind", sort=False))
        yes_no = bool(frame["choices"].map(lambda c: list(c) == ["Yes", "No"]).all())
        for split, part in splits:
            rows.append({"model": model, "variant": variant, "tuned": variant != "base", "benchmark": benchmark,
                         "split": split, **score(part), **(yes_no_scores(part) if yes_no else {})})
        levels.append(by_granularity(frame).assign(model=model, variant=variant, benchmark=benchmark))
    return rows, levels


def _evaluate(ctx: RunContext, config: Config, spec: ModelSpec, eval_sets: dict[str, Any],
              open_sets: dict[str, Any]) -> tuple[pd.DataFrame, Any, pd.DataFrame]:
    """MC sets scored, the server's handle, and the open-ended sets scored (`openended.evaluate_sets`)."""
    handle = ctx.model(spec, "hooked", config.server or None)
    frames = []
    for name, (frame, images) in eval_sets.items():
        frames.append(evaluate(handle, frame, images).assign(benchmark=name))
    opened = openended.evaluate_sets(handle, open_sets,
                                     lambda bench: ctx.model(bench.judge, "generator", bench.judge_server or None))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), handle, opened


def _train_variants(ctx: RunContext, config: Config, spec: ModelSpec, variants: list[TuningConfig], data: Synthetic,
                    m: int) -> dict[str, tuple[TrainerConfig, TrainResult]]:
    """Every tuning variant of model ``m`` trained side by side (one Ray Train run each, started from its own
    thread; the cluster runs them at once where it has the workers' resources). Each run's metrics are logged
    as ``<variant>_<metric>``. Returns ``{variant: (its trainer settings, its TrainResult)}``."""
    def one(variant: TuningConfig) -> tuple[TrainerConfig, TrainResult]:
        pairs = _pairs(config, variant, data, config.seed + 2)
        trainer = variant.trainer
        if variant.epochs is not None:
            trainer = trainer.model_copy(update={"steps": max(1, math.ceil(variant.epochs * len(pairs)
                                                                           / trainer.batch_size))})
        trained = tuning.train(ctx, spec, pairs, variant.method, trainer, variant.dpo, f"{variant.name}_{m}",
                               config.seed, metrics_prefix=f"{variant.name}_")
        return trainer, trained

    with ThreadPoolExecutor(max_workers=max(1, len(variants)), thread_name_prefix="finer-tuning") as pool:
        futures = {v.name: pool.submit(one, v) for v in variants}
        return {name: future.result() for name, future in futures.items()}


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    eval_sets: dict[str, Any] = {}
    data = synthetic(config.scenes, config.build, dict(config.n_images), config.seed)
    built = _items(config, data, config.seed + 1)
    filtered: dict[str, int] = {}
    if config.filter is not None and not built.empty:
        handle = ctx.model(config.filter.model, "hooked", config.filter.server or None)
        built, filtered = filtering.filter_pairs(handle, built, data.images)
        stop_server(handle.name)
    if config.synthetic_eval and not built.empty:
        eval_sets["synthetic"] = (built, data.images)
    caption_counts: dict[str, Any] = {}
    if config.captions is not None:
        caption_frame, caption_images, caption_counts = _caption_items(ctx, config, data)
        if not caption_frame.empty:
            eval_sets["captions"] = (caption_frame, caption_images)
    open_sets: dict[str, Any] = {}  # open-ended (TextVQA, MMHal): generated answers, not MC pairs
    for bench in config.benchmarks:
        if bench.open_ended:
            open_sets[bench.name] = (bench, *hub.load(bench))
        else:
            eval_sets[bench.name] = hub.load(bench)
    all_items = pd.concat([frame.assign(benchmark=name) for name, (frame, _) in eval_sets.items()]
                          + [frame.assign(benchmark=name) for name, (_, frame, _) in open_sets.items()],
                          ignore_index=True)
    ctx.save_table("items", all_items)
    ctx.save_json("construction", {"probes": {k: len(v) for k, v in data.probes.items()},
                                   "skipped": data.skipped, "images": len(data.images),
                                   "filter": filtered, "captions": caption_counts})
    rows: list[dict] = []
    levels: list[pd.DataFrame] = []
    predictions: list[pd.DataFrame] = []
    variants = [v for v in [config.tuning, *config.ablations] if v is not None]
    result: dict[str, float] = {}
    for m, spec in enumerate(config.models):
        scored, _, opened = _evaluate(ctx, config, spec, eval_sets, open_sets)
        predictions += [scored.assign(model=spec.name, variant="base"), opened.assign(model=spec.name, variant="base")]
        r, lv = _score_rows(spec.name, "base", scored)
        rows += r + openended.table_rows(spec.name, "base", opened)
        levels += lv
        base = r[0]
        ctx.log(step=m, **{f"base_{k}": v for k, v in base.items() if isinstance(v, float)})
        if m == 0:
            result.update({"base_paired_accuracy": base["paired_accuracy"], "base_row_accuracy": base["row_accuracy"]})
        trained_by = _train_variants(ctx, config, spec, variants, data, m)
        for variant in variants:
            trainer, trained = trained_by[variant.name]
            phase = f"{variant.name}_{m}"
            tuned = tuning.export(ctx, spec, trained, trainer, phase)
            scored, handle, opened = _evaluate(ctx, config, tuned, eval_sets, open_sets)
            stop_server(handle.name)
            predictions += [scored.assign(model=spec.name, variant=variant.name),
                            opened.assign(model=spec.name, variant=variant.name)]
            r, lv = _score_rows(spec.name, variant.name, scored)
            rows += r + openended.table_rows(spec.name, variant.name, opened)
            levels += lv
            ctx.log(step=m, **{f"{variant.name}_{k}": v for k, v in r[0].items() if isinstance(v, float)},
                    **{f"{variant.name}_train_{k}": float(v) for k, v in trained.metrics.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
            if m == 0:
                result[f"{variant.name}_paired_accuracy"] = r[0]["paired_accuracy"]
                result[f"{variant.name}_row_accuracy"] = r[0]["row_accuracy"]
    table = pd.DataFrame(rows)
    granularity = pd.concat(levels, ignore_index=True)
    ctx.save_table("eval", table)
    ctx.save_table("granularity", granularity)
    ctx.save_table("predictions", pd.concat(predictions, ignore_index=True).drop(columns=["choices"]))
    ctx.save_plot("paired_accuracy", plots.paired_by_split(table[table["benchmark"] == table["benchmark"].iloc[0]]))
    ctx.save_plot("granularity", plots.granularity(granularity))
    if config.tuning is not None:
        result["paired_accuracy"] = result[f"{config.tuning.name}_paired_accuracy"]
        result["gain"] = result["paired_accuracy"] - result["base_paired_accuracy"]
    else:
        result["paired_accuracy"] = result["base_paired_accuracy"]
    return result


JOB = Job(
    name="finer",
    description="FINER: fine-grained negative queries (paired MC benchmark) and FINER-Tuning with DPO on VLMs.",
    config=Config,
    run=run,
)
