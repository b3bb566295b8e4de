"""LCS: the colour geometry is exact on ideal anchors, PCA recovers a planted colour span, the steering
moves only the subspace, CIEDE2000 matches Sharma et al., and the job runs end to end."""


import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explab.interventions.latents import apply_latent_intervention, subspace_coordinates
from jobs.lcs.colours import anchor_hsl, delta_e00, hls_deltas, hsl_to_rgb, hsv_grid, hsv_to_rgb, rgb_to_hsl
from jobs.lcs.geometry import Geometry
from jobs.lcs.masks import attention_mask, close, first_token, top_mass
from jobs.lcs.normalisation import fit_normalisation
from jobs.lcs.steer import colour_intervention, shift_hsl, steer_coordinates
from jobs.lcs.subspace import colour_means, fit_subspace, principal_angles


def cylinder(hsl, centre, frame):
    """An ideal HSL double cone in a rotated, shifted frame: lightness on frame[2], hue in frame[0:2]."""
    h, s, lt = hsl[..., 0], hsl[..., 1], hsl[..., 2]
    chroma = s * (1 - np.abs(2 * lt - 1))
    local = np.stack([chroma * np.cos(2 * np.pi * h), chroma * np.sin(2 * np.pi * h), 2 * lt - 1], -1)
    return centre + local @ frame


def ideal_geometry(origin="axis"):
    rng = np.random.default_rng(0)
    frame, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    centre = np.array([0.7, -0.4, 1.3])  # off the origin: a scalar mean of the anchors is not their centre
    anchors = {name: cylinder(hsl, centre, frame) for name, hsl in anchor_hsl().items()}
    return Geometry(anchors, origin=origin), centre, frame


def hsl_samples(n=2000, seed=1):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 1, n), rng.uniform(0.05, 1, n), rng.uniform(0.05, 0.95, n)], -1)


def hue_error(a, b):
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1 - d)


# ---------------------------------------------------------------- geometry and normalisation


def test_ideal_cylinder_round_trip_is_exact_with_the_per_axis_origin():
    geometry, centre, frame = ideal_geometry("axis")
    hsl = hsl_samples()
    coords = geometry.hsl_to_lcs(hsl)
    # forward equals the ideal construction itself (the slerp between 60-degree neighbours is the circle)
    np.testing.assert_allclose(coords, cylinder(hsl, centre, frame), atol=1e-9)
    back = geometry.lcs_to_hsl(coords)
    assert hue_error(back[:, 0], hsl[:, 0]).max() < 1e-5
    np.testing.assert_allclose(back[:, 1:], hsl[:, 1:], atol=1e-5)
    # the anchors map to themselves
    for name, value in anchor_hsl().items():
        np.testing.assert_allclose(geometry.hsl_to_lcs(value), geometry.anchors[name], atol=1e-9)


def test_the_authors_scalar_origin_breaks_the_round_trip_on_the_same_geometry():
    geometry, _, _ = ideal_geometry("scalar")
    assert np.ptp(geometry.o) == 0  # one number on every axis
    hsl = hsl_samples()
    back = geometry.lcs_to_hsl(geometry.hsl_to_lcs(hsl))
    error = np.abs(back[:, 1:] - hsl[:, 1:]).max()
    assert error > 0.1, error  # the quirk the issue names: far from exact


def test_normalise_then_denormalise_is_the_identity_and_maps_step_statistics_onto_the_last_step():
    rng = np.random.default_rng(2)
    steps = [0, 4, 9]
    coords = rng.normal(size=(26, 3, 3)) * np.array([[0.1], [0.5], [2.0]]) + np.array([[1.0], [-1.0], [0.3]])
    norm = fit_normalisation(coords, steps)
    np.testing.assert_allclose(norm.betas[-1], 1.0)
    x = rng.normal(size=(50, 3))
    for t in steps:
        np.testing.assert_allclose(norm.denormalise(norm.normalise(x, t), t), x, atol=1e-12)
        np.testing.assert_allclose(norm.normalise(norm.denormalise(x, t), t), x, atol=1e-12)
    # the scenes at step 0, normalised, have the last step's mean and mean absolute deviation
    z = norm.normalise(coords[:, 0], 0)
    np.testing.assert_allclose(z.mean(0), coords[:, 2].mean(0), atol=1e-12)
    np.testing.assert_allclose(np.abs(z - z.mean(0)).mean(0), np.abs(coords[:, 2] - coords[:, 2].mean(0)).mean(0))


# ---------------------------------------------------------------- a synthetic linear "VAE"


def synthetic_vae(hsv, tokens=16, channels=16, noise=1e-3, seed=3):
    """Packed latents (n, tokens, C): mu + M cyl(HSV) on every token (M: 3 orthonormal columns), plus noise
    orthogonal to span(M)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(channels, channels)))
    span, rest = q[:, :3].T, q[:, 3:].T  # (3, C), (C - 3, C)
    mu = rng.normal(size=channels)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    cyl = np.stack([s * v * np.cos(2 * np.pi * h), s * v * np.sin(2 * np.pi * h), v - 0.5], -1)
    clean = mu + cyl @ span
    orth = rng.normal(size=(len(hsv), tokens, channels - 3)) @ rest * noise
    return clean[:, None, :] + orth, span, rest, mu


def test_pca_recovers_the_planted_colour_span():
    hsv = hsv_grid(6)
    latents, span, _, _ = synthetic_vae(hsv)
    sub = fit_subspace(colour_means(latents), 3)
    assert principal_angles(sub.basis, span).max() < 1e-3
    assert sub.ratios[:3].sum() >= 0.99
    np.testing.assert_allclose(sub.basis @ sub.basis.T, np.eye(3), atol=1e-10)


def test_mean_shift_sets_the_mean_coordinate_and_leaves_the_orthogonal_complement_unchanged():
    hsv = hsv_grid(6)
    latents, _, rest, _ = synthetic_vae(hsv)
    sub = fit_subspace(colour_means(latents), 3)
    geometry, _, _ = ideal_geometry("axis")
    steps = [3, 7]
    norm = fit_normalisation(np.random.default_rng(4).normal(size=(8, 2, 3)) + 1.0, steps)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(64, 16)).astype(np.float32)
    mask = rng.random(64) < 0.5
    target = np.array([0.55, 0.8, 0.4])
    spec = colour_intervention(z, mask, target, sub, geometry, norm, step=3, gamma=1.0)
    out = apply_latent_intervention(torch.tensor(z), spec).numpy()
    coords = sub.coordinates(out)
    # the masked tokens' normalised mean is the target colour's coordinate; the others are untouched
    np.testing.assert_allclose(norm.normalise(coords[mask], 3).mean(0), geometry.hsl_to_lcs(target), atol=1e-4)
    np.testing.assert_array_equal(out[~mask], z[~mask])
    # each masked token keeps its deviation from the mean (type 1 is a shift) ...
    before = sub.coordinates(z)[mask]
    np.testing.assert_allclose(coords[mask] - coords[mask].mean(0), before - before.mean(0), atol=1e-4)
    # ... and nothing outside span(B) moves (B: the fitted basis, within 1e-3 rad of the planted span)
    complement = np.eye(16) - sub.basis.T @ sub.basis
    np.testing.assert_allclose((out - z) @ complement, 0, atol=1e-5)
    assert np.abs((out - z) @ rest.T).max() < 2e-3 * np.abs(out - z).max()
    torch.testing.assert_close(subspace_coordinates(torch.tensor(out), torch.tensor(sub.basis),
                                                    torch.tensor(sub.mean)).double(), torch.tensor(coords),
                               atol=1e-4, rtol=0)


def test_per_token_hsl_shift_moves_every_token_by_the_target_difference():
    geometry, _, _ = ideal_geometry("axis")
    norm = fit_normalisation(np.stack([np.zeros((1, 3)) - 1, np.zeros((1, 3)) + 1]), [0])  # identity
    hsl = np.array([[0.95, 0.5, 0.4], [0.05, 0.6, 0.5], [0.0, 0.55, 0.45]])
    coords = geometry.hsl_to_lcs(hsl)
    target = np.array([0.5, 0.7, 0.5])
    new = steer_coordinates(coords, np.ones(3, bool), target, geometry, norm, 0, gamma=0.0)
    source = geometry.lcs_to_hsl(coords.mean(0))
    expected = shift_hsl(hsl, source, target)
    np.testing.assert_allclose(geometry.lcs_to_hsl(new)[:, 1:], expected[:, 1:], atol=1e-6)
    assert hue_error(geometry.lcs_to_hsl(new)[:, 0], expected[:, 0]).max() < 1e-6
    # hue moves the short way round: source hue ~0, target 0.5 -> every hue ends near 0.5
    assert hue_error(expected[:, 0], 0.5).max() < 0.1
    assert shift_hsl(np.array([0.9, 0.2, 0.9]), np.array([0.9, 0.5, 0.5]), np.array([0.1, 0.0, 1.0]))[0] == \
        pytest.approx(0.1) and shift_hsl(np.array([0.9, 0.2, 0.9]), np.array([0.9, 0.5, 0.5]),
                                          np.array([0.1, 0.0, 1.0]))[2] == 1.0  # clamped


def test_observation_reads_planted_token_colours_back_exactly():
    from jobs.lcs.observe import block_means, compare, token_colours, token_grid

    # a linear "VAE" that embeds the ideal HSL cone in 3 of 16 channels (plus orthogonal noise)
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    span, rest, mu = q[:, :3].T, q[:, 3:].T, rng.normal(size=16)
    centre, frame = np.zeros(3), np.eye(3)

    def vae(hsl, noise=0.0):
        return mu + cylinder(hsl, centre, frame) @ span + rng.normal(size=(len(hsl), 13)) @ rest * noise

    grid_hsl = rgb_to_hsl(hsv_to_rgb(hsv_grid(6)))
    sub = fit_subspace(vae(grid_hsl), 3)
    anchors = {n: sub.coordinates(vae(h[None]))[0] for n, h in anchor_hsl().items()}
    geometry = Geometry(anchors)
    norm = fit_normalisation(np.stack([np.full((2, 3), -1.0), np.full((2, 3), 1.0)]), [0, 1])  # identity
    # a 4x4-token latent of random colours, read at step 0 as their true RGB
    hsl = hsl_samples(16, seed=8)
    tokens = vae(hsl, noise=0.5)
    read = token_colours(tokens, 0, sub, geometry, norm)
    np.testing.assert_allclose(read, hsl_to_rgb(hsl), atol=1e-6)
    image = np.kron(hsl_to_rgb(hsl).reshape(4, 4, 3), np.ones((8, 8, 1)))  # 32x32, one colour per 8x8 block
    image8 = (image * 255).round().astype(np.uint8)
    assert token_grid(16, 32, 32) == (4, 4)
    result = compare(read.reshape(4, 4, 3), block_means(image8, (4, 4)))
    assert result["pixel"] < 0.5 and result["mean"] < 0.5  # only the 8-bit rounding of the image remains


# ---------------------------------------------------------------- colours and masks


def test_ciede2000_reproduces_sharma_pairs_through_rgb():
    from skimage.color import deltaE_ciede2000, lab2rgb

    for lab1, lab2, expected in [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
                                 ((50, 2.5, 0), (73, 25, -18), 27.1492)]:
        assert deltaE_ciede2000(np.array(lab1), np.array(lab2)) == pytest.approx(expected, abs=5e-5)
    # through delta_e00 (RGB in): an in-gamut Sharma pair round-trips through sRGB
    a, b = lab2rgb(np.array([[[50, 2.5, 0.0]]])), lab2rgb(np.array([[[73.0, 25.0, -18.0]]]))
    assert delta_e00(a, b)[0, 0] == pytest.approx(27.1492, abs=2e-3)
    assert delta_e00(np.array([1.0, 0, 0]), np.array([1.0, 0, 0])) == 0


def test_colour_conversions_and_opencv_hls_deltas():
    rgb = np.random.default_rng(6).random((500, 3))
    np.testing.assert_allclose(hsl_to_rgb(rgb_to_hsl(rgb)), rgb, atol=1e-12)
    assert len(hsv_grid(6)) == 156 and len(hsv_grid(8)) == 400
    np.testing.assert_allclose(hsv_to_rgb(np.array([2 / 3, 1, 1])), [0, 0, 1])
    d = hls_deltas(np.array([1.0, 0, 0.02]), np.array([1.0, 0.02, 0]))  # red either side of hue 0
    assert d["dH"] <= 2 and d["dL"] == 0 and d["dS"] == 0
    d = hls_deltas(np.array([0, 0, 1.0]), np.array([1.0, 1.0, 0]))  # blue vs yellow: opposite hues
    assert d["dH"] == 90


def test_attention_mask_keeps_the_top_mass_and_closes_holes():
    w = np.zeros(64)
    w[:4] = [0.5, 0.3, 0.15, 0.05]
    assert top_mass(w, 0.8).sum() == 2 and top_mass(w, 0.81).sum() == 3
    ring = np.zeros((8, 8), bool)
    ring[2:5, 2:5] = True
    ring[3, 3] = False
    assert close(ring, 3)[3, 3] and close(ring, 3).sum() == 9
    att = np.full((8, 8), 1e-4)
    att[2:5, 2:5] = 1.0
    att[3, 3] = 1e-4
    mask = attention_mask(att.ravel(), (8, 8), 0.95, 3)
    assert mask.reshape(8, 8)[2:5, 2:5].all() and mask.sum() == 9
    assert first_token([(0, 0), (0, 1), (2, 5), (6, 9), (0, 0)], "a red car", "car") == 3


# ---------------------------------------------------------------- the job


def test_tiny_run_writes_every_table_plot_and_the_artifact(tmp_path, ray_local, cli):
    from safetensors.numpy import load_file

    code, out, err = cli("run", "lcs", "-c", "tiny", "--runs-dir", str(tmp_path))
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    tables = {name: pd.read_parquet(run_dir / "tables" / f"{name}.parquet")
              for name in ("subspace", "variance", "anchors", "normalisation", "observation", "intervention")}
    for name in ("subspace", "observation", "delta_e_vs_step", "before_after"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000, name
    art = load_file(run_dir / "artifacts" / "lcs.safetensors")
    # the artifact is the fitted subspace: an orthonormal basis, the anchors and normalisation of the tables
    np.testing.assert_allclose(art["basis"] @ art["basis"].T, np.eye(3), atol=1e-6)
    assert art["basis"].shape == (3, 64) and art["mean"].shape == (64,)
    anchors = tables["anchors"].set_index("name")
    np.testing.assert_allclose(art["anchors"][-2:], anchors.loc[["black", "white"], ["c0", "c1", "c2"]], atol=1e-6)
    assert list(art["steps"]) == list(range(6)) and art["alphas"].shape == art["betas"].shape == (6, 3)
    np.testing.assert_allclose(art["betas"][-1], 1.0)
    norm = tables["normalisation"]
    np.testing.assert_allclose(norm.pivot(index="step", columns="axis", values="beta").to_numpy(), art["betas"])
    # the variance ratios are PCA's: descending, summing to 1, and the grid's coordinates are centred
    ratios = tables["variance"]["ratio"].to_numpy()
    assert (np.diff(ratios) <= 1e-12).all() and ratios.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(tables["subspace"][["c0", "c1", "c2"]].mean(), 0, atol=1e-6)
    # the grid's colours were read back through the geometry of the anchors table
    geometry = Geometry({n: anchors.loc[n, ["c0", "c1", "c2"]].to_numpy(float) for n in anchors.index})
    read = geometry.lcs_to_hsl(tables["subspace"][["c0", "c1", "c2"]].to_numpy())
    np.testing.assert_allclose(read, tables["subspace"][["read_h", "read_s", "read_l"]].to_numpy(), atol=1e-9)
    obs = tables["observation"]
    assert sorted(obs["step"]) == [0, 2, 4] and obs.filter(like="dE00").notna().all().all()
    inter = tables["intervention"]
    # 2 modes x 2 steps x 2 targets: one baseline and three blends (type1, type2, the authors' schedule)
    assert len(inter) == 2 * 2 * 2 * 4
    assert set(inter["method"]) == {"none", "type1", "type2", "authors"}
    assert (inter[inter["mode"] == "global"]["mask_tokens"] == 64).all()
    local = inter[inter["mode"] == "local"]["mask_tokens"]
    assert (local > 0).all() and (local < 64).all()
    steered = inter[inter["method"] != "none"]
    assert steered["dE00"].between(0, 200).all() and (steered["object_hex"] != "").all()
    # the steering changed the images it was applied to
    base = inter[inter["method"] == "none"].set_index(["mode", "step", "target"])["object_hex"]
    changed = [row.object_hex != base[(row.mode, row.step, row.target)] for row in steered.itertuples()]
    assert sum(changed) >= len(changed) // 2
    result = json.loads((run_dir / "result.json").read_text())
    assert {"variance_explained", "dE00", "dE00_none", "observe_dE00_final"} <= set(result)


def test_bad_config_is_one_clear_line(tmp_path, ray_local, cli):
    for args, needle in [(["--set", "intervention.steps=[9]"], "steps [9] are outside a 6-step run"),
                         (["--set", "intervention.blends=[1.5]"], "blend gamma must be in [0, 1]")]:
        code, _, err = cli("run", "lcs", "-c", "tiny", "--runs-dir", str(tmp_path), *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code != 0 and needle in lines[-1], (args, err)


def test_paper_config_and_sweep_resolve_against_the_job():
    from explab import sweep
    from explab.config import load_config
    from explab.job import get_job

    job = get_job("lcs")
    paper = load_config(job.config, job.config_path("paper"), [])
    assert (paper.size, paper.steps, paper.guidance, paper.intervention.steps) == (512, 50, 3.5, [9])
    assert paper.subspace.grid == 6 and len(paper.normalisation.colours) == 26
    natural = paper.benchmarks[0]
    assert len(natural.objects) == 20 and len(natural.seeds) == 4 and natural.targets == "families"
    assert all(not any(w in b.prompt for w in ("red", "blue", "green")) for b in paper.benchmarks)
    source = Path(__file__).resolve().parents[1] / "jobs" / "lcs" / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)  # every space field and range is valid for the job
    assert set(plan.spec.space) == {"intervention.steps", "intervention.blends"} and plan.spec.metric == "dE00"
