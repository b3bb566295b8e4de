"""ezpc: explaining CLIP's zero-shot predictions through concepts (EZPC; authors' code oonat/ezpc).

For every (backbone, dataset) pair:

1. the concept vocabulary (concept files, or an LLM through the shared Generator prompted with the
   class names) and the class names; both embedded with the CLIP text tower through the shared
   embedding pipeline and L2-normalised: C (k × d) from ``concepts.template``, T (classes × d)
   from ``class_templates`` (averaged, renormalised);
2. image embeddings V of the train and test splits through the same pipeline (Ray Data
   ``map_batches`` on an actor pool, cached per (encoder, dataset, split)), L2-normalised;
3. A (d × k) trained from Cᵀ on the train images of the seen classes: MSE(A, Cᵀ) + λ·KL(CLIP ‖
   bottleneck), Adam, full batch, unit-norm columns, best A kept (`jobs.ezpc.model`);
4. on the test images: zero-shot accuracy of CLIP and through the bottleneck (all / seen / unseen
   classes), agreement and fidelity, the same for the untrained bottleneck A = Cᵀ, faithfulness
   (top-k vs random concept deletion), cos(A_j, C_j), top-k concept explanations; tables, A as
   safetensors, plots;
5. with several datasets, cross-dataset transfer: each dataset's A applied to every other dataset's
   test images and class names (`metrics.transfer`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section, Seed
from explab.data import slug
from explab.embeddings import EmbedOptions, embed
from explab.errors import ConfigError
from explab.job import Job
from explab.models import EncoderSpec, ModelSpec
from explab.runs import RunContext
from explab.servers import ServerOptions
from explab.vectors import unit_rows
from jobs.ezpc import concepts as vocab
from jobs.ezpc import explain, metrics, plots, regions, shapes
from jobs.ezpc.model import Objective, TrainResult, logit_params, train_projection


class DatasetConfig(Section):
    name: str  # label in tables and plots, e.g. CIFAR-100
    spec: str  # hf:<name>[:<config>], parquet:<path>, imagefolder:<dir>, synthetic:ezpc_shapes, ...
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    # class names, in label order: a list, a class file (jobs/ezpc/concepts/ or a path), or None:
    # the label column's ClassLabel names (hf:) or the generator's own names (synthetic:ezpc_shapes)
    classes: list[str] | str | None = None
    # concept files: names in jobs/ezpc/concepts/, paths or http(s) URLs; text (one per line) or LF-CBM's JSON
    # {class: [concepts]} (with source llm: added to the LLM's phrases)
    concepts: list[str] = Field(default_factory=list)
    concept_source: Literal["file", "llm"] | None = None  # this dataset's vocabulary source (None: concepts.source)
    limit_train: int | None = Field(None, ge=1)  # first n train images (None: all)
    limit_test: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the dataset loader (synthetic: also part=<split>)


class ConceptConfig(Section):
    source: Literal["file", "llm"] = "file"
    size: int | None = Field(None, ge=1)  # vocabulary-size ablation: a seeded random subset of this many
    subset_seed: Seed = 1234
    template: str = "a photo of {}"  # how a concept phrase is embedded (the authors' prompt)
    # Label-free CBM's filter over the backbone's text (and image) embeddings; None switches a step off
    max_length: int | None = Field(None, ge=1)  # drop concepts longer than this many characters (LF-CBM: 30)
    max_class_similarity: float | None = Field(None, gt=-1.0, le=1.0)  # drop concepts this close to a class name
    max_concept_similarity: float | None = Field(None, gt=-1.0, le=1.0)  # near-duplicates: keep one of them
    min_activation: float | None = Field(None, ge=-1.0, le=1.0)  # drop concepts no training image shows:
    activation_top: int = Field(5, ge=1)  # ... mean cosine of their top `activation_top` train images below this
    # the LLM path
    generator: ModelSpec = ModelSpec(name="Qwen/Qwen2.5-7B-Instruct")
    server: ServerOptions = ServerOptions()
    prompts: list[str] = Field(default_factory=lambda: list(vocab.DEFAULT_PROMPTS))  # {cls} = class name
    max_tokens: int = Field(160, ge=1)
    per_prompt: int | None = Field(10, ge=1)  # phrases kept per (class, prompt)
    max_chars: int = Field(30, ge=1)
    max_words: int = Field(5, ge=1)


class TrainConfig(Section):
    lam: float = Field(1.0, ge=0.0)  # λ: weight of the KL reconstruction term
    lr: float = Field(0.01, gt=0.0)
    epochs: int = Field(10_000, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: full batch (the paper)
    # logits = logit_scale · cos + logit_bias. The authors use raw cosines (scale 1, no bias); "backbone" reads the
    # open_clip model's own trained exp(t) / b (a SigLIP model's sigmoid bias; CLIP has none: 0)
    logit_scale: Annotated[float, Field(gt=0.0)] | Literal["backbone"] = 1.0
    logit_bias: float | Literal["backbone"] = 0.0
    objective: Objective = "softmax"  # sigmoid: per-class Bernoulli KLs of σ(logits), SigLIP's probabilities
    device: str = "auto"
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads while training (None: torch's default)
    num_gpus: float = Field(0.0, ge=0.0)  # > 0: train in a Ray task holding this much GPU
    log_every: int = Field(100, ge=1)  # epochs between ctx.log rows


class EvalConfig(Section):
    seen_ratio: float = Field(0.8, gt=0.0, le=1.0)  # classes whose train images train A (the rest: unseen)
    split_seed: Seed = 42
    top_k: int = Field(10, ge=1)  # concepts per explanation
    faithfulness_k: list[int] = Field(default_factory=lambda: [1, 3, 5, 10])
    explain_images: int = Field(4, ge=0)  # test images drawn as bar charts
    explanations_table: int | None = Field(200, ge=1)  # test images whose explanations are tabled (None: all)
    region_images: int = Field(0, ge=0)  # test images drawn with concept-region heatmaps (ViT, ResNet, SigLIP)
    region_concepts: int = Field(3, ge=1)  # ... of each image's top concepts
    # with several datasets: each dataset's A applied to every other's test images (`transfer.parquet`), and the
    # authors' protocol (`transfer_gzsl.parquet`): a fresh A per (source, target) on the union of both vocabularies
    transfer: bool = True
    transfer_pairs: list[tuple[str, str]] | None = None  # [[source, target], ...] for the authors' protocol (None: all)


class Config(JobConfig):
    # fp16 CLIP embeddings, as the authors run CLIP on a GPU (give dtype: float32 for a CPU run)
    backbones: list[EncoderSpec] = Field(default_factory=lambda: [EncoderSpec(name="open_clip:RN50/openai",
                                                                              dtype="float16")])
    datasets: list[DatasetConfig] = Field(default_factory=lambda: [DatasetConfig(
        name="CIFAR-100", spec="hf:uoft-cs/cifar100", image_column="img", label_column="fine_label",
        concepts=["cifar100", "imagenet"])])
    class_templates: list[str] = Field(default_factory=lambda: ["a photo of {}"])
    concepts: ConceptConfig = ConceptConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    embed: EmbedOptions = EmbedOptions()  # the image pipeline (actor pool, GPU fraction)
    text_embed: EmbedOptions = EmbedOptions()  # the text pipeline
    cache_dir: str | None = None  # embedding cache root, a path or s3://… (default: $EXPLAB_CACHE, else beside runs)

    @field_validator("backbones", mode="before")
    @classmethod
    def _one_backbone(cls, value: Any) -> Any:  # a single name is accepted (and sweepable)
        return [value] if isinstance(value, (str, dict)) else value

    @field_validator("backbones", "datasets", "class_templates")
    @classmethod
    def _not_empty(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        # raised as ConfigError (not ValueError) so pydantic lets the one-line message through as is
        for where, template in [("concepts.template", self.concepts.template)] + [
                (f"class_templates[{i}]", t) for i, t in enumerate(self.class_templates)]:
            if template.count("{}") != 1:
                raise ConfigError(f"{where} {template!r} must contain {{}} exactly once (where the phrase goes)")
        names = [ds.name for ds in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError("datasets: two datasets share a name: give each a distinct `name`")
        for ds in self.datasets:
            if (ds.concept_source or self.concepts.source) == "file" and not ds.concepts:
                raise ConfigError(f"dataset {ds.name!r}: `concepts` lists no concept files (its vocabulary source "
                                  "is file): name files in jobs/ezpc/concepts/ or paths, or set concept_source: llm")
            for name in ds.concepts:
                if not vocab.is_url(name):  # URLs are fetched when the job runs (a dry run stays offline)
                    vocab.resolve_file(name, f"dataset {ds.name!r}: concept file")
        for pair in self.eval.transfer_pairs or []:
            if not set(pair) <= set(names) or pair[0] == pair[1]:
                raise ConfigError(f"eval.transfer_pairs: {list(pair)} must name two different datasets of {names}")
        if isinstance(self.eval.faithfulness_k, list) and (
                not self.eval.faithfulness_k or min(self.eval.faithfulness_k) < 1):
            raise ConfigError("eval.faithfulness_k must list concept counts ≥ 1 (e.g. [1, 3, 5, 10])")
        return self


# ---- inputs ------------------------------------------------------------------------------------
def class_names(ds: DatasetConfig) -> list[str]:
    if isinstance(ds.classes, list):
        names = list(ds.classes)
    elif isinstance(ds.classes, str):
        names = vocab.read_phrases(vocab.resolve_file(ds.classes, "class file"))
    elif ds.spec == "synthetic:ezpc_shapes":
        names = shapes.class_names(**{k: v for k, v in ds.kwargs.items() if k in ("colours", "shapes")})
    elif ds.spec.startswith("hf:"):
        names = [vocab.clean_class_name(n) for n in vocab.hf_label_names(ds.spec, ds.label_column)]
    else:
        raise ConfigError(f"dataset {ds.name!r}: set `classes` (a list or a class file): {ds.spec!r} has no "
                          "class names of its own")
    if len(names) < 2:
        raise ConfigError(f"dataset {ds.name!r}: needs at least 2 classes (got {len(names)})")
    return names


def vocabulary(ds: DatasetConfig, names: list[str], config: Config, ctx: RunContext, cache: Path | None
               ) -> pd.DataFrame:
    """The dataset's full concept vocabulary (before the size subset): columns concept, cls."""
    cc = config.concepts
    if (ds.concept_source or cc.source) == "file":
        return pd.DataFrame({"concept": vocab.from_files(ds.concepts, concept_cache(cache)), "cls": ""})
    key = vocab.llm_cache_key(cc.generator.model_dump(), cc.prompts, names, max_tokens=cc.max_tokens,
                              per_prompt=cc.per_prompt, max_chars=cc.max_chars, max_words=cc.max_words)

    def make() -> list[dict[str, str]]:
        handle = ctx.model(cc.generator, "generator", cc.server)
        return vocab.generate(handle, names, cc.prompts, max_tokens=cc.max_tokens, seed=config.seed,
                              max_chars=cc.max_chars, max_words=cc.max_words, per_prompt=cc.per_prompt)

    rows = vocab.cached_generation(concept_cache(cache), key, make)
    if not rows:
        raise ConfigError(f"dataset {ds.name!r}: the LLM {cc.generator.name!r} gave no usable concept phrases: "
                          "check concepts.prompts / max_chars, or use concept files")
    if ds.concepts:  # files next to the LLM's phrases (as the authors append ImageNet's vocabulary)
        rows = rows + [{"concept": c, "cls": ""} for c in vocab.from_files(ds.concepts, concept_cache(cache))]
    frame = pd.DataFrame(rows)
    frame = frame.assign(key=frame["concept"].str.lower()).drop_duplicates("key")
    order = [c.lower() for c in vocab.finalize(frame["concept"].tolist())]
    return frame.set_index("key").loc[order].reset_index()[["concept", "cls"]]


def concept_cache(cache: Path | None) -> Path:
    """Where LLM vocabularies and fetched concept files are kept: ``ezpc-concepts`` beside the embeddings."""
    if cache is None:
        from explab.embeddings import cache_root as embeddings_cache

        cache = embeddings_cache()
    return cache.parent / "ezpc-concepts"


def cache_root(config: Config, ctx: RunContext) -> Path:
    """Where embeddings are cached: ``cache_dir``, else the pipeline's own (`explab.embeddings.cache_root`
    of this run's runs folder: $EXPLAB_CACHE, or ``cache/`` beside the runs dir)."""
    if config.cache_dir:
        from explab import mirror

        if mirror.is_uri(config.cache_dir):  # s3://…: its local mirror, entries synced with the store
            return mirror.local_for(config.cache_dir)
        return Path(config.cache_dir).expanduser()
    from explab.embeddings import cache_root as embeddings_cache
    from explab.runs import runs_root_of

    return embeddings_cache(runs_root_of(ctx.run_dir))


def image_embeddings(backbone: EncoderSpec, ds: DatasetConfig, split: str, limit: int | None,
                     config: Config, ctx: RunContext, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    kwargs = dict(ds.kwargs)
    if ds.spec.startswith("synthetic:"):
        kwargs.setdefault("part", split)
    result = embed(backbone, ds.spec, modality="image", column=ds.image_column, split=split, limit=limit,
                   keep=[ds.label_column], options=config.embed, cache_dir=cache, seed=ctx.seed, **kwargs)
    frame = result.frame()
    if not len(frame):
        return np.zeros((0, result.dim), np.float32), np.zeros(0, dtype=int)
    V = unit_rows(np.stack(frame.pop("embedding").to_numpy()).astype(np.float32))
    return V, frame[ds.label_column].to_numpy().astype(int)


def display_images(ds: DatasetConfig, n: int, seed: int) -> dict[int, Any]:
    """The first ``n`` test images as PIL images (for the bar charts)."""
    if n == 0:
        return {}
    from explab.data import load_dataset
    from explab.images import to_pil

    kwargs = dict(ds.kwargs)
    if ds.spec.startswith("synthetic:"):
        kwargs.setdefault("part", ds.test_split)
    if ds.spec.startswith("imagefolder:"):
        return {}
    rows = load_dataset(ds.spec, seed=seed, split=ds.test_split, limit=n, **kwargs).take(n)
    return {i: to_pil(row[ds.image_column]) for i, row in enumerate(rows)}


def seen_unseen(n_classes: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' class split: shuffle the class ids (seeded), the first ``ratio`` are seen."""
    order = np.random.default_rng(seed).permutation(n_classes)
    n_seen = n_classes if ratio >= 1.0 else max(1, int(n_classes * ratio))
    return np.sort(order[:n_seen]), np.sort(order[n_seen:])


def train(C: np.ndarray, V: np.ndarray, T: np.ndarray, tc: TrainConfig, seed: int) -> TrainResult:
    if tc.logit_scale == "backbone" or tc.logit_bias == "backbone":
        raise ValueError("resolve train.logit_scale / logit_bias with `with_backbone_logits` first")
    kwargs = dict(lam=tc.lam, lr=tc.lr, epochs=tc.epochs, batch_size=tc.batch_size, logit_scale=tc.logit_scale,
                  seed=seed, device=tc.device, threads=tc.torch_threads, objective=tc.objective,
                  logit_bias=tc.logit_bias)
    if tc.num_gpus <= 0:
        return train_projection(C, V, T, **kwargs)
    import ray

    remote = ray.remote(num_gpus=tc.num_gpus, num_cpus=1)(train_projection)
    return ray.get(remote.remote(C, V, T, **kwargs))


def with_backbone_logits(config: Config, backbone: EncoderSpec) -> Config:
    """``config`` with ``train.logit_scale`` / ``logit_bias`` given as "backbone" replaced by the backbone's own
    trained values (`model.logit_params`, read from the open_clip model loaded here on the CPU)."""
    tc = config.train
    if tc.logit_scale != "backbone" and tc.logit_bias != "backbone":
        return config
    from explab.models import load_encoder

    if backbone.kind != "open_clip":
        raise ConfigError(f"train.logit_scale/logit_bias 'backbone' needs an open_clip backbone, not "
                          f"{backbone.name!r}: give numbers")
    model = backbone.model.model_copy(update={"dtype": "float32", "device": "cpu"})
    scale, bias = logit_params(load_encoder(backbone.model_copy(update={"model": model})).model)
    update = {"logit_scale": scale if tc.logit_scale == "backbone" else tc.logit_scale,
              "logit_bias": bias if tc.logit_bias == "backbone" else tc.logit_bias}
    return config.model_copy(update={"train": tc.model_copy(update=update)})


# ---- one (backbone, dataset) pair --------------------------------------------------------------
def short_name(backbone: EncoderSpec) -> str:
    return backbone.name.removeprefix("open_clip:").removeprefix("hf-hub:")


def split_embeddings(backbone: EncoderSpec, ds: DatasetConfig, names: list[str], config: Config, ctx: RunContext,
                     cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(V_train, y_train, V_test, y_test) of a dataset under a backbone, labels checked against the class names."""
    V_train, y_train = image_embeddings(backbone, ds, ds.train_split, ds.limit_train, config, ctx, cache)
    V_test, y_test = image_embeddings(backbone, ds, ds.test_split, ds.limit_test, config, ctx, cache)
    for split, y in ((ds.train_split, y_train), (ds.test_split, y_test)):
        if len(y) == 0:
            raise ConfigError(f"dataset {ds.name!r}: split {split!r} has no images")
        if y.min() < 0 or y.max() >= len(names):
            raise ConfigError(f"dataset {ds.name!r}: labels in {split!r} run {y.min()}..{y.max()} but there are "
                              f"{len(names)} class names: fix `classes` or `label_column`")
    return V_train, y_train, V_test, y_test


def evaluate_pair(*, ds: DatasetConfig, backbone: EncoderSpec, names: list[str], concepts: pd.DataFrame,
                  C: np.ndarray, T: np.ndarray, data: tuple[np.ndarray, ...], config: Config, ctx: RunContext,
                  pair: int, step0: int) -> dict[str, Any]:
    ev, tc = config.eval, config.train
    V_train, y_train, V_test, y_test = data
    seen, unseen = seen_unseen(len(names), ev.seen_ratio, ev.split_seed)
    train_mask = np.isin(y_train, seen)
    if not train_mask.any():
        raise ConfigError(f"dataset {ds.name!r}: no train images of the seen classes: raise eval.seen_ratio")

    result = train(C, V_train[train_mask], T, tc, ctx.seed)
    A = result.A
    h = result.history
    for epoch in list(range(0, tc.epochs, tc.log_every)) + ([tc.epochs - 1] if (tc.epochs - 1) % tc.log_every else []):
        ctx.log(step=step0 + epoch, pair=pair, epoch=epoch, matching=h["matching"][epoch],
                reconstruction=h["reconstruction"][epoch], total=h["total"][epoch])

    z_clip = V_test @ T.T
    z_ezpc = explain.logits(V_test, A, T)
    z_init = explain.logits(V_test, C.T, T)  # the untrained bottleneck A = Cᵀ
    s = tc.logit_scale
    row: dict[str, Any] = {"dataset": ds.name, "backbone": backbone.name, "backbone_short": short_name(backbone),
                           "n_concepts": len(concepts), "n_classes": len(names), "n_seen": len(seen),
                           "n_train": int(train_mask.sum()), "n_test": len(y_test), "logit_scale": float(s),
                           "logit_bias": float(tc.logit_bias), "objective": tc.objective}
    row.update(metrics.zero_shot(z_clip, z_ezpc, y_test, scale=s))
    init = metrics.zero_shot(z_clip, z_init, y_test, scale=s)
    row.update({f"{k}_init": v for k, v in init.items() if k in ("acc_ezpc", "retained", "agreement")})
    if len(unseen):
        for part, cls in (("seen", seen), ("unseen", unseen)):
            mask = np.isin(y_test, cls)
            if mask.any():
                alone = metrics.zero_shot(z_clip[mask], z_ezpc[mask], y_test[mask], classes=cls, scale=s)
                joint = metrics.zero_shot(z_clip[mask], z_ezpc[mask], y_test[mask], scale=s)
                row.update({f"acc_clip_{part}": alone["acc_clip"], f"acc_ezpc_{part}": alone["acc_ezpc"],
                            f"acc_clip_{part}_gzsl": joint["acc_clip"], f"acc_ezpc_{part}_gzsl": joint["acc_ezpc"],
                            f"agreement_{part}": joint["agreement"]})
        for who in ("clip", "ezpc"):
            a, b = row.get(f"acc_{who}_seen_gzsl", 0.0), row.get(f"acc_{who}_unseen_gzsl", 0.0)
            row[f"hm_{who}"] = 2 * a * b / (a + b) if a + b > 0 else 0.0
    cos = metrics.column_alignment(A, C)
    row.update({"cos_A_C": float(cos.mean()), "cos_A_C_min": float(cos.min()),
                "col_norm_max_dev": float(np.abs(np.linalg.norm(A, axis=0) - 1).max()),
                "best_epoch": result.best_epoch, **{f"loss_{k}": v for k, v in result.best.items()}})

    act, prof = explain.activations(V_test, A), explain.profiles(T, A)
    faith = pd.DataFrame(metrics.faithfulness(act, prof, ev.faithfulness_k, np.random.default_rng([ctx.seed, pair])))
    k_ref = faith["k"].max()
    ref = faith[faith["k"] == k_ref].iloc[0]
    row.update({"faith_k": int(k_ref), "faith_topk_flip": ref["topk_flip"], "faith_random_flip": ref["random_flip"],
                "faith_topk_drop": ref["topk_drop"], "faith_random_drop": ref["random_drop"]})
    faith.insert(0, "backbone_short", short_name(backbone))
    faith.insert(0, "backbone", backbone.name)
    faith.insert(0, "dataset", ds.name)

    n_table = len(y_test) if ev.explanations_table is None else min(ev.explanations_table, len(y_test))
    table = explain.explain(V_test[:n_table], A, T, concepts["concept"].tolist(), names, k=ev.top_k,
                            labels=y_test[:n_table])
    table.insert(0, "backbone", backbone.name)
    table.insert(0, "dataset", ds.name)

    losses = pd.DataFrame({"dataset": ds.name, "backbone": backbone.name, "epoch": np.arange(len(h["total"])),
                           **h})
    concepts_out = concepts.assign(dataset=ds.name, backbone=backbone.name, index=np.arange(len(concepts)),
                                   cos_A_C=cos)
    tag = f"{slug(ds.name)}__{slug(short_name(backbone))}"
    ctx.save_artifact(f"A__{tag}", {"A": A.astype(np.float32), "C": C.astype(np.float32), "T": T.astype(np.float32)},
                      metadata={"dataset": ds.name, "backbone": backbone.name, "lam": str(tc.lam),
                                "best_epoch": str(result.best_epoch)})
    ctx.save_plot(f"loss__{tag}", plots.loss_curves(h, f"{ds.name} / {short_name(backbone)} (λ = {tc.lam:g})",
                                                    result.best_epoch))
    n_show = min(ev.explain_images, n_table)
    if n_show:
        shown = table[table["image"] < n_show]
        ctx.save_plot(f"explanations__{tag}", plots.explanation_bars(
            shown, display_images(ds, n_show, ctx.seed), names, f"{ds.name} / {short_name(backbone)}: top concepts"))
    n_regions = min(ev.region_images, n_table)
    row["region_images"] = 0
    if n_regions:
        try:
            figure = region_plot(backbone, ds, table, A, n_regions, min(ev.region_concepts, ev.top_k), names,
                                 ctx.seed)
        except regions.UnsupportedTower as err:  # a timm tower without a MAP head: said in the log and the table
            logging.getLogger(__name__).warning("ezpc: no region heatmaps for %s: %s", backbone.name, err)
        else:
            ctx.save_plot(f"regions__{tag}", figure)
            row["region_images"] = n_regions
    return {"row": row, "faith": faith, "explanations": table, "losses": losses, "concepts": concepts_out,
            "test": (V_test, y_test, T), "A": A}


def region_plot(backbone: EncoderSpec, ds: DatasetConfig, table: pd.DataFrame, A: np.ndarray, n: int, m: int,
                names: list[str], seed: int) -> Any:
    """Concept-region heatmaps of the first ``n`` test images for their ``m`` top concepts (`jobs.ezpc.regions`)."""
    from explab.models import load_encoder

    images = display_images(ds, n, seed)
    if len(images) < n:
        raise ConfigError(f"dataset {ds.name!r}: its images cannot be shown ({ds.spec}): set eval.region_images: 0")
    spec = backbone.model_copy(update={"model": backbone.model.model_copy(update={"dtype": "float32"})})
    top = table[(table["image"] < n) & (table["rank"] < m)].sort_values(["image", "rank"])
    index = top["concept_index"].to_numpy().reshape(n, -1)
    shown, maps = regions.heatmaps(load_encoder(spec), [images[i] for i in range(n)], A, index)
    labels = top.groupby("image", sort=True)
    captions = [f"predicted {part['predicted_name'].iloc[0]!r}" for _, part in labels]
    return plots.region_heatmaps(shown, maps, top["concept"].to_numpy().reshape(n, -1).tolist(), captions,
                                 f"{ds.name} / {short_name(backbone)}: where the top concepts are")


# ---- the job -----------------------------------------------------------------------------------
def filtered(full: pd.DataFrame, C_full: np.ndarray, T: np.ndarray, V_train: np.ndarray, config: Config
             ) -> pd.Series:
    """Label-free CBM's filter of a dataset's vocabulary under one backbone: why each concept is dropped ("" kept)."""
    cc = config.concepts
    return pd.Series(vocab.filter_vocabulary(
        full["concept"].tolist(), C_full, T, max_chars=cc.max_length, max_class_similarity=cc.max_class_similarity,
        max_concept_similarity=cc.max_concept_similarity, V=V_train, min_activation=cc.min_activation,
        activation_top=cc.activation_top), index=full.index)


def transfer_gzsl(source: dict[str, Any], target: dict[str, Any], config: Config, seed: int) -> dict[str, Any]:
    """The authors' cross-dataset protocol for one (source, target) pair.

    ``source`` / ``target``: ``name``, ``concepts`` (kept phrases), ``C`` (their embeddings), ``T``
    (class embeddings), ``data`` (V_train, y_train, V_test, y_test). A fresh A is trained from the
    union of both vocabularies on *all* the source's training images against the source + target
    class names, and evaluated by `metrics.gzsl` (source classes seen, target classes unseen).
    """
    union: dict[str, np.ndarray] = {}
    for side in (source, target):
        for phrase, emb in zip(side["concepts"], side["C"], strict=True):
            union.setdefault(phrase.lower(), emb)
    keys = sorted(union)
    C = np.stack([union[k] for k in keys])
    T_all = np.concatenate([source["T"], target["T"]])
    V_train = source["data"][0]
    A = train(C, V_train, T_all, config.train, seed).A
    Vs, ys = source["data"][2], source["data"][3]
    Vt, yt = target["data"][2], target["data"][3]
    return {"source": source["name"], "target": target["name"], "n_concepts": len(keys),
            "n_seen_classes": len(source["T"]), "n_unseen_classes": len(target["T"]),
            **metrics.gzsl(A, source["T"], Vs, ys, target["T"], Vt, yt)}


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    cache = cache_root(config, ctx)
    names = {ds.name: class_names(ds) for ds in config.datasets}
    vocabularies = {ds.name: vocabulary(ds, names[ds.name], config, ctx, cache) for ds in config.datasets}

    parts: dict[str, list[Any]] = {k: [] for k in ("row", "faith", "explanations", "losses", "concepts", "transfer",
                                                   "gzsl", "vocabulary")}
    pair = 0
    base = config
    for backbone in base.backbones:
        config = with_backbone_logits(base, backbone)
        projections, tests, sides = {}, {}, {}
        # every text of this backbone in one pipeline call: concepts (full vocabularies) and class prompts
        texts: list[str] = []
        for ds in config.datasets:
            texts += [config.concepts.template.format(c) for c in vocabularies[ds.name]["concept"]]
            texts += [t.format(n) for n in names[ds.name] for t in config.class_templates]
        unique = list(dict.fromkeys(texts))
        where = {t: i for i, t in enumerate(unique)}
        E = unit_rows(embed(backbone, unique, modality="text", options=config.text_embed, cache_dir=cache).array())
        for ds in config.datasets:
            full = vocabularies[ds.name]
            C_full = E[[where[config.concepts.template.format(c)] for c in full["concept"]]]
            T = np.stack([unit_rows(E[[where[t.format(n)] for t in config.class_templates]].mean(axis=0))
                          for n in names[ds.name]])
            data = split_embeddings(backbone, ds, names[ds.name], config, ctx, cache)
            dropped = filtered(full, C_full, T, data[0], config)
            parts["vocabulary"].append(full.assign(dataset=ds.name, backbone=backbone.name, dropped=dropped))
            keep = (dropped == "").to_numpy()
            kept = full[keep].reset_index(drop=True)
            chosen = vocab.subset(kept["concept"].tolist(), config.concepts.size, config.concepts.subset_seed)
            if not chosen:
                raise ConfigError(f"dataset {ds.name!r}: no concepts left after the concept filter "
                                  f"({dropped.value_counts().to_dict()}): loosen concepts.max_* / min_activation")
            index = kept.reset_index().set_index("concept").loc[chosen, "index"].to_numpy()
            C = C_full[keep][index]
            out = evaluate_pair(ds=ds, backbone=backbone, names=names[ds.name],
                                concepts=kept.iloc[index].reset_index(drop=True),
                                C=C, T=T, data=data, config=config, ctx=ctx, pair=pair,
                                step0=pair * config.train.epochs)
            projections[ds.name], tests[ds.name] = out.pop("A"), out.pop("test")
            sides[ds.name] = {"name": ds.name, "concepts": list(chosen), "C": C, "T": T, "data": data}
            for key, value in out.items():
                parts[key].append(value)
            pair += 1
        if config.eval.transfer and len(config.datasets) > 1:
            rows = metrics.transfer(projections, tests, scale=config.train.logit_scale)
            parts["transfer"].append(pd.DataFrame(rows).assign(backbone=backbone.name,
                                                               backbone_short=short_name(backbone)))
            for source, target in transfer_pairs(config):
                row = transfer_gzsl(sides[source], sides[target], config, ctx.seed)
                parts["gzsl"].append({**row, "backbone": backbone.name, "backbone_short": short_name(backbone)})

    results = pd.DataFrame(parts["row"])
    faith = pd.concat(parts["faith"], ignore_index=True)
    ctx.save_table("results", results)
    ctx.save_table("faithfulness", faith)
    ctx.save_table("explanations", pd.concat(parts["explanations"], ignore_index=True))
    ctx.save_table("losses", pd.concat(parts["losses"], ignore_index=True))
    ctx.save_table("concepts", pd.concat(parts["concepts"], ignore_index=True))
    ctx.save_table("vocabulary", pd.concat(parts["vocabulary"], ignore_index=True))
    ctx.save_plot("accuracy_retained", plots.accuracy_retained(results))
    ctx.save_plot("faithfulness", plots.faithfulness(faith))
    out = summary(results)
    if parts["transfer"]:
        transfer = pd.concat(parts["transfer"], ignore_index=True)
        ctx.save_table("transfer", transfer)
        ctx.save_plot("transfer", plots.transfer(transfer))
        cross = transfer[~transfer["in_domain"]]
        out.update(transfer_retained=float(cross["retained"].mean()),
                   transfer_agreement=float(cross["agreement"].mean()))
    if parts["gzsl"]:
        gzsl = pd.DataFrame(parts["gzsl"])
        ctx.save_table("transfer_gzsl", gzsl)
        out.update(transfer_hm_clip=float(gzsl["hm_clip"].mean()), transfer_hm_ezpc=float(gzsl["hm_ezpc"].mean()))
    return out


def transfer_pairs(config: Config) -> list[tuple[str, str]]:
    """(source, target) pairs of the authors' transfer protocol: ``eval.transfer_pairs``, else every ordered pair."""
    names = [ds.name for ds in config.datasets]
    if config.eval.transfer_pairs is not None:
        return [tuple(p) for p in config.eval.transfer_pairs]
    return [(a, b) for a in names for b in names if a != b]


def uses_generator(config: Config) -> bool:
    """Whether some dataset's vocabulary comes from the LLM (only then is the Generator server started)."""
    return any((ds.concept_source or config.concepts.source) == "llm" for ds in config.datasets)


def dry_plan_skip(config: Config) -> list[str]:
    """For `explab run --dry-run`: the config fields this run will not start (the vocabulary generator and its
    server when every vocabulary is read from files)."""
    return [] if uses_generator(config) else ["concepts.generator", "concepts.server"]


SUMMARY_KEYS = ("acc_clip", "acc_ezpc", "retained", "agreement", "acc_ezpc_init", "retained_init", "agreement_init",
                "spearman", "kendall", "kl", "hm_clip", "hm_ezpc", "cos_A_C", "faith_topk_flip", "faith_random_flip",
                "faith_topk_drop", "faith_random_drop", "n_concepts")


def summary(results: pd.DataFrame) -> dict[str, float]:
    """Final metrics: means over the (dataset, backbone) pairs, and each pair's own under ``<dataset>/<backbone>/``."""
    keys = [k for k in SUMMARY_KEYS if k in results.columns]
    out = {k: float(results[k].mean()) for k in keys}
    out["faithfulness_gap"] = out["faith_topk_flip"] - out["faith_random_flip"]
    if len(results) > 1:
        for _, r in results.iterrows():
            for k in ("acc_clip", "acc_ezpc", "retained", "agreement", "cos_A_C", "faith_topk_flip",
                      "faith_random_flip"):
                out[f"{r['dataset']}/{r['backbone_short']}/{k}"] = float(r[k])
    return out


JOB = Job(
    name="ezpc",
    description="EZPC: explain CLIP zero-shot predictions through a learned concept projection (A ≈ Cᵀ, KL to CLIP).",
    config=Config,
    run=run,
    synthetic={"ezpc_shapes": shapes.shapes_rows},
)
