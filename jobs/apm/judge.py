"""The principle-wise judge: one request per (response, principle); the score is how strongly the
response shows that one principle (not its overall quality). Prompts: ``prompts/judge.yaml``."""

from __future__ import annotations

import re
from typing import Any

from explab.errors import ConfigError
from explab.seeds import derive_seed
from jobs.apm.benchmark import Principle, read_yaml_file
from jobs.apm.llm import RoleConfig, chat, fill, generate_texts


class JudgePrompts:
    def __init__(self, path: str):
        data = read_yaml_file(path, "judge.prompts")
        try:
            self.system, self.user = str(data.get("system", "")), str(data["user"])
            low, high = data.get("scale", [1, 5])
            self.scale = (int(low), int(high))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"judge.prompts: {path} needs `user` (a template) and `scale: [low, high]`") from None
        if not self.scale[0] < self.scale[1]:
            raise ConfigError(f"judge.prompts: scale {list(self.scale)} must be [low, high] with low < high")
        fill(self.user, "judge.prompts user", principle="p", description="d", prompt="q", response="r", low=1, high=5)


def parse_score(text: str, low: int, high: int) -> int | None:
    """The judge's score: 'Score: N', else the first standalone integer in range; None if neither."""
    m = re.search(r"score\s*[:=]?\s*\**\s*(\d+)", text, re.I)
    candidates = [m.group(1)] if m else re.findall(r"(?<![\d.])(\d+)(?![\d.])", text)
    for c in candidates:
        if low <= int(c) <= high:
            return int(c)
    return None


def judge_responses(judge: Any, role: RoleConfig, prompts: JudgePrompts, items: list[dict[str, Any]],
                    principles: list[tuple[Principle, int]], seed: int) -> list[dict[str, Any]]:
    """Judge every item (dict with ``prompt_text``, ``response`` and keys to keep) on every principle.

    ``principles``: (principle, the user's preference w) pairs. Returns one row per item and
    principle with ``judge`` (the score; the scale's midpoint when unparsable), ``parsed`` and
    ``preference``.
    """
    low, high = prompts.scale
    requests, keys = [], []
    for item in items:
        for principle, w in principles:
            user = fill(prompts.user, "judge.user", principle=principle.name, description=principle.description,
                        prompt=item["prompt_text"], response=item["response"], low=low, high=high)
            params = role.params(derive_seed(seed, "judge", item["prompt_text"], item["response"], principle.name),
                                 max_tokens=role.max_tokens)
            requests.append(chat(user, prompts.system, params))
            keys.append((item, principle, w))
    rows = []
    for (item, principle, w), texts in zip(keys, generate_texts(judge, requests), strict=True):
        score = parse_score(texts[0], low, high)
        rows.append({**{k: v for k, v in item.items() if k not in ("response", "prompt_text")},
                     "principle": principle.name,
                     "preference": int(w), "judge": float(score if score is not None else (low + high) / 2),
                     "parsed": score is not None})
    return rows
