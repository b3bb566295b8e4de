"""A sweep's spec (``sweep.yaml`` as pydantic models) and the layout of a sweep directory.

Below both `explab.sweep` (which runs a spec) and `explab.sweep_report` (which tabulates its
trials), so neither imports the other's internals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import Section, Seed, read_yaml, validate
from explab.errors import ConfigError

FINAL_KEY = "explab_final"  # set on the report that carries the job's final metrics
RUN_DIR_KEY = "explab_run_dir"
NAMES_KEY = "explab_metric_names"  # on the final report: every metric name the job logged or returned
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
SPEC_FILE = "sweep.yaml"
BASE_FILE = "base_config.yaml"


# ---- the spec --------------------------------------------------------------------------------
class Param(Section):
    """One dimension of the search space."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes 'values', not low/high")
            for value in self.values:
                if value is not None and not isinstance(value, (bool, int, float, str)):
                    raise ValueError(f"choice values must be numbers, strings, booleans or null, not {value!r}")
            return self
        if self.values is not None:
            raise ValueError(f"a {self.type} range takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"a {self.type} range needs finite bounds (got low={self.low}, high={self.high})")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform range needs low > 0 (got {self.low:g})")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int range needs integer low and high")
        return self

    def candidates(self) -> list[Any]:
        """Values that span the range (the bounds, or every choice) — checked against the job's config."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def distribution(self) -> Any:
        import optuna

        if self.type == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.values or []))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high),
                                                      log=self.type == "loguniform")


class Objective(Section):
    metric: str = Field(min_length=1)
    mode: Literal["max", "min"]


class Base(Section):
    config: str | None = None  # a YAML path (relative to the sweep.yaml), or a config name of the job
    overrides: list[str] = Field(default_factory=list)  # a.b=value, as with --set


class Scheduler(Section):
    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)  # ASHA: time units every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # ASHA: keep 1/reduction_factor at each rung
    max_t: int = Field(100, ge=1)  # ASHA: the time a complete trial takes (sets the rungs)
    time_attr: Literal["training_iteration", "step"] = "training_iteration"  # ctx.log calls, or the logged step

    @model_validator(mode="after")
    def _check(self) -> Scheduler:
        if self.type == "asha" and self.grace_period >= self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be below max_t ({self.max_t})")
        return self


class Sampler(Section):
    type: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int | None = Field(None, ge=0)  # TPE: random trials before it models (Optuna's default: 10)


class Resources(Section):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class SweepSpec(Section):
    """``jobs/<name>/sweep.yaml``."""

    job: str = Field(min_length=1)
    base: Base = Field(default_factory=Base)
    space: dict[str, Param]
    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    objectives: list[Objective] | None = None  # several objectives (Optuna multi-objective) instead of metric/mode
    num_samples: int = Field(10, ge=1)
    sampler: Sampler = Field(default_factory=Sampler)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    max_concurrent: int = Field(1, ge=1)
    resources_per_trial: Resources = Field(default_factory=Resources)
    seed: Seed = 0
    max_failures: int = Field(0, ge=0)  # retries per trial

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("space")
    @classmethod
    def _space_not_empty(cls, value: dict[str, Param]) -> dict[str, Param]:
        if not value:
            raise ValueError("the search space is empty: add at least one field")
        return value

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.objectives is not None:
            if self.metric is not None or self.mode is not None:
                raise ValueError("give either metric/mode or objectives, not both")
            if not self.objectives:
                raise ValueError("objectives is empty: list at least one {metric, mode}")
            names = [o.metric for o in self.objectives]
            if len(set(names)) != len(names):
                raise ValueError("objectives name a metric twice")
        else:
            if self.metric is None:
                raise ValueError("name the metric to optimise (metric: <name>, mode: max|min) or list objectives")
            if self.mode is None:
                raise ValueError(f"metric {self.metric!r} needs a mode: max or min")
        if self.scheduler.type == "asha" and len(self.goals) > 1:
            raise ValueError("ASHA stops trials on one metric: use scheduler fifo with several objectives")
        return self

    @property
    def goals(self) -> list[Objective]:
        if self.objectives is not None:
            return list(self.objectives)
        return [Objective(metric=self.metric or "", mode=self.mode or "max")]


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give a sweep.yaml (or use --resume with a sweep directory)")
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist: "
                          "give the path of a sweep.yaml (e.g. jobs/quadratic/sweep.yaml)")
    return validate(SweepSpec, read_yaml(path), str(path))


def attempts(job_dir: Path, trial_id: str) -> list[Path]:
    """A trial's run directories, oldest first: ``<id>``, ``<id>-r1``, ``<id>-r2``, ..."""
    found = [p for p in job_dir.glob(f"{trial_id}*") if p.name == trial_id or p.name.startswith(f"{trial_id}-r")]

    def order(p: Path) -> int:
        return 0 if p.name == trial_id else int(p.name.rsplit("-r", 1)[1] or 0)

    return sorted(found, key=order)
