"""Shared model servers (Ray actors): `Generator` (vLLM | transformers) and `HookedModel` (PyTorch + hooks).

Jobs import from here: the handle and options, the request/result types (defined in
`explab.generation`), and the prompt helpers (`as_requests`, `render_prompt`, `encode_request`)
that turn requests into the token ids every backend sees.
"""

import importlib
from typing import Any

from explab.servers.handle import ServerHandle, as_requests
from explab.servers.options import ServerOptions
from explab.servers.prompts import encode_request, render_prompt
from explab.servers.registry import get_server, list_servers, server_name, start_servers, stop_server
from explab.servers.types import ChatMessage, Completion, GenerationRequest, GenerationResult, SamplingParams

__all__ = [
    "AttentionRequest", "ChatMessage", "Completion", "DiffusionRequest", "DiffusionResult", "ForwardRequest",
    "ForwardResult", "GenerationRequest", "GenerationResult", "SamplingParams", "ServerHandle",
    "ServerOptions", "as_requests", "encode_request", "get_server", "list_servers", "render_prompt", "server_name",
    "start_servers", "stop_server",
]

# the server actors' own request/result types, imported on first use: their modules define Ray actors
# (they import ray), which an environment without Ray (the vLLM test venv) must not need for the rest
_ACTOR_TYPES = {"AttentionRequest": "diffuser", "DiffusionRequest": "diffuser", "DiffusionResult": "diffuser",
                "ForwardRequest": "hooked", "ForwardResult": "hooked"}


def __getattr__(name: str) -> Any:
    if name in _ACTOR_TYPES:
        return getattr(importlib.import_module(f"explab.servers.{_ACTOR_TYPES[name]}"), name)
    raise AttributeError(f"module 'explab.servers' has no attribute {name!r}")
