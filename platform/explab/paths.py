"""Where explab keeps things on disk: the runs folder and the cache beside it.

- runs: ``--runs-dir``, else ``EXPLAB_RUNS_DIR``, else ``./runs``;
- cache (computed once, reused across runs: embeddings, converted models): ``$EXPLAB_CACHE/<name>``
  when ``EXPLAB_CACHE`` is set, else ``<runs-dir>/../cache/<name>`` (``./cache/<name>`` next to
  ``./runs`` by default). On a multi-node cluster point both at shared storage.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUNS_DIR = "runs"


def runs_root(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("EXPLAB_RUNS_DIR", DEFAULT_RUNS_DIR)).expanduser()


def runs_root_of(run_dir: str | Path) -> Path:
    """The runs folder a run directory sits in: ``<runs-dir>/<job>/<run-id>`` → ``<runs-dir>``."""
    return Path(run_dir).parent.parent


def cache_dir(name: str, runs_dir: str | Path | None = None) -> Path:
    """The absolute cache directory for ``name`` (e.g. ``"models"``, ``"embeddings"``); not created here."""
    if os.environ.get("EXPLAB_CACHE"):
        return (Path(os.environ["EXPLAB_CACHE"]).expanduser() / name).resolve()
    return runs_root(runs_dir).resolve().parent / "cache" / name
