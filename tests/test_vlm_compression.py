"""vlm_compression: planted checks of ShortGPT block influence, LLM-Pruner Taylor groups, pruned checkpoints,
recovery, and the tiny job end to end (which shares the session's Ray, like the other jobs' tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explab.errors import ConfigError
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
    lay = backbone.layout(model, layer)
    hd = backbone.head_dim(model)
    g = lay.roles["q"].size // lay.roles["k"].size
    with torch.no_grad():
        lay.linear("o").weight[:, kv_group * g * hd:(kv_group + 1) * g * hd] = 0.0
        lay.linear("down").weight[:, channel] = 0.0


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


PHI3 = ModelSpec(name="tiny:phi3", tiny={"num_hidden_layers": 3, "num_attention_heads": 4,
                                        "num_key_value_heads": 2})


def test_fused_qkv_and_gate_up_are_split_for_pruning_fused_back_and_reload_equal(tmp_path):
    """Phi-3 (one qkv_proj, one gate_up_proj): a zeroed KV group and channel score exactly 0, go first, the
    pruned block is again Phi-3's fused layout with the group's rows gone from each row block, the parameter
    count drops by exactly the group sizes, outputs stay, and the checkpoint reloads with equal logits."""
    loaded = load_model(PHI3)
    model = loaded.model
    _zero_head_and_channel(model)
    ids = [{"input_ids": torch.tensor([loaded.tokenizer(t)["input_ids"]])}
           for t in ("a red disc and two squares.", "is there a dot?")]

    def loss(ex):
        return lambda: obj.next_token_ce(model(**ex).logits, ex["input_ids"])

    grads = widthwise.accumulate_gradients(model, [loss(ex) for ex in ids])
    imp = widthwise.group_importance(model, grads, "first")
    assert imp[1].attn.tolist()[1] == 0.0 and imp[1].attn[0] > 0
    assert imp[1].mlp[7] == 0.0 and (np.delete(imp[1].mlp.numpy(), 7) > 0).all()
    attn_size, mlp_size = widthwise.group_sizes(model)
    assert (attn_size, mlp_size) == (6 * 64 * 16, 3 * 64)  # 2 query heads + k + v rows, o columns; 3 d
    target = attn_size + 64 * mlp_size  # needs the local ratio 1/2: one of the two KV groups, 64 channels
    plan = widthwise.plan(imp, model, target, attn_layers=(1, 2), mlp_layers=(1, 2))
    assert plan.attn == {1: [1]} and 7 in plan.mlp[1] and plan.removed_parameters == target
    qkv, gate_up = (backbone.blocks(model)[1].self_attn.qkv_proj.weight.detach().clone(),
                    backbone.blocks(model)[1].mlp.gate_up_proj.weight.detach().clone())
    before_n, before = parameter_count(model), [_logits(model, ex) for ex in ids]
    widthwise.apply(model, widthwise.WidthPlan(attn={1: [1]}, mlp={1: [7]}, layer_ratio=0.0, removed_parameters=0))
    block = backbone.blocks(model)[1]
    assert type(block.self_attn.qkv_proj) is torch.nn.Linear and not hasattr(block.self_attn, "q_proj")
    # kept rows: query heads 0-1 (of 4), key head 0 and value head 0 (of 2), in q / k / v order
    kept = torch.cat([qkv[0:32], qkv[64:80], qkv[96:112]])
    assert torch.equal(block.self_attn.qkv_proj.weight, kept)
    keep = [c for c in range(128) if c != 7]
    assert torch.equal(block.mlp.gate_up_proj.weight, torch.cat([gate_up[keep], gate_up[[128 + c for c in keep]]]))
    assert parameter_count(model) == before_n - attn_size - mlp_size
    after = [_logits(model, ex) for ex in ids]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    again = load_model(ModelSpec(name=str(save_pruned(loaded, tmp_path / "phi3")), device="cpu"))
    assert type(again.model).__name__ == "Phi3ForCausalLM"
    assert parameter_count(again.model) == parameter_count(model)
    assert all(torch.equal(_logits(again.model, ex), a) for ex, a in zip(ids, after, strict=True))


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
        assert [s.name for s in config.data.sources] == ["mmmu", "scienceqa", "mathvista", "ai2d", "mme", "pope",
                                                         "docvqa", "gqa"]


def _local_benchmarks(tmp_path):
    """Two of the paper's benchmarks as local copies in their Hub schemas: POPE (yes/no) and DocVQA (open)."""
    rng = np.random.default_rng(0)
    pics = [_png(int(v)) for v in rng.integers(0, 255, 4)]
    pope = _write(tmp_path, "pope", [
        {"question": f"Is there a {w} in the image?", "answer": a, "image": pics[i], "category": "random"}
        for i, (w, a) in enumerate([("dog", "yes"), ("cat", "no")])])
    doc = _write(tmp_path, "docvqa", [{"question": "What is the title?", "answers": ["report"], "image": pics[2]},
                                      {"question": "What year?", "answers": ["1999", "99"], "image": pics[3]}])
    return f"[{{name: pope, source: '{pope}'}}, {{name: docvqa, source: '{doc}'}}]"


def test_tiny_run_writes_every_table_plot_and_pruned_checkpoint(tmp_path, ray_local, cli):
    # in the suite's time budget: one method, zero-shot plus one logit-KD recovery of two steps through
    # explab.train.fit; POPE and DocVQA (local copies) next to the synthetic benchmarks
    code, out, err = cli("run", "vlm_compression", "-c", "tiny", "--runs-dir", str(tmp_path),
                         "--set", "methods=[widthwise]", "--set", "recovery.modes=[none, kd]",
                         "--set", "recovery.epochs=null", "--set", "recovery.trainer.steps=2",
                         "--set", f"data.sources={_local_benchmarks(tmp_path)}", "--set", "data.max_new_tokens=3")
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
    # the recovered model: same shapes as the pruned one, weights moved by the two KD steps
    recovered = load_model(ModelSpec(name=str(run_dir / "artifacts" / "recovered" / "recover-widthwise-0.25-kd-0.5"),
                                     device="cpu"))
    assert parameter_count(recovered.model) == parameter_count(again.model)
    moved = [n for n, p in recovered.model.named_parameters() if not torch.equal(p, again.model.get_parameter(n))]
    assert moved
    table = pd.read_parquet(run_dir / "tables" / "eval.parquet")
    assert set(table["recovery"]) == {"none", "kd"} and set(table["method"]) == {"unpruned", "widthwise"}
    assert set(table["benchmark"]) == {"shapes_colour", "shapes_count", "shapes_yesno", "pope", "docvqa",
                                       "perplexity"}
    base = table[table["method"] == "unpruned"]
    assert (base[base["score"] > 0]["relative"] == 1.0).all() and base[base["score"] == 0]["relative"].isna().all()
    accuracy = table[table["benchmark"] != "perplexity"]["score"]
    assert ((accuracy >= 0) & (accuracy <= 1)).all() and (table[table["benchmark"] == "perplexity"]["score"] > 1).all()
    assert set(table[table["benchmark"] == "pope"]["score"]) <= {0.0, 0.5, 1.0}  # 2 yes/no questions
    for name in ("block_influence", "relative_vs_compression", "recovery_vs_fraction"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 500, name
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["fraction"].isna().iloc[0] and metrics["fraction"].iloc[-1] == 0.5  # zero-shot logged first
    result = json.loads((run_dir / "result.json").read_text())
    assert {"avg_relative", "zero_shot", "widthwise_none", "widthwise_kd"} <= set(result)
    np.testing.assert_equal([result["avg_relative"], result["zero_shot"]],
                            [result["widthwise_kd"], result["widthwise_none"]])


def test_its_sweep_runs_under_explab_sweep(tmp_path, ray_local, cli):
    """The shipped sweep.yaml, two zero-shot trials on the tiny config: both complete, each trial's tables
    are its own setting, and the trial's metric is its run's zero-shot score."""
    import yaml

    shipped = yaml.safe_load((JOB_DIR / "sweep.yaml").read_text())
    spec = {**shipped, "num_samples": 2,
            "base": {"config": "tiny", "overrides": ["layer.n_samples=2", "width.n_samples=1", "data.n_ppl_texts=2"]},
            "space": {**shipped["space"], "ratios": {"type": "choice", "values": [0.25, 0.5]},
                      "recovery.modes": {"type": "choice", "values": ["none"]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--address", ray_local.address)
    assert code in (0, None), err
    sweep_dir = Path(out.strip().splitlines()[-1])
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials.get("error")
    for row in trials.to_dict("records"):
        run_dir = sweep_dir / row["run_dir"]
        pruned = pd.read_parquet(run_dir / "tables" / "pruned.parquet")
        assert list(pruned["method"]) == [row["param.methods"]]
        assert list(pruned["ratio"]) == [pytest.approx(row["param.ratios"])]
        avg = pd.read_parquet(run_dir / "tables" / "avg_relative.parquet")
        mine = avg[avg["method"] == row["param.methods"]]
        assert list(mine["recovery"]) == ["none"]
        assert float(mine["avg_relative"].iloc[0]) == pytest.approx(row["metric.avg_relative"], nan_ok=True)


# ---------------------------------------------------------------- the paper's benchmarks and training mix


def _png(value: int) -> dict:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(tmp_path, name, rows):
    path = tmp_path / f"{name}.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return f"parquet:{path}"


def test_each_benchmark_maps_its_dataset_columns_to_items_and_scores_by_its_rule(tmp_path):
    """Tiny copies of each benchmark in its Hub schema (a few rows): the mapped items carry the right
    options, answer and image, and planted predictions get the exact score of each benchmark's rule."""
    import datasets

    from jobs.vlm_compression import benchmarks as bm

    mmmu = bm.load("mmmu", _write(tmp_path, "mmmu", [
        {"id": "a", "question": "Which? <image 1>", "options": "['x', 'y', 'z']", "answer": "B",
         "image_1": _png(10), "question_type": "multiple-choice"},
        {"id": "b", "question": "Sum?", "options": "[]", "answer": "12", "image_1": _png(20),
         "question_type": "open"}]))
    assert mmmu[0].options == ["A", "B", "C"] and mmmu[0].answer == 1 and "C. z" in mmmu[0].question
    assert "(image 1)" in mmmu[0].question and int(mmmu[0].image[0, 0, 0]) == 10
    assert mmmu[1].open and mmmu[1].answers == ["12"]
    assert bm.score_all(mmmu, [1, "12."]) == {"mmmu": 1.0} and bm.score_all(mmmu, [0, "12"]) == {"mmmu": 0.5}

    sqa = bm.load("scienceqa", _write(tmp_path, "sqa", [
        {"question": "Q1", "hint": "h", "choices": ["a", "b"], "answer": 1, "image": _png(1)},
        {"question": "Q2", "hint": "", "choices": ["a", "b", "c"], "answer": 2, "image": None},
        {"question": "Q3", "hint": "", "choices": ["a", "b", "c"], "answer": 0, "image": _png(2)}]))
    assert [it.answer for it in sqa] == [1, 0] and sqa[0].question.startswith("Context: h")  # IMG subset
    assert bm.score("scienceqa", sqa, [1, 2]) == 0.5

    mv = bm.load("mathvista", _write(tmp_path, "mv", [
        {"pid": "1", "question": "Angle?", "choices": ["30", "60"], "answer": "60", "decoded_image": _png(3),
         "question_type": "multi_choice"},
        {"pid": "2", "question": "Count?", "choices": None, "answer": "7", "decoded_image": _png(4),
         "question_type": "free_form"}]))
    assert mv[0].answer == 1 and mv[1].answers == ["7"]
    assert bm.score("mathvista", mv, [1, "8"]) == 0.5

    ai2d = bm.load("ai2d", _write(tmp_path, "ai2d", [
        {"question": "Part?", "options": ["p", "q", "r", "s"], "answer": "3", "image": _png(5)}]))
    assert ai2d[0].options == list("ABCD") and ai2d[0].answer == 3

    # MME from a save_to_disk copy: category X has image a (both right) and b (one right): acc 75 + acc+ 50;
    # category Y has image c (both wrong): 0 + 0
    mme_rows = {"question_id": ["a", "a", "b", "b", "c", "c"], "category": ["X"] * 4 + ["Y"] * 2,
                "question": [f"Is it {i}? Please answer yes or no." for i in range(6)],
                "answer": ["Yes", "No", "Yes", "No", "Yes", "No"], "image": [_png(i)["bytes"] for i in range(6)]}
    datasets.Dataset.from_dict(mme_rows).save_to_disk(str(tmp_path / "mme"))
    mme = bm.load("mme", f"disk:{tmp_path / 'mme'}")
    assert [it.answer for it in mme] == [0, 1, 0, 1, 0, 1] and mme[0].question.count("yes or no") == 1
    assert bm.score("mme", mme, [0, 1, 0, 0, 1, 0]) == pytest.approx(125.0)

    pope = bm.load("pope", _write(tmp_path, "pope", [
        {"question": "Is there a dog in the image?", "answer": "yes", "image": _png(6), "category": "random"},
        {"question": "Is there a cat in the image?", "answer": "no", "image": _png(7), "category": "random"}]))
    assert [it.options for it in pope] == [["yes", "no"]] * 2 and bm.score("pope", pope, [0, 0]) == 0.5

    doc = bm.load("docvqa", _write(tmp_path, "doc", [
        {"questionId": 1, "question": "Title?", "answers": ["hello world", "Hello, world"], "image": _png(8)},
        {"questionId": 2, "question": "Date?", "answers": ["1999"], "image": _png(9)}]))
    # ANLS: "Hello worlds" is 1 edit from "hello world" (12 characters): 11/12; "xyz" vs "1999": 0
    assert bm.score("docvqa", doc, ["Hello worlds", "xyz"]) == pytest.approx(11 / 24)

    images = _write(tmp_path, "gqa_images", [{"id": "i1", "image": _png(11)}, {"id": "i2", "image": _png(12)}])
    gqa = bm.load("gqa", _write(tmp_path, "gqa", [
        {"id": "q1", "imageId": "i2", "question": "Which side?", "answer": "left"},
        {"id": "q2", "imageId": "i1", "question": "Is it red?", "answer": "yes"}]), images=images)
    assert int(gqa[0].image[0, 0, 0]) == 12 and int(gqa[1].image[0, 0, 0]) == 11
    assert bm.score("gqa", gqa, ["Left.", "no"]) == 0.5
    with pytest.raises(ConfigError, match="not in the images table"):
        bm.load("gqa", _write(tmp_path, "gqa2", [{"imageId": "i9", "question": "?", "answer": "a"}]), images=images)
    with pytest.raises(ConfigError, match="does not have the pope columns"):
        bm.load("pope", _write(tmp_path, "bad", [{"text": "x"}]))


def test_llava_conversation_json_becomes_training_rows_whose_labels_are_the_assistant_turns(tmp_path):
    from PIL import Image

    from jobs.vlm_compression.mix import conversation_rows

    (tmp_path / "imgs").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a.png")
    records = [
        {"id": "1", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A disc."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    ]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    rows = conversation_rows(tmp_path / "mix.json")  # one row per answer: 2 + 1
    assert len(rows) == 3 and all(np.array_equal(r["images"][0], pixels) for r in rows[:2])
    assert "images" not in rows[2]
    assert rows[0]["messages"] == [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "What colour is it?"}]},
                                   {"role": "assistant", "content": "Red."}]
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows[2]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    loaded = load_model(MHA)
    answers = []
    for row in rows[:2]:  # each row trains on its own answer, the image and earlier turns are context
        ex = obj.chat_example(loaded, row["messages"], row["images"])
        answers.append(loaded.tokenizer.decode(ex["labels"][0][ex["labels"][0] != -100], skip_special_tokens=True))
        assert int((ex["input_ids"][0] == loaded.model.config.image_token_index).sum()) == \
            loaded.model.config.image_seq_length
    assert [a.strip() for a in answers] == ["Red.", "A disc."]
    assert len(conversation_rows(tmp_path / "mix.json", images=False, limit=1)[0]["messages"][0]["content"]) > 0
    with pytest.raises(ConfigError, match="data.image_root"):
        conversation_rows(tmp_path / "mix.json", image_root=tmp_path / "elsewhere")
