"""A dry check of a job's config without GPUs: what it would start and whether a cluster holds it.

`make_plan` walks a validated job config for the model servers and trainers it names: every
`ServerOptions` (a shared server; paired with the `ModelSpec` beside it in the same section) and
every other ``num_gpus`` field (a training or embedding task). It checks that model ids are
well-formed, sums GPUs (a server used twice — the same spec and options — counts once), estimates
weight memory from the parameter count in a model's name ("32B" → 32e9 × 2 bytes in 16-bit), and
compares the sum with the GPU worker types of a Ray cluster launcher file (`cluster.yaml`).

The sum is the peak if every server and trainer ran at once; a job that runs them in stages (a
wave of models at a time) needs less, which `Plan.notes` says when the job declares it. Fields a
config names but will not use (a generator for a vocabulary read from files) are left out when the
job says so: ``skip`` lists such config paths (see `explab run --dry-run`'s ``dry_plan_skip`` hook).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from explab.errors import ConfigError
from explab.models.encoders import EncoderSpec
from explab.models.spec import ModelSpec
from explab.servers.options import ServerOptions

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)\s*[bB](?![A-Za-z])")
_PREFIXES = ("tiny:", "open_clip:", "hf:", "st:", "gguf:", "registry:")


@dataclass
class Need:
    """One thing the job would start: a server (``model`` set) or a task with GPUs."""

    path: str  # the config field, e.g. models.3.server
    kind: str  # server | task
    gpus: float
    model: str = ""
    memory_gb: float | None = None  # 16-bit weights, from the name's parameter count (None: unknown)


@dataclass
class NodeType:
    name: str
    gpus: float
    max_workers: int


@dataclass
class Plan:
    job: str
    needs: list[Need] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    nodes: list[NodeType] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.needs)

    @property
    def memory_gb(self) -> float:
        return sum(n.memory_gb or 0.0 for n in self.needs)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_model_id(name: str) -> str | None:
    """None when ``name`` is a well-formed model reference, else what is wrong with it."""
    if name.startswith(_PREFIXES):
        rest = name.split(":", 1)[1]
        return None if rest.strip() else f"model {name!r} names no model after its prefix"
    if name.startswith(("/", "./", "../", "~")) or Path(name).suffix == ".gguf":
        return None  # a local path: checked when loaded
    if _HUB_ID.match(name) and "--" not in name and ".." not in name:
        return None
    return f"model id {name!r} is not a Hugging Face id (owner/name), a local path or a tiny: preset"


def memory_gb(name: str) -> float | None:
    """Weights in GB at 2 bytes a parameter, from a size in the name ("Qwen2.5-32B" → 64)."""
    found = _SIZE.findall(name.split("/")[-1])
    return float(found[-1]) * 2.0 if found else None


def _walk(value: Any, path: str, out: list[tuple[str, Any]]) -> None:
    out.append((path, value))
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _walk(getattr(value, name), f"{path}.{name}" if path else name, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, f"{path}.{i}", out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, f"{path}.{key}", out)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def make_plan(job: str, config: BaseModel, cluster: str | Path | None = None,
              skip: Sequence[str] = ()) -> Plan:
    """The dry plan of ``config`` (a validated job config) against ``cluster`` (a cluster.yaml).
    ``skip``: config paths (``concepts.server``; a section skips all below it) that the run will not start."""
    plan = Plan(job)
    nodes: list[tuple[str, Any]] = []
    _walk(config, "", nodes)
    nodes = [(p, v) for p, v in nodes if not any(p == s or p.startswith(f"{s}.") for s in skip)]
    specs = {p: v for p, v in nodes if isinstance(v, ModelSpec)}
    # an encoder's model is named in its own spelling (open_clip:<arch>/<pretrained>, hf:, st:, ...)
    encoders = {p: v for p, v in nodes if isinstance(v, EncoderSpec)}
    for path, spec in specs.items():
        name = encoders[_parent(path)].name if _parent(path) in encoders else spec.name
        if name not in plan.models:
            plan.models.append(name)
        if (problem := check_model_id(name)) is not None:
            plan.problems.append(problem)
    seen: set[tuple[str, str]] = set()
    for path, value in nodes:
        if isinstance(value, ServerOptions):
            siblings = [s for p, s in specs.items() if _parent(p) == _parent(path)]
            model = siblings[0].name if len(siblings) == 1 else ""
            key = (model or path, value.model_dump_json())
            if key in seen:
                continue
            seen.add(key)
            plan.needs.append(Need(path, "server", value.num_gpus, model, memory_gb(model) if model else None))
        elif path.endswith(".num_gpus") and not isinstance(_lookup(nodes, _parent(path)), ServerOptions):
            if isinstance(value, (int, float)) and value > 0:
                plan.needs.append(Need(path, "task", float(value)))
    if cluster is not None:
        plan.nodes = read_cluster(cluster)
        compare(plan)
    return plan


def _lookup(nodes: list[tuple[str, Any]], path: str) -> Any:
    return next((v for p, v in nodes if p == path), None)


def read_cluster(path: str | Path) -> list[NodeType]:
    """The worker types of a Ray cluster launcher file with their GPUs a node and most nodes."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {path} not found: pass --cluster with the cluster.yaml to compare against")
    data = yaml.safe_load(path.read_text()) or {}
    types = data.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"{path} has no available_node_types: it is not a Ray cluster launcher file")
    out = []
    for name, spec in types.items():
        resources = (spec or {}).get("resources") or {}
        out.append(NodeType(name, float(resources.get("GPU", 0)), int((spec or {}).get("max_workers", 0) or 0)))
    return out


def compare(plan: Plan) -> None:
    """Problems when a server needs more GPUs than any node has, or the peak more than the cluster."""
    biggest = max((n.gpus for n in plan.nodes), default=0.0)
    total = sum(n.gpus * n.max_workers for n in plan.nodes)
    for need in plan.needs:
        if need.gpus > biggest:
            plan.problems.append(f"{need.path} needs {need.gpus:g} GPUs on one node; the largest node type has "
                                 f"{biggest:g}")
    if plan.gpus > total:
        plan.notes.append(f"all at once the job would hold {plan.gpus:g} GPUs; the cluster has at most {total:g}")
    fits = [n.name for n in plan.nodes if n.gpus >= plan.gpus]
    plan.notes.append(f"all at once: {plan.gpus:g} GPUs; on one node of: {', '.join(fits) or 'none'}")
