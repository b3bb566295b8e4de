"""Decoding settings and sampled completions, shared by `explab.interventions.decode` and every server
backend (plain data, picklable). Below both, so the interventions layer never imports the servers layer;
the requests that carry them (`explab.servers.types`) sit with the servers, and `explab.servers`
re-exports all of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    ignore_eos: bool = False  # keep going past EOS to max_tokens (or a stop string), as vLLM's: fixed-length work


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Completion(BaseModel):
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: Literal["stop", "length"]
