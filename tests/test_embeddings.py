"""The embedding pipeline: vectors equal the encoders called directly, cache hits load nothing."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from explab.embeddings import EmbedOptions, EncoderSpec, cache_root, embed, load_embeddings
from explab.errors import ConfigError, ExplabError
from explab.models import load_model, save_tiny

LOCAL = {"engine": "local", "batch_size": 3}


def _images(n, seed=0, size=(28, 36)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip():
    return load_model("tiny:clip")


def test_tiny_clip_through_ray_equals_direct_calls(tmp_path, ray_local, clip):
    texts = [f"a photo of object number {i}" for i in range(11)]
    images = _images(9)
    opts = EmbedOptions(batch_size=4, concurrency=1)
    t = embed("tiny:clip", texts, options=opts, cache_dir=tmp_path)
    v = embed("tiny:clip", images, options=opts, cache_dir=tmp_path)
    with torch.no_grad():
        ref_t = clip.model.encode_text(clip.tokenizer(texts)).numpy()
        ref_v = clip.model.encode_image(torch.stack([clip.processor(Image.fromarray(x)) for x in images])).numpy()
    assert (t.modality, v.modality) == ("text", "image") and not t.cached and not v.cached
    assert t.array().shape == (11, 32) and v.array().shape == (9, 32)
    np.testing.assert_allclose(t.array(), ref_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v.array(), ref_v, rtol=1e-5, atol=1e-5)
    # rows come back in dataset order with their index
    assert t.frame()["index"].tolist() == list(range(11))


def test_parquet_images_keep_columns_in_order_through_ray(tmp_path, ray_local, clip):
    images = _images(10, seed=1, size=(24, 24))
    frame = pd.DataFrame({"image": [{"bytes": _png(x), "path": None} for x in images],  # an HF Image feature
                          "label": [i % 3 for i in range(10)], "name": [f"img{i}" for i in range(10)]})
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    out = embed("tiny:clip", f"parquet:{path}", modality="image", keep=["label", "name"],
                options=EmbedOptions(batch_size=3), cache_dir=tmp_path / "cache")
    got = out.frame()
    assert got["name"].tolist() == frame["name"].tolist() and got["label"].tolist() == frame["label"].tolist()
    with torch.no_grad():
        ref = clip.model.encode_image(torch.stack([clip.processor(Image.fromarray(x)) for x in images])).numpy()
    np.testing.assert_allclose(out.array(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(got["embedding"]), out.array())


def test_second_call_is_a_cache_hit_that_loads_no_encoder(tmp_path, ray_local, monkeypatch):
    import explab.embeddings as emb

    texts = ["a red square", "a blue circle", "a green cross"]
    cache = tmp_path / "cache"
    first = embed("tiny:clip", texts, options=EmbedOptions(batch_size=2), cache_dir=cache)
    assert not first.cached and first.n == 3
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not compute or load an encoder")

    monkeypatch.setattr(emb, "_compute", forbidden)  # the only way to Ray Data and the actors
    monkeypatch.setattr(emb.Encoder, "__init__", forbidden)
    second = embed("tiny:clip", texts, options=EmbedOptions(batch_size=2), cache_dir=cache)
    assert second.cached and second.path == first.path
    np.testing.assert_array_equal(second.array(), first.array())
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files  # nothing rewritten
    with pytest.raises(AssertionError, match="must not compute"):  # while another dataset would compute
        embed("tiny:clip", texts[:2], options=EmbedOptions(batch_size=2), cache_dir=cache)


def test_a_local_encoder_directory_is_keyed_by_its_weights(tmp_path):
    model_dir = save_tiny("tiny:clip", tmp_path / "clip")
    texts = ["a red square", "a blue circle"]
    kw = {"options": LOCAL, "cache_dir": tmp_path / "cache"}
    first = embed(str(model_dir), texts, **kw)
    assert embed(str(model_dir), texts, **kw).cached
    np.testing.assert_allclose(first.array(), embed("tiny:clip", texts, **kw).array(), atol=1e-6)  # same weights
    weights = model_dir / "open_clip_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "new" weights
    again = embed(str(model_dir), texts, **kw)
    assert not again.cached and again.path != first.path


def test_cache_key_follows_encoder_data_column_and_file_contents(tmp_path):
    path = tmp_path / "texts.parquet"
    pd.DataFrame({"text": ["one", "two"], "caption": [["uno", "eins"], ["dos", "zwei"]]}).to_parquet(path)
    spec = f"parquet:{path}"
    kw = {"options": LOCAL, "cache_dir": tmp_path / "c"}
    a = embed("tiny:clip", spec, modality="text", **kw)
    assert embed("tiny:clip", spec, modality="text", **kw).cached
    b = embed("tiny:clip", spec, modality="text", column="caption", **kw)  # first caption of each list
    assert not b.cached and b.path != a.path
    np.testing.assert_allclose(b.array(), embed("tiny:clip", ["uno", "dos"], **kw).array(), atol=1e-6)
    c = embed({"name": "tiny:clip", "normalize": True}, spec, modality="text", **kw)
    assert not c.cached and np.allclose(np.linalg.norm(c.array(), axis=1), 1.0, atol=1e-5)
    pd.DataFrame({"text": ["one", "three"], "caption": [["x"], ["y"]]}).to_parquet(path)  # the file changes
    d = embed("tiny:clip", spec, modality="text", **kw)
    assert not d.cached and not np.allclose(d.array()[1], a.array()[1])
    meta = json.loads((d.path / "meta.json").read_text())
    assert meta["n"] == 2 and meta["dim"] == 32 and meta["column"] == "text"


def test_hf_vision_encoder_cls_and_mean_pooling(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32},
                      crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    images = _images(5, seed=2)
    model = AutoModel.from_pretrained(tmp_path / "dino").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "dino")
    with torch.no_grad():
        hidden = model(**processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")).last_hidden_state
    for pooling, ref in (("cls", hidden[:, 0]), ("mean", hidden[:, 1:].mean(1))):
        out = embed({"name": f"hf:{tmp_path / 'dino'}", "pooling": pooling}, images, options=LOCAL,
                    cache_dir=tmp_path / "c")
        assert out.modality == "image"
        np.testing.assert_allclose(out.array(), ref.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExplabError, match="encodes images only"):
        embed(f"hf:{tmp_path / 'dino'}", ["a text"], modality="text", options=LOCAL, cache_dir=tmp_path / "c")


def test_sentence_transformers_encoder_built_offline(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "a photo of the cat dog car bird tree house red blue green small big".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    model = st.SentenceTransformer(modules=[Transformer(str(tmp_path / "bert"), max_seq_length=32),
                                            Pooling(32, "mean")], device="cpu")
    model.save(str(tmp_path / "st"))
    texts = ["a photo of the cat", "a big red car", "small green tree", "the dog"]
    for name in (str(tmp_path / "st"), f"st:{tmp_path / 'st'}"):  # detected from the directory, or named
        out = embed(name, texts, options=LOCAL, cache_dir=tmp_path / "c")
        assert out.modality == "text" and out.dim == 32
        ref = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts)
        np.testing.assert_allclose(out.array(), ref, rtol=1e-5, atol=1e-5)


def test_imagefolder_labels_and_load_embeddings(tmp_path, clip):
    rng = np.random.default_rng(3)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / label / f"{i}.png")
    out = embed("tiny:clip", f"imagefolder:{tmp_path / 'imgs'}", modality="image", keep=["label", "path"],
                options=LOCAL, cache_dir=tmp_path / "c")
    frame = load_embeddings(out.path, as_frame=True)
    assert frame["label"].tolist() == ["cat", "cat", "dog", "dog"]
    with torch.no_grad():
        ref = clip.model.encode_image(torch.stack([clip.processor(Image.open(p).convert("RGB"))
                                                   for p in frame["path"]])).numpy()
    np.testing.assert_allclose(load_embeddings(out.path), ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(ConfigError, match="not recognised"):
        embed("no-such-encoder", ["x"], cache_dir=cache)
    with pytest.raises(ConfigError, match="only tiny encoder"):
        EncoderSpec(name="tiny:llama").kind  # noqa: B018 - the property validates
    with pytest.raises(ExplabError, match="pass modality"):
        embed("tiny:clip", f"parquet:{tmp_path}", cache_dir=cache)
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a"]}).to_parquet(path)
    with pytest.raises(ExplabError, match="no column 'caption'"):
        embed("tiny:clip", f"parquet:{path}", modality="text", column="caption", options=LOCAL, cache_dir=cache)
    with pytest.raises(ExplabError, match="does not exist"):
        embed("tiny:clip", "parquet:/no/such/file.parquet", modality="text", cache_dir=cache)
    with pytest.raises(ExplabError, match="not a finished"):
        load_embeddings(tmp_path)
    assert not any(p.name.startswith(("part-", "meta")) for p in cache.rglob("*"))  # nothing half-written


def test_cache_root_follows_env_and_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAB_CACHE", str(tmp_path / "shared"))
    assert cache_root() == tmp_path / "shared" / "embeddings"
    monkeypatch.delenv("EXPLAB_CACHE")
    monkeypatch.setenv("EXPLAB_RUNS_DIR", str(tmp_path / "runs"))
    assert cache_root() == tmp_path / "cache" / "embeddings"


def test_an_actor_pool_taking_every_cpu_is_refused_not_left_to_hang(tmp_path, ray_local):
    import ray

    total = ray.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match="leaving less than one for Ray Data"):
        embed("tiny:clip", ["a cat"], modality="text", options={"num_cpus": total}, cache_dir=tmp_path)
    assert not any(tmp_path.rglob("meta.json"))
