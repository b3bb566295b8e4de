"""sotalign: semi-supervised alignment of frozen unimodal image and text encoders with optimal transport.

For each number of pairs N (and each amount of unpaired data):
1. teacher — a linear map fitted on the N pairs only (CCA / ridge / Procrustes, `teacher.py`);
2. pairs — alignment layers f, g trained with the paired contrastive loss only (λ = 0);
3. full — f, g trained with the contrastive loss + λ·KL-OT on unpaired image and text batches
   against the teacher's plan (`align.py`, `ot.py`).
Each is evaluated by image↔text retrieval on held-out pairs (R@1/5/10) and zero-shot
classification through class-name prompts (`evaluate.py`), into one table.

Features come from the synthetic shared-latent generator (``source: synthetic``) or from frozen
encoders through the cached Ray Data embedding pipeline (``source: embeddings``,
`explab.embeddings`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from explab.config import JobConfig, Section
from explab.embeddings import EmbedOptions
from explab.errors import ConfigError
from explab.job import Job
from explab.models import EncoderSpec
from explab.runs import RunContext
from explab.threads import torch_threads
from jobs.sotalign import plots
from jobs.sotalign.align import AlignConfig, train_alignment
from jobs.sotalign.data import AlignData, SyntheticConfig, describe, make_synthetic, shapes_rows
from jobs.sotalign.evaluate import retrieval, zero_shot
from jobs.sotalign.teacher import TeacherKind, fit_teacher

Method = Literal["teacher", "pairs", "pseudo", "full"]  # pseudo: the pseudo-labelling semi-supervised baseline


class TeacherConfig(Section):
    kind: TeacherKind = "cca"
    dim: int = Field(256, ge=1)  # shared-space dimensions (capped by the features and N - 1)
    reg: float = Field(0.1, ge=0)  # ridge strength relative to the mean feature variance


class PairSource(Section):
    """A dataset with an image column and a text column (row i of each belongs together)."""

    data: str  # dataset spec: hf:<name>[:<config>], parquet:<path>, imagefolder:<dir>, synthetic:<name>
    split: str = "train"
    image_column: str = "image"
    text_column: str = "caption"  # a list of captions per row: the first is used
    # rows sharing this column show one image (COCO: one row per caption): `limit` then counts images
    # drawn by a seeded shuffle, and test retrieval counts every caption of the image as correct
    image_id_column: str | None = None
    limit: int | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra load_dataset arguments


class Source(Section):
    """One column of a dataset (unpaired images or unpaired texts)."""

    data: str
    split: str = "train"
    column: str
    limit: int | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ZeroShot(Section):
    data: str
    split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    limit: int | None = None
    class_names: list[str] | None = None  # default: the dataset's ClassLabel names (Hugging Face)
    templates: list[str] = Field(["a photo of a {}."], min_length=1)
    first_synonym: bool = True  # "tench, Tinca tinca" → "tench"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Config(JobConfig):
    source: Literal["synthetic", "embeddings"] = "embeddings"
    synthetic: SyntheticConfig = SyntheticConfig()
    image_encoder: EncoderSpec = EncoderSpec(name="hf:facebook/dinov2-large")
    text_encoder: EncoderSpec = EncoderSpec(name="st:sentence-transformers/all-mpnet-base-v2")
    embedding: EmbedOptions = EmbedOptions()
    pairs: PairSource | None = None  # the pool the N pairs are drawn from (seeded shuffle, nested)
    test_pairs: PairSource | None = None  # retrieval evaluation
    unpaired_images: Source | None = None
    unpaired_texts: Source | None = None
    zeroshot: ZeroShot | None = None
    n_pairs: list[Annotated[int, Field(ge=1)]] = Field([100, 1000, 10000], min_length=1)
    n_unpaired: list[int | None] = [None]  # unpaired images and texts used by `full` (None: all)
    methods: list[Method] = Field(["teacher", "pairs", "full"], min_length=1)
    teacher: TeacherConfig = TeacherConfig()
    align: AlignConfig = AlignConfig()
    save_models: bool = True  # f, g of the last `full` model and the teacher as safetensors
    torch_threads: int | None = None  # intra-op threads while training (1 avoids oversubscribed CPUs)

    @field_validator("n_pairs", "n_unpaired", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if value is None or isinstance(value, (int, float, str)) else value

    @field_validator("n_pairs")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(n < 2 for n in value):
            raise ValueError("every number of pairs must be at least 2")
        return value


# ---------------------------------------------------------------- data


def load_data(config: Config, ctx: RunContext) -> AlignData:
    if config.source == "synthetic":
        return make_synthetic(config.synthetic, seed=config.seed)
    from jobs.sotalign.data import embed_grouped, embed_pairs, embed_source, embed_zeroshot

    missing = [k for k in ("pairs", "test_pairs", "unpaired_images", "unpaired_texts") if getattr(config, k) is None]
    if missing:
        raise ConfigError(f"source=embeddings needs {', '.join(missing)}: add them to the config "
                          "(see jobs/sotalign/configs/paper.yaml), or set source: synthetic")
    opts = dict(options=config.embedding, seed=config.seed)
    if config.pairs.image_id_column:
        pairs_x, pairs_y, _, _ = embed_grouped(config.image_encoder, config.text_encoder, config.pairs, **opts)
    else:
        pairs_x, pairs_y = embed_pairs(config.image_encoder, config.text_encoder, config.pairs, **opts)
    order = np.random.default_rng(config.seed).permutation(len(pairs_x))  # N pairs = a seeded, nested prefix
    test_groups = None
    if config.test_pairs.image_id_column:
        _, test_y, test_groups, test_x = embed_grouped(config.image_encoder, config.text_encoder, config.test_pairs,
                                                       **opts)
    else:
        test_x, test_y = embed_pairs(config.image_encoder, config.text_encoder, config.test_pairs, **opts)
    data = AlignData(
        pairs_x=pairs_x[order], pairs_y=pairs_y[order],
        unpaired_x=embed_source(config.image_encoder, config.unpaired_images, "image", **opts),
        unpaired_y=embed_source(config.text_encoder, config.unpaired_texts, "text", **opts),
        test_x=test_x, test_y=test_y, test_groups=test_groups,
    )
    if config.zeroshot is not None:
        data.zs_x, data.zs_labels, data.class_y, data.class_names = embed_zeroshot(
            config.image_encoder, config.text_encoder, config.zeroshot, **opts)
    return data


# ---------------------------------------------------------------- the run


def _metrics(img: np.ndarray, txt: np.ndarray, data: AlignData, zs_img: np.ndarray | None,
             class_txt: np.ndarray | None) -> dict[str, float]:
    out = retrieval(img, txt, groups=data.test_groups)
    if zs_img is not None and class_txt is not None and data.zs_labels is not None:
        out["zeroshot"] = zero_shot(zs_img, class_txt, data.zs_labels)
    return out


class _EpochLog:
    """After every epoch: test R@1 and the losses to ``ctx.log`` (so ASHA can stop a trial) and the curves."""

    def __init__(self, ctx: RunContext, data: AlignData, curves: list[dict[str, Any]], step: int, **tags: Any):
        self.ctx, self.data, self.curves, self.step, self.tags = ctx, data, curves, step, tags

    def __call__(self, epoch: int, model: Any, losses: dict[str, float]) -> None:
        img, txt = model.embed(self.data.test_x, self.data.test_y)
        r = retrieval(img, txt, groups=self.data.test_groups)
        self.ctx.log(step=self.step, **self.tags, epoch=epoch, r1=r["r1"], i2t_r1=r["i2t_r1"], t2i_r1=r["t2i_r1"],
                     **losses)
        self.curves.append({**self.tags, "epoch": epoch, "r1": r["r1"], **losses})
        self.step += 1


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    with torch_threads(config.torch_threads):
        return _run(config, ctx)


def _run(config: Config, ctx: RunContext) -> dict[str, float]:
    if config.n_unpaired != [None] and "full" not in config.methods:
        raise ConfigError("n_unpaired only matters for the full method: add 'full' to methods")
    data = load_data(config, ctx)
    ctx.save_json("data", describe(data))
    if max(config.n_pairs) > len(data.pairs_x):
        raise ConfigError(f"n_pairs asks for {max(config.n_pairs)} pairs but the pool holds {len(data.pairs_x)}: "
                          "lower n_pairs or enlarge the pairs source")
    has_zs = data.zs_x is not None and data.class_y is not None
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    step = 0
    last_full = None
    for n in sorted(config.n_pairs):
        X, Y = data.pairs_x[:n], data.pairs_y[:n]
        started = time.time()
        teacher = fit_teacher(X, Y, config.teacher.kind, config.teacher.dim, config.teacher.reg)
        if "teacher" in config.methods:
            m = _metrics(teacher.image(data.test_x), teacher.text(data.test_y), data,
                         teacher.image(data.zs_x) if has_zs else None, teacher.text(data.class_y) if has_zs else None)
            rows.append({"n_pairs": n, "method": "teacher", "n_unpaired": 0, **m,
                         "seconds": round(time.time() - started, 3)})
        runs: list[tuple[str, int | None]] = []
        if "pairs" in config.methods:
            runs.append(("pairs", 0))
        if "pseudo" in config.methods:
            runs.append(("pseudo", None))
        if "full" in config.methods:
            runs.extend(("full", u) for u in config.n_unpaired)
        for method, n_unpaired in runs:
            cfg = {"full": config.align, "pairs": config.align.model_copy(update={"lam": 0.0}),
                   "pseudo": config.align.model_copy(update={"unpaired_loss": "pseudo"})}[method]
            ux = data.unpaired_x[:0] if method == "pairs" else data.unpaired_x
            uy = data.unpaired_y[:0] if method == "pairs" else data.unpaired_y
            if n_unpaired is not None:
                ux, uy = ux[:n_unpaired], uy[:n_unpaired]
            n_u = min(len(ux), len(uy))
            on_epoch = _EpochLog(ctx, data, curves, step, n_pairs=n, n_unpaired=n_u, method=method)
            started = time.time()
            model = train_alignment(X, Y, ux, uy, cfg, teacher, seed=config.seed, on_epoch=on_epoch)
            step = on_epoch.step
            img, txt = model.embed(data.test_x, data.test_y)
            zs = model.embed(data.zs_x, data.class_y) if has_zs else (None, None)
            m = _metrics(img, txt, data, *zs)
            rows.append({"n_pairs": n, "method": method, "n_unpaired": n_u, **m,
                         "seconds": round(time.time() - started, 3)})
            if method == "full":
                last_full = (n, model, teacher)
    table = pd.DataFrame(rows)
    ctx.save_table("results", table)
    ctx.save_table("curves", pd.DataFrame(curves))
    ctx.save_plot("r1_vs_pairs", plots.r1_vs_pairs(table))
    if curves:
        ctx.save_plot("training", plots.training_curves(pd.DataFrame(curves)))
    if config.save_models and last_full is not None:
        n, model, teacher = last_full
        tensors = {f"align.{k}": v for k, v in model.state_dict().items()}
        tensors |= {"teacher.W_x": teacher.W_x, "teacher.W_y": teacher.W_y, "teacher.mean_x": teacher.mean_x,
                    "teacher.mean_y": teacher.mean_y}
        ctx.save_artifact("full_model", tensors, {"n_pairs": str(n), "teacher": teacher.kind})
    return summarize(table)


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Final metrics: per method at the largest N (and the most unpaired data), and ``r1`` = full's."""
    out: dict[str, float] = {}
    top = table[table["n_pairs"] == table["n_pairs"].max()]
    for method, group in top.groupby("method"):
        best = group.sort_values("n_unpaired").iloc[-1]
        out[f"{method}_r1"] = float(best["r1"])
        if "zeroshot" in best and pd.notna(best["zeroshot"]):
            out[f"{method}_zeroshot"] = float(best["zeroshot"])
    main = "full" if "full_r1" in out else ("pairs" if "pairs_r1" in out else "teacher")
    out["r1"] = out[f"{main}_r1"]
    if f"{main}_zeroshot" in out:
        out["zeroshot"] = out[f"{main}_zeroshot"]
    return out


JOB = Job(
    name="sotalign",
    description="SOTAlign: align frozen image and text encoders from few pairs + unpaired data "
                "(linear teacher + KL-OT).",
    config=Config,
    run=run,
    synthetic={"sotalign_shapes": shapes_rows},
)
