"""SOTAlign: the OT pieces are exact, the method beats its baselines on a known shared latent, the job runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.sotalign.align import AlignConfig, pseudo_pairs, train_alignment
from jobs.sotalign.data import SyntheticConfig, make_synthetic
from jobs.sotalign.evaluate import recall_at, retrieval, zero_shot
from jobs.sotalign.ot import gromov_plan, kl_ot, round_to_marginals, sinkhorn
from jobs.sotalign.teacher import fit_teacher

# ---------------------------------------------------------------- optimal transport


def test_sinkhorn_matches_pot_and_meets_the_marginals():
    import ot

    g = torch.Generator().manual_seed(0)
    K = torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.5
    for eps in (0.5, 0.1):
        P, log_p = sinkhorn(K, eps, n_iters=2000, symmetric=True)
        ref = ot.sinkhorn(np.full(7, 1 / 7), np.full(5, 1 / 5), -K.numpy(), eps, numItermax=100000, stopThr=1e-14)
        np.testing.assert_allclose(P.numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(log_p.exp().numpy(), P.numpy())
    # the default: ~100 iterations and the symmetrising half-step, both marginals close, in float32
    P, _ = sinkhorn(K.float(), 0.05, n_iters=100)
    assert torch.allclose(P.sum(1), torch.full((7,), 1 / 7), atol=1e-3)
    assert torch.allclose(P.sum(0), torch.full((5,), 1 / 5), atol=1e-3)
    # a stack of matrices with one epsilon each equals the matrices one by one
    Ks = torch.stack([K, 2 * K])
    Pb, _ = sinkhorn(Ks, torch.tensor([0.1, 0.3], dtype=torch.float64), n_iters=300)
    np.testing.assert_allclose(Pb[1].numpy(), sinkhorn(2 * K, 0.3, n_iters=300)[0].numpy(), atol=1e-12)
    with pytest.raises(ValueError):
        sinkhorn(K, 0.0)


def test_klot_implicit_gradient_matches_finite_differences():
    # at convergence the implicit gradient (P_s - P_t)/eps_s is the exact derivative of the loss
    g = torch.Generator().manual_seed(1)
    K_s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.4
    K_t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.4
    eps_s, eps_t, iters = 0.2, 0.1, 3000

    def loss(K):
        return kl_ot(K, K_t, eps_s, eps_t, iters)

    K = K_s.clone().requires_grad_(True)
    value = loss(K)
    value.backward()
    h = 1e-6
    fd = torch.zeros_like(K_s)
    for i in range(K_s.shape[0]):
        for j in range(K_s.shape[1]):
            e = torch.zeros_like(K_s)
            e[i, j] = h
            fd[i, j] = (loss(K_s + e) - loss(K_s - e)) / (2 * h)
    assert value.item() > 0.05 and fd.abs().max() > 0.1  # a non-trivial case
    np.testing.assert_allclose(K.grad.numpy(), fd.numpy(), atol=1e-7, rtol=1e-6)
    # it is (P_s - P_t)/eps_s, and the loss is a KL: zero (with zero gradient) when the plans agree
    P_s, _ = sinkhorn(K_s, eps_s, iters)
    P_t, _ = sinkhorn(K_t, eps_t, iters)
    np.testing.assert_allclose(K.grad.numpy(), ((P_s - P_t) / eps_s).numpy(), atol=1e-10)
    same = (K_t * eps_s / eps_t).requires_grad_(True)
    zero = loss(same)
    zero.backward()
    assert abs(zero.item()) < 1e-10 and same.grad.abs().max() < 1e-8


def test_klot_gradient_descent_moves_the_student_plan_onto_the_teacher_plan():
    K_t = 10 * torch.eye(5)
    K_s = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    opt = torch.optim.SGD([K_s], lr=0.05)
    first = None
    for _ in range(300):
        opt.zero_grad()
        value = kl_ot(K_s, K_t, 0.1, 0.1)
        value.backward()
        opt.step()
        first = first if first is not None else value.item()
    P_s, _ = sinkhorn(K_s.detach(), 0.1)
    assert value.item() < 0.05 * first and torch.equal(P_s.argmax(1), torch.arange(5))


def test_gromov_wasserstein_recovers_a_planted_isometry():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 3))
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    perm = rng.permutation(12)
    Y = (X @ Q)[perm]  # the "other modality": rotated and shuffled, so only the structure is shared

    def cos(Z):
        Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
        return Z @ Z.T

    plan = gromov_plan(cos(X), cos(Y))
    assert np.allclose(plan.sum(1), 1 / 12) and np.allclose(plan.sum(0), 1 / 12)
    assert (plan.argmax(1) == np.argsort(perm)).all()
    # the entropic variant, started from a rounded (exact-marginal) plan, too
    start = round_to_marginals(np.full((12, 12), 1 / 144) + rng.random((12, 12)) * 1e-3)
    assert np.allclose(start.sum(0), 1 / 12, atol=1e-12)
    plan = gromov_plan(cos(X), cos(Y), epsilon=0.01, G0=start)
    assert (plan.argmax(1) == np.argsort(perm)).all()


# ---------------------------------------------------------------- teacher and evaluation


@pytest.mark.parametrize("kind", ["cca", "ridge", "procrustes"])
def test_teachers_recover_a_linear_relation_from_pairs(kind):
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(600, 8))
    X = Z @ rng.normal(size=(8, 20)) + 0.05 * rng.normal(size=(600, 20))
    Y = Z @ rng.normal(size=(8, 16)) + 0.05 * rng.normal(size=(600, 16))
    teacher = fit_teacher(X[:200], Y[:200], kind, dim=8, reg=0.01)
    r = retrieval(teacher.image(X[200:]), teacher.text(Y[200:]))
    assert r["i2t_r1"] > 0.9 and r["t2i_r1"] > 0.9
    chance = retrieval(teacher.image(X[200:]), teacher.text(Y[200:][rng.permutation(400)]))
    assert chance["r1"] < 0.05
    with pytest.raises(ValueError):
        fit_teacher(X[:10], Y[:9])


def test_recall_and_zero_shot_count_correctly():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.3, 0.2, 0.1]])  # ranks 0, 1, 2
    assert recall_at(sim, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    classes = np.eye(3)
    images = np.array([[1.0, 0.1, 0], [0, 1, 0.2], [0.9, 0, 0.1]])
    assert zero_shot(images, classes, np.array([0, 1, 2])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- the method on a known shared latent

WORLD = SyntheticConfig(latent_dim=4, private_dim=0, noise=0.05, image_dim=32, text_dim=24, nonlinearity=3.0,
                        within_std=1.0, n_pairs_pool=256, n_unpaired=4096, n_test=1000, n_zeroshot=500)
TRAIN = AlignConfig(layer="mlp", hidden=128, dim=32, epochs=12, steps_per_epoch=40, batch_pairs=256,
                    batch_unpaired=64)
N_PAIRS = 128  # few pairs for 32/24-d features; 4096 unpaired images and texts


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    data = make_synthetic(WORLD, seed=0)
    X, Y = data.pairs_x[:N_PAIRS], data.pairs_y[:N_PAIRS]
    teacher = fit_teacher(X, Y, "cca", dim=32, reg=1.0)
    results = {"teacher": retrieval(teacher.image(data.test_x), teacher.text(data.test_y))}
    runs = {"pairs": (TRAIN.model_copy(update={"lam": 0.0}), None),
            "pseudo": (TRAIN.model_copy(update={"unpaired_loss": "pseudo"}), None),
            "full": (TRAIN, None), "full_few_unpaired": (TRAIN, 128)}
    for name, (cfg, n_unpaired) in runs.items():
        model = train_alignment(X, Y, data.unpaired_x[:n_unpaired], data.unpaired_y[:n_unpaired], cfg, teacher)
        results[name] = retrieval(*model.embed(data.test_x, data.test_y))
    return results


def test_full_method_beats_pairs_only_and_the_teacher(world):
    r1 = {name: r["r1"] for name, r in world.items()}
    # (seen: teacher ~0.33-0.36, pairs-only ~0.24-0.25, full ~0.42-0.45 over data and encoder seeds)
    assert r1["full"] > r1["pairs"] + 0.08, r1
    assert r1["full"] > r1["teacher"] + 0.04, r1
    assert world["full"]["i2t_r1"] > world["teacher"]["i2t_r1"] and world["full"]["t2i_r1"] > world["teacher"]["t2i_r1"]


def test_full_method_beats_the_pseudo_labelling_baseline_which_uses_the_unpaired_data(world):
    r1 = {name: r["r1"] for name, r in world.items()}
    # (seen: pairs-only ~0.25, pseudo-pairs ~0.34-0.38, full ~0.42 over data seeds 0 and 1)
    assert r1["pseudo"] > r1["pairs"] + 0.05, r1
    assert r1["full"] > r1["pseudo"] + 0.03, r1


def test_pseudo_pairs_are_the_teachers_mutual_nearest_neighbours():
    K = torch.tensor([[0.9, 0.1, 0.0],
                      [0.8, 0.3, 0.2],   # its nearest text (0) prefers image 0
                      [0.0, 0.2, 0.6],
                      [0.1, 0.7, 0.5]])
    i, j = pseudo_pairs(K)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 0), (2, 2), (3, 1)]
    i, j = pseudo_pairs(K, threshold=0.65)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 0), (3, 1)]


def test_more_unpaired_data_helps(world):
    r1 = {name: r["r1"] for name, r in world.items()}
    assert r1["full"] > r1["full_few_unpaired"] + 0.03, r1  # 4096 vs 128 unpaired of each modality


def test_gromov_targets_train():
    data = make_synthetic(WORLD.model_copy(update={"n_unpaired": 256, "n_test": 100}), seed=0)
    X, Y = data.pairs_x[:N_PAIRS], data.pairs_y[:N_PAIRS]
    teacher = fit_teacher(X, Y, "cca", dim=32, reg=1.0)
    for target in ("fgw", "gw"):
        losses: list[dict] = []
        cfg = TRAIN.model_copy(update={"target": target, "epochs": 2, "steps_per_epoch": 3, "batch_unpaired": 24})
        train_alignment(X, Y, data.unpaired_x, data.unpaired_y, cfg, teacher,
                        on_epoch=lambda e, m, lo, out=losses: out.append(lo))
        assert len(losses) == 2 and all(np.isfinite(lo["klot"]) and lo["klot"] > 0 for lo in losses), (target, losses)


# ---------------------------------------------------------------- the job


def test_tiny_config_runs_end_to_end_through_explab_run(tmp_path, ray_local, cli):
    # the tiny config with a shorter schedule (the full schedule is what the method tests above train)
    code, out, err = cli("run", "sotalign", "-c", "tiny", "--runs-dir", str(tmp_path),
                         "--set", "n_pairs=[64, 128]", "--set", "align.epochs=2", "--set", "align.steps_per_epoch=20")
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    results = pd.read_parquet(run_dir / "tables" / "results.parquet")
    assert set(results["method"]) == {"teacher", "pairs", "pseudo", "full"}
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zeroshot"} <= set(results.columns)
    assert (results["i2t_r1"] <= results["i2t_r5"]).all() and (results["i2t_r5"] <= results["i2t_r10"]).all()
    assert sorted(set(results["n_pairs"])) == [64, 128]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["r1"] == result["full_r1"] > 0.05  # chance is 1/1000
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert {"r1", "loss", "klot", "epoch"} <= set(metrics.columns) and len(metrics) >= 2
    for name in ("plots/r1_vs_pairs.png", "plots/training.png", "artifacts/full_model.safetensors"):
        assert (run_dir / name).stat().st_size > 500, name


def test_pipeline_config_embeds_through_the_cache(tmp_path, monkeypatch):
    # the job's embedding path with the pipeline run in-process (tests/test_embeddings.py runs it on Ray)
    from explab.config import load_config
    from explab.job import get_job
    from explab.runs import execute

    monkeypatch.setenv("EXPLAB_CACHE", str(tmp_path / "cache"))
    job = get_job("sotalign")
    config = load_config(job.config, job.config_path("tiny_pipeline"),
                         ["n_pairs=[32]", "align.epochs=1", "align.steps_per_epoch=2", "embedding.engine=local"])
    run_dir, result = execute(job, config, tmp_path / "runs")
    entries = list((tmp_path / "cache" / "embeddings").rglob("meta.json"))
    assert len(entries) == 8  # pairs x/y, test x/y, unpaired x, unpaired y, zero-shot images, prompts
    table = pd.read_parquet(run_dir / "tables" / "results.parquet")
    assert set(table["method"]) == {"teacher", "pairs", "full"} and "zeroshot" in table
    assert json.loads((run_dir / "artifacts" / "data.json").read_text())["unpaired_images"] == 128
    before = {p: p.stat().st_mtime_ns for p in entries}
    execute(job, config, tmp_path / "runs")  # every embedding is a cache hit now
    assert {p: p.stat().st_mtime_ns for p in entries} == before


def test_sweep_runs_under_explab_sweep(tmp_path, ray_local, cli):
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "sotalign" / "sweep.yaml").read_text())
    spec["num_samples"] = 3  # the same space and metric, fewer and shorter trials
    spec["base"]["overrides"] += ["align.epochs=2", "align.steps_per_epoch=5", "synthetic.n_unpaired=512",
                                  "synthetic.n_test=200"]
    spec["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = cli("sweep", str(tmp_path / "sweep.yaml"), "--runs-dir",
                         str(tmp_path / "runs"))
    assert code in (0, None), err
    sweep_dir = Path(out.strip().splitlines()[-1])
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) <= {"completed", "stopped_early"}
    assert {"param.align.eps_s", "param.align.lam", "param.n_pairs", "param.teacher.kind"} <= set(trials.columns)
    assert trials["metric.r1"].notna().all() and (trials["metric.r1"] > 0).all()


def test_bad_configs_are_one_line_errors(tmp_path, ray_local, cli):
    for args, needle in [
        (["--set", "n_pairs=[1]"], "field 'n_pairs'"),
        (["--set", "teacher.kind=pca"], "field 'teacher.kind'"),
        (["--set", "align.eps_s=0"], "field 'align.eps_s'"),
        (["--set", "n_pairs=[100000]"], "pool holds"),
    ]:
        code, _, err = cli("run", "sotalign", "-c", "tiny", "--runs-dir", str(tmp_path), *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code != 0 and needle in lines[-1], (args, err)


def test_retrieval_with_several_captions_per_image_counts_each_as_correct():
    from jobs.sotalign.evaluate import grouped_recall, retrieval

    # 3 images (unit axes), 6 captions, two per image; caption 1 of image 0 points at image 1
    img = np.eye(3)
    txt = np.array([[1, 0, 0], [0.2, 0.9, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.1, 0, 1]], dtype=float)
    groups = np.array([0, 0, 1, 1, 2, 2])
    r = retrieval(img, txt, ks=(1, 2), groups=groups)
    # image→text: each image's best own caption ranks first → R@1 = 1 (image 1's best is caption 2)
    assert r["i2t_r1"] == 1.0
    # text→image: caption 1 (of image 0) ranks image 1 first → 5 of 6 at R@1, all at R@2
    assert r["t2i_r1"] == pytest.approx(5 / 6) and r["t2i_r2"] == 1.0
    # one caption per image and groups = arange: the same as row-matched retrieval
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    assert retrieval(a, b) == retrieval(a, b, groups=np.arange(20))
    i2t, _ = grouped_recall(np.array([[0.5, 0.9, 0.1]]), np.array([0, 0, 0]), ks=(1,))
    assert i2t == {1: 1.0}  # any of the image's captions on top is a hit


def test_align_device_defaults_to_the_machine():
    assert AlignConfig().device == "auto"  # cuda where the process sees a GPU (a GPU cluster), else cpu
