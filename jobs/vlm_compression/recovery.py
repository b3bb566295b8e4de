"""Recovery of a pruned model with `explab.train` (Ray Train): projector-only, full SFT, LoRA, logit KD,
hidden-state KD, or SFT + hidden KD with alpha, from the unpruned teacher, on a random fraction of the data.

Each recovery runs `explab.train.supervised_loop` through `explab.train.fit` with the pruned checkpoint as
the student's `ModelSpec` (the loader reads pruned checkpoints), then writes the trained model as a pruned
checkpoint of its own, so the servers evaluate it like any other model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ConfigError
from explab.models import ModelSpec, save_pruned
from explab.train import ObjectiveConfig, TrainerConfig, fit, load_trained, supervised_loop
from jobs.vlm_compression.config import Recovery, RecoveryConfig


def objective_of(mode: Recovery, cfg: RecoveryConfig) -> ObjectiveConfig:
    """The loss of a recovery mode: CE (mm, sft, lora), KD only (kd, hidden_kd) or their mix (sft_hidden)."""
    if mode == "kd":
        return ObjectiveConfig(alpha=1.0, logit_kd=cfg.logit_kd, tau=cfg.tau)
    if mode == "hidden_kd":
        return ObjectiveConfig(alpha=1.0, logit_kd="none", hidden_layers=cfg.hidden_layers)
    if mode == "sft_hidden":
        return ObjectiveConfig(alpha=cfg.alpha, logit_kd="none", hidden_layers=cfg.hidden_layers)
    return ObjectiveConfig(alpha=0.0)


def trainer_of(mode: Recovery, cfg: RecoveryConfig, n_rows: int, vision: bool) -> TrainerConfig:
    """The trainer section: what trains (projector / all / LoRA adapters + projector) and the steps
    (``epochs`` over the ``n_rows`` drawn rows, or ``trainer.steps``)."""
    if mode == "mm" and not vision:
        raise ConfigError("recovery mode 'mm' trains the projector, which a text-only model lacks: drop it")
    update: dict[str, Any] = {"trainable": [], "lora": None}
    if mode == "mm":
        update["trainable"] = list(cfg.projector)
    elif mode == "lora":
        update["lora"] = cfg.lora
        update["trainable"] = list(cfg.projector) if vision else []
    if cfg.epochs is not None:
        update["steps"] = max(1, math.ceil(cfg.epochs * n_rows / cfg.trainer.batch_size))
    return cfg.trainer.model_copy(update=update)


def draw(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """A uniform random subset of round(fraction x rows) rows (at least one), seeded."""
    n = max(1, int(round(fraction * len(rows))))
    picked = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [rows[int(i)] for i in sorted(picked)]


def recover(ctx: Any, student: ModelSpec, teacher: ModelSpec, mode: Recovery, fraction: float,
            rows: list[dict[str, Any]], cfg: RecoveryConfig, vision: bool, out: Path, name: str,
            info: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train ``student`` (a pruned checkpoint) and save the result at ``out``; returns (path, last metrics)."""
    subset = draw(rows, fraction, ctx.seed)
    trainer = trainer_of(mode, cfg, len(subset), vision)
    objective = objective_of(mode, cfg)
    loop_config = {
        "model": student.model_dump(),
        "teacher": teacher.model_dump() if objective.uses_teacher else None,
        "trainer": trainer.model_dump(),
        "objective": objective.model_dump(),
        "examples": subset,
    }
    result = fit(ctx, supervised_loop, loop_config, trainer, name=name)
    if result.checkpoint is None:
        raise ConfigError(f"recovery {name} saved no checkpoint: keep trainer.checkpoint_every at 0 or > 0")
    trained = load_trained(student, result.checkpoint, trainer)
    trained.model.to("cpu")
    path = save_pruned(trained, out, {**info, "recovery": mode, "fraction": fraction, "rows": len(subset),
                                      "steps": trainer.steps})
    return path, result.metrics
