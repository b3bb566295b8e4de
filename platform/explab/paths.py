"""Where explab keeps things on disk: the runs folder and the cache beside it.

- runs: ``--runs-dir``, else ``EXPLAB_RUNS_DIR``, else ``./runs``; an object-store URI
  (``s3://bucket/runs``) is worked on through its local mirror (`explab.mirror`);
- cache (computed once, reused across runs: embeddings, converted models): ``$EXPLAB_CACHE/<name>``
  when ``EXPLAB_CACHE`` is set, else ``<runs-dir>/../cache/<name>`` (``./cache/<name>`` next to
  ``./runs`` by default; beside the mirror for a URI runs dir). On a multi-node cluster point both at
  shared storage, or give them as object-store URIs: ``EXPLAB_CACHE=s3://bucket/cache`` is worked on
  through its local mirror like a runs URI, and the cache's users bring an entry down when this node
  lacks it (`explab.mirror.pull_entry`) and upload the entries they write (`explab.mirror.push_entry`).
"""

from __future__ import annotations

import os
from pathlib import Path

from explab import mirror

DEFAULT_RUNS_DIR = "runs"


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The local runs folder: the path given, or for an object-store URI its mirror folder."""
    location = runs_dir or os.environ.get("EXPLAB_RUNS_DIR", DEFAULT_RUNS_DIR)
    if mirror.is_uri(location):
        return mirror.local_for(str(location))
    return Path(location).expanduser()


def readable_root(runs_dir: str | Path | None = None) -> Path:
    """`runs_root`, with a URI's runs brought down into the mirror first (all but their artifacts)."""
    location = runs_dir or os.environ.get("EXPLAB_RUNS_DIR", DEFAULT_RUNS_DIR)
    if mirror.is_uri(location):
        return mirror.sync_down(str(location))
    return runs_root(location)


def runs_root_of(run_dir: str | Path) -> Path:
    """The runs folder a run directory sits in: ``<runs-dir>/<job>/<run-id>`` → ``<runs-dir>``."""
    return Path(run_dir).parent.parent


def cache_dir(name: str, runs_dir: str | Path | None = None) -> Path:
    """The absolute cache directory for ``name`` (e.g. ``"models"``, ``"embeddings"``); not created here.
    For ``EXPLAB_CACHE=s3://…`` the folder is in the URI's mirror (entries there map to the store)."""
    location = os.environ.get("EXPLAB_CACHE")
    if location:
        if mirror.is_uri(location):
            return mirror.local_for(location) / name
        return (Path(location).expanduser() / name).resolve()
    root = runs_root(runs_dir).resolve()
    if mirror.uri_for(root) is not None:  # a URI's mirror: the cache stays on this node, beside the mirror
        return mirror.mirror_root().parent / "cache" / name
    return root.parent / "cache" / name
