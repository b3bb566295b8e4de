"""seg_probe: layerwise segmentation probes through an MLLM's vision encoder, adapter and LLM.

1. features — one forward per image through the shared `HookedModel`, capturing every probed layer as a
   token grid (encoder patch tokens, adapter output, LLM hidden states at the image tokens), streamed
   through Ray Data into the cache (`features.py`);
2. probes — a linear 1x1 probe per layer on the training images, the same schedule for every layer,
   scored on held-out images: mIoU and pixel accuracy per layer (encoder -> adapter -> LLM), and
   per-token accuracy against raster position at chosen LLM layers (`probes.py`);
3. knockout — for the class pairs the probe confuses at an LLM layer, block attention from the
   misclassified tokens of the true class to its correctly classified tokens (control: as many random
   image keys), re-probe the later layers with the same probes (`knockout.py`);
4. bidirectional — re-extract with full attention among the image tokens, apply the same probes and
   retrained ones: per-layer scores, per-position accuracy and spatial consistency.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section
from explab.errors import ConfigError
from explab.interventions import Bidirectional
from explab.job import Job
from explab.models import ModelSpec, check_layers
from explab.paths import cache_dir, runs_root_of
from explab.runs import RunContext
from explab.servers import ServerOptions
from explab.threads import torch_threads
from jobs.seg_probe import plots
from jobs.seg_probe.data import SCENE_CLASSES, check_hf_available, scene_rows
from jobs.seg_probe.features import FeatureSet, Layer, Variant, extract, layer_list
from jobs.seg_probe.knockout import confused_pairs, knockout_layers, knockout_sets, knockout_spec
from jobs.seg_probe.probes import (
    LinearProbe,
    ProbeSchedule,
    confusion,
    downsample_labels,
    position_accuracy,
    resize_labels,
    segmentation_scores,
    spatial_consistency,
    train_probe,
)


class DataSource(Section):
    """Images with segmentation annotations (one split of one dataset)."""

    data: str = "hf:zhoubolei/scene_parse_150"  # ADE20K SceneParsing (150 classes) in its Hugging Face form
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    image_column: str = "image"
    label_column: str = "annotation"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra dataset arguments (synthetic: n, size, seed)


class FeatureOptions(Section):
    batch_size: int = Field(4, ge=1)  # images per Ray Data batch (each is its own forward: grid requests run alone)
    shard_images: int = Field(64, ge=1)  # images per safetensors shard
    half: bool = False  # store features as float16 (paper scale: halves the cache)


class KnockoutConfig(Section):
    enabled: bool = True
    layers: list[int] = Field([8, 16], min_length=1)  # LLM layers where pairs are taken and the knockout starts
    window: int | None = Field(None, ge=1)  # knock out in this many layers from there (None: every later layer)
    pairs: int = Field(3, ge=1)  # most-confused class pairs per layer
    queries: Literal["confused", "misclassified"] = "confused"  # tokens of A predicted as B, or any wrong ones
    images: int | None = Field(None, ge=1)  # validation images used (None: all)

    @field_validator("layers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value


class BidirectionalConfig(Section):
    enabled: bool = True
    layers: list[int] | None = None  # LLM layers with bidirectional image attention (None: all)
    retrain: bool = True  # also fit fresh probes on the bidirectional features (same schedule)


class Config(JobConfig):
    model: ModelSpec = ModelSpec(name="llava-hf/llava-1.5-7b-hf")
    server: ServerOptions = ServerOptions()
    prompt: str = "USER: <image>\nDescribe the image. ASSISTANT:"
    train: DataSource = DataSource(split="train", limit=2000)
    val: DataSource = DataSource(split="validation", limit=500)
    n_classes: int = Field(150, ge=2)
    class_names: list[str] | None = None
    label_offset: int = -1  # ADE20K: 0 = "other" -> ignored, 1..150 -> 0..149
    ignore_index: int = 255
    image_size: int = Field(336, ge=8)  # the vision tower's input side; images are resized + centre-cropped to it
    vision_layers: list[int] | None = None  # None: every vision-encoder layer
    llm_layers: list[int] | None = None  # None: every LLM layer (or the window below)
    llm_window: int | None = Field(None, ge=1)  # probe only LLM layers [llm_window_start, +llm_window)
    llm_window_start: int = Field(0, ge=0)
    probe: ProbeSchedule = ProbeSchedule()
    position_layers: list[int] = Field([16], min_length=1)  # LLM layers for per-position accuracy
    knockout: KnockoutConfig = KnockoutConfig()
    bidirectional: BidirectionalConfig = BidirectionalConfig()
    features: FeatureOptions = FeatureOptions()
    plot_images: int = Field(3, ge=0)  # validation images drawn with their predicted masks per stage
    save_probes: bool = True
    torch_threads: int | None = None

    @model_validator(mode="after")
    def _window(self) -> Config:
        if self.llm_window is not None and self.llm_layers is not None:
            raise ValueError("give either llm_layers or llm_window (+ llm_window_start), not both")
        if self.class_names is not None and len(self.class_names) != self.n_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for n_classes={self.n_classes}: "
                             "give one name per class")
        return self


# ---------------------------------------------------------------- layers and data


def probed_llm_layers(config: Config, n_llm: int) -> list[int]:
    """The probed LLM layers: the list / window, plus every knockout and position layer."""
    if config.llm_layers is not None:
        base = config.llm_layers
    elif config.llm_window is not None:
        base = list(range(config.llm_window_start, min(n_llm, config.llm_window_start + config.llm_window)))
    else:
        base = list(range(n_llm))
    extra = list(config.position_layers) + (list(config.knockout.layers) if config.knockout.enabled else [])
    return sorted(set(base) | set(extra))


def _check(config: Config, info: dict[str, Any]) -> tuple[int, int]:
    n_llm, n_vis = int(info["n_layers"]), int(info.get("n_vision_layers", 0))
    name = config.model.name
    if n_vis == 0:
        raise ConfigError(f"field 'model': {name!r} has no vision tower explab can hook: use a vision-language model")
    check_layers(config.llm_layers or [], n_llm, "llm_layers", name)
    check_layers(config.vision_layers or [], n_vis, "vision_layers", name)
    check_layers(config.position_layers, n_llm, "position_layers", name)
    check_layers(config.knockout.layers, n_llm, "knockout.layers", name)
    check_layers(config.bidirectional.layers or [], n_llm, "bidirectional.layers", name)
    if config.llm_window is not None:
        check_layers([config.llm_window_start], n_llm, "llm_window_start", name)
    return n_vis, n_llm


def _dataset(source: DataSource, ctx: RunContext) -> Any:
    if source.data.startswith("hf:"):
        check_hf_available(source.data)
    return ctx.dataset(source.data, split=source.split, limit=source.limit, **source.kwargs)


def _features(config: Config, ctx: RunContext, hooked: Any, source: DataSource, layers: list[Layer],
              bidirectional: bool) -> FeatureSet:
    """Features of ``source`` at ``layers`` (variant ``causal``) and, with ``bidirectional``, at its LLM layers
    under bidirectional image attention (variant ``bidirectional``), from one pass over the data."""
    variants = [Variant.of("causal", layers)]
    if bidirectional:
        extra = [Bidirectional(image=True, layers=config.bidirectional.layers)]
        variants.append(Variant.of("bidirectional", [ly for ly in layers if ly.stage == "llm"], extra))
    prep = {"size": config.image_size, "offset": config.label_offset, "ignore_index": config.ignore_index,
            "n_classes": config.n_classes, "image_column": source.image_column, "label_column": source.label_column,
            "half": config.features.half}
    key = {"slug": f"{config.model.name.replace('/', '_').replace(':', '_')}-{source.split}",
           "model": config.model.model_dump(mode="json"), "data": source.model_dump(mode="json"), "seed": ctx.seed}
    return extract(hooked, _dataset(source, ctx), variants, root=cache_dir("seg_probe", runs_root_of(ctx.run_dir)),
                   key=key, prompt=config.prompt, prep=prep, batch_size=config.features.batch_size,
                   shard_images=config.features.shard_images)


# ---------------------------------------------------------------- probing


class Probed:
    """Per layer: the probe, its token-level predictions on the validation images, and its scores."""

    def __init__(self) -> None:
        self.probes: dict[str, LinearProbe] = {}
        self.token_pred: dict[str, torch.Tensor] = {}
        self.pixel_pred: dict[str, torch.Tensor] = {}
        self.rows: list[dict[str, Any]] = []


def _score(config: Config, probe: LinearProbe, grids: torch.Tensor, labels: torch.Tensor,
           token_labels: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    token_pred = probe.predict(grids)
    if config.probe.mode == "upsample":
        pixel_pred = probe.predict(grids, size=tuple(labels.shape[-2:]))
        scores = segmentation_scores(pixel_pred, labels, config.n_classes, config.ignore_index)
    else:
        pixel_pred = resize_labels(token_pred, tuple(labels.shape[-2:]))
        scores = segmentation_scores(token_pred, token_labels, config.n_classes, config.ignore_index)
    scores["consistency"] = spatial_consistency(token_pred)
    return scores, token_pred, pixel_pred


def token_labels_of(config: Config, labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return downsample_labels(labels, grid, config.n_classes, config.ignore_index)


def probe_layers(config: Config, ctx: RunContext, layers: list[Layer], train: FeatureSet, val: FeatureSet,
                 *, variant: str = "causal", probes: dict[str, LinearProbe] | None = None, log: bool = True) -> Probed:
    """Train (or reuse ``probes``) and score a probe per layer on ``variant``'s features; one layer's features
    in memory at a time."""
    out = Probed()
    train_labels, val_labels = train.labels(), val.labels()
    progress = ctx.progress(len(layers), "probes") if log else None
    for depth, ly in enumerate(layers):
        x_val = val.layer(ly.name, variant)
        grid = tuple(x_val.shape[1:3])
        val_tokens = token_labels_of(config, val_labels, grid)
        if probes is not None:
            probe = probes[ly.name]
        else:
            x_train = train.layer(ly.name, variant)
            target = train_labels if config.probe.mode == "upsample" else token_labels_of(config, train_labels, grid)
            probe = train_probe(x_train, target, config.n_classes, config.probe, ignore_index=config.ignore_index,
                                seed=ctx.seed)
            del x_train
        scores, token_pred, pixel_pred = _score(config, probe, x_val, val_labels, val_tokens)
        out.probes[ly.name], out.token_pred[ly.name], out.pixel_pred[ly.name] = probe, token_pred, pixel_pred
        out.rows.append({"depth": depth, "stage": ly.stage, "layer": ly.index, "name": ly.name, "point": ly.point,
                         "grid_h": grid[0], "grid_w": grid[1], **scores})
        if log:
            ctx.log(step=depth, depth=depth, miou=scores["miou"], pixel_acc=scores["pixel_acc"])
        if progress is not None:
            progress.advance()
    return out


def position_rows(config: Config, probed: Probed, val: FeatureSet, names: list[str], attention: str,
                  probes: str) -> list[dict[str, Any]]:
    rows = []
    labels = val.labels()
    for name in names:
        pred = probed.token_pred[name]
        tokens = token_labels_of(config, labels, tuple(pred.shape[1:3]))
        acc, counts = position_accuracy(pred, tokens, config.ignore_index)
        w = pred.shape[2]
        rows += [{"name": name, "attention": attention, "probes": probes, "position": p, "row": p // w,
                  "col": p % w, "accuracy": float(acc[p]), "count": int(counts[p])} for p in range(len(acc))]
    return rows


# ---------------------------------------------------------------- knockout


def run_knockout(config: Config, ctx: RunContext, hooked: Any, layers: list[Layer], probed: Probed,
                 val: FeatureSet, n_llm: int) -> pd.DataFrame:
    """Knockout vs control at each knockout layer, re-probed at that layer and every later probed layer."""
    from jobs.seg_probe.features import captures

    kc = config.knockout
    labels = val.labels()
    n_images = val.n if kc.images is None else min(kc.images, val.n)
    images = val.images(n_images)
    rng = np.random.default_rng(ctx.seed)
    rows: list[dict[str, Any]] = []
    llm = [ly for ly in layers if ly.stage == "llm"]
    for layer in kc.layers:
        name = f"llm.{layer}"
        pred = probed.token_pred[name][:n_images]
        tokens = token_labels_of(config, labels[:n_images], tuple(pred.shape[1:3]))
        conf = confusion(pred, tokens, config.n_classes, config.ignore_index)
        later = [ly for ly in llm if ly.index >= layer]
        acting = knockout_layers(layer, n_llm, kc.window)
        caps = captures(later)
        for a, b, count in confused_pairs(conf, kc.pairs):
            for i in range(n_images):
                sets = knockout_sets(pred[i], tokens[i], a, b if kc.queries == "confused" else None, rng)
                if sets is None or not sets.control:
                    continue
                requests = [{"text": config.prompt, "images": [images[i]], "grids": [ly.name for ly in later],
                             "interventions": [*spec, *caps]}
                            for spec in ([knockout_spec(acting, sets.queries, sets.keys)],
                                         [knockout_spec(acting, sets.queries, sets.control)])]
                ko, control = hooked.forward(requests)
                q = torch.tensor(sets.queries)
                truth = tokens[i].reshape(-1)[q]
                for ly in later:
                    probe = probed.probes[ly.name]
                    base = probed.token_pred[ly.name][i].reshape(-1)[q]
                    after = {kind: probe.predict(torch.as_tensor(np.array(res.grids[ly.name][0]))[None])[0]
                             .reshape(-1)[q] for kind, res in (("knockout", ko), ("control", control))}
                    rows.append({"knock_layer": layer, "probe_layer": ly.index, "class_a": a, "class_b": b,
                                 "pair_count": count, "image": i, "n_queries": len(sets.queries),
                                 "n_keys": len(sets.keys), "acc_base": float((base == truth).float().mean()),
                                 "acc_knockout": float((after["knockout"] == truth).float().mean()),
                                 "acc_control": float((after["control"] == truth).float().mean()),
                                 "changed_knockout": float((after["knockout"] != base).float().mean()),
                                 "changed_control": float((after["control"] != base).float().mean())})
    columns = ["knock_layer", "probe_layer", "class_a", "class_b", "pair_count", "image", "n_queries", "n_keys",
               "acc_base", "acc_knockout", "acc_control", "changed_knockout", "changed_control"]
    table = pd.DataFrame(rows, columns=columns)
    table["delta_knockout"] = table["acc_knockout"] - table["acc_base"]
    table["delta_control"] = table["acc_control"] - table["acc_base"]
    return table


# ---------------------------------------------------------------- the run


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    with torch_threads(config.torch_threads):
        return _run(config, ctx)


def _run(config: Config, ctx: RunContext) -> dict[str, float]:
    hooked = ctx.model(config.model, "hooked", config.server)
    n_vis, n_llm = _check(config, hooked.describe())
    layers = layer_list(n_vis, n_llm, config.vision_layers, probed_llm_layers(config, n_llm))
    bidirectional = config.bidirectional.enabled
    train = _features(config, ctx, hooked, config.train, layers, bidirectional and config.bidirectional.retrain)
    val = _features(config, ctx, hooked, config.val, layers, bidirectional)
    ctx.save_json("features", {"train": str(train.path), "val": str(val.path), "train_cached": train.cached,
                               "val_cached": val.cached, "n_train": train.n, "n_val": val.n,
                               "layers": [ly.name for ly in layers]})
    probed = probe_layers(config, ctx, layers, train, val)
    probe_table = pd.DataFrame(probed.rows)
    ctx.save_table("probe", probe_table)
    if config.save_probes:
        tensors = {k: v for name, p in probed.probes.items() for k, v in p.tensors(name).items()}
        ctx.save_artifact("probes", tensors, {"mode": config.probe.mode, "n_classes": str(config.n_classes)})

    position = [f"llm.{i}" for i in config.position_layers]
    pos_rows = position_rows(config, probed, val, position, "causal", "causal")
    bidir_rows: list[dict[str, Any]] = []
    if bidirectional:
        llm = [ly for ly in layers if ly.stage == "llm"]
        same = probe_layers(config, ctx, llm, train, val, variant="bidirectional", probes=probed.probes, log=False)
        causal = {r["name"]: r for r in probed.rows}
        for r in same.rows:
            bidir_rows.append({**causal[r["name"]], "attention": "causal", "probes": "causal"})
            bidir_rows.append({**r, "depth": causal[r["name"]]["depth"], "attention": "bidirectional",
                               "probes": "causal"})
        pos_rows += position_rows(config, same, val, position, "bidirectional", "causal")
        if config.bidirectional.retrain:
            fresh = probe_layers(config, ctx, llm, train, val, variant="bidirectional", log=False)
            bidir_rows += [{**r, "depth": causal[r["name"]]["depth"], "attention": "bidirectional",
                            "probes": "retrained"} for r in fresh.rows]
            pos_rows += position_rows(config, fresh, val, position, "bidirectional", "retrained")
    positions = pd.DataFrame(pos_rows)
    bidir = pd.DataFrame(bidir_rows)
    ctx.save_table("position", positions)
    ctx.save_table("bidirectional", bidir)

    knock = pd.DataFrame()
    if config.knockout.enabled:
        knock = run_knockout(config, ctx, hooked, layers, probed, val, n_llm)
    ctx.save_table("knockout", knock)

    names = config.class_names or (list(SCENE_CLASSES) if config.n_classes == len(SCENE_CLASSES) else None)
    ctx.save_plot("miou_by_layer", plots.miou_by_layer(probe_table))
    ctx.save_plot("position_accuracy", plots.position_accuracy(positions))
    ctx.save_plot("knockout", plots.knockout(knock))
    if config.plot_images:
        stages = _plot_layers(layers, probe_table)
        ctx.save_plot("masks", plots.masks(val, probed, stages, config.plot_images, config.n_classes,
                                           config.ignore_index, names))
    return summarize(probe_table, knock, bidir)


def _plot_layers(layers: list[Layer], table: pd.DataFrame) -> list[str]:
    """For the mask plot: the best encoder layer, the adapter, and the first, best and last LLM layers."""
    out = []
    for stage in ("encoder", "adapter", "llm"):
        part = table[table["stage"] == stage]
        if part.empty:
            continue
        picks = [part.loc[part["miou"].idxmax(), "name"]]
        if stage == "llm":
            picks = [part.iloc[0]["name"], *picks, part.iloc[-1]["name"]]
        out += [p for p in dict.fromkeys(picks) if p not in out]
    return out


def summarize(probe: pd.DataFrame, knock: pd.DataFrame, bidir: pd.DataFrame) -> dict[str, float]:
    """Final metrics: the headline curve's points (best encoder, adapter, best / last LLM) and the interventions'."""
    by = {s: probe[probe["stage"] == s] for s in ("encoder", "adapter", "llm")}
    out = {"encoder_miou": float(by["encoder"]["miou"].max()), "adapter_miou": float(by["adapter"]["miou"].iloc[0]),
           "llm_miou": float(by["llm"]["miou"].max()), "llm_last_miou": float(by["llm"]["miou"].iloc[-1]),
           "llm_pixel_acc": float(by["llm"]["pixel_acc"].max())}
    out["adapter_drop"] = out["encoder_miou"] - out["adapter_miou"]
    out["llm_recovery"] = out["llm_miou"] - out["adapter_miou"]
    if not knock.empty:
        out["knockout_delta"] = float(knock["delta_knockout"].mean())
        out["control_delta"] = float(knock["delta_control"].mean())
        out["knockout_effect"] = out["control_delta"] - out["knockout_delta"]
    if not bidir.empty:
        causal = bidir[(bidir["attention"] == "causal")]
        retrained = bidir[(bidir["probes"] == "retrained")]
        if not retrained.empty:
            out["bidirectional_miou"] = float(retrained["miou"].max())
            out["bidirectional_gain"] = out["bidirectional_miou"] - float(causal["miou"].max())
    return out


JOB = Job(
    name="seg_probe",
    description="Segmentation probes through an MLLM's vision encoder, adapter and LLM; attention knockout and "
                "bidirectional image attention.",
    config=Config,
    run=run,
    synthetic={"seg_scenes": scene_rows},
)
