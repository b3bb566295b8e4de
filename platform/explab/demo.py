"""``explab demo``: a real job end to end on the embedded cluster with tiny models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

DEMO_JOB = "quickstart"  # the platform tour until a paper job takes its place


def run_demo(runs_dir: str | None = None, address: str | None = None, keep: bool = False,
             console: Any = None) -> Path:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from explab import runtime
    from explab.config import load_config
    from explab.job import get_job
    from explab.runs import execute
    from explab.servers import list_servers

    console = console or Console()
    job = get_job(DEMO_JOB)
    config = load_config(job.config, job.config_path("tiny"))
    info = runtime.init(address)
    console.print(f"[bold]explab demo[/bold]: job [cyan]{job.name}[/cyan] on "
                  f"{'an embedded local Ray' if info.embedded else 'the cluster at ' + info.address}")
    run_dir, result = execute(job, config, runs_dir)
    summary = pd.read_parquet(run_dir / "tables" / "summary.parquet")
    table = Table(title=f"{job.name}: projection on the contrastive direction vs steering strength")
    for column in summary.columns:
        table.add_column(str(column))
    for row in summary.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print("result: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    for server in list_servers():
        batching = server.get("batching", {}).get("batcher", {})
        console.print(f"server {server['name']}: {server.get('model')} loaded once in {server.get('load_time_s')} s, "
                      f"{batching.get('requests')} requests in {batching.get('batches')} batches")
    if info.dashboard_url:
        console.print(f"Ray dashboard: {info.dashboard_url}")
    if keep and info.embedded:
        console.print("keeping the embedded cluster up (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    print(run_dir, flush=True)
    return run_dir
