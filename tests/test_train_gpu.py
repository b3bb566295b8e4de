"""explab.train on GPU workers: DeepSpeed ZeRO-2 and ZeRO-3 (skipped without CUDA or DeepSpeed)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from explab.models import ModelSpec, load_model
from explab.train import TrainerConfig, fit, load_trained, supervised_loop
from explab.train import objectives as obj
from explab.train.loops import compute_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (the gpu extra)"
    ),
]

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"question {i}?"},
            {"role": "assistant", "content": "answer " + "ab" * (i + 1)},
        ]
    }
    for i in range(4)
]


class _Config(BaseModel):
    seed: int = 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_checkpoints_on_a_gpu_worker(ray_local, tmp_path, stage):
    from explab.runs import create_run

    rows = []
    trainer = TrainerConfig(
        steps=4,
        batch_size=2,
        lr=5e-3,
        warmup_ratio=0,
        checkpoint_every=2,
        workers={"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}},
        deepspeed={"stage": stage, "precision": "fp32"},
    )
    ctx = create_run("train-gpu", _Config(), run_dir=tmp_path / "run", reporter=rows.append)
    config = {
        "model": {"name": "tiny:llama", "dtype": "float32"},
        "trainer": trainer.model_dump(),
        "examples": ROWS,
    }
    result = fit(ctx, supervised_loop, config, trainer)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (Path(result.checkpoint) / "deepspeed").is_dir()
    trained = load_trained({"name": "tiny:llama", "device": "cpu"}, result.checkpoint, trainer)
    base = load_model(ModelSpec(name="tiny:llama", device="cpu"))
    batch = obj.collate([obj.chat_example(base, r["messages"]) for r in ROWS], base.tokenizer.pad_token_id)
    with torch.no_grad():
        before = compute_loss(base.model, None, batch, obj_config())["ce"].item()
        after = compute_loss(trained.model, None, batch, obj_config())["ce"].item()
    assert after < before - 0.1


def obj_config():
    from explab.train import ObjectiveConfig

    return ObjectiveConfig()
