"""Prompt files (YAML in ``prompts/``): instructions of the intervention LLM and the judge, unrelated topics."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explab.config import read_yaml
from explab.errors import ConfigError

PACKAGED = Path(__file__).parent / "prompts"
FILES = ("interventions.yaml", "judge.yaml", "topics.yaml")


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def messages(self, **values: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": render(self.user, **values)}]


@dataclass(frozen=True)
class Prompts:
    interventions: dict[str, Prompt]
    answer: Prompt
    doubt: Prompt
    topics: tuple[str, ...]


def render(template: str, **values: str) -> str:
    """``template`` with ``{name}`` fields filled; a field it names but is not given is a ConfigError."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    missing = sorted(fields - set(values))
    if missing:
        raise ConfigError(f"prompt template names {{{missing[0]}}}, which is not one of "
                          f"{', '.join('{' + v + '}' for v in sorted(values))}: fix the prompt file")
    return template.format(**{k: v for k, v in values.items() if k in fields})


def _prompt(data: Any, where: str) -> Prompt:
    if not isinstance(data, dict) or not isinstance(data.get("system"), str) or not isinstance(data.get("user"), str):
        raise ConfigError(f"prompt {where} needs a `system` and a `user` text: fix the prompt file")
    return Prompt(data["system"].strip(), data["user"])


def load_prompts(folder: str | Path | None = None, needed: tuple[str, ...] = ()) -> Prompts:
    """The prompts in ``folder`` (default: the packaged ones); ``needed`` LLM interventions must have one."""
    folder = Path(folder) if folder else PACKAGED
    for name in FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"prompt folder {folder} has no {name}: "
                              f"set prompts_dir to a folder with {', '.join(FILES)}")
    inter = read_yaml(folder / "interventions.yaml")
    prompts = {k: _prompt(v, f"interventions.yaml:{k}") for k, v in inter.items() if v is not None}
    for name in needed:
        if name not in prompts:
            raise ConfigError(f"{folder / 'interventions.yaml'} has no prompt for intervention {name!r}: add one")
    judge = read_yaml(folder / "judge.yaml")
    topics = _topics(folder / "topics.yaml")
    return Prompts(prompts, _prompt(judge.get("answer"), "judge.yaml:answer"),
                   _prompt(judge.get("doubt"), "judge.yaml:doubt"), topics)


def _topics(path: Path) -> tuple[str, ...]:
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, list) or not data or not all(isinstance(t, str) and t.strip() for t in data):
        raise ConfigError(f"{path} must be a non-empty YAML list of topics")
    return tuple(t.strip() for t in data)
