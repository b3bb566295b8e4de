"""Shared servers by name: created on first use, reused by every later caller on the cluster.

A server is a detached Ray actor named ``<kind>:<spec key>`` in the ``explab`` namespace, so a job,
the batches of a Ray Data pipeline and every trial of a sweep that ask for the same model spec all
reach the same actor — the model is loaded once.
"""

from __future__ import annotations

import time
from typing import Any

from explab.errors import ExplabError, ModelError
from explab.models.spec import ModelSpec
from explab.runtime import NAMESPACE
from explab.servers.handle import ServerHandle
from explab.servers.options import ServerOptions

KINDS = ("generator", "hooked")


def server_name(kind: str, spec: ModelSpec) -> str:
    return f"{kind}:{spec.key}"


def _actor_class(kind: str) -> Any:
    if kind == "generator":
        from explab.servers.generator import GeneratorServer

        return GeneratorServer
    if kind == "hooked":
        from explab.servers.hooked import HookedServer

        return HookedServer
    raise ExplabError(f"unknown server kind {kind!r}: use one of {', '.join(KINDS)}")


def get_server(kind: str, spec: ModelSpec | str | dict, options: ServerOptions | dict | None = None) -> ServerHandle:
    """The shared ``kind`` server for ``spec``; starts it (and Ray) if needed and waits until loaded."""
    import ray

    from explab import runtime

    spec = ModelSpec.of(spec)
    opts = options if isinstance(options, ServerOptions) else ServerOptions.model_validate(options or {})
    if not ray.is_initialized():
        runtime.init()
    cls = _actor_class(kind)
    name = server_name(kind, spec)
    actor = cls.options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, max_concurrency=opts.max_concurrency,
        max_restarts=0,
    ).remote(spec.model_dump(), opts.model_dump())
    handle = ServerHandle(kind=kind, name=name, actor=actor)
    try:
        handle.describe(refresh=True)
    except ray.exceptions.RayActorError as err:
        cause = _root_cause(err)
        if isinstance(cause, ExplabError):
            raise type(cause)(str(cause)) from None
        raise ModelError(f"server {name} failed to start: {cause}") from None
    return handle


def _root_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None) or err.__cause__
    seen = 0
    while cause is not None and seen < 10:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause, seen = inner, seen + 1
    if cause is None:
        return err
    original = getattr(cause, "as_instanceof_cause", None)
    return original() if original else cause


def list_servers() -> list[dict[str, Any]]:
    """Every explab server on the cluster with its model, backend, load time and batching stats."""
    import ray

    rows = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or entry["name"].split(":", 1)[0] not in KINDS:
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
            info = ray.get(actor.stats.remote(), timeout=30)
        except Exception as err:  # a dead or busy actor is still listed
            info = {"error": f"{type(err).__name__}"}
        rows.append({"name": entry["name"], **info})
    return rows


def stop_server(name: str) -> None:
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ExplabError(f"no explab server named {name!r}: see `explab servers` for the names") from None
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30  # the name is released once the actor is dead
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
