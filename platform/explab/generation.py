"""Generation request and result types, shared by every server backend and `explab.interventions.decode`
(plain data, picklable). Below both, so the interventions layer never imports the servers layer;
`explab.servers` re-exports them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SamplingParams(BaseModel):
    """Decoding settings; the names follow vLLM's ``SamplingParams``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # sample among the k most likely tokens; 0 = no top-k cut
    max_tokens: int = Field(64, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch and vLLM take any 63-bit seed
    stop: list[str] = Field(default_factory=list)
    logprobs: bool = False  # return the logprob of each sampled token


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    """One prompt: chat ``messages`` (rendered with the model's chat template) or a raw ``prompt``.

    ``assistant_prefix`` is text the assistant turn already starts with; generation continues it
    (used to resume a perturbed chain of thought). It is not repeated in the result's text.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    assistant_prefix: str = ""
    params: SamplingParams = Field(default_factory=SamplingParams)
    # HookedModel only: spec objects (explab.interventions) or dicts, kept as plain dicts on the wire;
    # the server's handle validates them where the request is built (see `explab.servers.as_requests`)
    interventions: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("interventions", mode="before")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) or `prompt` (raw text)")
        if self.prompt is not None and self.assistant_prefix:
            raise ValueError("`assistant_prefix` needs chat `messages`; append it to `prompt` instead")
        return self


class Completion(BaseModel):
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: Literal["stop", "length"]


class GenerationResult(BaseModel):
    prompt_token_ids: list[int]
    completions: list[Completion]  # len == params.n
