"""FINER-Tuning: DPO (or the SFT ablation) on the training pairs through `explab.train`, then the tuned
model exported as a model directory so the shared servers can serve it for re-evaluation.

DPO is trl's ``DPOTrainer`` (sigmoid loss at beta, the frozen base as reference when LoRA is on) in a
Ray Train worker group (`explab.train.fit` with `explab.train.dpo.dpo_loop`); SFT is the supervised
loop (cross-entropy on the accepted answer only). The trained weights (LoRA adapters) stay in the
run's ``artifacts/<phase>/`` checkpoint; `export` merges them into the base and writes the model and
its processor to ``artifacts/<phase>_model/``, which `explab.models.load_model` reads as a local path.
"""

from __future__ import annotations

from typing import Any, Literal

from explab.models import ModelSpec
from explab.train import DPOConfig, TrainerConfig, TrainResult, dpo_loop, fit, load_trained, supervised_loop

Method = Literal["dpo", "sft"]


def _wire(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The preference rows as the trainer takes them (book-keeping columns dropped)."""
    return [{k: row[k] for k in ("prompt", "chosen", "rejected", "images")} for row in rows]


def train(ctx: Any, spec: ModelSpec, rows: list[dict[str, Any]], method: Method, trainer: TrainerConfig,
          dpo: DPOConfig, name: str, seed: int, metrics_prefix: str = "") -> TrainResult:
    """One tuning phase named ``name`` of the run (``artifacts/<name>/``); its training metrics are logged
    with ``metrics_prefix`` before their names."""
    model = spec.model_dump()
    if method == "dpo":
        config = {"model": model, "trainer": trainer.model_dump(), "dpo": dpo.model_dump(), "pairs": _wire(rows),
                  "seed": seed}
        return fit(ctx, dpo_loop, config, trainer, name=name, metrics_prefix=metrics_prefix)
    examples = [{"messages": row["prompt"] + row["chosen"], "images": row["images"]} for row in rows]
    config = {"model": model, "trainer": trainer.model_dump(), "objective": {"alpha": 0.0}, "examples": examples}
    return fit(ctx, supervised_loop, config, trainer, name=name, metrics_prefix=metrics_prefix)


def export(ctx: Any, spec: ModelSpec, result: TrainResult, trainer: TrainerConfig, name: str) -> ModelSpec:
    """The tuned model (adapters merged) saved under ``artifacts/<name>_model/``; its `ModelSpec`."""
    loaded = load_trained(spec, result.checkpoint, trainer, merge_lora=True)
    out = ctx.path("artifacts", f"{name}_model")
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    (loaded.processor or loaded.tokenizer).save_pretrained(out)
    return spec.model_copy(update={"name": str(out.resolve()), "tiny": {}, "revision": None})
