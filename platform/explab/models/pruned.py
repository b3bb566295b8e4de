"""Checkpoints of structurally pruned transformers models: shapes the HF config cannot express.

A pruned model (whole heads or MLP channels removed per layer) no longer matches what its config
builds: ``from_pretrained`` refuses the shapes. `save_pruned` writes

- ``config.json`` (+ generation config) and the tokenizer / processor, as ``save_pretrained`` does
  (removed decoder blocks are expressible: the config's layer count is already updated);
- ``model.safetensors``: the weights (`safetensors.torch.save_model`, tied tensors stored once);
- ``pruned.json`` (`MARKER`): the ``[out_features, in_features]`` of every ``nn.Linear`` by module
  name, the exact parameter count, the per-module head / channel counts (`STRUCTURE_ATTRS`) and
  the config fields a module overrides (`ConfigOverride`: a fused-qkv attention such as Phi-3's
  splits its projection by ``config.num_attention_heads``, so a layer with fewer heads needs its
  own value).

`explab.models.load_model` recognises the marker in a local directory and builds the model from
its config, gives each linear layer its recorded shape, then loads the weights strictly
(`load_pruned`). No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explab.errors import ModelError

MARKER = "pruned.json"
WEIGHTS = "model.safetensors"
# integer attributes a pruner changes on attention / MLP modules (kept per module in pruned.json)
STRUCTURE_ATTRS = ("num_heads", "num_key_value_heads", "num_key_value_groups", "intermediate_size")


class ConfigOverride:
    """A module's view of a shared HF config with a few fields of its own (a pruned layer's head counts).

    Every other attribute, the attention implementation included, reads through to the shared config,
    so ``set_attn_implementation`` on the model still reaches the module. `save_pruned` records the
    fields and the loader puts them back."""

    def __init__(self, base: Any, **fields: Any) -> None:
        if isinstance(base, ConfigOverride):
            fields = {**base.fields, **fields}
            base = base.base
        self.__dict__.update(base=base, fields=dict(fields))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "fields"):
            raise AttributeError(name)
        fields = self.__dict__["fields"]
        return fields[name] if name in fields else getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__["fields"][name] = value


def override_config(module: nn.Module, **fields: Any) -> None:
    """Give ``module`` its own values of config ``fields`` (on top of the config it shares)."""
    module.config = ConfigOverride(module.config, **fields)


def structure(model: nn.Module) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """(``{module: {attr: int}}`` of `STRUCTURE_ATTRS`, ``{module: fields}`` of its `ConfigOverride`)."""
    attrs, overrides = {}, {}
    for name, m in model.named_modules():
        found = {a: v for a in STRUCTURE_ATTRS if type(v := vars(m).get(a)) is int}
        if found:
            attrs[name] = found
        if isinstance(vars(m).get("config"), ConfigOverride):
            overrides[name] = dict(m.config.fields)
    return attrs, overrides


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # named_parameters de-duplicates tied tensors already
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{module name: [out_features, in_features]}`` of every ``nn.Linear`` of ``model``."""
    return {name: [m.out_features, m.in_features] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def save_pruned(loaded: Any, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` (a `LoadedModel` whose model was pruned in place) as a pruned checkpoint.

    ``info`` (plain data: method, ratio, removed groups ...) is kept in ``pruned.json`` under
    ``"info"``. Returns the directory, which ``load_model(ModelSpec(name=str(path)))`` reads."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    (loaded.processor or loaded.tokenizer).save_pretrained(path)
    save_model(model, str(path / WEIGHTS))
    attrs, overrides = structure(model)
    record = {"linear_shapes": linear_shapes(model), "parameters": parameter_count(model),
              "module_attrs": attrs, "module_configs": overrides, "info": info or {}}
    (path / MARKER).write_text(json.dumps(record, indent=1))  # written last: its presence marks a whole checkpoint
    return path


def is_pruned(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_record(path: str | Path) -> dict[str, Any]:
    """The ``pruned.json`` of a pruned checkpoint (shapes, exact parameter count, info)."""
    return json.loads((Path(path) / MARKER).read_text())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_pruned(where: str, kind: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> Any:
    """Build the model of pruned checkpoint ``where`` from its config, reshape its linear layers as
    recorded, and load the weights strictly. Raises ModelError when the files disagree."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    record = read_record(where)
    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    model = auto.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    for name, (out_features, in_features) in record["linear_shapes"].items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ModelError(
                f"pruned checkpoint {where!r} records a linear layer {name!r} that its config does not build: "
                "save it again with explab.models.save_pruned from the same transformers version"
            )
        if (module.out_features, module.in_features) != (out_features, in_features):
            _set_module(model, name, nn.Linear(in_features, out_features, bias=module.bias is not None))
    _restore_structure(model, where, record)
    try:
        load_safetensors(model, str(Path(where) / WEIGHTS), strict=True)
    except RuntimeError as err:
        raise ModelError(
            f"pruned checkpoint {where!r} does not fit its recorded shapes ({str(err).splitlines()[0]}): "
            "re-save it with explab.models.save_pruned"
        ) from err
    if parameter_count(model) != record["parameters"]:
        raise ModelError(
            f"pruned checkpoint {where!r} loads {parameter_count(model)} parameters, its record says "
            f"{record['parameters']}: re-save it with explab.models.save_pruned"
        )
    return model.to(device=device, dtype=dtype)


def _restore_structure(model: nn.Module, where: str, record: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    for key in ("module_attrs", "module_configs"):
        for name, values in record.get(key, {}).items():
            if name not in modules:
                raise ModelError(f"pruned checkpoint {where!r} records module {name!r} that its config does not "
                                 "build: save it again with explab.models.save_pruned")
            if key == "module_attrs":
                for attr, value in values.items():
                    setattr(modules[name], attr, value)
            else:
                override_config(modules[name], **values)
