"""Submitting explab runs and sweeps to a Ray cluster through the Ray Jobs API.

``explab submit JOB -c CONFIG`` validates the config here (the same checks and errors as
``explab run``; nothing is submitted on bad input), then submits the entrypoint
``python -m explab.cli run JOB ...`` with the project as the job's ``working_dir`` (so ``jobs/``
and its configs travel with it and ``jobs`` is importable there) and this checkout's
``platform/explab`` as a ``py_modules`` entry (so the cluster runs the same explab as the one that
validated the config, ahead of any explab installed on its nodes).

Addresses are the dashboard's HTTP address (``http://HOST:8265``): ``--address``, else
``RAY_ADDRESS`` when it is an http(s) URL, else ``http://127.0.0.1:8265``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import secrets
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explab.errors import ExplabError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# What never travels with a job: VCS data, environments, caches, past runs, model weights.
EXCLUDES = [
    ".git", ".venv*", "venv", "env", "runs", "build", "dist", "*.egg-info", "**/__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints", ".whl", ".gl", "wandb",
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.npz",
    "*.tar", "*.tar.gz", "*.zip", "*.log",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Submission:
    job_id: str
    address: str
    entrypoint: str

    @property
    def dashboard_url(self) -> str:
        return job_url(self.address, self.job_id)


def resolve_address(address: str | None = None) -> str:
    """``--address``, else ``RAY_ADDRESS`` if it is an http(s) URL, else the local dashboard."""
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ExplabError(f"--address {address!r} is not a dashboard address: give http://HOST:8265 "
                          "(the Ray dashboard's port, not the GCS or Ray Client port)")
    return address.rstrip("/")


def job_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def unreachable(address: str) -> ExplabError:
    return ExplabError(f"no Ray dashboard at {address}: start a cluster (`ray start --head` / "
                       "`ray up cluster.yaml`) or pass --address")


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it is given."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_headers() -> dict[str, str]:
    """The cluster token as a header when one is available locally (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), unless ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except Exception:
        pass
    return {}


def _quiet_ray_client() -> None:
    """Ray's client logs every upload and websocket close at INFO, and warns that it skips .git
    (which explab excludes anyway); keep the CLI's output to what explab says."""
    import logging

    for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING),
                        ("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray._private.runtime_env.working_dir", logging.ERROR)):
        logging.getLogger(name).setLevel(level)


def client(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for the dashboard at ``address``; one clear error when none answers."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client()

    address = resolve_address(address)
    try:
        with _without_address_env():
            return JobSubmissionClient(address, headers=_auth_headers() or None)
    except ConnectionError:
        raise unreachable(address) from None
    except AuthenticationError:
        raise ExplabError(f"the Ray dashboard at {address} refused explab's token: set RAY_AUTH_TOKEN "
                          "(or RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head)") from None
    except Exception as error:  # e.g. an HTTP server that is not a Ray dashboard
        raise ExplabError(f"no Ray Jobs API at {address} ({type(error).__name__}: {error}): "
                          "pass the Ray dashboard's address with --address") from None


def _call(address: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ConnectionError:
        raise unreachable(address) from None


# ---- what to submit ------------------------------------------------------------------------------
def project_root() -> Path:
    """The project whose ``jobs/`` and ``platform/explab`` this process imports."""
    import explab
    import jobs

    candidates = [Path(jobs.__file__).resolve().parent.parent, Path(explab.__file__).resolve().parents[2],
                  Path.cwd()]
    for root in candidates:
        if (root / "jobs").is_dir() and (root / "platform" / "explab").is_dir():
            return root
    raise ExplabError("explab submit needs the project checkout (a folder with jobs/ and platform/explab/): "
                      "run it from there, with explab installed in editable mode (pip install -e .)")


def _relative(path: Path, root: Path, what: str) -> str:
    path = path.resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ExplabError(f"{what} {path} is outside the project {root}: put it under the project "
                          "(e.g. jobs/<job>/configs/) so that it travels with the job") from None


def build_run_entrypoint(job: str, config: str | None = None, overrides: list[str] | None = None,
                         runs_dir: str | None = None, *, root: Path | None = None) -> tuple[str, dict[str, Any]]:
    """Validate like ``explab run`` would and return (entrypoint, metadata) for the cluster."""
    from explab.config import load_config
    from explab.job import get_job

    root = root or project_root()
    spec = get_job(job)
    config_path = spec.config_path(config)
    load_config(spec.config, config_path, overrides or [])  # raises ConfigError on bad input
    args = ["python", "-m", "explab.cli", "run", job]
    if config is not None:
        named = config_path is not None and config_path.parent == spec.folder / "configs" and config == config_path.stem
        args += ["-c", config if named else _relative(config_path, root, "config file")]
    for item in overrides or []:
        args += ["--set", item]
    if runs_dir:
        args += ["--runs-dir", runs_dir]
    metadata = {"explab_job": job, "explab_config": config or "", "explab_overrides": json.dumps(overrides or [])}
    return shlex.join(args), metadata


def build_sweep_entrypoint(sweep: str, runs_dir: str | None = None, resume: bool = False, *,
                           root: Path | None = None) -> tuple[str, dict[str, Any]]:
    """``python -m explab.cli sweep SWEEP.yaml ...`` for a sweep file inside the project."""
    from explab.config import read_yaml

    root = root or project_root()
    path = Path(sweep)
    data = read_yaml(path)  # a missing file or malformed YAML is one clear line
    try:
        from explab.sweep import load_spec
    except ImportError:  # pragma: no cover - sweeps not installed: check the job at least
        load_spec = None
    if load_spec is not None:
        load_spec(path)  # the same checks as `explab sweep`: one clear line, nothing submitted
    job = str(data.get("job") or "")
    if job:
        from explab.job import get_job

        get_job(job)
    args = ["python", "-m", "explab.cli", "sweep", _relative(path, root, "sweep file")]
    if runs_dir:
        args += ["--runs-dir", runs_dir]
    if resume:
        args.append("--resume")
    return shlex.join(args), {"explab_sweep": _relative(path, root, "sweep file"), "explab_job": job}


def runtime_env(root: Path) -> dict[str, Any]:
    return {
        "working_dir": str(root),
        "py_modules": [str(root / "platform" / "explab")],
        "excludes": list(EXCLUDES),
    }


def _submission_id(name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return f"explab-{safe}-{stamp}-{secrets.token_hex(2)}"


def submit(entrypoint: str, metadata: dict[str, Any], *, name: str, address: str | None = None,
           root: Path | None = None) -> Submission:
    root = root or project_root()
    address = resolve_address(address)
    jobs_client = client(address)
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    meta = {**{k: str(v) for k, v in metadata.items()}, "submitted_by": f"{user}@{socket.gethostname()}"}
    try:
        job_id = _call(address, lambda: jobs_client.submit_job(
            entrypoint=entrypoint, submission_id=_submission_id(name), runtime_env=runtime_env(root), metadata=meta))
    except RuntimeError as error:  # e.g. the upload of the working dir was refused
        raise ExplabError(f"the Ray dashboard at {address} did not take the job: {error}") from None
    return Submission(job_id=job_id, address=address, entrypoint=entrypoint)


def submit_run(job: str, config: str | None = None, overrides: list[str] | None = None,
               runs_dir: str | None = None, address: str | None = None) -> Submission:
    root = project_root()
    entrypoint, metadata = build_run_entrypoint(job, config, overrides, runs_dir, root=root)
    return submit(entrypoint, metadata, name=job, address=address, root=root)


def submit_sweep(sweep: str, runs_dir: str | None = None, address: str | None = None,
                 resume: bool = False) -> Submission:
    root = project_root()
    entrypoint, metadata = build_sweep_entrypoint(sweep, runs_dir, resume, root=root)
    name = metadata["explab_job"] or Path(sweep).resolve().parent.name
    return submit(entrypoint, metadata, name=f"sweep-{name}", address=address, root=root)


# ---- watching ----------------------------------------------------------------------------------------
def _not_found(error: Exception, job_id: str, address: str) -> ExplabError | None:
    text = str(error)
    if "404" in text or "does not exist" in text or "not found" in text.lower():
        return ExplabError(f"no job {job_id!r} at {address}: see `explab status` for the jobs there")
    return None


def _job_call(address: str, job_id: str, fn: Any) -> Any:
    try:
        return _call(address, fn)
    except RuntimeError as error:
        raise (_not_found(error, job_id, address) or error) from None


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    address = resolve_address(address)
    jobs_client = client(address)
    info = _job_call(address, job_id, lambda: jobs_client.get_job_info(job_id))
    return {
        "job_id": info.submission_id or info.job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start": _time(info.start_time),
        "end": _time(info.end_time),
        "metadata": info.metadata or {},
        "dashboard": job_url(address, info.submission_id or info.job_id),
    }


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    address = resolve_address(address)
    jobs_client = client(address)
    rows = []
    for info in _call(address, jobs_client.list_jobs):
        rows.append({"job_id": info.submission_id or info.job_id,
                     "status": str(getattr(info.status, "value", info.status)),
                     "start": _time(info.start_time), "end": _time(info.end_time),
                     "entrypoint": info.entrypoint})
    return sorted(rows, key=lambda r: r["start"] or "")


def logs(job_id: str, address: str | None = None) -> str:
    address = resolve_address(address)
    jobs_client = client(address)
    return _job_call(address, job_id, lambda: jobs_client.get_job_logs(job_id))


def follow_logs(job_id: str, address: str | None = None, write: Any = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import asyncio
    import sys

    address = resolve_address(address)
    jobs_client = client(address)
    _job_call(address, job_id, lambda: jobs_client.get_job_status(job_id))
    write = write or (lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))

    async def tail() -> None:
        async for chunk in jobs_client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as error:  # the connection closed before the job ended
        raise ExplabError(f"lost the log stream of {job_id} at {address} ({error}): "
                          f"run `explab logs {job_id} --follow` again") from None
    return str(getattr(jobs_client.get_job_status(job_id), "value", ""))


def stop(job_id: str, address: str | None = None) -> tuple[bool, str]:
    """Ask the job to stop; returns (whether it was running, its status now)."""
    address = resolve_address(address)
    jobs_client = client(address)
    stopped = _job_call(address, job_id, lambda: jobs_client.stop_job(job_id))
    state = _job_call(address, job_id, lambda: jobs_client.get_job_status(job_id))
    return bool(stopped), str(getattr(state, "value", state))


def wait(job_id: str, address: str | None = None, timeout_s: float = 600, poll_s: float = 1.0) -> str:
    """Poll until the job ends (or ``timeout_s`` passes); returns its last status."""
    import time

    address = resolve_address(address)
    jobs_client = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(getattr(_job_call(address, job_id, lambda: jobs_client.get_job_status(job_id)), "value", ""))
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def _time(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")
