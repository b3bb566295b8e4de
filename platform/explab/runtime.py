"""Where explab's Ray lives: an embedded local instance by default, or a cluster by address.

- no address (and no ``RAY_ADDRESS``): start an embedded local Ray with the dashboard on
  127.0.0.1, temp and log files under ``EXPLAB_RAY_DIR`` (default ``/tmp/ray-explab``; Ray's
  socket paths must stay short), shut down when the process exits;
- ``address`` / ``RAY_ADDRESS`` (``auto``, ``ray://host:10001``, ``host:6379``): connect to it.

Every explab actor lives in the ``explab`` namespace. The embedded Ray is single-node and listens
on 127.0.0.1 only: its dashboard (``dashboard_host``) and, through `loopback_node`, its GCS, raylet,
agents, metrics export and workers (see README, Cluster). A cluster
address is checked (a TCP connection, `CONNECT_TIMEOUT_S`) before Ray is asked to join it, so an
unreachable one is one line instead of a hang. Once Ray is up, SIGTERM stops a run like Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from explab.errors import ExplabError, Terminated, one_line

NAMESPACE = "explab"
DEFAULT_DASHBOARD_PORT = 8265
LOCALHOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0


@dataclass
class RuntimeInfo:
    address: str
    dashboard_url: str | None
    embedded: bool
    temp_dir: str | None


_started_here = False
_info: RuntimeInfo | None = None

# Environment explab gives the Ray processes it starts (the embedded Ray's, and a submitted job's through its
# runtime env); a value already in the environment wins. Ray Train's controller polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and a worker's `report` waits for that poll (its result
# queue holds one report), so a loop that reports every step could not run faster than a step per poll.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def ray_env() -> dict[str, str]:
    """`RAY_ENV`, with any of its variables already set in this environment taking precedence."""
    return {key: os.environ.get(key, value) for key, value in RAY_ENV.items()}


def ray_dir() -> Path:
    return Path(os.environ.get("EXPLAB_RAY_DIR", "/tmp/ray-explab"))


def init(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True,
         dashboard_port: int | None = None) -> RuntimeInfo:
    """Connect to (or start) Ray once per process and return where it is."""
    global _started_here, _info
    import ray

    if address:
        check_reachable(address)  # even when Ray is up here already: a wrong address is still wrong
    if ray.is_initialized():
        return _info or _describe(ray, embedded=False, temp_dir=None)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        try:
            with loopback_node() if loopback_only(address) else contextlib.nullcontext():
                ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as error:
            raise ExplabError(f"could not join the Ray cluster at {address} ({one_line(error)}): start it "
                              "(`ray start --head`) or fix --address / RAY_ADDRESS") from None
        _quiet_ray_data()
        stop_on_sigterm()
        _info = _describe(ray, embedded=False, temp_dir=None)
        return _info
    temp_dir = ray_dir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(ray_env())  # inherited by every process the embedded Ray starts
    with loopback_node():
        _start_embedded(ray, num_cpus, dashboard, dashboard_port, temp_dir)
    stop_on_sigterm()
    _started_here = True
    atexit.register(shutdown)
    _quiet_ray_data()
    _info = _describe(ray, embedded=True, temp_dir=str(temp_dir))
    return _info


# Ray's switch for "no multi-node cluster on this machine" (its default on macOS and Windows): with it
# off, Ray takes 127.0.0.1 as the node IP, and every process it starts binds there. Ray 2.60 offers no
# other way: `_node_ip_address="127.0.0.1"` is rewritten to the machine's address.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node():
    """While Ray starts an embedded node: its node IP is 127.0.0.1, so the GCS, raylet, dashboard agent,
    runtime-env agent, metrics export and workers listen on loopback only. The switch is Ray's
    environment variable (read by the processes ``ray.init`` starts) and its constant in this process
    (read when the node's address is resolved); both are restored afterwards, so a `ray start` run
    later from this process (a test's cluster head) is not affected."""
    from ray._private import ray_constants

    before_env, before_const = os.environ.get(_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(_CLUSTER_SWITCH, None)
        else:
            os.environ[_CLUSTER_SWITCH] = before_env


def loopback_only(address: str) -> bool:
    """Whether ``address`` is a loopback ``HOST:PORT`` that answers on 127.0.0.1 but not on this machine's
    address: an embedded explab Ray (`loopback_node`) joined from another process. Ray would rewrite the
    loopback host to the machine's address and never reach it, so joining it takes the same switch."""
    import ray.util

    target = host_port(address)
    if target is None or target[0] not in ("127.0.0.1", "localhost", "::1"):
        return False
    machine = ray.util.get_node_ip_address()
    if machine in ("127.0.0.1", "::1"):
        return False
    try:
        with socket.create_connection((machine, target[1]), timeout=1.0):
            return False
    except OSError:
        return True


def _start_embedded(ray, num_cpus: int | None, dashboard: bool, dashboard_port: int | None, temp_dir: Path) -> None:
    ray.init(
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host=LOCALHOST,
        dashboard_port=_free_port(
            dashboard_port or int(os.environ.get("EXPLAB_DASHBOARD_PORT", DEFAULT_DASHBOARD_PORT))),
        _temp_dir=str(temp_dir),
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``scheme://HOST:PORT`` address (brackets of an IPv6 host
    dropped); None when it has no numeric port."""
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rstrip("/").rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isdigit() else None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One line, within ``timeout_s``, when nothing listens at a ``HOST:PORT`` or ``ray://HOST:PORT``
    address (``auto`` is left to Ray, which answers at once when there is no local cluster)."""
    if address == "auto" or address.startswith(("http://", "https://")):
        return
    target = host_port(address)
    if target is None:
        raise ExplabError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto: give the cluster's "
                          "GCS address (HOST:6379) or its Ray Client address (ray://HOST:10001)")
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        raise ExplabError(f"no Ray cluster answers at {address} ({reason} after at most {timeout_s:g} s): start it "
                          "(`ray start --head`), open the tunnel to it, or fix --address / RAY_ADDRESS") from None


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def stop_on_sigterm() -> None:
    """SIGTERM raises `explab.errors.Terminated` (a KeyboardInterrupt) in the main thread, so a run
    ends ``stopped`` as with Ctrl-C (Ray's own handler would exit with a stack dump instead)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens on it (another Ray's dashboard, say), else a free port."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def _quiet_ray_data() -> None:
    """Ray Data's per-dataset INFO lines drown a job's own output; keep warnings and errors."""
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except ImportError:
        return
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _describe(ray, *, embedded: bool, temp_dir: str | None) -> RuntimeInfo:
    context = ray.get_runtime_context()
    url = None
    try:
        url = ray._private.worker.get_dashboard_url() or None  # noqa: SLF001 - no public getter in Ray 2.x
    except Exception:
        url = None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return RuntimeInfo(address=context.gcs_address, dashboard_url=url, embedded=embedded, temp_dir=temp_dir)


def shutdown() -> None:
    """Stop Ray if explab started it here (an embedded instance); leave clusters alone."""
    global _started_here, _info
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
    _info = None


def info() -> RuntimeInfo | None:
    return _info
