"""`fit`: run a training loop as a Ray Train ``TorchTrainer`` inside a job's run.

The loop (``loop(config)``, e.g. `explab.train.loops.supervised_loop`) runs in every worker of the
group that ``trainer.workers`` describes; it reports with `explab.train.worker.report`. Each report
of rank 0 reaches the run's ``ctx.log`` (``metrics.parquet``, Ray metrics, and Tune when the run is
a sweep trial) while training goes on: a Ray Train callback on the controller puts the metrics on a
queue that a thread of the calling process drains into ``ctx.log``. Checkpoints are persisted by
Ray Train under ``<run>/artifacts/<name>/``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explab.errors import ConfigError
from explab.train.config import TrainerConfig

_POLL_S = 0.2


@dataclass
class TrainResult:
    """The outcome of `fit`: the last checkpoint directory (None if the loop saved none), rank 0's
    last reported metrics, and the training run's storage directory (``artifacts/<name>``)."""

    checkpoint: str | None
    metrics: dict[str, Any]
    path: str


def _relay_callback(queue: Any) -> Any:
    """A Ray Train `UserCallback` (it runs on the controller) putting rank 0's reports on ``queue``."""
    from ray.train.v2.api.callback import UserCallback

    class MetricsRelay(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                queue.put(dict(metrics[0]))

    return MetricsRelay()


def _log_row(ctx: Any, row: dict[str, Any], prefix: str = "") -> None:
    step = row.pop("step", None)
    values = {
        prefix + k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if values:
        ctx.log(step=None if step is None else int(step), **values)


def fit(
    ctx: Any,
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    trainer: TrainerConfig,
    *,
    name: str = "train",
    metrics_prefix: str = "",
) -> TrainResult:
    """Run ``loop`` on ``trainer.workers`` with ``loop_config`` (plain data: it travels to the workers).

    ``name`` names this training phase inside the run (``artifacts/<name>/``); use one per phase.
    ``metrics_prefix`` is put before the names of the metrics it logs to the run (e.g. ``"sft_"``), so
    that phases trained side by side (one thread each) keep their curves apart.
    Up to ``trainer.max_failures`` worker-group failures restart the loop, which continues from the
    last checkpoint (`explab.train.worker.restore`). Raises Ray Train's ``TrainingFailedError`` when
    the loop fails for good."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from explab import runtime
    from explab.train.worker import check_resume_from

    if trainer.resume_from:  # a bad path is refused here, not after the workers have started and loaded
        check_resume_from(trainer.resume_from)
    storage = ctx.path("artifacts").resolve()
    if (storage / name).exists():
        raise ConfigError(
            f"this run already has a training phase named {name!r} ({storage / name}): "
            "give each fit() of a run its own name"
        )
    storage.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        runtime.init()
    workers = trainer.workers
    queue = Queue(actor_options={"num_cpus": 0})
    run_config = RunConfig(
        name=name,
        storage_path=str(storage),
        failure_config=FailureConfig(max_failures=trainer.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints),
        callbacks=[_relay_callback(queue)],
    )
    torch_trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers,
            use_gpu=workers.use_gpu,
            resources_per_worker=dict(workers.resources_per_worker),
        ),
        torch_config=TorchConfig(backend=workers.process_group_backend),
        run_config=run_config,
    )
    last: dict[str, Any] = {}
    done = threading.Event()
    errors: list[BaseException] = []

    def drain() -> None:
        while True:
            try:
                row = queue.get(timeout=_POLL_S)
            except Empty:
                if done.is_set():
                    return
                continue
            except BaseException as err:  # the queue actor is gone: stop relaying, report it below
                errors.append(err)
                return
            last.clear()
            last.update(row)
            try:
                _log_row(ctx, dict(row), metrics_prefix)
            except BaseException as err:
                errors.append(err)
                return

    relay = threading.Thread(target=drain, name="explab-train-metrics", daemon=True)
    relay.start()
    try:
        result = torch_trainer.fit()
    finally:
        done.set()
        relay.join()
        try:
            queue.shutdown()
        except Exception:  # already gone
            pass
    if errors:
        raise errors[0]
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(checkpoint=checkpoint, metrics=dict(last), path=str(Path(storage) / name))
