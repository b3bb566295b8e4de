"""EZPC's vocabularies (Label-free CBM concept files by path or URL, the LLM + CLIP filter), the
authors' cross-dataset transfer protocol (generalized zero-shot), the SigLIP logit bias and the
concept-region heatmaps: each against a planted case. Pure numpy / torch (and one local HTTP
server): no Ray."""

from __future__ import annotations

import functools
import http.server
import json
import math
import socket
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from explab.errors import ExplabError
from jobs.ezpc import concepts as vocab
from jobs.ezpc import metrics, regions
from jobs.ezpc.model import ezpc_loss, logit_params, sigmoid_kl, train_projection

ROOT = Path(__file__).resolve().parents[1]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- concept files ----------------------------------------------------------------------------
def test_lf_cbm_text_and_json_concept_files(tmp_path):
    (tmp_path / "cub_filtered.txt").write_text("black feet\nWebbed feet\n\n  long   wings \nblack feet\n")
    (tmp_path / "gpt3_cub_important.json").write_text(json.dumps(
        {"Black footed Albatross": ["black feet", "large wingspan"], "Laysan Albatross": ["a white body"]}))
    phrases = vocab.from_files([str(tmp_path / "cub_filtered.txt"), str(tmp_path / "gpt3_cub_important.json")])
    assert phrases == ["a white body", "black feet", "large wingspan", "long wings", "Webbed feet"]
    (tmp_path / "bad.json").write_text('{"cls": "not a list"}')
    with pytest.raises(ExplabError, match="list of concept strings"):
        vocab.from_files([str(tmp_path / "bad.json")])


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (base URL, folder, stop)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    yield f"http://127.0.0.1:{server.server_address[1]}", www, stop
    if thread.is_alive():
        stop()


def test_concept_files_by_url_are_fetched_once_into_the_cache(http_dir, tmp_path):
    base, www, stop = http_dir
    (www / "places365_filtered.txt").write_text("a bed\na lamp\n")
    url = f"{base}/places365_filtered.txt"
    cache = tmp_path / "cache"
    expected = vocab.finalize(["a bed", "a lamp", *vocab.from_files(["shapes"])])
    assert vocab.from_files([url, "shapes"], cache) == expected
    stop()  # offline now: the cached copy is used
    assert vocab.from_files([url], cache) == ["a bed", "a lamp"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/imagenet_filtered.txt"
    with pytest.raises(ExplabError) as err:
        vocab.from_files([dead], cache)
    message = str(err.value)
    assert "\n" not in message and dead in message and "local path" in message


# ---- generated vocabularies and Label-free CBM's filter ----------------------------------------
class _Scripted:
    """The Generator handle's interface, answering each prompt from a table."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, requests):
        from types import SimpleNamespace

        return [SimpleNamespace(completions=[SimpleNamespace(text=self.answers[r["messages"][0]["content"]])])
                for r in requests]


def test_generated_concepts_are_filtered_as_label_free_cbm_does():
    prompts = ["features of {cls}?", "kinds of {cls}?", "around {cls}?"]
    answers = {"features of cat?": "whiskers\nwhisker", "kinds of cat?": "feline\npet",
               "around cat?": "a scratching post next to an old sofa", "features of dog?": "floppy ears",
               "kinds of dog?": "canine", "around dog?": "a bone"}
    rows = vocab.generate(_Scripted(answers), ["cat", "dog"], prompts, max_tokens=32, seed=0, max_chars=60,
                          max_words=10, per_prompt=None)
    concepts = vocab.finalize([r["concept"] for r in rows])
    assert concepts == ["a bone", "a scratching post next to an old sofa", "canine", "feline", "floppy ears", "pet",
                        "whisker", "whiskers"]
    # planted CLIP geometry: "feline" is the class name "cat" itself; "whisker" ≈ "whiskers"; "a bone" is
    # shown by no training image; everything else is far from everything
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    T = basis[:2]  # cat, dog
    C = basis[2:2 + len(concepts)].copy()
    C[concepts.index("feline")] = unit(T[0] + 0.01 * basis[20])
    C[concepts.index("whisker")] = unit(C[concepts.index("whiskers")] + 0.05 * basis[21])
    V = unit(np.concatenate([C[[i for i, c in enumerate(concepts) if c != "a bone"]], T]) + 0.3 * basis[22])
    reasons = vocab.filter_vocabulary(concepts, C, T, max_chars=30, max_class_similarity=0.9,
                                      max_concept_similarity=0.95, V=V, min_activation=0.5, activation_top=1)
    why = dict(zip(concepts, reasons, strict=True))
    assert why["feline"] == "class" and why["a scratching post next to an old sofa"] == "length"
    assert sorted([why["whisker"], why["whiskers"]]) == ["", "duplicate"]  # two near-identical: one kept
    assert why["a bone"] == "activation"
    kept = [c for c in concepts if why[c] == ""]
    assert len(kept) == 4 and set(kept) - {"whisker", "whiskers"} == {"canine", "floppy ears", "pet"}
    # as in LF-CBM, of two near-duplicates the more general one (more similar to the rest on average) stays
    e = np.eye(4)
    general = unit(e[0] + e[1] + 0.05 * e[3])  # near "specific" and also close to "other"
    specific, other = unit(e[0] + 0.7 * e[1]), unit(e[1] + e[2])
    assert vocab.filter_vocabulary(["specific", "general", "other"], np.stack([specific, general, other]),
                                   np.zeros((0, 4)), max_concept_similarity=0.95) == ["duplicate", "", ""]
    off = vocab.filter_vocabulary(concepts, C, T)  # every step off: nothing dropped
    assert off == [""] * len(concepts)


# ---- the authors' transfer protocol ----------------------------------------------------------
def _two_domains(seed=0, d=64, per=6, k=24):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    shared = basis[-1]
    T_s = unit(basis[:per] + 1.0 * shared)
    T_t = unit(basis[per:2 * per] + 1.0 * shared)

    def concepts(T):
        mix = rng.random((k, len(T))) * (rng.random((k, len(T))) < 0.3) + np.eye(len(T))[rng.integers(0, len(T), k)]
        return unit(mix @ T + 0.05 * rng.normal(size=(k, d)))

    def images(T, n, s):
        r = np.random.default_rng(s)
        y = r.integers(0, len(T), n)
        return unit(T[y] + 1.2 * r.normal(size=(n, d)) / np.sqrt(d)), y

    return T_s, T_t, concepts(T_s), concepts(T_t), images


def test_generalized_zero_shot_accuracy_by_hand():
    T_seen = np.eye(3)[:2]
    T_unseen = np.eye(3)[2:]
    V_seen, y_seen = np.eye(3)[:2], np.array([0, 1])
    V_unseen = unit(np.array([[0.1, 0.0, 1.0], [0.9, 0.0, 0.5]]))  # the second is nearer seen class 0
    out = metrics.gzsl(np.eye(3), T_seen, V_seen, y_seen, T_unseen, V_unseen, np.array([0, 0]))
    assert out["acc_clip_seen"] == out["acc_clip_seen_gzsl"] == 1.0
    assert out["acc_clip_unseen"] == 1.0  # alone, the one unseen class always wins
    assert out["acc_clip_unseen_gzsl"] == 0.5  # with the seen classes competing, one is lost
    assert out["hm_clip"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert all(out[k.replace("clip", "ezpc")] == out[k] for k in out if "clip" in k)  # A = I is CLIP itself


def test_the_authors_transfer_protocol_needs_the_union_of_the_vocabularies():
    from jobs.ezpc.job import Config, transfer_gzsl

    T_s, T_t, C_s, C_t, images = _two_domains()
    V_tr, y_tr = images(T_s, 240, 1)
    data_s = (V_tr, y_tr, *images(T_s, 200, 2))
    data_t = (*images(T_t, 10, 3), *images(T_t, 200, 4))
    config = Config.model_validate({
        "backbones": ["tiny:clip"], "train": {"epochs": 300, "logit_scale": 30.0, "torch_threads": 1},
        "datasets": [{"name": "s", "spec": "synthetic:ezpc_shapes", "concepts": ["shapes"]}]})
    source = {"name": "s", "concepts": [f"s{j}" for j in range(len(C_s))], "C": C_s, "T": T_s, "data": data_s}
    target = {"name": "t", "concepts": [f"t{j}" for j in range(len(C_t))] + ["s0"],
              "C": np.concatenate([C_t, C_s[:1]]), "T": T_t, "data": data_t}
    row = transfer_gzsl(source, target, config, seed=0)
    assert row["n_concepts"] == len(C_s) + len(C_t)  # the union ("s0" is in both)
    assert row["n_seen_classes"] == 6 and row["n_unseen_classes"] == 6
    assert row["acc_clip_unseen_gzsl"] > 0.6
    assert row["acc_ezpc_unseen_gzsl"] > 0.85 * row["acc_clip_unseen_gzsl"]
    assert row["hm_ezpc"] > 0.85 * row["hm_clip"]
    # the source's vocabulary alone does not span the target's classes: unseen accuracy collapses
    A_src = train_projection(C_s, V_tr, np.concatenate([T_s, T_t]), epochs=300, logit_scale=30.0, threads=1).A
    alone = metrics.gzsl(A_src, T_s, *data_s[2:], T_t, *data_t[2:])
    assert alone["acc_ezpc_unseen_gzsl"] < 0.5 * row["acc_ezpc_unseen_gzsl"]


# ---- SigLIP's logit bias --------------------------------------------------------------------------
def test_the_logit_bias_cancels_in_the_softmax_and_counts_in_the_sigmoid():
    rng = np.random.default_rng(0)
    C = torch.tensor(unit(rng.normal(size=(12, 16))), dtype=torch.float32)
    T = torch.tensor(unit(rng.normal(size=(5, 16))), dtype=torch.float32)
    V = torch.tensor(unit(rng.normal(size=(9, 16))), dtype=torch.float32)
    A = torch.tensor(unit((C.numpy().T + 0.3 * rng.normal(size=(16, 12))).T).T, dtype=torch.float32)
    soft = [float(ezpc_loss(A, C, V, T, 1.0, 10.0, logit_bias=b)[1]) for b in (0.0, -12.0)]
    assert soft[0] == pytest.approx(soft[1], rel=1e-5)
    sig = [float(ezpc_loss(A, C, V, T, 1.0, 10.0, objective="sigmoid", logit_bias=b)[1]) for b in (0.0, -12.0)]
    assert abs(sig[0] - sig[1]) > 0.5 * sig[1]
    z_p = 10.0 * (V @ T.T).double() - 12.0
    z_q = 10.0 * (V @ A @ A.T @ T.T).double() - 12.0
    p, q = torch.sigmoid(z_p), torch.sigmoid(z_q)
    hand = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(dim=1).mean()
    assert sig[1] == pytest.approx(float(hand), rel=1e-4)
    assert float(sigmoid_kl(z_p, z_p)) == pytest.approx(0.0, abs=1e-12)


def test_logit_scale_and_bias_are_read_from_the_open_clip_model():
    from explab.models.encoders import load_encoder

    model = load_encoder("tiny:clip").model
    assert logit_params(model) == pytest.approx((1 / 0.07, 0.0), rel=1e-5)  # CLIP: no bias
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model.logit_bias = torch.nn.Parameter(torch.tensor([-7.0]))  # a SigLIP-style bias, planted
    scale, bias = logit_params(model)
    assert (scale, bias) == pytest.approx((20.0, -7.0))
    image = torch.rand(2, 3, 32, 32)
    text = torch.randint(0, 400, (3, 32))
    expected = model.get_logits(image, text)[0]  # open_clip's own zero-shot logits
    cos = model.encode_image(image, normalize=True) @ model.encode_text(text, normalize=True).T
    torch.testing.assert_close(scale * cos + bias, expected)


# ---- concept-region heatmaps --------------------------------------------------------------------
def test_a_planted_patch_lights_up_for_its_concept():
    rng = np.random.default_rng(0)
    d = 24
    A = unit(rng.normal(size=(3, d))).T  # three concept directions (columns)
    patches = 0.05 * rng.normal(size=(1, 4, 4, d)) + unit(rng.normal(size=d))
    patches[0, 2, 1] += 2 * A[:, 0]
    patches[0, 0, 3] += 2 * A[:, 1]
    maps = regions.upsample(regions.concept_maps(patches, A, np.array([[0, 1]])), (32, 32))
    assert maps.shape == (1, 2, 32, 32) and maps.min() >= -1e-6 and maps.max() <= 1 + 1e-6
    r, c = np.unravel_index(maps[0, 0].argmax(), (32, 32))
    assert 16 <= r < 24 and 8 <= c < 16  # patch (2, 1) at 8 px per patch
    r, c = np.unravel_index(maps[0, 1].argmax(), (32, 32))
    assert 0 <= r < 8 and 24 <= c < 32  # patch (0, 3)


def test_heatmaps_through_the_tiny_clip_tower_find_the_planted_patch():
    from explab.models.encoders import load_encoder

    encoder = load_encoder("tiny:clip")
    image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    pixels = torch.stack([encoder.processor(regions.to_pil(image))])
    tokens = regions.patch_tokens(encoder.model, pixels)[0].numpy()  # (4, 4, d)
    assert tokens.shape == (4, 4, encoder.model.visual.output_dim)
    A = unit(np.stack([tokens[1, 2], tokens[3, 0]])).T  # each concept is one patch's own embedding
    shown, maps = regions.heatmaps(encoder, [image], A, np.array([[0, 1]]))
    assert shown[0].size == (32, 32) and maps.shape == (1, 2, 32, 32)
    r, c = np.unravel_index(maps[0, 0].argmax(), (32, 32))
    assert 8 <= r < 16 and 16 <= c < 24
    r, c = np.unravel_index(maps[0, 1].argmax(), (32, 32))
    assert 24 <= r < 32 and 0 <= c < 8


@pytest.fixture
def tiny_siglip(tmp_path):
    """open_clip's timm tower as its SigLIP configs build it (``timm_pool: map``, ``timm_proj: none``) around a
    2-block, 32-wide, 8-px-patch SigLIP ViT (timm's ``vit_base_patch16_siglip_224`` made tiny), random, offline."""
    import open_clip
    from open_clip.timm_model import TimmModel

    folder = tmp_path / "tiny-siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_siglip_224", "pretrained_cfg": {},
        "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}}))
    torch.manual_seed(0)
    tower = TimmModel(f"local-dir:{folder}", embed_dim=32, image_size=32, pool="map", proj="none").eval()
    return types.SimpleNamespace(model=types.SimpleNamespace(visual=tower), device="cpu", dtype=torch.float32,
                                 processor=open_clip.image_transform(32, is_train=False))


def test_siglip_patch_tokens_are_what_the_map_head_pools(tiny_siglip):
    visual = tiny_siglip.model.visual
    with torch.no_grad():
        visual.trunk.pos_embed.zero_()  # a flat image then gives every patch the same trunk token
    pixels = torch.stack([tiny_siglip.processor(regions.to_pil(np.full((32, 32, 3), c, np.uint8)))
                          for c in (40, 200)])
    tokens = regions.patch_tokens(tiny_siglip.model, pixels)
    assert tokens.shape == (2, 4, 4, 32)
    with torch.inference_mode():
        pooled = visual(pixels)  # SigLIP's own image embedding, through its attention-pool head
    # equal tokens: the pool's attention mixes copies of one value, so each patch's projection is the embedding
    torch.testing.assert_close(tokens, pooled[:, None, None, :].expand_as(tokens), atol=1e-5, rtol=1e-5)


def test_siglip_heatmap_peaks_where_the_planted_concept_is(tiny_siglip):
    red, grey = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 128, np.uint8)
    red[..., 0] = 255
    image = grey.copy()
    image[16:24, 8:16] = red[16:24, 8:16]  # patch (2, 1) of the 4 × 4 grid is red
    with torch.inference_mode():  # the concepts: the tower's pooled embeddings of a red and a grey image
        pixels = torch.stack([tiny_siglip.processor(regions.to_pil(im)) for im in (red, grey)])
        A = unit(tiny_siglip.model.visual(pixels).numpy().astype(np.float64)).T
    patches = regions.patch_tokens(tiny_siglip.model, torch.stack([tiny_siglip.processor(regions.to_pil(image))]))
    assert regions.concept_maps(patches.numpy(), A, np.array([[0, 1]])).shape == (1, 2, 4, 4)  # the patch grid
    shown, maps = regions.heatmaps(tiny_siglip, [image], A, np.array([[0, 1]]))
    assert shown[0].size == (32, 32) and maps.shape == (1, 2, 32, 32)
    r, c = np.unravel_index(maps[0, 0].argmax(), (32, 32))
    assert 16 <= r < 24 and 8 <= c < 16  # "red" peaks on the red patch
    r, c = np.unravel_index(maps[0, 1].argmin(), (32, 32))
    assert 16 <= r < 24 and 8 <= c < 16  # and "grey" is lowest there


# ---- the shipped paper-size configs ----------------------------------------------------------------
def test_paper_vocabularies_are_lf_cbm_files_by_url_and_generated_ones_are_filtered():
    from explab.config import load_config
    from explab.job import get_job

    job = get_job("ezpc")
    paper = load_config(job.config, job.config_path("paper"), [])
    for ds in paper.datasets:  # validated offline: the URLs are fetched only when the job runs
        assert ds.concepts and all(vocab.is_url(c) and "Label-free-CBM" in c for c in ds.concepts), ds.name
        assert any(c.endswith("/imagenet_filtered.txt") for c in ds.concepts)
    assert any("SigLIP" in b.name for b in paper.backbones)
    generated = load_config(job.config, job.config_path("generated"), [])
    cc = generated.concepts
    assert cc.source == "llm" and (cc.max_length, cc.max_class_similarity, cc.max_concept_similarity) == (30, 0.85,
                                                                                                          0.9)


def test_dry_run_lists_the_generator_only_when_a_vocabulary_comes_from_it(cli, monkeypatch):
    monkeypatch.chdir(ROOT)  # the repository's cluster.yaml is the cluster compared against
    code, out, err = cli("run", "ezpc", "-c", "paper", "--dry-run")
    assert code == 0, out + err
    assert "Qwen" not in out and "concepts.server" not in out  # paper.yaml reads its vocabularies from files
    assert "train.num_gpus" in out and "embed.num_gpus" in out  # what it does start is listed
    assert "GPUs if all at once: 2;" in out  # training 1 + the image and text pipelines' 0.5 each
    for args in (["-c", "generated"], ["-c", "paper", "--set", "concepts.source=llm"]):
        code, out, err = cli("run", "ezpc", *args, "--dry-run")
        assert code == 0 and "Qwen/Qwen2.5-7B-Instruct" in out and "concepts.server" in out, out + err
        assert "GPUs if all at once: 3;" in out  # and the generator's 1


def test_backbones_embed_in_fp16_by_default_as_the_authors_run_clip():
    from explab.config import load_config
    from explab.job import get_job
    from jobs.ezpc.job import Config

    assert [b.model.dtype for b in Config().backbones] == ["float16"]
    job = get_job("ezpc")
    for name in ("paper", "generated"):
        assert {b.model.dtype for b in load_config(job.config, job.config_path(name), []).backbones} == {"float16"}
