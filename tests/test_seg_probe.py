"""seg_probe: planted checks of the probes and metrics, the masks on a tiny LLaVA, and the job end to end.

The mask mechanism itself (float 4-D masks, eager = sdpa, knockout edge 5<-3, bidirectional image span on
a Llama and a VLM) is tested in tests/test_attention_masks.py; here the job's own knockout and
bidirectional specs (image-token ordinals) are checked on the tiny LLaVA the tiny config uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.seg_probe.knockout import confused_pairs, knockout_layers, knockout_sets, knockout_spec
from jobs.seg_probe.probes import (
    ProbeSchedule,
    confusion,
    downsample_labels,
    position_accuracy,
    segmentation_scores,
    spatial_consistency,
    train_probe,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- probes and metrics (pure torch)


def _planted(n: int, k: int, n_layers: int, gen: torch.Generator, emb: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Token grids (n, 8, 8) of balanced random classes; layer k = class embedding + noise, the others noise."""
    labels = torch.randint(0, emb.shape[0], (n, 8, 8), generator=gen)
    layers = [torch.randn(n, 8, 8, emb.shape[1], generator=gen) for _ in range(n_layers)]
    layers[k] = emb[labels] + 0.3 * layers[k]
    return layers, labels


def test_probe_recovers_the_layer_that_carries_the_class_and_is_at_chance_elsewhere():
    gen = torch.Generator().manual_seed(0)
    n_classes, dim, k = 5, 16, 2
    emb = torch.randn(n_classes, dim, generator=gen)
    train, y_train = _planted(48, k, 4, gen, emb)
    val, y_val = _planted(16, k, 4, gen, emb)
    schedule = ProbeSchedule(epochs=20, batch_size=512, lr=0.02)
    scores = []
    for x_tr, x_va in zip(train, val, strict=True):
        probe = train_probe(x_tr, y_train, n_classes, schedule, ignore_index=255)
        scores.append(segmentation_scores(probe.predict(x_va), y_val, n_classes, 255))
    assert scores[k]["miou"] > 0.97 and scores[k]["pixel_acc"] > 0.98, scores[k]
    for i, s in enumerate(scores):
        if i != k:  # chance: accuracy 1/5, and an IoU of about 1/9 per class
            assert abs(s["pixel_acc"] - 0.2) < 0.06 and s["miou"] < 0.2, (i, s)


def test_upsampled_logits_probe_recovers_the_planted_layer_at_pixel_resolution():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(4, 16, generator=gen)
    (x_train,), y_train = _planted(32, 0, 1, gen, emb)
    (x_val,), y_val = _planted(8, 0, 1, gen, emb)
    pixels = lambda y: y.repeat_interleave(4, 1).repeat_interleave(4, 2)  # noqa: E731 - 8x8 tokens, 4x4 patches
    probe = train_probe(x_train, pixels(y_train), 4, ProbeSchedule(mode="upsample", epochs=30, batch_size=512,
                                                                   lr=0.02), ignore_index=255)
    pred = probe.predict(x_val, size=(32, 32))
    # bilinear upsampling blurs only the pixels next to a patch border between two classes
    assert segmentation_scores(pred, pixels(y_val), 4, 255)["pixel_acc"] > 0.85


def test_miou_equals_a_confusion_matrix_computation_by_hand():
    rng = np.random.default_rng(0)
    n_classes, ignore = 6, 255
    target = rng.integers(0, 4, (3, 10, 10))  # classes 4 and 5 never occur in the target ...
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 5, target.shape))  # ... 5 nowhere
    target[rng.random(target.shape) < 0.1] = ignore
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel(), strict=True):
        if t != ignore:
            conf[t, p] += 1
    assert np.array_equal(confusion(torch.tensor(pred), torch.tensor(target), n_classes, ignore).numpy(), conf)
    ious = []
    for c in range(n_classes):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        if tp + fp + fn:  # a class absent from prediction and target does not count
            ious.append(tp / (tp + fp + fn))
    assert len(ious) == 5
    scores = segmentation_scores(torch.tensor(pred), torch.tensor(target), n_classes, ignore)
    assert scores["miou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert scores["pixel_acc"] == pytest.approx(np.trace(conf) / conf.sum(), abs=1e-6)


def test_labels_reduce_to_the_majority_of_each_patch_and_positions_are_raster_order():
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2, :2] = torch.tensor([[1, 1], [1, 2]])  # patch (0,0): majority 1
    labels[0, :2, 2:] = torch.tensor([[3, 255], [255, 255]])  # patch (0,1): the one labelled pixel
    labels[0, 2:, 2:] = 2  # patch (1,1); patch (1,0) has no labelled pixel
    assert downsample_labels(labels, (2, 2), 4, 255).tolist() == [[[1, 3], [255, 2]]]
    pred = torch.tensor([[[1, 0], [0, 2]], [[1, 3], [0, 0]]])
    target = torch.tensor([[[1, 3], [255, 2]], [[1, 3], [255, 2]]])
    acc, counts = position_accuracy(pred, target, 255)
    assert acc.tolist() == [1.0, 0.5, 0.0, 0.5] and counts.tolist() == [2, 2, 0, 2]
    assert spatial_consistency(torch.tensor([[[1, 1], [1, 2]]])) == 0.5


def test_confused_pairs_and_knockout_sets_pick_the_planted_tokens():
    conf = torch.tensor([[9, 4, 0], [1, 7, 6], [0, 2, 5]])
    assert confused_pairs(conf, 2) == [(1, 2, 6), (0, 1, 4)]
    target = torch.tensor([[1, 1, 1], [1, 0, 0], [2, 2, 0]])
    pred = torch.tensor([[1, 2, 1], [0, 0, 0], [2, 2, 0]])
    sets = knockout_sets(pred, target, 1, 2, np.random.default_rng(0))
    assert sets.queries == [1] and sets.keys == [0, 2]
    assert len(sets.control) == 2 and not set(sets.control) & {0, 1, 2}
    assert knockout_sets(pred, target, 1, None, np.random.default_rng(0)).queries == [1, 3]
    assert knockout_sets(pred, target, 0, None, np.random.default_rng(0)) is None  # no class-0 token is wrong
    assert knockout_layers(1, 4, None) == [1, 2, 3] and knockout_layers(1, 4, 2) == [1, 2]


def test_scenes_have_exact_masks_and_shape_mask_draws_what_it_says():
    from explab.shapes import COLOURS, shape_mask
    from jobs.seg_probe.data import _CLASS_COLOURS, scene_rows

    disc = shape_mask("circle", (200, 200), (100.0, 100.0), 50.0)
    assert abs(disc.sum() / (np.pi * 50**2) - 1) < 0.01
    rows = scene_rows(n=6, size=64, seed=3)
    assert scene_rows(n=6, size=64, seed=3)[0]["mask"].tolist() == rows[0]["mask"].tolist()  # seeded
    for row in rows:
        img, mask = row["image"].astype(float), row["mask"]
        for k in set(np.unique(mask).tolist()) - {0}:
            colour = np.asarray(COLOURS[_CLASS_COLOURS[k - 1]], dtype=float)
            # every pixel of a shape is its class colour (times a shade in 0.85..1.1, plus noise)
            shade = (img[mask == k] @ colour) / (colour @ colour)
            assert shade.min() > 0.7 and shade.max() < 1.25, k


# ---------------------------------------------------------------- the job's masks on the tiny LLaVA


@pytest.fixture(scope="module")
def llava():
    from explab.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(name="tiny:llava", tiny={"vision_config": {"image_size": 64},
                                                           "image_seq_length": 64}))
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    inputs = dict(loaded.processor(images=[img], text=["Look: <image>\nDescribe it."], return_tensors="pt"))
    first = int((inputs["input_ids"][0] == loaded.model.config.image_token_id).nonzero()[0])
    return loaded.model, inputs, first


def _image_states(model, inputs, specs, impl):
    from explab.interventions import Capture, Positions, run_with_hooks

    model.set_attn_implementation(impl)
    caps = [Capture(point="blocks.1.resid_post", name="image", positions=Positions(kind="image")),
            Capture(point="blocks.1.resid_post", name="all")]
    with torch.no_grad():
        _, s = run_with_hooks(model, inputs, [*specs, *caps])
    return s.captures["image"][0], s.captures["all"][0]


def test_knockout_of_an_image_token_edge_changes_the_query_and_nothing_before_it(llava):
    model, inputs, first = llava
    q, k = 20, 9  # image-token ordinals (raster order of the 8x8 grid)
    out = {}
    for impl in ("eager", "sdpa"):
        out[impl, "base"] = _image_states(model, inputs, [], impl)[0]
        out[impl, "ko"] = _image_states(model, inputs, [knockout_spec(knockout_layers(0, 2, None), [q], [k])], impl)[0]
    base, ko = out["eager", "base"], out["eager", "ko"]
    assert torch.equal(ko[:q], base[:q])  # every image token before the query is untouched
    assert (ko[q] - base[q]).abs().max() > 1e-3  # the query is not
    torch.testing.assert_close(out["sdpa", "ko"], ko, rtol=1e-5, atol=1e-5)


def test_bidirectional_lets_a_later_image_token_change_an_earlier_one_but_not_earlier_text(llava):
    from explab.interventions import Bidirectional, Positions, Steer

    model, inputs, first = llava
    bump = Steer(point="embed", vector=[1.0] * 64, positions=Positions(kind="image", indices=[40]))
    out = {}
    for impl in ("eager", "sdpa"):
        for name, extra in (("causal", []), ("bidir", [Bidirectional(image=True)])):
            out[impl, name] = (_image_states(model, inputs, extra, impl)[1],
                               _image_states(model, inputs, [*extra, bump], impl)[1])
    x0, x1 = out["eager", "bidir"]
    assert (x1[first + 3] - x0[first + 3]).abs().max() > 1e-3  # image token 3 sees image token 40
    assert torch.equal(x1[:first], x0[:first])  # the text before the image does not
    c0, c1 = out["eager", "causal"]
    assert torch.equal(c1[: first + 40], c0[: first + 40])  # causally, nothing before token 40 moves
    for name in ("causal", "bidir"):
        for a, b in zip(out["eager", name], out["sdpa", name], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the job


def test_tiny_config_writes_every_table_and_plot(tmp_path, ray_local, cli, monkeypatch):
    monkeypatch.setenv("EXPLAB_CACHE", str(tmp_path / "cache"))
    code, out, err = cli("run", "seg_probe", "-c", "tiny", "--runs-dir", str(tmp_path / "runs"))
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    probe = pd.read_parquet(run_dir / "tables" / "probe.parquet")
    assert list(probe["name"]) == ["encoder.0", "encoder.1", "adapter", "llm.0", "llm.1"]  # the paper's order
    assert probe["depth"].tolist() == list(range(5)) and probe[["miou", "pixel_acc"]].notna().all().all()
    assert (probe["pixel_acc"] > 0.5).all()  # the scenes' colours are linearly readable from every stage
    position = pd.read_parquet(run_dir / "tables" / "position.parquet")
    assert set(position.groupby(["attention", "probes"]).size()) == {64}  # an 8x8 grid per curve
    assert {("causal", "causal"), ("bidirectional", "causal"), ("bidirectional", "retrained")} == set(
        map(tuple, position[["attention", "probes"]].drop_duplicates().values))
    knock = pd.read_parquet(run_dir / "tables" / "knockout.parquet")
    assert len(knock) > 0 and (knock["knock_layer"] == 0).all() and set(knock["probe_layer"]) == {0, 1}
    assert (knock["acc_base"][knock["probe_layer"] == 0] == 0).all()  # the queries are the misclassified tokens
    bidir = pd.read_parquet(run_dir / "tables" / "bidirectional.parquet")
    assert set(bidir["attention"]) == {"causal", "bidirectional"} and set(bidir["probes"]) == {"causal", "retrained"}
    for name in ("miou_by_layer", "position_accuracy", "knockout", "masks"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000, name
    result = json.loads((run_dir / "result.json").read_text())
    assert {"encoder_miou", "adapter_miou", "llm_miou", "knockout_effect", "bidirectional_gain"} <= set(result)
    features = json.loads((run_dir / "artifacts" / "features.json").read_text())
    assert features["n_train"] == 24 and features["n_val"] == 8 and not features["train_cached"]
    assert len(list((tmp_path / "cache" / "seg_probe").glob("*/meta.json"))) == 2  # train, val (both variants)

    # a layer past the model's depth is one line naming the field
    code, _, err = cli("run", "seg_probe", "-c", "tiny", "--runs-dir", str(tmp_path / "runs"),
                       "--set", "position_layers=[2]")
    assert code != 0 and "field 'position_layers'" in err.strip().splitlines()[-1]


def test_sweep_spec_resolves_against_the_job():
    from explab import sweep

    source = ROOT / "jobs" / "seg_probe" / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)
    assert plan is not None


def test_paper_config_passes_the_dry_run(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli("run", "seg_probe", "-c", "paper", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "llava-hf/llava-1.5-7b-hf" in out and not (tmp_path / "runs").exists()


def test_an_uncached_hub_dataset_offline_is_one_line(monkeypatch, tmp_path):
    from explab.errors import ExplabError
    from jobs.seg_probe.data import check_hf_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(ExplabError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1") as info:
        check_hf_available("hf:zhoubolei/scene_parse_150")
    assert "\n" not in str(info.value)
