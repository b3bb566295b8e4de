"""The trait catalog (``traits/<name>.yaml``) and prompt templates (``prompts.yaml``).

A trait file follows the persona-vectors artifact format: ``instruction`` (pairs of ``pos``/``neg``
system-prompt instructions), ``questions`` (neutral extraction questions) and ``eval_prompt`` (the
judge prompt, with ``{question}`` and ``{answer}``), plus a one-line ``description``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from explab.errors import ConfigError

HERE = Path(__file__).parent
TRAITS_DIR = HERE / "traits"


class Instruction(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pos: str = Field(min_length=1)
    neg: str = Field(min_length=1)


class Trait(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    assistant_name: str | None = None  # the "<name> assistant" of the positive prompt (default: name)
    instruction: list[Instruction] = Field(min_length=1)
    questions: list[str] = Field(min_length=1)
    eval_prompt: str

    @field_validator("eval_prompt")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        if "{question}" not in v or "{answer}" not in v:
            raise ValueError("eval_prompt must contain {question} and {answer}")
        return v


class Prompts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    persona_system: str
    negative_assistant: str
    mmlu_pro: str
    coherence: str


def known_traits() -> list[str]:
    return sorted(p.stem for p in TRAITS_DIR.glob("*.yaml"))


@cache
def load_trait(name: str) -> Trait:
    path = TRAITS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown trait {name!r}: known traits are {', '.join(known_traits())} "
                          f"(add jobs/polylogue/traits/{name}.yaml to define it)")
    try:
        trait = Trait.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0:3]
        raise ConfigError(f"trait file {path} is malformed ({' '.join(first)}): fix it") from None
    if trait.name != name:
        raise ConfigError(f"trait file {path} names itself {trait.name!r}: make `name` match the file name")
    return trait


@cache
def prompts() -> Prompts:
    return Prompts.model_validate(yaml.safe_load((HERE / "prompts.yaml").read_text()))


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def system_prompt(trait: Trait, pair: int, polarity: str) -> str:
    """The persona-vectors system prompt of instruction ``pair`` under ``polarity`` ("pos" | "neg")."""
    p = prompts()
    inst = trait.instruction[pair]
    assistant = (trait.assistant_name or trait.name) if polarity == "pos" else p.negative_assistant
    text = inst.pos if polarity == "pos" else inst.neg
    return p.persona_system.format(article=article(assistant), assistant=assistant, instruction=text)
