"""`ServerOptions`: how a shared server actor is placed and batches (part of a job's config)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ServerOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Generator only; auto = vllm if installed and a GPU is present
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    num_gpus: float = Field(0.0, ge=0.0)  # GPU fraction for the actor (e.g. 0.5 puts two servers on one GPU)
    num_cpus: float = Field(0.0, ge=0.0)  # CPU slots reserved (0: servers never block tasks and trials)
    torch_threads: int | None = None  # intra-op threads of the model (default: all cores of the node)
    max_batch: int = Field(16, ge=1)  # most requests merged into one batched call
    max_wait_ms: float = Field(5.0, ge=0.0)  # how long the first request waits for company
    max_concurrency: int = Field(256, ge=1)  # concurrent calls the actor accepts
    # HookedModel generation: prompts' prefills kept for later calls (explab.interventions.prefixes); 0: off
    prefix_cache_mb: float = Field(256.0, ge=0.0)
    # vLLM engine kwargs (gpu_memory_utilization, max_model_len, ...)
    engine: dict[str, Any] = Field(default_factory=dict)
    shared: bool = True  # False: a private server for this caller (its own copy, owned by it, not detached)
