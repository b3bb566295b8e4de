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
    from explab.registry import discover

    out.print(_table("jobs", [{"job": j.name, "description": j.description} for j in discover().values()]))


@app.command("run")
def run_cmd(
    job: Annotated[str, typer.Argument(help="job name (see `explab jobs`)")],
    config: Annotated[str | None, typer.Option("-c", "--config", help="YAML file, or a config name of the job (e.g. tiny)")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a field: --set a.b=value (repeatable)")] = None,
    runs_dir: RunsDirOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run a job; the last line printed is the run directory."""
    from explab import runtime
    from explab.config import load_config
    from explab.registry import get_job

    spec = get_job(job)
    cfg = load_config(spec.config, spec.config_path(config), overrides or [])
    info = runtime.init(address)
    if info.dashboard_url:
        err.print(f"[dim]Ray dashboard: {info.dashboard_url}[/dim]")
    run_dir, result = _execute(spec, cfg, runs_dir)
    if result:
        out.print(_table(f"{job} result", [{"metric": k, "value": v} for k, v in result.items()]))
    print(run_dir, flush=True)


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
