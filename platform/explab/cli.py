"""The ``explab`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from explab.errors import ExplabError, Terminated, one_line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="explab: explainable-ML experiments on Ray (jobs, shared model servers, sweeps).")
# piped output (logs, CI, tests) gets wide tables instead of Rich's 80-column default
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)

AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")]
RunsDirOpt = Annotated[str | None, typer.Option(
    "--runs-dir", help="where run directories go (default: ./runs or EXPLAB_RUNS_DIR)")]


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
    config: Annotated[str | None, typer.Option(
        "-c", "--config", help="YAML file, or a config name of the job (e.g. tiny)")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="override a field: --set a.b=value (repeatable)")] = None,
    runs_dir: RunsDirOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="check the config and print what it would start; run nothing")] = False,
    cluster: Annotated[str, typer.Option(
        "--cluster", help="with --dry-run: the cluster.yaml to compare against")] = "cluster.yaml",
) -> None:
    """Run a job; the last line printed is the run directory."""
    from explab import runtime
    from explab.config import load_config
    from explab.job import get_job
    from explab.models.checks import preflight
    from explab.runs import check_runs_dir

    spec = get_job(job)
    cfg = load_config(spec.config, spec.config_path(config), overrides or [])
    if dry_run:
        raise typer.Exit(_dry_run(spec, cfg, cluster))
    preflight(cfg)  # unknown tiny: families, missing model directories: before Ray starts
    check_runs_dir(runs_dir)
    info = runtime.init(address)
    if info.dashboard_url:
        err.print(f"[dim]Ray dashboard: {info.dashboard_url}[/dim]")
    run_dir, result = _execute(spec, cfg, runs_dir)
    if result:
        out.print(_table(f"{job} result", [{"metric": k, "value": v} for k, v in result.items()]))
    _note_invalid(run_dir)
    print(run_dir, flush=True)


def _dry_run(spec: Any, cfg: Any, cluster: str) -> int:
    """Print the plan of a run (servers, tasks, GPUs, memory, the cluster's node types); 1 on a problem.
    A job module may add notes with ``dry_plan_notes(config, plan) -> list[str]`` (e.g. its stages), and
    leave out what this config will not start with ``dry_plan_skip(config) -> list[str]`` (config paths)."""
    import importlib

    from explab.plan import make_plan

    job = spec.name
    module = importlib.import_module(spec.run.__module__)
    skip = getattr(module, "dry_plan_skip", lambda _: [])(cfg)
    plan = make_plan(job, cfg, cluster if Path(cluster).is_file() or cluster != "cluster.yaml" else None, skip)
    hook = getattr(module, "dry_plan_notes", None)
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
    """Run the job; a failure is one line on stderr (the traceback is in the run's error.log) and
    the run directory on stdout; Ctrl-C / SIGTERM end the run as ``stopped``, equally quietly."""
    from explab.runs import ERROR_LOG, execute

    try:
        return execute(spec, cfg, runs_dir)
    except KeyboardInterrupt as error:
        run_dir = getattr(error, "explab_run_dir", None)
        err.print(f"[yellow]stopped:[/yellow] run of {spec.name} marked stopped"
                  + (f": {run_dir}" if run_dir else ""), highlight=False, soft_wrap=True)
        if run_dir:
            print(run_dir, flush=True)
        raise typer.Exit(143 if isinstance(error, Terminated) else 130) from None
    except Exception as error:  # noqa: BLE001 - a job failure: one line here, the traceback in error.log
        run_dir = getattr(error, "explab_run_dir", None)
        where = f" (traceback: {Path(run_dir) / ERROR_LOG})" if run_dir else ""
        message = one_line(error)
        if not isinstance(_cause(error), ExplabError):
            message = f"run of {spec.name} failed: {message}"
        code = _fail(message + where)
        if run_dir:
            print(run_dir, flush=True)
        raise typer.Exit(code) from None


def _cause(error: BaseException) -> BaseException:
    from explab.errors import root_cause

    return root_cause(error)


def _note_invalid(run_dir: Path) -> None:
    """Name the metrics a run reported as NaN/inf (recorded as missing)."""
    try:
        invalid = json.loads((Path(run_dir) / "manifest.json").read_text()).get("invalid_metrics") or {}
    except (OSError, ValueError):
        return
    for name, where in invalid.items():
        err.print(f"[yellow]note:[/yellow] metric {name!r} was {where}: recorded as missing", highlight=False,
                  soft_wrap=True)


def _fail(message: str) -> int:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return 1


@app.command("runs")
def runs_cmd(job: Annotated[str | None, typer.Argument(help="only this job's runs")] = None,
             runs_dir: RunsDirOpt = None,
             clean: Annotated[bool, typer.Option("--clean", help="mark runs whose process died as crashed in their "
                                                 "manifests, and remove leftover temporary files")] = False) -> None:
    """List runs (a run whose process died reads as crashed, a damaged one as damaged)."""
    from explab.runs import list_runs, mark_crashed

    if clean:
        for run_dir in mark_crashed(runs_dir, job):
            err.print(f"marked crashed: {run_dir}", highlight=False, soft_wrap=True)
    out.print(_table("runs", list_runs(runs_dir, job)))


@app.command("show")
def show_cmd(run: Annotated[str, typer.Argument(help="run directory, job/run-id, or run id (prefix)")],
             runs_dir: RunsDirOpt = None,
             rows: Annotated[int, typer.Option(help="rows to print per table")] = 10) -> None:
    """Print a run's config, manifest summary, final metrics and tables; names what is damaged."""
    import pandas as pd

    from explab import store
    from explab.runs import FINISHED, METRICS_FILE, read_metrics, read_run, resolve_run

    path = resolve_run(run, runs_dir)
    info = read_run(path)
    manifest = info["manifest"]
    if info["status"] in FINISHED:
        store.remove_temporaries(path)
    out.print(f"[bold]{manifest.get('job', path.parent.name)}[/bold] {manifest.get('run_id', path.name)}  "
              f"status={info['status']}  seed={manifest.get('seed')}  commit={manifest.get('git_commit')}")
    if manifest.get("error"):
        out.print(f"[red]{manifest['error']}[/red]", highlight=False)
    damaged = dict(info["damaged"])
    if (path / "config.yaml").is_file():
        out.print((path / "config.yaml").read_text(errors="replace"), highlight=False)
    if (path / "result.json").is_file() and "result.json" not in damaged:
        result = json.loads((path / "result.json").read_text())
        if isinstance(result, dict):
            out.print(_table("result", [{"metric": k, "value": v} for k, v in result.items()]))
    for table in sorted(path.glob("tables/*.parquet")):
        try:
            frame = pd.read_parquet(table)
        except Exception as error:  # noqa: BLE001 - a truncated table: name it, show the rest
            damaged[str(table.relative_to(path))] = f"unreadable ({type(error).__name__})"
            continue
        out.print(f"[bold]{table.relative_to(path)}[/bold] ({len(frame)} rows)")
        out.print(frame.head(rows).to_string(index=False), highlight=False)
    try:
        frame = read_metrics(path)
    except Exception as error:  # noqa: BLE001
        damaged[METRICS_FILE] = f"unreadable ({type(error).__name__})"
    else:
        if len(frame):
            out.print(f"[bold]{METRICS_FILE}[/bold] ({len(frame)} rows)")
            out.print(frame.head(rows).to_string(index=False), highlight=False)
    for name, what in damaged.items():
        err.print(f"[yellow]damaged:[/yellow] {name} {what}", highlight=False, soft_wrap=True)
    print(path)


@app.command("servers")
def servers_cmd(
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", help="stop this server (name from the list; repeatable)")] = None,
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
        out.print(_table("explab servers", [_server_row(s) for s in servers]) if servers
                  else "no explab servers running")


SERVER_COLUMNS = ("name", "model", "backend", "device", "dtype", "n_layers", "n_params", "load_time_s", "error")


def _server_row(info: dict[str, Any]) -> dict[str, Any]:
    """What `explab servers` shows of a server (its whole description and batching stats are in
    ``list_servers()``): the identity columns, and requests / batches / mean batch summed over batchers."""
    row = {k: info.get(k) for k in SERVER_COLUMNS if k in info}
    stats = list((info.get("batching") or {}).values())
    if stats:
        requests, batches = sum(b["requests"] for b in stats), sum(b["batches"] for b in stats)
        row.update(requests=requests, batches=batches, errors=sum(b["errors"] for b in stats))
    return row


@app.command("demo")
def demo_cmd(runs_dir: RunsDirOpt = None, address: AddressOpt = None,
             keep: Annotated[bool, typer.Option(
                 "--keep", help="keep the embedded cluster (and dashboard) up until Ctrl-C")] = False) -> None:
    """Run a paper job (polylogue, small) end to end on SmolLM2-135M-Instruct on the embedded cluster."""
    from explab.demo import run_demo

    run_demo(runs_dir=runs_dir, address=address, keep=keep, console=out)


@app.command("sweep")
def sweep_cmd(
    spec: Annotated[str, typer.Argument(
        help="a sweep.yaml (e.g. jobs/quadratic/sweep.yaml); with --resume also a sweep directory")],
    runs_dir: RunsDirOpt = None,
    address: AddressOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue an interrupted sweep without re-running finished trials: give its directory, "
                         "or its sweep.yaml to resume the newest unfinished sweep of that spec")] = False,
) -> None:
    """Sweep a job with Ray Tune + Optuna (see README, Sweeps); the last line printed is the sweep directory.

    Trials run in this Ray cluster and share its model servers. Outputs in the sweep directory:
    trials.parquet, best.json, plots/*.png, trials/<job>/<trial-id>/ (each trial's run).
    """
    from explab.runs import check_runs_dir
    from explab.sweep import run_sweep

    check_runs_dir(runs_dir)
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


def _allow_plain_token(value: bool) -> bool:
    if value:  # read where the token is attached (jobs_api.token_may_travel)
        from explab.jobs_api import PLAIN_TOKEN_ENV

        os.environ[PLAIN_TOKEN_ENV] = "1"
    return value


PlainTokenOpt = Annotated[bool, typer.Option(
    "--allow-plain-token", callback=_allow_plain_token,
    help="send the Ray auth token even over plain http to a non-loopback address (default: only https or a "
         "loopback/tunnelled address; same as EXPLAB_ALLOW_PLAIN_TOKEN=1)")]


@app.command("submit")
def submit_cmd(
    job: Annotated[str | None, typer.Argument(help="job name (see `explab jobs`); leave out with --sweep")] = None,
    config: Annotated[str | None, typer.Option(
        "-c", "--config", help="YAML file in the project, or a config name of the job (e.g. paper)")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="override a field: --set a.b=value (repeatable)")] = None,
    runs_dir: Annotated[str | None, typer.Option(
        "--runs-dir", help="where run directories go, on the cluster (default: the cluster's EXPLAB_RUNS_DIR, "
                           "else runs/ in the job's working dir)")] = None,
    address: JobsAddressOpt = None,
    allow_plain_token: PlainTokenOpt = False,
    sweep: Annotated[str | None, typer.Option(
        "--sweep", help="submit `explab sweep SWEEP.yaml` instead of a run")] = None,
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
    err.print(f"[dim]uploaded {len(submission.uploaded)} git-tracked files: "
              f"{jobs_api.summarize_upload(submission.uploaded)}[/dim]", highlight=False, soft_wrap=True)
    where = runs_dir or "$EXPLAB_RUNS_DIR (else ~/explab-runs)"
    err.print(f"[dim]runs go to {where} on the cluster; bring one back with "
              f"`explab pull {submission.job_id}`[/dim]", highlight=False, soft_wrap=True)
    out.print(f"dashboard: {submission.dashboard_url}", highlight=False, soft_wrap=True)
    if follow:
        state = jobs_api.follow_logs(submission.job_id, submission.address)
        err.print(f"job {submission.job_id}: {state}", highlight=False)
        if state != "SUCCEEDED":
            raise typer.Exit(1)
    print(submission.job_id, flush=True)


@app.command("pull")
def pull_cmd(job_id: Annotated[str, typer.Argument(help="job id from `explab submit`")],
             runs_dir: RunsDirOpt = None, address: JobsAddressOpt = None,
             allow_plain_token: PlainTokenOpt = False) -> None:
    """Bring a finished submitted job's run (or sweep) directory back into the local runs dir."""
    from explab.pull import pull

    local, skipped = pull(job_id, address, runs_dir)
    for name in skipped:
        err.print(f"[yellow]left on the cluster (too large):[/yellow] {name}", highlight=False, soft_wrap=True)
    print(local, flush=True)


@app.command("status")
def status_cmd(job_id: Annotated[str | None, typer.Argument(
                   help="job id from `explab submit` (leave out to list the jobs)")] = None,
               address: JobsAddressOpt = None, allow_plain_token: PlainTokenOpt = False) -> None:
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
             address: JobsAddressOpt = None, allow_plain_token: PlainTokenOpt = False) -> None:
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
             address: JobsAddressOpt = None, allow_plain_token: PlainTokenOpt = False) -> None:
    """Stop a submitted job."""
    from explab import jobs_api

    stopped, state = jobs_api.stop(job_id, address)
    out.print(f"stopping {job_id} ({state})" if stopped else f"{job_id} was not running ({state})", highlight=False)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except ExplabError as error:  # also a Ray error wrapping one: its own one line, not Ray's traceback
        sys.exit(_fail(one_line(error)))
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt as error:
        err.print("[yellow]stopped[/yellow]", highlight=False)
        sys.exit(143 if isinstance(error, Terminated) else 130)
    except Exception as error:
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if isinstance(_cause(error), ExplabError):
            sys.exit(_fail(one_line(error)))
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
