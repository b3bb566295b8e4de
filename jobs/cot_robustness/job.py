"""cot_robustness: perturb a reasoning model's own chain of thought at fixed timesteps, let it go on.

1. Reference traces: each evaluated model answers each question (Math, Science, Logic); the judge
   grades them and, as in the paper, only correctly answered questions are kept.
2. Cut: the reasoning inside <think>…</think> is split into steps at blank lines; for each τ the
   prefix runs through the step whose normalized timestep is nearest τ (at least ``min_steps``).
3. Seven interventions on that prefix (interventions.py), five of them written by the intervention LLM.
4. Continue: the model continues the perturbed trace n times (assistant-prefix continuation); the
   forced-doubt ablation continues again with a marker such as "Wait" appended.
5. Judge: the reference answer present or not (robustness at least once / majority / all of n),
   length overhead vs the original remainder, doubt per unit before and after the cut.
6. Aggregate by model × domain × intervention × τ × marker; tables and plots.

Three shared Generator servers: the evaluated model(s), the intervention LLM, the judge (one
server when the last two are the same spec). Every stage streams through Ray Data.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from explab.data import collect
from explab.errors import ExplabError
from explab.job import Job
from explab.runs import RunContext
from explab.seeds import derive_seed
from jobs.cot_robustness import data, metrics, plots, stages
from jobs.cot_robustness.config import Config, EvaluatedModel
from jobs.cot_robustness.perturbations import INTERVENTIONS, LLM_INTERVENTIONS, choose_paragraph
from jobs.cot_robustness.prompts import load_prompts
from jobs.cot_robustness.traces import cut_at, extract_reasoning, final_answer, split_steps

__all__ = ["Config", "JOB", "run"]


def collect_all(*datasets: Any) -> list[pd.DataFrame]:
    """Run several pipelines at once (they share the cluster and the servers)."""
    with ThreadPoolExecutor(len(datasets)) as pool:
        futures = [pool.submit(collect, ds) for ds in datasets]
        return [f.result() for f in futures]


def check_gated(config: Config) -> None:
    """A gated hub dataset (GPQA) needs accepted terms and a token: say so before anything starts."""
    gated = [e.spec for e in config.datasets if e.gated and e.spec.startswith("hf:")]
    if not gated:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise ExplabError(f"dataset {gated[0]} is gated and no Hugging Face token is set: accept its terms on "
                          "the hub, then set HF_TOKEN (or run `hf auth login`), or drop it from datasets")


def helper_specs(config: Config, with_llm: bool) -> dict[str, tuple[Any, Any]]:
    """The judge and (with LLM interventions) the intervention LLM: one entry when they share a spec."""
    specs = {config.judge.model.key: (config.judge.model, config.judge.server)}
    if with_llm:
        specs.setdefault(config.intervention_model.key, (config.intervention_model, config.intervention_server))
    return specs


def plan_waves(config: Config, with_llm: bool, gpus: float | None) -> list[list[EvaluatedModel]]:
    """The evaluated models in waves whose servers fit beside the judge and intervention LLM.

    ``gpus``: the GPUs the job may fill (None or 0: no limit known, one wave). Waves keep the
    config's order and fill greedily; a model that does not fit even alone is one clear error.
    """
    if not gpus:
        return [list(config.models)]
    fixed = sum(options.num_gpus for _, options in helper_specs(config, with_llm).values())
    room = gpus - fixed
    waves: list[list[EvaluatedModel]] = []
    used = math.inf
    for entry in config.models:
        need = entry.server.num_gpus
        if need > room:
            raise ExplabError(f"model {entry.name} needs {need:g} GPUs beside the judge/intervention LLM's {fixed:g}, "
                              f"but the job has {gpus:g}: lower its server.num_gpus or raise gpus")
        if used + need > room:
            waves.append([])
            used = 0.0
        waves[-1].append(entry)
        used += need
    return waves


def dry_plan_notes(config: Config, plan: Any) -> list[str]:
    """For `explab run --dry-run`: the waves the models run in on the cluster's largest node."""
    biggest = max((n.gpus for n in plan.nodes), default=0.0)
    if not biggest:
        return []
    needed = tuple(n for n in config.interventions if n in LLM_INTERVENTIONS)
    waves = plan_waves(config, bool(needed), config.gpus if config.gpus is not None else biggest)
    helpers = sum(o.num_gpus for _, o in helper_specs(config, bool(needed)).values())
    peak = max(sum(m.server.num_gpus for m in w) for w in waves) + helpers
    return [f"cot_robustness runs its models in {len(waves)} wave(s) on a {biggest:g}-GPU node: "
            f"peak {peak:g} GPUs ({', '.join('+'.join(m.name for m in w) for w in waves)})"]


def start_servers(specs: list[tuple[Any, Any]]) -> None:
    """Start (or find) the given Generator servers at once: the models load in parallel."""
    from explab.servers import get_server

    with ThreadPoolExecutor(max(1, len(specs))) as pool:
        for future in [pool.submit(get_server, "generator", spec, options) for spec, options in specs]:
            future.result()


def stop_servers(handles: list[Any]) -> None:
    """Stop the servers of a finished wave, so the next wave's models get their GPUs."""
    from explab.servers import stop_server

    for handle in handles:
        stop_server(handle.name)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def _map(ds: Any, fn: Any, batch_size: int, **kwargs: Any) -> Any:
    return ds.map_batches(fn, batch_size=batch_size, batch_format="pandas", fn_kwargs=kwargs)


def model_info(entry: EvaluatedModel) -> dict[str, Any]:
    return {"label": entry.name, "name": entry.model.name,
            "size_b": float("nan") if entry.size_b is None else entry.size_b,
            "system_prompt": entry.system_prompt, "instruction": entry.instruction, "think_prefix": entry.think_prefix,
            "temperature": entry.temperature, "top_p": entry.top_p, "top_k": entry.top_k,
            "max_tokens": entry.max_tokens, "opening": entry.opening}


def items_dataset(ctx: RunContext, config: Config) -> Any:
    """Every dataset's rows as task items, in one Ray Dataset."""
    parts = []
    for entry in config.datasets:
        ds = ctx.dataset(data.resolve_spec(entry.spec), split=entry.split, limit=entry.limit, **entry.kwargs)
        parts.append(ds.map(data.normalize_item, fn_kwargs={"entry": entry.model_dump(), "seed": ctx.seed}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def check_items(frame: pd.DataFrame, config: Config) -> list[dict[str, Any]]:
    for entry in config.datasets:
        if not len(frame) or not (frame["domain"] == entry.domain).any():
            raise ExplabError(f"dataset {entry.spec} gave no items: check its split and limit")
    dup = frame["item_id"][frame["item_id"].duplicated()]
    if len(dup):
        raise ExplabError(f"item id {dup.iloc[0]!r} occurs twice: give the dataset an id_field with unique values")
    return frame.sort_values("item_id").to_dict("records")


def pool_dataset(ctx: RunContext, config: Config) -> Any:
    p = config.paragraphs
    ds = ctx.dataset(data.resolve_spec(p.spec), split=p.split, limit=p.documents, streaming=p.streaming)
    return ds.flat_map(data.paragraph_rows, fn_kwargs={"field": p.field, "min_chars": p.min_chars, "spec": p.spec})


def make_pool(frame: pd.DataFrame, config: Config, seed: int) -> list[str]:
    """The pool's paragraphs, deduplicated, in an order shuffled with the run's seed."""
    pool = sorted(set(frame["paragraph"])) if len(frame) else []
    if not pool:
        raise ExplabError(f"paragraph pool {config.paragraphs.spec} has no paragraph of {config.paragraphs.min_chars}+ "
                          "characters: check paragraphs.spec/field or lower paragraphs.min_chars")
    order = np.random.default_rng(derive_seed(seed, "paragraph-pool")).permutation(len(pool))
    return [pool[i] for i in order]


def references_dataset(config: Config, items: list[dict[str, Any]], generators: dict[str, Any], judge: Any,
                       prompts: Any, seed: int, models: list[EvaluatedModel] | None = None) -> Any:
    import ray.data

    models = config.models if models is None else models
    rows = [{**item, "model": m.name} for m in models for item in items]
    ds = _map(ray.data.from_items(rows), stages.references, config.batch_size, generators=generators,
              models={m.name: model_info(m) for m in models},
              seed=config.references.seed if config.references.seed is not None else seed,
              paragraph_tokens=config.references.paragraph_tokens, segmentation=config.segmentation)
    return _map(ds, stages.judge_answers, config.batch_size, judge_server=judge, prompts=prompts,
                max_tokens=config.judge.max_tokens, max_answer_chars=config.judge.max_answer_chars,
                text_column="output", strict=config.judge.strict, check=config.judge.check)


def mark_kept(refs: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Which references go on (the paper keeps correctly answered ones), and why the others do not."""
    refs = refs.sort_values(["model", "item_id"]).reset_index(drop=True)
    keep = pd.Series(True, index=refs.index)
    reason = pd.Series("", index=refs.index)
    if config.references.keep_only_correct:
        reason[~refs["correct"]] = "answered incorrectly"
        keep &= refs["correct"]
    if config.references.require_closed_think:
        reason[keep & ~refs["closed_think"]] = "think block not closed"
        keep &= refs["closed_think"]
    short = keep & (refs["n_steps"] < config.min_steps)
    reason[short] = f"fewer than {config.min_steps} steps"
    keep &= ~short
    for entry in config.datasets:
        for _, group in refs[keep & (refs["domain"] == entry.domain)].groupby("model"):
            lengths = group["output"].str.len()
            if entry.drop_longest_fraction > 0:  # the longest outputs go (the authors' percentile cut-off)
                ordered = sorted(lengths)
                cutoff = ordered[min(len(ordered) - 1, max(0, math.floor((1 - entry.drop_longest_fraction)
                                                                          * len(ordered)) - 1))]
                long = group.index[lengths > cutoff]
                reason[long], keep[long] = "among the longest outputs", False
            if entry.max_per_answer is not None:
                rest = group[keep[group.index]]
                extra = rest.index[rest.groupby("reference_answer").cumcount() >= entry.max_per_answer]
                reason[extra], keep[extra] = f"over {entry.max_per_answer} items with this answer", False
    return refs.assign(kept=keep, drop_reason=reason)


def make_cuts(refs: pd.DataFrame, timesteps: list[float], min_steps: int,
              segmentation: str = "authors") -> pd.DataFrame:
    rows = []
    for r in refs[refs["kept"]].to_dict("records"):
        steps = split_steps(extract_reasoning(r["output"]).body, segmentation)
        for tau in timesteps:
            cut = cut_at(steps, tau, min_steps)
            rows.append({**r, "tau_target": cut.target, "tau_actual": cut.actual, "cut_count": cut.count})
    return pd.DataFrame(rows)


def intervention_rows(cuts: pd.DataFrame, names: list[str], pool: list[str], seed: int) -> list[dict[str, Any]]:
    keep = ["model", "size_b", "domain", "item_id", "question", "reference_answer", "output", "n_steps",
            "tau_target", "tau_actual", "cut_count"]
    rows = []
    for r in cuts[keep].to_dict("records"):
        for name in names:
            index, paragraph = -1, ""
            if name == "add_random_text":
                index, paragraph = choose_paragraph(
                    pool, derive_seed(seed, r["model"], r["item_id"], r["tau_target"], name))
            rows.append({**r, "intervention": name, "category": INTERVENTIONS[name], "paragraph": paragraph,
                         "pool_index": index})
    return rows


TRAJECTORY_COLUMNS = [
    "model", "size_b", "domain", "item_id", "intervention", "category", "tau_target", "tau_actual", "cut_count",
    "n_steps", "action", "edited_step", "intervention_text", "intervention_meta", "marker", "perturbed_trace",
    "resume_trace", "sample", "continuation", "finish_reason", "continuation_tokens", "answer", "judge_raw",
    "verdict", "correct", "verdict_strict", "verdict_lenient", "judge_rule_changed", "continuation_chars",
    "remainder_chars",
    "length_overhead", "complete_chars", "original_chars", "length_change", "authors_length_overhead",
    "doubt_units", "doubt_flags", "doubt_count", "doubt_rate", "doubt_any",
]


def run_wave(config: Config, ctx: RunContext, models: list[EvaluatedModel], items: list[dict[str, Any]],
             pool: list[str], prompts: Any, judge: Any, llm: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Steps 1-5 for some evaluated models (their servers are up): references, cut-doubt, trajectories."""
    import ray.data

    generators = {m.name: ctx.model(m.model, "generator", m.server) for m in models}
    infos = {m.name: model_info(m) for m in models}
    # 1. reference traces, judged; 2. the cut at every τ
    refs = mark_kept(collect(references_dataset(config, items, generators, judge, prompts, ctx.seed, models)), config)
    if not refs["kept"].any():
        return refs, pd.DataFrame(), pd.DataFrame()
    cuts = make_cuts(refs, config.timesteps, config.min_steps, config.segmentation)

    # 3. interventions, 4. continuations (+ forced doubt), 5. judge and doubt; doubt before the cut alongside
    doubt = config.doubt.model_dump()
    before = _map(ray.data.from_items(cuts.to_dict("records")), stages.cut_doubt, config.batch_size,
                  judge_server=judge, prompts=prompts, doubt=doubt, segmentation=config.segmentation)
    rows = intervention_rows(cuts, config.interventions, pool, ctx.seed)
    ds = _map(ray.data.from_items(rows), stages.perturb, config.batch_size, llm=llm, prompts=prompts,
              decoding={k: v.model_dump() for k, v in config.intervention_decoding.items()},
              ratio=config.random_char_ratio, seed=ctx.seed, models=infos, segmentation=config.segmentation)
    ds = _map(ds, stages.add_markers, config.batch_size, markers=config.doubt.markers)
    ds = _map(ds, stages.continue_traces, config.batch_size, generators=generators, models=infos,
              continuation=config.continuation.model_dump(), seed=ctx.seed, segmentation=config.segmentation)
    samples = config.batch_size * config.continuation.n
    ds = _map(ds, stages.judge_answers, samples, judge_server=judge, prompts=prompts,
              max_tokens=config.judge.max_tokens,
              max_answer_chars=config.judge.max_answer_chars, text_column="complete_output", strict=config.judge.strict,
              check=config.judge.check)
    ds = _map(ds, stages.continuation_doubt, samples, judge_server=judge, prompts=prompts, doubt=doubt)
    before, traj = collect_all(before, ds)
    return refs, before, traj


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    check_gated(config)
    needed = tuple(n for n in config.interventions if n in LLM_INTERVENTIONS)
    prompts = load_prompts(config.prompts_dir, needed)
    helpers = helper_specs(config, bool(needed))
    waves = plan_waves(config, bool(needed), config.gpus if config.gpus is not None else cluster_gpus())
    first = [(m.model, m.server) for m in waves[0]]
    with ThreadPoolExecutor(1) as background:  # the first models load while the data streams in
        servers = background.submit(start_servers, [*helpers.values(), *first])
        if "add_random_text" in config.interventions:
            item_frame, pool_frame = collect_all(items_dataset(ctx, config), pool_dataset(ctx, config))
            pool = make_pool(pool_frame, config, ctx.seed)
        else:
            item_frame, pool = collect(items_dataset(ctx, config)), []
        items = check_items(item_frame, config)
        servers.result()
    judge = ctx.model(config.judge.model, "generator", config.judge.server)
    llm = ctx.model(config.intervention_model, "generator", config.intervention_server) if needed else None
    ctx.log(step=0, items=len(items), pool_paragraphs=len(pool), waves=len(waves))

    parts = []
    for k, wave in enumerate(waves):  # one wave at a time when the GPUs do not hold every model at once
        if k:
            start_servers([(m.model, m.server) for m in wave])
        parts.append(run_wave(config, ctx, wave, items, pool, prompts, judge, llm))
        if len(waves) > 1:
            stop_servers([ctx.model(m.model, "generator", m.server) for m in wave])
    refs = pd.concat([p[0] for p in parts], ignore_index=True).sort_values(["model", "item_id"]).reset_index(drop=True)
    ctx.save_table("references", refs)
    ctx.log(step=1, reference_accuracy=float(refs["correct"].mean()), references_kept=int(refs["kept"].sum()))
    if not refs["kept"].any():
        reasons = ", ".join(f"{k}: {v}" for k, v in refs["drop_reason"].value_counts().items())
        raise ExplabError(f"no reference trace was kept ({reasons}): use more items, or set "
                          "references.keep_only_correct=false / a lower min_steps")
    before = pd.concat([p[1] for p in parts if len(p[1])], ignore_index=True)
    traj = pd.concat([p[2] for p in parts if len(p[2])], ignore_index=True)
    ctx.save_table("cut_doubt", before.sort_values(["model", "item_id", "tau_target"]).reset_index(drop=True))
    traj["answer"] = [final_answer(t)[-config.judge.max_answer_chars:] for t in traj["complete_output"]]
    traj = traj[TRAJECTORY_COLUMNS].sort_values(
        ["model", "item_id", "intervention", "tau_target", "marker", "sample"]).reset_index(drop=True)
    ctx.save_table("trajectories", traj)
    ctx.log(step=2, trajectories=len(traj))

    # 6. aggregates and plots
    ctx.save_table("robustness", metrics.item_robustness(traj))
    summary = metrics.summarize(traj, before)
    ctx.save_table("summary", summary)
    recovery = metrics.doubt_vs_recovery(traj)
    ctx.save_table("doubt_recovery", recovery)
    plots.save_all(ctx, summary, recovery)

    result = {"items": float(len(items)), "reference_accuracy": float(refs["correct"].mean()),
              "references_kept": float(refs["kept"].sum()), **metrics.headline(traj, summary)}
    ctx.log(step=3, **result)
    return result


JOB = Job(
    name="cot_robustness",
    description="Perturb a reasoning model's own chain of thought at fixed timesteps (7 interventions) "
                "and measure recovery.",
    config=Config,
    run=run,
    synthetic={"cot_arithmetic": data.arithmetic_items, "cot_logic": data.logic_items,
               "cot_word_problems": data.word_problem_items, "cot_additions": data.addition_items},
)
