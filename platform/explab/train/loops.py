"""The built-in supervised loop: CE, logit/hidden KD and their mix, on 1 or N workers.

`supervised_loop` is the function `explab.train.fit` runs in each Ray Train worker. Its config
(plain data) holds ``model`` (a `ModelSpec`: the student), ``teacher`` (needed when the objective
distils), ``trainer`` (`TrainerConfig`), ``objective`` (`ObjectiveConfig`) and ``examples``: rows
``{"messages": [...chat turns, the last the assistant's...], "images": [...]}`` (images optional).

Step s uses rows ``s*B .. s*B+B-1`` (mod the number of rows) of the global batch B; worker r of N
takes every N-th of them from r. Loss terms that average over tokens are normalised by the count
over the whole global batch, and the KD sum by the global batch size, so N workers make the same
update as one worker with the whole batch (DDP averages the gradients of the N shares).

The pieces (`prepare_student`, `build_optimizer`, `compute_loss`) also work without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from explab.errors import ConfigError
from explab.train import objectives, params, worker
from explab.train.config import ObjectiveConfig, TrainerConfig, schedule_factor


def prepare_student(model: nn.Module, trainer: TrainerConfig) -> nn.Module:
    """Apply LoRA (``trainer.lora``) and freeze all but ``trainer.trainable``; returns the model to train."""
    if trainer.lora is not None:
        model = params.add_lora(model, trainer.lora)
        if trainer.trainable:  # e.g. LoRA on the LLM plus the full projector
            for name, p in model.named_parameters():
                if any(fragment in name for fragment in trainer.trainable):
                    p.requires_grad_(True)
        params.select_trainable(model, [])
    else:
        params.select_trainable(model, trainer.trainable)
    return model


def build_optimizer(model: nn.Module, trainer: TrainerConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its learning-rate schedule (`schedule_factor`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=trainer.lr, weight_decay=trainer.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, trainer))
    return optimizer, scheduler


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool) -> Any:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, output_hidden_states=hidden, use_cache=False)


def compute_loss(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, torch.Tensor],
    objective: ObjectiveConfig,
    *,
    global_tokens: int | None = None,
    global_batch: int | None = None,
    global_positions: int | None = None,
) -> dict[str, torch.Tensor]:
    """The objective on one (local) batch: ``{"loss", "ce", "kd"}`` (kd only when distilling).

    ``global_tokens`` / ``global_batch``: the trained-token count and batch size over all workers
    (default: this batch's). CE is its token sum over ``global_tokens``, the logit KD its position
    sum x tau^2 over ``global_batch``, and the hidden MSE is weighted by this batch's share of the
    non-padding positions (``global_positions``: their count over all workers), each multiplied by
    the number of shares so that DDP's gradient average restores them."""
    labels = batch["labels"]
    local_tokens = objectives.trained_tokens(labels)
    local_batch = labels.shape[0]
    local_positions = int(batch["attention_mask"].sum())
    global_positions = global_positions or local_positions
    global_tokens = global_tokens or local_tokens
    global_batch = global_batch or local_batch
    shares = global_batch / local_batch  # the number of workers when the shares are equal
    hidden = bool(objective.hidden_layers) and objective.uses_teacher
    out = _forward(model, batch, hidden)
    ce = objectives.next_token_ce(out.logits, labels, reduction="sum") / max(global_tokens, 1) * shares
    terms = {"ce": ce}
    if objective.uses_teacher:
        if teacher is None:
            raise ConfigError("objective.alpha > 0 distils from a teacher: set the loop's teacher model")
        with torch.no_grad():
            t_out = _forward(teacher, batch, hidden)
        kd = ce.new_zeros(())
        if objective.logit_kd != "none":
            # padding positions are left out (without padding this is the recipe's all-position sum), so
            # that the loss does not depend on how a global batch is split and padded
            kd = (
                kd
                + objectives.logit_kd(
                    out.logits,
                    t_out.logits,
                    objective.tau,
                    reverse=objective.logit_kd == "rkl",
                    mask=batch["attention_mask"],
                )
                * local_batch
                / global_batch
                * shares
            )
        if hidden:
            mask = batch["attention_mask"]
            kd = (
                kd
                + objectives.hidden_mse(
                    out.hidden_states, t_out.hidden_states, objective.hidden_layers, mask=mask
                )
                * local_positions
                / max(global_positions, 1)
                * shares
            )
        terms["kd"] = kd
        terms["loss"] = objectives.mix(kd, ce, objective.alpha)
    else:
        terms["loss"] = ce
    return terms


def step_rows(step: int, batch_size: int, n_rows: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The row indices worker ``rank`` of ``world_size`` trains on at ``step``."""
    start = step * batch_size
    return [(start + i) % n_rows for i in range(rank, batch_size, world_size)]


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def supervised_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function of the supervised recipe (see the module docstring for ``config``).

    Reports ``step`` (steps done), ``loss``, ``ce``, ``kd`` (when distilling) and ``lr`` after every
    step; checkpoints every ``trainer.checkpoint_every`` steps and at the end."""
    import torch.distributed as dist

    trainer = TrainerConfig.model_validate(config["trainer"])
    objective = ObjectiveConfig.model_validate(config.get("objective") or {})
    rows = list(config["examples"])
    if not rows:
        raise ConfigError("the training set is empty: give at least one example")
    rank, world_size = worker.world()
    student = worker.load(config["model"])
    teacher = worker.load(config["teacher"], train=False).model if objective.uses_teacher else None
    model = prepare_student(student.model, trainer)
    pad = student.tokenizer.pad_token_id
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def example(i: int) -> dict[str, torch.Tensor]:
        if i not in cache:
            row = rows[i]
            encoded = objectives.chat_example(student, row["messages"], row.get("images"))
            if trainer.max_length:
                encoded = {
                    k: v[:, : trainer.max_length] if k in ("input_ids", "attention_mask", "labels") else v
                    for k, v in encoded.items()
                }
            cache[i] = encoded
        return cache[i]

    engine = None
    if trainer.deepspeed is not None:
        from explab.train.deepspeed import initialize

        engine, optimizer, scheduler = initialize(model, trainer, world_size)
        train_model: nn.Module = engine
    else:
        import ray.train.torch

        optimizer, scheduler = build_optimizer(model, trainer)
        train_model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": student.kind == "vlm"}
        )
    dtype = next(params.unwrap(train_model).parameters()).dtype
    dev = worker.device()

    with worker.restore(trainer.resume_from) as path:
        start = worker.steps_done(path)
        if path is not None:
            _load_state(path, model, optimizer, scheduler, engine)

    def save(path: Path) -> None:
        _save_state(path, model, optimizer, scheduler, engine, rank)

    for step in range(start, trainer.steps):
        local = objectives.collate(
            [example(i) for i in step_rows(step, trainer.batch_size, len(rows), rank, world_size)], pad
        )
        local = _to(local, dev, dtype)
        counts = torch.tensor(
            [objectives.trained_tokens(local["labels"]), int(local["attention_mask"].sum())], device=dev
        )
        if world_size > 1:
            dist.all_reduce(counts)
        terms = compute_loss(
            train_model,
            teacher,
            local,
            objective,
            global_tokens=int(counts[0]),
            global_batch=trainer.batch_size,
            global_positions=int(counts[1]),
        )
        lr = scheduler.get_last_lr()[0]
        if engine is not None:
            engine.backward(terms["loss"])
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], trainer.grad_clip
                )
            optimizer.step()
            scheduler.step()
        metrics = {
            k: float(v.detach()) / (trainer.batch_size / local["labels"].shape[0]) for k, v in terms.items()
        }
        if world_size > 1:  # sum the shares: the global batch's values (as one worker would report)
            values = torch.tensor([metrics[k] for k in sorted(metrics)], device=dev, dtype=torch.float64)
            dist.all_reduce(values)
            metrics = dict(zip(sorted(metrics), values.tolist(), strict=True))
        done = step + 1
        metrics.update(step=done, lr=lr)
        last = done == trainer.steps
        periodic = trainer.checkpoint_every and done % trainer.checkpoint_every == 0
        worker.report(metrics, save if (last or periodic) else None, every_rank=engine is not None, step=done)


def _save_state(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, engine: Any, rank: int) -> None:
    if engine is not None:
        from explab.train.deepspeed import save_checkpoint

        save_checkpoint(engine, path, rank)
        return
    worker.save_weights(path, params.trainable_state(model))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        path / worker.OPTIMIZER_FILE,
    )


def _load_state(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, engine: Any) -> None:
    if engine is not None:
        from explab.train.deepspeed import load_checkpoint

        load_checkpoint(engine, path)
        return
    weights = worker.load_weights(path)
    missing = set(params.trainable_state(model)) - set(weights)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks trainable parameters ({sorted(missing)[0]}, ...): resume with "
            "the trainer.trainable and trainer.lora settings it was trained with"
        )
    with torch.no_grad():
        named = dict(params.unwrap(model).named_parameters())
        for name, value in weights.items():
            named[name].copy_(value)
    state = torch.load(path / worker.OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def load_trained(
    spec: Any, checkpoint: str | Path, trainer: TrainerConfig, *, merge_lora: bool = True
) -> Any:
    """The model ``spec`` with the trained parameters of ``checkpoint`` (a `fit` result's
    ``checkpoint``), as a `explab.models.LoadedModel` in eval mode on the spec's device.

    ``trainer`` must be the config it was trained with (its ``lora`` decides the adapters); with
    ``merge_lora`` the adapters are folded into the base weights (a plain transformers model)."""
    from explab.models import ModelSpec, load_model

    loaded = load_model(ModelSpec.of(spec))
    model = prepare_student(loaded.model, trainer)
    weights = worker.load_weights(Path(checkpoint))
    named = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(named))
    if unknown:
        raise ConfigError(
            f"checkpoint {checkpoint} holds {unknown[0]!r}, which {loaded.spec.name!r} lacks: "
            "load it with the model spec and trainer settings it was trained with"
        )
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value.to(named[name].dtype))
    if trainer.lora is not None and merge_lora:
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    loaded.model = model
    return loaded
