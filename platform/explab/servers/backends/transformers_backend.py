"""Generation with transformers models through explab's own decode loop (CPU or GPU)."""

from __future__ import annotations

from explab.errors import ModelError
from explab.models import ModelSpec, load_model
from explab.servers.prompts import encode_request
from explab.servers.types import GenerationRequest, GenerationResult


class TransformersBackend:
    """Batched generation: left padding, KV cache, per-request seeds — see `explab.interventions.decode`."""

    name = "transformers"

    def __init__(self, spec: ModelSpec | str):
        self.loaded = load_model(ModelSpec.of(spec))
        if self.loaded.kind != "causal_lm" or self.loaded.tokenizer is None:
            raise ModelError(f"model {self.loaded.spec.name!r} is a {self.loaded.kind}, not a causal LM: "
                             "the Generator needs a causal language model")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from explab.interventions.decode import decode

        prompts = [encode_request(self.tokenizer, r) for r in requests]
        outputs = decode(self.model, self.tokenizer, prompts, [r.params for r in requests])
        return [GenerationResult(prompt_token_ids=p, completions=o.completions)
                for p, o in zip(prompts, outputs, strict=True)]
