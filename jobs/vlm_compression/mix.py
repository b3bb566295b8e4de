"""The training mix as the paper's models were tuned on it: LLaVA-style conversation JSON (LLaVA mix665k,
Bunny-695k, InternVL's SFT files are all this shape) to rows for `explab.train.supervised_loop`.

A file is a JSON list (or JSON lines) of records::

    {"id": "...", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` (optional; a path relative to ``image_root``) is read into an RGB array; its ``<image>``
placeholder is dropped from the text and the image opens the first user turn (where the servers' chat
rendering puts it). ``human`` / ``gpt`` / ``system`` become user / assistant / system turns. Every assistant
turn is trained on: a record of k answers gives k rows, the conversation up to and including each answer
(`explab.train.objectives.chat_example` trains a row's last turn). Without ``images`` (a text-only backbone)
image records keep their text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ConfigError
from explab.images import to_pil

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = "<image>"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a conversation file: a JSON list, or one JSON object per line (``.jsonl``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"training mix {path} does not exist: set data.train to a LLaVA-style conversation JSON")
    text = path.read_text()
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"training mix {path} is not JSON ({err}): give a list of conversation records") from None
    if not isinstance(records, list):
        raise ConfigError(f"training mix {path} holds a {type(records).__name__}, not a list of records")
    return records


def to_rows(record: dict[str, Any], image_root: Path | None, images: bool = True) -> list[dict[str, Any]]:
    """One record as ``{"messages", "images"}`` rows, one per assistant turn (``images`` only when the record
    has one and ``images``)."""
    turns = record.get("conversations")
    if not turns:
        raise ConfigError(f"record {record.get('id', '?')!r} has no conversations: each record needs "
                          "conversations [{from: human|gpt, value}]")
    has_image = images and record.get("image") is not None
    messages: list[dict[str, Any]] = []
    for turn in turns:
        role = ROLES.get(turn.get("from", ""))
        if role is None:
            raise ConfigError(f"record {record.get('id', '?')!r}: unknown speaker {turn.get('from')!r}: "
                              f"use one of {', '.join(ROLES)}")
        value = str(turn.get("value", ""))
        text = value.replace(IMAGE + "\n", "").replace("\n" + IMAGE, "").replace(IMAGE, "").strip()
        content: Any = text
        if has_image and role == "user" and not any(m["role"] == "user" for m in messages):
            content = [{"type": "image"}, {"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    extra: dict[str, Any] = {}
    if has_image:
        where = Path(record["image"])
        where = where if where.is_absolute() or image_root is None else image_root / where
        if not where.is_file():
            raise ConfigError(f"record {record.get('id', '?')!r}: image {where} does not exist: set data.image_root "
                              "to the folder the mix's image paths are relative to")
        extra["images"] = [np.array(to_pil(where))]
    return [{"messages": messages[: k + 1], **extra} for k, m in enumerate(messages) if m["role"] == "assistant"]


def conversation_rows(path: str | Path, image_root: str | Path | None = None, images: bool = True,
                      limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` records of a LLaVA-style conversation file as training rows (one per answer)."""
    root = Path(image_root).expanduser() if image_root is not None else Path(path).expanduser().parent
    return [row for r in read_records(path)[:limit] for row in to_rows(r, root, images)]
