"""The runs store: layout, manifest, atomic writes, failed runs keep what they wrote."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from explab import store
from explab.config import JobConfig
from explab.job import Job
from explab.runs import execute, list_runs, resolve_run


class Cfg(JobConfig):
    steps: int = 3
    fail: bool = False


def _run(config: Cfg, ctx) -> dict:
    for step in range(config.steps):
        ctx.log(loss=1.0 / (step + 1))
    ctx.save_table("scores", pd.DataFrame({"x": [1, 2, 3]}))
    ctx.save_artifact("vectors", {"v": np.arange(4, dtype=np.float32)})
    if config.fail:
        raise RuntimeError("diverged")
    return {"final_loss": ctx.metrics[-1]["loss"], "n": np.int64(3)}


JOB = Job(name="toy", description="toy", config=Cfg, run=_run)


def test_run_directory_layout_and_manifest(tmp_path):
    run_dir, result = execute(JOB, Cfg(seed=5), tmp_path)
    assert result == {"final_loss": pytest.approx(1 / 3), "n": 3}
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "manifest.json", "metrics.parquet", "result.json",
                                                    "tables", "artifacts"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 5 and manifest["ended"]
    assert {"torch", "ray", "transformers"} <= set(manifest["packages"])
    assert "steps: 3" in (run_dir / "config.yaml").read_text()
    assert pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(load_file(str(run_dir / "artifacts" / "vectors.safetensors"))["v"], np.arange(4))
    assert list_runs(tmp_path)[0]["run_id"] == run_dir.name
    assert resolve_run(f"toy/{run_dir.name}", tmp_path) == run_dir


def test_failed_run_is_marked_and_keeps_its_outputs(tmp_path):
    with pytest.raises(RuntimeError, match="diverged"):
        execute(JOB, Cfg(fail=True), tmp_path)
    (run_dir,) = (tmp_path / "toy").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "diverged" in manifest["error"]
    assert (run_dir / "tables" / "scores.parquet").is_file() and len(pd.read_parquet(run_dir / "metrics.parquet")) == 3
    assert not (run_dir / "result.json").exists()


def test_same_seed_same_tables(tmp_path):
    def noisy(config, ctx):
        ctx.save_table("draws", pd.DataFrame({"x": ctx.rng.normal(size=5)}))
        return {}

    job = Job(name="noisy", description="", config=Cfg, run=noisy)
    a, _ = execute(job, Cfg(seed=1), tmp_path)
    b, _ = execute(job, Cfg(seed=1), tmp_path)
    c, _ = execute(job, Cfg(seed=2), tmp_path)
    read = lambda d: pd.read_parquet(d / "tables" / "draws.parquet")["x"].to_numpy()  # noqa: E731
    np.testing.assert_array_equal(read(a), read(b))
    assert not np.allclose(read(a), read(c))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "t.json"
    store.write_json(path, {"ok": 1})

    def broken(tmp):
        tmp.write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left behind


def test_embedded_dashboard_port_falls_back_when_taken():
    import socket

    from explab.runtime import _free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = _free_port(port)
        assert other != port and other > 0
    assert _free_port(port) == port
