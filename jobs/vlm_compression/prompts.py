"""Rendering chat turns into what the servers and the pruning gradients take (one rendering for both)."""

from __future__ import annotations

from typing import Any

from explab.errors import ExplabError
from jobs.vlm_compression.data import Item, messages


def render(loaded: Any, turns: list[dict[str, Any]], generation_prompt: bool) -> str:
    """The chat template's text for ``turns`` (the processor's template when the turns hold an image part).

    A template that writes BOS itself loses it here when the tokenizer (or processor) adds BOS again,
    so the server's encoding has exactly one, as `explab.train.objectives.chat_example` does."""
    has_image = any(isinstance(t["content"], list) for t in turns)
    owner = loaded.processor if has_image else loaded.tokenizer
    text = owner.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=False)
    tok = loaded.tokenizer
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]
    return text


def question_text(loaded: Any, item: Item) -> str:
    return render(loaded, messages(item, with_answer=False), generation_prompt=True)


def option_tokens(loaded: Any, options: list[str]) -> list[int]:
    """The first token of each option as the assistant's first word; they must differ."""
    ids = [loaded.tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in options]
    if len(set(ids)) != len(ids):
        raise ExplabError(f"options {options} share their first token: score them by log-likelihood instead")
    return ids
