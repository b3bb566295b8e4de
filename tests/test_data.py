"""Dataset specs → Ray Datasets, and clear errors for bad specs."""

import pandas as pd
import pytest

from explab.data import load_dataset, register_synthetic
from explab.errors import ExplabError


@register_synthetic("squares")
def _squares(n: int = 5, seed: int = 0):
    return [{"x": i, "y": i * i + seed} for i in range(n)]


def test_synthetic_and_parquet_specs(ray_local, tmp_path):
    ds = load_dataset("synthetic:squares", seed=2, n=4)
    assert ds.to_pandas()["y"].tolist() == [2, 3, 6, 11]
    pd.DataFrame({"a": range(10)}).to_parquet(tmp_path / "t.parquet")
    ds = load_dataset(f"parquet:{tmp_path / 't.parquet'}", limit=3)
    assert ds.count() == 3
    doubled = load_dataset("synthetic:squares", n=6).map_batches(lambda b: {"z": b["x"] * 2}, batch_format="numpy")
    assert sorted(doubled.to_pandas()["z"]) == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("spec, needle", [
    ("squares", "needs a scheme"),
    ("synthetic:nope", "unknown synthetic dataset 'nope'"),
    ("parquet:/no/such/file.parquet", "does not exist"),
    ("ftp:x", "unknown dataset scheme 'ftp'"),
])
def test_bad_dataset_specs(ray_local, spec, needle):
    with pytest.raises(ExplabError, match=needle):
        load_dataset(spec)


def test_synthetic_registry_refuses_a_taken_name_and_lists_the_known_ones_on_a_miss():
    from explab.data import synthetic_names, synthetic_rows
    from explab.errors import ConfigError

    def other(seed: int = 0):
        return [{"x": -1}]

    register_synthetic("squares", _squares)  # the same function again: a no-op
    with pytest.raises(ConfigError, match=r"'squares' is already registered by .*_squares: give .*other another"):
        register_synthetic("squares", other)
    assert synthetic_rows("squares", n=2) == [{"x": 0, "y": 0}, {"x": 1, "y": 1}]  # not overwritten
    with pytest.raises(ExplabError) as info:
        synthetic_rows("nope")
    assert "known are" in str(info.value) and "squares" in str(info.value) and "\n" not in str(info.value)
    assert "squares" in synthetic_names()


def test_jobs_declare_their_synthetic_datasets_and_registering_a_job_again_is_harmless():
    from explab.data import synthetic_names
    from explab.job import discover

    jobs = discover()
    declared = {name: job for job in jobs.values() for name in job.synthetic}
    assert {"mmlu_pro", "cot_arithmetic", "cot_logic", "ezpc_shapes", "sotalign_shapes"} <= set(declared)
    assert set(declared) <= set(synthetic_names())
    assert discover().keys() == jobs.keys()  # re-discovery re-registers the same functions without error


def test_load_dataset_and_read_rows_give_the_same_rows_for_every_local_scheme(ray_local, tmp_path):
    import os

    import numpy as np
    from PIL import Image

    from explab.data import read_rows, resolve_source

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), i * 50, np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    pd.DataFrame({"a": range(5), "b": list("vwxyz")}).to_parquet(tmp_path / "t.parquet")
    pd.DataFrame({"a": range(5), "b": list("vwxyz")}).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    for spec, kwargs in [(f"imagefolder:{tmp_path / 'imgs'}", {}), (f"parquet:{tmp_path / 't.parquet'}", {}),
                         (f"jsonl:{tmp_path / 't.jsonl'}", {}), ("synthetic:squares", {"n": 4})]:
        rows = read_rows(spec, seed=1, limit=3, **kwargs)
        through_ray = load_dataset(spec, seed=1, limit=3, **kwargs).take_all()
        assert len(rows) == 3 and [dict(r) for r in through_ray] == rows, spec
    assert [r["label"] for r in read_rows(f"imagefolder:{tmp_path / 'imgs'}")] == ["cat", "cat", "dog", "dog"]
    # a source's key follows the files' contents (it keys the embedding cache)
    before = resolve_source(f"parquet:{tmp_path / 't.parquet'}").key
    st = (tmp_path / "t.parquet").stat()
    os.utime(tmp_path / "t.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_source(f"parquet:{tmp_path / 't.parquet'}").key != before


def test_disk_scheme_reads_a_save_to_disk_dataset_and_the_split_of_a_dataset_dict(tmp_path):
    import datasets

    from explab.data import read_rows

    rows = {"q": ["a", "b", "c"], "n": [1, 2, 3]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert read_rows(f"disk:{tmp_path / 'one'}", limit=2) == [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    assert [r["n"] for r in read_rows(f"disk:{tmp_path / 'dict'}", split="test")] == [1, 2, 3]
    with pytest.raises(ExplabError, match="no split 'train'"):
        read_rows(f"disk:{tmp_path / 'dict'}")
