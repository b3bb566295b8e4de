"""A sweep's outputs: ``trials.parquet``, ``best.json`` and the plots, built from Tune's trials.

One row per trial: ``trial_id``, ``trial_index`` (order of creation), ``status`` (completed |
stopped_early | failed, or running/pending while the sweep is live), ``param.<field>`` per swept
field, ``metric.<name>`` per final metric the job reported, ``error``, ``duration_s``,
``iterations`` (``ctx.log`` reports Tune received) and ``run_dir`` (relative to the sweep dir).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from explab import store
from explab.sweep_spec import FINAL_KEY, NAMES_KEY, RUN_DIR_KEY, TRIALS_DIR, SweepSpec, attempts

STATUSES = ("completed", "stopped_early", "failed")
FINISHED = set(STATUSES)
_TUNE_KEYS = {
    "training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname", "pid",
    "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "config", "checkpoint_dir_name", "trial_id", "done", "experiment_tag",
    "should_checkpoint", "step", FINAL_KEY, RUN_DIR_KEY, NAMES_KEY,
}


# ---- rows ------------------------------------------------------------------------------------
def trial_rows(trials: list[Any], spec: SweepSpec, sweep_dir: Path, *, finished: Any | None = None) -> list[dict]:
    """Rows from Tune ``Trial`` objects (live ones from a callback, or loaded from the experiment).

    ``finished`` is the trial a callback is being told about (its status may not be final yet).
    """
    rows = [_row(t, spec, Path(sweep_dir), t is finished) for t in trials]
    return sorted(rows, key=lambda r: (r["trial_index"], r["trial_id"]))


def _row(trial: Any, spec: SweepSpec, sweep_dir: Path, just_finished: bool) -> dict[str, Any]:
    last = dict(trial.last_result or {})
    status = trial.status
    error = None
    run_dir = _run_dir(trial, last, spec, sweep_dir)
    if status == "ERROR" or (just_finished and _errored(trial)):
        state = "failed"
        error = _error_text(trial, sweep_dir, run_dir)
    elif last.get(FINAL_KEY):
        state = "completed"
    elif status == "TERMINATED" or just_finished:
        state = "stopped_early"
    else:
        state = status.lower()
    row: dict[str, Any] = {"trial_id": trial.trial_id, "trial_index": _index(trial), "status": state}
    config = dict(trial.config or {})
    for field in spec.space:
        row[f"param.{field}"] = config.get(field)
    for goal in spec.goals:
        row[f"metric.{goal.metric}"] = _number(last.get(goal.metric))
    for key, value in last.items():
        if key not in _TUNE_KEYS and f"metric.{key}" not in row and _number(value) is not None:
            row[f"metric.{key}"] = _number(value)
    duration = last.get("time_total_s")
    if duration is None and run_dir is not None:
        duration = _manifest(sweep_dir / run_dir).get("duration_s")
    row.update(
        error=error,
        duration_s=round(float(duration), 3) if duration is not None else None,
        iterations=max(0, int(last.get("training_iteration") or 0) - (1 if last.get(FINAL_KEY) else 0)),
        run_dir=run_dir,
    )
    return row


def _errored(trial: Any) -> bool:
    return trial.status == "ERROR" or bool(getattr(trial.run_metadata, "error_filename", None))


def _index(trial: Any) -> int:
    tag = str(getattr(trial, "experiment_tag", "") or "")
    head = tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _run_dir(trial: Any, last: dict[str, Any], spec: SweepSpec, sweep_dir: Path) -> str | None:
    reported = last.get(RUN_DIR_KEY)
    path = Path(reported) if reported else None
    if path is None:
        found = attempts(sweep_dir / TRIALS_DIR / spec.job, trial.trial_id)
        path = found[-1] if found else None
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return str(path)


def _manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _error_text(trial: Any, sweep_dir: Path, run_dir: str | None) -> str:
    """The job's own error (from its run manifest) if it got that far, else the last line of Tune's."""
    if run_dir is not None:
        error = _manifest(sweep_dir / run_dir).get("error")
        if error:
            return str(error)
    try:
        text = trial.get_error() or ""
    except Exception:  # storage gone: the status says enough
        text = ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else "failed"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item"):
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


# ---- tables ------------------------------------------------------------------------------------
def frame(spec: SweepSpec, rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    params = [f"param.{f}" for f in spec.space]
    goals = [f"metric.{g.metric}" for g in spec.goals]
    others = sorted({k for r in rows for k in r if k.startswith("metric.") and k not in goals})
    columns = ["trial_id", "trial_index", "status", *params, *goals, *others,
               "error", "duration_s", "iterations", "run_dir"]
    df = pd.DataFrame(rows, columns=columns)
    for column in params:  # a choice of mixed types cannot be one parquet column
        kinds = {type(v) for v in df[column].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            df[column] = df[column].map(lambda v: None if v is None else str(v))
    for column in [*goals, *others, "duration_s"]:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
    df["error"] = df["error"].astype("object")
    return df


def write_trials(sweep_dir: Path, spec: SweepSpec, rows: list[dict[str, Any]]) -> Path:
    return store.write_parquet(Path(sweep_dir) / "trials.parquet", frame(spec, rows))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def candidates(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials eligible for best: completed ones with every objective (stopped ones only if none)."""
    keys = [f"metric.{g.metric}" for g in spec.goals]
    usable = [r for r in rows if r["status"] != "failed" and all(_finite(r.get(k)) for k in keys)]
    completed = [r for r in usable if r["status"] == "completed"]
    return completed or usable


def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    goal = spec.goals[0]
    pool = candidates(spec, rows)
    if not pool:
        return None
    sign = 1.0 if goal.mode == "max" else -1.0
    return max(pool, key=lambda r: (sign * r[f"metric.{goal.metric}"], -r["trial_index"]))


def pareto_front(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    signs = [1.0 if g.mode == "max" else -1.0 for g in spec.goals]
    keys = [f"metric.{g.metric}" for g in spec.goals]
    pool = candidates(spec, rows)
    points = [[s * r[k] for s, k in zip(signs, keys, strict=True)] for r in pool]

    def dominated(i: int) -> bool:
        return any(all(a >= b for a, b in zip(q, points[i], strict=True)) and q != points[i]
                   for j, q in enumerate(points) if j != i)

    return [r for i, r in enumerate(pool) if not dominated(i)]


def best_text(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    if len(spec.goals) > 1:
        front = pareto_front(spec, rows)
        return f"pareto front: {len(front)} trials" if front else ""
    row = best_row(spec, rows)
    goal = spec.goals[0]
    return f"best {goal.metric}={row[f'metric.{goal.metric}']:.4g}" if row else ""


def _summary(spec: SweepSpec, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "trial_id": row["trial_id"],
        "params": {f: row[f"param.{f}"] for f in spec.space},
        "metrics": {k.removeprefix("metric."): v for k, v in row.items() if k.startswith("metric.") and v is not None},
        "status": row["status"],
        "run_dir": row["run_dir"],
    }


def write_outputs(sweep_dir: Path, spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``trials.parquet``, ``best.json`` and ``plots/*.png``; returns what best.json holds."""
    sweep_dir = Path(sweep_dir)
    write_trials(sweep_dir, spec, rows)
    notes: list[str] = []
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    best: dict[str, Any] = {
        "job": spec.job,
        "objectives": [g.model_dump() for g in spec.goals],
        "trials": {"total": len(rows), **counts},
    }
    unreported = []
    for goal in spec.goals:
        if not any(_finite(r.get(f"metric.{goal.metric}")) for r in rows if r["status"] != "failed"):
            reported = sorted({k.removeprefix("metric.") for r in rows for k in r
                               if k.startswith("metric.") and _finite(r.get(k))})
            unreported.append(f"no trial reported a finite value of metric {goal.metric!r}; the job reported: "
                              f"{', '.join(reported) or 'nothing'}")
    notes.extend(unreported)
    best["unreported"] = unreported
    if len(spec.goals) == 1:
        row = best_row(spec, rows)
        best["best"] = _summary(spec, row) if row else None
    else:
        best["pareto_front"] = [_summary(spec, r) for r in pareto_front(spec, rows)]
    best["importance"] = _plots(sweep_dir, spec, rows, notes)
    best["notes"] = notes
    store.write_json(sweep_dir / "best.json", best)
    return best


# ---- plots ---------------------------------------------------------------------------------------
_COLOURS = {"completed": "tab:blue", "stopped_early": "tab:orange", "failed": "tab:red"}


def _plots(sweep_dir: Path, spec: SweepSpec, rows: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = spec.goals
    fields = list(spec.space)
    ordered = sorted(rows, key=lambda r: r["trial_index"])

    # optimization history: each trial's metric in order, and the best so far over completed trials
    fig, axes = plt.subplots(len(goals), 1, figsize=(6.5, 3.2 * len(goals)), squeeze=False)
    for ax, goal in zip(axes[:, 0], goals, strict=True):
        key = f"metric.{goal.metric}"
        for status, colour in _COLOURS.items():
            pts = [(r["trial_index"], r[key]) for r in ordered if r["status"] == status and _finite(r.get(key))]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=18, color=colour, label=status)
        xs, ys, best = [], [], None
        for r in ordered:
            if r["status"] == "completed" and _finite(r.get(key)):
                value = r[key]
                best = value if best is None else (max(best, value) if goal.mode == "max" else min(best, value))
                xs.append(r["trial_index"])
                ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{goal.metric} ({goal.mode})")
        ax.legend(fontsize=7)
    axes[0, 0].set_title(f"{spec.job}: optimization history")
    store.write_figure(sweep_dir / "plots" / "history.png", fig)

    # each parameter against each objective
    fig, axes = plt.subplots(len(goals), len(fields), figsize=(3.4 * len(fields), 3.0 * len(goals)), squeeze=False)
    for i, goal in enumerate(goals):
        key = f"metric.{goal.metric}"
        for j, field in enumerate(fields):
            ax = axes[i, j]
            param = spec.space[field]
            for status, colour in _COLOURS.items():
                pts = [(_plottable(r[f"param.{field}"], param.type), r[key]) for r in rows
                       if r["status"] == status and _finite(r.get(key))]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), s=16, color=colour, label=status)
            if param.type == "loguniform":
                ax.set_xscale("log")
            ax.set_xlabel(field)
            if j == 0:
                ax.set_ylabel(goal.metric)
    axes[0, -1].legend(fontsize=7)
    store.write_figure(sweep_dir / "plots" / "params.png", fig)

    return _importance(sweep_dir, spec, rows, notes)


def _plottable(value: Any, kind: str) -> Any:
    return str(value) if kind == "choice" else value


def _importance(sweep_dir: Path, spec: SweepSpec, rows: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """Parameter importance (Optuna's fANOVA) on a study rebuilt from the completed trials."""
    if len(spec.space) < 2:
        notes.append("parameter importance needs at least 2 swept parameters: skipped")
        return {}
    pool = [r for r in candidates(spec, rows) if r["status"] == "completed"]
    if len(pool) < 3:
        notes.append(f"parameter importance needs at least 3 completed trials (got {len(pool)}): skipped")
        return {}
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    goals = spec.goals
    distributions = {f: p.distribution() for f, p in spec.space.items()}
    study = optuna.create_study(directions=["maximize" if g.mode == "max" else "minimize" for g in goals])
    for r in pool:
        study.add_trial(optuna.trial.create_trial(
            params={f: _native(r[f"param.{f}"], spec.space[f].type) for f in spec.space},
            distributions=distributions, values=[r[f"metric.{g.metric}"] for g in goals],
        ))
    out: dict[str, Any] = {}
    fig, axes = plt.subplots(1, len(goals), figsize=(4.5 * len(goals), 0.5 * len(spec.space) + 1.6), squeeze=False)
    for i, goal in enumerate(goals):
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=spec.seed)
            scores = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=i: t.values[i])
        except Exception as err:  # too few distinct points, constant metric, ...
            notes.append(f"parameter importance for {goal.metric} failed: {type(err).__name__}: {err}")
            continue
        out[goal.metric] = {k: float(v) for k, v in scores.items()}
        names = list(scores)[::-1]
        axes[0, i].barh(names, [scores[n] for n in names], color="tab:blue")
        axes[0, i].set_xlabel(f"importance for {goal.metric}")
    if out:
        store.write_figure(sweep_dir / "plots" / "importance.png", fig)
    else:
        plt.close(fig)
    return out


def _native(value: Any, kind: str) -> Any:
    if kind == "int":
        return int(value)
    if kind in ("uniform", "loguniform"):
        return float(value)
    return value
