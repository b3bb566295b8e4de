"""`explab.models.save_pruned` / `load_model`: a checkpoint whose linear layers no longer match its config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from explab.errors import ModelError
from explab.models import ModelSpec, load_model, parameter_count, save_pruned


def _shrink_mlp(model: nn.Module, layer: int, keep: int) -> None:
    mlp = model.model.layers[layer].mlp
    rows = torch.arange(keep)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, keep, bias=False)
        new.weight.data.copy_(old.weight.data[rows])
        setattr(mlp, name, new)
    new = nn.Linear(keep, mlp.down_proj.out_features, bias=False)
    new.weight.data.copy_(mlp.down_proj.weight.data[:, rows])
    mlp.down_proj = new


def test_a_pruned_tied_embedding_model_reloads_with_its_exact_parameter_count_and_logits(tmp_path):
    loaded = load_model(ModelSpec(name="tiny:qwen"))  # tied embeddings, q/k/v biases
    before = parameter_count(loaded.model)
    _shrink_mlp(loaded.model, 1, 100)
    assert parameter_count(loaded.model) == before - 3 * 28 * 64
    path = save_pruned(loaded, tmp_path / "ckpt", {"note": "mlp of block 1 cut to 100 channels"})
    record = json.loads((path / "pruned.json").read_text())
    assert record["parameters"] == parameter_count(loaded.model)
    assert record["linear_shapes"]["model.layers.1.mlp.down_proj"] == [64, 100]
    again = load_model(ModelSpec(name=str(path)))
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_a_record_that_disagrees_with_the_weights_is_one_clear_error(tmp_path):
    loaded = load_model(ModelSpec(name="tiny:llama"))
    _shrink_mlp(loaded.model, 0, 64)
    path = save_pruned(loaded, tmp_path / "ckpt")
    record = json.loads((path / "pruned.json").read_text())
    record["linear_shapes"]["model.layers.0.mlp.up_proj"] = [32, 64]
    (path / "pruned.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match="does not fit its recorded shapes"):
        load_model(ModelSpec(name=str(path)))
