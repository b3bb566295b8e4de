"""Typed job configs loaded from YAML, with ``--set a.b=value`` overrides.

Every job declares a pydantic ``Config`` (subclass of `JobConfig`) whose defaults are the paper's
settings. `load_config` reads a YAML file, applies overrides, and validates; every failure is a
`ConfigError` with one line naming the field and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from explab.errors import ConfigError

SEED_LIMIT = 2**32
# A seed every RNG a job reaches accepts, with room for derived seeds: numpy's legacy seed and
# Optuna's samplers take [0, 2**32); torch's manual_seed and numpy's default_rng take more.
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="an RNG seed in [0, 2**32)")]


class Section(BaseModel):
    """Base class of nested config sections: unknown keys are errors, as at the top level."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class JobConfig(BaseModel):
    """Base class of job configs: unknown keys are errors, and every config has a seed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    seed: Seed = 0


C = TypeVar("C", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path (-c/--config)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} cannot be decoded): "
                          "give a YAML file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}): check the path and its "
                          "permissions") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} is binary (it holds NUL bytes): give a YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, not a {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML: numbers, bools, lists, null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set model.name=tiny:llama)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` override set (see `set_dotted`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        data = set_dotted(data, ".".join(path), value, what=f"override {item!r}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any, *, what: str | None = None) -> dict[str, Any]:
    """A copy of ``data`` with the field ``a.b.c`` set to ``value``.

    The one dotted-path setter (``--set`` overrides, a sweep base's overrides and its trials' values):
    a missing or null section on the way is made; a section that holds a value (a string, a number,
    a list) is refused with a `ConfigError` rather than replaced, since replacing it would drop the
    value silently. ``what`` names the caller's input in that message (default: the dotted path).
    """
    out = copy.deepcopy(data)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what or repr(dotted)}: {part!r} is a value, not a section (it holds a "
                              f"{type(child).__name__}); set it directly")
        node = child
    node[parts[-1]] = value
    return out


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(cls, data, str(path) if path else "config")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _explain(err: ValidationError, source: str) -> str:
    # a misspelt key also shows up as a missing one: name the misspelling first
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        hint = "remove it or check its spelling"
        msg = "unknown field"
    elif kind == "missing":
        hint = "add it"
        msg = "required field is missing"
    else:
        got = first.get("input")
        hint = f"got {got!r}" if got is not None and not isinstance(got, dict) else "fix its value"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{field}': {msg}: {hint}{more}"

