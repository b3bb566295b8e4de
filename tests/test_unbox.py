"""The unbox job: the black box hands out probabilities only, and the search finds what is planted.

The planted world (jobs/unbox/configs/planted.yaml, no weights, no Ray): a word renderer paints a blue
background for water words; the black box's waterbird logit is 4·blue background + 1·red centre − 1.5;
a scripted proposer recombines words from the memory. The real path (tiny LLM on the Generator, tiny
FLUX on the Diffuser) runs end to end through `explab run unbox -c tiny`.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explab.config import load_config
from explab.errors import ConfigError, ExplabError
from explab.job import get_job
from explab.runs import execute
from jobs.unbox.blackbox import ClassifierConfig, build_blackbox
from jobs.unbox.concepts import ConceptsConfig, recurring
from jobs.unbox.dedup import Deduper
from jobs.unbox.proposers import LLMProposer, ProposerConfig, Scored, ScriptedProposer, clean_line
from jobs.unbox.renderers import WordRenderer, default_words
from jobs.unbox.search import SearchConfig, search_class

JOB_DIR = Path(__file__).parents[1] / "jobs" / "unbox"
TABLES = ("descriptors", "rounds", "concepts", "slices", "fidelity")
PLOTS = ("best_per_round", "top_descriptors", "slice_gaps")


def planted_config(*overrides):
    job = get_job("unbox")
    return job, load_config(job.config, job.config_path("planted"), list(overrides))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---- the black box ------------------------------------------------------------------------------------
def test_black_box_gives_probabilities_only_and_counts_every_image():
    _, config = planted_config()
    box = build_blackbox(config.classifier)
    painter = WordRenderer(default_words())
    images = [painter.paint("a bird, red, on the water", 1), painter.paint("a bird in the forest", 2),
              painter.paint("a bird", 3)]
    p = box.predict_proba(images, "search")
    assert isinstance(p, np.ndarray) and p.shape == (3, 2) and not isinstance(p, torch.Tensor)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    # the planted rule, computed by hand: blue ring + red centre -> σ(4 + 1 − 1.5); green ring -> σ(−1.5 − 2)
    np.testing.assert_allclose(p[:, 1], [sigmoid(3.5), sigmoid(-3.5), sigmoid(-1.5)], atol=1e-6)
    for name in ("logits", "gradients", "model", "parameters", "state_dict", "grad"):
        with pytest.raises(ExplabError, match="exposes only predict_proba"):
            getattr(box, name)
    with pytest.raises(ExplabError, match="no gradients"):
        box.predict_proba(torch.zeros(1, 32, 32, 3, requires_grad=True))
    with pytest.raises(ExplabError, match="read-only"):
        box.extra = 1
    box.predict_proba(images[:2], "fidelity")
    assert box.query_counts() == {"search": 3, "fidelity": 2} and box.queries == 5


def test_torchvision_checkpoint_black_box_equals_the_model_it_hides(tmp_path):
    import torchvision
    from torchvision.transforms import v2

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=2).eval()
    torch.save(model.state_dict(), tmp_path / "erm.pt")
    box = build_blackbox(ClassifierConfig(kind="torchvision", name="resnet18", weights=None, device="cpu",
                                          checkpoint=str(tmp_path / "erm.pt"), classes=["land", "water"],
                                          image_size=64))
    images = [np.random.default_rng(i).integers(0, 256, (80, 96, 3), dtype=np.uint8) for i in range(3)]
    prep = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(64),
                       v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    x = torch.stack([prep(torch.from_numpy(im).permute(2, 0, 1).float() / 255) for im in images])
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=-1).double().numpy()
    np.testing.assert_allclose(box.predict_proba(images), expected, atol=1e-5)
    assert box.classes == ("land", "water") and box.queries == 3
    with pytest.raises(ConfigError, match="does not exist"):
        build_blackbox(ClassifierConfig(kind="torchvision", name="resnet18", weights=None, device="cpu",
                                        checkpoint=str(tmp_path / "missing.pt"), classes=["a", "b"]))


def test_open_clip_zero_shot_black_box_is_the_softmax_of_scaled_cosines():
    from explab.models import load_encoder

    box = build_blackbox(ClassifierConfig(kind="open_clip", name="tiny:clip", classes=["heron", "crow"],
                                          templates=["a photo of a {}."], logit_scale=100.0, device="cpu"))
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    enc = load_encoder({"name": "tiny:clip", "device": "cpu"})
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    from explab.images import to_pil

    logits = 100 * unit(enc.encode([to_pil(x) for x in images], "image")) @ unit(
        enc.encode(["a photo of a heron.", "a photo of a crow."], "text")).T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(box.predict_proba(images), expected / expected.sum(1, keepdims=True), atol=1e-4)


def test_planted_classifier_config_is_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"name classes \['heron'\]"):
        ClassifierConfig(kind="planted", classes=["a", "b"], rules=[{"cls": "heron", "colour": "blue", "weight": 1}])
    job = get_job("unbox")
    with pytest.raises(ConfigError, match=r"classes \['heron'\] are not in classifier.classes"):
        load_config(job.config, job.config_path("planted"), ["classes=[heron]"])


# ---- the search ---------------------------------------------------------------------------------------
def test_search_finds_the_planted_word_and_best_so_far_never_decreases():
    _, config = planted_config()
    box = build_blackbox(config.classifier)
    proposer = ScriptedProposer(config.proposer, seed=0)
    cfg = SearchConfig(descriptors=5, images=3, rounds=8, patience=None)
    found = search_class("waterbird", 1, proposer=proposer, renderer=WordRenderer(default_words()), box=box,
                         deduper=Deduper(None, 0.9), cfg=cfg, seeds=[11, 12, 13])
    ranked = found.ranked()
    assert len(ranked) == cfg.rounds * cfg.descriptors
    assert box.query_counts() == {"search": cfg.rounds * cfg.descriptors * cfg.images}  # T × K × N
    has_water = [bool(re.search(r"\bwater\b", r["descriptor"])) for r in ranked]  # the word, not waterbird
    assert all(has_water[:5])  # the top descriptors all hold the planted word
    # a later "forest" paints over the water (the renderer draws words in order): leave those out, and then
    # every descriptor with water outranks every descriptor without it
    plain = [(r["score"], w) for r, w in zip(ranked, has_water, strict=True) if "forest" not in r["descriptor"]]
    assert min(s for s, w in plain if w) > max(s for s, w in plain if not w)
    best = [r["best_so_far"] for r in found.rounds]
    assert all(b >= a for a, b in zip(best, best[1:], strict=False)) and best[-1] > best[0]
    assert best[-1] >= 0.95  # water + red: σ(3.5) = 0.971
    assert len({r["descriptor"] for r in ranked}) == len(ranked)  # no descriptor is scored twice


def test_stops_when_the_best_stops_improving():
    _, config = planted_config()
    box = build_blackbox(config.classifier)
    cfg = SearchConfig(descriptors=2, images=1, rounds=50, patience=2, min_improvement=0.5)
    found = search_class("landbird", 0, proposer=ScriptedProposer(config.proposer, 0),
                         renderer=WordRenderer(default_words()), box=box, deduper=Deduper(None, 0.9), cfg=cfg,
                         seeds=[1])
    assert found.stopped == "patience" and len(found.rounds) == 3  # round 0 sets the best, two more fail to
    assert box.queries == 3 * 2 * 1


class PlantedEmbedder:
    """Unit vectors by hand: 'gull' and 'seagull' point the same way, 'crow' elsewhere."""

    def embed(self, texts):
        table = {"gull": [1.0, 0.0], "seagull": [0.99, 0.141], "crow": [0.0, 1.0]}
        v = np.array([table[t.split()[-1]] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_dedup_drops_exact_and_near_duplicates_by_embedding_cosine():
    dedup = Deduper(PlantedEmbedder(), threshold=0.9)
    assert dedup.accept(["a gull", "A gull!", "a seagull", "a crow"], limit=5) == ["a gull", "a crow"]
    assert dedup.accept(["the seagull", "a crow"], limit=5) == []  # against what was accepted before, too
    loose = Deduper(PlantedEmbedder(), threshold=0.995)
    assert loose.accept(["a gull", "a seagull", "a crow"], limit=2) == ["a gull", "a seagull"]  # cos 0.99


def test_llm_proposer_meta_prompt_and_parsing():
    cfg = ProposerConfig(kind="llm")
    proposer = LLMProposer(None, cfg, seed=0)
    first = proposer.messages("heron", [], 4)
    assert "4" in first[1]["content"] and "heron" in first[1]["content"] and first[0]["role"] == "system"
    memory = [Scored("a photo of a heron in fog", 0.2), Scored("a photo of a heron on a lake", 0.9)]
    text = proposer.messages("heron", memory, 3)[1]["content"]
    assert text.index("in fog (score 0.200)") < text.index("on a lake (score 0.900)")  # lowest first
    assert clean_line("2. \"a photo of a heron at dawn.\"", "heron", cfg.template, 160) == "a photo of a heron at dawn"
    assert clean_line("- wading in reeds", "heron", cfg.template, 160) == "a photo of a heron, wading in reeds"
    assert clean_line("**", "heron", cfg.template, 160) is None


def test_concepts_count_recurring_words_and_their_lift():
    rows = pd.DataFrame({"descriptor": ["a photo of a heron on water at dawn", "a photo of a heron in water",
                                        "a photo of a heron at dawn", "a photo of a heron in a field"],
                         "score": [0.9, 0.8, 0.3, 0.1]})
    table = recurring(rows, "heron", "a photo of a {cls}", ConceptsConfig(top=2, min_count=2))
    assert table["concept"].tolist() == ["water"]  # in both top descriptors; heron/photo are dropped
    row = table.iloc[0]
    assert row["frequency"] == 1.0 and row["lift"] == pytest.approx(0.85 - 0.2)


# ---- the job in the planted world (no Ray) ------------------------------------------------------------
def test_planted_job_ranks_water_first_names_the_background_and_validates_the_slice(tmp_path):
    job, config = planted_config()
    run_dir, result = execute(job, config, tmp_path)
    sc = config.search
    queries = json.loads((run_dir / "artifacts" / "queries.json").read_text())
    assert queries["search_per_class"] == {c: sc.rounds * sc.descriptors * sc.images for c in config.classes}
    assert queries["search"] == result["queries_search"] == 2 * sc.rounds * sc.descriptors * sc.images
    assert result["queries"] == queries["total"] == sum(v for k, v in queries.items() if isinstance(v, int)
                                                        and k != "total")
    d = pd.read_parquet(run_dir / "tables" / "descriptors.parquet")
    water = d[d["class"] == "waterbird"].sort_values("rank")
    assert water["descriptor"].head(5).str.contains(r"\bwater\b").all()
    rounds = pd.read_parquet(run_dir / "tables" / "rounds.parquet")
    for _, g in rounds.groupby("class"):
        assert g["best_so_far"].is_monotonic_increasing
    concepts = pd.read_parquet(run_dir / "tables" / "concepts.parquet")
    assert concepts[concepts["class"] == "waterbird"].iloc[0]["concept"] == "water"
    slices = pd.read_parquet(run_dir / "tables" / "slices.parquet")
    top = slices[(slices["attribute_rank"] == 1) & slices["favoured"]].set_index("class")
    assert top.loc["waterbird", "attribute"] == "background" and top.loc["waterbird", "value"] == "water"
    assert top.loc["landbird", "attribute"] == "background" and top.loc["landbird", "value"] == "land"
    # validated on the grouped set: the planted classifier calls every bird on water a waterbird
    assert top.loc["waterbird", "acc_gap"] == 1.0 and top.loc["landbird", "acc_gap"] == 1.0
    least = slices[slices["least_favoured"] & (slices["attribute"] == "background")]
    assert least["worst_group"].all()  # the least favoured background is the worst group of each class
    fid = pd.read_parquet(run_dir / "tables" / "fidelity.parquet")
    wf = fid[fid["class"] == "waterbird"]
    assert (wf.loc[~wf["baseline"], "top1_rate"] == 1.0).all() and wf.loc[wf["baseline"], "top1_rate"].item() == 0.0
    for name in TABLES:
        assert (run_dir / "tables" / f"{name}.parquet").is_file(), name
    for name in PLOTS:
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000, name


def test_every_config_validates_and_paper_holds_the_papers_loop():
    job = get_job("unbox")
    names = sorted(p.stem for p in (JOB_DIR / "configs").glob("*.yaml"))
    assert {"tiny", "small", "planted", "paper", "paper_waterbirds", "paper_celeba"} <= set(names)
    configs = {n: load_config(job.config, job.config_path(n)) for n in names}
    paper = configs["paper"]
    assert (paper.search.descriptors, paper.search.images, paper.search.rounds, paper.search.memory) == (10, 4, 10, 20)
    assert paper.dedup.threshold == 0.9 and paper.renderer.model.name == "black-forest-labs/FLUX.1-schnell"
    assert paper.classifier.name == "resnet50" and configs["small"].proposer.model.name == "smollm2-135m-instruct"


def test_sweep_spec_resolves_against_the_job():
    sweep = pytest.importorskip("explab.sweep")
    source = JOB_DIR / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)
    assert plan.spec.metric == "best_score" and set(plan.spec.space) == {"search.descriptors", "search.rounds"}


# ---- the real path: Generator + Diffuser on Ray ----------------------------------------------------------
def test_tiny_config_runs_end_to_end_through_explab_run(tmp_path, ray_local, cli):
    code, out, err = cli("run", "unbox", "-c", "tiny", "--runs-dir", str(tmp_path))
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    config = load_config(get_job("unbox").config, JOB_DIR / "configs" / "tiny.yaml")
    sc = config.search
    d = pd.read_parquet(run_dir / "tables" / "descriptors.parquet")
    assert {"class", "round", "descriptor", "score", "rank"} <= set(d.columns)
    assert d["descriptor"].str.startswith("a photo of a").all() and d["score"].between(0, 1).all()
    queries = json.loads((run_dir / "artifacts" / "queries.json").read_text())
    per_class = d.groupby("class").size()
    assert queries["search_per_class"] == {c: int(per_class[c]) * sc.images for c in config.classes}
    assert queries["search"] == int(per_class.sum()) * sc.images
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {m["server"] for m in manifest["models"]} == {"generator", "diffuser"}
    for name in TABLES:
        assert len(pd.read_parquet(run_dir / "tables" / f"{name}.parquet")) > 0 or name == "concepts", name
    for name in PLOTS:
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000, name
