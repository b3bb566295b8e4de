"""Config sections of a training run: workers, optimisation, checkpoints, LoRA, DeepSpeed, objective.

A job's ``Config`` holds a `TrainerConfig` (``trainer: TrainerConfig = TrainerConfig()``) and, for the
built-in loops, an `ObjectiveConfig` or `DPOConfig`; `explab.train.fit` turns the ``workers`` section
into Ray Train's ``ScalingConfig`` and the checkpoint fields into its ``RunConfig``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from explab.config import Section
from explab.errors import ConfigError


class WorkersConfig(Section):
    """Ray Train's worker group: one process per worker, each with ``resources_per_worker``."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without

    @property
    def process_group_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if self.use_gpu else "gloo"
        if self.backend == "nccl" and not self.use_gpu:
            raise ConfigError(
                "trainer.workers.backend is nccl without GPUs: set use_gpu: true or backend: gloo"
            )
        return self.backend


class LoraConfig(Section):
    """LoRA adapters through ``peft`` on the modules named in ``target_modules`` (suffix match)."""

    r: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class DeepSpeedConfig(Section):
    """A DeepSpeed ZeRO stage for GPU workers (the ``gpu`` extra installs DeepSpeed).

    `explab.train.deepspeed.zero_config` turns it into DeepSpeed's config dict; ``extra`` is merged
    over the generated dict last (any DeepSpeed key, e.g.
    ``{"zero_optimization": {"reduce_bucket_size": 5e8}}``).
    """

    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    extra: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs ZeRO stage 3: set stage: 3 or offload_params: false")
        return self


class TrainerConfig(Section):
    """How to train: workers, steps and batch, optimiser and schedule, what to train, checkpoints.

    ``batch_size`` is the global batch of one optimiser step; each of the N workers takes an equal
    share, so the same config gives the same updates on 1 or N workers. ``trainable`` lists name
    fragments (``multi_modal_projector``): only parameters whose dotted name contains one of them
    train (empty: all, or only the LoRA adapters when ``lora`` is set). ``resume_from`` names a
    checkpoint directory of an earlier run to continue from; after a worker failure the run
    restarts from its own last checkpoint by itself (up to ``max_failures`` times).
    """

    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    max_length: int | None = Field(None, ge=1)  # truncate encoded examples (image tokens stay whole)
    trainable: list[str] = Field(default_factory=list)
    lora: LoraConfig | None = None
    deepspeed: DeepSpeedConfig | None = None
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int | None = Field(2, ge=1)  # None: keep all
    max_failures: int = Field(0, ge=-1)  # -1: retry without limit
    resume_from: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.batch_size % self.workers.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over {self.workers.num_workers} "
                "workers: make it a multiple of workers.num_workers"
            )
        if self.deepspeed is not None and not self.workers.use_gpu:
            raise ValueError("deepspeed needs GPU workers: set workers.use_gpu: true or drop deepspeed")
        return self


class ObjectiveConfig(Section):
    """The supervised objective: ``alpha * KD + (1 - alpha) * CE``.

    CE is next-token cross-entropy on the response tokens (prompt tokens masked). KD is the logit
    distillation term (``logit_kd``: KL(p_T||p_S) = ``kl``, KL(p_S||p_T) = ``rkl``, or none) at
    temperature ``tau`` (summed over the non-padding positions, x tau^2 / B) plus, when
    ``hidden_layers`` is set, the MSE between the student's and
    teacher's hidden states at those indices (``hidden_states[i]``, -1 = the last). With alpha 0 no
    teacher is needed.
    """

    alpha: float = Field(0.0, ge=0.0, le=1.0)
    logit_kd: Literal["kl", "rkl", "none"] = "kl"
    tau: float = Field(2.0, gt=0)
    hidden_layers: list[int] = Field(default_factory=list)

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0 and (self.logit_kd != "none" or bool(self.hidden_layers))


class DPOConfig(Section):
    """DPO through trl's ``DPOTrainer``: sigmoid loss at ``beta`` against a frozen reference."""

    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid"] = "sigmoid"
    max_length: int | None = Field(512, ge=1)  # cutoff of prompt + response tokens
    gradient_checkpointing: bool = False


def schedule_factor(step: int, trainer: TrainerConfig) -> float:
    """The learning-rate multiplier at ``step``: linear warmup, then cosine / linear decay or constant."""
    warmup = math.ceil(trainer.warmup_ratio * trainer.steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if trainer.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(trainer.steps - warmup, 1)
    if trainer.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
