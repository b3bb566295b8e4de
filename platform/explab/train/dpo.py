"""DPO through trl's ``DPOTrainer`` (sigmoid loss at beta, a frozen reference), inside Ray Train.

Preference rows are ``{"prompt": [...chat turns...], "chosen": [{"role": "assistant", ...}],
"rejected": [...]}`` (trl's conversational format; plain strings also work) and, for a VLM,
``"images": [image, ...]`` with ``{"type": "image"}`` parts in the prompt. `dpo_loop` runs in each
Ray Train worker: it loads the policy and the reference with `explab.models.load_model`, builds
the trainer (`build_dpo_trainer`, also usable without Ray), reports trl's logs to the run through
`explab.train.worker.report` and checkpoints through Ray Train (the HF checkpoint under ``hf/``
plus the trainable weights as ``model.safetensors`` for `explab.train.load_trained`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from explab.errors import ConfigError
from explab.train import params, worker
from explab.train.config import DPOConfig, TrainerConfig

HF_DIR = "hf"
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _dataset(pairs: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    if not pairs:
        raise ConfigError("the preference set is empty: give at least one {prompt, chosen, rejected} row")
    for key in ("prompt", "chosen", "rejected"):
        if key not in pairs[0]:
            raise ConfigError(
                f"preference rows need {key!r}: give rows {{prompt, chosen, rejected[, images]}}"
            )
    if any("images" in row for row in pairs):
        from explab.images import to_pil

        pairs = [{**row, "images": [to_pil(image) for image in row.get("images") or []]} for row in pairs]
    return Dataset.from_list(pairs)


def build_dpo_trainer(
    policy: Any,
    reference: Any | None,
    pairs: list[dict[str, Any]],
    trainer: TrainerConfig,
    dpo: DPOConfig,
    output_dir: str | Path,
    *,
    world_size: int = 1,
    seed: int = 0,
    callbacks: list[Any] | None = None,
) -> Any:
    """trl's ``DPOTrainer`` for ``policy`` (a `LoadedModel`) against a frozen ``reference``.

    ``reference`` None with ``trainer.lora``: the policy with its adapters disabled (the frozen
    base, as trl does it); otherwise pass a second `LoadedModel` of the same weights. Batch, steps,
    schedule, LoRA, trainable subset and DeepSpeed come from ``trainer``; beta and the loss from ``dpo``."""
    import torch
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    if reference is None and trainer.lora is None:
        raise ConfigError(
            "DPO needs a frozen reference: load one, or set trainer.lora (the base is the reference)"
        )
    model = policy.model
    peft_config = None
    if trainer.lora is not None:
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(
            r=trainer.lora.r,
            lora_alpha=trainer.lora.alpha,
            lora_dropout=trainer.lora.dropout,
            target_modules=list(trainer.lora.target_modules),
            bias="none",
        )
    elif trainer.trainable:
        params.select_trainable(model, trainer.trainable)
    deepspeed = None
    if trainer.deepspeed is not None:
        from explab.train.deepspeed import zero_config

        deepspeed = zero_config(trainer.deepspeed, trainer, world_size, hf=True)
    on_gpu = torch.cuda.is_available() and trainer.workers.use_gpu
    args = TrlDPOConfig(
        output_dir=str(output_dir),
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        max_length=dpo.max_length,
        max_steps=trainer.steps,
        per_device_train_batch_size=trainer.batch_size // world_size,
        learning_rate=trainer.lr,
        weight_decay=trainer.weight_decay,
        warmup_steps=math.ceil(trainer.warmup_ratio * trainer.steps),
        lr_scheduler_type=_SCHEDULES[trainer.schedule],
        max_grad_norm=trainer.grad_clip or 0.0,
        gradient_checkpointing=dpo.gradient_checkpointing,
        bf16=on_gpu and (trainer.deepspeed is None or trainer.deepspeed.precision == "bf16"),
        fp16=on_gpu and trainer.deepspeed is not None and trainer.deepspeed.precision == "fp16",
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="steps",
        save_steps=trainer.checkpoint_every or trainer.steps,
        save_total_limit=1,
        report_to=[],
        seed=seed,
        deepspeed=deepspeed,
        disable_tqdm=True,
    )
    vlm = policy.kind == "vlm"
    return DPOTrainer(
        model=model,
        ref_model=reference.model if reference is not None else None,
        args=args,
        train_dataset=_dataset(pairs),
        processing_class=policy.processor if vlm else policy.tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def _report_callback(every_rank: bool) -> Any:
    """A transformers ``TrainerCallback`` reporting trl's logs and checkpoints to Ray Train."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    class ReportToRayTrain(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            values = {
                k.replace("/", "_"): float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            worker.report({"step": state.global_step, **values})

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            source = get_last_checkpoint(args.output_dir)

            def save(path: Path) -> None:
                if source is not None:
                    shutil.copytree(source, path / HF_DIR)
                if model is not None and worker.world()[0] == 0:
                    worker.save_weights(path, params.trainable_state(model))

            worker.report({"step": state.global_step}, save, every_rank=every_rank, step=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step always checkpoints
            return control

    return ReportToRayTrain()


def dpo_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function of DPO. ``config``: ``model`` (the policy's `ModelSpec`),
    ``reference`` (optional spec; default: the policy's spec, loaded frozen; with LoRA and no
    reference, the base with adapters off), ``trainer``, ``dpo``, ``pairs``, ``seed``."""
    import ray.train.huggingface.transformers as ray_hf

    trainer = TrainerConfig.model_validate(config["trainer"])
    dpo = DPOConfig.model_validate(config.get("dpo") or {})
    _, world_size = worker.world()
    policy = worker.load(config["model"])
    reference_spec = config.get("reference") or (None if trainer.lora is not None else config["model"])
    reference = worker.load(reference_spec, train=False) if reference_spec is not None else None
    with tempfile.TemporaryDirectory(prefix="explab-dpo-") as output_dir:
        hf_trainer = build_dpo_trainer(
            policy,
            reference,
            list(config["pairs"]),
            trainer,
            dpo,
            output_dir,
            world_size=world_size,
            seed=int(config.get("seed", 0)),
            callbacks=[_report_callback(every_rank=trainer.deepspeed is not None)],
        )
        hf_trainer = ray_hf.prepare_trainer(hf_trainer)
        with worker.restore(trainer.resume_from) as path:
            resume = str(path / HF_DIR) if path is not None else None
            if resume is not None and not Path(resume).is_dir():
                raise ConfigError(
                    f"checkpoint {path} has no {HF_DIR}/ (not a DPO checkpoint): resume DPO from a "
                    "checkpoint of dpo_loop"
                )
            hf_trainer.train(resume_from_checkpoint=resume)
