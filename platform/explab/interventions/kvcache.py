"""`GrowingCache`: a transformers `DynamicCache` that writes each step into reserved room.

transformers' `DynamicCache` concatenates every new key and value onto the whole cache at every
decode step, so a step copies the cache once per layer (18 % of `decode` on a random 6×512 Llama and
8 % on SmolLM2-135M on a 2-core CPU, cProfile; see `benchmarks/README.md`). `GrowingCache` layers keep keys
and values in buffers with room for the tokens still to come (``reserve``), write a step into that
room and hand the model views of the filled part; the buffers double when they are full. The
values, and so every result, are the same as with `DynamicCache`; only where they live differs.

Only for models whose every layer is full attention (`full_attention`): sliding-window and
linear-attention layers keep transformers' own cache.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose ``keys``/``values`` are views of buffers with ``reserve`` free positions."""

    def __init__(self, reserve: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reserve = reserve
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._views: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        q = key_states.shape[-2]
        if self._needs_room(key_states, n + q):
            # keys/values were replaced (a reorder, a crop) or the room is used up: copy into new buffers
            room = max(n + q + self.reserve, 2 * (n + q) if self._buffers is not None else 0)
            buffers = tuple(s.new_empty((*s.shape[:-2], room, s.shape[-1])) for s in (key_states, value_states))
            if n:
                buffers[0][..., :n, :] = self.keys
                buffers[1][..., :n, :] = self.values
            self._buffers = buffers  # type: ignore[assignment]
        keys, values = self._buffers  # type: ignore[misc]
        keys[..., n:n + q, :] = key_states
        values[..., n:n + q, :] = value_states
        self.keys, self.values = keys[..., :n + q, :], values[..., :n + q, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def _needs_room(self, states: Tensor, length: int) -> bool:
        if self._buffers is None or self._views is None:
            return True
        if self.keys is not self._views[0] or self.values is not self._views[1]:
            return True
        buf = self._buffers[0]
        return buf.shape[:-2] != states.shape[:-2] or buf.shape[-2] < length


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s with room for ``reserve`` more tokens than the first update."""

    def __init__(self, reserve: int = 0) -> None:
        Cache.__init__(self, layer_class_to_replicate=partial(GrowingLayer, reserve))  # type: ignore[arg-type]

    @classmethod
    def filled(cls, states: list[tuple[Tensor, Tensor]], reserve: int = 0) -> GrowingCache:
        """A cache holding ``states`` (per layer: keys, values) with ``reserve`` free positions."""
        cache = cls(reserve)
        for layer, (keys, values) in enumerate(states):
            cache.update(keys, values, layer)
        return cache


def full_attention(model: nn.Module) -> bool:
    """Whether every layer of ``model``'s KV cache is plain full attention (a `DynamicLayer`)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config transformers cannot lay out: leave such a model alone
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


__all__ = ["GrowingCache", "GrowingLayer", "full_attention"]
