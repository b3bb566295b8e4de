"""The explab cache: entries computed once, then reused by every run on every node that shares it.

An entry is a directory under `explab.paths.cache_dir` (a converted checkpoint, an embedding set, a
job's features), named by what it holds; it is *finished* when its marker file exists. `entry` is
the one way to make one:

- finished already → returned at once (``cached=True``), nothing is computed;
- else, under a lock file beside it (concurrent callers on one machine compute once; the others wait
  and reuse), ``build`` writes into a staging directory, which is renamed into place only once the
  marker is there: a crash or an error leaves no half entry (the staging directory is removed);
- ``refresh`` recomputes and replaces a finished entry;
- with ``EXPLAB_CACHE`` on an object store (``s3://…``, worked on through `explab.mirror`), an entry
  this node lacks is brought down when the store holds it whole (`explab.mirror.pull_entry`), and a
  new one is uploaded with its marker last (`explab.mirror.push_entry`), so no node reads half of one.

`digest` names an entry by what it depends on (a canonical JSON of the payload).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explab import mirror
from explab.errors import ExplabError


@dataclass(frozen=True)
class Entry:
    """A finished cache entry: its directory, and whether it existed before the call."""

    path: Path
    cached: bool


def digest(payload: Any) -> str:
    """The sha1 hex digest of ``payload`` as canonical JSON (keys sorted; other objects as ``str``)."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def finished(path: Path, marker: str = "meta.json") -> bool:
    return (path / marker).is_file()


def entry(path: str | Path, build: Callable[[Path], None], *, marker: str = "meta.json",
          refresh: bool = False) -> Entry:
    """The finished entry at ``path``, built by ``build(staging_dir)`` when missing (or ``refresh``).

    ``build`` must write ``marker`` last; an entry it leaves without one is refused in one line.
    """
    path = Path(path)
    if not refresh and finished(path, marker):
        return Entry(path, cached=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        # another caller finished it meanwhile, or (an object-store cache) another node did
        if not refresh and mirror.pull_entry(path, marker):
            return Entry(path, cached=True)
        staging = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            build(staging)
            if not finished(staging, marker):
                raise ExplabError(f"cache entry {path.name}: the builder wrote no {marker}, so it is not kept")
            if path.exists():  # refresh: the old entry goes once the new one is complete
                shutil.rmtree(path)
            try:
                os.replace(staging, path)
            except OSError:
                if not finished(path, marker):  # not a lost race with another machine on shared storage
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        mirror.push_entry(path, marker)
    return Entry(path, cached=False)
