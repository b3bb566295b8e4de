"""Sweeps: a ``sweep.yaml`` becomes a Ray Tune ``Tuner`` with ``OptunaSearch`` (and optionally ASHA).

Every trial runs the job through `explab.runs.execute` in the same Ray cluster as the driver, so
trials reach the same shared model servers (a sweep of 16 steering strengths loads the model
once). Each ``ctx.log`` of the job is reported to Tune, and so are the job's final metrics.

``<runs-dir>/sweeps/<job>/<sweep-id>/`` holds ``sweep.yaml`` (the validated spec, defaults filled
in), ``base_config.yaml`` (the job config every trial starts from), ``manifest.json``,
``trials.parquet`` (one row per trial, rewritten as trials finish), ``best.json``, ``plots/*.png``,
``trials/<job>/<trial-id>/`` (each trial's run directory) and ``tune/`` (Tune's experiment state,
which ``--resume`` restores).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import sys
import threading
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from ray.tune import Callback, Stopper
from ray.tune.search.optuna import OptunaSearch

from explab import mirror, store, sweep_report, telemetry
from explab.config import apply_overrides, read_yaml, set_dotted, validate
from explab.errors import ConfigError, ExplabError
from explab.sweep_spec import (  # noqa: F401 - the spec's names stay importable from explab.sweep
    BASE_FILE,
    FINAL_KEY,
    NAMES_KEY,
    RUN_DIR_KEY,
    SPEC_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    Base,
    Objective,
    Param,
    Resources,
    Sampler,
    Scheduler,
    SweepSpec,
    attempts,
    load_spec,
)


# ---- a resolved sweep: spec + job + base config ------------------------------------------------
class Plan(BaseModel):
    spec: SweepSpec
    source: str  # where the spec came from
    base: dict[str, Any]  # the job's config every trial starts from (validated)


def load_job(name: str) -> Any:
    """The job ``name``: its own module when the package is named after it (as every job's is),
    without importing every other job as `explab.job.get_job` does (seconds per trial actor)."""
    from explab.job import Job, get_job

    if name.isidentifier():
        try:
            module = importlib.import_module(f"jobs.{name}.job")
        except ModuleNotFoundError as err:
            if err.name not in (f"jobs.{name}", f"jobs.{name}.job"):
                raise
        else:
            job = getattr(module, "JOB", None)
            if isinstance(job, Job) and job.name == name:
                return Job(job.name, job.description, job.config, job.run, f"jobs.{name}", job.synthetic)
    return get_job(name)


def resolve(spec: SweepSpec, source: str | Path, base: dict[str, Any] | None = None) -> Plan:
    """Check the spec against its job: the job exists, the base config is valid, every space field
    exists in the job's Config and every value of its range is accepted there."""
    source = str(source)
    job = load_job(spec.job)
    if base is None:
        config_path = _base_config_path(job, spec.base.config, Path(source).parent)
        data = read_yaml(config_path) if config_path is not None else {}
        data = apply_overrides(data, spec.base.overrides)
        base = validate(job.config, data, f"{source}: base config").model_dump(mode="json")
    else:
        base = validate(job.config, base, f"{source}: base config").model_dump(mode="json")
    for field, param in spec.space.items():
        check_field(job.config, field, f"{source}: space field {field!r}", job.name)
        for value in param.candidates():
            trial = set_dotted(base, field, value, what=f"{source}: space field {field!r}")
            try:
                job.config.model_validate(trial)
            except ValidationError as error:  # name the value and the reason
                reason = error.errors()[0]["msg"]
                raise ConfigError(f"{source}: space field {field!r}: value {value!r} is not valid for job "
                                  f"{job.name!r}'s config ({reason}): fix the range") from None
    return Plan(spec=spec, source=source, base=base)


def _base_config_path(job: Any, ref: str | None, spec_dir: Path) -> Path | None:
    if ref is None:
        return None
    beside = spec_dir / ref
    if ("/" in ref or ref.endswith((".yaml", ".yml"))) and not Path(ref).exists() and beside.exists():
        return beside
    return job.config_path(ref)


def check_field(cls: type[BaseModel], dotted: str, source: str, job: str) -> None:
    parts = dotted.split(".")
    node: type[BaseModel] = cls
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        fields = node.model_fields
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: the config of job {job!r} has no field {here!r} (fields there: {known}): "
                              "check its spelling")
        if i == len(parts) - 1:
            return
        annotation = fields[part].annotation
        model = _model_in(annotation)
        if model is None:
            if _is_mapping(annotation):
                return  # keys inside a dict field are checked when the values are validated
            raise ConfigError(f"{source}: {here!r} in the config of job {job!r} is a value, not a section: "
                              "sweep it directly")
        node = model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Mapping) or annotation is dict:
        return True
    return any(_is_mapping(arg) for arg in typing.get_args(annotation))


# ---- the trial -------------------------------------------------------------------------------
def trial_config(job: Any, base: dict[str, Any], params: dict[str, Any]) -> BaseModel:
    data = base
    for field, value in params.items():
        data = set_dotted(data, field, value)
    return validate(job.config, data, "trial config")




def _completed(run_dir: Path, config: BaseModel) -> dict[str, Any] | None:
    """The final metrics of a completed run of this exact config, else None."""
    from explab.config import dump_config

    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        if manifest.get("status") != "completed" or (run_dir / "config.yaml").read_text() != dump_config(config):
            return None
        return json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None


def run_trial(params: dict[str, Any], *, job_name: str, base: dict[str, Any], trials_dir: str,
              sweep: str = "", mirror_root: str = "") -> None:
    """Tune's function trainable: one run of the job with the trial's params.

    Runs in a Tune trial actor of the driver's cluster (Ray is initialised there, so servers are
    shared). A trial that finds a completed run of its own config (a resumed sweep that was killed
    between the trial's end and Tune's next state save) reports that run again instead of
    re-running it. The run's metrics are tagged with ``sweep`` (the sweep's id); the driver counts
    the trial's start and end (`telemetry.TrialCounts`). ``mirror_root`` is the driver's object-store
    mirror (`explab.mirror`), so that a trial uploads what it writes under ``trials_dir`` wherever it runs.
    """
    from ray import tune

    from explab.runs import execute
    from explab.runtime import _quiet_ray_data
    from explab.servers.registry import release_private_servers

    # a trial worker joins the driver's Ray (no runtime.init here): quiet Ray Data as runtime.init does,
    # without importing it (seconds) for jobs that do not use it
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if mirror_root:
        os.environ["EXPLAB_MIRROR"] = mirror_root
    if "ray.data" in sys.modules:
        _quiet_ray_data()
    job = load_job(job_name)
    config = trial_config(job, base, params)
    trial_id = tune.get_context().get_trial_id()
    job_dir = Path(trials_dir) / job.name
    previous = attempts(job_dir, trial_id)
    for run_dir in previous:
        result = _completed(run_dir, config)
        if result is not None:
            _replay(run_dir, result)
            return
    run_dir = job_dir / (trial_id if not previous else f"{trial_id}-r{len(previous)}")
    last: dict[str, Any] = {}

    def report(row: dict[str, Any]) -> None:
        last.update({k: v for k, v in row.items() if k != "step"})
        tune.report({**row, RUN_DIR_KEY: str(run_dir)})

    try:
        _, result = execute(job, config, run_dir=run_dir, reporter=report, sweep=sweep)
    finally:
        release_private_servers()
    tune.report(final_report(last, result, run_dir))


def final_report(last: dict[str, Any], result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A trial's last report: its final metrics, the markers, and the names of every metric the job
    logged or returned (finite or not), so `UnreportedMetric` can tell a typo from a diverged run."""
    return {**final_metrics(last, result), FINAL_KEY: 1, RUN_DIR_KEY: str(run_dir),
            NAMES_KEY: " ".join(sorted({*last, *result}))}


def final_metrics(last: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports at its end: the last logged values updated by the job's result, without
    missing ones: a final metric that was not finite (None) is missing, not the last step's value."""
    return {k: v for k, v in {**last, **result}.items() if v is not None and not _missing(v)}


def _replay(run_dir: Path, result: dict[str, Any]) -> None:
    from ray import tune

    last: dict[str, Any] = {}
    from explab.runs import read_metrics

    for row in read_metrics(run_dir).to_dict("records"):
        row = {k: v for k, v in row.items() if k != "time" and not _missing(v)}
        last.update({k: v for k, v in row.items() if k != "step"})
        tune.report({**row, RUN_DIR_KEY: str(run_dir)})
    tune.report(final_report(last, result, run_dir))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ---- progress (driver side) ---------------------------------------------------------------------
class _Sink:
    """What the live sweep's callback drives: the trials table on disk and an optional progress bar.

    The table never claims more than ``--resume`` can restore: a trial counts as finished only once
    Tune's experiment state in the sweep directory records it so (Tune saves that state about every
    second and copies it there in the background; a sweep killed in between would otherwise list a
    finished trial that the resumed sweep does not know, and lose it from the table). Until then the
    trial stays ``running``, and each step of Tune's loop looks again.
    """

    def __init__(self, plan: Plan, sweep_dir: Path, total: int, done: int, progress: Any | None):
        self.plan, self.sweep_dir, self.total, self.progress = plan, sweep_dir, total, progress
        self.lock = threading.Lock()
        self.task = progress.add_task("sweep", total=total, completed=done, best="") if progress else None
        self.durable: set[str] = set()
        self.pending = False
        self.counts = telemetry.TrialCounts()
        self._model = _model_name(plan)

    def started(self, trial: Any) -> None:
        self.counts.started(trial.trial_id, self.plan.spec.job, self._model, self.sweep_dir.name)

    def ended(self, trial: Any) -> None:
        """Count a trial's end as a run's: failed, completed, or stopped (by the scheduler)."""
        state = sweep_report.trial_rows([trial], self.plan.spec, self.sweep_dir, finished=trial)[0]["status"]
        status = {"failed": "failed", "completed": "completed"}.get(state, "stopped")
        self.counts.ended(trial.trial_id, status, self.plan.spec.job, self._model, self.sweep_dir.name)

    def update(self, trials: list[Any], finished: Any | None) -> None:

        with self.lock:
            rows = sweep_report.trial_rows(trials, self.plan.spec, self.sweep_dir, finished=finished)
            if any(r["status"] in sweep_report.FINISHED and r["trial_id"] not in self.durable for r in rows):
                self.durable |= saved_finished(self.sweep_dir / TUNE_DIR)
            self.pending = False
            for row in rows:
                if row["status"] in sweep_report.FINISHED and row["trial_id"] not in self.durable:
                    row["status"], self.pending = "running", True
            sweep_report.write_trials(self.sweep_dir, self.plan.spec, rows)
            if self.progress is not None:
                done = sum(r["status"] in sweep_report.FINISHED for r in rows)
                self.progress.update(self.task, completed=done, best=sweep_report.best_text(self.plan.spec, rows))


def saved_finished(experiment: Path) -> set[str]:
    """Ids of the trials that Tune's newest experiment state in ``experiment`` records as finished."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
        trials = [entry[0] if isinstance(entry[0], dict) else json.loads(entry[0]) for entry in data["trial_data"]]
        return {t["trial_id"] for t in trials if t.get("status") in ("TERMINATED", "ERROR")}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return set()  # being copied there right now: the next step reads it whole


_SINK: _Sink | None = None


def _model_name(plan: Plan) -> str:
    """The model tag of the sweep's runs (the base config's; a sweep rarely varies the model)."""
    from explab.runs import _model_tag

    try:
        return _model_tag(trial_config(load_job(plan.spec.job), plan.base, {}))
    except Exception:  # noqa: BLE001 - a tag, never a reason to fail the sweep
        return ""


class SweepProgress(Callback):
    """Drives whatever sink the live sweep set. Stateless: Tune pickles it with the Tuner and
    `Tuner.restore` brings it back (by reference to this module, so it sees the new sink)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _SINK is not None:
            _SINK.started(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _SINK is not None:
            _SINK.ended(trial)
            _SINK.update(trials, trial)
            mirror.sync_up(_SINK.sweep_dir / TUNE_DIR)  # an object-store runs dir: --resume works from anywhere

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _SINK is not None:
            _SINK.ended(trial)
            _SINK.update(trials, trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if _SINK is not None and _SINK.pending:
            _SINK.update(trials, None)


class UnreportedMetric(Stopper):
    """Ends the sweep as soon as a trial finishes whose job never logged or returned a goal metric
    (a typo in the spec, or the wrong job): every other trial would miss it too. A metric that was
    reported but not finite (a diverged trial) does not count; the sweep then fails with one line
    (`sweep_report.write_outputs` names what the job did report)."""

    def __init__(self, metrics: list[str]):
        self.metrics = list(metrics)
        self.missing = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        names = result.get(NAMES_KEY)
        if result.get(FINAL_KEY) and isinstance(names, str):
            self.missing |= any(m not in names.split() for m in self.metrics)
        return False

    def stop_all(self) -> bool:
        return self.missing


class Search(OptunaSearch):
    """OptunaSearch without intermediate values: only Optuna's pruners read them (Tune's scheduler
    stops trials here), a job's step logs need not carry the metric, and a trial restarted by
    --resume would report its steps a second time."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return


# ---- running a sweep -------------------------------------------------------------------------
def sweeps_root(runs_dir: str | Path | None = None) -> Path:
    from explab.runs import runs_root

    return runs_root(runs_dir) / "sweeps"


def find_sweep(ref: str | Path, runs_dir: str | Path | None = None) -> Path:
    """The sweep directory to resume: a sweep directory itself, or — for a sweep.yaml — the newest
    unfinished sweep of that spec under the runs dir."""
    path = Path(ref)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file() or not (path / TUNE_DIR).is_dir():
            raise ExplabError(f"{path} is not a sweep directory (no {SPEC_FILE} and {TUNE_DIR}/): give the "
                              "directory `explab sweep` printed")
        return path
    spec = load_spec(path)
    plan = resolve(spec, path)
    candidates = []
    for sweep_dir in sorted((sweeps_root(runs_dir) / spec.job).glob("*/")):
        try:
            manifest = json.loads((sweep_dir / "manifest.json").read_text())
            same = yaml.safe_load((sweep_dir / SPEC_FILE).read_text()) == _spec_dump(plan.spec)
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if same and manifest.get("status") != "completed":
            candidates.append(sweep_dir)
    if not candidates:
        raise ExplabError(f"no unfinished sweep of {path} under {sweeps_root(runs_dir) / spec.job}: "
                          "give the sweep directory, or run it without --resume")
    return candidates[-1]


def run_sweep(spec_path: str | Path, runs_dir: str | Path | None = None, address: str | None = None,
              resume: bool = False, *, progress: bool = False) -> Path:
    """Run (or with ``resume``, continue) a sweep; returns its directory.

    ``spec_path`` is a sweep.yaml; with ``resume`` it may also be a sweep directory (a yaml then
    resumes the newest unfinished sweep of it). Bad specs raise `ConfigError`/`ExplabError` before
    anything is written.
    """
    from explab import runtime
    from explab.runs import new_run_id

    if resume:
        from ray.tune import Tuner

        from explab.paths import readable_root

        readable_root(runs_dir)  # an object-store runs dir: its sweeps (and their Tune state) come down first
        sweep_dir = find_sweep(spec_path, runs_dir)
        if not Tuner.can_restore(str((sweep_dir / TUNE_DIR).resolve())):
            raise ExplabError(f"{sweep_dir} has no Tune state to resume (it stopped before its first trial): "
                              "run the sweep again without --resume")
        spec = validate(SweepSpec, read_yaml(sweep_dir / SPEC_FILE), str(sweep_dir / SPEC_FILE))
        plan = resolve(spec, sweep_dir / SPEC_FILE, base=read_yaml(sweep_dir / BASE_FILE))
    else:
        spec = load_spec(spec_path)
        plan = resolve(spec, spec_path)
        sweep_dir = sweeps_root(runs_dir) / spec.job / new_run_id()
    runtime.init(address)
    if _ray_client():
        raise ExplabError("explab sweep drives Ray Tune from this process and reads its results from local disk, "
                          "which a ray:// (Ray Client) connection cannot do: run it on the cluster with "
                          "`explab submit --sweep SWEEP.yaml`, or use --address HOST:6379 from a cluster node")
    check_resources(spec)
    sweep_dir = sweep_dir.resolve()
    if not resume:
        sweep_dir.mkdir(parents=True, exist_ok=False)
        store.write_text(sweep_dir / SPEC_FILE, yaml.safe_dump(_spec_dump(plan.spec), sort_keys=False))
        store.write_text(sweep_dir / BASE_FILE, yaml.safe_dump(plan.base, sort_keys=False))
    manifest = _manifest(sweep_dir, plan, resume)
    store.write_json(sweep_dir / "manifest.json", manifest)
    return _fit(plan, sweep_dir, manifest, resume, progress)


def largest_node(resource: str) -> float:
    """The most of ``resource`` one node of the cluster has or can get: the live nodes, and the
    node types the autoscaler may start (from its cluster config, when the cluster has one)."""
    import ray

    amounts = [float(n.get("Resources", {}).get(resource, 0.0)) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # None without an autoscaler
    except Exception:  # noqa: BLE001 - an older/newer Ray without it: the live nodes decide
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        amounts.append(float(group.resources.get(resource, 0)))
    return max(amounts, default=0.0)


def check_resources(spec: SweepSpec) -> None:
    """One line, before the sweep exists, when a trial asks for more than any node has (or the
    autoscaler can start): Tune would otherwise wait for it forever."""
    for resource, amount in (("CPU", spec.resources_per_trial.cpu), ("GPU", spec.resources_per_trial.gpu)):
        largest = largest_node(resource)
        if amount > largest:
            raise ExplabError(f"resources_per_trial.{resource.lower()}: a trial asks for {amount:g} {resource}s, "
                              f"but the largest node has {largest:g}: lower it (or add a node that has them)")


def _ray_client() -> bool:
    try:
        import ray.util.client

        return bool(ray.util.client.ray.is_connected())
    except (ImportError, AttributeError):
        return False


def _spec_dump(spec: SweepSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True)


def _manifest(sweep_dir: Path, plan: Plan, resume: bool) -> dict[str, Any]:
    from explab import __version__
    from explab.runs import git_commit, package_versions

    previous: dict[str, Any] = {}
    if resume and (sweep_dir / "manifest.json").is_file():
        previous = json.loads((sweep_dir / "manifest.json").read_text())
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {
        **previous,
        "job": plan.spec.job,
        "sweep_id": sweep_dir.name,
        "spec": previous.get("spec", plan.source) if resume else str(Path(plan.source).resolve()),
        "explab_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "started": previous.get("started", now),
        "resumed": [*previous.get("resumed", []), now] if resume else [],
        "ended": None,
        "status": "running",
        "num_samples": plan.spec.num_samples,
    }


def _fit(plan: Plan, sweep_dir: Path, manifest: dict[str, Any], resume: bool, progress: bool) -> Path:
    global _SINK
    import logging

    import optuna
    from ray import tune

    from explab import runtime

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = plan.spec
    # a job's per-step logs need not carry the metric (it may come only with the final result)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # save Tune's experiment state often: --resume then re-runs as little as possible
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    experiment = sweep_dir / TUNE_DIR
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job_name=spec.job, base=plan.base, trials_dir=str(sweep_dir / TRIALS_DIR),
                             sweep=sweep_dir.name, mirror_root=str(mirror.mirror_root())),
        {"cpu": spec.resources_per_trial.cpu, "gpu": spec.resources_per_trial.gpu},
    )
    done = 0
    if resume:
        done = sum(r["status"] in sweep_report.FINISHED
                   for r in sweep_report.trial_rows(_load_trials(experiment), spec, sweep_dir))
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, tune_config=_tune_config(spec), run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0, callbacks=[SweepProgress()], stop=UnreportedMetric([g.metric for g in spec.goals]),
        ))
    bar = _progress_bar(spec) if progress else None
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    # Tune's new output engine prints its experiment table even at verbose=0; the legacy one is silent
    engine = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    _SINK = _Sink(plan, sweep_dir, spec.num_samples, done, bar)
    _start_ray_data_stats_actor()
    try:
        if bar is not None:
            info = runtime.info()
            if info is not None and info.dashboard_url:
                bar.console.print(f"[dim]Ray dashboard: {info.dashboard_url}[/dim]")
            bar.start()
            tune_logger.setLevel(logging.CRITICAL)  # failed trials are in trials.parquet, not tracebacks here
        tuner.fit()
    finally:
        _SINK = None
        tune_logger.setLevel(level)
        if engine is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = engine
        if bar is not None:
            bar.stop()
    # an object-store runs dir: Tune's state goes up, the run directories of trials on other nodes come down
    mirror.sync_up(experiment)
    mirror.sync_down_local(sweep_dir / TRIALS_DIR)
    trials = _load_trials(experiment)
    rows = sweep_report.trial_rows(trials, spec, sweep_dir)
    finished = sum(r["status"] in sweep_report.FINISHED for r in rows)
    complete = finished >= spec.num_samples
    best = sweep_report.write_outputs(sweep_dir, spec, rows)
    manifest.update(status="completed" if complete else "interrupted",
                    ended=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    trials=len(rows), **{s: sum(r["status"] == s for r in rows) for s in sweep_report.STATUSES})
    unreported = best.get("unreported") or []
    if unreported and any(r["status"] != "failed" for r in rows):
        manifest.update(status="failed", error=unreported[0])
    store.write_json(sweep_dir / "manifest.json", manifest)
    if manifest["status"] == "failed":
        raise ExplabError(f"sweep {sweep_dir}: {unreported[0]}: set the sweep's metric to one of those "
                          "(or make the job return it)")
    return sweep_dir


def _start_ray_data_stats_actor() -> None:
    """Start Ray Data's (detached) stats actor from the driver. A job that uses Ray Data inside a
    trial would otherwise create it there, inside the trial's placement group (Tune captures child
    tasks and actors), and it would die with that trial, failing later trials' datasets."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # Ray Data moved it: nothing to work around then, or a new problem to see
        return
    get_or_create_stats_actor()


def _load_trials(experiment: Path) -> list[Any]:
    from ray.tune import ExperimentAnalysis

    return list(ExperimentAnalysis(str(experiment)).trials)


def _tune_config(spec: SweepSpec) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    goals = spec.goals
    if spec.sampler.type == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        kwargs = {} if spec.sampler.n_startup_trials is None else {"n_startup_trials": spec.sampler.n_startup_trials}
        sampler = optuna.samplers.TPESampler(seed=spec.seed, **kwargs)
    metric: str | list[str] = goals[0].metric if len(goals) == 1 else [g.metric for g in goals]
    mode: str | list[str] = goals[0].mode if len(goals) == 1 else [g.mode for g in goals]
    search = Search(space={f: p.distribution() for f, p in spec.space.items()}, metric=metric, mode=mode,
                         sampler=sampler)
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr=spec.scheduler.time_attr, metric=goals[0].metric, mode=goals[0].mode,
            # rungs at grace_period * reduction_factor^k strictly below max_t: Tune would put one at
            # max_t itself and could stop a trial at its last step, before it reports its final metrics
            max_t=spec.scheduler.max_t - 0.5, grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
            stop_last_trials=False,  # a trial that reaches max_t ends by itself
        )
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(search_alg=ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent),
                           scheduler=scheduler, num_samples=spec.num_samples, reuse_actors=True,
                           trial_dirname_creator=trial_dirname)


def _progress_bar(spec: SweepSpec) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]sweep {spec.job}[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("trials"), TimeElapsedColumn(), TextColumn("{task.fields[best]}"),
                    console=Console(stderr=True), transient=False)
