"""Runs folders on object storage (``s3://…``, ``gs://…``), through a local mirror.

A cluster without a shared filesystem can give ``--runs-dir`` (or ``EXPLAB_RUNS_DIR``) as an
object-store URI. explab then works on a local mirror of that URI, on every node at the same
place (``$EXPLAB_MIRROR``, else ``~/.cache/explab/mirror``): ``s3://bucket/runs`` is
``<mirror>/s3/bucket/runs``. Everything explab writes through `explab.store` is uploaded as soon
as it is written (a run's manifest, metric parts, tables, plots), a run directory is synced whole
when it is created and when it ends (files written by other means, e.g. Ray Train checkpoints;
files removed locally are removed there), and readers (`explab runs`, `explab show`, a sweep's
report) first bring the URI's small files down into the mirror. So trials on any node write their
run directories to the bucket, and any machine with the credentials reads them back.

Filesystems come from ``pyarrow.fs.FileSystem.from_uri`` (S3, GCS, HDFS, ABFS), configured the
usual way: AWS_* variables (``AWS_ENDPOINT_URL`` for an S3-compatible server), GCS credentials.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
LARGE = ("artifacts",)  # folders of a run that readers do not bring down (checkpoints, weights)


class MirrorError(RuntimeError):
    """An object-store URI that cannot be used (unknown scheme, no credentials, unreachable)."""


def is_uri(location: str | Path | None) -> bool:
    """Whether ``location`` names an object store (``s3://bucket/prefix``), not a local path."""
    if location is None or isinstance(location, Path):
        return False
    return urllib.parse.urlparse(str(location)).scheme in SCHEMES


def mirror_root() -> Path:
    return Path(os.environ.get("EXPLAB_MIRROR") or "~/.cache/explab/mirror").expanduser().resolve()


def local_for(uri: str) -> Path:
    """The mirror folder of ``uri``: ``s3://bucket/a/b`` → ``<mirror>/s3/bucket/a/b``."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in SCHEMES or not parsed.netloc:
        raise MirrorError(f"{uri!r} is not an object-store URI: give s3://BUCKET/PREFIX (or gs://, hdfs://, abfs://)")
    if parsed.query or parsed.params:
        raise MirrorError(f"{uri!r}: options in the URI are not supported; configure the store through its "
                          "environment (e.g. AWS_ENDPOINT_URL, AWS_REGION)")
    parts = [p for p in parsed.path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise MirrorError(f"{uri!r}: '.' and '..' are not allowed in a runs URI")
    return mirror_root().joinpath(parsed.scheme, parsed.netloc, *parts)


def uri_for(path: str | Path) -> str | None:
    """The URI a mirrored local path stands for, or None for a path outside the mirror (or a hidden
    one: ``.x.partial`` folders and temporary files are not uploaded)."""
    try:
        rel = Path(path).resolve().relative_to(mirror_root())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 2 or parts[0] not in SCHEMES or any(p.startswith(".") for p in parts):
        return None
    return f"{parts[0]}://" + "/".join(parts[1:])


@cache
def _filesystem(scheme: str, netloc: str) -> Any:
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types
        raise MirrorError(f"cannot open {scheme}://{netloc}: {str(err).splitlines()[0]}: check the store's "
                          "credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)") from err
    return fs


def _split(uri: str) -> tuple[Any, str]:
    parsed = urllib.parse.urlparse(uri)
    return _filesystem(parsed.scheme, parsed.netloc), f"{parsed.netloc}{parsed.path}".rstrip("/")


def upload(path: str | Path) -> None:
    """Copy one mirrored file to its URI (no-op for paths outside the mirror)."""
    uri = uri_for(path)
    if uri is None or not Path(path).is_file():
        return
    fs, key = _split(uri)
    with fs.open_output_stream(key) as out:
        out.write(Path(path).read_bytes())


def sync_up(folder: str | Path) -> None:
    """Make the URI of a mirrored folder equal the folder: upload every file whose size differs or
    that is missing there, delete what is there but no longer here (no-op outside the mirror)."""
    import pyarrow.fs as pafs

    uri = uri_for(folder)
    if uri is None or not Path(folder).is_dir():
        return
    fs, prefix = _split(uri)
    remote = {info.path[len(prefix) + 1:]: info for info in
              fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
              if info.type == pafs.FileType.File}
    local = {p.relative_to(folder).as_posix(): p for p in Path(folder).rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    for rel, path in local.items():
        if rel not in remote or _newer(path, remote[rel]):
            with fs.open_output_stream(f"{prefix}/{rel}") as out:
                out.write(path.read_bytes())
    for rel in set(remote) - set(local):
        fs.delete_file(f"{prefix}/{rel}")


def _newer(path: Path, info: Any, remote_wins: bool = False) -> bool:
    """Whether the two copies differ so that one must be copied: sizes differ, or the one being
    copied from (local unless ``remote_wins``) was modified after the other."""
    stat = path.stat()
    if stat.st_size != info.size:
        return True
    if info.mtime_ns is None:
        return True
    return info.mtime_ns > stat.st_mtime_ns if remote_wins else stat.st_mtime_ns > info.mtime_ns


def sync_down(uri: str, *, skip: tuple[str, ...] = LARGE) -> Path:
    """Bring ``uri``'s files into its mirror folder (except folders named in ``skip`` and files the
    mirror already has at the same size) and return that folder."""
    import pyarrow.fs as pafs

    local = local_for(uri)
    fs, prefix = _split(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    except OSError as err:
        raise MirrorError(f"cannot list {uri}: {str(err).splitlines()[0]}: check the URI, the store's "
                          "credentials and endpoint") from err
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(prefix) + 1:]
        if any(part in skip for part in rel.split("/")):
            continue
        target = local / rel
        if target.is_file() and not _newer(target, info, remote_wins=True):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            data = src.read()
        tmp = target.with_name(f".{target.name}.download")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return local


def check(uri: str) -> Path:
    """Refuse in one line a URI that cannot be used (bad form, no credentials, unreachable store);
    returns its mirror folder."""
    import pyarrow.fs as pafs

    local = local_for(uri)
    fs, prefix = _split(uri)
    bucket = urllib.parse.urlparse(uri).netloc
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        fs.get_file_info(pafs.FileSelector(prefix, recursive=False, allow_not_found=True))
    except OSError as err:
        raise MirrorError(f"cannot reach {uri}: {str(err).splitlines()[0]}: check the URI, the store's "
                          "credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)") from err
    if not found:
        raise MirrorError(f"{uri}: bucket {bucket!r} does not exist: create it, or give an existing one")
    return local


def sync_down_local(folder: str | Path) -> None:
    """`sync_down` for a mirrored local folder (no-op outside the mirror)."""
    uri = uri_for(folder)
    if uri is not None:
        sync_down(uri)


# ---- cache entries (EXPLAB_CACHE as a URI) ------------------------------------------------------
# A cache entry is a folder completed by a marker file that is written last (``meta.json`` of an
# embedding set), or a single file. On the store the marker is likewise uploaded last, after every
# other file of the entry, and removed first when an entry is replaced: a node that sees the marker
# sees a whole entry, and an upload cut short (a crash, a lost node) leaves an entry no one reads.
# (Readers that started downloading before a concurrent replacement of the same entry may mix two
# versions; entries are keyed by what they hold, so replacing one happens only on a refresh.)


def pull_entry(entry: str | Path, marker: str | None = None) -> bool:
    """Whether the cache entry ``entry`` is complete here, after bringing it down from its URI when
    this node lacks it and the store holds it whole (its ``marker`` there). The download goes to a
    hidden staging folder renamed into place, so a local reader never sees part of it either.
    Outside the mirror: only the local check."""
    entry = Path(entry)
    if (entry / marker).is_file() if marker else entry.is_file():
        return True
    uri = uri_for(entry)
    if uri is None:
        return False
    import pyarrow.fs as pafs

    fs, key = _split(uri)
    try:
        if not marker:
            if fs.get_file_info(key).type != pafs.FileType.File:
                return False
            _download(fs, key, entry)
            return True
        if fs.get_file_info(f"{key}/{marker}").type != pafs.FileType.File:
            return False
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
        staging = entry.parent / f".{entry.name}.pull-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            files = sorted((i.path for i in infos if i.type == pafs.FileType.File),
                           key=lambda p: p == f"{key}/{marker}")  # the marker last
            for path in files:
                _download(fs, path, staging / path[len(key) + 1:])
            if entry.exists():  # an incomplete local copy (no marker): the store's replaces it
                _remove(entry)
            os.replace(staging, entry)
        finally:
            if staging.exists():
                _remove(staging)
    except OSError as err:
        raise MirrorError(f"cannot read the cache entry {uri}: {str(err).splitlines()[0]}: check the store's "
                          "credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)") from err
    return (entry / marker).is_file()


def push_entry(entry: str | Path, marker: str | None = None) -> None:
    """Upload a completed cache entry to its URI (no-op outside the mirror): the marker is removed
    there first, then every other file is uploaded (and files the entry no longer has are deleted),
    and the marker last, so the entry becomes visible to other nodes only whole."""
    entry = Path(entry)
    uri = uri_for(entry)
    if uri is None:
        return
    import pyarrow.fs as pafs

    fs, key = _split(uri)
    try:
        if not marker:
            _upload_file(fs, entry, key)
            return
        if not (entry / marker).is_file():
            raise MirrorError(f"{entry} is not a complete cache entry (no {marker}): finish it before uploading")
        if fs.get_file_info(f"{key}/{marker}").type == pafs.FileType.File:
            fs.delete_file(f"{key}/{marker}")  # replaced: invisible until the new marker is there
        local = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(entry).parts)}
        for rel in sorted(local - {marker}):
            _upload_file(fs, entry / rel, f"{key}/{rel}")
        for info in fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True)):
            rel = info.path[len(key) + 1:]
            if info.type == pafs.FileType.File and rel not in local:
                fs.delete_file(info.path)
        _upload_file(fs, entry / marker, f"{key}/{marker}")
    except OSError as err:
        raise MirrorError(f"cannot upload the cache entry {uri}: {str(err).splitlines()[0]}: check the store's "
                          "credentials and endpoint (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)") from err


def _upload_file(fs: Any, path: Path, key: str) -> None:
    with fs.open_output_stream(key) as out, open(path, "rb") as src:
        for block in iter(lambda: src.read(1 << 24), b""):
            out.write(block)


def _download(fs: Any, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download-{os.getpid()}")
    with fs.open_input_stream(key) as src, open(tmp, "wb") as out:
        while block := src.read(1 << 24):
            out.write(block)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
