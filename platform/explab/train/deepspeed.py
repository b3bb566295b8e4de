"""DeepSpeed ZeRO-2/ZeRO-3 for GPU workers (the ``gpu`` extra installs DeepSpeed).

Ray Train's documented DeepSpeed pattern: the worker group and its NCCL process group come from
``TorchTrainer``; inside the loop ``deepspeed.initialize`` wraps the model and builds the ZeRO
optimiser from `zero_config`. Every rank writes its shard of a checkpoint
(``engine.save_checkpoint``) and reports it; Ray Train merges the shards into one directory.
For trl / HF ``Trainer`` loops the same dict goes to ``TrainingArguments(deepspeed=...)`` with
``hf=True`` (batch sizes and learning rate left to the Trainer as ``"auto"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from explab.errors import ConfigError
from explab.train.config import DeepSpeedConfig, TrainerConfig, schedule_factor

CHECKPOINT_DIR = "deepspeed"
# the checkpoint tag: not "latest", the name of the file in which DeepSpeed records the newest tag beside it
# (a tag "latest" makes a directory there, and writing that file fails, as seen on a GPU worker)
TAG = "state"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def zero_config(
    ds: DeepSpeedConfig, trainer: TrainerConfig, world_size: int, *, hf: bool = False
) -> dict[str, Any]:
    """DeepSpeed's config dict for ``ds.stage`` with the trainer's batch, optimiser and clipping."""
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": True, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    auto = "auto"
    config: dict[str, Any] = {
        "train_batch_size": auto if hf else trainer.batch_size,
        "train_micro_batch_size_per_gpu": auto if hf else trainer.batch_size // world_size,
        "gradient_accumulation_steps": auto if hf else 1,
        "gradient_clipping": auto if hf else (trainer.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
    }
    if not hf:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": trainer.lr, "weight_decay": trainer.weight_decay},
        }
    return _merge(config, ds.extra)


def initialize(model: nn.Module, trainer: TrainerConfig, world_size: int) -> tuple[Any, Any, Any]:
    """``deepspeed.initialize`` on the trainable parameters: (engine, optimizer, lr scheduler).

    The schedule is `explab.train.config.schedule_factor`'s, stepped by ``engine.step()``."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "trainer.deepspeed is set but DeepSpeed is not installed: "
            "install the gpu extra (pip install 'explab[gpu]')"
        ) from None
    import torch

    assert trainer.deepspeed is not None
    config = zero_config(trainer.deepspeed, trainer, world_size)

    def make_scheduler(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, trainer))

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=make_scheduler,
        config=config,
    )
    return engine, optimizer, scheduler


def save_checkpoint(engine: Any, path: Path, rank: int) -> None:
    """This rank's part of the engine's checkpoint, plus (rank 0) the trainable weights gathered in
    16 bit as ``model.safetensors`` so that `explab.train.load_trained` reads ZeRO runs too."""
    import deepspeed

    from explab.train import worker

    engine.save_checkpoint(str(path / CHECKPOINT_DIR), tag=TAG)
    module = engine.module
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        if rank == 0:
            worker.save_weights(path, {name: p.detach().cpu().clone() for name, p in trainable})


def load_checkpoint(engine: Any, path: Path) -> None:
    engine.load_checkpoint(str(path / CHECKPOINT_DIR), tag=TAG)
