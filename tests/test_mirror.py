"""Runs folders on object storage: a real S3-compatible server (moto, in server mode on 127.0.0.1),
reached through pyarrow's S3 filesystem exactly as a cloud bucket would be."""

import json
import os
from pathlib import Path

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
