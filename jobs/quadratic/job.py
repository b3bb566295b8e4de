"""quadratic: a noisy quadratic with a known optimum — the sweep machinery's test and example job.

The objective is ``f(x, y) = -(x - x0)^2 - (y - y0)^2`` (maximum 0 at ``(x0, y0)``). Over ``steps``
steps the job logs a value that converges towards ``f`` (a transient that decays with the step,
the same for every point, so a mid-way comparison between trials already ranks them like the
end does), plus Gaussian noise seeded from the run's seed. It returns the final noisy value and
the exact distance to the optimum, so a test can check that a search found it, and a ``cost``
(``|x| + |y|``) that conflicts with it, for multi-objective sweeps.
"""

from __future__ import annotations

import math
import time

from pydantic import Field

from explab.config import JobConfig
from explab.job import Job
from explab.runs import RunContext


class Config(JobConfig):
    x: float = 0.0
    y: float = 0.0
    x0: float = 1.5  # the optimum
    y0: float = -0.5
    steps: int = Field(10, ge=0)  # logged steps (0: report only the final value)
    noise: float = Field(0.01, ge=0.0)  # standard deviation of the noise on every value
    transient: float = 10.0  # how far below f the first step starts
    sleep_s: float = Field(0.0, ge=0.0)  # wall time per step (to make a trial last)
    fail_above_x: float | None = None  # raise when x is above this (tests a failing trial)
    nan_above_x: float | None = None  # return a NaN objective when x is above this (tests a diverged trial)


def objective(x: float, y: float, x0: float, y0: float) -> float:
    return -((x - x0) ** 2) - (y - y0) ** 2


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    if config.fail_above_x is not None and config.x > config.fail_above_x:
        raise ValueError(f"x={config.x:.4g} is above fail_above_x={config.fail_above_x:.4g}")
    f = objective(config.x, config.y, config.x0, config.y0)
    tau = max(1.0, config.steps / 4)
    for step in range(config.steps):
        value = f - config.transient * math.exp(-(step + 1) / tau) + config.noise * ctx.rng.standard_normal()
        ctx.log(step=step, objective=value)
        if config.sleep_s:
            time.sleep(config.sleep_s)
    final = f + config.noise * ctx.rng.standard_normal()
    if config.nan_above_x is not None and config.x > config.nan_above_x:
        final = math.nan  # as a diverged run reports it: the platform must record it as missing
    distance = math.hypot(config.x - config.x0, config.y - config.y0)
    cost = abs(config.x) + abs(config.y)  # a second objective that pulls towards the origin (Pareto demos)
    return {"objective": final, "distance": distance, "f": f, "cost": cost}


JOB = Job(
    name="quadratic",
    description="Noisy quadratic with a known optimum: the sweep machinery's test and example job.",
    config=Config,
    run=run,
)
