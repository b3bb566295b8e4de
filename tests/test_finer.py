"""finer: paired metric and parser, construction on synthetic scenes (planted truths), hub loading offline,
the job end to end through `explab run finer -c tiny`, and its sweep spec."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explab.errors import ConfigError, ExplabError
from jobs.finer import queries as q
from jobs.finer.benchmark import BuildConfig, items, mc_prompt, row_options, synthetic, training_pairs
from jobs.finer.metrics import check_pairs, parse_letter, score
from jobs.finer.scenes import COLOURS, SceneConfig, render

ROOT = Path(__file__).parents[1]


# ---- metric and parser ------------------------------------------------------------------------------
def _rows(pos_pred, neg_pred, image_b="img0", qtype_b="multi_obj_neg"):
    return pd.DataFrame([
        {"pair_id": "p0", "image_id": "img0", "qtype": "multi_obj_pos", "gt_index": 1, "pred": pos_pred},
        {"pair_id": "p0", "image_id": image_b, "qtype": qtype_b, "gt_index": 3, "pred": neg_pred},
        {"pair_id": "p1", "image_id": "img1", "qtype": "wh_pos", "gt_index": 0, "pred": 2},
        {"pair_id": "p1", "image_id": "img1", "qtype": "wh_neg", "gt_index": 4, "pred": 4},
    ])


def test_pairs_with_exactly_one_right_row_score_zero_paired_and_half_row_accuracy():
    s = score(_rows(1, 0))  # p0: pos right, neg wrong; p1: pos wrong, neg right
    assert s["paired_accuracy"] == 0.0 and s["row_accuracy"] == 0.5
    assert s["pos_accuracy"] == 0.5 and s["neg_accuracy"] == 0.5 and s["invalid"] == 0.0
    s = score(_rows(1, 3).assign(pred=[1, 3, 0, 4]))
    assert s["paired_accuracy"] == 1.0 and s["row_accuracy"] == 1.0
    assert score(_rows(-1, 3))["invalid"] == 0.25


def test_mismatched_pairs_are_refused():
    with pytest.raises(ExplabError, match="spans images"):
        check_pairs(_rows(1, 3, image_b="img9").assign(correct=True))
    with pytest.raises(ExplabError, match="mixes qtypes"):
        check_pairs(_rows(1, 3, qtype_b="multi_attr_neg").assign(correct=True))
    with pytest.raises(ExplabError, match="one _pos and one _neg"):
        check_pairs(_rows(1, 3, qtype_b="multi_obj_pos").assign(correct=True))
    with pytest.raises(ExplabError, match="_pos or _neg"):
        check_pairs(_rows(1, 3, qtype_b="multi_obj").assign(correct=True))


def test_parser_maps_letters_parentheses_and_junk():
    assert parse_letter("B") == 1 and parse_letter("(c)") == 2 and parse_letter("zzz") == -1
    assert parse_letter(" e.") == 4 and parse_letter("") == -1 and parse_letter("12") == -1


# ---- construction -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    scenes = SceneConfig(grid=3, min_objects=1, max_objects=3)
    return scenes, synthetic(scenes, BuildConfig(), {"train": 20, "test": 20}, seed=3)


def test_every_negative_differs_in_exactly_one_element_and_is_false_and_every_positive_is_true(world):
    _, data = world
    kinds = set()
    for split in ("train", "test"):
        for p in data.probes[split]:
            scene = data.scenes[p.image_id]
            kinds.add(p.kind)
            assert q.holds(scene, p.positive), p
            assert len(p.negatives) == 4 and len(set(p.negatives)) == 4
            for n in p.negatives:
                assert q.differences(p.positive, n) == 1 and not q.holds(scene, n), (p, n)
            for d in p.neg_distractors:  # the neg row's other rejections: one edit of the asked negative
                assert q.differences(p.negatives[0], d) == 1 and not q.holds(scene, d) and d != p.positive
    assert kinds == set(q.KINDS)


def test_rows_come_in_pairs_on_one_image_with_five_options_and_the_right_answer_where_gt_points(world):
    _, data = world
    rng = np.random.default_rng(0)
    for p in data.probes["test"]:
        pos, neg = items(p, rng, BuildConfig(), "test", "synthetic")
        assert (pos["pair_id"], pos["image_id"]) == (neg["pair_id"], neg["image_id"])
        assert (pos["qtype"], neg["qtype"]) == (f"{p.kind}_pos", f"{p.kind}_neg")
        for row, polarity in ((pos, "pos"), (neg, "neg")):
            question, options = row_options(p, polarity)
            assert len(row["choices"]) == 5 and row["choices"][row["gt_index"]] == options[0]
            assert row["question"] == question
        assert neg["question"] != pos["question"]  # the neg row asks the negative query
    prompt = mc_prompt("Q?", list("vwxyz"))
    assert prompt.splitlines() == ["Select the best answer for the multiple-choice question.", "Q?", "(A) v", "(B) w",
                                   "(C) x", "(D) y", "(E) z",
                                   "Please answer with a single capital letter (A, B, C, D, or E):"]


def test_renderer_paints_each_object_in_its_cell_with_its_colour(world):
    scenes, data = world
    for image_id in list(data.scenes)[:10]:
        scene, image = data.scenes[image_id], data.images[image_id]
        cell = scenes.image_size // scene.grid
        for o in scene.objects:
            patch = image[o.row * cell:(o.row + 1) * cell, o.col * cell:(o.col + 1) * cell].reshape(-1, 3)
            assert (patch == COLOURS[o.colour]).all(-1).any(), (image_id, o)
    assert render(scene, 32).shape == (32, 32, 3)


def test_training_pairs_accept_the_truth_and_reject_the_hallucination(world):
    _, data = world
    rng = np.random.default_rng(1)
    for p in data.probes["train"][:12]:
        pos, neg = training_pairs(p, data.images[p.image_id], rng, "both", "answer", BuildConfig())
        assert pos["chosen"][0]["content"] == q.yes(p.positive)
        assert neg["chosen"][0]["content"] == q.no_but(p.negatives[0], p.positive)
        if p.kind != "wh":
            assert neg["rejected"][0]["content"] == q.yes(p.negatives[0])
        (only,) = training_pairs(p, None, rng, "neg", "letter", BuildConfig())
        assert only["polarity"] == "neg" and only["chosen"][0]["content"] in "ABCDE"
        assert only["chosen"][0]["content"] != only["rejected"][0]["content"]


# ---- released benchmarks ---------------------------------------------------------------------------------
def test_released_benchmark_offline_is_one_clear_error():
    from jobs.finer import hub
    from jobs.finer.config import HubBenchmark

    bench = HubBenchmark(name="finer_comprecap", data="hf:xiaorui638/finer-comprecap-mcq")
    with pytest.raises(ConfigError, match="cannot load hf:xiaorui638/finer-comprecap-mcq"):
        hub.load(bench)


# ---- the job ------------------------------------------------------------------------------------------
def test_tiny_config_runs_end_to_end_through_explab_run(tmp_path, ray_local, cli):
    # the tiny config's DPO run beside one of its three ablations (SFT), trained side by side; the other two
    # differ from the DPO run only in which questions the pairs ask (`training_pairs` modes, tested above)
    sft = ("ablations=[{name: sft_tuned, method: sft, format: letter, trainer: {lr: 2.0e-3, batch_size: 4, "
           "lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}}}]")
    code, out, err = cli("run", "finer", "-c", "tiny", "--runs-dir", str(tmp_path),
                         "--set", "n_images.train=2", "--set", "n_images.test=2", "--set", sft)
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    built = pd.read_parquet(run_dir / "tables" / "items.parquet")
    assert set(built["kind"]) == set(q.KINDS) and len(built) % 2 == 0
    assert (built.groupby("pair_id")["polarity"].apply(sorted).map(tuple) == ("neg", "pos")).all()
    table = pd.read_parquet(run_dir / "tables" / "eval.parquet")
    variants = {"finer_tuned", "sft_tuned"}
    assert set(table["variant"]) == {"base", *variants}
    assert set(table["split"]) == {"all", *q.KINDS}
    for col in ("paired_accuracy", "row_accuracy", "invalid"):
        assert table[col].between(0, 1).all()
    assert (table["paired_accuracy"] <= table["row_accuracy"] + 1e-9).all() or (table["invalid"] > 0).any()
    gran = pd.read_parquet(run_dir / "tables" / "granularity.parquet")
    assert {"granularity", "row_accuracy", "paired_accuracy", "variant"} <= set(gran.columns)
    preds = pd.read_parquet(run_dir / "tables" / "predictions.parquet")
    assert (preds["pred"] == preds["response"].map(parse_letter)).all()
    result = json.loads((run_dir / "result.json").read_text())
    assert {"base_paired_accuracy", "gain", *(f"{v}_paired_accuracy" for v in variants)} <= set(result)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    # DPO through trl with LoRA (B = 0 at the start): the first step's policy is the reference, loss ln 2;
    # the variants trained side by side keep their own curves (<variant>_loss)
    assert metrics["finer_tuned_loss"].dropna().iloc[0] == pytest.approx(math.log(2), abs=1e-4)
    sft = metrics["sft_tuned_loss"].dropna()  # cross-entropy of the random model over a 264-token vocabulary
    assert len(sft) >= 1 and sft.iloc[0] == pytest.approx(math.log(264), abs=0.5)
    for name in ("plots/paired_accuracy.png", "plots/granularity.png"):
        assert (run_dir / name).stat().st_size > 500, name
    for v in variants:
        assert list((run_dir / "artifacts").glob(f"{v}_0/checkpoint_*/model.safetensors")), v
        assert (run_dir / "artifacts" / f"{v}_0_model" / "model.safetensors").is_file(), v


@pytest.mark.parametrize("overrides, needle", [
    (["synthetic_eval=false"], "no multiple-choice set to evaluate"),
    (["ablations=[{name: finer_tuned, method: sft}]"], "share a name"),
])
def test_configs_without_a_paired_set_or_with_twin_variant_names_are_one_line(overrides, needle):
    from explab.config import load_config
    from explab.job import get_job

    job = get_job("finer")
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(job.config, job.config_path("tiny"), overrides)
    assert "\n" not in str(info.value)


def test_sweep_spec_and_paper_config_resolve_against_the_config():
    from explab.config import load_config
    from explab.job import get_job
    from explab.sweep import resolve
    from explab.sweep_spec import load_spec

    path = ROOT / "jobs" / "finer" / "sweep.yaml"
    plan = resolve(load_spec(path), path)
    assert plan.spec.job == "finer" and {"tuning.dpo.beta", "tuning.trainer.lr"} <= set(plan.spec.space)
    job = get_job("finer")
    paper = load_config(job.config, job.config_path("paper"))
    assert paper.tuning.dpo.beta == 0.1 and paper.tuning.trainer.lr == 5e-6 and paper.tuning.trainer.lora.r == 32
    assert [a.method for a in paper.ablations] == ["sft", "dpo", "dpo"] and paper.tuning.trainer.deepspeed


# ---- option order and the filtering pass -------------------------------------------------------------------
COLOUR_WORLD = SceneConfig(colours=["red", "green", "blue", "yellow", "purple"], shapes=["square"], sizes=["large"],
                           grid=2, min_objects=1, max_objects=1)
COLOUR_BUILD = BuildConfig(kinds=["multi_attr"], max_objects_named=1, shuffle_options=False, option_order="vocabulary")


def test_vocabulary_order_puts_the_right_option_at_the_letter_of_the_image_colour():
    data = synthetic(COLOUR_WORLD, COLOUR_BUILD, {"test": 12}, seed=0)
    rng = np.random.default_rng(0)
    for p in data.probes["test"]:
        colour = data.scenes[p.image_id].objects[0].colour
        for row in items(p, rng, COLOUR_BUILD, "test", "synthetic"):
            assert row["gt_index"] == COLOUR_WORLD.colours.index(colour), row
            assert [colour_word in choice for colour_word, choice in zip(COLOUR_WORLD.colours, row["choices"],
                                                                        strict=True)] == [True] * 5


class _PlantedAnswerer:
    """A server stand-in that answers each MC row with the letter `pick` chooses for its question."""

    def __init__(self, pick):
        self.pick = pick

    def forward(self, requests):
        from types import SimpleNamespace

        return [SimpleNamespace(next_token=self.pick(r["messages"][0]["content"])) for r in requests]


def test_filtering_keeps_exactly_the_pairs_whose_positive_the_filter_model_answers_right(world):
    from jobs.finer.filtering import filter_pairs

    _, data = world
    rng = np.random.default_rng(0)
    built = pd.DataFrame([r for p in data.probes["test"] for r in items(p, rng, BuildConfig(), "test", "synthetic")])
    truth = {mc_prompt(r["question"], list(r["choices"])): "ABCDE"[r["gt_index"]] for r in built.to_dict("records")}
    wrong_on = set(built["pair_id"].unique()[::3])  # the filter model misses the positive of every third pair
    asked = {mc_prompt(r["question"], list(r["choices"])): r["pair_id"] for r in built.to_dict("records")}

    def pick(prompt):
        right = truth[prompt]
        return "ABCDE"[("ABCDE".index(right) + 1) % 5] if asked[prompt] in wrong_on else right

    kept, counts = filter_pairs(_PlantedAnswerer(pick), built, data.images)
    assert set(kept["pair_id"]) == set(built["pair_id"]) - wrong_on
    assert len(kept) == 2 * len(set(kept["pair_id"]))  # both rows of a kept pair stay
    assert counts == {"pairs": built["pair_id"].nunique(), "kept": built["pair_id"].nunique() - len(wrong_on),
                      "dropped": len(wrong_on)}


# ---- other benchmarks from local copies, in the item schema ------------------------------------------------
def _pixels(k):
    return np.full((8, 8, 3), 40 * k, dtype=np.uint8)


def test_yes_no_benchmarks_pope_hallusionbench_and_amber_map_to_pairs_and_score_as_pope(tmp_path):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from jobs.finer import hub
    from jobs.finer.config import HubBenchmark
    from jobs.finer.metrics import yes_no_scores

    feats = Features({"image": Image(), "question": Value("string"), "answer": Value("string"),
                      "image_source": Value("string"), "category": Value("string")})
    pope = Dataset.from_dict({"image": [PILImage.fromarray(_pixels(k)) for k in (1, 1, 2, 2, 3)],
                              "question": ["Is there a dog?", "Is there a cat?", "Is there a car?", "Is there a bus?",
                                           "Is there a cup?"],
                              "answer": ["yes", "no", "no", "yes", "yes"], "image_source": ["a", "a", "b", "b", "c"],
                              "category": ["random"] * 5}, features=feats)
    pope.to_parquet(tmp_path / "pope.parquet")
    frame, images = hub.load(HubBenchmark(name="pope", data=f"local:{tmp_path / 'pope.parquet'}", format="pope"))
    assert len(frame) == 4 and set(images) == {"a", "b", "c"}  # the partnerless "c" question drops out
    assert dict(zip(frame["question"], frame["polarity"], strict=True)) == {
        "Is there a dog?": "pos", "Is there a cat?": "neg", "Is there a car?": "neg", "Is there a bus?": "pos"}
    assert (frame["gt_index"] == frame["polarity"].map({"pos": 0, "neg": 1})).all()
    assert np.asarray(images["b"]).mean() == pytest.approx(80)
    # HallusionBench's columns (gt_answer 1/0, filename) through `columns`
    hb = pope.rename_columns({"answer": "gt_answer", "image_source": "filename"}).map(
        lambda ex: {"gt_answer": {"yes": "1", "no": "0"}[ex["gt_answer"]]})
    hb.save_to_disk(str(tmp_path / "hb"))
    bench = HubBenchmark(name="hallusion", data=f"local:{tmp_path / 'hb'}", format="pope",
                         columns={"gt_answer": "answer", "filename": "image_id"})
    frame_hb, _ = hub.load(bench)
    assert frame_hb[["question", "polarity", "image_id"]].equals(frame[["question", "polarity", "image_id"]])
    # AMBER's discriminative queries joined with their truth, images as file names next to the json
    PILImage.fromarray(_pixels(1)).save(tmp_path / "AMBER_1.jpg")
    rows = [{"id": 1005, "image": "AMBER_1.jpg", "query": "Is there a tree in this image?", "truth": "yes",
             "type": "discriminative-existence"},
            {"id": 1006, "image": "AMBER_1.jpg", "query": "Is there a boat in this image?", "truth": "no",
             "type": "discriminative-existence"}]
    (tmp_path / "amber.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    amber = HubBenchmark(name="amber", data=f"local:{tmp_path / 'amber.jsonl'}", format="pope",
                         columns={"query": "question", "truth": "answer", "type": "category"})
    frame_a, images_a = hub.load(amber)
    assert list(frame_a["polarity"]) == ["pos", "neg"] and frame_a["pair_id"].nunique() == 1
    assert score(frame_a.assign(pred=[0, 1]))["paired_accuracy"] == 1.0
    # POPE's scores: an always-yes model has recall 1, precision = the yes share of the truth, yes-ratio 1
    s = yes_no_scores(frame.assign(pred=0))
    assert s["yn_recall"] == 1.0 and s["yn_precision"] == 0.5 and s["yes_ratio"] == 1.0 and s["yn_accuracy"] == 0.5
    assert s["yn_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="not in the dataset"):
        hub.load(HubBenchmark(name="x", data=f"local:{tmp_path / 'pope.parquet'}", format="pope",
                              columns={"truth": "answer"}))


def test_mcq_benchmarks_finer_comprecap_and_mmstar_map_from_local_copies(tmp_path):
    from datasets import Dataset
    from PIL import Image as PILImage

    from jobs.finer import hub
    from jobs.finer.config import HubBenchmark

    img = [PILImage.fromarray(_pixels(1))] * 2
    finer = Dataset.from_dict({"image": img, "image_filename": ["x.jpg", "x.jpg"],
                               "qtype": ["multi_obj_pos", "multi_obj_neg"], "question": ["q+", "q-"],
                               **{f"choice{j}": [f"p{j}", f"n{j}"] for j in range(1, 6)}, "gt_index": [0, 3]})
    finer.save_to_disk(str(tmp_path / "finer"))
    frame, _ = hub.load(HubBenchmark(name="comprecap", data=f"local:{tmp_path / 'finer'}", format="finer_mcq"))
    assert frame["pair_id"].nunique() == 1 and list(frame["choices"].iloc[1]) == [f"n{j}" for j in range(1, 6)]
    assert score(frame.assign(pred=[0, 3]))["paired_accuracy"] == 1.0
    assert score(frame.assign(pred=[0, 2]))["paired_accuracy"] == 0.0
    mmstar = Dataset.from_dict({"image": img, "question": ["Which? A: cat B: dog", "Count? A: 1 B: 2"],
                                "A": ["cat", "1"], "B": ["dog", "2"], "answer": ["B", "A"]})
    mmstar.save_to_disk(str(tmp_path / "mmstar"))
    frame, _ = hub.load(HubBenchmark(name="mmstar", data=f"local:{tmp_path / 'mmstar'}", format="mcq_letter"))
    assert list(frame["gt_index"]) == [1, 1, 0, 0] and list(frame["choices"].iloc[0]) == ["cat", "dog"]
    assert score(frame.assign(pred=[1, 1, 1, 1]))["paired_accuracy"] == 0.5


# ---- construction from captions through an LLM -------------------------------------------------------------
def _vocab():
    from jobs.finer.benchmark import vocabulary

    return vocabulary(SceneConfig())


GOOD_GRAPH = ('{"objects": [{"name": "circle", "colour": "red", "size": "large"}, '
              '{"name": "square", "colour": "blue", "size": "small"}], '
              '"relations": [{"subject": "circle", "relation": "left of", "object": "square"}]}')


def test_graph_parser_accepts_a_well_formed_graph_and_refuses_everything_else():
    from jobs.finer.captions import GraphError, parse_graph

    vocab = _vocab()
    scene = parse_graph(GOOD_GRAPH, vocab)
    assert [(o.shape, o.colour, o.size) for o in scene.objects] == [("circle", "red", "large"),
                                                                    ("square", "blue", "small")]
    assert q.holds(scene, (("rel", "circle", "left of", "square"),))
    assert not q.holds(scene, (("rel", "square", "left of", "circle"),))  # closed world: unstated is false
    assert parse_graph(f"```json\n{GOOD_GRAPH}\n```", vocab) == scene
    bad = {
        "zzz": "not JSON",
        "Sure! " + GOOD_GRAPH: "not JSON",
        '{"objects": [], "relations": []}': "non-empty",
        '{"objects": [{"name": "dog", "colour": "red"}]}': "name 'dog'",
        '{"objects": [{"name": "circle", "colour": "teal"}]}': "colour 'teal'",
        '{"objects": [{"name": "circle", "colour": "red"}], "extra": 1}': "keys",
        '{"objects": [{"name": "circle", "colour": "red"}, {"name": "circle", "colour": "blue"}]}': "repeat",
        '{"objects": [{"name": "circle", "colour": "red"}], "relations": [{"subject": "circle", '
        '"relation": "above", "object": "square"}]}': "object 'square'",
        '[1, 2]': "expected an object",
    }
    for text, reason in bad.items():
        with pytest.raises(GraphError, match=reason):
            parse_graph(text, vocab)


class _PlantedGenerator:
    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, requests):
        from types import SimpleNamespace

        return [SimpleNamespace(completions=[SimpleNamespace(text=self.outputs[r["messages"][0]["content"]
                                                                         .rsplit("Caption: ", 1)[1]])])
                for r in requests]


def test_caption_graphs_give_items_true_to_the_caption_and_junk_is_counted_as_skipped(world):
    from jobs.finer.captions import caption_probes, describe, extract

    _, data = world
    vocab = _vocab()
    scenes = {i: data.scenes[i] for i in list(data.scenes)[:8] if len(data.scenes[i].objects) >= 2}
    texts = {i: describe(s) for i, s in scenes.items()}
    as_json = {texts[i]: json.dumps({"objects": [{"name": o.shape, "colour": o.colour, "size": o.size}
                                                 for o in s.objects]}) for i, s in scenes.items()}
    junk = list(scenes)[0]
    as_json[texts[junk]] = "I think the image shows shapes."
    graphs, skipped = extract(_PlantedGenerator(as_json), texts, vocab)
    assert set(graphs) == set(scenes) - {junk} and sum(skipped.values()) == 1 and "not JSON" in skipped
    probes, _ = caption_probes(graphs, BuildConfig(kinds=["multi_obj", "multi_attr", "wh"]), vocab,
                               np.random.default_rng(0))
    assert probes
    for p in probes:  # truth against the real scene the caption describes
        assert q.holds(scenes[p.image_id], p.positive)
        assert all(not q.holds(scenes[p.image_id], n) for n in p.negatives)


def test_a_real_generator_on_a_tiny_model_writes_junk_that_is_counted_as_skipped(ray_local, world):
    from explab.servers import get_server
    from jobs.finer.captions import describe, extract

    _, data = world
    texts = {i: describe(data.scenes[i]) for i in list(data.scenes)[:3]}
    generator = get_server("generator", "tiny:llama", {"backend": "transformers", "max_wait_ms": 20})
    graphs, skipped = extract(generator, texts, _vocab(), max_tokens=16)
    assert graphs == {} and sum(skipped.values()) == 3



# ---- the DPO step sees the image (wiring of explab.train.build_dpo_trainer to trl) --------------------------
def test_dpo_batches_carry_each_pairs_image_and_their_log_probs_depend_on_it(tmp_path):
    """trl's collated batch for the tiny LLaVA: rows [chosen..., rejected...] of one prompt share that pair's
    pixels, every row holds the whole image (16 image tokens) and the whole question, the log-probability trl
    sums (its fused head) equals `sequence_logprob` of the logits, and another image changes it."""
    import torch

    from explab.models import ModelSpec, load_model
    from explab.train import DPOConfig, TrainerConfig, build_dpo_trainer
    from explab.train.objectives import sequence_logprob
    from jobs.finer.tuning import _wire

    data = synthetic(COLOUR_WORLD, COLOUR_BUILD, {"train": 6}, seed=0)
    rng = np.random.default_rng(0)
    rows = [r for p in data.probes["train"]
            for r in training_pairs(p, data.images[p.image_id], rng, "both", "letter", COLOUR_BUILD)]
    loaded = load_model(ModelSpec(name="tiny:llava", device="cpu"))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}  # reference: the base (adapters off)
    trainer = build_dpo_trainer(loaded, None, _wire(rows), TrainerConfig(batch_size=4, steps=1, lora=lora),
                                DPOConfig(max_length=512), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, completion, pixels = batch["input_ids"], batch["completion_mask"], batch["pixel_values"]
    half = ids.shape[0] // 2
    assert pixels.shape[0] == ids.shape[0] == 8 and torch.equal(pixels[:half], pixels[half:])
    tok = loaded.tokenizer
    processed = {}
    for r in rows:
        pix = loaded.processor.image_processor(images=[r["images"][0]], return_tensors="pt")["pixel_values"][0]
        processed.setdefault(r["prompt"][0]["content"][1]["text"], []).append((r["chosen"][0]["content"], pix))
    for b in range(ids.shape[0]):
        assert int((ids[b] == loaded.model.config.image_token_id).sum()) == 16
        prompt = tok.decode(ids[b][completion[b] == 0], skip_special_tokens=True).strip("\n")
        question = prompt.split("\n", 1)[1] if prompt.startswith("user") else prompt
        text = next(t for t in processed if question.endswith(t))  # the whole MC prompt reached the model
        answer = tok.decode(ids[b][completion[b] == 1], skip_special_tokens=True).strip()
        if b < half:  # the chosen row's pixels are those of a training image asked this question with this answer
            assert any(a == answer and torch.allclose(p, pixels[b]) for a, p in processed[text]), b
    labels = ids.masked_fill(completion == 0, -100)
    model = trainer.model
    with torch.no_grad():
        kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
        trl_logps = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs.sum(1)
        ours = sequence_logprob(model(**kwargs, use_cache=False).logits, labels)
        kwargs["pixel_values"] = torch.roll(pixels, 1, dims=0)
        other = sequence_logprob(model(**kwargs, use_cache=False).logits, labels)
    assert torch.allclose(trl_logps, ours, atol=1e-4)
    changed = ~torch.all(torch.isclose(pixels, torch.roll(pixels, 1, dims=0)).flatten(1), dim=1)
    assert changed.any() and ((ours - other).abs()[changed] > 1e-3).all()


def test_dpo_raises_the_held_out_margin_and_greedy_paired_accuracy_of_an_sft_base_on_the_colour_world(tmp_path):
    """FINER-Tuning's DPO step learns the planted colour world: trl's DPOTrainer (`build_dpo_trainer`, full
    tuning, sigmoid loss, the paper's beta 0.1, a frozen copy of the base as reference) on 200 training scenes'
    letter pairs (the right letter over the hallucinated or a wrong one), from a tiny LLaVA SFT'd for 60 steps on
    the chosen letters (a base that answers some colours and not others). On 50 held-out scenes:
    - the benchmark's scoring (greedy `generate` of at most `MAX_NEW_TOKENS` tokens, `parse_letter`, `score`)
      gives a paired accuracy at least 0.15 above the base's;
    - DPO's implicit reward margin beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)] rises from
      0 (policy = reference) above 0.2, and most held-out pairs prefer the right letter.

    Measured with `benchmarks/finer_dpo_learning.py` (same setup; paired accuracy base -> tuned): seed 0 (this
    test) 0.32 -> 0.60; seeds 1-5: 0.28 -> 0.46, 0.28 -> 0.62, 0.44 -> 0.74, 0.60 -> 0.60 (0.76 after 200 steps),
    0.48 -> 0.74. Broken trainers fall below the base: preferences swapped 0.32 -> 0.16 on seed 0 (seeds 1-5:
    0.18, 0.00, 0.00, 0.00, 0.26); one image for every pair (image-blind) 0.32 -> 0.16; a trainer that does not
    step leaves the base's accuracy and a margin of 0 (jobs/finer/README.md)."""
    import copy
    import dataclasses

    import torch

    from explab.models import ModelSpec, load_model
    from explab.train import DPOConfig, TrainerConfig, build_dpo_trainer
    from explab.train.objectives import chat_example, collate, next_token_ce, sequence_logprob
    from jobs.finer.evaluate import MAX_NEW_TOKENS
    from jobs.finer.tuning import _wire

    torch.manual_seed(0)
    data = synthetic(COLOUR_WORLD, COLOUR_BUILD, {"train": 200, "test": 50}, seed=0)
    rng = np.random.default_rng(0)
    train = [r for p in data.probes["train"]
             for r in training_pairs(p, data.images[p.image_id], rng, "both", "letter", COLOUR_BUILD)]
    held = [r for p in data.probes["test"]
            for r in training_pairs(p, data.images[p.image_id], rng, "both", "letter", COLOUR_BUILD)]
    test_rows = pd.DataFrame([r for p in data.probes["test"] for r in items(p, rng, COLOUR_BUILD, "test", "synthetic")])
    base = load_model(ModelSpec(name="tiny:llava", device="cpu"))
    pad = base.tokenizer.pad_token_id

    def inputs(batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    examples = [chat_example(base, r["prompt"] + r["chosen"], r["images"]) for r in train]
    optimizer = torch.optim.AdamW(base.model.parameters(), lr=1e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(100)
    base.model.train()
    for _ in range(60):  # the SFT'd base
        batch = collate([examples[i] for i in torch.randperm(len(examples), generator=order)[:8]], pad)
        loss = next_token_ce(base.model(**inputs(batch)).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base.model.eval()

    def paired_accuracy(model):  # greedy, at most MAX_NEW_TOKENS tokens, the first letter parsed
        user = [[{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": mc_prompt(r.question, list(r.choices))}]}]
                for r in test_rows.itertuples()]
        prompts = [base.processor.apply_chat_template(u, add_generation_prompt=True, tokenize=False) for u in user]
        answers = []
        for i in range(0, len(prompts), 25):
            enc = base.processor(images=[data.images[k] for k in test_rows["image_id"][i:i + 25]],
                                 text=prompts[i:i + 25], padding=True, padding_side="left", return_tensors="pt",
                                 add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad)
            answers += base.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return score(test_rows.assign(pred=[parse_letter(a) for a in answers]))["paired_accuracy"]

    def logps(model, side):
        rows = [chat_example(base, r["prompt"] + r[side], r["images"]) for r in held]
        with torch.no_grad():
            return torch.cat([sequence_logprob(model(**inputs(b)).logits, b["labels"])
                              for b in (collate(rows[i:i + 25], pad) for i in range(0, len(rows), 25))])

    policy = dataclasses.replace(base, model=copy.deepcopy(base.model))
    reference = dataclasses.replace(base, model=copy.deepcopy(base.model))
    trainer = TrainerConfig(lr=1e-4, batch_size=8, steps=100, warmup_ratio=0.0, schedule="constant", grad_clip=None)
    dpo = DPOConfig(beta=0.1, max_length=512)
    hf = build_dpo_trainer(policy, reference, _wire(train), trainer, dpo, tmp_path, seed=0)
    hf.args.save_strategy = "no"
    hf.train()
    policy.model.eval()
    before, after = paired_accuracy(base.model), paired_accuracy(policy.model)
    margin = dpo.beta * ((logps(policy.model, "chosen") - logps(base.model, "chosen"))
                         - (logps(policy.model, "rejected") - logps(base.model, "rejected")))
    print(f"held-out paired accuracy {before:.2f} -> {after:.2f}; reward margin {margin.mean():.2f}, "
          f"pairs won {(margin > 0).float().mean():.2f}")
    assert after >= before + 0.15
    assert margin.mean() > 0.2 and (margin > 0).float().mean() >= 0.6
