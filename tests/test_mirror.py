"""Runs folders on object storage: a real S3-compatible server (moto, in server mode on 127.0.0.1),
reached through pyarrow's S3 filesystem exactly as a cloud bucket would be."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from explab import mirror

BUCKET = "explab-runs"


@pytest.fixture(scope="module")
def s3():
    """The local S3 server (its address and credentials are in the environment, see conftest)."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])  # chosen by conftest before Ray started
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def keys(client, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_a_uri_maps_to_one_mirror_folder_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "m"))
    local = mirror.local_for("s3://bucket/a/b")
    assert local == (tmp_path / "m/s3/bucket/a/b").resolve()
    assert mirror.uri_for(local / "x.json") == "s3://bucket/a/b/x.json"
    assert mirror.uri_for(local / ".run.partial/x.json") is None  # hidden: being created
    assert mirror.uri_for(tmp_path / "elsewhere") is None
    assert mirror.is_uri("s3://bucket/a") and not mirror.is_uri("runs") and not mirror.is_uri(Path("s3:/x"))
    for bad in ("s3://bucket/a?endpoint_override=x", "s3:///nobucket", "s3://bucket/../up"):
        with pytest.raises(mirror.MirrorError):
            mirror.local_for(bad)


def test_a_run_writes_to_the_bucket_and_another_machine_reads_it_back(s3, tmp_path, monkeypatch, ray_local, cli):
    uri = f"s3://{BUCKET}/runs"
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-a"))
    code, out, err = cli("run", "quadratic", "-c", "tiny", "--set", "steps=3", "--runs-dir", uri)
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    run_id = run_dir.name
    stored = keys(s3, f"runs/quadratic/{run_id}/")
    for name in ("manifest.json", "config.yaml", "result.json", "metrics.parquet"):
        assert f"runs/quadratic/{run_id}/{name}" in stored, stored
    assert not [k for k in stored if "metrics.parts" in k or k.endswith(".tmp")]  # removed there too
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/quadratic/{run_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "completed"

    # another machine: an empty mirror, the same bucket
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-b"))
    code, out, err = cli("runs", "--runs-dir", uri)
    assert code == 0 and run_id in out and "completed" in out, out + err
    code, out, err = cli("show", run_id, "--runs-dir", uri)
    assert code == 0 and "objective" in out, out + err
    assert (tmp_path / "node-b/s3" / BUCKET / "runs/quadratic" / run_id / "result.json").is_file()


def test_sweep_trials_write_their_runs_to_the_bucket(s3, tmp_path, monkeypatch, ray_local, cli):
    uri = f"s3://{BUCKET}/sweeps-test"
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "driver"))
    spec = {"job": "quadratic", "base": {"config": "tiny", "overrides": ["steps=2"]},
            "space": {"x": {"type": "uniform", "low": -5.0, "high": 5.0}},
            "metric": "objective", "mode": "max", "num_samples": 2, "sampler": "random", "seed": 1}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = cli("sweep", str(tmp_path / "s.yaml"), "--runs-dir", uri)
    assert code == 0, err
    sweep_id = Path(out.strip().splitlines()[-1]).name
    stored = keys(s3, f"sweeps-test/sweeps/quadratic/{sweep_id}/")
    prefix = f"sweeps-test/sweeps/quadratic/{sweep_id}/"
    for name in ("manifest.json", "trials.parquet", "best.json", "sweep.yaml"):
        assert prefix + name in stored, stored
    trial_results = [k for k in stored if k.startswith(prefix + "trials/") and k.endswith("/result.json")]
    assert len(trial_results) == 2, stored  # each trial's run directory, written by its trial actor
    assert any(k.startswith(prefix + "tune/") for k in stored)  # Tune's state: --resume from anywhere


def test_an_unreachable_bucket_is_one_line_before_anything_starts(s3, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "m"))
    code, _, err = cli("run", "quadratic", "-c", "tiny", "--runs-dir", "s3://no-such-bucket/runs")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "s3://no-such-bucket/runs" in lines[0], err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").rglob("manifest.json"))


# ---- EXPLAB_CACHE on the object store ------------------------------------------------------------
TEXTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "a grey cross"]


@pytest.fixture
def counted_compute(monkeypatch):
    """Counts the embedding computations (a cache hit, local or brought down from the store, computes nothing)."""
    from explab import embeddings

    calls = []
    real = embeddings._compute

    def compute(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings, "_compute", compute)
    return calls


def test_a_cache_entry_computed_on_one_machine_is_reused_on_another(s3, tmp_path, monkeypatch, counted_compute):
    from explab.embeddings import embed

    monkeypatch.setenv("EXPLAB_CACHE", f"s3://{BUCKET}/cache-reuse")
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-a"))
    first = embed("tiny:clip", TEXTS, options={"engine": "local", "batch_size": 2, "shard_rows": 2})
    assert not first.cached and counted_compute == ["tiny:clip"]
    stored = keys(s3, "cache-reuse/embeddings/")
    assert any(k.endswith("/meta.json") for k in stored) and len([k for k in stored if k.endswith(".parquet")]) == 3
    assert not [k for k in stored if "/." in k]  # no lock, staging or temporary file went up

    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-b"))  # another machine: an empty mirror
    second = embed("tiny:clip", TEXTS, options={"engine": "local", "batch_size": 2, "shard_rows": 2})
    assert second.cached and counted_compute == ["tiny:clip"]  # brought down, not recomputed
    assert second.path.is_relative_to((tmp_path / "node-b").resolve())
    assert np.array_equal(second.array(), first.array())


def test_an_upload_cut_short_is_never_seen_by_another_machine(s3, tmp_path, monkeypatch, counted_compute):
    from explab.embeddings import embed

    monkeypatch.setenv("EXPLAB_CACHE", f"s3://{BUCKET}/cache-cut")
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-a"))
    real_upload, uploaded = mirror._upload_file, []

    def crash_after_one_file(fs, path, key):  # node a dies after its first file reached the store
        if uploaded:
            raise OSError("connection reset")
        uploaded.append(key)
        real_upload(fs, path, key)

    monkeypatch.setattr(mirror, "_upload_file", crash_after_one_file)
    with pytest.raises(mirror.MirrorError, match="cannot upload the cache entry"):
        embed("tiny:clip", TEXTS, options={"engine": "local", "batch_size": 2, "shard_rows": 2})
    stored = keys(s3, "cache-cut/embeddings/")
    assert len(stored) == 1 and stored[0].endswith(".parquet")  # part of the entry is there, its marker is not

    monkeypatch.setattr(mirror, "_upload_file", real_upload)
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-b"))
    again = embed("tiny:clip", TEXTS, options={"engine": "local", "batch_size": 2, "shard_rows": 2})
    assert not again.cached and len(counted_compute) == 2  # the half entry was not used: b computed it
    assert any(k.endswith("/meta.json") for k in keys(s3, "cache-cut/embeddings/"))  # and published it whole


def test_a_single_file_cache_entry_goes_up_when_written_and_comes_down_where_missing(s3, tmp_path, monkeypatch):
    from explab import store
    from explab.paths import cache_dir

    monkeypatch.setenv("EXPLAB_CACHE", f"s3://{BUCKET}/cache-files")
    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-a"))
    path = cache_dir("answers") / "key.json"
    assert not mirror.pull_entry(path)  # nowhere yet
    store.write_json(path, {"rows": [1, 2, 3]})
    assert keys(s3, "cache-files/") == ["cache-files/answers/key.json"]

    monkeypatch.setenv("EXPLAB_MIRROR", str(tmp_path / "node-b"))
    there = cache_dir("answers") / "key.json"
    assert there != path and not there.exists()
    assert mirror.pull_entry(there) and json.loads(there.read_text()) == {"rows": [1, 2, 3]}
