"""Reliability: NaN never wins, bad input is one line before anything is made, runs stay readable
after crashes and kills, errors from Ray reach the user as the explab error's one line."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from explab import runs, store
from explab.config import JobConfig
from explab.errors import ConfigError, ExplabError, ModelError, one_line
from explab.job import Job
from explab.runs import execute, list_runs, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def strict_json(path: Path):
    """json.loads that refuses the NaN/Infinity tokens Python's json writes by default."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


class Cfg(JobConfig):
    steps: int = 3
    value: float = 1.0


def _diverging(config: Cfg, ctx) -> dict:
    for step in range(config.steps):
        ctx.log(loss=1.0 if step == 0 else float("nan"), ok=float(step))
    return {"r1": config.value, "loss": np.float32("nan"), "gain": float("inf"), "fine": 0.5}


DIVERGING = Job(name="diverging", description="", config=Cfg, run=_diverging)


# ---- 1. NaN never wins --------------------------------------------------------------------------------
def test_non_finite_metrics_are_recorded_as_missing_and_every_json_stays_valid(tmp_path):
    reported = []
    run_dir, result = execute(DIVERGING, Cfg(), tmp_path, reporter=reported.append)
    assert result == {"r1": 1.0, "loss": None, "gain": None, "fine": 0.5}
    assert strict_json(run_dir / "result.json") == result
    manifest = strict_json(run_dir / "manifest.json")
    assert manifest["status"] == "completed"
    assert set(manifest["invalid_metrics"]) == {"loss", "gain"}
    assert manifest["invalid_metrics"]["loss"] == "nan at step 1"  # the first step where it went bad
    # Tune (the reporter) never sees a non-finite value: the trial's metric is missing, not NaN
    assert [r.get("loss") for r in reported] == [1.0, None, None]
    assert all(math.isfinite(v) for r in reported for v in r.values())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["loss"].isna().tolist() == [False, True, True] and metrics["ok"].tolist() == [0.0, 1.0, 2.0]


def test_store_writes_json_without_nan_or_infinity_tokens(tmp_path):
    path = store.write_json(tmp_path / "x.json", {"a": [np.float32("nan"), -math.inf, 2], "b": {"c": np.float64(3)}})
    assert strict_json(path) == {"a": [None, None, 2], "b": {"c": 3.0}}


def test_a_nan_trial_never_wins_a_sweep_ranking():
    from explab import sweep_report
    from explab.sweep import SweepSpec

    spec = SweepSpec(job="quadratic", space={"x": {"type": "uniform", "low": 0, "high": 1}},
                     metric="objective", mode="max")
    rows = [{"trial_id": t, "trial_index": i, "status": "completed", "param.x": 0.1 * i, "metric.objective": v}
            for i, (t, v) in enumerate([("nan", math.nan), ("low", -3.0), ("inf", math.inf), ("none", None),
                                        ("high", -1.0)])]
    assert sweep_report.best_row(spec, rows)["trial_id"] == "high"
    spec_min = spec.model_copy(update={"mode": "min"})
    rows = [{**r, "metric.objective": -math.inf if r["trial_id"] == "inf" else r["metric.objective"]} for r in rows]
    assert sweep_report.best_row(spec_min, rows)["trial_id"] == "low"


def test_a_trials_final_report_drops_a_non_finite_final_metric_instead_of_keeping_the_last_step():
    from explab.sweep import final_metrics

    assert final_metrics({"loss": 0.3, "acc": 0.5}, {"loss": None, "r1": 1.0}) == {"acc": 0.5, "r1": 1.0}
    assert final_metrics({"loss": math.nan}, {}) == {}


def test_retrieval_recall_of_diverged_embeddings_is_not_perfect():
    from jobs.sotalign.evaluate import recall_at, retrieval, zero_shot

    nan = np.full((4, 3), np.nan)
    assert all(math.isnan(v) for v in recall_at(nan @ nan.T).values())
    assert math.isnan(retrieval(nan, nan)["r1"])
    assert math.isnan(zero_shot(nan, np.eye(3), np.zeros(4, dtype=int)))
    good = np.eye(4)
    assert retrieval(good, good)["r1"] == 1.0


# ---- 2. bounds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_out_of_range_is_a_config_error_for_every_job(seed):
    from explab.config import validate
    from explab.job import discover

    for job in discover().values():
        with pytest.raises(ConfigError, match="field 'seed'"):
            validate(job.config, {"seed": seed})


@pytest.mark.parametrize("job, data, field", [
    ("quickstart", {"alphas": []}, "alphas"), ("quickstart", {"questions": []}, "questions"),
    ("quickstart", {"max_tokens": -1}, "max_tokens"), ("quickstart", {"batch_size": 0}, "batch_size"),
    ("quickstart", {"layer": -2}, "layer"), ("sotalign", {"n_pairs": []}, "n_pairs"),
    ("sotalign", {"n_pairs": [0]}, "n_pairs.0"), ("cot_robustness", {"timesteps": []}, "timesteps"),
    ("quadratic", {"steps": -1}, "steps"),
])
def test_empty_lists_and_negative_budgets_are_config_errors(job, data, field):
    from explab.config import validate
    from explab.job import get_job

    with pytest.raises(ConfigError, match=f"field '{field}'"):
        validate(get_job(job).config, data)


def test_layers_are_checked_against_the_models_depth():
    from explab.models.checks import check_layers

    check_layers([0, 3], 4)
    check_layers(-4, 4, negative=True)
    with pytest.raises(ConfigError,
                       match=r"field 'layer': layer 4 out of range for 'tiny:llama', which has 4 blocks \(0..3\)"):
        check_layers(4, 4, "layer", "'tiny:llama'")
    with pytest.raises(ConfigError, match="field 'readout_layer'"):
        check_layers(-5, 4, "readout_layer", negative=True)
    with pytest.raises(ConfigError, match="layer -1"):
        check_layers(-1, 4)


def test_model_preflight_catches_unknown_families_and_directories_without_weights(tmp_path):
    from explab.models import ModelSpec
    from explab.models.checks import preflight
    from jobs.quickstart.job import Config

    preflight(Config())
    with pytest.raises(ModelError, match="field 'model': unknown tiny model family 'tiny:nosuch'"):
        preflight(Config(model=ModelSpec(name="tiny:nosuch")))
    with pytest.raises(ModelError, match="does not exist"):
        preflight(Config(model=ModelSpec(name=str(tmp_path / "missing"))))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="holds no weights"):
        preflight(Config(model=ModelSpec(name=str(tmp_path / "empty"))))
    preflight(Config(model=ModelSpec(name="/no/such/dir")), local_paths=False)  # a path on the cluster


def test_sweep_spec_refuses_infinite_bounds_and_seeds_out_of_range(tmp_path):
    from explab.sweep import load_spec

    spec = {"job": "quadratic", "space": {"x": {"type": "uniform", "low": 0.0, "high": ".inf"}},
            "metric": "objective", "mode": "max"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec).replace("'.inf'", ".inf"))
    with pytest.raises(ConfigError, match="finite bounds"):
        load_spec(path)
    spec["space"]["x"]["high"] = 1.0
    path.write_text(yaml.safe_dump({**spec, "seed": -1}))
    with pytest.raises(ConfigError, match="field 'seed'"):
        load_spec(path)


# ---- 3. one line, before anything is made -------------------------------------------------------------
@pytest.mark.parametrize("case", ["binary", "latin1", "runs_file", "address", "seed", "tiny", "model_dir"])
def test_bad_input_before_ray_starts_is_one_line_and_makes_nothing(case, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runs_dir = tmp_path / "runs"
    args = ["run", "quadratic", "-c", "tiny"]
    needle = {"binary": "is binary", "latin1": "not UTF-8", "runs_file": "is a file, not a directory",
              "address": "no Ray cluster answers at 127.0.0.1:9", "seed": "field 'seed'",
              "tiny": "unknown tiny model family", "model_dir": "does not exist"}[case]
    if case == "binary":
        (tmp_path / "c.yaml").write_bytes(b"\x00\x01\x02PK\x03\x04")
        args[-1] = str(tmp_path / "c.yaml")
    elif case == "latin1":
        (tmp_path / "c.yaml").write_bytes("x: 1 # caf\xe9\n".encode("latin-1"))
        args[-1] = str(tmp_path / "c.yaml")
    elif case == "runs_file":
        runs_dir.write_text("not a folder")
    elif case == "address":
        args += ["--address", "127.0.0.1:9"]
    elif case == "seed":
        args += ["--set", f"seed={2**64}"]
    elif case == "tiny":
        args = ["run", "quickstart", "-c", "tiny", "--set", "model.name=tiny:nosuch"]
    elif case == "model_dir":
        args = ["run", "quickstart", "-c", "tiny", "--set", f"model.name={tmp_path / 'no-model'}"]
    start = time.monotonic()
    code, _, err = cli(*args, "--runs-dir", str(runs_dir))
    assert time.monotonic() - start < 30  # an unreachable address is bounded, not a hang
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and needle in lines[0], err
    assert case == "runs_file" or not runs_dir.exists()


def test_one_line_unwraps_rays_task_errors():
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise ModelError("unknown tiny model family 'tiny:x': use one of tiny:llama")
    except ModelError as error:
        wrapped = RayTaskError("HookedModel.__init__", traceback.format_exc(), error).as_instanceof_cause()
    assert isinstance(wrapped, ModelError) and len(str(wrapped).splitlines()) > 3  # Ray's message: a traceback
    assert one_line(wrapped) == "unknown tiny model family 'tiny:x': use one of tiny:llama"
    try:
        raise ValueError("shapes differ\nmore detail")
    except ValueError as error:
        wrapped = RayTaskError("f", traceback.format_exc(), error).as_instanceof_cause()
    assert one_line(wrapped) == "ValueError: shapes differ"


# ---- 4. runs survive crashes ---------------------------------------------------------------------------
def test_logging_rewrites_each_row_a_bounded_number_of_times(tmp_path, monkeypatch):
    """ctx.log appends: N logs write O(N) rows in all (each row once to a part, once compacted)."""
    written = []
    real = store.write_parquet

    def counting(path, frame):
        written.append(len(frame))
        return real(path, frame)

    monkeypatch.setattr(store, "write_parquet", counting)
    monkeypatch.setattr(runs, "FLUSH_S", 3600.0)

    def many(config, ctx):
        for step in range(config.steps):
            ctx.log(x=float(step))
        return {}

    job = Job(name="many", description="", config=Cfg, run=many)
    for n in (2000, 8000):
        written.clear()
        run_dir, _ = execute(job, Cfg(steps=n), tmp_path)
        assert sum(written) == 2 * n  # parts + the compacted file; rewriting every log would be n(n+1)/2
        assert len(written) == math.ceil(n / runs.FLUSH_ROWS) + 1
        assert len(read_metrics(run_dir)) == n and not (run_dir / runs.METRICS_PARTS).exists()


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from explab import runs
    from explab.config import JobConfig
    from explab.job import Job

    runs.FLUSH_ROWS = 10
    runs.FLUSH_S = 3600.0  # flush by rows only: exactly two chunks of ten before the kill

    class Cfg(JobConfig):
        pass

    def slow(config, ctx):
        for step in range(25):
            ctx.log(x=float(step))
        print("logged", flush=True)
        time.sleep(600)

    runs.execute(Job(name="slow", description="", config=Cfg, run=slow), Cfg(), sys.argv[1])
""")


def _start_and_wait(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "logged"
    return proc


def test_a_killed_run_reads_as_crashed_keeps_its_flushed_rows_and_clean_marks_it(tmp_path, cli):
    proc = _start_and_wait(KILLED_RUN, str(tmp_path))
    (run_dir,) = (tmp_path / "slow").iterdir()
    assert list_runs(tmp_path)[0]["status"] == "running"
    (run_dir / "tables").mkdir()
    (run_dir / "tables" / ".t.parquet.abc.tmp").write_bytes(b"half")  # a write the kill cut short
    proc.kill()
    proc.wait()
    (row,) = list_runs(tmp_path)
    assert row["status"] == "crashed"
    assert read_metrics(run_dir)["x"].tolist() == [float(i) for i in range(20)]  # the two flushed chunks
    code, out, err = cli("runs", "--runs-dir", str(tmp_path), "--clean")
    assert code == 0 and f"marked crashed: {run_dir}" in err and "crashed" in out
    manifest = strict_json(run_dir / "manifest.json")
    assert manifest["status"] == "crashed"
    assert len(pd.read_parquet(run_dir / "metrics.parquet")) == 20
    assert not list(run_dir.rglob("*.tmp"))


SIGTERMED_RUN = textwrap.dedent("""
    import sys, time
    from explab import runs, runtime
    from explab.config import JobConfig
    from explab.job import Job

    class Cfg(JobConfig):
        pass

    def slow(config, ctx):
        ctx.log(x=1.0)
        print("logged", flush=True)
        time.sleep(600)

    runtime.stop_on_sigterm()
    try:
        runs.execute(Job(name="slow", description="", config=Cfg, run=slow), Cfg(), sys.argv[1])
    except KeyboardInterrupt as error:
        print(type(error).__name__, error.explab_run_dir, flush=True)
        sys.exit(143)
""")


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    proc = _start_and_wait(SIGTERMED_RUN, str(tmp_path))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    (run_dir,) = (tmp_path / "slow").iterdir()
    assert proc.returncode == 143 and out.split() == ["Terminated", str(run_dir)]
    manifest = strict_json(run_dir / "manifest.json")
    assert manifest["status"] == "stopped" and "SIGTERM" in manifest["error"]
    assert len(pd.read_parquet(run_dir / "metrics.parquet")) == 1


def test_damaged_runs_are_named_and_never_hide_the_others(tmp_path, cli):
    dirs = [execute(DIVERGING, Cfg(value=float(i)), tmp_path)[0] for i in range(5)]
    (dirs[0] / "result.json").write_text('{"r1": 0.')
    (dirs[1] / "manifest.json").write_text('{"job": "diverging", "sta')
    (dirs[2] / "config.yaml").unlink()
    (dirs[3] / "metrics.parquet").write_bytes((dirs[3] / "metrics.parquet").read_bytes()[:40])
    (tmp_path / "diverging" / "no-manifest").mkdir()
    listed = {r["path"]: r for r in list_runs(tmp_path)}
    assert len(listed) == 6
    assert listed[str(dirs[1])]["status"] == "damaged" and "manifest.json unreadable" in listed[str(dirs[1])]["damaged"]
    assert listed[str(dirs[4])]["status"] == "completed" and "damaged" not in listed[str(dirs[4])]
    code, out, _ = cli("runs", "--runs-dir", str(tmp_path))
    assert code == 0 and all(d.name in out for d in dirs)
    for run_dir, needle in [(dirs[0], "result.json unreadable"), (dirs[1], "manifest.json unreadable"),
                            (dirs[2], "config.yaml missing"), (dirs[3], "metrics.parquet unreadable")]:
        code, out, err = cli("show", str(run_dir))
        assert code == 0 and needle in err and out.strip().splitlines()[-1] == str(run_dir), (needle, err)
    code, out, _ = cli("show", str(dirs[0]))
    assert "tables" not in out and "status=completed" in out


def test_a_run_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    real = store.write_json

    def failing(path, data):
        if Path(path).name == "manifest.json":
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(store, "write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        execute(DIVERGING, Cfg(), tmp_path)
    assert list((tmp_path / "diverging").iterdir()) == []


def test_a_failed_run_keeps_its_traceback_in_error_log_and_one_line_in_the_manifest(tmp_path):
    def broken(config, ctx):
        raise ValueError("bad shapes\nsecond line")

    with pytest.raises(ValueError) as info:
        execute(Job(name="broken", description="", config=Cfg, run=broken), Cfg(), tmp_path)
    run_dir = info.value.explab_run_dir
    manifest = strict_json(run_dir / "manifest.json")
    assert manifest["error"] == "ValueError: bad shapes" and manifest["error_log"] == "error.log"
    log = (run_dir / "error.log").read_text()
    assert "Traceback" in log and "in broken" in log and "second line" in log


# ---- through a real local Ray ----------------------------------------------------------------------------
def test_a_layer_past_the_models_depth_is_one_line_naming_the_field(tmp_path, ray_local, cli):
    code, out, err = cli("run", "quickstart", "-c", "tiny", "--set", "layer=50", "--set", "alphas=[0]",
                         "--set", "questions=[Hi]", "--runs-dir", str(tmp_path))
    lines = [line for line in err.strip().splitlines() if line.strip() and "Ray dashboard" not in line]
    assert code != 0 and len(lines) == 1, err
    assert "field 'layer': layer 50 out of range for tiny:llama, which has" in lines[0] and "Traceback" not in err
    run_dir = Path(out.strip().splitlines()[-1])
    assert strict_json(run_dir / "manifest.json")["status"] == "failed" and (run_dir / "error.log").is_file()


def test_an_error_raised_inside_a_server_actor_is_its_one_line(tmp_path, ray_local, capsys):
    import typer

    from explab.cli import _execute

    def bad_point(config, ctx):
        hooked = ctx.model("tiny:gpt2", "hooked")
        hooked.forward([{"text": "Hi", "interventions": [{"type": "capture", "point": "blocks.99.resid_post"}]}])
        return {}

    with pytest.raises(typer.Exit) as info:
        _execute(Job(name="badpoint", description="", config=Cfg, run=bad_point), Cfg(), str(tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert info.value.exit_code == 1 and len(lines) == 1 and "blocks.99" in lines[0], err
    (run_dir,) = (tmp_path / "badpoint").iterdir()
    assert f"traceback: {run_dir / 'error.log'}" in lines[0]
    assert "Traceback" in (run_dir / "error.log").read_text()  # the actor's whole traceback is kept there


def quadratic_spec(path: Path, **changes) -> Path:
    spec = {"job": "quadratic", "base": {"config": "tiny", "overrides": ["steps=2"]},
            "space": {"x": {"type": "uniform", "low": -5.0, "high": 5.0}},
            "metric": "objective", "mode": "max", "num_samples": 6, "sampler": "random", "seed": 3, **changes}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_sweep_never_picks_a_trial_whose_metric_is_nan(tmp_path, ray_local):
    from explab.sweep import run_sweep

    spec = quadratic_spec(tmp_path / "nan.yaml", base={"config": "tiny", "overrides": ["steps=2", "nan_above_x=0.0"]})
    sweep_dir = run_sweep(spec, tmp_path / "runs")
    table = pd.read_parquet(sweep_dir / "trials.parquet")
    diverged = table[table["param.x"] > 0.0]
    assert len(diverged) >= 2 and (table["status"] == "completed").all()  # seed 3 draws some on each side
    # the diverged trials (nearer the optimum at x=1.5) have no objective, not their last step's value
    assert diverged["metric.objective"].isna().all() and table.loc[
        table["param.x"] <= 0, "metric.objective"].notna().all()
    best = strict_json(sweep_dir / "best.json")
    assert best["best"]["params"]["x"] <= 0.0
    assert best["best"]["metrics"]["objective"] == table["metric.objective"].max()


def test_a_sweep_metric_the_job_never_reports_is_an_error(tmp_path, ray_local, cli):
    spec = quadratic_spec(tmp_path / "typo.yaml", metric="objectiv", num_samples=16, max_concurrent=1)
    code, _, err = cli("sweep", str(spec), "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in err.strip().splitlines() if line.strip() and "Ray dashboard" not in line]
    assert code != 0 and "no trial reported a finite value of metric 'objectiv'" in lines[-1], err
    assert "the job reported: cost, distance, f, objective" in lines[-1]
    (sweep_dir,) = (tmp_path / "runs" / "sweeps" / "quadratic").iterdir()
    manifest = strict_json(sweep_dir / "manifest.json")
    assert manifest["status"] == "failed"
    assert manifest["trials"] <= 2  # the sweep ended after the first finished trial, not after all 16


def test_a_trial_asking_for_more_cpus_than_any_node_has_is_refused_before_the_sweep_exists(tmp_path, ray_local, cli):
    spec = quadratic_spec(tmp_path / "big.yaml", resources_per_trial={"cpu": 64})
    code, _, err = cli("sweep", str(spec), "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in err.strip().splitlines() if line.strip() and "Ray dashboard" not in line]
    assert code != 0 and len(lines) == 1 and "asks for 64 CPUs, but the largest node has 4" in lines[0], err
    assert not (tmp_path / "runs").exists()


# ---- submitting: what travels, where runs go, where the token goes -----------------------------------------
def _git_project(root: Path) -> Path:
    for name in ("jobs/demo/job.py", "platform/explab/__init__.py", "README.md", ".env", "keys/id_rsa"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "jobs", "platform", "README.md"], cwd=root, check=True)
    (root / "jobs/demo/configs").mkdir()
    (root / "jobs/demo/configs/mine.yaml").write_text("seed: 1\n")  # untracked, but the job's config
    return root


def test_submit_uploads_only_git_tracked_files_and_the_config(tmp_path):
    from explab import jobs_api

    root = _git_project(tmp_path)
    files = jobs_api.upload_files(root, [root / "jobs/demo/configs/mine.yaml"])
    assert files == ["README.md", "jobs/demo/configs/mine.yaml", "jobs/demo/job.py", "platform/explab/__init__.py"]
    staged = jobs_api.stage(root, files, tmp_path / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == files
    assert jobs_api.summarize_upload(files) == "README.md, jobs/ (2), platform/ (1)"


@pytest.mark.parametrize("secret", [".env", "deploy/id_ed25519", "certs/server.pem", "conf/credentials.json",
                                    ".aws/config", "secrets.yaml"])
def test_submit_refuses_a_tracked_file_that_looks_like_a_secret(secret, tmp_path):
    from explab import jobs_api

    root = _git_project(tmp_path)
    (root / secret).parent.mkdir(parents=True, exist_ok=True)
    (root / secret).write_text("hunter2\n")
    subprocess.run(["git", "add", "-f", secret], cwd=root, check=True)
    with pytest.raises(ExplabError, match=f"refusing to upload {secret}: it looks like a secret"):
        jobs_api.upload_files(root)
    assert not jobs_api.looks_secret("jobs/apm/tokenizer.py") and not jobs_api.looks_secret("jobs/x/keys.py")


def test_a_submitted_run_defaults_to_a_durable_runs_dir_on_the_cluster(tmp_path):
    from explab import jobs_api

    entrypoint, metadata = jobs_api.build_run_entrypoint("quadratic", "tiny", root=ROOT)
    # the cluster runs the entrypoint through a shell: EXPLAB_RUNS_DIR there, else ~/explab-runs
    echo = entrypoint.replace("python -m explab.cli", "printf '%s\\n'", 1)
    for env, expected in (({"HOME": str(tmp_path)}, f"{tmp_path}/explab-runs"),
                          ({"HOME": str(tmp_path), "EXPLAB_RUNS_DIR": "/shared/runs"}, "/shared/runs")):
        out = subprocess.run(["bash", "-c", echo], env=env, capture_output=True, text=True, check=True).stdout
        assert out.split() == ["run", "quadratic", "-c", "tiny", "--runs-dir", expected]
    assert metadata["explab_runs_dir"] == "${EXPLAB_RUNS_DIR:-$HOME/explab-runs}"


def test_runs_inside_rays_temporary_package_are_refused(tmp_path):
    from explab.runs import check_runs_dir

    package = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    with pytest.raises(ExplabError, match="inside Ray's temporary working-dir package"):
        check_runs_dir(package / "runs")
    assert check_runs_dir(tmp_path / "runs") == tmp_path / "runs"


def test_the_token_goes_only_over_https_or_to_a_loopback_address(monkeypatch):
    from explab import jobs_api

    monkeypatch.delenv("EXPLAB_ALLOW_PLAIN_TOKEN", raising=False)
    for address in ("https://ray.example.org:8443", "http://127.0.0.1:8265", "http://localhost:8265",
                    "http://[::1]:8265"):
        assert jobs_api.token_may_travel(address), address
    for address in ("http://10.0.0.5:8265", "http://ray.example.org:8265", "head:8265"):
        assert not jobs_api.token_may_travel(address), address
    monkeypatch.setenv("EXPLAB_ALLOW_PLAIN_TOKEN", "1")
    assert jobs_api.token_may_travel("http://10.0.0.5:8265")


def test_allow_plain_token_is_a_flag_of_every_command_that_talks_to_a_cluster(monkeypatch, cli):
    from explab import cli as cli_module
    from explab import jobs_api

    for command in ("submit", "pull", "status", "logs", "stop"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and "--allow-plain-token" in out, command
    monkeypatch.delenv("EXPLAB_ALLOW_PLAIN_TOKEN", raising=False)
    cli_module._allow_plain_token(False)
    assert not jobs_api.token_may_travel("http://10.0.0.5:8265")
    cli_module._allow_plain_token(True)  # what the flag does before the command runs
    assert jobs_api.token_may_travel("http://10.0.0.5:8265")


def test_pull_brings_a_submitted_run_back(head_jobs, tmp_path, cli):
    job_id, address = head_jobs.ids["quickstart"], head_jobs.head.address
    code, out, err = cli("pull", job_id, "--address", address, "--runs-dir", str(tmp_path))
    assert code == 0, err
    local = Path(out.strip().splitlines()[-1])
    (remote,) = [p for p in (head_jobs.runs_dir / "quickstart").iterdir()
                 if json.loads((p / "manifest.json").read_text())["status"] == "completed"]
    assert local == tmp_path / "quickstart" / remote.name
    for name in ("manifest.json", "result.json", "config.yaml", "tables/steering.parquet",
                 "plots/projection_vs_alpha.png", "metrics.parquet"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    code, _, err = cli("pull", job_id, "--address", address, "--runs-dir", str(tmp_path))
    assert code != 0 and "exists already" in err


def test_the_embedded_ray_listens_on_loopback_only(ray_local):
    """Every socket the embedded Ray's processes listen on (GCS, raylet, agents, metrics export, workers)
    is bound to 127.0.0.1, and the switch that does it does not leak into this process's environment."""
    import ipaddress
    import os

    import psutil
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    ray.get(ray.remote(lambda: None).remote())  # at least one worker is up
    session = os.environ["EXPLAB_RAY_DIR"]
    tree = {os.getpid()}
    for proc in psutil.process_iter(["cmdline"]):
        if any(session in arg for arg in proc.info["cmdline"] or []):
            tree |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
    listening = [(conn.pid, conn.laddr.ip) for conn in psutil.net_connections("inet")
                 if conn.status == psutil.CONN_LISTEN and conn.pid in tree]
    assert len(tree) > 3 and len(listening) >= 3  # GCS, raylet, a worker at least
    exposed = [(pid, ip) for pid, ip in listening
               if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
