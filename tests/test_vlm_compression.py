"""vlm_compression: planted checks of ShortGPT block influence, LLM-Pruner Taylor groups, pruned checkpoints,
recovery, and the tiny job end to end (which shares the session's Ray, like the other jobs' tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explab.models import ModelSpec, load_model, parameter_count, save_pruned
from explab.train import objectives as obj
from jobs.vlm_compression import backbone, data, layerwise, widthwise

# 4 blocks, 4 heads of 16 (MHA) or 4 query heads over 2 KV groups (GQA); 128 MLP channels
MHA = ModelSpec(name="tiny:llava", tiny={"text_config": {"num_hidden_layers": 4, "num_attention_heads": 4,
                                                         "num_key_value_heads": 4}})
GQA = ModelSpec(name="tiny:llava", tiny={"text_config": {"num_hidden_layers": 4, "num_attention_heads": 4,
                                                         "num_key_value_heads": 2}})


def _inputs(loaded, n=2, seed=0):
    rows = data.training_rows(n, seed)[:n]
    examples = [obj.chat_example(loaded, r["messages"], r["images"]) for r in rows]
    return examples


def _logits(model, ex):
    with torch.no_grad():
        return model(**{k: v for k, v in ex.items() if k != "labels"}).logits


def _block_io(model, ex):
    """Inputs and outputs of every decoder block (forward hooks), [T, d] each."""
    ins, outs, handles = {}, {}, []
    for i, block in enumerate(backbone.blocks(model)):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: ins.__setitem__(i, (a[0] if a else kw["hidden_states"])[0].clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].clone())))
    _logits(model, ex)
    for h in handles:
        h.remove()
    return ins, outs


def test_an_identity_block_has_influence_exactly_zero_is_removed_first_and_leaves_the_logits_unchanged():
    loaded = load_model(MHA)
    model = loaded.model
    with torch.no_grad():  # block 2 becomes an identity: zero attention and MLP output projections
        backbone.blocks(model)[2].self_attn.o_proj.weight.zero_()
        backbone.blocks(model)[2].mlp.down_proj.weight.zero_()
    ex = _inputs(loaded)[0]
    ins, outs = _block_io(model, ex)
    bi = np.array([layerwise.block_influence(ins[i], outs[i]) for i in range(4)])
    assert bi[2] == 0.0
    assert (np.delete(bi, 2) > 1e-3).all()
    assert layerwise.select_blocks(bi, 1) == [2]
    before = _logits(model, ex)
    layerwise.remove_blocks(model, [2])
    assert len(backbone.blocks(model)) == 3 and backbone.text_config(model).num_hidden_layers == 3
    assert torch.equal(_logits(model, ex), before)


def test_angular_variant_removes_the_contiguous_run_whose_ends_are_closest():
    assert layerwise.select_angular(np.array([0.4, 0.1, 0.3]), 2) == [1, 2]
    h = torch.randn(5, 8)
    assert layerwise.angular_distance(h, h) == 0.0
    assert layerwise.angular_distance(h, -h) == pytest.approx(1.0)


def _zero_head_and_channel(model, layer=1, kv_group=1, channel=7):
    attn, mlp = backbone.parts(backbone.blocks(model)[layer])
    hd = backbone.head_dim(model)
    g = attn.q_proj.out_features // attn.k_proj.out_features
    with torch.no_grad():
        attn.o_proj.weight[:, kv_group * g * hd:(kv_group + 1) * g * hd] = 0.0
        mlp.down_proj.weight[:, channel] = 0.0


@pytest.mark.parametrize("spec", [MHA, GQA], ids=["mha", "gqa"])
def test_a_zeroed_head_and_channel_have_taylor_importance_zero_are_pruned_first_and_change_nothing(spec):
    loaded = load_model(spec)
    model = loaded.model
    _zero_head_and_channel(model)
    examples = _inputs(loaded, n=3)

    def loss(ex):
        return lambda: obj.next_token_ce(model(**{k: v for k, v in ex.items() if k != "labels"}).logits,
                                         ex["labels"])

    grads = widthwise.accumulate_gradients(model, [loss(ex) for ex in examples])
    imp = widthwise.group_importance(model, grads, "first")
    assert imp[1].attn[1] == 0.0 and imp[1].mlp[7] == 0.0
    assert (np.delete(imp[1].attn.numpy(), 1) > 0).all()
    assert (np.delete(imp[1].mlp.numpy(), 7) > 0).all()
    for kind in ("second", "mix", "vectorize"):  # every salience variant also scores them exactly 0
        other = widthwise.group_importance(model, grads, kind)
        assert other[1].attn[1] == 0.0 and other[1].mlp[7] == 0.0
    attn_size, mlp_size = widthwise.group_sizes(model)
    d, hd = backbone.text_config(model).hidden_size, backbone.head_dim(model)
    g = 4 // backbone.text_config(model).num_key_value_heads
    assert attn_size == (2 * g + 2) * d * hd and mlp_size == 3 * d  # MHA: 4 d head_dim
    # one layer, the smallest local ratio that removes one KV group and one channel
    # a target that needs the local ratio 1 / n_groups in block 1: one KV group goes, the zeroed one
    n_groups = len(imp[1].attn)
    target = attn_size + 128 // n_groups * mlp_size
    plan = widthwise.plan(imp, model, target, attn_layers=(1, 2), mlp_layers=(1, 2))
    assert plan.layer_ratio == 1 / n_groups and plan.removed_parameters == target
    assert plan.attn == {1: [1]} and 7 in plan.mlp[1]
    assert widthwise.plan(imp, model, 1, attn_layers=(1, 2), mlp_layers=(1, 2)).mlp == {1: [7]}
    plan = widthwise.WidthPlan(attn={1: [1]}, mlp={1: [7]}, layer_ratio=0.0, removed_parameters=0)
    before_n = parameter_count(model)
    before = [_logits(model, ex) for ex in examples]
    widthwise.apply(model, plan)
    assert parameter_count(model) == before_n - attn_size - mlp_size
    for ex, ref in zip(examples, before, strict=True):
        torch.testing.assert_close(_logits(model, ex), ref, rtol=1e-5, atol=1e-5)


def test_a_pruned_checkpoint_reloads_through_the_loader_with_identical_logits(tmp_path):
    loaded = load_model(GQA)
    layerwise.remove_blocks(loaded.model, [0])
    plan = widthwise.WidthPlan(attn={1: [0]}, mlp={0: [1, 5], 2: list(range(64))}, layer_ratio=0.0,
                               removed_parameters=0)
    widthwise.apply(loaded.model, plan)
    path = save_pruned(loaded, tmp_path / "ckpt", {"method": "test"})
    again = load_model(ModelSpec(name=str(path), device="cpu"))
    assert again.kind == "vlm"
    assert parameter_count(again.model) == parameter_count(loaded.model)
    ex = _inputs(loaded)[0]
    assert torch.equal(_logits(again.model, ex), _logits(loaded.model, ex))


# ---------------------------------------------------------------- recovery (the pieces `fit` runs, in-process)


def _train(student, teacher, mode, rows, steps):
    from explab.train.loops import build_optimizer, compute_loss, prepare_student
    from jobs.vlm_compression.config import RecoveryConfig
    from jobs.vlm_compression.recovery import objective_of, trainer_of

    cfg = RecoveryConfig(trainer={"lr": 3e-3, "batch_size": 4, "warmup_ratio": 0.0, "steps": steps}, epochs=None)
    trainer, objective = trainer_of(mode, cfg, len(rows), vision=True), objective_of(mode, cfg)
    model = prepare_student(student.model, trainer)
    model.train()
    optimizer, scheduler = build_optimizer(model, trainer)
    batch = obj.collate([obj.chat_example(student, r["messages"], r["images"]) for r in rows],
                        student.tokenizer.pad_token_id)
    for _ in range(trainer.steps):
        optimizer.zero_grad()
        compute_loss(model, teacher.model if teacher else None, batch, objective)["loss"].backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return model


def _kl(student, teacher, rows):
    batch = obj.collate([obj.chat_example(teacher, r["messages"], r["images"]) for r in rows],
                        teacher.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return float(obj.logit_kd(student(**inputs).logits, teacher.model(**inputs).logits, 2.0,
                                  mask=batch["attention_mask"]))


def test_kd_from_the_unpruned_teacher_reduces_the_pruned_students_kl_on_held_out_data(tmp_path):
    teacher = load_model(MHA)
    pruned = load_model(MHA)
    layerwise.remove_blocks(pruned.model, [1])
    student = load_model(ModelSpec(name=str(save_pruned(pruned, tmp_path / "p")), device="cpu"))
    train, held_out = data.training_rows(4, seed=1), data.training_rows(2, seed=2)
    before = _kl(student.model, teacher, held_out)
    trained = _train(student, teacher, "kd", train[:8], steps=10)
    after = _kl(trained, teacher, held_out)
    assert after < 0.8 * before, (before, after)


def test_projector_only_recovery_leaves_the_pruned_backbone_bit_identical(tmp_path):
    pruned = load_model(GQA)
    widthwise.apply(pruned.model, widthwise.WidthPlan(attn={2: [0]}, mlp={1: [3]}, layer_ratio=0.0,
                                                      removed_parameters=0))
    student = load_model(ModelSpec(name=str(save_pruned(pruned, tmp_path / "p")), device="cpu"))
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    trained = _train(student, None, "mm", data.training_rows(2, seed=3)[:4], steps=3)
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)


# ---------------------------------------------------------------- the job


JOB_DIR = Path(__file__).resolve().parents[1] / "jobs" / "vlm_compression"


def test_sweep_spec_resolves_for_every_value_of_its_grid():
    from explab import sweep

    source = JOB_DIR / "sweep.yaml"
    plan = sweep.resolve(sweep.load_spec(source), source)
    assert plan is not None
    from jobs.vlm_compression.config import Config

    trial = Config.model_validate({"methods": "widthwise", "ratios": 0.3, "recovery": {"modes": "kd",
                                                                                         "fractions": 0.05}})
    assert (trial.methods, trial.ratios, trial.recovery.modes, trial.recovery.fractions) == (
        ["widthwise"], [0.3], ["kd"], [0.05])


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_every_config_validates_and_the_paper_one_keeps_remote_code_off(name):
    from explab.config import read_yaml
    from jobs.vlm_compression.config import Config

    config = Config.model_validate(read_yaml(JOB_DIR / "configs" / f"{name}.yaml"))
    assert not config.model.trust_remote_code
    if name == "paper":
        assert config.model.name == "llava-hf/llava-1.5-7b-hf" and config.recovery.trainer.deepspeed.stage == 3
        assert (config.width.attn_layers, config.width.mlp_layers) == ((3, 21), (3, 20))


def test_tiny_run_writes_every_table_plot_and_pruned_checkpoint(tmp_path, ray_local, cli):
    # in the suite's time budget: one method, zero-shot only (each served model costs ~8 s, a Ray Train fit
    # ~25 s); the recovery's loss and what it trains are tested in-process above, and the full tiny config
    # (both methods, KD through explab.train.fit) is what `explab run vlm_compression -c tiny` runs
    code, out, err = cli("run", "vlm_compression", "-c", "tiny", "--runs-dir", str(tmp_path),
                         "--set", "methods=[widthwise]", "--set", "recovery.modes=[none]")
    assert code in (0, None), err
    run_dir = Path(out.strip().splitlines()[-1])
    importance = pd.read_parquet(run_dir / "tables" / "importance.parquet")
    assert set(importance["kind"]) == {"block", "attn_group", "mlp_channel"}
    assert len(importance[importance["kind"] == "block"]) == 4
    pruned = pd.read_parquet(run_dir / "tables" / "pruned.parquet")
    assert list(pruned["method"]) == ["widthwise"]
    assert 0.25 <= float(pruned["block_compression"].iloc[0]) < 0.3  # the local ratio reaches the target
    path = Path(pruned["path"].iloc[0])
    again = load_model(ModelSpec(name=str(path), device="cpu"))
    assert parameter_count(again.model) == int(pruned["parameters"].iloc[0])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert int(pruned["parameters"].iloc[0]) in {m.get("n_params") for m in manifest["models"]}
    table = pd.read_parquet(run_dir / "tables" / "eval.parquet")
    assert set(table["recovery"]) == {"none"} and set(table["method"]) == {"unpruned", "widthwise"}
    assert set(table["benchmark"]) == {"shapes_colour", "shapes_count", "shapes_yesno", "perplexity"}
    base = table[table["method"] == "unpruned"]
    assert (base[base["score"] > 0]["relative"] == 1.0).all() and base[base["score"] == 0]["relative"].isna().all()
    accuracy = table[table["benchmark"] != "perplexity"]["score"]
    assert ((accuracy >= 0) & (accuracy <= 1)).all() and (table[table["benchmark"] == "perplexity"]["score"] > 1).all()
    for name in ("block_influence", "relative_vs_compression", "recovery_vs_fraction"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 500, name
    result = json.loads((run_dir / "result.json").read_text())
    assert {"avg_relative", "zero_shot", "widthwise_none"} <= set(result)
    np.testing.assert_equal([result["avg_relative"], result["zero_shot"]], [result["widthwise_none"]] * 2)
