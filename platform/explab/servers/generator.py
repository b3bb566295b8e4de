"""`Generator`: one causal LM behind a shared Ray actor, vLLM or transformers backend."""

from __future__ import annotations

from typing import Any

import ray

from explab.errors import ExplabError
from explab.servers.base import ServerBase
from explab.servers.types import GenerationRequest, GenerationResult


def choose_backend(requested: str) -> str:
    """``auto`` → vLLM when it is installed and a GPU is present, else transformers."""
    from explab.servers.backends.vllm_backend import gpu_available, vllm_available

    if requested != "auto":
        return requested
    return "vllm" if vllm_available() and gpu_available() else "transformers"


@ray.remote
class Generator(ServerBase):
    kind = "generator"

    def _choose_backend(self) -> str:
        return choose_backend(self.options.backend)

    def _load(self) -> None:
        if self.backend_name == "vllm":
            from explab.servers.backends.vllm_backend import VLLMBackend

            engine = dict(self.options.engine)
            # a server given a fraction of a GPU takes that fraction of its memory
            share = self.options.num_gpus if 0 < self.options.num_gpus < 1 else 1.0
            memory = engine.pop("gpu_memory_utilization", 0.9 * share)
            self.backend: Any = VLLMBackend(self.spec, gpu_memory_utilization=memory, engine_kwargs=engine)
        else:
            from explab.servers.backends.transformers_backend import TransformersBackend

            self.backend = TransformersBackend(self.spec)
        self.batcher = self._batcher(self._generate_batch)

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results = self.backend.generate(requests)
        self._metrics.tokens(sum(len(c.token_ids) for r in results for c in r.completions))
        return results

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if any(r.images for r in requests):
            raise ExplabError(f"the Generator ({self.backend_name}) takes no `images`: serve the VLM as a "
                              "HookedModel (kind 'hooked') for image-conditioned generation")
        return await self.batcher.submit_many(requests)
