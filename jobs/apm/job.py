"""apm: the Arbitrary Preference Mapping personalization benchmark.

Per seed: draw the hidden mapping C and the users (`benchmark`), let the simulated users write
prompts and build their histories by choosing among candidate responses (`users`, one Ray task
per user), then for every base LLM fit each personalization method on each user's history and
answer the held-out prompts (`methods`, one Ray task per user; the soft prompt in one training task
per model), and score every response principle by principle with the judge (`judge`). Tables,
summary with significance across seeds, and plots (`evaluate`, `plots`).

Methods see only a `UserView` (history) and prompts; C and the users' attributes and preferences
are written only to ``artifacts/private/``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import pandas as pd
import ray
from pydantic import Field, model_validator

from explab.config import JobConfig, Section, Seed
from explab.errors import ConfigError
from explab.job import Job
from explab.models import ModelSpec
from explab.runs import RunContext
from explab.seeds import derive_seed, rng_for
from explab.servers import ServerOptions
from jobs.apm import evaluate, plots
from jobs.apm.benchmark import (
    Principle,
    World,
    build_world,
    derangement,
    load_vocab,
    read_yaml_file,
)
from jobs.apm.embed import EmbedderConfig, make_embedder
from jobs.apm.judge import JudgePrompts, judge_responses
from jobs.apm.llm import RoleConfig, fill, make_role
from jobs.apm.methods.base import Method, MethodContext, UserView
from jobs.apm.methods.baseline import NonPersonalized
from jobs.apm.methods.oracle import Oracle
from jobs.apm.methods.prompt_opt import PromptOptConfig, TextualPromptOptimization
from jobs.apm.methods.rag import RAG, RagConfig
from jobs.apm.methods.routing import Routing, RoutingConfig
from jobs.apm.methods.soft_prompt import SoftPromptConfig
from jobs.apm.users import Persona, SimulationConfig, UserPrompts, UserRecord, simulate_user

MethodName = Literal["baseline", "rag", "prompt_opt", "soft_prompt", "routing", "oracle"]
ALL_METHODS: list[str] = ["baseline", "rag", "prompt_opt", "soft_prompt", "routing", "oracle"]
VLLM = ServerOptions(backend="vllm", num_gpus=1.0, engine={"max_model_len": 8192})


class UserRoleConfig(RoleConfig):
    prompts: str = "prompts/user.yaml"


class JudgeRoleConfig(RoleConfig):
    prompts: str = "prompts/judge.yaml"
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(16, ge=1)


class BenchmarkConfig(Section):
    attributes_file: str = "vocab/attributes.yaml"
    principles_file: str = "vocab/principles.yaml"
    topics_file: str = "vocab/topics.yaml"
    attributes: list[str] | None = None  # a subset of the vocabulary by name (None: all)
    principles: list[str] | None = None
    n_users: int = Field(50, ge=1)
    attributes_per_user: int = Field(2, ge=1)
    likes_per_principle: int = Field(1, ge=1)  # attributes that like (and as many that dislike) each principle
    simulation: SimulationConfig = SimulationConfig()
    candidates: RoleConfig | None = None  # the LLM writing history candidates (None: the first base model)
    shuffle_histories: bool = False  # control: every user gets another user's history


class MethodsConfig(Section):
    enabled: list[MethodName] = list(ALL_METHODS)
    prompts: str = "prompts/methods.yaml"
    rag: RagConfig = RagConfig()
    prompt_opt: PromptOptConfig = PromptOptConfig()
    soft_prompt: SoftPromptConfig = SoftPromptConfig()
    routing: RoutingConfig = RoutingConfig()

    @model_validator(mode="after")
    def _baseline_first(self) -> MethodsConfig:
        if "baseline" not in self.enabled:
            raise ValueError("methods.enabled must include 'baseline' (every method is compared to it)")
        if len(set(self.enabled)) != len(self.enabled):
            raise ValueError("methods.enabled lists a method twice")
        return self


class Config(JobConfig):
    seeds: list[Seed] = [0, 1, 2, 3, 4]  # one C per seed; significance is across these
    base_models: dict[str, RoleConfig] = {
        "llama-8b": RoleConfig(model=ModelSpec(name="meta-llama/Llama-3.1-8B-Instruct"), server=VLLM),
        "qwen-32b": RoleConfig(model=ModelSpec(name="Qwen/Qwen2.5-32B-Instruct"), server=VLLM),
    }
    user: UserRoleConfig = UserRoleConfig(model=ModelSpec(name="Qwen/Qwen2.5-14B-Instruct"), server=VLLM,
                                          temperature=1.0)
    judge: JudgeRoleConfig = JudgeRoleConfig(model=ModelSpec(name="Qwen/Qwen2.5-72B-Instruct-AWQ"), server=VLLM)
    embedder: EmbedderConfig = EmbedderConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    methods: MethodsConfig = MethodsConfig()
    # CPU slots per Ray task (they mostly wait on the servers); 0 inside a sweep trial, whose placement
    # group holds only the trial itself
    task_cpus: float = Field(0.25, ge=0.0)
    users_per_task: int = Field(1, ge=1)  # users handled by one Ray task (fewer, longer tasks on a small machine)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # significance level of the summary

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if not self.base_models:
            raise ValueError("base_models must name at least one base LLM")
        if "soft_prompt" in self.methods.enabled:
            scripted = [k for k, m in self.base_models.items() if m.kind != "llm"]
            if scripted:
                raise ValueError(f"methods.enabled has soft_prompt, which trains on model weights, but base model "
                                 f"{scripted[0]!r} is scripted: remove soft_prompt or use kind: llm")
        # the vocabulary and prompt files are part of the config: a bad one fails here, before any run starts
        b = self.benchmark
        vocab = load_vocab(b.attributes_file, b.principles_file, b.topics_file, b.attributes, b.principles)
        if not 1 <= b.attributes_per_user <= len(vocab.attributes):
            raise ConfigError(f"benchmark.attributes_per_user={b.attributes_per_user}: must be between 1 and "
                              f"{len(vocab.attributes)} (the number of attributes)")
        if 2 * b.likes_per_principle > len(vocab.attributes):
            raise ConfigError(f"benchmark.likes_per_principle={b.likes_per_principle} needs at least "
                              f"{2 * b.likes_per_principle} attributes (have {len(vocab.attributes)}): lower it")
        UserPrompts(self.user.prompts)
        JudgePrompts(self.judge.prompts)
        check_method_prompts(read_yaml_file(self.methods.prompts, "methods.prompts"), self.methods.prompts)
        return self


# ---- the parts one Ray task runs -------------------------------------------------------------
def build_methods(names: list[str], mctx: MethodContext, cfg: MethodsConfig,
                  oracle: tuple[list[Principle], list[Principle]] | None = None) -> list[Method]:
    """The methods that run per user task (soft_prompt runs in its own training task)."""
    out: list[Method] = []
    for name in names:
        if name == "baseline":
            out.append(NonPersonalized(mctx))
        elif name == "rag":
            out.append(RAG(mctx, cfg.rag))
        elif name == "prompt_opt":
            out.append(TextualPromptOptimization(mctx, cfg.prompt_opt))
        elif name == "routing":
            out.append(Routing(mctx, cfg.routing))
        elif name == "oracle":
            if oracle is None:
                raise ConfigError("the oracle needs the user's preferences")
            out.append(Oracle(mctx, *oracle))
    return out


def run_methods(methods: list[Method], view: UserView, test_prompts: list[str]) -> tuple[list[dict], list[dict]]:
    """Fit every method on the view and answer the test prompts: (response rows, info rows).

    The methods run in threads, so their LLM calls reach the shared server together and batch
    (every request carries its own seed, so the responses do not depend on the batching).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(method: Method) -> list[str]:
        method.fit(view)
        return method.respond_all(list(test_prompts))

    with ThreadPoolExecutor(max_workers=max(len(methods), 1)) as pool:
        answers = list(pool.map(one, methods))
    rows, infos = [], []
    for method, responses in zip(methods, answers, strict=True):
        for i, (prompt, response) in enumerate(zip(test_prompts, responses, strict=True)):
            rows.append({"method": method.name, "prompt": i, "prompt_text": prompt, "response": response})
        infos += [{"method": method.name, "key": k, "value": str(v)} for k, v in method.info().items()]
    return rows, infos


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@ray.remote
def _simulate_task(people: list[Persona], *args: Any) -> list[UserRecord]:
    return [simulate_user(p, *args) for p in people]


@ray.remote
def _respond_task(jobs: list[tuple[UserView, list[str], MethodContext, Any]], names: list[str],
                  cfg: MethodsConfig) -> list[tuple[list[dict], list[dict]]]:
    return [run_methods(build_methods(names, mctx, cfg, oracle), view, tests) for view, tests, mctx, oracle in jobs]


@ray.remote
def _soft_prompt_task(views: list[UserView], tests: list[list[str]], mctxs: list[MethodContext], spec: ModelSpec,
                      cfg: SoftPromptConfig, hooked: Any) -> list[tuple[list[dict], list[dict]]]:
    from jobs.apm.methods.soft_prompt import SoftPrompt, SoftPromptModel

    trainer = SoftPromptModel(spec, cfg.length, mctxs[0].prompts.get("baseline_system", "") if mctxs else "")
    methods = [SoftPrompt(m, cfg, trainer, hooked) for m in mctxs]
    for method, view in zip(methods, views, strict=True):
        method.fit(view)
    # one call for every user's prompts (the server batches each user's prefix separately)
    requests = [r for method, t in zip(methods, tests, strict=True) for r in method.requests(t)]
    texts = iter(r.completions[0].text for r in hooked.generate(requests))
    out = []
    for method, t in zip(methods, tests, strict=True):
        rows = [{"method": method.name, "prompt": i, "prompt_text": p, "response": next(texts)}
                for i, p in enumerate(t)]
        out.append((rows, [{"method": method.name, "key": k, "value": str(v)} for k, v in method.info().items()]))
    return out


@ray.remote
def _judge_task(jobs: list[tuple[list[dict], list[tuple[Principle, int]]]], judge: Any, role: RoleConfig,
                prompts: JudgePrompts, seed: int) -> list[dict]:
    return [row for rows, prefs in jobs for row in judge_responses(judge, role, prompts, rows, prefs, seed)]


# ---- the job ------------------------------------------------------------------------------------
def check_method_prompts(data: dict[str, Any], path: str) -> dict[str, Any]:
    """Fill every method template once with sample values: a bad field fails here, in one line."""
    fields = {("rag", "example"): ("prompt", "response"), ("rag", "user"): ("examples", "prompt"),
              ("optimizer", "example"): ("prompt", "chosen", "rejected"),
              ("optimizer", "user"): ("score", "current", "examples"),
              ("oracle", "prefer"): ("instruction", "description"), ("oracle", "avoid"): ("instruction", "description")}
    for (section, key), names in fields.items():
        template = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if not isinstance(template, str):
            raise ConfigError(f"methods.prompts: {path} needs a {section}.{key} template")
        fill(template, f"{section}.{key}", **{n: 0.5 if n == "score" else "x" for n in names})
    if not isinstance(data.get("baseline_system", ""), str):
        raise ConfigError(f"methods.prompts: {path}: baseline_system must be a string")
    return data


def personas(world: World) -> list[Persona]:
    vocab = world.vocab
    return [Persona(u.user_id, u.index, tuple(world.attribute_names(u)),
                    tuple(vocab.attributes[a].description for a in u.attributes),
                    tuple(world.preferred(u)), tuple(world.disliked(u))) for u in world.users]


def views_of(records: list[UserRecord], world: World, shuffle: bool) -> list[UserView]:
    views = [UserView(r.user_id, r.history) for r in records]
    if not shuffle:
        return views
    perm = derangement(len(views), rng_for("apm-shuffle", world.seed))
    return [UserView(views[i].user_id, views[int(perm[i])].history) for i in range(len(views))]


def run_soft_prompts(config: Config, ctx: RunContext, runs: list[tuple[str, RoleConfig, list[MethodContext]]],
                     views: list[UserView], tests: list[list[str]]) -> dict[str, list[tuple[list[dict], list[dict]]]]:
    """The soft prompt of every (base model, user): one training task per base model beside its
    HookedModel server. With ``sequential`` one base model at a time, its server stopped after it,
    so a large model's training and server never share the GPUs with another's."""
    from explab.servers import stop_server

    sp = config.methods.soft_prompt

    def launch(role: RoleConfig, mctxs: list[MethodContext]) -> tuple[Any, Any]:
        hooked = ctx.model(role.model, "hooked", sp.server)
        task = _soft_prompt_task.options(num_cpus=config.task_cpus, num_gpus=sp.num_gpus).remote(
            views, tests, mctxs, role.model, sp, hooked)
        return hooked, task

    out: dict[str, list[tuple[list[dict], list[dict]]]] = {}
    if not sp.sequential:
        launched = {label: launch(role, mctxs) for label, role, mctxs in runs}
        return {label: ray.get(task) for label, (_, task) in launched.items()}
    for label, role, mctxs in runs:
        hooked, task = launch(role, mctxs)
        out[label] = ray.get(task)
        if len(runs) > 1:
            stop_server(hooked.name)
    return out


def side_by_side_servers(config: Config) -> list[tuple[Any, str, Any]]:
    """The run's servers that can start together (`RunContext.models`): every LLM role on the transformers
    backend, and the soft prompt's HookedModel servers unless they run one after another (`sequential`).
    A vLLM engine sizes its cache from the GPU memory free when it starts, so those start in turn."""
    roles = [config.user, config.judge, config.benchmark.candidates, *config.base_models.values()]
    out = [(r.model, "generator", r.server) for r in roles
           if r is not None and r.kind == "llm" and r.server.backend == "transformers"]
    sp = config.methods.soft_prompt
    if "soft_prompt" in config.methods.enabled and not sp.sequential:
        out += [(r.model, "hooked", sp.server) for r in config.base_models.values() if r.kind == "llm"]
    return out


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    b = config.benchmark
    vocab = load_vocab(b.attributes_file, b.principles_file, b.topics_file, b.attributes, b.principles)
    user_prompts = UserPrompts(config.user.prompts)
    judge_prompts = JudgePrompts(config.judge.prompts)
    method_prompts = check_method_prompts(read_yaml_file(config.methods.prompts, "methods.prompts"),
                                          config.methods.prompts)

    ctx.models(side_by_side_servers(config))  # loaded together: each make_role / launch below finds its server up
    user_llm = make_role(config.user, ctx, "user", vocab)
    judge_llm = make_role(config.judge, ctx, "judge", vocab, judge_prompts.scale)
    cand_role = b.candidates or next(iter(config.base_models.values()))
    cand_llm = make_role(cand_role, ctx, "llm", vocab)
    bases = {label: (role, make_role(role, ctx, "llm", vocab)) for label, role in config.base_models.items()}
    embedder = make_embedder(config.embedder, ctx)
    enabled = list(config.methods.enabled)
    per_user = [m for m in enabled if m != "soft_prompt"]
    opts = {"num_cpus": config.task_cpus}

    judged, responses, infos, history_rows, failures = [], [], [], [], {"choice": 0, "choices": 0}
    for step, seed in enumerate(config.seeds):
        world = build_world(vocab, seed, b.n_users, b.attributes_per_user, b.likes_per_principle)
        ctx.save_json(f"private/world_seed{seed}", world.private_record())
        people = personas(world)
        clock = time.perf_counter()
        records: list[UserRecord] = [r for part in ray.get([
            _simulate_task.options(**opts).remote(group, user_llm, config.user, cand_llm, cand_role, user_prompts,
                                                  vocab, b.simulation, seed)
            for group in chunks(people, config.users_per_task)]) for r in part]
        failures["choice"] += sum(r.choice_failures for r in records)
        failures["choices"] += sum(len(r.history) for r in records)
        for r in records:
            history_rows += [{"seed": seed, "user": r.user_id, "turn": t, "prompt": turn.prompt, "chosen": turn.chosen,
                              "rejected": "\n\n".join(turn.rejected)} for t, turn in enumerate(r.history)]
        views = views_of(records, world, b.shuffle_histories)
        seconds = {"seconds_simulate": time.perf_counter() - clock}
        clock = time.perf_counter()
        tests = [list(r.test_prompts) for r in records]
        # every base model's user tasks at once; the soft prompt's training tasks (each with a HookedModel
        # server) at once too, or one base model after another with `soft_prompt.sequential`
        pending, soft_runs = {}, []
        for label, (role, llm) in bases.items():
            mctxs = [MethodContext(llm, embedder, role, method_prompts, vocab.principles,
                                   derive_seed(seed, label, v.user_id))
                     for v in views]
            work = [(v, t, m, (list(p.liked), list(p.disliked)) if "oracle" in per_user else None)
                    for v, t, m, p in zip(views, tests, mctxs, people, strict=True)]
            refs = [_respond_task.options(**opts).remote(group, per_user, config.methods)
                    for group in chunks(work, config.users_per_task)]
            pending[label] = refs
            if "soft_prompt" in enabled:
                soft_runs.append((label, role, mctxs))
        soft_out = run_soft_prompts(config, ctx, soft_runs, views, tests)
        judge_refs, outputs_by_model = [], {}
        for label, refs in pending.items():
            outputs = [o for part in ray.get(refs) for o in part]
            if label in soft_out:
                outputs = [(a[0] + s[0], a[1] + s[1]) for a, s in zip(outputs, soft_out[label], strict=True)]
            outputs_by_model[label] = outputs
        seconds["seconds_methods"] = time.perf_counter() - clock
        clock = time.perf_counter()
        for label, outputs in outputs_by_model.items():
            keys = {"seed": seed, "model": label}
            to_judge = []
            for person, (rows, info) in zip(people, outputs, strict=True):
                rows = [{**keys, "user": person.user_id, **r} for r in rows]
                responses += rows
                infos += [{**keys, "user": person.user_id, **i} for i in info]
                prefs = [(p, w) for p, w in zip(vocab.principles, world.users[person.index].preferences, strict=True)
                         if w != 0]
                to_judge.append((rows, prefs))
            judge_refs += [_judge_task.options(**opts).remote(group, judge_llm, config.judge, judge_prompts, seed)
                           for group in chunks(to_judge, config.users_per_task)]
        judged += [row for part in ray.get(judge_refs) for row in part]
        seconds["seconds_judge"] = time.perf_counter() - clock
        seed_scores = evaluate.prompt_scores(
            evaluate.score_table([j for j in judged if j["seed"] == seed], *judge_prompts.scale))
        ctx.log(step=step, seed=seed, **seconds,
                **{f"score_{m}": float(g["score"].mean()) for m, g in seed_scores.groupby("method")})

    low, high = judge_prompts.scale
    scores = evaluate.score_table(judged, low, high)
    summary = evaluate.summarize(scores, "baseline", config.alpha)
    ctx.save_table("scores", scores[["seed", "model", "user", "method", "prompt", "principle", "score", "judge",
                                     "preference", "parsed"]])
    ctx.save_table("summary", summary)
    ctx.save_table("responses", pd.DataFrame(responses))
    ctx.save_table("histories", pd.DataFrame(history_rows))
    ctx.save_table("method_info", pd.DataFrame(infos, columns=["seed", "model", "user", "method", "key", "value"]))
    order = [m for m in ALL_METHODS if m in enabled]
    ctx.save_plot("scores_method_model", plots.method_model_scores(summary, order))
    ctx.save_plot("win_rate_method_model", plots.win_rates(summary, order))
    return result_metrics(summary, scores, failures)


def result_metrics(summary: pd.DataFrame, scores: pd.DataFrame, failures: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for method, group in summary.groupby("method", sort=False):
        out[f"score_{method}"] = float(group["mean"].mean())
        if method != "baseline" and "delta" in group:
            out[f"delta_{method}"] = float(group["delta"].mean())
            out[f"win_rate_{method}"] = float(group["win_rate"].mean())
    for row in summary.itertuples():
        out[f"score_{row.method}@{row.model}"] = float(row.mean)
    personal = [m for m in summary["method"].unique() if m not in ("baseline", "oracle")]
    out["mean_delta"] = float(summary[summary["method"].isin(personal)]["delta"].mean()) if personal else 0.0
    out["judge_parse_rate"] = float(scores["parsed"].mean()) if len(scores) else float("nan")
    out["choice_parse_rate"] = 1.0 - failures["choice"] / max(failures["choices"], 1)
    return out


JOB = Job(
    name="apm",
    description="APM personalization benchmark: hidden random preference mapping C, simulated users, "
                "principle-wise judge; baseline, RAG, textual and soft prompt optimization, routing, oracle.",
    config=Config,
    run=run,
)
