"""The servers' request and result types (plain data, picklable). Decoding settings and completions
come from `explab.generation` (below the interventions layer, whose decode loop uses them); a request's
interventions are validated with `explab.interventions` where the request is built."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from explab.generation import ChatMessage, Completion, SamplingParams
from explab.interventions.specs import parse_interventions

__all__ = ["ChatMessage", "Completion", "GenerationRequest", "GenerationResult", "SamplingParams"]


class GenerationRequest(BaseModel):
    """One prompt: chat ``messages`` (rendered with the model's chat template) or a raw ``prompt``.

    ``assistant_prefix`` is text the assistant turn already starts with; generation continues it
    (used to resume a perturbed chain of thought). It is not repeated in the result's text.
    ``images`` (HookedModel serving a VLM only; H×W×3 uint8 arrays or PIL images): rendered with the
    prompt through the model's processor, as `ForwardRequest.images` (chat ``messages`` get the images
    at the start of the first user turn; a raw ``prompt`` must hold the model's image token). The
    `Generator` refuses them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    assistant_prefix: str = ""
    params: SamplingParams = Field(default_factory=SamplingParams)
    # HookedModel only: spec objects (explab.interventions) or dicts, validated here (one line on a bad
    # spec) and kept as plain dicts on the wire
    interventions: list[dict[str, Any]] = Field(default_factory=list)
    images: list[Any] | None = None

    @field_validator("interventions", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> list[dict[str, Any]]:
        return [s.model_dump() for s in parse_interventions(value)]

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) or `prompt` (raw text)")
        if self.prompt is not None and self.assistant_prefix:
            raise ValueError("`assistant_prefix` needs chat `messages`; append it to `prompt` instead")
        return self


class GenerationResult(BaseModel):
    prompt_token_ids: list[int]
    completions: list[Completion]  # len == params.n
