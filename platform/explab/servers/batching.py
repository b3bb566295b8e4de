"""Dynamic batching: concurrent callers' requests are merged into one batched model call.

A server actor is an asyncio actor; each caller's request becomes an item on a queue. The loop
takes the first waiting item, keeps collecting until ``max_batch`` items or ``max_wait_ms`` have
passed, groups items that can share a forward pass (same ``group_key``), and runs each group on one
worker thread (the model is used by one batch at a time). While a batch runs, new requests queue
up, so under load batches fill without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    errors: int = 0
    items: int = 0
    max_size: int = 0
    queue_wait_s: float = 0.0
    busy_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "errors": self.errors,
            "mean_batch_size": self.items / self.batches if self.batches else 0.0,
            "max_batch_size": self.max_size,
            "mean_queue_wait_ms": 1000 * self.queue_wait_s / max(self.requests, 1),
            "busy_s": round(self.busy_s, 4),
        }


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], *, max_batch: int = 16,
                 max_wait_ms: float = 5.0, group_key: Callable[[Any], Hashable] | None = None,
                 on_batch: Callable[[int, float, float, bool], None] | None = None):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._group_key = group_key or (lambda item: None)
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future, float]] | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explab-model")
        self.stats = BatchStats()

    async def submit(self, item: Any) -> Any:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: list[Any]) -> list[Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.put_nowait((item, future, time.perf_counter()))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[Any, asyncio.Future, float]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[tuple[Any, asyncio.Future, float]]] = {}
            for entry in batch:
                groups.setdefault(self._group_key(entry[0]), []).append(entry)
            for entries in groups.values():
                await self._run(loop, entries)

    async def _run(self, loop: asyncio.AbstractEventLoop, entries: list[tuple[Any, asyncio.Future, float]]) -> None:
        start = time.perf_counter()
        wait = sum(start - queued for _, _, queued in entries)
        items = [item for item, _, _ in entries]
        ok = False
        try:
            results = await loop.run_in_executor(self._executor, _no_stop_iteration, self._run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            ok = True
        except Exception as err:  # deliver the error to every caller of this batch
            for _, future, _ in entries:
                if not future.done():
                    future.set_exception(err)
        finally:
            busy = time.perf_counter() - start
            self.stats.requests += len(entries)
            self.stats.batches += 1
            self.stats.items += len(entries)
            self.stats.max_size = max(self.stats.max_size, len(entries))
            self.stats.queue_wait_s += wait
            self.stats.busy_s += busy
            self.stats.errors += 0 if ok else len(entries)
            if self._on_batch is not None:
                self._on_batch(len(entries), wait / len(entries), busy, ok)
        if ok:
            for (_, future, _), result in zip(entries, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _no_stop_iteration(run_batch: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """``run_batch(items)``, with a stray StopIteration (a bare ``next()`` that ran dry) re-raised as a
    RuntimeError: asyncio cannot set StopIteration on a future, and the batcher's loop would stall
    with every caller of the batch waiting forever."""
    try:
        return run_batch(items)
    except StopIteration as err:
        raise RuntimeError(f"batch function raised StopIteration: {err!r}") from err
