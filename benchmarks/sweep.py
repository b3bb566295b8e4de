"""Sweeps: shared model servers vs a private copy per trial, and Tune's overhead per trial.

1. A 16-trial steering-strength sweep (the quickstart job with ``alpha`` swept) on a random Llama
   (default 6 layers, 512 wide), FIFO, one trial at a time: once with the shared HookedModel
   server (the model is loaded once for all trials) and once with ``server.shared=false`` (each
   trial starts and loads its own server). Reported: both wall times and their ratio.
2. Tune's overhead per trial on the embedded cluster: a sweep of a no-op job (``quadratic`` with
   no steps) vs calling the same job directly as many times in this process (the sweep is run
   twice; the first also starts Tune's trial worker processes and is reported separately).

    python benchmarks/sweep.py [--trials 16 --layers 6 --hidden 512 --overhead-trials 32]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml


def _model(args: argparse.Namespace) -> dict:
    heads = args.hidden // 64
    return {"name": "tiny:llama", "tiny": {
        "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
        "num_attention_heads": heads, "num_key_value_heads": heads,
    }}


def _steering_spec(args: argparse.Namespace, shared: bool) -> dict:
    return {
        "job": "quickstart",
        "base": {"config": "tiny", "overrides": [
            f"model={json.dumps(_model(args))}", f"layer={args.layers // 2}", f"max_tokens={args.max_tokens}",
            "questions=[Name a colour., Say hello., Count to three.]", f"server.shared={str(shared).lower()}",
        ]},
        "space": {"alpha": {"type": "uniform", "low": 0.0, "high": 16.0}},
        "metric": "projection_at_alpha", "mode": "max",
        "num_samples": args.trials, "max_concurrent": args.concurrent,
        "resources_per_trial": {"cpu": 0.5}, "seed": 0,
    }


def _sweep(spec: dict, root: Path, name: str) -> tuple[float, Path]:
    from explab.sweep import run_sweep

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    sweep_dir = run_sweep(path, root / "runs")
    return time.perf_counter() - start, sweep_dir


def bench_shared(args: argparse.Namespace, root: Path) -> dict:
    import pandas as pd

    from explab.models import ModelSpec
    from explab.servers import list_servers, server_name, stop_server

    name = server_name("hooked", ModelSpec.of(_model(args)))
    if name in {s["name"] for s in list_servers()}:
        stop_server(name)  # the shared run pays for its one load too
    out = {}
    for shared in (True, False):
        wall, sweep_dir = _sweep(_steering_spec(args, shared), root, f"steer-{'shared' if shared else 'private'}")
        table = pd.read_parquet(sweep_dir / "trials.parquet")
        loads = {}
        for run_dir in table["run_dir"]:
            manifest = json.loads((sweep_dir / run_dir / "manifest.json").read_text())
            loads.update({m["pid"]: m["load_time_s"] for m in manifest["models"]})
        out["shared" if shared else "private"] = {
            "wall_s": round(wall, 2), "completed": int((table["status"] == "completed").sum()),
            "server_processes": len(loads), "mean_model_load_s": round(sum(loads.values()) / len(loads), 2),
            "mean_trial_s": round(float(table["duration_s"].mean()), 2),
        }
    stop_server(name)
    out["private_over_shared"] = round(out["private"]["wall_s"] / out["shared"]["wall_s"], 2)
    return out


def bench_overhead(args: argparse.Namespace, root: Path) -> dict:
    from explab.config import load_config
    from explab.runs import execute
    from explab.sweep import load_job

    n = args.overhead_trials
    spec = {"job": "quadratic", "base": {"config": "tiny", "overrides": ["steps=0", "noise=0"]},
            "space": {"x": {"type": "uniform", "low": -5.0, "high": 5.0}},
            "metric": "objective", "mode": "max", "num_samples": n, "max_concurrent": 1, "seed": 0}
    cold, _ = _sweep(spec, root, "noop-cold")  # the first sweep also starts Tune's trial worker processes
    wall, _ = _sweep(spec, root, "noop")
    job = load_job("quadratic")
    config = load_config(job.config, job.config_path("tiny"), ["steps=0", "noise=0"])
    start = time.perf_counter()
    for _ in range(n):
        execute(job, config, root / "direct")
    direct = time.perf_counter() - start
    return {"trials": n, "first_sweep_wall_s": round(cold, 2), "sweep_wall_s": round(wall, 2),
            "direct_wall_s": round(direct, 2),
            "sweep_per_trial_s": round(wall / n, 3), "direct_per_call_s": round(direct / n, 3),
            "overhead_per_trial_s": round((wall - direct) / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--overhead-trials", type=int, default=32)
    parser.add_argument("--skip-shared", action="store_true", help="only measure Tune's overhead")
    args = parser.parse_args()

    os.environ.setdefault("EXPLAB_RAY_DIR", "/tmp/ray-explab-bench")
    from explab import runtime

    runtime.init(dashboard=False)
    import ray

    result = {"cpus": ray.cluster_resources().get("CPU"), "load_avg_1m_start": round(os.getloadavg()[0], 1),
              "model": _model(args)["tiny"]}
    with tempfile.TemporaryDirectory(prefix="explab-bench-sweep-") as tmp:
        root = Path(tmp)
        result["tune_overhead"] = bench_overhead(args, root)
        if not args.skip_shared:
            result["steering_sweep"] = bench_shared(args, root)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
