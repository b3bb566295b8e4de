"""Shared servers by name: created on first use, reused by every later caller on the cluster.

A server is a detached Ray actor named ``<kind>:<spec key>`` in the ``explab`` namespace, so a job,
the batches of a Ray Data pipeline and every trial of a sweep that ask for the same model spec all
reach the same actor — the model is loaded once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from explab.errors import ExplabError, ModelError, one_line, root_cause
from explab.models.spec import ModelSpec
from explab.runtime import NAMESPACE
from explab.servers.handle import ServerHandle
from explab.servers.options import ServerOptions

KINDS = ("generator", "hooked", "diffuser")

# private servers (``shared=False``) this process started, so a sweep trial can stop its own
_private: list[Any] = []
_private_lock = threading.Lock()


def server_name(kind: str, spec: ModelSpec) -> str:
    return f"{kind}:{spec.key}"


def _actor_class(kind: str) -> Any:
    if kind == "generator":
        from explab.servers.generator import Generator

        return Generator
    if kind == "hooked":
        from explab.servers.hooked import HookedModel

        return HookedModel
    if kind == "diffuser":
        from explab.servers.diffuser import Diffuser

        return Diffuser
    raise ExplabError(f"unknown server kind {kind!r}: use one of {', '.join(KINDS)}")


def get_server(kind: str, spec: ModelSpec | str | dict, options: ServerOptions | dict | None = None) -> ServerHandle:
    """The shared ``kind`` server for ``spec``; starts it (and Ray) if needed and waits until loaded.

    With ``options.shared=False`` the caller gets a private server instead: its own copy of the
    model in an actor named ``<kind>:<spec key>#<random>``, owned by the caller (not detached), so
    it ends with the caller's process (or at `release_private_servers`).
    """
    return _wait_loaded(_create(kind, spec, options))


def start_servers(requests: Sequence[tuple[str, ModelSpec | str | dict, ServerOptions | dict | None]]
                  ) -> list[ServerHandle]:
    """`get_server` of each ``(kind, spec, options)``, side by side: every actor is created before any
    is waited for, so their processes start and load their models at the same time instead of in turn.
    (A vLLM engine sizes its cache from the GPU memory free when it starts: start those one by one.)"""
    handles = [_create(kind, spec, options) for kind, spec, options in requests]
    return [_wait_loaded(handle) for handle in handles]


def _create(kind: str, spec: ModelSpec | str | dict, options: ServerOptions | dict | None) -> ServerHandle:
    """The server's actor, created (or found, when shared) without waiting for its model."""
    import ray

    from explab import runtime

    spec = ModelSpec.of(spec)
    opts = options if isinstance(options, ServerOptions) else ServerOptions.model_validate(options or {})
    if not ray.is_initialized():
        runtime.init()
    cls = _actor_class(kind)
    name = server_name(kind, spec)
    # "DEFAULT" scheduling: a server started from inside a placement group (a Tune trial, whose
    # child tasks Tune captures) must not be placed in it, or it dies when that trial's group is removed
    placement = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus, "max_concurrency": opts.max_concurrency,
                 "max_restarts": 0, "scheduling_strategy": "DEFAULT"}
    if opts.shared:
        actor = cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                            **placement).remote(spec.model_dump(), opts.model_dump())
    else:
        name = f"{name}#{secrets.token_hex(4)}"
        actor = cls.options(name=name, namespace=NAMESPACE, **placement).remote(spec.model_dump(), opts.model_dump())
        with _private_lock:
            _private.append(actor)
    return ServerHandle(kind=kind, name=name, actor=actor)


def _wait_loaded(handle: ServerHandle) -> ServerHandle:
    """``handle`` once its server has loaded its model; a server that failed to start is one clear error."""
    import ray

    try:
        handle.describe(refresh=True)
    except ray.exceptions.RayActorError as err:
        cause = root_cause(err)
        if isinstance(cause, ExplabError):
            raise type(cause)(str(cause)) from None
        raise ModelError(f"server {handle.name} failed to start: {one_line(err)}") from None
    return handle


def release_private_servers() -> int:
    """Stop the private servers this process started; returns how many."""
    import ray

    with _private_lock:
        actors = list(_private)
        _private.clear()
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
    return len(actors)


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
