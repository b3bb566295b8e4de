"""LCS: the colour geometry is exact on ideal anchors, PCA recovers a planted colour span, the steering
moves only the subspace, CIEDE2000 matches Sharma et al., and the job runs end to end."""


import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explab.interventions.latents import apply_latent_intervention, subspace_coordinates
from jobs.lcs.colours import (
    anchor_hsl,
    delta_e00,
    hls_deltas,
    hsl_to_rgb,
    hsv_grid,
    hsv_to_rgb,
    rgb_to_hsl,
    target_set,
)
from jobs.lcs.geometry import Geometry
from jobs.lcs.masks import attention_mask, close, first_token, top_mass
from jobs.lcs.normalisation import fit_normalisation
from jobs.lcs.steer import authors_blend, colour_intervention, shift_hsl, steer_coordinates
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


def test_the_authors_51_targets_and_blend_schedule():
    targets = target_set()
    codes = {t["name"]: t["hex"] for t in targets}
    assert len(targets) == 51 and len(set(codes.values())) == 51
    # spot checks against the authors' list: each family's integer rule and the achromatic three
    assert [codes[f"{f} orange"] for f in ("bright", "dark", "light", "muted")] == ["#ff7f00", "#7f3f00", "#ffbf7f",
                                                                                   "#bf7f40"]
    assert (codes["dark azure"], codes["light spring green"], codes["muted rose"]) == ("#003f7f", "#7fffbf",
                                                                                       "#bf407f")
    assert (codes["black"], codes["white"], codes["gray"]) == ("#000000", "#ffffff", "#808080")
    assert pd.Series([t["family"] for t in targets]).value_counts().to_dict() == {
        "bright": 12, "dark": 12, "light": 12, "muted": 12, "achromatic": 3}
    # the authors' schedule: 1 - gamma = .1048 after nine of fifty steps (our callback 8); 1 at the end
    assert authors_blend(8, 50) == pytest.approx(0.8952)
    assert authors_blend(0, 50) == pytest.approx(1 - 0.0108) and authors_blend(49, 50) == pytest.approx(0.0)
    gammas = [authors_blend(t, 50) for t in range(50)]
    assert all(a > b for a, b in zip(gammas, gammas[1:], strict=False))
    assert authors_blend(3, 25) == pytest.approx(1 - 0.0922)  # 4 of 25 steps: the table at 8 of 50
    assert authors_blend(0, 4) == pytest.approx(1 - (0.1441 + 0.5 * (0.1578 - 0.1441)))  # 12.5 of 50: interpolated


# ---------------------------------------------------------------- the evaluation segmenter (Mask2Former)

LABELS = {0: "car", 1: "dog", 2: "teddy bear", 3: "wall-other-merged"}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A tiny Mask2Former (Swin backbone) built from configs, its class head planted so that every query
    predicts "car", saved and loaded back through the job's loading path (AutoModelForUniversalSegmentation)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from jobs.lcs.segment import Segmenter

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                               hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
                               decoder_layers=2, encoder_feedforward_dim=32, dim_feedforward=32,
                               num_attention_heads=2, num_queries=5, common_stride=4)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[0] = 12.0  # "car" wins every query; "dog" never makes a query's top pairs
    path = tmp_path_factory.mktemp("mask2former")
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return Segmenter(str(path), device="cpu")


def test_segmenter_loads_a_saved_mask2former_and_finds_only_the_planted_class(segmenter):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert segmenter.labels == {k: v.lower() for k, v in LABELS.items()}
    outputs = segmenter.predict(image)
    # the planted head: every query is "car" with a probability of almost 1
    probs = outputs.class_queries_logits.softmax(-1)[0]
    assert (probs.argmax(-1) == 0).all() and (probs[:, 0] > 0.99).all()
    car = segmenter.mask(image, "car")
    assert car is not None and car.shape == (32, 32) and car.dtype == bool and car.any()
    assert segmenter.mask(image, "dog") is None and segmenter.mask(image, "teddy bear") is None


def _outputs(class_logits, region_masks):
    """Mask2Former outputs built by hand: one query per row, mask logits +10 inside its region, -10 outside."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    masks = torch.where(torch.tensor(np.stack(region_masks)), 10.0, -10.0)[None].float()
    return Mask2FormerForUniversalSegmentationOutput(class_queries_logits=torch.tensor(class_logits)[None].float(),
                                                     masks_queries_logits=masks)


def test_segmenter_chooses_the_best_scoring_instance_of_the_object(segmenter):
    left, right, top = (np.zeros((8, 8), bool) for _ in range(3))
    left[:, :4], right[:, 4:], top[:4] = True, True, True
    # query 0: a car (p ~ .73), query 1: a car more surely (p ~ .99), query 2: a teddy bear, query 3: a wall
    logits = np.full((4, 5), -4.0)
    logits[0, 0], logits[1, 0], logits[2, 2], logits[3, 3] = 1.0, 5.0, 5.0, 5.0
    outputs = _outputs(logits, [left, right, top, left])
    expected = {k: np.repeat(np.repeat(m, 4, 0), 4, 1) for k, m in (("right", right), ("top", top), ("left", left))}
    np.testing.assert_array_equal(segmenter.select(outputs, "car", (32, 32)), expected["right"])
    np.testing.assert_array_equal(segmenter.select(outputs, "teddy bear", (32, 32)), expected["top"])
    assert segmenter.select(outputs, "bear", (32, 32)) is None  # a label names the object only whole
    np.testing.assert_array_equal(segmenter.select(outputs, "wall", (32, 32)), expected["left"])  # panoptic name
    assert segmenter.select(outputs, "dog", (32, 32)) is None
    # the less sure car is the one chosen when the surer one is gone
    np.testing.assert_array_equal(segmenter.select(_outputs(logits[[0, 2]], [left, top]), "car", (32, 32)),
                                  expected["left"])


def test_evaluation_mask_falls_back_to_the_intervention_tokens_and_says_so(segmenter):
    from jobs.lcs.evaluate import evaluation_mask

    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tokens = np.zeros(16, bool)
    tokens[5] = True  # token (1, 1) of a 4x4 grid: pixels 8..15 x 8..15
    pixels = np.zeros((32, 32), bool)
    pixels[8:16, 8:16] = True
    mask, source = evaluation_mask(segmenter, image, "car", tokens, (4, 4), "local")
    assert source == "segmenter"
    np.testing.assert_array_equal(mask, segmenter.mask(image, "car"))
    mask, source = evaluation_mask(segmenter, image, "dog", tokens, (4, 4), "local")
    assert source == "attention (no segment)"
    np.testing.assert_array_equal(mask, pixels)
    mask, source = evaluation_mask(segmenter, image, "dog", np.ones(16, bool), (4, 4), "global")
    assert source == "image (no segment)" and mask.all()
    mask, source = evaluation_mask(None, image, "car", tokens, (4, 4), "local")
    assert source == "attention"
    np.testing.assert_array_equal(mask, pixels)


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
    # the authors' t = 9 (nine steps done) is our step-end callback 8
    assert (paper.size, paper.steps, paper.guidance, paper.intervention.steps) == (512, 50, 3.5, [8])
    assert paper.subspace.grid == 6 and len(paper.normalisation.colours) == 26
    walls = dict(zip(paper.normalisation.colours, paper.normalisation.seeds, strict=True))
    assert paper.normalisation.prompt == "{colour} wall" and walls["bright purple"] == 17 and walls["white"] == 7
    natural = {b.name: b for b in paper.benchmarks}
    assert len(natural["natural"].objects) == 20 and len(natural["natural"].seeds) == 4
    assert natural["natural"].targets == "families" and natural["natural"].modes == ["global"]
    assert len(natural["natural_small"].targets) == 15 and natural["natural_small"].modes == ["local"]
    plain = natural["plain"]
    assert len(plain.objects) == 10 and not plain.segment and plain.seeds_of("a closeup of a plain rug") == [3]
    assert paper.evaluation.segmenter == "facebook/mask2former-swin-small-coco-instance"
    assert all(not any(w in b.prompt for w in ("red", "blue", "green")) for b in paper.benchmarks)
    source = Path(__file__).resolve().parents[1] / "jobs" / "lcs" / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)  # every space field and range is valid for the job
    assert set(plan.spec.space) == {"intervention.steps", "intervention.blends"} and plan.spec.metric == "dE00"


def test_the_shipped_sweep_runs_under_explab_sweep(ray_local, tmp_path):
    """Two trials of jobs/lcs/sweep.yaml (a smaller grid, walls and benchmark): each steers with its own step
    and gamma, reports the mean steered ΔE00 of its own table, and best.json names the lowest."""
    import yaml

    from explab.sweep import run_sweep

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "lcs" / "sweep.yaml").read_text())
    spec["num_samples"], spec["max_concurrent"] = 2, 2  # the two trials share the tiny Diffuser server
    spec["base"]["overrides"] = [*spec["base"]["overrides"], "subspace.grid=2", "observation.steps=[0]",
                                 "normalisation.colours=[bright red, white]", "normalisation.seeds=[12, 7]",
                                 "benchmarks=[{name: natural, objects: [car], targets: ['#ff0000'], seeds: [0], "
                                 "modes: [global]}]"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep_dir = run_sweep(path, tmp_path / "runs")
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials.get("error")
    assert np.isfinite(trials["metric.dE00"]).all() and trials["metric.dE00"].between(0, 200).all()
    for _, trial in trials.iterrows():
        table = pd.read_parquet(sweep_dir / trial["run_dir"] / "tables" / "intervention.parquet")
        steered = table[table["method"] != "none"]
        assert len(steered) == 1 and steered["step"].iloc[0] == trial["param.intervention.steps"]
        assert steered["gamma"].iloc[0] == pytest.approx(trial["param.intervention.blends"])
        assert trial["metric.dE00"] == pytest.approx(steered["dE00"].mean())  # the metric is the table's mean
    best = json.loads((sweep_dir / "best.json").read_text())["best"]
    assert best["trial_id"] == trials.loc[trials["metric.dE00"].idxmin(), "trial_id"]
