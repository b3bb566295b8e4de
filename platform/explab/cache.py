"""Where explab keeps what it computes once and reuses across runs (embeddings, converted models).

``$EXPLAB_CACHE/<name>`` when ``EXPLAB_CACHE`` is set, else ``<runs-dir>/../cache/<name>`` (so
``./cache/<name>`` next to ``./runs`` by default). On a multi-node cluster point ``EXPLAB_CACHE`` at
shared storage.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str, runs_dir: str | Path | None = None) -> Path:
    """The absolute cache directory for ``name`` (e.g. ``"models"``); not created here."""
    if os.environ.get("EXPLAB_CACHE"):
        return (Path(os.environ["EXPLAB_CACHE"]).expanduser() / name).resolve()
    from explab.runs import runs_root

    return runs_root(runs_dir).resolve().parent / "cache" / name
