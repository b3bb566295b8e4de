"""unbox: dissecting a black-box image classifier from its output probabilities alone (UNBOX).

For every class to dissect:

1. the black box (`jobs.unbox.blackbox`) is the classifier behind ``predict_proba`` only; every
   classified image is a counted query;
2. semantic search (`jobs.unbox.search`): a proposer (the shared `Generator` LLM, `jobs.unbox.proposers`)
   gives K descriptors per round, the renderer (the shared `Diffuser`, `jobs.unbox.renderers`) draws N
   images of each from N fixed slot seeds, the black box scores them, the top-M scored descriptors go
   back to the LLM as memory; T rounds or until the best stops improving; descriptors deduplicated by
   text-embedding cosine (`jobs.unbox.dedup`). Classes are searched concurrently (threads whose
   requests the shared servers batch together);
3. outputs: ranked descriptors, and the concepts that recur in the top ones (`jobs.unbox.concepts`);
4. audits (`jobs.unbox.audits`): slice discovery by contrasting attribute values, validated as
   accuracy gaps on a labelled grouped set; fidelity of held-out renders of the top descriptors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from explab.config import JobConfig, Section
from explab.errors import ConfigError
from explab.job import Job
from explab.runs import RunContext
from explab.seeds import derive_seed
from jobs.unbox import plots
from jobs.unbox.audits import FidelityConfig, SlicesConfig, discovered, fidelity, slice_scores, validate_slices
from jobs.unbox.blackbox import ClassifierConfig, build_blackbox
from jobs.unbox.concepts import ConceptsConfig, recurring
from jobs.unbox.dedup import DedupConfig, Deduper, TextEmbedder
from jobs.unbox.groups import group_rows
from jobs.unbox.proposers import ProposerConfig, build_proposer
from jobs.unbox.renderers import RendererConfig, build_renderer
from jobs.unbox.search import ClassSearch, SearchConfig, search_class


class PlotsConfig(Section):
    grid_descriptors: int = Field(3, ge=1)  # top descriptors per class in the render grid


class Config(JobConfig):
    classes: list[str] = Field(default_factory=lambda: ["goldfish", "tree frog", "school bus", "espresso"])
    classifier: ClassifierConfig = ClassifierConfig()
    proposer: ProposerConfig = ProposerConfig()
    renderer: RendererConfig = RendererConfig()
    search: SearchConfig = SearchConfig()
    dedup: DedupConfig = DedupConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    slices: SlicesConfig = SlicesConfig()
    fidelity: FidelityConfig = FidelityConfig()
    plots: PlotsConfig = PlotsConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError("classes: list the class names to dissect, each once")
        if self.classifier.classes is not None:
            missing = [c for c in self.classes if c not in self.classifier.classes]
            if missing:
                raise ConfigError(f"classes {missing} are not in classifier.classes: use the classifier's names")
        if "{cls}" not in self.proposer.template:
            raise ConfigError("proposer.template must contain {cls} (where the class name goes)")
        return self


def slot_seeds(seed: int, n: int, what: str) -> list[int]:
    """``n`` image-slot seeds of the run (``what``: search or holdout; the two sets are disjoint)."""
    return [derive_seed(seed, "unbox", what, i) % 2**31 for i in range(n)]


def descriptor_table(searches: list[ClassSearch]) -> pd.DataFrame:
    frames = []
    for s in searches:
        ranked = pd.DataFrame(s.ranked(), columns=["round", "descriptor", "score", "p_class", "p_other", "top1"])
        frames.append(ranked.assign(rank=np.arange(1, len(ranked) + 1)).assign(**{"class": s.cls}))
    cols = ["class", "round", "descriptor", "score", "rank", "p_class", "p_other", "top1"]
    return pd.concat(frames, ignore_index=True)[cols]


def run(config: Config, ctx: RunContext) -> dict[str, Any]:
    box = build_blackbox(config.classifier)
    targets = {c: box.class_index(c) for c in config.classes}
    proposer = build_proposer(config.proposer, ctx, ctx.seed)
    renderer = build_renderer(config.renderer, ctx)
    embedder = TextEmbedder(config.dedup.encoder) if config.dedup.encoder is not None else None
    sc = config.search
    seeds, holdout = slot_seeds(ctx.seed, sc.images, "search"), slot_seeds(ctx.seed, config.fidelity.images, "holdout")

    def one(cls: str) -> ClassSearch:
        return search_class(cls, targets[cls], proposer=proposer, renderer=renderer, box=box,
                            deduper=Deduper(embedder, config.dedup.threshold), cfg=sc, seeds=seeds)

    with ThreadPoolExecutor(max_workers=min(sc.parallel_classes, len(config.classes))) as pool:
        searches = list(pool.map(one, config.classes))
    rounds = pd.DataFrame([{"class": s.cls, **r, "stopped": s.stopped} for s in searches for r in s.rounds])
    for _, r in rounds.iterrows():
        if np.isfinite(r["best_so_far"]):
            ctx.log(step=int(r["round"]), **{f"{r['class']}/best_so_far": float(r["best_so_far"])})
    table = descriptor_table(searches)
    if table.empty:
        raise ConfigError("the proposer gave no usable descriptors: check proposer.prompts, max_tokens and model")
    ctx.save_table("descriptors", table)
    ctx.save_table("rounds", rounds)
    search_queries = box.query_counts().get("search", 0)

    ranked = {c: table[table["class"] == c] for c in config.classes}
    found_any = [c for c in config.classes if len(ranked[c])]  # a class whose proposer gave nothing has no audits
    concepts = pd.concat([recurring(ranked[c], c, config.proposer.template, config.concepts)
                          for c in config.classes], ignore_index=True)
    ctx.save_table("concepts", concepts)

    out: dict[str, Any] = {"queries_search": search_queries,
                           "best_score": float(table.groupby("class")["score"].max().mean()),
                           "n_descriptors": len(table)}
    if config.slices.enabled:
        slices = pd.concat([
            slice_scores(c, targets[c], ranked[c]["descriptor"].head(config.slices.bases).tolist(), config.slices.axes,
                         seeds, renderer=renderer, box=box, specificity=sc.specificity)
            for c in found_any], ignore_index=True)
        if config.slices.validation is not None:
            slices = validate_slices(slices, config.slices.validation, box, found_any, ctx.seed)
        ctx.save_table("slices", slices)
        ctx.save_plot("slice_gaps", plots.slice_gaps(slices))
        found = discovered(slices)
        out["slice_gap"] = float(found["attribute_gap"].mean())
        if "acc_gap" in slices:
            fav = slices[slices["favoured"] & (slices["attribute_rank"] == 1)]
            if fav["acc_gap"].notna().any():
                out["slice_acc_gap"] = float(fav["acc_gap"].mean())
    if config.fidelity.enabled:
        top = {c: ranked[c]["descriptor"].head(config.fidelity.top).tolist() for c in found_any}
        fid, renders = fidelity(top, targets, config.proposer.template, holdout, renderer=renderer, box=box)
        ctx.save_table("fidelity", fid)
        out["fidelity_top1"] = float(fid.loc[~fid["baseline"], "top1_rate"].mean())
        out["fidelity_top1_baseline"] = float(fid.loc[fid["baseline"], "top1_rate"].mean())
        out["fidelity_mean_p"] = float(fid.loc[~fid["baseline"], "mean_p"].mean())
        k = config.plots.grid_descriptors
        grid = {c: [(d, float(ranked[c]["score"].iloc[i]), renders[c][i]) for i, d in enumerate(top[c][:k])]
                for c in found_any}
        ctx.save_plot("top_descriptors", plots.descriptor_grid(grid))
    ctx.save_plot("best_per_round", plots.best_per_round(rounds))
    counts = box.query_counts()
    ctx.save_json("queries", {"total": box.queries, **counts,
                              "search_per_class": {s.cls: len(s.rows) * sc.images for s in searches}})
    out["queries"] = box.queries
    return out


JOB = Job(
    name="unbox",
    description="UNBOX: dissect a black-box classifier per class with an LLM, text-to-image renders and its "
                "output probabilities alone (ranked descriptors, concepts, slices, fidelity).",
    config=Config,
    run=run,
    synthetic={"unbox_groups": group_rows},
)
