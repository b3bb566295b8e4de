"""What every server actor shares: loading once, thread settings, batching, stats."""

from __future__ import annotations

import os
import time
from typing import Any

from explab.models.gguf import gguf_record
from explab.models.spec import ModelSpec
from explab.servers.batching import DynamicBatcher
from explab.servers.options import ServerOptions


class ServerBase:
    kind = "server"

    def __init__(self, spec: dict[str, Any], options: dict[str, Any]):
        import torch

        self.spec = ModelSpec.model_validate(spec)
        self.options = ServerOptions.model_validate(options)
        # Ray sets OMP_NUM_THREADS=1 for workers; a model server wants the node's cores.
        threads = self.options.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        from explab import telemetry

        self.backend_name = self._choose_backend()
        self._metrics = telemetry.ServerMetrics(self.kind, self.spec.name, self.backend_name)
        start = time.perf_counter()
        self._load()  # each server kind loads its model and makes its batchers here
        self.load_time_s = time.perf_counter() - start
        self.files = gguf_record(self.spec)  # a GGUF model's file and sha256, for the run manifest
        self.loads = 1
        self._metrics.model_loaded(self.load_time_s)

    def _choose_backend(self) -> str:
        return "torch"

    def _batcher(self, run_batch: Any, group_key: Any = None) -> DynamicBatcher:
        return DynamicBatcher(run_batch, max_batch=self.options.max_batch, max_wait_ms=self.options.max_wait_ms,
                              group_key=group_key, on_batch=self._metrics.batch)

    def _info(self) -> dict[str, Any]:
        return {}

    async def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.spec.name, "backend": self.backend_name,
                "load_time_s": round(self.load_time_s, 3), "pid": os.getpid(),
                **self.files, **self._info()}

    async def stats(self) -> dict[str, Any]:
        batchers = {name: b.stats.as_dict() for name, b in vars(self).items() if isinstance(b, DynamicBatcher)}
        return {**(await self.describe()), "loads": self.loads, "batching": batchers}
