"""Submitting explab runs and sweeps to a Ray cluster through the Ray Jobs API.

``explab submit JOB -c CONFIG`` validates the config here (the same checks and errors as
``explab run``; nothing is submitted on bad input), then submits the entrypoint
``python -m explab.cli run JOB ...`` with the project as the job's ``working_dir`` (so ``jobs/``
and its configs travel with it and ``jobs`` is importable there) and this checkout's
``platform/explab`` as a ``py_modules`` entry (so the cluster runs the same explab as the one that
validated the config, ahead of any explab installed on its nodes).

Addresses are the dashboard's HTTP address (``http://HOST:8265``): ``--address``, else
``RAY_ADDRESS`` when it is an http(s) URL, else ``http://127.0.0.1:8265``.

What travels: only the files git tracks in the project (plus the job's config or sweep file),
copied to a staging folder that becomes the working dir; a tracked file that looks like a secret
(`SECRET_PATTERNS`) stops the submission. Runs go to a durable folder on the cluster
(`CLUSTER_RUNS_DIR`: the cluster's ``EXPLAB_RUNS_DIR``, else ``~/explab-runs``), never into Ray's
temporary working-dir package. The cluster token is sent only over https or to a loopback
(tunnelled) address, unless ``--allow-plain-token`` / ``EXPLAB_ALLOW_PLAIN_TOKEN=1``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import getpass
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explab import runtime
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
# Files that must never leave this machine (matched against each path's file name, and directories).
SECRET_PATTERNS = (
    ".env", ".env.*", "*.env", ".envrc", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key",
    "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "credentials", "credentials.*", "*credentials*.json",
    "service-account*.json", ".netrc", ".pypirc", ".npmrc", ".htpasswd", "auth_token", "*.token", "secrets.*",
)
SECRET_DIRS = (".ssh", ".aws", ".gnupg", ".azure", ".kube", ".docker", "gcloud")
# Where a submitted job's runs go when --runs-dir is not given: expanded by the shell on the cluster.
CLUSTER_RUNS_DIR = '"${EXPLAB_RUNS_DIR:-$HOME/explab-runs}"'
PLAIN_TOKEN_ENV = "EXPLAB_ALLOW_PLAIN_TOKEN"


@dataclass
class Submission:
    job_id: str
    address: str
    entrypoint: str
    uploaded: list[str] = field(default_factory=list)  # project-relative paths that travelled

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


def _auth_headers(address: str | None = None) -> dict[str, str]:
    """The cluster token as a header when one is available locally (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), unless ``RAY_AUTH_MODE=disabled``; refused
    (one line) for a plain-http address that is not loopback (see `token_may_travel`)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        headers = dict(loader.get_token_for_http_header(ignore_auth_mode=True)) \
            if loader.has_token(ignore_auth_mode=True) else {}
    except Exception:
        headers = {}
    if headers and address is not None and not token_may_travel(address):
        raise ExplabError(f"refusing to send the Ray auth token in clear text to {address}: use https, or an SSH "
                          "tunnel to 127.0.0.1 (`ray dashboard cluster.yaml`), or pass --allow-plain-token "
                          f"(or set {PLAIN_TOKEN_ENV}=1) to send it anyway")
    return headers


def token_may_travel(address: str) -> bool:
    """Whether a secret may be sent to ``address``: https, a loopback host (a tunnel's local end),
    or plain http when ``EXPLAB_ALLOW_PLAIN_TOKEN=1`` says so explicitly."""
    parsed = urllib.parse.urlparse(address if "://" in address else f"http://{address}")
    if parsed.scheme == "https" or os.environ.get(PLAIN_TOKEN_ENV) == "1":
        return True
    host = (parsed.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
            return JobSubmissionClient(address, headers=_auth_headers(address) or None)
    except ConnectionError:
        raise unreachable(address) from None
    except AuthenticationError:
        raise ExplabError(f"the Ray dashboard at {address} refused explab's token: set RAY_AUTH_TOKEN "
                          "(or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                          "(`ray get-auth-token` on the head)") from None
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
    metadata = {"explab_job": job, "explab_config": config or "", "explab_overrides": json.dumps(overrides or []),
                "explab_runs_dir": runs_dir or CLUSTER_RUNS_DIR.strip('"')}
    return _with_runs_dir(args, runs_dir), metadata


def _with_runs_dir(args: list[str], runs_dir: str | None, tail: list[str] | None = None) -> str:
    """The entrypoint with ``--runs-dir``: the one given, else `CLUSTER_RUNS_DIR` (the shell that
    runs the entrypoint on the cluster expands it), so runs never land in Ray's temporary package."""
    if runs_dir:
        return shlex.join([*args, "--runs-dir", runs_dir, *(tail or [])])
    return " ".join([shlex.join(args), "--runs-dir", CLUSTER_RUNS_DIR, *map(shlex.quote, tail or [])])


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
    return _with_runs_dir(args, runs_dir, ["--resume"] if resume else []), {
        "explab_sweep": _relative(path, root, "sweep file"), "explab_job": job,
                                            "explab_runs_dir": runs_dir or CLUSTER_RUNS_DIR.strip('"')}


def looks_secret(relative: str) -> bool:
    """A path (relative to the project) whose name or folder marks it as a secret."""
    parts = Path(relative).parts
    name = parts[-1] if parts else relative
    return any(fnmatch.fnmatch(name, p) for p in SECRET_PATTERNS) or any(d in SECRET_DIRS for d in parts[:-1])


def _excluded(relative: str) -> bool:
    parts = Path(relative).parts
    return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in EXCLUDES if "/" not in pattern)


def upload_files(root: Path, extra: list[Path] | None = None) -> list[str]:
    """What a submission uploads: the files git tracks under ``root`` (as they are in the work tree)
    plus ``extra`` (the job's config or sweep file), minus `EXCLUDES`; one line and nothing
    submitted when one of them looks like a secret or the project is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExplabError(f"explab submit uploads the files git tracks, and git failed in {root} ({error}): "
                          "install git, or run it from the project's git checkout") from None
    if out.returncode != 0:
        raise ExplabError(f"explab submit uploads the files git tracks, but {root} is not a git checkout: "
                          "run it from the project's git checkout (git init; git add the project)")
    files = {f for f in out.stdout.decode().split("\0") if f}
    for path in extra or []:
        files.add(_relative(path, root, "file"))
    chosen = sorted(f for f in files if (root / f).is_file() and not _excluded(f))
    secret = [f for f in chosen if looks_secret(f)]
    if secret:
        raise ExplabError(f"refusing to upload {secret[0]}"
                          + (f" (and {len(secret) - 1} more)" if len(secret) > 1 else "")
                          + ": it looks like a secret (keys, tokens, .env): remove it from git "
                          "(`git rm --cached`) and keep it out of the project")
    return chosen


def stage(root: Path, files: list[str], into: Path) -> Path:
    """Copy ``files`` (relative to ``root``) into ``into``: the folder that is uploaded."""
    for relative in files:
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)
    return into


def summarize_upload(files: list[str]) -> str:
    """``files`` grouped by top-level folder: "jobs/ (120), platform/ (15), README.md"."""
    groups: dict[str, int] = {}
    for f in files:
        head = f.split("/", 1)[0] + ("/" if "/" in f else "")
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(k if not k.endswith("/") else f"{k} ({n})" for k, n in sorted(groups.items()))


def runtime_env(root: Path) -> dict[str, Any]:
    return {
        "working_dir": str(root),
        "py_modules": [str(root / "platform" / "explab")],
        "excludes": list(EXCLUDES),
        "env_vars": runtime.ray_env(),
    }


def _submission_id(name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return f"explab-{safe}-{stamp}-{secrets.token_hex(2)}"


def submit(entrypoint: str, metadata: dict[str, Any], *, name: str, address: str | None = None,
           root: Path | None = None, extra_files: list[Path] | None = None) -> Submission:
    """Submit ``entrypoint`` with the project's git-tracked files (+ ``extra_files``) as its working dir."""
    root = root or project_root()
    files = upload_files(root, extra_files)
    address = resolve_address(address)
    jobs_client = client(address)
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    meta = {**{k: str(v) for k, v in metadata.items()}, "submitted_by": f"{user}@{socket.gethostname()}"}
    with tempfile.TemporaryDirectory(prefix="explab-upload-") as folder:
        staged = stage(root, files, Path(folder))
        try:
            job_id = _call(address, lambda: jobs_client.submit_job(
                entrypoint=entrypoint, submission_id=_submission_id(name), runtime_env=runtime_env(staged),
                metadata=meta))
        except RuntimeError as error:  # e.g. the upload of the working dir was refused
            raise ExplabError(f"the Ray dashboard at {address} did not take the job: {error}") from None
    return Submission(job_id=job_id, address=address, entrypoint=entrypoint, uploaded=files)


def submit_run(job: str, config: str | None = None, overrides: list[str] | None = None,
               runs_dir: str | None = None, address: str | None = None) -> Submission:
    from explab.job import get_job

    root = project_root()
    entrypoint, metadata = build_run_entrypoint(job, config, overrides, runs_dir, root=root)
    config_path = get_job(job).config_path(config)
    return submit(entrypoint, metadata, name=job, address=address, root=root,
                  extra_files=[config_path] if config_path is not None else [])


def submit_sweep(sweep: str, runs_dir: str | None = None, address: str | None = None,
                 resume: bool = False) -> Submission:
    root = project_root()
    entrypoint, metadata = build_sweep_entrypoint(sweep, runs_dir, resume, root=root)
    name = metadata["explab_job"] or Path(sweep).resolve().parent.name
    extra = [Path(sweep)]
    base = (read_sweep_base(Path(sweep)))
    if base is not None:
        extra.append(base)
    return submit(entrypoint, metadata, name=f"sweep-{name}", address=address, root=root, extra_files=extra)


def read_sweep_base(sweep: Path) -> Path | None:
    """The sweep's base config file when it is a file (not a config name of the job)."""
    from explab.sweep import _base_config_path, load_job, load_spec

    spec = load_spec(sweep)
    path = _base_config_path(load_job(spec.job), spec.base.config, sweep.parent)
    return path if path is not None and path.is_file() else None


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
