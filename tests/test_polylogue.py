"""The polylogue job on a tiny random Llama: each test checks a property the method must have."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from explab.cli import main
from explab.config import load_config, validate
from explab.data import load_dataset
from explab.errors import ConfigError, ExplabError
from explab.interventions import paragraph_index
from explab.job import get_job
from explab.models import build_tiny
from explab.runs import execute
from explab.servers import get_server
from explab.servers.prompts import encode_request
from explab.servers.types import GenerationRequest
from jobs.polylogue import persona, steering
from jobs.polylogue.config import PolylogueSection, ProbeSection
from jobs.polylogue.data import (
    extract_answer,
    load_questions,
    question_prompt,
    synthetic_mmlu_pro,
    validate_row,
)
from jobs.polylogue.features import feature_names, summary
from jobs.polylogue.job import random_directions
from jobs.polylogue.judge import keep_pairs, parse_score
from jobs.polylogue.probes import evaluate
from jobs.polylogue.series import long_table, run_series

SPEC = {"name": "tiny:llama", "tiny": {"num_hidden_layers": 4}}  # the tiny config's model
N_LAYERS, D = 4, 64


def cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(SPEC)


@pytest.fixture(scope="module")
def servers(ray_local):
    hooked = get_server("hooked", SPEC, {"max_wait_ms": 20})
    generator = get_server("generator", SPEC, {"backend": "transformers", "max_wait_ms": 20})
    return hooked, generator


def questions(n, seed=1):
    return [validate_row(r, i) for i, r in enumerate(synthetic_mmlu_pro(n=n, seed=seed, n_options=4))]


# ---- step 1: persona vectors -------------------------------------------------------------------------
def test_persona_vector_recovers_a_direction_planted_under_the_positive_prompts(servers):
    hooked, generator = servers
    rows = pd.DataFrame(persona.extraction_rows(["confident"], 2, 3, 1, seed=0))
    assert set(rows.polarity) == {"pos", "neg"} and rows.system.str.contains("confident assistant").any()
    rows = persona.generate_batch(rows, generator=generator, params={"temperature": 1.0, "max_tokens": 16})
    rows = rows[rows.n_tokens > 0]
    u = np.random.default_rng(3).standard_normal(D)
    u *= 0.2 / np.linalg.norm(u)  # about the size of the tiny model's residual stream
    plant = {"pos": [{"type": "steer", "point": "blocks.1.resid_post", "vector": u.tolist(), "positions": "all"}]}
    planted = persona.persona_vectors(persona.mean_activations(rows, hooked, N_LAYERS, 8, extra=plant), ["confident"])
    natural = persona.persona_vectors(persona.mean_activations(rows, hooked, N_LAYERS, 8), ["confident"])
    planted, natural = planted["confident"], natural["confident"]
    assert planted.shape == (N_LAYERS, D)
    assert cos(planted[1], u) > 0.9  # recovered at the planted layer
    assert abs(cos(natural[1], u)) < 0.5  # ... because of the plant, not of the prompts
    np.testing.assert_allclose(planted[1] - natural[1], u, atol=1e-5)  # exactly the mean difference
    np.testing.assert_allclose(planted[0], natural[0], atol=1e-6)  # the block before is untouched


def test_judge_filter_keeps_only_clear_contrasts():
    assert parse_score("87") == 87.0 and np.isnan(parse_score("REFUSAL")) and np.isnan(parse_score("n/a"))
    assert np.isnan(parse_score("150"))
    rows = []
    for q, (pos, neg, coh) in enumerate([(90, 10, 80), (40, 10, 80), (90, 60, 80), (90, 10, 20), (np.nan, 5, 90)]):
        for polarity, score in (("pos", pos), ("neg", neg)):
            rows.append({"trait": "t", "pair": 0, "question_index": q, "sample": 0, "polarity": polarity,
                         "trait_score": score, "coherence": coh})
    kept = keep_pairs(pd.DataFrame(rows), threshold=50, coherence=50)
    assert kept.tolist() == [True, True] + [False] * 8
    assert keep_pairs(pd.DataFrame(rows), threshold=50, coherence=None).tolist() == (
        [True, True] + [False] * 4 + [True, True] + [False] * 2)


def test_a_thin_trait_is_skipped_with_a_warning_and_the_others_go_on():
    from jobs.polylogue.persona import skip_thin_traits

    rows = [{"trait": t, "pair": 0, "question_index": q, "sample": 0, "polarity": p, "kept": t == "a" and q < 3}
            for t in ("a", "b") for q in range(4) for p in ("pos", "neg")]
    frame = pd.DataFrame(rows)
    frame.loc[(frame.trait == "b") & (frame.question_index == 0), "kept"] = True  # b: one pair
    with pytest.warns(UserWarning, match=r"trait 'b': the judge kept 1 contrastive pairs \(< judge.min_pairs=2\)"):
        assert skip_thin_traits(frame, ["a", "b"], 2) == ["b"]
    assert not frame.loc[frame.trait == "b", "kept"].any() and frame.loc[frame.trait == "a", "kept"].sum() == 6
    assert skip_thin_traits(frame, ["a"], 3) == []
    with pytest.warns(UserWarning), pytest.raises(ExplabError, match="every trait has fewer than"):
        skip_thin_traits(frame, ["a", "b"], 4)


def test_weighted_judge_score_is_the_probability_weighted_number():
    from jobs.polylogue.judge import weighted_score

    logits = np.full(10, -30.0)
    logits[[2, 3, 5]] = np.log([0.2, 0.6, 0.2])  # numbers 0, 50, 100 carry all the mass
    assert weighted_score(logits, {2: 0, 3: 50, 5: 100}) == pytest.approx(50.0)
    logits[5] = np.log(0.6)
    logits[3] = np.log(0.2)  # 0.2·0 + 0.2·50 + 0.6·100 = 70 (of a total 1.0)
    assert weighted_score(logits, {2: 0, 3: 50, 5: 100}) == pytest.approx(70.0)
    logits[[2, 3, 5]] = -30.0
    logits[0] = 0.0  # the mass sits on a non-number token: no score
    assert np.isnan(weighted_score(logits, {2: 0, 3: 50, 5: 100}))


def test_weighted_judge_through_the_hooked_server_equals_a_local_forward(servers, tiny):
    """judge_batch with score=weighted: the server's next-token logits after the judge prompt, the
    number tokens found through its own tokenizer, equal the score from a local forward pass."""
    from jobs.polylogue.catalog import load_trait
    from jobs.polylogue.judge import judge_batch, number_tokens, weighted_score

    hooked, _ = servers
    numbers = number_tokens(hooked)
    tok = tiny.tokenizer
    digits = {tok(str(n), add_special_tokens=False)["input_ids"][0]: n for n in range(10)}
    assert numbers == digits  # the byte tokenizer writes 0-9 as one token, 10-100 and " n" as several
    trait = "confident"
    batch = pd.DataFrame([{"trait": trait, "question": "What is 2 + 2?", "response": r}
                          for r in ("It is 4.", "Four, obviously.")])
    out = judge_batch(batch, judge=hooked, max_tokens=4, coherence=False, numbers=numbers, min_mass=0.0)
    for row in out.itertuples():
        text = load_trait(trait).eval_prompt.format(question=row.question, answer=row.response)
        ids = encode_request(tok, GenerationRequest(messages=[{"role": "user", "content": text}]))
        with torch.no_grad():
            logits = tiny.model(torch.tensor([ids])).logits[0, -1].float().numpy()
        assert row.trait_score == pytest.approx(weighted_score(logits, numbers, 0.0), rel=1e-4)
        assert 0.0 <= row.trait_score <= 9.0


# ---- step 2: the polylogue -----------------------------------------------------------------------------
def test_polylogue_equals_cosines_computed_from_output_hidden_states(servers, tiny):
    hooked, generator = servers
    qs = questions(4)
    rng = np.random.default_rng(0)
    layers, traits = [1, 2], ["a", "b"]
    vectors = {layer: rng.standard_normal((2, D)) for layer in layers}
    frame = run_series(qs, generator=generator, hooked=hooked, layers=layers, vectors=vectors,
                       random_dirs=random_directions(rng, 2, 2, D),
                       section=PolylogueSection(max_tokens=40, temperature=1.0, batch_size=2), seed=0)
    table = long_table(frame, traits, layers, "m")
    assert len(table) == frame.n_tokens.sum() * len(layers) * len(traits) > 0
    tok = tiny.tokenizer
    for row in frame.itertuples():
        prompt = encode_request(tok, GenerationRequest(
            messages=[{"role": "user", "content": question_prompt(qs[row.position])}]))
        resp = [int(t) for t in row.response_ids]
        assert tok.decode(resp, skip_special_tokens=True) == row.text
        assert row.correct == (extract_answer(row.text, 4) == qs[row.position]["answer"])
        with torch.no_grad():
            hs = tiny.model(torch.tensor([prompt + resp]), output_hidden_states=True).hidden_states
        paragraphs = [paragraph_index(tok.decode(resp[: j + 1], skip_special_tokens=True)) for j in range(len(resp))]
        for layer in layers:
            h = hs[layer + 1][0, len(prompt):].double().numpy()  # response tokens at blocks.{layer}.resid_post
            v = vectors[layer]
            proj = h @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
            want_cos = proj / np.linalg.norm(h, axis=1, keepdims=True)
            got = table[(table.question_id == row.question_id) & (table.layer == layer)].sort_values(
                ["token_index", "trait"])
            np.testing.assert_allclose(got.cosine.to_numpy().reshape(-1, 2), want_cos, atol=1e-4)
            np.testing.assert_allclose(got.projection.to_numpy().reshape(-1, 2), proj, atol=1e-5)
            assert got.paragraph.to_numpy()[::2].tolist() == paragraphs


# ---- step 3: probes ------------------------------------------------------------------------------------
def synthetic_polylogue(n, k, planted, signal, draws, rng):
    """Responses whose correctness shifts trait ``planted``'s alignment by ``signal`` (others: noise)."""
    y = rng.random(n) < 0.5
    rows = []
    for i in range(n):
        t = int(rng.integers(20, 60))
        para = np.sort(rng.integers(0, 3, size=t))
        series = rng.normal(0.0, 0.3, size=(t, k))
        series[:, planted] += signal * y[i]
        rand = rng.normal(0.0, 0.3, size=(draws, t, k))
        rows.append({"cos_0": series.ravel().tolist(), "proj_0": series.ravel().tolist(),
                     "rcos_0": rand.ravel().tolist(),
                     "rproj_0": rand.ravel().tolist(), "mean_0": rng.normal(size=64).tolist(),
                     "paragraph": para.tolist(),
                     "n_tokens": t, "n_paragraphs": int(para.max()) + 1, "correct": bool(y[i])})
    return pd.DataFrame(rows)


def test_probes_beat_chance_on_a_planted_trait_and_not_on_shuffled_labels():
    traits = ["a", "b", "c"]
    frame = synthetic_polylogue(160, 3, planted=1, signal=0.1, draws=3, rng=np.random.default_rng(0))
    table, coef = evaluate(frame, traits, [0], ProbeSection(window=8, paragraphs=2, folds=5), seed=0, draws=3)
    auroc = table.set_index("feature_set")["auroc"]
    assert auroc["polylogue"] > 0.85 and auroc["trait:b"] > 0.85
    assert auroc["trait:a"] < 0.7 and auroc["trait:c"] < 0.7
    for control in ("polylogue (shuffled labels)", "random directions", "pca(mean activation)"):
        assert 0.3 < auroc[control] < 0.7, control
    dims = table.set_index("feature_set")["dim"]
    assert dims["polylogue"] == dims["random directions"] == dims["pca(mean activation)"] == 3 * len(feature_names(2))
    assert coef.iloc[0]["trait"] == "b"  # the largest coefficient sits on the planted trait


def test_summary_features_by_hand():
    f = dict(zip(feature_names(3), summary(np.array([1.0, 2, 3, 4]), np.array([0, 0, 1, 1]), window=2, n_paragraphs=3),
                 strict=True))
    assert (f["mean"], f["min"], f["max"], f["first"], f["last"]) == (2.5, 1.0, 4.0, 1.5, 3.5)
    assert f["slope"] == pytest.approx(3.0) and f["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert (f["para0"], f["para1"], f["last_para"]) == (1.5, 3.5, 3.5) and np.isnan(f["para2"])


# ---- step 4: paragraph-conditioned steering ----------------------------------------------------------------
def test_stage_steering_changes_hidden_states_only_inside_the_chosen_paragraph(servers, tiny):
    hooked, _ = servers
    tok = tiny.tokenizer
    prompt = encode_request(tok, GenerationRequest(messages=[{"role": "user", "content": "What is 2 + 3?"}]))
    resp = tok("We add two and three.\n\nFive is the sum.\n\nThe answer is (B).", add_special_tokens=False)["input_ids"]
    labels = hooked.paragraphs([resp])[0]
    assert labels == [paragraph_index(tok.decode(resp[: j + 1])) for j in range(len(resp))]
    assert sorted(set(labels)) == [0, 1, 2]
    v = np.random.default_rng(1).standard_normal(D)
    at, down = "blocks.1.resid_post", "blocks.3.resid_post"
    caps = [{"type": "capture", "point": at, "name": "at"}, {"type": "capture", "point": down, "name": "down"}]
    request = {"token_ids": prompt + resp, "prompt_length": len(prompt)}
    plain, steered, unreached = hooked.forward([
        {**request, "interventions": caps},
        {**request, "interventions": [steering.steer_spec(v, 1, stage=1, alpha=3.0), *caps]},
        {**request, "interventions": [steering.steer_spec(v, 1, stage=5, alpha=3.0), *caps]},
    ])
    inside = np.zeros(len(prompt) + len(resp), dtype=bool)
    inside[len(prompt):] = np.asarray(labels) == 1
    diff = steered.captures["at"] - plain.captures["at"]
    np.testing.assert_allclose(diff[inside], np.tile(3.0 * v, (inside.sum(), 1)), atol=1e-5)
    np.testing.assert_allclose(diff[~inside], 0.0, atol=1e-6)  # prompt, paragraph 0 and paragraph 2
    first = len(prompt) + labels.index(1)
    later = steered.captures["down"] - plain.captures["down"]
    np.testing.assert_allclose(later[:first], 0.0, atol=1e-6)  # causal: nothing before the paragraph moves
    assert np.abs(later[first:]).max() > 1e-3
    for key in ("at", "down"):  # a paragraph the response never reaches: nothing changes
        np.testing.assert_allclose(unreached.captures[key], plain.captures[key], atol=1e-6)


def test_stage_steering_during_generation_acts_from_its_paragraph_on(servers):
    hooked, _ = servers
    rows = [{**s, **q, "position": i} for s in [{"setting": 0, "trait": "none", "stage": -1, "alpha": 0.0},
                                               {"setting": 1, "trait": "t", "stage": 0, "alpha": 8.0},
                                               {"setting": 2, "trait": "t", "stage": 5, "alpha": 8.0}]
            for i, q in enumerate(questions(3))]
    v = np.random.default_rng(2).standard_normal(D)
    out = steering.steering_batch(pd.DataFrame(rows), hooked=hooked, vectors={"t": v / np.linalg.norm(v)}, layer=1,
                                  params={"temperature": 1.0, "max_tokens": 16}, seed=0)
    texts = out.pivot(index="position", columns="setting", values="text")
    assert (texts[2] == texts[0]).all()  # paragraph 5 is never reached in 16 tokens: same seeds, same text
    assert (texts[1] != texts[0]).any()  # steering the first paragraph changes what is generated
    assert not out[out.setting == 2].reached.any() and out[out.setting == 1].reached.all()


# ---- data and bad input ---------------------------------------------------------------------------------
def test_answer_extraction_follows_mmlu_pro():
    assert extract_answer("so the answer is (C). Also the answer is (D)") == "C"
    assert extract_answer("Answer: B\nmore text") == "B"
    assert extract_answer("I pick A over B") == "B"
    assert extract_answer("the answer is (H)", n_options=4) is None  # not an option of this question
    assert extract_answer("no letters here") is None


def test_malformed_dataset_rows_are_one_clear_error(tmp_path, ray_local):
    good = synthetic_mmlu_pro(n=3, seed=0, n_options=4)
    for bad, field in ((dict(good[0], answer="K"), "answer"), (dict(good[0], options=["only one"]), "options"),
                       (dict(good[0], question=""), "question"),
                       (dict(good[0], answer_index=3, answer="A"), "answer_index")):
        with pytest.raises(ExplabError, match=f"field '{field}'"):
            validate_row(bad, 7)
    path = tmp_path / "rows.parquet"
    pd.DataFrame([*good, dict(good[1], question_id=99, answer="Z")]).to_parquet(path)

    class Ctx:
        seed = 0

        def dataset(self, spec, **kwargs):
            return load_dataset(spec, seed=0, **kwargs)

    with pytest.raises(ExplabError, match=r"question_id=99.*field 'answer'"):
        load_questions(Ctx(), f"parquet:{path}", "test", 10, None, {})


def test_bad_config_is_one_clear_error(tmp_path, ray_local):
    job = get_job("polylogue")
    tiny_path = job.config_path("tiny")
    with pytest.raises(ConfigError, match="unknown trait 'bogus'.*known traits are"):
        load_config(job.config, tiny_path, ["persona.traits=[confident, bogus]"])
    with pytest.raises(ConfigError, match="steering.traits"):
        load_config(job.config, tiny_path, ["steering.traits=[optimistic]"])
    with pytest.raises(ConfigError, match="alpha"):
        load_config(job.config, tiny_path, ["steering.alpha=0"])
    data = yaml.safe_load(tiny_path.read_text())
    data["models"][0]["layers"] = [1, 7]
    data["data"]["n_questions"] = 4
    with pytest.raises(ConfigError, match=r"models.0.layers: layer 7 is out of range .* 4 blocks"):
        execute(job, validate(job.config, data), tmp_path)


# ---- the job end to end ---------------------------------------------------------------------------------
def test_tiny_run_writes_every_table_and_plot(tmp_path, ray_local):
    job = get_job("polylogue")
    config = load_config(job.config, job.config_path("tiny"))
    run_dir, result = execute(job, config, tmp_path)
    traits, layers = config.persona.traits, config.models[0].layers
    poly = pd.read_parquet(run_dir / "tables" / "polylogue.parquet")
    assert {"response_id", "token_index", "trait", "cosine", "projection", "paragraph"} <= set(poly.columns)
    responses = pd.read_parquet(run_dir / "tables" / "responses.parquet")
    assert len(responses) == config.data.n_questions
    assert len(poly) == responses.n_tokens.sum() * len(traits) * len(layers)
    assert poly.cosine.between(-1, 1).all() and set(poly.trait) == set(traits)
    probe = pd.read_parquet(run_dir / "tables" / "probe.parquet")
    assert {"polylogue", "pca(mean activation)", "random directions", "length"} <= set(probe.feature_set)
    assert result["auroc_polylogue"] == pytest.approx(
        probe.query("layer == 1 and feature_set == 'polylogue'").auroc.item())
    steer = pd.read_parquet(run_dir / "tables" / "steering.parquet")
    assert len(steer) == 1 + len(config.steering.traits) * len(config.steering.stages) * len(config.steering.alphas)
    assert steer.loc[steer.setting == 0, "delta"].item() == 0.0
    unreached = steer[(steer.setting > 0) & (steer.reached == 0.0)]
    assert (unreached.changed == 0.0).all()  # steering a paragraph no response reached changes nothing
    vectors = load_file(str(run_dir / "artifacts" / "persona_vectors.safetensors"))
    assert sorted(vectors) == sorted(f"tiny-llama/{t}" for t in traits)
    assert all(v.shape == (N_LAYERS, D) for v in vectors.values())
    for plot in ("polylogue_examples", "probe_auroc", "steering_accuracy"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    for table in ("persona_responses", "probe_coefficients", "steering_responses"):
        assert (run_dir / "tables" / f"{table}.parquet").is_file()
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["steering_mean_delta"])


def test_its_sweep_runs_under_explab_sweep(monkeypatch, capsys, tmp_path, ray_local):
    """The shipped sweep (alpha x layer, steering only) on the tiny config: trials complete and each
    steers with its own parameters."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "polylogue" / "sweep.yaml").read_text())
    overrides = [o for o in shipped["base"]["overrides"] if not o.startswith("models=")]
    spec = {**shipped, "num_samples": 2, "max_concurrent": 1,
            "base": {"config": "tiny", "overrides": [*overrides, "steering.stages=[0]", "data.n_questions=4",
                                                     "steering.n_questions=4", "steering.max_tokens=12"]},
            "space": {**shipped["space"], "steering.layer": {"type": "int", "low": 0, "high": N_LAYERS - 1}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(sys, "argv", ["explab", "sweep", str(path), "--runs-dir", str(tmp_path / "runs"),
                                      "--address", ray_local.address])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr().out
    assert info.value.code in (0, None), out
    sweep_dir = Path(out.strip().splitlines()[-1])
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert (trials["status"] == "completed").all() and len(trials) == 2, trials.get("error")
    assert trials["metric.steering_mean_delta"].notna().all()
    for row in trials.to_dict("records"):
        steer = pd.read_parquet(sweep_dir / row["run_dir"] / "tables" / "steering.parquet")
        assert (steer.layer == row["param.steering.layer"]).all()
        steered = steer[steer.setting > 0]
        assert steered.alpha.tolist() == [pytest.approx(row["param.steering.alpha"])]
        assert steered.delta.item() == pytest.approx(row["metric.steering_mean_delta"])
