"""vlm_compression: prune the language backbone of an LVLM layerwise (ShortGPT) or widthwise (LLM-Pruner),
then recover it by SFT or distillation on a fraction of the data, and score it against the unpruned model.

1. Calibration through the shared `HookedModel`: every block's input and output on calibration samples ->
   block influence (`calibrate.py`, `layerwise.py`).
2. Taylor importance of attention KV groups and MLP channels from the SFT loss gradient on calibration
   samples, in this process (`widthwise.py`).
3. For each method x ratio: prune a copy, save it as a pruned checkpoint (`explab.models.save_pruned`),
   serve it and evaluate it zero-shot (`evaluate.py`).
4. For each recovery mode x data fraction: train it with `explab.train` (`recovery.py`), save and evaluate.
Tables: importance, pruned, eval (+ avg_relative); plots: BI per block, relative score vs compression,
recovery vs data fraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.errors import ConfigError
from explab.job import Job
from explab.models import ModelSpec, load_model
from explab.runs import RunContext
from explab.servers import stop_server
from explab.train import objectives as obj
from jobs.vlm_compression import benchmarks, calibrate, data, evaluate, mix, plots, prune, widthwise
from jobs.vlm_compression.backbone import blocks
from jobs.vlm_compression.config import Config
from jobs.vlm_compression.prompts import render
from jobs.vlm_compression.recovery import recover


def _importance_table(bi: np.ndarray, groups: list[widthwise.LayerGroups]) -> pd.DataFrame:
    rows = [{"kind": "block", "layer": i, "index": i, "score": float(s)} for i, s in enumerate(bi)]
    for i, g in enumerate(groups):
        rows += [{"kind": "attn_group", "layer": i, "index": k, "score": float(s)} for k, s in enumerate(g.attn)]
        rows += [{"kind": "mlp_channel", "layer": i, "index": k, "score": float(s)} for k, s in enumerate(g.mlp)]
    return pd.DataFrame(rows)


def _taylor(base: Any, rows: list[dict[str, Any]], config: Config) -> list[widthwise.LayerGroups]:
    model = base.model
    cut = config.width.max_length

    def loss(row: dict[str, Any]) -> Any:
        def closure() -> Any:
            ex = obj.chat_example(base, row["messages"], row.get("images"))
            if cut:
                ex = {k: v[:, :cut] if k in ("input_ids", "attention_mask", "labels") else v for k, v in ex.items()}
            ex = {k: v.to(base.device) for k, v in ex.items()}
            out = model(**{k: v for k, v in ex.items() if k != "labels"}, use_cache=False)
            return obj.next_token_ce(out.logits, ex["labels"])
        return closure

    grads = widthwise.accumulate_gradients(model, [loss(r) for r in rows[: config.width.n_samples]])
    return widthwise.group_importance(model, grads, config.width.salience)


def _evaluate(ctx: RunContext, spec: ModelSpec, config: Config, base: Any, items: list[data.Item],
              texts: list[str]) -> dict[str, float]:
    """Serve a pruned checkpoint, score it, and stop its server (each checkpoint is evaluated once)."""
    handle = ctx.model(spec, "hooked", config.server)
    try:
        return evaluate.scores(handle, base, items, texts, config.eval_batch, config.data.max_new_tokens)
    finally:
        stop_server(handle.name)


def _spec_of(config: Config, path: Any) -> ModelSpec:
    """The base spec's device and dtype for a checkpoint directory (absolute: Ray workers have another cwd)."""
    return config.model.model_copy(update={"name": str(path.resolve()), "tiny": {}, "gguf_file": None})


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    cfg = config.data
    base = load_model(config.model)  # in this process: gradients for the Taylor importance, copies to prune
    vision = base.kind == "vlm"
    images = cfg.images and vision
    train_rows = (mix.conversation_rows(cfg.train, cfg.image_root, images, cfg.train_limit) if cfg.train
                  else data.training_rows(cfg.n_train_scenes, config.seed, cfg.image_size, images))
    items = [it for it in data.vqa_items(cfg.n_eval_scenes, config.seed + 1, cfg.image_size, images)
             if it.benchmark in cfg.benchmarks]
    if cfg.sources and not images:
        raise ConfigError("data.sources are image benchmarks: evaluate them with a VLM and data.images true, "
                          "or drop data.sources for a text-only backbone")
    for source in cfg.sources:
        items += benchmarks.load(source.name, source.source, source.split, source.limit, source.images)
    texts = data.text_corpus(cfg.n_ppl_texts, config.seed + 2)
    rng = np.random.default_rng(config.seed)
    calib = [train_rows[int(i)] for i in rng.permutation(len(train_rows))]  # the authors' random samples

    # 1-2: importances
    n_layers = len(blocks(base.model))
    hooked = ctx.model(config.model, "hooked", config.server)
    layer_rows = calib[: config.layer.n_samples]
    bi, angular = calibrate.influence(
        hooked, [render(base, r["messages"], generation_prompt=False) for r in layer_rows],
        [(r.get("images") or [None])[0] for r in layer_rows], n_layers, config.layer.batch)
    groups = _taylor(base, calib, config) if "widthwise" in config.methods else []
    importance = _importance_table(bi, groups)
    ctx.save_table("importance", importance)

    base_score = evaluate.scores(hooked, base, items, texts, config.eval_batch, cfg.max_new_tokens)
    evals = evaluate.rows({"method": "unpruned", "ratio": 0.0, "recovery": "none", "fraction": 0.0},
                          base_score, base_score)
    base_sizes = prune.sizes(base)
    pruned_rows: list[dict[str, Any]] = []
    settings = [(m, r) for m in config.methods for r in sorted(config.ratios)]
    modes = [m for m in config.recovery.modes if m != "none"]
    progress = ctx.progress(len(settings) * (1 + len(modes) * len(config.recovery.fractions)), "prune and recover")
    step = 0
    # 3: zero-shot rows first (a sweep can stop there), then 4: recovery
    checkpoints: dict[tuple[str, float], tuple[ModelSpec, dict[str, Any]]] = {}
    for method, ratio in settings:
        loaded = prune.copy_of(base)
        info = (prune.layerwise_prune(loaded, bi, angular, ratio, config.layer) if method == "layerwise"
                else prune.widthwise_prune(loaded, groups, ratio, config.width))
        after = prune.sizes(loaded)
        info = {"method": method, "ratio": ratio, **info}
        path = prune.save_pruned_model(loaded, ctx.path("artifacts", "pruned", f"{method}-{ratio:g}"), info)
        del loaded
        pruned_rows.append({
            "method": method, "ratio": ratio, "layer_ratio": info["layer_ratio"],
            "removed": _removed(info), "parameters": after["parameters"],
            "block_parameters": after["block_parameters"], "n_blocks": after["n_blocks"],
            "block_compression": 1 - after["block_parameters"] / base_sizes["block_parameters"],
            "parameters_before": base_sizes["parameters"], "path": str(path.resolve()),
        })
        spec = _spec_of(config, path)
        checkpoints[(method, ratio)] = (spec, info)
        score = _evaluate(ctx, spec, config, base, items, texts)
        evals += evaluate.rows({"method": method, "ratio": ratio, "recovery": "none", "fraction": 0.0}, score,
                               base_score)
        ctx.log(step=step, ratio=ratio, avg_relative=_avg(score, base_score))
        step += 1
        progress.advance()
    ctx.save_table("pruned", pd.DataFrame(pruned_rows))
    for (method, ratio), (spec, info) in checkpoints.items():
        for mode in modes:
            for fraction in sorted(config.recovery.fractions):
                name = f"recover-{method}-{ratio:g}-{mode}-{fraction:g}"
                path, metrics = recover(ctx, spec, config.model, mode, fraction, train_rows, config.recovery, vision,
                                        ctx.path("artifacts", "recovered", name), name, info)
                rec_spec = _spec_of(config, path)
                score = _evaluate(ctx, rec_spec, config, base, items, texts)
                evals += evaluate.rows({"method": method, "ratio": ratio, "recovery": mode, "fraction": fraction},
                                       score, base_score)
                ctx.log(step=step, ratio=ratio, fraction=fraction, avg_relative=_avg(score, base_score),
                        train_loss=float(metrics.get("loss", float("nan"))))
                step += 1
                progress.advance()

    table = pd.DataFrame(evals)
    ctx.save_table("eval", table)
    avg = evaluate.average_relative(table)
    ctx.save_table("avg_relative", avg)
    first = pruned_rows[0]["removed"] if pruned_rows and config.methods[0] == "layerwise" else ""
    ctx.save_plot("block_influence", plots.block_influence(importance, [int(x) for x in first.split(",") if x]))
    ctx.save_plot("relative_vs_compression", plots.relative_vs_compression(avg))
    ctx.save_plot("recovery_vs_fraction", plots.recovery_vs_fraction(avg))
    return summarize(avg)


def _avg(score: dict[str, float], base: dict[str, float]) -> float:
    rel = evaluate.relative(score, base)
    return float(np.nanmean([v for k, v in rel.items() if k != "perplexity"]))


def _removed(info: dict[str, Any]) -> str:
    if "removed_blocks" in info:
        return ",".join(str(i) for i in info["removed_blocks"])
    heads = sum(len(v) for v in info["removed_heads"].values())
    channels = sum(info["removed_channels"].values())
    return f"{heads} attention groups, {channels} MLP channels"


def summarize(avg: pd.DataFrame) -> dict[str, float]:
    """``avg_relative``: the mean over the recovered settings (the zero-shot ones when nothing was
    recovered; a sweep trial has one setting), ``zero_shot``: over the zero-shot ones; and per method
    and recovery mode."""
    pruned = avg[avg["method"] != "unpruned"]
    zero = pruned[pruned["recovery"] == "none"]
    recovered = pruned[pruned["recovery"] != "none"]
    out = {"avg_relative": float((recovered if len(recovered) else zero)["avg_relative"].mean()),
           "zero_shot": float(zero["avg_relative"].mean())}
    for (method, recovery), group in pruned.groupby(["method", "recovery"]):
        out[f"{method}_{recovery}"] = float(group["avg_relative"].mean())
    return out


JOB = Job(
    name="vlm_compression",
    description="VLM compression: ShortGPT layerwise / LLM-Pruner widthwise pruning of an LVLM's backbone, "
                "recovery by SFT and distillation on a fraction of the data.",
    config=Config,
    run=run,
)
