"""The job registry: every ``jobs/<name>/job.py`` that defines ``JOB = Job(...)`` is a job."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from explab.errors import ConfigError, ExplabError


@dataclass(frozen=True)
class Job:
    """A job: a typed config (defaults = the paper's settings) and ``run(config, ctx) -> metrics``."""

    name: str
    description: str
    config: type[BaseModel]
    run: Callable[[Any, Any], dict[str, Any] | None]
    package: str = field(default="", compare=False)
    synthetic: Mapping[str, Callable[..., list[dict[str, Any]]]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        """Register the job's ``synthetic:`` datasets (``synthetic={"name": fn}``) with `explab.data`."""
        from explab.data import register_synthetic

        for name, fn in self.synthetic.items():
            register_synthetic(name, fn)

    @property
    def folder(self) -> Path:
        module = importlib.import_module(self.package or f"jobs.{self.name}")
        return Path(module.__file__).parent

    def config_path(self, ref: str | None) -> Path | None:
        """``-c`` value: a YAML path, or the name of a file in the job's ``configs/`` (e.g. ``tiny``)."""
        if ref is None:
            return None
        path = Path(ref)
        if path.exists() or path.suffix in (".yaml", ".yml") or "/" in ref:
            return path
        named = self.folder / "configs" / f"{ref}.yaml"
        if named.is_file():
            return named
        known = ", ".join(sorted(p.stem for p in (self.folder / "configs").glob("*.yaml"))) or "none"
        raise ConfigError(f"config {ref!r} is neither a file nor one of job {self.name!r}'s configs ({known})")


def _package_job(package: str) -> Job | None:
    """The ``JOB`` of ``jobs.<package>.job`` (None when the package has no job module or no JOB)."""
    module_name = f"jobs.{package}.job"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise
    job = getattr(module, "JOB", None)
    if not isinstance(job, Job):
        return None
    return Job(job.name, job.description, job.config, job.run, f"jobs.{package}", job.synthetic)


def _job_packages() -> list[str]:
    import jobs as jobs_pkg

    return [info.name for info in pkgutil.iter_modules(jobs_pkg.__path__)
            if info.ispkg and not info.name.startswith("_")]


def discover() -> dict[str, Job]:
    """Import every ``jobs.<name>.job`` module and collect its ``JOB``."""
    found: dict[str, Job] = {}
    for package in _job_packages():
        job = _package_job(package)
        if job is not None:
            found[job.name] = job
    return dict(sorted(found.items()))


def get_job(name: str) -> Job:
    """The job called ``name``: ``jobs/<name>/`` is imported alone when it holds that job (a run, a
    submission or a sweep trial then imports one job, not all of them); else every job is searched."""
    if name in _job_packages():
        job = _package_job(name)
        if job is not None and job.name == name:
            return job
    jobs = discover()
    if name not in jobs:
        raise ExplabError(f"unknown job {name!r}: known jobs are {', '.join(jobs) or 'none'} (see `explab jobs`)")
    return jobs[name]
