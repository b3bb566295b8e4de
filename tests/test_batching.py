import asyncio
import threading
import time

import pytest

from explab.servers.batching import DynamicBatcher


def test_concurrent_requests_are_merged_and_answered_in_order():
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        time.sleep(0.02)  # while a batch runs, later requests queue up
        return [x * 10 for x in items]

    async def main():
        batcher = DynamicBatcher(run, max_batch=8, max_wait_ms=20)
        return await asyncio.gather(*(batcher.submit(i) for i in range(20))), batcher

    results, batcher = asyncio.run(main())
    assert results == [i * 10 for i in range(20)]
    assert max(len(c) for c in calls) == 8  # batches fill up to max_batch
    assert len(calls) < 20
    assert sorted(x for c in calls for x in c) == list(range(20))
    assert batcher.stats.requests == 20 and batcher.stats.batches == len(calls)


def test_model_runs_on_one_thread_at_a_time():
    active, peak = [0], [0]
    lock = threading.Lock()

    def run(items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=2, max_wait_ms=0, group_key=lambda x: x % 3)
        return await asyncio.gather(*(batcher.submit(i) for i in range(12)))

    assert asyncio.run(main()) == list(range(12))
    assert peak[0] == 1


def test_group_key_keeps_incompatible_requests_apart():
    calls: list[list[str]] = []

    def run(items):
        calls.append(items)
        return [s.upper() for s in items]

    async def main():
        batcher = DynamicBatcher(run, max_batch=16, max_wait_ms=30, group_key=lambda s: s[0])
        return await asyncio.gather(*(batcher.submit(s) for s in ["a1", "b1", "a2", "b2", "a3"]))

    assert asyncio.run(main()) == ["A1", "B1", "A2", "B2", "A3"]
    assert all(len({s[0] for s in c}) == 1 for c in calls)


def test_a_failing_batch_fails_its_callers_and_the_server_goes_on():
    def run(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=4, max_wait_ms=0)
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit("bad")
        return await batcher.submit("good"), batcher

    result, batcher = asyncio.run(main())
    assert result == "good"
    assert batcher.stats.errors == 1


def test_a_batch_function_raising_stop_iteration_fails_its_callers_and_the_batcher_keeps_serving():
    """A bare ``next()`` running dry inside a batch must reach the callers as an error, not stall them
    (asyncio cannot put StopIteration on a future), and later batches still run."""

    def run(items):
        if items[0] == "bad":
            next(iter([]))
        return [x.upper() for x in items]

    async def main():
        batcher = DynamicBatcher(run, max_batch=1, max_wait_ms=1)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(batcher.submit("bad"), timeout=10)
        return await asyncio.wait_for(batcher.submit("ok"), timeout=10)

    assert asyncio.run(main()) == "OK"
