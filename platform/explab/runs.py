"""Runs: one directory per job run, and the `RunContext` a job uses to reach everything.

``runs/<job>/<run-id>/`` holds ``config.yaml`` (resolved), ``manifest.json`` (versions, git commit,
seed, models, host, times, status), ``metrics.parquet`` (step metrics), ``result.json`` (final
metrics), ``tables/*.parquet``, ``artifacts/*.safetensors`` and ``plots/*.png``. Every write is
atomic; a failed run is marked failed in its manifest (stopped, when it was ended from outside)
and keeps what it wrote, with the traceback in ``error.log``. A run directory appears whole (made
under a hidden name with its config and manifest, then renamed). A run whose process died without
ending it (SIGKILL, a lost node) reads as ``crashed``.

Step metrics are appended in chunks (``metrics.parts/part-*.parquet``, one per `FLUSH_ROWS` rows
or `FLUSH_S` seconds) and compacted into ``metrics.parquet`` when the run ends, so logging costs
linear time and a killed run keeps every flushed row (`read_metrics` reads either form).

A metric value that is not finite (NaN, ±inf) is recorded as missing: null in ``result.json`` and
``metrics.parquet``, never reported to Tune or Ray metrics, and named in the manifest's
``invalid_metrics``, so a diverged run can never rank first in a sweep.

A run also reports to Ray metrics (`explab.telemetry.RunMetrics`): progress (``ctx.progress``), the
values it logs and returns, and runs started/completed/failed with their durations.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform as _platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from explab import __version__, mirror, store
from explab.config import dump_config
from explab.errors import ExplabError, one_line
from explab.paths import DEFAULT_RUNS_DIR, readable_root, runs_root, runs_root_of  # noqa: F401 - importable from here
from explab.telemetry import RunMetrics

TRACKED_PACKAGES = (
    "torch", "torchvision", "transformers", "ray", "vllm", "open_clip_torch", "diffusers",
    "pot", "optuna", "datasets", "numpy", "pydantic",
)


METRICS_FILE = "metrics.parquet"
METRICS_PARTS = "metrics.parts"
ERROR_LOG = "error.log"
FLUSH_ROWS = 1000  # step metrics buffered before they are appended as a part file ...
FLUSH_S = 2.0  # ... or after this many seconds, whichever comes first
PARTIAL_SUFFIX = ".partial"  # a run directory being created: .<run-id>.partial
SWEEPS_DIR = "sweeps"
EPHEMERAL_MARKER = "/runtime_resources/"  # Ray unpacks a job's working dir (and deletes it) under here


def check_runs_dir(runs_dir: str | Path | None = None) -> Path:
    """The runs root, refused in one line when it cannot hold run directories (a file, or under one,
    or not writable; an object-store URI that cannot be reached); called before Ray starts so that bad
    input costs nothing."""
    location = runs_dir or os.environ.get("EXPLAB_RUNS_DIR")
    if mirror.is_uri(location):
        try:
            return mirror.check(str(location))
        except mirror.MirrorError as err:
            raise ExplabError(f"runs dir {err}") from None
    root = runs_root(runs_dir)
    absolute = root.resolve()
    if EPHEMERAL_MARKER in absolute.as_posix() or any(part.startswith("_ray_pkg_") for part in absolute.parts):
        raise ExplabError(f"runs dir {absolute} is inside Ray's temporary working-dir package, which Ray deletes: "
                          "give a durable path with --runs-dir (or set EXPLAB_RUNS_DIR on the cluster)")
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ExplabError(f"runs dir {root}: {folder} is a file, not a directory: "
                                  "give a directory with --runs-dir (or EXPLAB_RUNS_DIR)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ExplabError(f"runs dir {root}: {folder} is not writable: give a directory you can write to "
                                  "with --runs-dir (or EXPLAB_RUNS_DIR)")
            break
    return root


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path or Path(__file__).parent,
        capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


class Progress:
    """A run's progress through ``total`` steps: ``advance(n)`` moves the run's progress gauge and,
    in a terminal, a progress bar on stderr (without one, a line per tenth done, outside sweeps)."""

    def __init__(self, total: int, description: str, *, on_update: Callable[[float], None],
                 bar: bool = False, echo: bool = False):
        self.total = max(int(total), 0)
        self.description = description
        self.done = 0
        self._on_update = on_update
        self._echo = echo
        self._echoed_tenth = -1
        self._bar: Any = None
        self._task: Any = None
        if bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=self.total)
            self._bar.start()
        on_update(self.fraction)

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._on_update(self.fraction)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            if self.done >= self.total:
                self.close()
        elif self._echo and int(self.fraction * 10) > self._echoed_tenth:
            self._echoed_tenth = int(self.fraction * 10)
            print(f"{self.description}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MetricsLog:
    """A run's step metrics: kept in memory, appended to ``metrics.parts/`` in chunks, compacted
    into ``metrics.parquet`` by `compact` (each row is written twice in all: linear in the steps)."""

    def __init__(self, run_dir: Path, flush_rows: int | None = None, flush_s: float | None = None):
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.flush_rows = FLUSH_ROWS if flush_rows is None else flush_rows
        self.flush_s = FLUSH_S if flush_s is None else flush_s
        self._pending: list[dict[str, Any]] = []
        self._parts = 0
        self._flushed_at = time.monotonic()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._pending.append(row)
        if len(self._pending) >= self.flush_rows or time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows as the next part file."""
        if self._pending:
            part = self.run_dir / METRICS_PARTS / f"part-{self._parts:06d}.parquet"
            store.write_parquet(part, self._pending)
            self._parts += 1
            self._pending = []
        self._flushed_at = time.monotonic()

    def compact(self) -> None:
        """Write every row to ``metrics.parquet`` and drop the part files."""
        if self.rows:
            store.write_parquet(self.run_dir / METRICS_FILE, self.rows)
        self._pending = []
        shutil.rmtree(self.run_dir / METRICS_PARTS, ignore_errors=True)


def read_metrics(run_dir: str | Path) -> Any:
    """A run's step metrics as a DataFrame: ``metrics.parquet``, or for a run that never ended
    (killed) the part files it flushed; unreadable parts (a write cut short) are skipped."""
    import pandas as pd

    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return pd.read_parquet(run_dir / METRICS_FILE)
    frames = []
    for part in sorted((run_dir / METRICS_PARTS).glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(part))
        except Exception:  # noqa: BLE001 - a damaged part: keep the rest
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class RunContext:
    """What a job's ``run(config, ctx)`` uses: seed, run directory, models, data, logging, outputs."""

    def __init__(self, job: str, config: BaseModel, run_dir: Path, *, reporter: Callable[[dict], None] | None = None,
                 sweep: str | None = None):
        self.job = job
        self.config = config
        self.run_dir = run_dir
        self.seed: int = int(getattr(config, "seed", 0))
        self.rng = np.random.default_rng(self.seed)
        self._reporter = reporter
        self._metrics = MetricsLog(run_dir)
        self.invalid_metrics: dict[str, str] = {}  # metric -> where it first was not finite
        self._step = 0
        self._models: dict[str, dict[str, Any]] = {}
        self.manifest: dict[str, Any] = {}
        trial = _tune_experiment()
        self.sweep = sweep if sweep is not None else trial
        # a sweep trial's start and end are counted by the sweep's driver (see telemetry.TrialCounts)
        self.run_metrics = RunMetrics(job, run_dir.name, _model_tag(config), self.sweep, counted=not trial)
        self._progress: list[Progress] = []
        seed_everything(self.seed)

    # ---- paths and outputs -------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def save_table(self, name: str, frame: Any) -> Path:
        return store.write_parquet(self.path("tables", f"{name}.parquet"), frame)

    def save_artifact(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        return store.write_safetensors(self.path("artifacts", f"{name}.safetensors"), tensors, metadata)

    def save_plot(self, name: str, figure: Any) -> Path:
        return store.write_figure(self.path("plots", f"{name}.png"), figure)

    def save_json(self, name: str, data: Any) -> Path:
        return store.write_json(self.path("artifacts", f"{name}.json"), data)

    # ---- metrics -------------------------------------------------------------------------
    def log(self, step: int | None = None, **metrics: float) -> None:
        """Record step metrics: to ``metrics.parquet``, to Ray metrics (the ``explab_job_metric``
        gauge), and to Tune when running inside a trial."""
        if step is None:
            step = self._step
        self._step = step + 1
        values = self._finite(metrics, f"step {step}")
        row = {"step": step, "time": time.time(), **values}
        self._metrics.append(row)
        valid = {k: v for k, v in values.items() if v is not None}
        self.run_metrics.log(valid)
        if self._reporter is not None:
            self._reporter({"step": step, **valid})

    def _finite(self, metrics: dict[str, Any], where: str) -> dict[str, Any]:
        """``metrics`` as plain scalars, non-finite ones as None (recorded in ``invalid_metrics``)."""
        out = {}
        for name, value in metrics.items():
            value = _scalar(value)
            if _non_finite(value):
                if name not in self.invalid_metrics:
                    self.invalid_metrics[name] = f"{value} at {where}"
                    self.manifest["invalid_metrics"] = dict(self.invalid_metrics)
                    self._write_manifest()
                value = None
            out[name] = value
        return out

    def progress(self, total: int, description: str = "") -> Progress:
        """A progress tracker over ``total`` steps; call ``advance()`` after each one.

        It sets the run's ``explab_run_progress`` gauge, and draws a bar on stderr when that is a
        terminal (``explab run`` in a shell)."""
        for previous in self._progress:
            previous.close()
        tty = _stderr_is_tty()
        progress = Progress(total, description or self.job, on_update=self.run_metrics.progress,
                            bar=tty, echo=not tty and not self.sweep)
        self._progress.append(progress)
        return progress

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics.rows)

    # ---- models and data -----------------------------------------------------------------
    def model(self, spec: Any, server: str = "hooked", options: Any = None) -> Any:
        """A handle to the shared server holding ``spec`` (``server`` = "hooked", "generator" or "diffuser")."""
        from explab.models import ModelSpec
        from explab.servers import get_server

        spec = ModelSpec.of(spec)
        handle = get_server(server, spec, options)
        self._models[f"{server}:{spec.name}"] = {"name": spec.name, "server": server, **handle.describe()}
        self._write_manifest()
        return handle

    def models(self, requests: list[tuple[Any, str, Any]]) -> list[Any]:
        """`model` of each ``(spec, server, options)``, the servers started side by side (their models
        load at the same time, not in turn: see `explab.servers.start_servers`)."""
        from explab.models import ModelSpec
        from explab.servers import start_servers

        specs = [(ModelSpec.of(spec), server, options) for spec, server, options in requests]
        handles = start_servers([(server, spec, options) for spec, server, options in specs])
        for (spec, server, _), handle in zip(specs, handles, strict=True):
            self._models[f"{server}:{spec.name}"] = {"name": spec.name, "server": server, **handle.describe()}
        self._write_manifest()
        return handles

    def dataset(self, spec: Any, **kwargs: Any) -> Any:
        from explab.data import load_dataset

        return load_dataset(spec, seed=self.seed, **kwargs)

    # ---- lifecycle -------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        self.manifest["models"] = list(self._models.values())
        store.write_json(self.path("manifest.json"), self.manifest)

    def _close_progress(self) -> None:
        for progress in self._progress:
            progress.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _model_tag(config: BaseModel) -> str:
    """The run's model for metric tags: the config's ``model`` field, else its first model spec."""
    candidates = [getattr(config, "model", None)] + [getattr(config, name, None) for name in type(config).model_fields]
    for value in candidates:
        name = getattr(value, "name", None)
        if isinstance(name, str) and type(value).__name__ == "ModelSpec":
            return name
    return ""


def _tune_experiment() -> str:
    """The Tune experiment this process runs a trial of, or "" outside Tune trials."""
    if "ray.tune" not in sys.modules:
        return ""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return str(session.experiment_name or "") if session is not None else ""
    except Exception:
        return ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def create_run(job: str, config: BaseModel, runs_dir: str | Path | None = None, *,
               run_dir: Path | None = None, reporter: Callable[[dict], None] | None = None,
               sweep: str | None = None) -> RunContext:
    """Make the run directory with its resolved config and a 'running' manifest.

    The directory appears whole: it is written under a hidden ``.<run-id>.partial`` name and
    renamed, so no run directory ever lacks its manifest. ``sweep`` tags the run's metrics
    (default: the Tune experiment when inside a trial)."""
    run_dir = Path(run_dir) if run_dir else runs_root(runs_dir) / job / new_run_id()
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} exists already")
    ctx = RunContext(job, config, run_dir, reporter=reporter, sweep=sweep)
    ctx.manifest = {
        "job": job,
        "run_id": run_dir.name,
        "explab_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seed": ctx.seed,
        "models": [],
        "host": {"hostname": socket.gethostname(), "platform": _platform.platform(), "pid": os.getpid(),
                 "pid_start": _process_start(os.getpid())},
        "argv": sys.argv,
        "started": _now(),
        "ended": None,
        "status": "running",
    }
    if ctx.sweep:
        ctx.manifest["sweep"] = ctx.sweep
    partial = run_dir.parent / f".{run_dir.name}{PARTIAL_SUFFIX}"
    partial.mkdir(parents=True)
    try:
        store.write_text(partial / "config.yaml", dump_config(config))
        store.write_json(partial / "manifest.json", ctx.manifest)
        os.rename(partial, run_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    mirror.sync_up(run_dir)  # a URI runs dir: the run shows there as running
    return ctx


def execute(job: Any, config: BaseModel, runs_dir: str | Path | None = None, *,
            run_dir: Path | None = None, reporter: Callable[[dict], None] | None = None,
            sweep: str | None = None) -> tuple[Path, dict]:
    """Run ``job`` with ``config`` in a new run directory; returns (run_dir, result).

    On failure the manifest says ``failed`` with the error's one line (``stopped`` when the run was
    ended from outside: Ctrl-C, SIGTERM, or a sweep's scheduler stopping the trial), the traceback
    goes to ``error.log``, everything already written stays, and the exception propagates with the
    run directory as its ``explab_run_dir`` attribute. Non-finite final metrics are recorded as
    missing (None). The run is counted in Ray metrics either way (tagged with ``sweep``, by default
    the Tune experiment when this is a trial).
    """
    ctx = create_run(job.name, config, runs_dir, run_dir=run_dir, reporter=reporter, sweep=sweep)
    try:
        return _execute(job, config, ctx)
    finally:
        mirror.sync_up(ctx.run_dir)  # a URI runs dir: everything the run wrote, by any means, is there


def _execute(job: Any, config: BaseModel, ctx: RunContext) -> tuple[Path, dict]:
    ctx.run_metrics.start()
    start = time.time()
    try:
        result = ctx._finite(dict(job.run(config, ctx) or {}), "the result")
        store.write_json(ctx.path("result.json"), result)
    except BaseException as err:
        ctx._close_progress()
        status = "stopped" if _is_stop(err) else "failed"
        try:
            ctx._metrics.compact()
        except Exception:  # noqa: BLE001 - the parts stay readable; the job's error is what matters
            pass
        if status == "failed":
            store.write_text(ctx.path(ERROR_LOG), "".join(traceback.format_exception(err)))
        ctx.manifest.update(status=status, ended=_now(), duration_s=round(time.time() - start, 3),
                            error=one_line(err) if status == "failed" else f"{type(err).__name__}: {err}")
        if status == "failed":
            ctx.manifest["error_log"] = ERROR_LOG
        ctx._write_manifest()
        ctx.run_metrics.finish(status)
        try:
            err.explab_run_dir = ctx.run_dir  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise
    ctx._close_progress()
    ctx._metrics.compact()
    ctx.manifest.update(status="completed", ended=_now(), duration_s=round(time.time() - start, 3))
    ctx._write_manifest()
    ctx.run_metrics.log({k: v for k, v in result.items() if v is not None})
    ctx.run_metrics.finish("completed")
    return ctx.run_dir, result


def _is_stop(err: BaseException) -> bool:
    """Stopped rather than failed: Ctrl-C or SIGTERM (`explab.errors.Terminated`), or a clean exit
    (how Tune ends a trial its scheduler stops)."""
    return isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code in (0, None))


# ---- reading runs back ------------------------------------------------------------------------
FINISHED = ("completed", "failed", "stopped", "crashed")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux, from /proc): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(host: dict[str, Any]) -> bool:
    """Whether the process that ran a run on this machine has ended (False when unknown)."""
    pid = host.get("pid")
    if host.get("hostname") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    started = host.get("pid_start")
    now = _process_start(pid)
    return started is not None and now is not None and now != started


def run_status(manifest: dict[str, Any]) -> str:
    """The manifest's status, except a run still ``running`` whose process is gone: ``crashed``."""
    status = str(manifest.get("status") or "unknown")
    if status == "running" and _process_gone(manifest.get("host") or {}):
        return "crashed"
    return status


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """What can be read of a run, never raising for damage: ``manifest`` (or {}), ``status``
    (``crashed`` for a dead process, ``damaged`` without a readable manifest), and ``damaged``:
    ``{file: what is wrong}`` for each of manifest.json, config.yaml, result.json that is unreadable."""
    run_dir = Path(run_dir)
    damaged: dict[str, str] = {}
    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        damaged["manifest.json"] = "missing"
    except (OSError, ValueError) as err:
        damaged["manifest.json"] = f"unreadable ({type(err).__name__}: {one_line(err)})"
        manifest = {}
    if not (run_dir / "config.yaml").is_file():
        damaged["config.yaml"] = "missing"
    if (run_dir / "result.json").exists():
        try:
            json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError) as err:
            damaged["result.json"] = f"unreadable ({type(err).__name__})"
    status = run_status(manifest) if manifest else "damaged"
    return {"manifest": manifest, "status": status, "damaged": damaged}


def _run_dirs(root: Path, job: str | None) -> list[Path]:
    dirs = []
    for job_dir in sorted(root.glob(job or "*")):
        if not job_dir.is_dir() or (job is None and job_dir.name == SWEEPS_DIR) or job_dir.name.startswith("."):
            continue
        for run_dir in sorted(job_dir.iterdir()):
            if run_dir.is_dir() and not run_dir.name.startswith("."):
                dirs.append(run_dir)
    return dirs


def list_runs(runs_dir: str | Path | None = None, job: str | None = None) -> list[dict[str, Any]]:
    """Every run under the runs root, oldest first. A run with a damaged or missing manifest is
    listed with status ``damaged`` (and what is wrong) instead of hiding the others; a run whose
    process died reads as ``crashed``. Leftover temporary files of finished runs are removed."""
    root = readable_root(runs_dir)
    rows = []
    for run_dir in _run_dirs(root, job):
        info = read_run(run_dir)
        data = info["manifest"]
        if info["status"] in FINISHED:
            store.remove_temporaries(run_dir)
        row = {"job": data.get("job") or run_dir.parent.name, "run_id": data.get("run_id") or run_dir.name,
               "status": info["status"], "started": data.get("started"), "duration_s": data.get("duration_s"),
               "path": str(run_dir)}
        if info["damaged"]:
            row["damaged"] = "; ".join(f"{k} {v}" for k, v in info["damaged"].items())
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["started"] or ""))


def mark_crashed(runs_dir: str | Path | None = None, job: str | None = None) -> list[Path]:
    """Mark every run whose process is gone as ``crashed`` in its manifest (with the end time
    unknown), compact the metrics it flushed into ``metrics.parquet`` and remove leftover
    temporary files and half-created run directories; returns the runs marked."""
    marked = []
    root = readable_root(runs_dir)
    for partial in root.glob(f"{job or '*'}/.*{PARTIAL_SUFFIX}"):  # a run killed while being created
        if partial.is_dir() and time.time() - partial.stat().st_mtime > 60:
            shutil.rmtree(partial, ignore_errors=True)
    for run_dir in _run_dirs(root, job):
        info = read_run(run_dir)
        if info["status"] != "crashed" or info["manifest"].get("status") != "running":
            continue
        manifest = dict(info["manifest"])
        manifest.update(status="crashed", error="the run's process ended without finishing it (killed?)",
                        marked_crashed=_now())
        frame = read_metrics(run_dir)
        if len(frame) and not (run_dir / METRICS_FILE).is_file():
            store.write_parquet(run_dir / METRICS_FILE, frame)
        shutil.rmtree(run_dir / METRICS_PARTS, ignore_errors=True)
        store.remove_temporaries(run_dir)
        store.write_json(run_dir / "manifest.json", manifest)
        mirror.sync_up(run_dir)
        marked.append(run_dir)
    return marked


def resolve_run(ref: str, runs_dir: str | Path | None = None) -> Path:
    """A run by path, by ``job/run-id``, or by (a unique prefix of) its run id."""
    path = Path(ref)
    if (path / "manifest.json").is_file() or (path / "config.yaml").is_file():
        return path
    root = readable_root(runs_dir)
    if (root / ref).is_dir() and (root / ref).parent.parent == root:
        return root / ref
    matches = [p for p in _run_dirs(root, None) if p.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ExplabError(f"no run {ref!r} under {root}: give a run directory or an id from `explab runs`")
    raise ExplabError(f"run id {ref!r} is ambiguous ({len(matches)} runs match): give more of it")
