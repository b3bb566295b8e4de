"""Training as Ray Train jobs: `fit` runs a loop on a worker group and reports to the run.

- `fit(ctx, loop, loop_config, trainer)`: a ``TorchTrainer`` on ``trainer.workers`` (1 CPU worker
  in tests, N GPU workers on a cluster), metrics to ``ctx.log`` (and Tune), checkpoints in the run's
  ``artifacts/<name>/``, resumption after worker failures and from ``trainer.resume_from``.
- `supervised_loop`: CE on chat examples with prompt tokens masked, logit/hidden KD, their mix,
  projector-only or LoRA training, DeepSpeed ZeRO-2/3 on GPUs. `load_trained` reads its checkpoint.
- `dpo_loop`: DPO through trl's ``DPOTrainer`` (sigmoid loss, beta, frozen reference) for text and
  image-text preference rows.
- `objectives`, `params`: the pure-torch pieces (usable without Ray); `worker`: what a custom loop
  calls inside a worker (rank, device, models, `restore`, `report`).
"""

from explab.train.config import (
    DeepSpeedConfig,
    DPOConfig,
    LoraConfig,
    ObjectiveConfig,
    TrainerConfig,
    WorkersConfig,
)
from explab.train.dpo import build_dpo_trainer, dpo_loop
from explab.train.launch import TrainResult, fit
from explab.train.loops import load_trained, supervised_loop

__all__ = [
    "DPOConfig",
    "DeepSpeedConfig",
    "LoraConfig",
    "ObjectiveConfig",
    "TrainResult",
    "TrainerConfig",
    "WorkersConfig",
    "build_dpo_trainer",
    "dpo_loop",
    "fit",
    "load_trained",
    "supervised_loop",
]
