"""Shared model servers (Ray actors): `Generator` (vLLM | transformers) and `HookedModel` (PyTorch + hooks)."""

from explab.servers.handle import ServerHandle
from explab.servers.options import ServerOptions
from explab.servers.registry import get_server, list_servers, server_name, stop_server
from explab.servers.types import ChatMessage, Completion, GenerationRequest, GenerationResult, SamplingParams

__all__ = [
    "ChatMessage", "Completion", "GenerationRequest", "GenerationResult", "SamplingParams", "ServerHandle",
    "ServerOptions", "get_server", "list_servers", "server_name", "stop_server",
]
