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
