"""The apm job: the hidden mapping C, what methods may see, the scripted world where preferences are
recoverable from history (and a shuffled-history control), the score aggregation, the soft prompt's
embedding-level intervention, and the tiny config end to end."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explab.config import load_config, validate
from explab.errors import ConfigError
from explab.job import get_job
from explab.runs import execute
from jobs.apm import evaluate
from jobs.apm.benchmark import build_world, draw_mapping, load_vocab, read_yaml_file
from jobs.apm.embed import HashingEmbedder
from jobs.apm.job import ALL_METHODS, Config, build_methods, personas, run_methods, views_of
from jobs.apm.llm import ScriptedJudge, ScriptedLLM, ScriptedUser
from jobs.apm.methods.base import MethodContext, Turn, UserView
from jobs.apm.users import SimulationConfig, UserPrompts, simulate_user

JOB_DIR = Path(__file__).resolve().parents[1] / "jobs" / "apm"
VOCAB_FILES = ("vocab/attributes.yaml", "vocab/principles.yaml", "vocab/topics.yaml")
SCRIPTED_METHODS = ["baseline", "rag", "prompt_opt", "routing", "oracle"]


def scripted_config(*overrides: str) -> Config:
    """The all-scripted world (configs/scripted.yaml): no model servers, rule-based LLM, user and judge."""
    job = get_job("apm")
    return load_config(job.config, job.config_path("scripted"), list(overrides))


# ---- the hidden mapping C ------------------------------------------------------------------------
def test_mapping_is_a_deterministic_balanced_function_of_the_seed():
    a, b = draw_mapping(7, 12, 12), draw_mapping(7, 12, 12)
    assert np.array_equal(a, b)
    others = [draw_mapping(s, 12, 12) for s in range(8, 14)]
    assert all(not np.array_equal(a, o) for o in others)
    assert set(np.unique(a)) <= {-1, 0, 1}
    # every principle is liked by one attribute and disliked by one: no population-wide preference
    assert np.all((a == 1).sum(axis=0) == 1) and np.all((a == -1).sum(axis=0) == 1)
    vocab = load_vocab(*VOCAB_FILES)
    w1, w2 = build_world(vocab, 3, 10, 2), build_world(vocab, 3, 10, 2)
    assert np.array_equal(w1.C, w2.C) and w1.users == w2.users
    assert any(u.preferences != v.preferences
               for u, v in zip(w1.users, build_world(vocab, 4, 10, 2).users, strict=True))
    for u in w1.users:  # w = sign(sum of the user's attribute rows)
        assert u.preferences == tuple(np.sign(w1.C[list(u.attributes)].sum(axis=0)))
        assert any(u.preferences)


class Recorder:
    """Wraps the base LLM and records every request a method sends."""

    def __init__(self, inner):
        self.inner, self.requests, self.texts = inner, [], []

    def generate(self, requests, params=None):
        self.requests.append(pickle.dumps(requests))
        self.texts.append(str(requests))
        return self.inner.generate(requests, params)


def test_methods_see_only_history_and_prompts_never_C():
    import dataclasses

    assert [f.name for f in dataclasses.fields(UserView)] == ["user_id", "history"]
    assert [f.name for f in dataclasses.fields(Turn)] == ["prompt", "chosen", "rejected"]
    cfg = scripted_config()
    vocab = load_vocab(*VOCAB_FILES)
    world = build_world(vocab, 5, 4, 2)
    templates = UserPrompts(cfg.user.prompts)
    method_prompts = read_yaml_file(cfg.methods.prompts, "methods.prompts")
    people = personas(world)
    records = [simulate_user(p, ScriptedUser(vocab), cfg.user, ScriptedLLM(vocab), cfg.base_models["scripted"],
                             templates, vocab, SimulationConfig(n_history=6, n_test=3), 5) for p in people]
    views = views_of(records, world, shuffle=False)
    secrets = [world.C.tobytes(), repr(world.C.tolist()).encode(), str(world.private_record()).encode()]
    for person, view, record in zip(people, views, records, strict=True):
        llm = Recorder(ScriptedLLM(vocab))
        mctx = MethodContext(llm, HashingEmbedder(), cfg.base_models["scripted"], method_prompts, vocab.principles, 11)
        methods = build_methods([m for m in SCRIPTED_METHODS if m != "oracle"], mctx, cfg.methods)
        run_methods(methods, view, list(record.test_prompts))
        inputs = [pickle.dumps(view), pickle.dumps(record.test_prompts), pickle.dumps(mctx), *llm.requests]
        for blob in inputs:
            assert not any(s in blob for s in secrets)
        persona_lines = ("Preferred traits:", "Disliked traits:", "Attributes:")
        text = "\n".join(llm.texts) + repr(view)
        assert not any(line in text for line in persona_lines)
        for name in person.attributes:  # the user's attribute names never reach a method
            assert not re.search(rf"\b{name}\b", text)
        assert "preferences" not in {f for m in methods for f in vars(m)}


# ---- the scripted world: preferences recoverable from history --------------------------------------
@pytest.fixture(scope="module")
def scripted_runs(tmp_path_factory, ray_local):
    job = get_job("apm")
    out = {}
    for shuffle in (False, True):
        run_dir, result = execute(job, scripted_config(f"benchmark.shuffle_histories={shuffle}"),
                                  tmp_path_factory.mktemp("apm"))
        out[shuffle] = (pd.read_parquet(run_dir / "tables" / "scores.parquet"), result, run_dir)
    return out


def _bonferroni_level(k: int) -> float:
    return 1 - 0.05 / k


def test_routing_and_rag_beat_the_baseline_and_the_oracle_beats_all(scripted_runs):
    scores, result, run_dir = scripted_runs[False]
    level = _bonferroni_level(len(SCRIPTED_METHODS) - 1)
    for method in ("routing", "rag", "prompt_opt"):
        gain = evaluate.paired_improvement(scores, method, "baseline", level=level)
        assert gain["ci_low"] > 0, (method, gain)  # significantly better over (seed, user) units
    for method in ("baseline", "rag", "prompt_opt", "routing"):
        gap = evaluate.paired_improvement(scores, "oracle", method, level=level)
        assert gap["ci_low"] > 0, (method, gap)
    assert result["score_oracle"] > max(result[f"score_{m}"] for m in ("baseline", "rag", "prompt_opt", "routing"))
    # the run stores C only in its private artifacts, and it is the C of each seed
    private = sorted((run_dir / "artifacts" / "private").glob("world_seed*.json"))
    assert [p.name for p in private] == ["world_seed0.json", "world_seed1.json", "world_seed2.json"]
    vocab = load_vocab(*VOCAB_FILES)
    import json

    assert json.loads(private[1].read_text())["C"] == draw_mapping(
        1, len(vocab.attributes), len(vocab.principles)).tolist()
    for table in (run_dir / "tables").glob("*.parquet"):
        assert "C" not in pd.read_parquet(table).columns and "attributes" not in pd.read_parquet(table).columns


def test_with_histories_shuffled_across_users_no_method_beats_the_baseline(scripted_runs):
    scores, _, _ = scripted_runs[True]
    level = _bonferroni_level(len(SCRIPTED_METHODS) - 1)
    for method in ("routing", "rag", "prompt_opt"):
        gain = evaluate.paired_improvement(scores, method, "baseline", level=level)
        # not significantly better: the (Bonferroni-corrected) CI of the improvement reaches 0
        assert gain["ci_low"] <= 0, (method, gain)
    # the oracle does not use the history, so it still wins: the control is not just a broken run
    assert evaluate.paired_improvement(scores, "oracle", "baseline", level=level)["ci_low"] > 0
    fresh, _, _ = scripted_runs[False]
    users = evaluate.unit_scores(scores)
    assert users[users["method"] == "baseline"]["score"].tolist() == \
        evaluate.unit_scores(fresh).query("method == 'baseline'")["score"].tolist()


def test_scripted_user_prefers_by_its_hidden_preferences(scripted_runs):
    # the chosen response of each history turn shows more preferred and fewer disliked principles
    vocab = load_vocab(*VOCAB_FILES)
    judge = ScriptedJudge(vocab)
    world = build_world(vocab, 0, 12, 2)
    histories = pd.read_parquet(scripted_runs[False][2] / "tables" / "histories.parquet").query("seed == 0")
    from jobs.apm.llm import has_marker

    gaps, informative = [], []
    for row in histories.itertuples():
        user = world.users[int(row.user[1:])]

        def utility(text, user=user):
            return sum(w * has_marker(text, p.markers) for p, w in zip(vocab.principles, user.preferences, strict=True))

        rejected = [utility(r) for r in row.rejected.split("\n\n")]
        gaps.append(utility(row.chosen) - max(rejected))  # the user takes a best candidate
        informative.append(utility(row.chosen) > min(rejected))  # ... which beats some other one
    assert len(gaps) == 12 * 12 and min(gaps) >= 0 and np.mean(informative) > 0.5
    assert judge.describe()["kind"] == "scripted"


# ---- aggregation on hand-made judge scores ---------------------------------------------------------
def test_score_aggregation_on_hand_made_scores():
    rows = []

    def add(seed, user, method, prompt, principle, pref, judge):
        rows.append({"seed": seed, "model": "m", "user": user, "method": method, "prompt": prompt,
                     "principle": principle, "preference": pref, "judge": judge, "parsed": True})

    for seed, bump in ((0, 0), (1, 1)):
        for method, j in (("baseline", 1), ("x", 5)):
            add(seed, "u0", method, 0, "a", +1, j)  # preferred: agreement (j-1)/4
            add(seed, "u0", method, 0, "b", -1, 3)  # disliked: agreement (5-j)/4 = 0.5
            add(seed, "u0", method, 0, "c", 0, 5)  # indifferent: dropped
            add(seed, "u0", method, 1, "a", +1, 1 + 2 * bump if method == "baseline" else 3)
            add(seed, "u1", method, 0, "b", -1, 5 if method == "baseline" else 2)
    scores = evaluate.score_table(rows)
    assert len(scores) == 16 and set(scores["principle"]) == {"a", "b"}
    per_prompt = evaluate.prompt_scores(scores).set_index(["seed", "user", "method", "prompt"])["score"]
    assert per_prompt[(0, "u0", "baseline", 0)] == pytest.approx((0 + 0.5) / 2)
    assert per_prompt[(0, "u0", "x", 0)] == pytest.approx((1 + 0.5) / 2)
    assert per_prompt[(1, "u0", "baseline", 1)] == pytest.approx(0.5)
    assert per_prompt[(0, "u1", "x", 0)] == pytest.approx(0.75)
    # seed means: users first averaged over prompts, then users averaged
    seed_scores = evaluate.seed_scores(scores).set_index(["method", "seed"])["score"]
    base0 = ((0.25 + 0.0) / 2 + 0.0) / 2
    base1 = ((0.25 + 0.5) / 2 + 0.0) / 2
    x0 = x1 = ((0.75 + 0.5) / 2 + 0.75) / 2
    assert seed_scores[("baseline", 0)] == pytest.approx(base0) and seed_scores[("baseline", 1)] == pytest.approx(base1)
    assert seed_scores[("x", 0)] == pytest.approx(x0) and seed_scores[("x", 1)] == pytest.approx(x1)
    summary = evaluate.summarize(scores).set_index("method")
    half = 12.706204736174696 * np.std([base0, base1], ddof=1) / np.sqrt(2)  # t(0.975, df=1)
    assert summary.loc["baseline", "mean"] == pytest.approx((base0 + base1) / 2)
    assert summary.loc["baseline", "ci_high"] - summary.loc["baseline", "mean"] == pytest.approx(half)
    assert summary.loc["x", "ci_low"] == pytest.approx(x0) and summary.loc["x", "delta"] == pytest.approx(
        x0 - (base0 + base1) / 2)
    # win rate per prompt: x wins (0,u0,0), (0,u0,1), (0,u1,0), (1,u0,0), (1,u1,0); ties (1,u0,1)
    assert summary.loc["x", "win_rate"] == pytest.approx(5.5 / 6)
    assert summary.loc["baseline", "win_rate"] == pytest.approx(0.5)
    diffs = [x0 - base0, x1 - base1]
    from scipy import stats

    assert summary.loc["x", "p_seeds"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert summary.loc["x", "n_units"] == 4
    assert evaluate.agreement([1, 5, 3], [1, 1, -1]).tolist() == [0.0, 1.0, 0.5]


def test_bad_config_is_one_clear_error():
    job = get_job("apm")
    with pytest.raises(ConfigError, match="methods.enabled"):
        load_config(job.config, job.config_path("tiny"), ["methods.enabled=[rag]"])
    with pytest.raises(ConfigError, match="soft_prompt"):
        validate(Config, {"base_models": {"s": {"kind": "scripted"}}, "user": {"kind": "scripted"},
                          "judge": {"kind": "scripted"}})
    with pytest.raises(ConfigError, match="benchmark.principles"):
        load_vocab(*VOCAB_FILES, principles=["concise", "not_a_principle"])
    with pytest.raises(ConfigError, match="needs `model`"):
        validate(Config, {"user": {"kind": "llm"}})
    assert set(ALL_METHODS) == set(Config().methods.enabled)
    from jobs.apm.job import check_method_prompts

    bad = read_yaml_file("prompts/methods.yaml", "methods.prompts")
    bad["rag"]["user"] = "{examples} {user_preferences}"
    with pytest.raises(ConfigError, match="rag.user.*user_preferences"):
        check_method_prompts(bad, "bad.yaml")


def test_sweep_spec_resolves_against_the_job():
    sweep = pytest.importorskip("explab.sweep")
    source = JOB_DIR / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)  # every space field and range is valid for the job
    assert plan.spec.metric == "mean_delta" and plan.base["task_cpus"] == 0
    assert "soft_prompt" not in plan.base["methods"]["enabled"]


# ---- the soft prompt --------------------------------------------------------------------------------
def test_soft_prompt_learns_preferences_and_the_server_applies_the_same_prefix(ray_local):
    import torch

    from explab.models import ModelSpec
    from explab.servers import get_server
    from jobs.apm.methods.soft_prompt import SoftPrompt, SoftPromptConfig, SoftPromptModel

    spec = ModelSpec(name="tiny:llama", device="cpu")
    trainer = SoftPromptModel(spec, 4)
    ids, positions = trainer.layout("How do I bake bread?")
    assert len(positions) == 4 and ids == trainer.layout("How do I bake bread?")[0]
    history = tuple(Turn(f"Question number {i}?", "Yes indeed, gladly.", ("No way, never.",)) for i in range(6))
    cfg = SoftPromptConfig(length=4, steps=30, lr=0.05, batch_pairs=6)
    torch.manual_seed(0)
    prefix, stats = trainer.train(UserView("u", history), cfg, seed=0)
    assert stats["accuracy_after"] == 1.0 and stats["loss_last"] < stats["loss_first"]
    # the HookedModel server, given the steer specs, sees exactly the prefix the trainer trained
    hooked = get_server("hooked", spec)
    request = trainer.request("How do I bake bread?")
    messages = [m.model_dump() for m in request.messages]
    served = hooked.forward([{"messages": messages, "return_logits": "last",
                              "interventions": trainer.steer_specs(prefix, ids, positions)}])[0]
    plain = hooked.forward([{"messages": messages, "return_logits": "last"}])[0]
    with torch.no_grad():
        local = trainer._forward([ids], [positions], prefix)[0, -1].numpy()
    assert served.token_ids == ids
    assert np.allclose(served.logits, local, atol=1e-4) and not np.allclose(plain.logits, local, atol=1e-3)
    role = Config().base_models["llama-8b"].model_copy(update={"max_tokens": 6, "temperature": 0.0})
    method = SoftPrompt(MethodContext(None, None, role, {}, (), 0), cfg, trainer, hooked)
    method.prefix, method.stats = prefix, stats
    assert len(method.respond_all(["How do I bake bread?", "Hi?"])) == 2


def test_soft_prompt_gradient_checkpointing_gives_the_same_training_and_recomputes_blocks():
    """With gradient checkpointing on, every decoder block but the one the prefix enters is
    checkpointed, and the trained prefix is the one trained without it."""
    import torch

    from explab.models import ModelSpec
    from jobs.apm.methods.soft_prompt import SoftPromptConfig, SoftPromptModel

    history = tuple(Turn(f"Question number {i}?", "Yes indeed, gladly.", ("No way, never.",)) for i in range(4))
    results = {}
    for ckpt in (False, True):
        trainer = SoftPromptModel(ModelSpec(name="tiny:llama", device="cpu"), 4)
        calls = []
        layers = trainer.model.model.layers
        assert len(layers) > 1
        block = layers[-1]  # a checkpointed block (block 0, where the prefix enters, is not)
        handle = block.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        cfg = SoftPromptConfig(length=4, steps=3, lr=0.05, batch_pairs=4, gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        prefix, stats = trainer.train(UserView("u", history), cfg, seed=0)
        handle.remove()
        results[ckpt] = (prefix, stats, len(calls))
        assert not trainer.model.training  # back in eval mode after the steps
        assert trainer.model.is_gradient_checkpointing == ckpt
        assert [getattr(b, "gradient_checkpointing", False) for b in layers] == [False] + [ckpt] * (len(layers) - 1)
    (p0, s0, n0), (p1, s1, n1) = results[False], results[True]
    assert torch.allclose(p0, p1, atol=1e-5) and s0["loss_last"] == pytest.approx(s1["loss_last"], rel=1e-5)
    assert n1 == n0  # the same forward passes (a recomputation in backward is not seen by forward hooks)


# ---- the tiny config end to end ------------------------------------------------------------------------
def test_tiny_config_runs_end_to_end(tmp_path, ray_local):
    job = get_job("apm")
    config = load_config(job.config, JOB_DIR / "configs" / "tiny.yaml")
    run_dir, result = execute(job, config, tmp_path)
    scores = pd.read_parquet(run_dir / "tables" / "scores.parquet")
    assert list(scores.columns[:7]) == ["seed", "model", "user", "method", "prompt", "principle", "score"]
    assert set(scores["method"]) == set(ALL_METHODS) and set(scores["model"]) == {"tiny-llama", "tiny-qwen"}
    assert set(scores["seed"]) == {0, 1} and scores["score"].between(0, 1).all()
    summary = pd.read_parquet(run_dir / "tables" / "summary.parquet")
    assert len(summary) == len(ALL_METHODS) * 2 and {
        "mean", "ci_low", "ci_high", "p_seeds", "win_rate"} <= set(summary.columns)
    for plot in ("scores_method_model", "win_rate_method_model"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    info = pd.read_parquet(run_dir / "tables" / "method_info.parquet")
    assert {"soft_prompt", "prompt_opt", "routing"} <= set(info["method"])
    assert 0.0 <= result["judge_parse_rate"] <= 1.0 and "score_routing" in result
