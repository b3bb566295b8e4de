"""Sweeps through a real local Ray: TPE finds a known optimum, ASHA stops trials, resume, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from explab.sweep import SweepSpec, load_spec, resolve, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUADRATIC = {
    "job": "quadratic",
    "base": {"config": "tiny", "overrides": ["steps=2"]},
    "space": {"x": {"type": "uniform", "low": -5.0, "high": 5.0},
              "y": {"type": "uniform", "low": -5.0, "high": 5.0}},
    "metric": "objective",
    "mode": "max",
    "num_samples": 20,
    "max_concurrent": 1,
    "seed": 1,
}


def write_spec(path: Path, **changes) -> Path:
    spec = {**QUADRATIC, **changes}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(sweep_dir / "trials.parquet").sort_values("trial_index").reset_index(drop=True)


@pytest.fixture(scope="module")
def tpe_and_random(tmp_path_factory, ray_local):
    """The same 20-trial search of the quadratic, once with TPE and once with random sampling."""
    root = tmp_path_factory.mktemp("tpe")
    tpe = run_sweep(write_spec(root / "tpe.yaml", sampler="tpe"), root / "runs")
    rnd = run_sweep(write_spec(root / "random.yaml", sampler="random"), root / "runs")
    return tpe, rnd


def test_tpe_gets_closer_to_the_optimum_than_random_search(tpe_and_random):
    tpe, rnd = (trials(d) for d in tpe_and_random)
    assert len(tpe) == len(rnd) == 20 and (tpe["status"] == "completed").all()
    # TPE starts with the same seeded random trials (so the comparison is paired) ...
    pd.testing.assert_frame_equal(tpe.loc[:9, ["param.x", "param.y"]], rnd.loc[:9, ["param.x", "param.y"]])
    # ... then models the results: its later trials cluster near the optimum, random ones do not
    tpe_late, rnd_late = tpe["metric.distance"].iloc[10:].median(), rnd["metric.distance"].iloc[10:].median()
    assert tpe_late < 0.8 * rnd_late, (tpe_late, rnd_late)
    assert tpe["metric.distance"].min() < 0.5


def test_outputs_table_best_and_plots(tpe_and_random):
    sweep_dir = tpe_and_random[0]
    table = trials(sweep_dir)
    assert list(table.columns[:5]) == ["trial_id", "trial_index", "status", "param.x", "param.y"]
    assert {"metric.objective", "metric.distance", "error", "duration_s", "iterations", "run_dir"} <= set(table.columns)
    assert table["trial_id"].is_unique and (table["iterations"] == 2).all()
    best = json.loads((sweep_dir / "best.json").read_text())
    top = table.loc[table["metric.objective"].idxmax()]
    assert best["best"]["trial_id"] == top["trial_id"]
    assert best["best"]["params"] == {"x": top["param.x"], "y": top["param.y"]}
    assert best["best"]["metrics"]["objective"] == top["metric.objective"]
    assert best["trials"] == {"total": 20, "completed": 20, "stopped_early": 0, "failed": 0}
    assert set(best["importance"]["objective"]) == {"x", "y"}
    for name in ("history", "params", "importance"):
        assert (sweep_dir / "plots" / f"{name}.png").stat().st_size > 5000
    run_dir = sweep_dir / top["run_dir"]
    assert json.loads((run_dir / "result.json").read_text())["objective"] == top["metric.objective"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["x"] == top["param.x"]
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["sampler"]["type"] == "tpe"
    assert json.loads((sweep_dir / "manifest.json").read_text())["status"] == "completed"


def test_asha_stops_bad_trials_early(ray_local, tmp_path):
    max_t = 8
    spec = write_spec(tmp_path / "asha.yaml", num_samples=12, max_concurrent=2,
                      base={"config": "tiny", "overrides": [f"steps={max_t}"]},
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": max_t})
    sweep_dir = run_sweep(spec, tmp_path / "runs")
    table = trials(sweep_dir)
    stopped, completed = table[table["status"] == "stopped_early"], table[table["status"] == "completed"]
    assert len(table) == 12 and len(stopped) >= 4 and len(completed) >= 2
    assert (stopped["iterations"] < max_t).all() and (completed["iterations"] == max_t).all()
    # ASHA compared trials mid-way on the logged objective: the ones it stopped are the worse ones
    distance = ((table["param.x"] - 1.5) ** 2 + (table["param.y"] + 0.5) ** 2) ** 0.5
    assert distance[stopped.index].median() > distance[completed.index].median()
    best = json.loads((sweep_dir / "best.json").read_text())["best"]
    assert best["status"] == "completed"
    assert table.loc[table["trial_id"] == best["trial_id"], "iterations"].item() == max_t
    # a stopped trial's run directory says so: it logged fewer steps and never wrote a result
    run_dir = sweep_dir / stopped["run_dir"].iloc[0]
    assert len(pd.read_parquet(run_dir / "metrics.parquet")) < max_t and not (run_dir / "result.json").exists()


def test_a_failing_trial_is_recorded_and_the_sweep_completes(ray_local, tmp_path, cli):
    spec = write_spec(tmp_path / "fail.yaml", num_samples=4, max_failures=1, sampler="random", seed=0,
                      base={"config": "tiny", "overrides": ["steps=2", "fail_above_x=0.0"]})
    code, out, err = cli("sweep", str(spec), "--runs-dir", str(tmp_path / "runs"),
                         "--address", ray_local.address)
    assert code == 0, err
    sweep_dir = Path(out.strip().splitlines()[-1])  # the last line printed is the sweep directory
    assert sweep_dir.parent == tmp_path / "runs" / "sweeps" / "quadratic"
    table = trials(sweep_dir)
    failed, completed = table[table["status"] == "failed"], table[table["status"] == "completed"]
    assert len(table) == 4 and len(failed) >= 1 and len(completed) >= 1
    assert (failed["param.x"] > 0).all() and (completed["param.x"] <= 0).all()
    assert failed["error"].str.startswith("ValueError: x=").all() and completed["error"].isna().all()
    for run_dir in failed["run_dir"]:  # max_failures=1: the trial ran twice, each attempt kept
        assert run_dir.endswith("-r1")
        assert json.loads((sweep_dir / run_dir / "manifest.json").read_text())["status"] == "failed"
        assert (sweep_dir / run_dir.removesuffix("-r1")).is_dir()
    assert "best trial" in out and f"{len(failed)} failed" in out
    best = json.loads((sweep_dir / "best.json").read_text())["best"]
    assert best["trial_id"] in set(completed["trial_id"])


def test_resume_finishes_an_interrupted_sweep_without_rerunning_trials(ray_local, tmp_path):
    spec = write_spec(tmp_path / "slow.yaml", num_samples=8, base={
        "config": "tiny", "overrides": ["steps=4", "sleep_s=0.15"]})
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "explab.cli", "sweep", str(spec), "--runs-dir", str(runs),
         "--address", ray_local.address],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    done = pd.DataFrame()
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("sweeps/quadratic/*/trials.parquet"))
            if found:
                try:
                    done = pd.read_parquet(found[0]).query("status == 'completed'")
                except (OSError, ValueError):
                    pass
                if len(done) >= 3:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as hard as a lost machine: no chance to save anything
        proc.wait()
    assert 3 <= len(done) < 8, proc.stderr.read().decode()[-3000:]
    sweep_dir = found[0].parent
    started = {run: json.loads((sweep_dir / run / "manifest.json").read_text())["started"] for run in done["run_dir"]}

    assert run_sweep(sweep_dir, runs, resume=True) == sweep_dir
    table = trials(sweep_dir)
    assert len(table) == 8 and (table["status"] == "completed").all()
    assert table["trial_id"].is_unique and not table.duplicated(["param.x", "param.y"]).any()
    again = table.set_index("trial_id").loc[done["trial_id"]]
    # the trials finished before the kill kept their ids, params and runs (not run a second time)
    assert (again["param.x"].to_numpy() == done["param.x"].to_numpy()).all()
    for run in done["run_dir"]:
        assert json.loads((sweep_dir / run / "manifest.json").read_text())["started"] == started[run]
        assert not list((sweep_dir / run).parent.glob(f"{Path(run).name}-r*"))
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed"]) == 1


def test_multi_objective_sweep_writes_the_pareto_front(ray_local, tmp_path):
    spec = write_spec(tmp_path / "mo.yaml", num_samples=8, metric=None, mode=None,
                      objectives=[{"metric": "objective", "mode": "max"}, {"metric": "cost", "mode": "min"}])
    spec.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(spec.read_text()).items() if v is not None}))
    sweep_dir = run_sweep(spec, tmp_path / "runs")
    table = trials(sweep_dir)
    best = json.loads((sweep_dir / "best.json").read_text())
    front = best["pareto_front"]
    assert front and "best" not in best
    points = table[["metric.objective", "metric.cost"]].to_numpy()
    for member in front:
        obj, cost = member["metrics"]["objective"], member["metrics"]["cost"]
        dominated = ((points[:, 0] >= obj) & (points[:, 1] <= cost) & ((points[:, 0] > obj) | (points[:, 1] < cost)))
        assert not dominated.any()
    assert len(front) < len(table)  # some trials are dominated
    assert set(best["importance"]) == {"objective", "cost"}


def test_trials_share_the_model_server(ray_local, tmp_path):
    """Two quickstart trials reach the same HookedModel actor: the model is loaded once."""
    from explab.servers import get_server

    spec = tmp_path / "qs.yaml"
    spec.write_text(yaml.safe_dump({
        "job": "quickstart",
        "base": {"config": "tiny", "overrides": ["questions=[Hi]", "max_tokens=4", "model.name=tiny:gpt2"]},
        "space": {"alpha": {"type": "uniform", "low": 1.0, "high": 8.0}},
        "metric": "projection_at_alpha", "mode": "max", "num_samples": 2, "max_concurrent": 2, "seed": 0,
    }))
    sweep_dir = run_sweep(spec, tmp_path / "runs")
    table = trials(sweep_dir)
    assert (table["status"] == "completed").all(), table["error"].tolist()
    pids = {json.loads((sweep_dir / r / "manifest.json").read_text())["models"][0]["pid"] for r in table["run_dir"]}
    assert pids == {get_server("hooked", "tiny:gpt2").describe()["pid"]}
    # the steering reached the readout: projection grows with alpha
    assert (table["metric.projection_at_alpha"] - table["param.alpha"]).abs().max() < 0.3 * table["param.alpha"].max()


@pytest.mark.parametrize("change, needle", [
    ({"space": {"z": {"type": "uniform", "low": 0, "high": 1}}}, "has no field 'z'"),
    ({"space": {"x": {"type": "uniform", "low": 2, "high": 1}}}, "low (2) must be below high (1)"),
    ({"space": {"x": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform range needs low > 0"),
    ({"space": {"x": {"type": "choice", "values": []}}}, "non-empty 'values'"),
    ({"space": {"steps": {"type": "choice", "values": [2, "many"]}}}, "value 'many' is not valid"),
    ({"job": "nosuchjob"}, "unknown job 'nosuchjob'"),
    ({"metric": None}, "name the metric"),
    ({"mode": "up"}, "field 'mode'"),
    ({"scheduler": {"type": "asha", "grace_period": 5, "max_t": 5}}, "grace_period (5) must be below max_t (5)"),
    ({"metric": None, "mode": None, "objectives": [{"metric": "a", "mode": "max"}, {"metric": "b", "mode": "min"}],
      "scheduler": {"type": "asha"}}, "ASHA stops trials on one metric"),
    ({"num_samplez": 3}, "field 'num_samplez': unknown field"),
    ({"base": {"config": "tiny", "overrides": ["stepz=3"]}}, "field 'stepz': unknown field"),
])
def test_bad_specs_are_one_clear_line_and_write_nothing(tmp_path, change, needle, cli):
    spec = {**QUADRATIC, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    code, _, err = cli("sweep", str(path), "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_missing_spec_and_resume_without_a_sweep(tmp_path, cli):
    code, _, err = cli("sweep", str(tmp_path / "nope.yaml"))
    assert code != 0 and "does not exist" in err
    code, _, err = cli("sweep", str(write_spec(tmp_path / "s.yaml")), "--resume",
                       "--runs-dir", str(tmp_path / "runs"))
    assert code != 0 and "no unfinished sweep" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*/sweep.yaml")), ids=lambda p: p.parent.name)
def test_shipped_sweep_specs_are_valid(path):
    spec = load_spec(path)
    assert isinstance(spec, SweepSpec)
    plan = resolve(spec, path)
    assert plan.base and set(spec.space)
