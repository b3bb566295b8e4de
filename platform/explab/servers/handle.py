"""`ServerHandle`: a picklable client of one shared server (pass it to Ray tasks, Data batches, trials)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from explab.servers.types import ChatMessage, GenerationRequest, SamplingParams


def as_requests(requests: Any, params: SamplingParams | dict | None = None) -> list[GenerationRequest]:
    """Accept requests, dicts, or plain strings (a string is one user message)."""
    if isinstance(requests, (str, dict, GenerationRequest)):
        requests = [requests]
    params = SamplingParams.model_validate(params) if isinstance(params, dict) else params
    out = []
    for item in requests:
        if isinstance(item, str):
            item = GenerationRequest(messages=[ChatMessage(role="user", content=item)],
                                     params=params or SamplingParams())
        elif isinstance(item, dict):
            if params is not None and "params" not in item:
                item = {**item, "params": params}
            item = GenerationRequest.model_validate(item)
        out.append(item)
    return out


@dataclass
class ServerHandle:
    kind: str
    name: str
    actor: Any
    _info: dict[str, Any] | None = field(default=None, repr=False)

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def describe(self, refresh: bool = False) -> dict[str, Any]:
        if self._info is None or refresh:
            self._info = self._get(self.actor.describe.remote())
        return self._info

    def stats(self) -> dict[str, Any]:
        return self._get(self.actor.stats.remote())

    # generation (every kind)
    def generate_async(self, requests: Any, params: SamplingParams | dict | None = None) -> Any:
        """Generator / HookedModel: chat or prompt requests, ``params`` their `SamplingParams`.
        Diffuser: `DiffusionRequest`s, dicts or prompt strings, ``params`` fields they share
        (``{"steps": 28, "guidance": 3.5, "size": [512, 512]}``)."""
        if self.kind == "diffuser":
            from explab.servers.diffuser import as_diffusion_requests

            return self.actor.generate.remote(as_diffusion_requests(requests, params))
        return self.actor.generate.remote(as_requests(requests, params))

    def generate(self, requests: Any, params: SamplingParams | dict | None = None) -> list[Any]:
        return self._get(self.generate_async(requests, params))

    # VAE (Diffuser)
    def encode(self, images: Any, seeds: list[int] | None = None) -> list[Any]:
        """uint8 (H, W, 3) images to the latents the pipeline denoises (``seeds``: sample the posterior)."""
        return self._get(self.actor.encode.remote(list(images), seeds))

    def decode(self, latents: Any, size: tuple[int, int] | None = None) -> list[Any]:
        """Latents (as `generate` captures them) to uint8 (H, W, 3) images of ``size`` (height, width)."""
        return self._get(self.actor.decode.remote(list(latents), size))

    def tokenize(self, prompts: list[str], max_sequence_length: int | None = None) -> list[list[tuple[int, int]]]:
        """Diffuser: each prompt's token character spans (positions as `AttentionRequest.tokens` counts them)."""
        return self._get(self.actor.tokenize.remote(list(prompts), max_sequence_length))

    # hooked forward passes and scoring (HookedModel)
    def forward_async(self, requests: Any) -> Any:
        from explab.servers.hooked import as_forward_requests

        return self.actor.forward.remote(as_forward_requests(requests))

    def forward(self, requests: Any) -> list[Any]:
        return self._get(self.forward_async(requests))

    def score(self, prompt: Any, continuations: list[str]) -> list[list[float]]:
        return self._get(self.actor.score.remote(prompt, list(continuations)))

    def paragraphs(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Paragraph index of every token of generated token sequences (HookedModel)."""
        return self._get(self.actor.paragraphs.remote([[int(t) for t in ids] for ids in token_ids]))
