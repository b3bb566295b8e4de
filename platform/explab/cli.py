"""The ``explab`` command line."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from explab.errors import ExplabError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="explab: explainable-ML experiments on Ray (jobs, shared model servers, sweeps).")
# piped output (logs, CI, tests) gets wide tables instead of Rich's 80-column default
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)

AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")]
RunsDirOpt = Annotated[str | None, typer.Option("--runs-dir", help="where run directories go (default: ./runs or EXPLAB_RUNS_DIR)")]


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, show_lines=False)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(str(column), no_wrap=column in ("run_id", "path", "name"))
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


@app.command("jobs")
def jobs_cmd() -> None:
    """List the registered jobs."""
    from explab.job import discover

    out.print(_table("jobs", [{"job": j.name, "description": j.description} for j in discover().values()]))


@app.command("run")
def run_cmd(
    job: Annotated[str, typer.Argument(help="job name (see `explab jobs`)")],
    config: Annotated[str | None, typer.Option("-c", "--config", help="YAML file, or a config name of the job (e.g. tiny)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a field: --set a.b=value (repeatable)")] = None,
    runs_dir: RunsDirOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check the config and print what it would start; run nothing")] = False,
    cluster: Annotated[str, typer.Option("--cluster", help="with --dry-run: the cluster.yaml to compare against")] = "cluster.yaml",
) -> None:
    """Run a job; the last line printed is the run directory."""
    from explab import runtime
    from explab.config import load_config
    from explab.job import get_job

    spec = get_job(job)
    cfg = load_config(spec.config, spec.config_path(config), overrides or [])
    if dry_run:
        raise typer.Exit(_dry_run(spec, cfg, cluster))
    info = runtime.init(address)
    if info.dashboard_url:
        err.print(f"[dim]Ray dashboard: {info.dashboard_url}[/dim]")
    run_dir, result = _execute(spec, cfg, runs_dir)
    if result:
        out.print(_table(f"{job} result", [{"metric": k, "value": v} for k, v in result.items()]))
    print(run_dir, flush=True)


def _dry_run(spec: Any, cfg: Any, cluster: str) -> int:
    """Print the plan of a run (servers, tasks, GPUs, memory, the cluster's node types); 1 on a problem.
    A job module may add notes with ``dry_plan_notes(config, plan) -> list[str]`` (e.g. its stages)."""
    import importlib

    from explab.plan import make_plan

    job = spec.name
    plan = make_plan(job, cfg, cluster if Path(cluster).is_file() or cluster != "cluster.yaml" else None)
    hook = getattr(importlib.import_module(spec.run.__module__), "dry_plan_notes", None)
    if hook is not None:
        plan.notes += hook(cfg, plan)
    rows = [{"field": n.path, "kind": n.kind, "model": n.model, "gpus": n.gpus,
             "weights_gb": n.memory_gb} for n in plan.needs]
    out.print(_table(f"{job}: what the run would start", rows or [{"field": "(no GPU servers or tasks)"}]))
    if plan.nodes:
        out.print(_table("cluster node types", [{"type": n.name, "gpus": n.gpus, "max_workers": n.max_workers}
                                                for n in plan.nodes]))
    out.print(f"models: {', '.join(plan.models) or 'none'}")
    out.print(f"GPUs if all at once: {plan.gpus:g}; 16-bit weights: {plan.memory_gb:g} GB")
    for note in plan.notes:
        out.print(f"note: {note}")
    for problem in plan.problems:
        err.print(f"[red]problem:[/red] {problem}", highlight=False, soft_wrap=True)
    return 0 if plan.ok else 1


def _execute(spec: Any, cfg: Any, runs_dir: str | None) -> tuple[Path, dict]:
    from explab.runs import execute

    try:
        return execute(spec, cfg, runs_dir)
    except ExplabError:
        raise
    except Exception as error:  # a job failure: keep the traceback, the run dir says failed
        traceback.print_exc()
        raise typer.Exit(_fail(f"run of {spec.name} failed: {type(error).__name__}: {error}")) from None


def _fail(message: str) -> int:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return 1


@app.command("runs")
def runs_cmd(job: Annotated[str | None, typer.Argument(help="only this job's runs")] = None,
             runs_dir: RunsDirOpt = None) -> None:
    """List runs."""
    from explab.runs import list_runs

    out.print(_table("runs", list_runs(runs_dir, job)))


@app.command("show")
def show_cmd(run: Annotated[str, typer.Argument(help="run directory, job/run-id, or run id (prefix)")],
             runs_dir: RunsDirOpt = None,
             rows: Annotated[int, typer.Option(help="rows to print per table")] = 10) -> None:
    """Print a run's config, manifest summary, final metrics and tables."""
    import pandas as pd

    from explab.runs import resolve_run

    path = resolve_run(run, runs_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    out.print(f"[bold]{manifest['job']}[/bold] {manifest['run_id']}  status={manifest['status']}  "
              f"seed={manifest['seed']}  commit={manifest.get('git_commit')}")
    if manifest.get("error"):
        out.print(f"[red]{manifest['error']}[/red]")
    out.print((path / "config.yaml").read_text())
    if (path / "result.json").is_file():
        result = json.loads((path / "result.json").read_text())
        out.print(_table("result", [{"metric": k, "value": v} for k, v in result.items()]))
    for table in sorted(path.glob("tables/*.parquet")) + ([path / "metrics.parquet"] if (path / "metrics.parquet").is_file() else []):
        frame = pd.read_parquet(table)
        out.print(f"[bold]{table.relative_to(path)}[/bold] ({len(frame)} rows)")
        out.print(frame.head(rows).to_string(index=False))
    print(path)


@app.command("servers")
def servers_cmd(
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop this server (name from the list; repeatable)")] = None,
    stop_all: Annotated[bool, typer.Option("--stop-all", help="stop every explab server")] = False,
    address: AddressOpt = None,
) -> None:
    """List the shared model servers on the cluster (and stop them)."""
    from explab import runtime
    from explab.servers import list_servers, stop_server

    runtime.init(address, dashboard=False)
    servers = list_servers()
    names = [s["name"] for s in servers] if stop_all else (stop or [])
    for name in names:
        stop_server(name)
        out.print(f"stopped {name}")
    if not names:
        out.print(_table("explab servers", servers) if servers else "no explab servers running")


@app.command("demo")
def demo_cmd(runs_dir: RunsDirOpt = None, address: AddressOpt = None,
             keep: Annotated[bool, typer.Option("--keep", help="keep the embedded cluster (and dashboard) up until Ctrl-C")] = False) -> None:
    """Run a real job end to end on the embedded cluster with tiny models."""
    from explab.demo import run_demo

    run_demo(runs_dir=runs_dir, address=address, keep=keep, console=out)


@app.command("sweep")
def sweep_cmd(
    spec: Annotated[str, typer.Argument(help="a sweep.yaml (e.g. jobs/quadratic/sweep.yaml); with --resume also a sweep directory")],
    runs_dir: RunsDirOpt = None,
    address: AddressOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep without re-running finished trials: give its directory, or its sweep.yaml to resume the newest unfinished sweep of that spec")] = False,
) -> None:
    """Sweep a job with Ray Tune + Optuna (see README, Sweeps); the last line printed is the sweep directory.

    Trials run in this Ray cluster and share its model servers. Outputs in the sweep directory:
    trials.parquet, best.json, plots/*.png, trials/<job>/<trial-id>/ (each trial's run).
    """
    from explab.sweep import run_sweep

    sweep_dir = run_sweep(spec, runs_dir, address, resume, progress=True)
    best = json.loads((sweep_dir / "best.json").read_text())
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    goals = ", ".join(f"{o['metric']} ({o['mode']})" for o in best["objectives"])
    winners = [best["best"]] if best.get("best") else best.get("pareto_front", [])
    if winners:
        rows = [{"trial": w["trial_id"], **w["params"],
                 **{o["metric"]: w["metrics"].get(o["metric"]) for o in best["objectives"]}} for w in winners]
        title = "best trial" if "best" in best else f"Pareto front ({len(winners)} trials)"
        out.print(_table(f"{manifest['job']} sweep: {title} — {goals}", rows))
    counts = best["trials"]
    unfinished = counts["total"] - counts["completed"] - counts["stopped_early"] - counts["failed"]
    out.print(f"trials: {counts['total']} ({counts['completed']} completed, {counts['stopped_early']} stopped early, "
              f"{counts['failed']} failed{f', {unfinished} unfinished' if unfinished else ''})", highlight=False)
    for note in best.get("notes", []):
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    if manifest.get("status") != "completed":
        err.print(f"[yellow]sweep interrupted:[/yellow] continue it with `explab sweep {sweep_dir} --resume`",
                  highlight=False, soft_wrap=True)
        print(sweep_dir, flush=True)
        raise typer.Exit(130)
    print(sweep_dir, flush=True)


# ---- Ray Jobs: submit / status / logs / stop (explab.jobs_api) ------------------------------------
JobsAddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard address, http://HOST:8265 (default: RAY_ADDRESS if it is http(s), else http://127.0.0.1:8265)")]


@app.command("submit")
def submit_cmd(
    job: Annotated[str | None, typer.Argument(help="job name (see `explab jobs`); leave out with --sweep")] = None,
    config: Annotated[str | None, typer.Option("-c", "--config", help="YAML file in the project, or a config name of the job (e.g. paper)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a field: --set a.b=value (repeatable)")] = None,
    runs_dir: Annotated[str | None, typer.Option("--runs-dir", help="where run directories go, on the cluster (default: the cluster's EXPLAB_RUNS_DIR, else runs/ in the job's working dir)")] = None,
    address: JobsAddressOpt = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="submit `explab sweep SWEEP.yaml` instead of a run")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="with --sweep: resume the sweep")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream the job's logs until it ends")] = False,
) -> None:
    """Submit a run (or a sweep) to a Ray cluster as a Ray job; prints the job id and its dashboard URL."""
    from explab import jobs_api

    if sweep is not None:
        if job is not None or config is not None or overrides:
            raise ExplabError("--sweep takes the job and config from the sweep file: leave out JOB, -c and --set")
        submission = jobs_api.submit_sweep(sweep, runs_dir=runs_dir, address=address, resume=resume)
    elif job is None:
        raise ExplabError("name a job to submit (see `explab jobs`), or pass --sweep SWEEP.yaml")
    else:
        submission = jobs_api.submit_run(job, config, overrides or [], runs_dir=runs_dir, address=address)
    err.print(f"[dim]submitted to {submission.address}: {submission.entrypoint}[/dim]", highlight=False, soft_wrap=True)
    out.print(f"dashboard: {submission.dashboard_url}", highlight=False, soft_wrap=True)
    if follow:
        state = jobs_api.follow_logs(submission.job_id, submission.address)
        err.print(f"job {submission.job_id}: {state}", highlight=False)
        if state != "SUCCEEDED":
            raise typer.Exit(1)
    print(submission.job_id, flush=True)


@app.command("status")
def status_cmd(job_id: Annotated[str | None, typer.Argument(help="job id from `explab submit` (leave out to list the jobs)")] = None,
               address: JobsAddressOpt = None) -> None:
    """A submitted job's status (or every job on the cluster)."""
    from explab import jobs_api

    if job_id is None:
        rows = jobs_api.list_jobs(address)
        out.print(_table(f"jobs at {jobs_api.resolve_address(address)}", rows) if rows else "no jobs")
        return
    info = jobs_api.status(job_id, address)
    out.print(f"[bold]{info['job_id']}[/bold]  {info['status']}", highlight=False)
    for key in ("message", "entrypoint", "start", "end", "dashboard"):
        if info.get(key):
            out.print(f"  {key}: {info[key]}", highlight=False, soft_wrap=True)
    for key, value in info["metadata"].items():
        out.print(f"  {key}: {value}", highlight=False, soft_wrap=True)


@app.command("logs")
def logs_cmd(job_id: Annotated[str, typer.Argument(help="job id from `explab submit`")],
             follow: Annotated[bool, typer.Option("--follow", "-f", help="stream the logs until the job ends")] = False,
             address: JobsAddressOpt = None) -> None:
    """A submitted job's output (stdout and stderr of its driver)."""
    from explab import jobs_api

    if follow:
        state = jobs_api.follow_logs(job_id, address)
        err.print(f"job {job_id}: {state}", highlight=False)
        if state not in ("SUCCEEDED", "STOPPED"):
            raise typer.Exit(1)
        return
    sys.stdout.write(jobs_api.logs(job_id, address))
    sys.stdout.flush()


@app.command("stop")
def stop_cmd(job_id: Annotated[str, typer.Argument(help="job id from `explab submit`")],
             address: JobsAddressOpt = None) -> None:
    """Stop a submitted job."""
    from explab import jobs_api

    stopped, state = jobs_api.stop(job_id, address)
    out.print(f"stopping {job_id} ({state})" if stopped else f"{job_id} was not running ({state})", highlight=False)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except ExplabError as error:
        sys.exit(_fail(str(error)))
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
