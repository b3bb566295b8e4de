"""EZPC: the concept bottleneck reproduces CLIP's zero-shot predictions when the vocabulary spans the
classes, stays at the concepts without the KL term, keeps unit-norm columns, and its explanations
are faithful (deleting the top concepts changes predictions more than deleting random ones)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.ezpc import concepts as vocab
from jobs.ezpc import explain, metrics
from jobs.ezpc.model import ezpc_loss, train_projection


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def world(seed=0, *, d=64, n_classes=10, k=40, noise=1.5, skew=3.0):
    """Synthetic CLIP-like embeddings: class embeddings T sharing a common direction; concepts that
    are sparse positive mixtures of class embeddings (so they span them when k ≥ classes), with some
    classes over-represented (so A = Cᵀ distorts the geometry); images = noisy class embeddings."""
    rng = np.random.default_rng(seed)
    shared = unit(rng.normal(size=d))
    T = unit(rng.normal(size=(n_classes, d)) + 1.2 * shared)
    weight = np.exp(skew * rng.random(n_classes))
    mix = np.zeros((k, n_classes))
    for j in range(k):
        cls = rng.choice(n_classes, size=min(2, n_classes), replace=False, p=weight / weight.sum())
        mix[j, cls] = rng.random(len(cls)) + 0.2
    C = unit(mix @ T + 0.05 * rng.normal(size=(k, d)))

    def images(m, s):
        r = np.random.default_rng(s)
        y = r.integers(0, n_classes, m)
        return unit(T[y] + noise * r.normal(size=(m, d)) / np.sqrt(d)).astype(np.float32), y

    return C.astype(np.float32), T.astype(np.float32), images


@pytest.fixture(scope="module")
def spanning():
    C, T, images = world()
    V, _ = images(300, 1)
    V_test, y_test = images(300, 2)
    result = train_projection(C, V, T, lam=1.0, epochs=800, threads=1)
    return {"C": C, "T": T, "V": V, "V_test": V_test, "y_test": y_test, "result": result}


def test_the_bottleneck_agrees_with_clip_where_the_vocabulary_spans_the_classes(spanning):
    C, T, V_test, A = spanning["C"], spanning["T"], spanning["V_test"], spanning["result"].A
    clip = V_test @ T.T
    init = metrics.agreement(clip, explain.logits(V_test, C.T, T))
    trained = metrics.agreement(clip, explain.logits(V_test, A, T))
    assert trained > 0.95, (init, trained)  # on held-out images
    assert init < 0.85  # the untrained bottleneck A = Cᵀ does not: the KL term did it
    assert metrics.accuracy(explain.logits(V_test, A, T), spanning["y_test"]) > 0.9 * metrics.accuracy(
        clip, spanning["y_test"])


def test_a_vocabulary_too_small_to_span_the_classes_cannot_agree():
    C, T, images = world(k=5)  # rank(A Aᵀ) ≤ 5 < 10 classes
    V, _ = images(300, 1)
    V_test, _ = images(300, 2)
    A = train_projection(C, V, T, lam=1.0, epochs=400, threads=1).A
    assert metrics.agreement(V_test @ T.T, explain.logits(V_test, A, T)) < 0.9


def test_lambda_zero_keeps_A_at_the_concepts(spanning):
    C, T, V = spanning["C"], spanning["T"], spanning["V"]
    result = train_projection(C, V, T, lam=0.0, epochs=200, threads=1)
    np.testing.assert_allclose(result.A, C.T, atol=1e-6)
    assert max(result.history["matching"]) < 1e-10
    # ... while with λ > 0 the same data moves it
    assert metrics.column_alignment(spanning["result"].A, C).mean() < 0.99


def test_columns_stay_unit_norm_and_the_best_A_is_kept(spanning):
    C, T, V, result = spanning["C"], spanning["T"], spanning["V"], spanning["result"]
    np.testing.assert_allclose(np.linalg.norm(result.A, axis=0), 1.0, atol=1e-5)
    assert result.best["total"] == min(result.history["total"])
    tensors = [torch.as_tensor(x) for x in (result.A, C, V, T)]
    total = ezpc_loss(*tensors, lam=1.0)[2].item()  # the kept A has exactly the best epoch's loss
    assert total == pytest.approx(result.best["total"], rel=1e-4)
    minibatch = train_projection(C, V, T, lam=1.0, epochs=30, batch_size=64, threads=1)
    np.testing.assert_allclose(np.linalg.norm(minibatch.A, axis=0), 1.0, atol=1e-5)


def test_deleting_the_top_concepts_changes_predictions_more_than_random_ones(spanning):
    A, T, V_test = spanning["result"].A, spanning["T"], spanning["V_test"]
    act, prof = explain.activations(V_test, A), explain.profiles(T, A)
    rows = metrics.faithfulness(act, prof, [1, 3, 5], np.random.default_rng(0))
    for row in rows:
        assert row["topk_flip"] > row["random_flip"] + 0.1, row
        assert row["topk_drop"] > 2 * row["random_drop"], row
    assert [r["topk_flip"] for r in rows] == sorted(r["topk_flip"] for r in rows)


def test_explanations_are_the_parts_of_the_predicted_logit(spanning):
    A, T, V_test = spanning["result"].A, spanning["T"], spanning["V_test"][:20]
    k = A.shape[1]
    names = [f"c{j}" for j in range(k)]
    table = explain.explain(V_test, A, T, names, [f"class {i}" for i in range(len(T))], k=k)
    z = explain.logits(V_test, A, T)
    sums = table.groupby("image")["contribution"].sum().to_numpy()
    np.testing.assert_allclose(sums, z.max(axis=1), rtol=1e-4, atol=1e-5)  # all k parts add up to the logit
    assert (table.groupby("image")["predicted"].first().to_numpy() == z.argmax(axis=1)).all()
    top = explain.explain(V_test, A, T, names, [f"class {i}" for i in range(len(T))], k=3)
    for _, part in top.groupby("image"):
        assert list(part["rank"]) == [0, 1, 2] and part["contribution"].is_monotonic_decreasing


def test_transfer_keeps_clip_on_new_images_of_spanned_classes_and_not_on_unspanned_ones(spanning):
    T, A = spanning["T"], spanning["result"].A
    _, _, images = world()
    V_new, y_new = images(300, 3)  # another domain of the same classes: new images
    rng = np.random.default_rng(7)
    T_far = unit(rng.normal(size=(10, T.shape[1]))).astype(np.float32)  # classes the concepts do not span
    y_far = rng.integers(0, 10, 300)
    V_far = unit(T_far[y_far] + 1.5 * rng.normal(size=(300, T.shape[1])) / 8).astype(np.float32)
    tests = {"source": (spanning["V_test"], spanning["y_test"], T), "new images": (V_new, y_new, T),
             "far classes": (V_far, y_far, T_far)}
    rows = {r["target"]: r for r in metrics.transfer({"source": A}, tests)}
    assert rows["source"]["in_domain"] and not rows["new images"]["in_domain"]
    in_domain = metrics.zero_shot(spanning["V_test"] @ T.T, explain.logits(spanning["V_test"], A, T),
                                  spanning["y_test"])
    assert rows["source"]["agreement"] == in_domain["agreement"]  # the diagonal is the in-domain evaluation
    assert rows["new images"]["agreement"] > 0.95
    assert rows["far classes"]["agreement"] < 0.8 and rows["far classes"]["acc_clip"] > 0.9  # CLIP itself can


def test_concept_files_class_names_and_llm_answers():
    shapes = vocab.from_files(["shapes"])
    assert len(shapes) >= 40 and shapes == sorted(shapes, key=str.lower) and not any("#" in c for c in shapes)
    assert len(set(c.lower() for c in shapes)) == len(shapes)
    assert vocab.subset(shapes, 10, 1) == vocab.subset(shapes, 10, 1) != vocab.subset(shapes, 10, 2)
    assert len(vocab.subset(shapes, 10, 1)) == 10 and vocab.subset(shapes, None, 1) == shapes
    answer = ("Here are some features:\n1. Long curved beak\n- webbed feet\n"
              "* a very long description that goes on and on\n\nWings")
    assert vocab.parse_listing(answer, max_chars=30, max_words=5) == ["long curved beak", "webbed feet", "wings"]
    assert vocab.clean_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert vocab.clean_class_name("/a/apartment_building/outdoor") == "apartment building outdoor"
    assert vocab.clean_class_name("tench, Tinca tinca") == "tench"


class _FakeGenerator:
    """Stands in for the Generator handle: answers each prompt from a table."""

    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def generate(self, requests):
        from types import SimpleNamespace

        from explab.servers.handle import as_requests

        as_requests(requests)  # what the real handle sends: valid GenerationRequests
        self.requests += requests
        out = []
        for r in requests:
            text = self.answers[r["messages"][0]["content"]]
            out.append(SimpleNamespace(completions=[SimpleNamespace(text=text)]))
        return out


def test_llm_vocabulary_asks_every_prompt_for_every_class_and_drops_class_names():
    prompts = ["features of {cls}?", "things around {cls}?"]
    answers = {"features of cat?": "whiskers\nfur\ncat", "things around cat?": "a sofa, a ball, a mouse",
               "features of dog?": "fur\nfloppy ears", "things around dog?": "a ball"}
    fake = _FakeGenerator(answers)
    rows = vocab.generate(fake, ["cat", "dog"], prompts, max_tokens=32, seed=0, max_chars=30, max_words=4,
                          per_prompt=None)
    assert len(fake.requests) == 4 and all(r["params"]["temperature"] == 0.0 for r in fake.requests)
    found = vocab.finalize([r["concept"] for r in rows])
    assert found == ["a ball", "a mouse", "a sofa", "floppy ears", "fur", "whiskers"]  # "cat" itself dropped


def test_llm_vocabularies_are_cached_but_empty_answers_are_not(tmp_path):
    calls = []

    def make(rows):
        calls.append(1)
        return rows

    rows = [{"concept": "fur", "cls": "cat", "prompt": "0"}]
    assert vocab.cached_generation(tmp_path, "k", lambda: make(rows)) == rows
    assert vocab.cached_generation(tmp_path, "k", lambda: make([])) == rows and len(calls) == 1
    assert vocab.cached_generation(tmp_path, "empty", lambda: make([])) == []
    assert vocab.cached_generation(tmp_path, "empty", lambda: make(rows)) == rows and len(calls) == 3


def test_bad_concept_file_is_one_clear_line_and_no_run(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbones: tiny:clip\ndatasets:\n  - {name: s, spec: 'synthetic:ezpc_shapes', concepts: [nope]}\n")
    code, _, err = cli("run", "ezpc", "-c", str(bad), "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "concept file 'nope' not found" in lines[0], err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def ezpc_cache(tmp_path_factory):
    """One embedding cache for this module's runs of the tiny config (the first computes, later ones reuse)."""
    return tmp_path_factory.mktemp("ezpc-cache")


def test_tiny_config_runs_end_to_end_through_the_cli(monkeypatch, tmp_path, ray_local, cli, ezpc_cache):
    monkeypatch.setenv("EXPLAB_CACHE", str(ezpc_cache))
    code, out, err = cli("run", "ezpc", "-c", "tiny", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    for table in ("results", "faithfulness", "explanations", "losses", "concepts", "vocabulary"):
        assert (run_dir / "tables" / f"{table}.parquet").is_file(), table
    for plot in ("accuracy_retained", "faithfulness", "loss__shapes__tiny-clip", "explanations__shapes__tiny-clip",
                 "regions__shapes__tiny-clip"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    assert (run_dir / "artifacts" / "A__shapes__tiny-clip.safetensors").is_file()
    results = pd.read_parquet(run_dir / "tables" / "results.parquet").iloc[0]
    assert results["col_norm_max_dev"] < 1e-5 and results["n_concepts"] == len(vocab.from_files(["shapes"]))
    # the trained bottleneck follows the (random) tiny CLIP far better than A = Cᵀ does, and its
    # explanations are faithful
    assert results["agreement"] > 0.8 and results["agreement"] > results["agreement_init"] + 0.3
    assert results["faith_topk_flip"] > results["faith_random_flip"]
    explanations = pd.read_parquet(run_dir / "tables" / "explanations.parquet")
    assert explanations["image"].nunique() == 48 and set(explanations["rank"]) == set(range(5))
    assert (run_dir / "metrics.parquet").is_file()
    vocabulary = pd.read_parquet(run_dir / "tables" / "vocabulary.parquet")
    assert (vocabulary["dropped"] == "").sum() == results["n_concepts"]  # the tiny config filters nothing
    assert results["logit_scale"] == 100.0 and results["logit_bias"] == 0.0


def test_two_datasets_give_a_transfer_table_and_plot(monkeypatch, tmp_path, ray_local, ezpc_cache):
    from explab.config import load_config
    from explab.job import get_job
    from explab.runs import execute

    monkeypatch.setenv("EXPLAB_CACHE", str(ezpc_cache))  # "shapes" is the tiny config's: its embeddings reused
    job = get_job("ezpc")
    config = load_config(job.config, job.config_path("tiny"), ["train.epochs=300", "eval.explain_images=0",
                                       "eval.explanations_table=8",
                                       "datasets=[{name: shapes, spec: 'synthetic:ezpc_shapes', concepts: [shapes], "
                                       "kwargs: {n: 240}}, {name: bright, spec: 'synthetic:ezpc_shapes', "
                                       "concepts: [shapes], kwargs: {n: 120, colours: [purple, orange, white], "
                                       "shapes: [circle, cross]}}]"])
    run_dir, result = execute(job, config, runs_dir=tmp_path / "runs")
    transfer = pd.read_parquet(run_dir / "tables" / "transfer.parquet")
    assert len(transfer) == 4 and set(transfer["source"]) == set(transfer["target"]) == {"shapes", "bright"}
    results = pd.read_parquet(run_dir / "tables" / "results.parquet").set_index("dataset")
    for _, row in transfer[transfer["in_domain"]].iterrows():  # the diagonal is each dataset's own evaluation
        assert row["acc_ezpc"] == pytest.approx(results.loc[row["target"], "acc_ezpc"])
    cross = transfer[~transfer["in_domain"]]
    assert result["transfer_agreement"] == pytest.approx(cross["agreement"].mean())
    assert (run_dir / "plots" / "transfer.png").stat().st_size > 5000
    # the authors' protocol: a fresh A per ordered pair, generalized zero-shot over both datasets' classes
    gzsl = pd.read_parquet(run_dir / "tables" / "transfer_gzsl.parquet")
    assert sorted(zip(gzsl["source"], gzsl["target"], strict=True)) == [("bright", "shapes"), ("shapes", "bright")]
    assert (gzsl["n_seen_classes"] + gzsl["n_unseen_classes"] == 18).all()
    both = len(vocab.from_files(["shapes"]))  # both datasets use the same file: the union is that file
    assert (gzsl["n_concepts"] == both).all()
    hm = 2 * gzsl["acc_ezpc_seen_gzsl"] * gzsl["acc_ezpc_unseen_gzsl"] / (
        gzsl["acc_ezpc_seen_gzsl"] + gzsl["acc_ezpc_unseen_gzsl"])
    np.testing.assert_allclose(gzsl["hm_ezpc"], hm.fillna(0.0))
    assert result["transfer_hm_ezpc"] == pytest.approx(gzsl["hm_ezpc"].mean())


def test_the_shipped_sweep_runs_under_explab_sweep(ray_local, tmp_path, ezpc_cache):
    import yaml

    from explab.sweep import run_sweep

    spec = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "ezpc" / "sweep.yaml").read_text())
    spec["num_samples"] = 2
    # the trials (Ray workers, which do not see this process's EXPLAB_CACHE) reuse the end-to-end run's embeddings
    spec["base"]["overrides"] = [*spec["base"]["overrides"], "train.epochs=300", "eval.explanations_table=8",
                                 f"cache_dir={ezpc_cache / 'embeddings'}"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep_dir = run_sweep(path, tmp_path / "runs")
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials
    for column in ("metric.agreement", "metric.cos_A_C"):
        assert trials[column].between(0.0, 1.0).all()
    assert set(trials["param.concepts.size"]) <= set(range(12, 53))


# ---- the loss, the initialisation and the logit scale, each against a hand computation ------------
def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_the_loss_is_kl_from_clip_to_the_bottleneck_at_the_logit_scale(scale):
    """reconstruction = mean over images of KL(P_clip ‖ P_ezpc), both softmaxes at ``logit_scale``:
    a reversed KL, or a scale applied to one side only or ignored, gives another number."""
    C, T, images = world(3, k=12)
    V, _ = images(16, 4)
    rng = np.random.default_rng(5)
    A = unit((C.T + 0.3 * rng.normal(size=C.T.shape)).T).T.astype(np.float32)  # unit columns, off Cᵀ
    lp = _np_log_softmax(scale * (V @ T.T).astype(np.float64))
    lq = _np_log_softmax(scale * (V @ A @ A.T @ T.T).astype(np.float64))
    forward = (np.exp(lp) * (lp - lq)).sum(axis=1).mean()
    reverse = (np.exp(lq) * (lq - lp)).sum(axis=1).mean()
    matching, recon, total = ezpc_loss(torch.tensor(A), torch.tensor(C), torch.tensor(V), torch.tensor(T), 0.5, scale)
    assert float(recon) == pytest.approx(forward, rel=1e-4)
    assert abs(forward - reverse) > 0.05 * forward  # the direction matters on this example
    assert float(matching) == pytest.approx(((A - C.T) ** 2).mean(), rel=1e-5)
    assert float(total) == pytest.approx(float(matching) + 0.5 * forward, rel=1e-4)
    other = 100.0 if scale == 1.0 else 1.0
    _, recon_other, _ = ezpc_loss(torch.tensor(A), torch.tensor(C), torch.tensor(V), torch.tensor(T), 0.5, other)
    assert abs(float(recon_other) - forward) > 0.5 * forward  # the scale is applied, to both sides
    assert metrics.kl(V @ T.T, V @ A @ A.T @ T.T, scale) == pytest.approx(forward, rel=1e-4)


def test_training_starts_at_the_concepts_transposed():
    """A is initialised to Cᵀ: with lr 0 it stays there, and the first epoch's loss is λ·KL at Cᵀ."""
    C, T, images = world(1)
    V, _ = images(50, 2)
    result = train_projection(C, V, T, lam=2.0, lr=0.0, epochs=2, threads=1, logit_scale=10.0)
    assert np.allclose(result.A, C.T, atol=1e-6)
    lp = _np_log_softmax(10.0 * (V @ T.T).astype(np.float64))
    lq = _np_log_softmax(10.0 * (V @ C.T @ C @ T.T).astype(np.float64))
    kl0 = (np.exp(lp) * (lp - lq)).sum(axis=1).mean()
    assert result.history["matching"][0] == pytest.approx(0.0, abs=1e-10)
    assert result.history["total"][0] == pytest.approx(2.0 * kl0, rel=1e-4)


def test_kendall_tau_beside_spearman_by_hand():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [2.0, 1.0, 3.0, 4.0]])
    # τ per row: 1, −1, (5 concordant − 1 discordant) / 6; Spearman: 1, −1, 1 − 6·2/(4·15) = 0.8
    assert metrics.kendall(a, b) == pytest.approx((1 - 1 + 4 / 6) / 3)
    assert metrics.spearman(a, b) == pytest.approx((1 - 1 + 0.8) / 3)
    assert "kendall" in metrics.zero_shot(a, b, np.array([3, 3, 3]))


def test_tiny_config_at_the_papers_logit_scale(monkeypatch, tmp_path, ray_local, cli, ezpc_cache):
    """The tiny config at the authors' scale (raw cosines, 1) instead of its 100: a random tiny CLIP's
    class cosines differ by ~0.01, so the KL term is negligible next to MSE(A, Cᵀ) and A stays at the
    concepts — the bottleneck does not gain the agreement it gains at 100 (the end-to-end test above)."""
    monkeypatch.setenv("EXPLAB_CACHE", str(ezpc_cache))  # the end-to-end test's embeddings, reused
    code, out, err = cli("run", "ezpc", "-c", "tiny", "--runs-dir", str(tmp_path / "runs"),
                         "--set", "train.logit_scale=1.0", "--set", "eval.explain_images=0",
                         "--set", "eval.region_images=0", "--set", "eval.explanations_table=8")
    assert code == 0, err
    results = pd.read_parquet(Path(out.strip().splitlines()[-1]) / "tables" / "results.parquet").iloc[0]
    assert results["col_norm_max_dev"] < 1e-5
    assert results["cos_A_C"] > 0.95 and results["agreement"] < 0.5  # (~0.26 here; > 0.8 at scale 100)
    assert -1.0 <= results["kendall"] <= 1.0 and np.isfinite(results["spearman"])
