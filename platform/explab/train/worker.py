"""What a training loop calls inside a Ray Train worker: its rank, device, models and checkpoints.

A checkpoint directory holds ``state.json`` (``{"step": n}``: steps done), ``model.safetensors``
(the trainable parameters by name), ``optimizer.pt`` (optimiser and schedule state) or, under
DeepSpeed, ``deepspeed/`` (the engine's sharded checkpoint, one part per rank). `restore` finds
the checkpoint to continue from: the run's own latest one (after a worker failure Ray Train
restarts the workers and hands it back) or else ``trainer.resume_from``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from explab.errors import ConfigError
from explab.models import LoadedModel, ModelSpec, load_model

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def device() -> torch.device:
    """This worker's device: its GPU under ``use_gpu``, else the CPU."""
    import ray.train.torch

    return ray.train.torch.get_device()


def load(spec: ModelSpec | str | dict[str, Any], *, train: bool = True) -> LoadedModel:
    """Load a model with `explab.models.load_model` onto this worker's device (train or eval mode)."""
    spec = ModelSpec.of(spec)
    loaded = load_model(spec.model_copy(update={"device": str(device())}))
    loaded.model.train(train)
    if not train:
        loaded.model.requires_grad_(False)
    return loaded


def check_resume_from(resume_from: str) -> None:
    """Raise `ConfigError` unless ``resume_from`` is a checkpoint directory (it holds ``state.json``)."""
    if not (Path(resume_from) / STATE_FILE).is_file():
        raise ConfigError(
            f"trainer.resume_from {resume_from!r} is not a training checkpoint (no {STATE_FILE}): "
            "give a checkpoint_* directory of an earlier run's artifacts"
        )


@contextmanager
def restore(resume_from: str | None = None) -> Iterator[Path | None]:
    """The checkpoint directory to continue from, or None for a fresh start.

    The run's own latest checkpoint wins (a restart after a worker failure); otherwise
    ``resume_from`` (a directory, e.g. an earlier run's ``artifacts/<name>/checkpoint_...``)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        check_resume_from(resume_from)
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)


def steps_done(path: Path | None) -> int:
    """Optimiser steps already taken at checkpoint ``path`` (0 without one)."""
    if path is None:
        return 0
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def report(
    metrics: dict[str, Any],
    save: Callable[[Path], None] | None = None,
    *,
    every_rank: bool = False,
    step: int | None = None,
) -> None:
    """Report ``metrics`` to Ray Train from every worker (it is a barrier: all ranks must call it).

    With ``save``, rank 0 (or ``every_rank``, for sharded states such as DeepSpeed's) writes a
    checkpoint into a fresh directory through ``save(path)``, which Ray Train persists under the
    run's ``artifacts/``. ``step`` (steps done) is written to the checkpoint's ``state.json``."""
    import ray.train

    rank, _ = world()
    if save is None or (rank != 0 and not every_rank):
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="explab-ckpt-") as tmp:
        path = Path(tmp)
        save(path)
        if rank == 0:
            (path / STATE_FILE).write_text(
                json.dumps({"step": step if step is not None else metrics.get("step")})
            )
        name = f"checkpoint_{int(step if step is not None else metrics.get('step', 0)):06d}"
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write trainable parameters (`explab.train.params.trainable_state`) as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_FILE))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS_FILE))
