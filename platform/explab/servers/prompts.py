"""Turn a `GenerationRequest` into prompt token ids, the same way for every backend."""

from __future__ import annotations

from typing import Any

from explab.errors import ModelError
from explab.servers.types import GenerationRequest


def render_prompt(tokenizer: Any, request: GenerationRequest) -> str:
    """The prompt text: the raw prompt, or the chat template + generation prompt + assistant prefix."""
    if request.prompt is not None:
        return request.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "this model's tokenizer has no chat template: send a raw `prompt` instead of `messages`, "
            "or use an instruct/chat checkpoint"
        )
    messages = [m.model_dump() for m in request.messages or []]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + request.assistant_prefix


def encode_request(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Prompt token ids. Chat templates carry their own BOS, so specials are only added to raw prompts."""
    text = render_prompt(tokenizer, request)
    add_special = request.prompt is not None
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids:
        raise ModelError("the prompt is empty after tokenization: give a non-empty prompt or messages")
    return list(ids)
