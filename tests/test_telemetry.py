"""explab's Ray metrics as Prometheus sees them, and the Grafana dashboards that query them.

After real jobs on a real local head (`head_jobs` in conftest.py: a completed quickstart run, a
failing one and a quadratic sweep), every metric a dashboard names must be in the head's
Prometheus export, with the tags the dashboards filter on.
"""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from explab import telemetry
from explab.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or a Grafana ``label_values(...)`` query):
    identifiers that are not functions, keywords, label names, label values, durations or
    Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r",\s*[A-Za-z_]\w*\s*\)\s*$", ")", text)  # label_values(metric, label): the label
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue  # a function, or a keyword
        names.add(match.group())
    return names


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    board = json.loads(path.read_text())
    queries = [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"variable {var['name']}", query))
    return queries


def test_promql_metric_names():
    assert promql_metric_names(
        'sum by (kind, model) (rate(ray_a_total{model=~"$model", kind=~"$kind"}[1m])) / on (kind) ray_b') == {
            "ray_a_total", "ray_b"}
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le) (increase(ray_h_bucket{status="completed"}[5m])))') == {"ray_h_bucket"}
    assert promql_metric_names(
        '${mode}_over_time((${mode} by (sweep) (ray_g{sweep=~"$sweep", metric="$metric"}))[$__range:])') == {"ray_g"}
    assert promql_metric_names("label_values(ray_c_total{sweep!=\"\"}, sweep)") == {"ray_c_total"}
    assert promql_metric_names("sum(ray_x) - (sum(ray_y) or sum(ray_x) * 0)") == {"ray_x", "ray_y"}


def test_dashboards_are_grafana_json():
    assert {p.name for p in DASHBOARDS} >= {"servers.json", "jobs.json", "sweeps.json"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"].startswith("explab / ")
        uids.add(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
        names = {n for _, q in dashboard_queries(path) for n in promql_metric_names(q)}
        assert names and all(n.startswith("ray_explab_") for n in names), (path.name, names)


def test_every_dashboard_metric_is_exported(head_jobs):
    """Every metric a panel or variable queries is in the head's Prometheus export."""
    wanted = {name for path in DASHBOARDS for _, query in dashboard_queries(path)
              for name in promql_metric_names(query)}
    if "sweep" not in head_jobs.ids:
        pytest.skip("no jobs/quadratic/sweep.yaml: the sweep dashboard's metrics need a sweep")
    head_jobs.scrape_until(wanted, timeout_s=60)  # counters stay; gauges were caught while the runs ran
    missing = {(path.name, title, name) for path in DASHBOARDS for title, query in dashboard_queries(path)
               for name in promql_metric_names(query) if name not in head_jobs.samples}
    assert not missing, f"dashboard queries name metrics that are not exported: {sorted(missing)}"
    # and the names explab documents for its instruments are the exported ones
    documented = {name for names in telemetry.PROMETHEUS_NAMES.values() for name in names}
    assert documented <= set(head_jobs.samples), sorted(documented - set(head_jobs.samples))


def test_run_metrics_carry_job_run_model_and_values(head_jobs):
    completed = [json.loads(p.read_text()) for p in (head_jobs.runs_dir / "quickstart").glob("*/manifest.json")]
    run_id = next(m["run_id"] for m in completed if m["status"] == "completed")
    tags = {"explab_job": "quickstart", "run": run_id, "model": "tiny:llama", "sweep": ""}
    values = head_jobs.values
    # progress ended at 1 (the gauge is refreshed while the run runs, and set to 1 when it completes)
    assert values("ray_explab_run_progress", **tags) == [1.0]
    # the logged metrics and the final result are the job metric gauge, by name
    result = json.loads((head_jobs.runs_dir / "quickstart" / run_id / "result.json").read_text())
    assert values("ray_explab_job_metric", **tags, metric="slope") == [pytest.approx(result["slope"])]
    assert values("ray_explab_job_metric", **tags, metric="alpha") == [8.0]  # logged per step: the last
    # one completed and one failed run of quickstart on this head (counters of two drivers: sum them)
    count = {"explab_job": "quickstart", "model": "tiny:llama", "sweep": ""}
    assert sum(values("ray_explab_runs_started_total", **count)) == 2
    assert sum(values("ray_explab_runs_completed_total", **count)) == 1
    assert sum(values("ray_explab_runs_failed_total", **count)) == 1
    assert sum(values("ray_explab_run_duration_seconds_count", **count, status="completed")) == 1
    # the shared server's metrics keep its model tag (and count the failing run's bad request)
    assert sum(values("ray_explab_server_requests_total", kind="hooked", model="tiny:llama")) > 0
    assert sum(values("ray_explab_server_errors_total", kind="hooked", model="tiny:llama")) > 0
    assert values("ray_explab_server_model_load_seconds", kind="hooked", model="tiny:llama")


def test_sweep_trials_are_runs_tagged_with_their_sweep(head_jobs):
    if "sweep" not in head_jobs.ids:
        pytest.skip("no jobs/quadratic/sweep.yaml")
    spec = yaml.safe_load(Path(head_jobs.sweep_file).read_text())

    def counts():
        started = sum(head_jobs.values("ray_explab_runs_started_total", explab_job="quadratic"))
        finished = sum(sum(head_jobs.values(f"ray_explab_runs_{state}_total", explab_job="quadratic"))
                       for state in ("completed", "stopped", "failed"))
        return started, finished

    deadline = time.monotonic() + 60  # the trial actors' last reports may still be on their way
    while counts() != (spec["num_samples"],) * 2 and time.monotonic() < deadline:
        time.sleep(1)
        head_jobs.scrape()
    assert counts() == (spec["num_samples"],) * 2  # every trial started and ended as a run
    sweeps = {labels["sweep"] for labels, _ in head_jobs.samples["ray_explab_runs_started_total"].values()
              if labels["explab_job"] == "quadratic"}
    # the tag is the sweep's id: its directory under the runs dir
    assert sweeps == {p.name for p in (head_jobs.runs_dir / "sweeps" / "quadratic").iterdir()}
    assert head_jobs.values("ray_explab_job_metric", explab_job="quadratic", metric="objective")


# ---- the pure parts: run metrics, progress, the gauge keeper (fake instruments, no cluster) ------------
class FakeInstrument:
    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append((value, dict(tags)))

    inc = observe = set


@pytest.fixture
def fake_instruments(monkeypatch):
    import ray

    fakes = {name: FakeInstrument() for name in ("progress", "metric", "started", "completed", "failed", "stopped",
                                                  "duration")}
    monkeypatch.setattr(telemetry, "_run_instruments", lambda: fakes)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    return fakes


class ToyConfig(JobConfig):
    steps: int = 4
    end: str = "complete"  # complete | fail | stop


def _toy(config, ctx):
    progress = ctx.progress(config.steps, "toy steps")
    for step in range(config.steps):
        ctx.log(loss=1.0 / (step + 1), label="text is not a metric")
        progress.advance()
        if step == 1 and config.end == "fail":
            raise RuntimeError("diverged")
        if step == 1 and config.end == "stop":
            raise SystemExit(0)  # how Tune ends a trial its scheduler stops
    return {"final": 0.25}


def test_execute_reports_progress_metrics_and_counts(fake_instruments, tmp_path, capsys):
    from explab.job import Job
    from explab.runs import execute

    run_dir, _ = execute(Job("toy", "toy", ToyConfig, _toy), ToyConfig(), tmp_path)
    run = {"explab_job": "toy", "run": run_dir.name, "model": "", "sweep": ""}
    assert [v for v, tags in fake_instruments["progress"].calls if tags == run] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    losses = [v for v, tags in fake_instruments["metric"].calls if tags == {**run, "metric": "loss"}]
    assert losses[:4] == [1.0, 0.5, pytest.approx(1 / 3), 0.25]
    assert [v for v, tags in fake_instruments["metric"].calls if tags["metric"] == "final"] == [0.25]
    assert not [tags for _, tags in fake_instruments["metric"].calls if tags["metric"] == "label"]
    counted = {"explab_job": "toy", "model": "", "sweep": ""}
    assert fake_instruments["started"].calls == [(1, counted)] and fake_instruments["completed"].calls == [(1, counted)]
    assert fake_instruments["duration"].calls[0][1] == {**counted, "status": "completed"}
    assert "toy steps: 4/4" in capsys.readouterr().err  # no terminal: progress as lines
    assert not [key for key in telemetry.keeper.live() if key[2].get("run") == run_dir.name]  # no longer refreshed


@pytest.mark.parametrize("end, status", [("fail", "failed"), ("stop", "stopped")])
def test_failed_and_stopped_runs_are_counted_as_such(fake_instruments, tmp_path, end, status):
    from explab.job import Job
    from explab.runs import execute

    with pytest.raises((RuntimeError, SystemExit)):
        execute(Job("toy", "toy", ToyConfig, _toy), ToyConfig(end=end), tmp_path)
    manifest = json.loads(next(tmp_path.glob("toy/*/manifest.json")).read_text())
    assert manifest["status"] == status
    assert len(fake_instruments[status].calls) == 1 and not fake_instruments["completed"].calls
    assert fake_instruments["duration"].calls[0][1]["status"] == status


def test_a_sweep_trial_is_counted_by_the_driver_not_by_itself(fake_instruments, tmp_path, monkeypatch):
    # a trial actor may die before Ray exports its last counts: its run sets gauges only
    from explab import runs
    from explab.job import Job

    monkeypatch.setattr(runs, "_tune_experiment", lambda: "tune")  # as inside a Tune trial
    run_dir, _ = runs.execute(Job("toy", "toy", ToyConfig, _toy), ToyConfig(), tmp_path, sweep="s1")
    assert not fake_instruments["started"].calls and not fake_instruments["completed"].calls
    assert not fake_instruments["duration"].calls
    run = {"explab_job": "toy", "run": run_dir.name, "model": "", "sweep": "s1"}
    assert fake_instruments["progress"].calls[-1] == (1.0, run)
    # the driver counts each trial once, with its end's status; one it never saw start counts as started
    counts = telemetry.TrialCounts()
    counts.started("t1", "toy", "tiny:llama", "s1")
    counts.started("t2", "toy", "tiny:llama", "s1")
    counts.ended("t1", "completed", "toy", "tiny:llama", "s1")
    counts.ended("t2", "stopped", "toy", "tiny:llama", "s1")
    counts.ended("t3", "failed", "toy", "tiny:llama", "s1")
    tags = {"explab_job": "toy", "model": "tiny:llama", "sweep": "s1"}
    assert fake_instruments["started"].calls == [(1, tags)] * 3
    assert [len(fake_instruments[s].calls) for s in ("completed", "stopped", "failed")] == [1, 1, 1]
    assert sorted(t["status"] for _, t in fake_instruments["duration"].calls) == ["completed", "failed", "stopped"]
    with pytest.raises(ValueError, match="not one of"):
        counts.ended("t4", "done", "toy", "", "s1")


def test_run_metrics_are_silent_without_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a plain `python job.py`
    monkeypatch.setattr(telemetry, "_run_instruments", lambda: pytest.fail("metrics built without Ray"))
    run = telemetry.RunMetrics("toy", "r1", "tiny:llama")
    run.start()
    run.log({"loss": 1.0})
    run.finish("completed")  # nothing recorded, nothing raised


def test_gauge_keeper_refreshes_until_dropped(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    keeper = telemetry.GaugeKeeper(refresh_s=0.05)
    gauge = FakeInstrument()
    keeper.set(gauge, 0.5, {"run": "a"})
    keeper.set(gauge, 2.0, {"run": "b"})
    time.sleep(0.3)
    assert sum(1 for _, tags in gauge.calls if tags == {"run": "a"}) >= 3  # set again and again
    keeper.drop(run="a")
    time.sleep(0.1)
    before = len([c for c in gauge.calls if c[1] == {"run": "a"}])
    time.sleep(0.3)
    assert len([c for c in gauge.calls if c[1] == {"run": "a"}]) == before
    assert gauge.calls[-1] == (2.0, {"run": "b"})
