"""`PrefixCache`: the KV cache and last logits of prompts a model already prefilled, for later batches.

A steering sweep sends the same prompts again and again, each time with another strength applied to
the generated tokens only; the prompt's forward pass is the same every time. `decode` looks each
prompt up here when no spec of its row touches prompt positions, prefills only the prompts it does
not find, and builds the batch's KV cache from the entries (vLLM's automatic prefix caching does the
same for whole prompts). The cache is a byte-bounded LRU, held by one server for one model: its
entries are only valid for the weights that computed them. A prompt is stored once it is seen a
second time (twice in one batch, or again in a later one: `admit`), so a workload that never repeats
a prompt pays nothing for copying its prefills.

An entry keeps, per layer, the keys and values of the prompt's real tokens (no padding) and the
logits at its last position. Only models whose every cache layer is full attention are cut into
entries (`explab.interventions.kvcache.full_attention`); others still share a prefill within one batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Prefill:
    """One prompt's prefill: per layer ``(keys, values)`` of shape (kv heads, n, head dim), and the
    logits (V,) that choose the first generated token."""

    kv: tuple[tuple[Tensor, Tensor], ...]
    logits: Tensor

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv) + self.logits.nbytes


class PrefixCache:
    """Prefills keyed by prompt token ids; least recently used entries go first past ``max_bytes``."""

    def __init__(self, max_bytes: int, remember: int = 65536) -> None:
        self.max_bytes = int(max_bytes)
        self.remember = remember  # prompts seen once and not stored (their hashes only)
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._entries: OrderedDict[tuple[int, ...], Prefill] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: tuple[int, ...]) -> Prefill | None:
        with self._lock:
            entry = self._entries.get(prompt)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(prompt)
            self.hits += 1
            return entry

    def admit(self, prompt: tuple[int, ...], repeated: bool = False) -> bool:
        """Whether to store ``prompt``'s prefill: yes when it is ``repeated`` in the batch at hand or was
        offered before; else it is remembered (by hash) for next time."""
        key = hash(prompt)
        with self._lock:
            if repeated or key in self._seen:
                self._seen.pop(key, None)
                return True
            self._seen[key] = None
            if len(self._seen) > self.remember:
                self._seen.popitem(last=False)
            return False

    def put(self, prompt: tuple[int, ...], entry: Prefill) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(prompt, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
            self._entries[prompt] = entry
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "mb": round(self._bytes / 2**20, 2),
                    "max_mb": round(self.max_bytes / 2**20, 2), "hits": self.hits, "misses": self.misses}


def split(cache: Any, logits: Tensor, lengths: list[int], rows: list[int] | None = None) -> list[Prefill]:
    """The entries of a left-padded batch's prefill: row ``i`` keeps its last ``lengths[i]`` positions
    (``rows``: only these rows, default all)."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return [Prefill(tuple((k[i, :, -lengths[i]:].clone(), v[i, :, -lengths[i]:].clone()) for k, v in layers),
                    logits[i].clone())
            for i in (rows if rows is not None else range(len(lengths)))]


def assemble(entries: list[Prefill], width: int, reserve: int = 0) -> tuple[Any, Tensor]:
    """A `GrowingCache` (room for ``reserve`` more tokens) for a left-padded batch of ``width`` columns,
    row ``i`` from ``entries[i]``, and the rows' last logits (R, 1, V). Padding columns hold zeros: the
    attention mask hides them."""
    from explab.interventions.kvcache import GrowingCache  # imports transformers

    data = []
    for layer in range(len(entries[0].kv)):
        k0, v0 = entries[0].kv[layer]
        keys = k0.new_zeros((len(entries), k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((len(entries), v0.shape[0], width, v0.shape[2]))
        for i, entry in enumerate(entries):
            k, v = entry.kv[layer]
            keys[i, :, width - k.shape[1]:] = k
            values[i, :, width - v.shape[1]:] = v
        data.append((keys, values))
    logits = torch.stack([e.logits for e in entries])[:, None, :]
    return GrowingCache.filled(data, reserve), logits


__all__ = ["Prefill", "PrefixCache", "assemble", "split"]
