"""explab.train: objectives (pure torch), parameter selection, LoRA, DPO through trl, and Ray Train runs.

The Ray-backed tests share one embedded Ray (`ray_local`, 4 CPUs): every worker asks for 1 CPU."""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from explab.errors import ConfigError
from explab.models import ModelSpec, load_model
from explab.train import (
    DPOConfig,
    ObjectiveConfig,
    TrainerConfig,
    fit,
    load_trained,
    supervised_loop,
)
from explab.train import objectives as obj
from explab.train.loops import build_optimizer, compute_loss, prepare_student, step_rows

IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _chat(question, answer, image=False):
    content = [{"type": "image"}, {"type": "text", "text": question}] if image else question
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


# a small text set whose examples differ in length (so token counts differ between workers)
ROWS = [{"messages": _chat(f"question {i}?", "answer " + "ab" * (i + 1))} for i in range(6)]


# ---- objectives -------------------------------------------------------------------------------------
def test_logit_kd_is_the_tau_squared_kl_sum_over_positions_divided_by_the_batch():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    tau = 2.0
    p_t, p_s = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum() * tau**2 / 2
    reverse = (p_s * (p_s.log() - p_t.log())).sum() * tau**2 / 2
    assert torch.allclose(obj.logit_kd(s, t, tau), forward, atol=1e-6)
    assert torch.allclose(obj.logit_kd(s, t, tau, reverse=True), reverse, atol=1e-6)
    assert not torch.allclose(forward, reverse)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = (p_t * (p_t.log() - p_s.log())).sum(-1) * mask
    assert torch.allclose(obj.logit_kd(s, t, tau, mask=mask), kept.sum() * tau**2 / 2, atol=1e-6)


def test_kd_between_a_model_and_its_copy_is_exactly_zero_and_the_mix_is_the_scaled_ce():
    student = load_model(ModelSpec(name="tiny:llama"))
    teacher = copy.deepcopy(student.model)
    batch = obj.collate(
        [obj.chat_example(student, r["messages"]) for r in ROWS[:3]], student.tokenizer.pad_token_id
    )
    alpha = 0.3
    objective = ObjectiveConfig(alpha=alpha, logit_kd="kl", tau=2.0, hidden_layers=[1, -1])
    terms = compute_loss(student.model, teacher, batch, objective)
    assert terms["kd"].item() == 0.0
    assert terms["ce"].item() > 1.0
    assert terms["loss"].item() == pytest.approx((1 - alpha) * terms["ce"].item(), rel=1e-7)
    for reverse in (False, True):
        out = student.model(**{k: v for k, v in batch.items() if k != "labels"})
        assert obj.logit_kd(out.logits, out.logits.clone(), reverse=reverse).item() == 0.0
    # a different teacher gives a positive KD
    other = load_model(ModelSpec(name="tiny:llama", tiny={"num_hidden_layers": 3})).model
    assert compute_loss(student.model, other, batch, objective)["kd"].item() > 0


def test_hidden_mse_averages_chosen_layers_over_kept_positions():
    a = [torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    b = [torch.zeros(1, 3, 4), torch.tensor([[[1.0] * 4, [3.0] * 4, [100.0] * 4]])]
    mask = torch.tensor([[1, 1, 0]])
    assert obj.hidden_mse(a, b, [1], mask=mask).item() == pytest.approx((1 + 9) / 2)
    assert obj.hidden_mse(a, b, [0, 1], mask=mask).item() == pytest.approx((0 + 5) / 2)


def test_chat_example_masks_the_prompt_and_the_image_tokens():
    text = load_model(ModelSpec(name="tiny:llama"))
    ex = obj.chat_example(text, _chat("Hi?", "Hello."))
    trained = ex["input_ids"][0][ex["labels"][0] != obj.IGNORE_INDEX]
    assert text.tokenizer.decode(trained).startswith("Hello.")
    assert obj.trained_tokens(ex["labels"]) == len(trained)

    vlm = load_model(ModelSpec(name="tiny:llava"))
    ex = obj.chat_example(vlm, _chat("What is it?", "A cat.", image=True), [IMAGE])
    image_id = vlm.model.config.image_token_index
    ids, labels = ex["input_ids"][0], ex["labels"][0]
    assert (ids == image_id).sum() == vlm.model.config.image_seq_length
    assert (ids == vlm.tokenizer.bos_token_id).sum() == 1  # the template's BOS, not a second one
    assert (labels[ids == image_id] == obj.IGNORE_INDEX).all()
    assert vlm.tokenizer.decode(ids[labels != obj.IGNORE_INDEX]).startswith("A cat.")
    assert ex["pixel_values"].shape[0] == 1
    with pytest.raises(Exception, match="must end with the assistant"):
        obj.chat_example(text, _chat("Hi?", "Hello.")[:1])


# ---- what trains ----------------------------------------------------------------------------------------
def test_training_only_the_projector_leaves_every_other_parameter_bit_identical():
    vlm = load_model(ModelSpec(name="tiny:llava"))
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    trainer = TrainerConfig(trainable=["multi_modal_projector"], lr=1e-2, steps=3, warmup_ratio=0)
    model = prepare_student(vlm.model, trainer)
    model.train()
    optimizer, scheduler = build_optimizer(model, trainer)
    rows = [
        (_chat("What is it?", "A cat.", True), [IMAGE]),
        (_chat("Colour?", "Red and blue.", True), [255 - IMAGE]),
    ]
    batch = obj.collate([obj.chat_example(vlm, m, im) for m, im in rows], vlm.tokenizer.pad_token_id)
    for _ in range(3):
        optimizer.zero_grad()
        compute_loss(model, None, batch, ObjectiveConfig())["loss"].backward()
        optimizer.step()
        scheduler.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert len(changed) == len([n for n in before if "multi_modal_projector" in n])
    with pytest.raises(ConfigError, match="no parameter name contains"):
        prepare_student(vlm.model, TrainerConfig(trainable=["projektor"]))


def test_lora_trains_only_the_adapters_and_load_trained_merges_them(tmp_path):
    from explab.train import worker
    from explab.train.params import trainable_state

    trainer = TrainerConfig(
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, lr=1e-2, warmup_ratio=0
    )
    base = load_model(ModelSpec(name="tiny:llama"))
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    model = prepare_student(base.model, trainer)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    optimizer, _ = build_optimizer(model, trainer)
    batch = obj.collate(
        [obj.chat_example(base, r["messages"]) for r in ROWS[:2]], base.tokenizer.pad_token_id
    )
    for _ in range(3):
        optimizer.zero_grad()
        compute_loss(model, None, batch, ObjectiveConfig())["loss"].backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, before[plain]), name
    worker.save_weights(tmp_path, trainable_state(model))
    merged = load_trained("tiny:llama", tmp_path, trainer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        model.eval()
        expected = model(**inputs).logits
        got = merged.model(**inputs).logits
        untrained = load_model(ModelSpec(name="tiny:llama")).model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, untrained, atol=1e-3)


def test_trainer_config_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="multiple of workers.num_workers"):
        TrainerConfig(batch_size=3, workers={"num_workers": 2})
    with pytest.raises(ValueError, match="deepspeed needs GPU workers"):
        TrainerConfig(deepspeed={"stage": 3})
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        TrainerConfig(workers={"use_gpu": True}, deepspeed={"stage": 2, "offload_params": True})


def test_zero_configs_carry_the_stage_batch_and_optimizer():
    from explab.train.deepspeed import zero_config

    trainer = TrainerConfig(
        workers={"use_gpu": True, "num_workers": 4},
        batch_size=32,
        lr=4e-5,
        weight_decay=0.05,
        deepspeed={
            "stage": 3,
            "offload_params": True,
            "extra": {"zero_optimization": {"reduce_bucket_size": 1000}},
        },
    )
    cfg = zero_config(trainer.deepspeed, trainer, 4)
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert (
        cfg["zero_optimization"]["stage"] == 3
        and cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    )
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["zero_optimization"]["overlap_comm"]
    assert cfg["optimizer"]["params"] == {"lr": 4e-5, "weight_decay": 0.05} and cfg["bf16"]["enabled"]
    hf = zero_config(
        trainer.deepspeed.model_copy(update={"stage": 2, "offload_params": False}), trainer, 4, hf=True
    )
    assert (
        hf["train_batch_size"] == "auto" and "optimizer" not in hf and hf["zero_optimization"]["stage"] == 2
    )


def test_workers_split_each_global_batch_without_overlap():
    one = step_rows(5, 4, 6)
    two = step_rows(5, 4, 6, 0, 2) + step_rows(5, 4, 6, 1, 2)
    assert sorted(one) == sorted(two) and one == [2, 3, 4, 5]


# ---- DPO through trl ------------------------------------------------------------------------------------
def _pair(image=False):
    question = [{"type": "image"}, {"type": "text", "text": "Is it red?"}] if image else "Is it red?"
    row = {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": "Yes, red."}],
        "rejected": [{"role": "assistant", "content": "No, blue."}],
    }
    if image:
        row["images"] = [IMAGE]
    return row


def _sequence_logps(loaded, row):
    """log p(chosen), log p(rejected) under ``loaded`` with explab's own chat encoding."""
    images = row.get("images")
    out = []
    for key in ("chosen", "rejected"):
        ex = obj.chat_example(loaded, row["prompt"] + row[key], images)
        with torch.no_grad():
            logits = loaded.model(**{k: v for k, v in ex.items() if k != "labels"}).logits
        out.append(obj.sequence_logprob(logits, ex["labels"])[0])
    return out


@pytest.mark.parametrize("family,image", [("tiny:llama", False), ("tiny:llava", True)])
def test_trl_dpo_loss_is_ln2_at_the_reference_and_matches_the_hand_computed_loss(tmp_path, family, image):
    from explab.train.dpo import build_dpo_trainer

    policy, reference = load_model(ModelSpec(name=family)), load_model(ModelSpec(name=family))
    row = _pair(image)
    trainer_cfg = TrainerConfig(steps=1, batch_size=1, warmup_ratio=0)
    beta = 0.1
    trainer = build_dpo_trainer(policy, reference, [row], trainer_cfg, DPOConfig(beta=beta), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(math.log(2), abs=1e-6)
        gen = torch.Generator().manual_seed(1)
        for p in policy.model.parameters():  # move the policy away from the reference
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    pc, pr = _sequence_logps(policy, row)
    rc, rr = _sequence_logps(reference, row)
    hand = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).item()
    assert hand != pytest.approx(math.log(2), abs=1e-3)
    assert trl_loss == pytest.approx(hand, abs=1e-4)
    assert obj.dpo_sigmoid_loss(pc, pr, rc, rr, beta).item() == pytest.approx(hand, abs=1e-6)


# ---- Ray Train runs -------------------------------------------------------------------------------------
class _Config(BaseModel):
    seed: int = 0


def _run(tmp_path, name, reporter=None):
    from explab.runs import create_run

    return create_run("train-test", _Config(), run_dir=tmp_path / name, reporter=reporter)


def _trainer(**kw):
    base = {
        "steps": 4,
        "batch_size": 4,
        "lr": 5e-3,
        "warmup_ratio": 0.25,
        "checkpoint_every": 2,
        "workers": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
    }
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(base)


OBJECTIVE = {"alpha": 0.5, "logit_kd": "kl", "tau": 2.0}


def _loop_config(trainer):
    return {
        "model": "tiny:llama",
        "teacher": {"name": "tiny:llama", "tiny": {"num_hidden_layers": 3}},
        "trainer": trainer.model_dump(),
        "objective": OBJECTIVE,
        "examples": ROWS,
    }


def _weights(checkpoint):
    from explab.train import worker

    return worker.load_weights(Path(checkpoint))


@pytest.fixture(scope="module")
def one_worker_run(ray_local, tmp_path_factory):
    """Four distillation steps on one worker, checkpoints at steps 2 and 4; the reporter's rows."""
    rows = []
    ctx = _run(tmp_path_factory.mktemp("train"), "one", reporter=rows.append)
    trainer = _trainer()
    result = fit(ctx, supervised_loop, _loop_config(trainer), trainer)
    return ctx, result, rows


@pytest.mark.slow
def test_metrics_reach_ctx_log_and_checkpoints_land_in_the_runs_artifacts(one_worker_run):
    import pandas as pd

    ctx, result, rows = one_worker_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the reporter is how a sweep trial reaches Tune
    assert all({"loss", "ce", "kd", "lr"} <= set(r) for r in rows)
    assert all(r["kd"] > 0 and r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"]) for r in rows)
    logged = pd.DataFrame(ctx.metrics)  # what ctx.log recorded (flushed to the run's metrics files in chunks)
    assert logged["step"].tolist() == [1, 2, 3, 4]
    assert result.metrics["step"] == 4
    assert Path(result.checkpoint).parent == ctx.path("artifacts", "train").resolve()
    kept = sorted(p.name for p in Path(result.path).glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_000002", "checkpoint_000004"]
    trained = load_trained("tiny:llama", result.checkpoint, _trainer())
    untrained = load_model(ModelSpec(name="tiny:llama"))
    batch = obj.collate(
        [obj.chat_example(untrained, r["messages"]) for r in ROWS], untrained.tokenizer.pad_token_id
    )
    with torch.no_grad():
        ce_before = compute_loss(untrained.model, None, batch, ObjectiveConfig())["ce"].item()
        ce_after = compute_loss(trained.model, None, batch, ObjectiveConfig())["ce"].item()
    assert ce_after < ce_before - 0.1


@pytest.mark.slow
def test_two_workers_make_the_same_update_as_one_worker_with_the_whole_batch(one_worker_run, tmp_path):
    _, single, single_rows = one_worker_run
    rows = []
    trainer = _trainer(workers={"num_workers": 2})
    result = fit(_run(tmp_path, "two", reporter=rows.append), supervised_loop, _loop_config(trainer), trainer)
    a, b = _weights(single.checkpoint), _weights(result.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    untrained = load_model(ModelSpec(name="tiny:llama")).model.state_dict()
    assert any(not torch.allclose(a[n], untrained[n]) for n in a)
    for one, two in zip(single_rows, rows, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4) and two["ce"] == pytest.approx(
            one["ce"], rel=1e-4
        )


def _dies_once_loop(config):
    """supervised_loop whose worker is killed (os._exit) before its first report after a checkpoint."""
    import os
    import time
    from pathlib import Path

    import ray.train

    from explab.train import loops, worker

    marker = Path(config.pop("marker"))
    report = worker.report
    # the controller's checkpoint bookkeeping, written when it has taken in a reported checkpoint
    snapshot = Path(ray.train.get_context().get_storage().checkpoint_manager_snapshot_path)

    def report_or_die(metrics, save=None, **kw):
        if metrics["step"] == 3 and not marker.exists():
            marker.write_text("killed")
            deadline = time.monotonic() + 30  # let the controller collect the checkpoint of step 2 first
            while time.monotonic() < deadline and not (
                    snapshot.is_file() and "checkpoint_000002" in snapshot.read_text()):
                time.sleep(0.1)
            os._exit(1)
        report(metrics, save, **kw)

    worker.report = report_or_die
    loops.supervised_loop(config)


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_the_step_count_continues(one_worker_run, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, single, _ = one_worker_run
    rows = []
    trainer = _trainer(max_failures=1)
    config = {**_loop_config(trainer), "marker": str(tmp_path / "killed")}
    result = fit(_run(tmp_path, "killed", reporter=rows.append), _dies_once_loop, config, trainer)
    assert (tmp_path / "killed").exists()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # not 1, 2, 1, 2, 3, 4
    a, b = _weights(single.checkpoint), _weights(result.checkpoint)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.slow
def test_resume_from_an_earlier_runs_checkpoint_continues_it(one_worker_run, tmp_path):
    _, single, _ = one_worker_run
    rows = []
    midway = str(Path(single.path) / "checkpoint_000002")
    trainer = _trainer(resume_from=midway)
    result = fit(
        _run(tmp_path, "resumed", reporter=rows.append), supervised_loop, _loop_config(trainer), trainer
    )
    assert [r["step"] for r in rows] == [3, 4]
    a, b = _weights(single.checkpoint), _weights(result.checkpoint)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    bad = _trainer(resume_from=str(tmp_path))
    bad_run = _run(tmp_path, "bad")
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        fit(bad_run, supervised_loop, _loop_config(bad), bad)
    assert not bad_run.path("artifacts", "train").exists()  # refused before any worker started


@pytest.mark.slow
def test_dpo_on_ray_train_raises_p_chosen_over_p_rejected(ray_local, tmp_path):
    from explab.train.dpo import dpo_loop

    row = _pair()
    before = _sequence_logps(load_model(ModelSpec(name="tiny:llama")), row)
    rows = []
    trainer = TrainerConfig(
        steps=6,
        batch_size=1,
        lr=1e-3,
        warmup_ratio=0,
        workers={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
    )
    config = {"model": "tiny:llama", "trainer": trainer.model_dump(), "dpo": {"beta": 0.1}, "pairs": [row]}
    result = fit(_run(tmp_path, "dpo", reporter=rows.append), dpo_loop, config, trainer, name="dpo")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[-1] < losses[0]
    after = _sequence_logps(load_trained("tiny:llama", result.checkpoint, trainer), row)
    margin_before, margin_after = (before[0] - before[1]).item(), (after[0] - after[1]).item()
    assert margin_after > margin_before + 1.0
    assert margin_after > 0  # p(chosen) > p(rejected) after training
