"""Both pruning methods on a copy of the unpruned model, from importances computed once on it."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from explab.errors import ConfigError
from explab.models import LoadedModel, parameter_count
from jobs.vlm_compression import layerwise, widthwise
from jobs.vlm_compression.backbone import block_parameters, blocks
from jobs.vlm_compression.config import LayerConfig, WidthConfig


def copy_of(loaded: LoadedModel) -> LoadedModel:
    """A deep copy of the model (tokenizer and processor shared: pruning never touches them)."""
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.processor, loaded.kind, loaded.spec,
                       loaded.source, loaded.revision)


def layerwise_prune(loaded: LoadedModel, bi: np.ndarray, angular: np.ndarray, ratio: float,
                    cfg: LayerConfig) -> dict[str, Any]:
    """Remove round(ratio x L) blocks in place: the lowest BI, or the contiguous angular run."""
    n_layers = len(blocks(loaded.model))
    n = layerwise.n_blocks_to_remove(n_layers, ratio)
    removed = (layerwise.select_angular(angular[: n_layers - n + 1, n], n) if cfg.angular
               else layerwise.select_blocks(bi, n))
    layerwise.remove_blocks(loaded.model, removed)
    return {"removed_blocks": removed, "layer_ratio": n / n_layers}


def _range(value: tuple[int, int] | None, n_layers: int, field: str) -> tuple[int, int]:
    lo, hi = value if value is not None else (0, n_layers)
    if not 0 <= lo < hi <= n_layers:
        raise ConfigError(f"width.{field} [{lo}, {hi}) is not a block range of this {n_layers}-block model: "
                          f"pick 0 <= start < end <= {n_layers}, or null for every block")
    return lo, hi


def widthwise_prune(loaded: LoadedModel, importance: list[widthwise.LayerGroups], ratio: float,
                    cfg: WidthConfig) -> dict[str, Any]:
    """Remove attention KV groups and MLP channels in place, the local ratio chosen so the decoder blocks
    lose at least ratio x their parameters."""
    n_layers = len(blocks(loaded.model))
    target = int(round(ratio * block_parameters(loaded.model)))
    width_plan = widthwise.plan(importance, loaded.model, target, _range(cfg.attn_layers, n_layers, "attn_layers"),
                                _range(cfg.mlp_layers, n_layers, "mlp_layers"))
    widthwise.apply(loaded.model, width_plan)
    return {"removed_heads": {int(k): v for k, v in width_plan.attn.items() if v},
            "removed_channels": {int(k): len(v) for k, v in width_plan.mlp.items() if v},
            "layer_ratio": width_plan.layer_ratio}


def sizes(loaded: LoadedModel) -> dict[str, int]:
    return {"parameters": parameter_count(loaded.model), "block_parameters": block_parameters(loaded.model),
            "n_blocks": len(blocks(loaded.model))}


def save_pruned_model(loaded: LoadedModel, path: Any, info: dict[str, Any]) -> Any:
    """Write the pruned copy (on the CPU) as a pruned checkpoint the loader reads."""
    from explab.models import save_pruned

    loaded.model.to("cpu")
    return save_pruned(loaded, path, info)
