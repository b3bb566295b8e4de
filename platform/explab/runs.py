"""Runs: one directory per job run, and the `RunContext` a job uses to reach everything.

``runs/<job>/<run-id>/`` holds ``config.yaml`` (resolved), ``manifest.json`` (versions, git commit,
seed, models, host, times, status), ``metrics.parquet`` (step metrics), ``result.json`` (final
metrics), ``tables/*.parquet``, ``artifacts/*.safetensors`` and ``plots/*.png``. Every write is
atomic; a failed run is marked failed in its manifest (stopped, when it was ended from outside)
and keeps what it wrote.

A run also reports to Ray metrics (`explab.telemetry.RunMetrics`): progress (``ctx.progress``), the
values it logs and returns, and runs started/completed/failed with their durations.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform as _platform
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from explab import __version__, store
from explab.config import dump_config
from explab.errors import ExplabError
from explab.telemetry import RunMetrics

DEFAULT_RUNS_DIR = "runs"
TRACKED_PACKAGES = (
    "torch", "torchvision", "transformers", "ray", "vllm", "open_clip_torch", "diffusers",
    "pot", "optuna", "datasets", "numpy", "pydantic",
)


def runs_root(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("EXPLAB_RUNS_DIR", DEFAULT_RUNS_DIR)).expanduser()


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
        self._metrics: list[dict[str, Any]] = []
        self._step = 0
        self._models: dict[str, dict[str, Any]] = {}
        self.manifest: dict[str, Any] = {}
        self.sweep = sweep if sweep is not None else _tune_experiment()
        self.run_metrics = RunMetrics(job, run_dir.name, _model_tag(config), self.sweep)
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
        row = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        self._metrics.append(row)
        store.write_parquet(self.path("metrics.parquet"), self._metrics)
        self.run_metrics.log({k: v for k, v in row.items() if k not in ("step", "time")})
        if self._reporter is not None:
            self._reporter({k: v for k, v in row.items() if k != "time"})

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
        return list(self._metrics)

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
    """The Tune experiment (sweep) this process runs a trial of, or ""."""
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


def create_run(job: str, config: BaseModel, runs_dir: str | Path | None = None, *,
               run_dir: Path | None = None, reporter: Callable[[dict], None] | None = None,
               sweep: str | None = None) -> RunContext:
    """Make the run directory with its resolved config and a 'running' manifest.

    ``sweep`` tags the run's metrics (default: the Tune experiment when inside a trial)."""
    run_dir = Path(run_dir) if run_dir else runs_root(runs_dir) / job / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=False)
    ctx = RunContext(job, config, run_dir, reporter=reporter, sweep=sweep)
    store.write_text(run_dir / "config.yaml", dump_config(config))
    ctx.manifest = {
        "job": job,
        "run_id": run_dir.name,
        "explab_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seed": ctx.seed,
        "models": [],
        "host": {"hostname": socket.gethostname(), "platform": _platform.platform(), "pid": os.getpid()},
        "argv": sys.argv,
        "started": _now(),
        "ended": None,
        "status": "running",
    }
    if ctx.sweep:
        ctx.manifest["sweep"] = ctx.sweep
    ctx._write_manifest()
    return ctx


def execute(job: Any, config: BaseModel, runs_dir: str | Path | None = None, *,
            run_dir: Path | None = None, reporter: Callable[[dict], None] | None = None,
            sweep: str | None = None) -> tuple[Path, dict]:
    """Run ``job`` with ``config`` in a new run directory; returns (run_dir, result).

    On failure the manifest says ``failed`` with the error (``stopped`` when the run was ended
    from outside: Ctrl-C, or a sweep's scheduler stopping the trial), everything already written
    stays, and the exception propagates. The run is counted in Ray metrics either way (tagged with
    ``sweep``, by default the Tune experiment when this is a trial).
    """
    ctx = create_run(job.name, config, runs_dir, run_dir=run_dir, reporter=reporter, sweep=sweep)
    ctx.run_metrics.start()
    start = time.time()
    try:
        result = job.run(config, ctx) or {}
        result = {k: _scalar(v) for k, v in dict(result).items()}
        store.write_json(ctx.path("result.json"), result)
    except BaseException as err:
        ctx._close_progress()
        status = "stopped" if _is_stop(err) else "failed"
        ctx.manifest.update(status=status, ended=_now(), duration_s=round(time.time() - start, 3),
                            error=f"{type(err).__name__}: {err}")
        ctx._write_manifest()
        ctx.run_metrics.finish(status)
        raise
    ctx._close_progress()
    ctx.manifest.update(status="completed", ended=_now(), duration_s=round(time.time() - start, 3))
    ctx._write_manifest()
    ctx.run_metrics.log(result)
    ctx.run_metrics.finish("completed")
    return ctx.run_dir, result


def _is_stop(err: BaseException) -> bool:
    """Stopped rather than failed: Ctrl-C, or a clean exit (how Tune ends a trial its scheduler stops)."""
    return isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code in (0, None))


# ---- reading runs back ------------------------------------------------------------------------
def list_runs(runs_dir: str | Path | None = None, job: str | None = None) -> list[dict[str, Any]]:
    root = runs_root(runs_dir)
    rows = []
    for manifest in sorted(root.glob(f"{job or '*'}/*/manifest.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append({"job": data.get("job"), "run_id": data.get("run_id"), "status": data.get("status"),
                     "started": data.get("started"), "duration_s": data.get("duration_s"),
                     "path": str(manifest.parent)})
    return sorted(rows, key=lambda r: r["started"] or "")


def resolve_run(ref: str, runs_dir: str | Path | None = None) -> Path:
    """A run by path, by ``job/run-id``, or by (a unique prefix of) its run id."""
    path = Path(ref)
    if (path / "manifest.json").is_file():
        return path
    root = runs_root(runs_dir)
    if (root / ref / "manifest.json").is_file():
        return root / ref
    matches = [p.parent for p in root.glob("*/*/manifest.json") if p.parent.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ExplabError(f"no run {ref!r} under {root}: give a run directory or an id from `explab runs`")
    raise ExplabError(f"run id {ref!r} is ambiguous ({len(matches)} runs match): give more of it")
