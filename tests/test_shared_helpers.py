"""The platform's one home for helpers the jobs used to copy: seeds, the shape generator, encoder specs,
Ray Data frames and the remote-error unwrapping."""

import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from explab.errors import ConfigError, ExplabError, ModelError, user_error
from explab.seeds import derive_seed, rng_for


def test_one_derive_seed_is_stable_and_is_the_one_every_job_uses():
    import jobs.apm.job
    import jobs.apm.users
    import jobs.cot_robustness.job
    import jobs.cot_robustness.stages

    # an exact value, pinned (the same parts give the same seed in every process and on every machine)
    # and rebuilt from the documented algorithm: words (an int as is, else CRC-32) mixed by SeedSequence
    a, b = np.random.SeedSequence([0, zlib.crc32(b"apm-users")]).generate_state(2, dtype=np.uint32)
    assert derive_seed(0, "apm-users") == (int(a) << 31) ^ int(b) == 7597107328547050650
    assert derive_seed(0, "a") != derive_seed(0, "b") and derive_seed(1, "a") != derive_seed(0, "a")
    assert 0 <= derive_seed("x", -3, 2.5) < 2**63
    assert np.array_equal(rng_for(3, "x").integers(0, 100, 5),
                          np.random.default_rng(derive_seed(3, "x")).integers(0, 100, 5))
    for module in (jobs.apm.job, jobs.apm.users, jobs.cot_robustness.job, jobs.cot_robustness.stages):
        assert module.derive_seed is derive_seed


def test_shape_rows_are_balanced_seeded_and_draw_what_the_caption_says():
    from explab.shapes import COLOURS, shape_rows

    rows = shape_rows(n=48, seed=1, stream=0, colours=("red", "blue"), shapes=("circle", "square", "cross"))
    assert np.bincount([r["label"] for r in rows]).tolist() == [8] * 6
    again = shape_rows(n=48, seed=1, stream=0, colours=("red", "blue"), shapes=("circle", "square", "cross"))
    other = shape_rows(n=48, seed=1, stream=1, colours=("red", "blue"), shapes=("circle", "square", "cross"))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(rows, again, strict=True))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(rows, other, strict=True))
    for r in rows:  # the shape's pixels are the caption's colour: the closest palette colour of the
        img = r["image"].reshape(-1, 3).astype(float)  # pixels farthest from the grey background
        far = img[np.argsort(np.abs(img - img.mean(axis=1, keepdims=True)).sum(axis=1))[-10:]].mean(axis=0)
        nearest = min(("red", "blue"), key=lambda c: np.linalg.norm(far - np.asarray(COLOURS[c])))
        assert nearest == r["colour"] and r["caption"] == f"a {r['colour']} {r['shape']}"
    with pytest.raises(ConfigError, match="unknown colour/shape mauve"):
        shape_rows(n=2, colours=("mauve",))


def test_encoder_spec_holds_a_model_spec_and_every_old_spelling_round_trips():
    from explab.models import EncoderSpec, ModelSpec

    for name, kind, model in [("tiny:clip", "open_clip", "tiny:clip"), ("open_clip:RN50/openai", "open_clip", "RN50"),
                              ("open_clip:hf-hub:org/repo", "open_clip", "hf-hub:org/repo"),
                              ("hf:facebook/dinov2-large", "hf_vision", "facebook/dinov2-large"),
                              ("st:sentence-transformers/all-mpnet-base-v2", "sentence_transformers",
                               "sentence-transformers/all-mpnet-base-v2")]:
        spec = EncoderSpec.of(name)
        assert (spec.kind, spec.model.name, spec.name) == (kind, model, name)
        assert EncoderSpec.model_validate(spec.model_dump()) == spec
    spec = EncoderSpec.of({"name": "hf:x", "pooling": "mean", "device": "cpu", "dtype": "float16", "revision": "r1"})
    assert spec.model == ModelSpec(name="x", device="cpu", dtype="float16", revision="r1") and spec.pooling == "mean"
    assert EncoderSpec.of("open_clip:RN50/openai").pretrained == "openai"
    with pytest.raises(ConfigError, match="only tiny encoder is tiny:clip"):
        EncoderSpec.of("tiny:llama")


def test_plain_frame_turns_arrow_lists_into_python_lists():
    from explab.data import plain_frame

    frame = pd.DataFrame({"v": pd.Series([[1, 2], [3]], dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
                          "s": pd.Series(["a", None], dtype=pd.ArrowDtype(pa.string())), "n": [1.5, 2.0]})
    out = plain_frame(frame)
    assert out["v"].tolist() == [[1, 2], [3]] and out["v"].dtype == object
    assert not isinstance(out["s"].dtype, pd.ArrowDtype) and out["s"].tolist()[0] == "a"
    assert out["n"].tolist() == [1.5, 2.0]


def test_user_error_finds_the_explab_error_behind_a_wrapped_or_remote_failure():
    try:
        try:
            raise ModelError("bad model: fix it")
        except ModelError as inner:
            raise RuntimeError("actor died") from inner
    except RuntimeError as err:
        found = user_error(err)
    assert type(found) is ModelError and str(found) == "bad model: fix it"
    remote = RuntimeError("Traceback (most recent call last):\n  ...\nexplab.errors.ConfigError: field 'x': fix it\n")
    assert type(user_error(remote)) is ConfigError and str(user_error(remote)) == "field 'x': fix it"
    assert user_error(ValueError("plain")) is None
    assert issubclass(ConfigError, ExplabError)


def test_unit_rows_scales_each_row_to_norm_one_and_keeps_zero_rows_and_dtype():
    import numpy as np

    from explab.vectors import unit_rows

    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float32)
    out = unit_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(unit_rows(np.array([0.0, 2.0])), [0.0, 1.0])  # a single vector


def test_cache_entry_is_built_once_atomically_and_refused_without_its_marker(tmp_path):
    import threading
    import time

    from explab import cache

    calls = []

    def build(staging):
        calls.append(staging)
        time.sleep(0.2)  # the other callers arrive while this one builds
        (staging / "data.txt").write_text("x")
        (staging / "meta.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.entry(tmp_path / "e", build)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.cached for r in results) == [False, True, True]
    assert (tmp_path / "e" / "data.txt").read_text() == "x"

    def broken(staging):
        (staging / "half.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cache.entry(tmp_path / "f", broken)
    with pytest.raises(ExplabError, match="wrote no meta.json"):
        cache.entry(tmp_path / "g", lambda staging: (staging / "x").write_text("x"))
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["e"]  # no half entry, no staging directory

    again = cache.entry(tmp_path / "e", build, refresh=True)
    assert not again.cached and len(calls) == 2
    assert cache.digest({"b": 1, "a": [1, 2]}) == cache.digest({"a": [1, 2], "b": 1})
