"""Ray Jobs through explab: submit a real run to a real local head, follow it, read it back.

The head (`ray_head`) and the submitted jobs (`head_jobs`) are session fixtures in conftest.py,
shared with test_metrics.py.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from explab import jobs_api

ROOT = Path(__file__).resolve().parent.parent


# ---- pure parts ----------------------------------------------------------------------------------
def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_api.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is no dashboard address
    assert jobs_api.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.org:8443/")
    assert jobs_api.resolve_address() == "https://ray.example.org:8443"
    assert jobs_api.resolve_address("head:8265") == "http://head:8265"
    assert jobs_api.job_url("http://h:8265", "explab-x") == "http://h:8265/#/jobs/explab-x"


def test_run_entrypoint_is_explab_run_with_the_same_args():
    entrypoint, metadata = jobs_api.build_run_entrypoint(
        "quickstart", "tiny", ["alphas=[0, 8]", "model.name=tiny:qwen"], "/data/runs", root=ROOT)
    assert shlex.split(entrypoint) == ["python", "-m", "explab.cli", "run", "quickstart", "-c", "tiny",
                                       "--set", "alphas=[0, 8]", "--set", "model.name=tiny:qwen",
                                       "--runs-dir", "/data/runs"]
    assert metadata["explab_job"] == "quickstart"
    # a config file is passed relative to the project root, which is the job's working dir there
    entrypoint, _ = jobs_api.build_run_entrypoint("quickstart", str(ROOT / "jobs/quickstart/configs/tiny.yaml"),
                                                  root=ROOT)
    assert shlex.split(entrypoint)[5:7] == ["-c", "jobs/quickstart/configs/tiny.yaml"]


def test_runtime_env_ships_the_project_and_this_explab():
    env = jobs_api.runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert env["py_modules"] == [str(ROOT / "platform" / "explab")]
    for pattern in (".git", ".venv*", "runs", "*.safetensors", "*.bin", "*.pt", "**/__pycache__"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # Ray Train's poll (see runtime.RAY_ENV)


def test_sweep_entrypoint(tmp_path):
    if not (ROOT / "jobs/quadratic/sweep.yaml").is_file():
        pytest.skip("no jobs/quadratic/sweep.yaml")
    entrypoint, metadata = jobs_api.build_sweep_entrypoint(str(ROOT / "jobs/quadratic/sweep.yaml"), "/data/runs",
                                                           resume=True, root=ROOT)
    assert shlex.split(entrypoint) == ["python", "-m", "explab.cli", "sweep", "jobs/quadratic/sweep.yaml",
                                       "--runs-dir", "/data/runs", "--resume"]
    assert metadata["explab_job"] == "quadratic"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["submit", "nosuchjob"], "unknown job 'nosuchjob'"),
        (["submit", "quickstart", "-c", "nosuchname"], "neither a file nor one of job 'quickstart'"),
        (["submit", "quickstart", "--set", "bogus=1"], "field 'bogus': unknown field"),
        (["submit", "quickstart", "--set", "max_tokens=lots"], "field 'max_tokens'"),
        (["submit"], "name a job to submit"),
    ],
)
def test_bad_input_is_caught_before_anything_is_contacted(args, needle, cli):
    # no cluster at this address: validation must fail first, with the same line as `explab run`
    code, _, err = cli(*args, "--address", "http://127.0.0.1:1")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and needle in lines[0], err


def test_config_outside_the_project_is_refused(tmp_path, cli):
    outside = tmp_path / "mine.yaml"
    outside.write_text("model: {name: tiny:llama}\n")
    code, _, err = cli("submit", "quickstart", "-c", str(outside), "--address", "http://127.0.0.1:1")
    assert code != 0 and "outside the project" in err


@pytest.mark.parametrize("args", [["status", "x"], ["logs", "x"], ["stop", "x"], ["status"],
                                  ["submit", "quickstart", "-c", "tiny"]])
def test_no_cluster_is_one_clear_line(args, cli):
    code, _, err = cli(*args, "--address", "http://127.0.0.1:1")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert "no Ray dashboard at http://127.0.0.1:1" in lines[0] and "ray start --head" in lines[0]


# ---- against a real head ---------------------------------------------------------------------------
def test_submitted_run_succeeds_and_writes_its_run(head_jobs):
    job_id = head_jobs.ids["quickstart"]
    assert job_id.startswith("explab-quickstart-")
    assert head_jobs.status["quickstart"] == "SUCCEEDED", head_jobs.head.client().get_job_logs(job_id)[-3000:]
    runs = [p for p in (head_jobs.runs_dir / "quickstart").iterdir()
            if json.loads((p / "manifest.json").read_text())["status"] == "completed"]
    assert len(runs) == 1
    run = runs[0]
    result = json.loads((run / "result.json").read_text())
    assert result["slope"] > 0  # steering along the direction raises the projection
    assert {"steering.parquet", "summary.parquet"} <= {p.name for p in (run / "tables").iterdir()}
    config = (run / "config.yaml").read_text()
    assert "max_tokens: 8" in config and "- 4.0" in config  # the overrides travelled with the job


def test_status_and_logs(head_jobs, cli):
    job_id, address = head_jobs.ids["quickstart"], head_jobs.head.address
    code, out, err = cli("status", job_id, "--address", address)
    assert code == 0, err
    assert f"{job_id}  SUCCEEDED" in out
    assert "python -m explab.cli run quickstart -c tiny" in out
    assert f"{address}/#/jobs/{job_id}" in out and "explab_job: quickstart" in out
    code, out, _ = cli("logs", job_id, "--address", address)
    assert code == 0
    assert "steering strengths: 3/3" in out  # ctx.progress, as lines when not on a terminal
    run_dir = out.strip().splitlines()[-1]  # `explab run` prints the run directory last
    assert Path(run_dir).parent == head_jobs.runs_dir / "quickstart" and (Path(run_dir) / "result.json").is_file()
    code, out, _ = cli("logs", job_id, "--follow", "--address", address)
    assert code == 0 and run_dir in out  # a finished job: the whole log, then the end
    code, out, _ = cli("status", "--address", address)
    assert code == 0 and job_id in out and "SUCCEEDED" in out
    code, out, _ = cli("stop", job_id, "--address", address)
    assert code == 0 and "was not running (SUCCEEDED)" in out
    code, _, err = cli("status", "explab-nosuchjob", "--address", address)
    assert code != 0 and "no job 'explab-nosuchjob'" in err


def test_failing_run_is_a_failed_job(head_jobs):
    assert head_jobs.status["failing"] == "FAILED"
    logs = head_jobs.head.client().get_job_logs(head_jobs.ids["failing"])
    # the server's error, as the job's one line: torch's words depend on which op meets the meta tensor first
    # ("Cannot copy out of meta tensor", or "Tensor.item() cannot be called on meta tensors" since decode keeps
    # its tokens on the device)
    assert "meta tensor" in logs
    failed = [json.loads(p.read_text()) for p in (head_jobs.runs_dir / "quickstart").glob("*/manifest.json")]
    assert sorted(m["status"] for m in failed) == ["completed", "failed"]


def test_submitted_sweep_succeeds(head_jobs):
    if "sweep" not in head_jobs.ids:
        pytest.skip("no jobs/quadratic/sweep.yaml")
    assert head_jobs.status["sweep"] == "SUCCEEDED", head_jobs.head.client().get_job_logs(
        head_jobs.ids["sweep"])[-3000:]
    sweeps = list((head_jobs.runs_dir / "sweeps" / "quadratic").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / "best.json").is_file()


def test_bad_config_submits_nothing(head_jobs):
    client = head_jobs.head.client()
    before = sorted(j.submission_id for j in client.list_jobs())
    proc = subprocess.run([sys.executable, "-m", "explab.cli", "submit", "quickstart", "-c", "tiny", "--set", "layer=x",
                           "--address", head_jobs.head.address], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "field 'layer'" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(j.submission_id for j in client.list_jobs()) == before
