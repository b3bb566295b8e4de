"""The servers' request and result types: defined in `explab.generation` (below the interventions and
servers layers, which both use them), importable from here and from `explab.servers`."""

from explab.generation import ChatMessage, Completion, GenerationRequest, GenerationResult, SamplingParams

__all__ = ["ChatMessage", "Completion", "GenerationRequest", "GenerationResult", "SamplingParams"]
