"""Data: dataset specs → Ray Datasets (or plain rows), and in-memory data as the same kind of source.

- ``hf:<name>[:<config>]`` — a Hugging Face dataset (``split`` kwarg, default ``train``);
- ``disk:<dir>`` — a Hugging Face dataset saved with ``save_to_disk`` (read with
  ``datasets.load_from_disk``; of a ``DatasetDict``, the ``split``);
- ``parquet:<path>`` / ``jsonl:<path>`` / ``csv:<path>`` — local files or folders;
- ``imagefolder:<dir>`` — images under class sub-folders (``image`` = the file path, ``label`` =
  the folder name, ``path``);
- ``synthetic:<name>`` — a generator a job declares (``Job(synthetic={...})``) or a test registers
  with `register_synthetic`.

`load_dataset` gives a Ray ``Dataset``; `read_rows` gives the same rows as a list of dicts without
Ray; `resolve_source` wraps a spec, a pandas DataFrame or a list of texts/images as a `Source`
(both views plus a key that identifies the data, for caches). Model inference over a dataset goes
through ``Dataset.map_batches`` on an actor pool (see `explab.embeddings`), or calls a shared
server from inside the batch function.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ConfigError, ExplabError, user_error

SyntheticFn = Callable[..., list[dict[str, Any]]]
_SYNTHETIC: dict[str, SyntheticFn] = {}


def register_synthetic(name: str, fn: SyntheticFn | None = None) -> Any:
    """Register ``fn(seed=..., **kwargs) -> list[row]`` as ``synthetic:<name>``.

    Jobs declare theirs on their `explab.job.Job` (``synthetic={"name": fn}``), which registers
    them when the job is defined; a test may call this directly, or use it as a decorator
    (``@register_synthetic("name")``). A name is registered once: registering a different
    function under a taken name raises `ConfigError` (the same function again is a no-op, so a
    re-imported module is fine).
    """
    if fn is None:
        def wrap(func: SyntheticFn) -> SyntheticFn:
            register_synthetic(name, func)
            return func

        return wrap
    if not name or ":" in name:
        raise ConfigError(f"synthetic dataset name {name!r} is empty or holds a ':': use a plain name")
    taken = _SYNTHETIC.get(name)
    if taken is not None and _qualname(taken) != _qualname(fn):
        raise ConfigError(f"synthetic dataset {name!r} is already registered by {_qualname(taken)}: "
                          f"give {_qualname(fn)} another name")
    _SYNTHETIC[name] = fn
    return fn


def synthetic_names() -> list[str]:
    """The registered ``synthetic:`` dataset names, sorted."""
    return sorted(_SYNTHETIC)


def synthetic_rows(name: str, *, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """The rows of ``synthetic:<name>`` (raises `ExplabError` listing the known names on a miss)."""
    if name not in _SYNTHETIC:
        known = ", ".join(synthetic_names()) or "none registered"
        raise ExplabError(f"unknown synthetic dataset {name!r}: known are {known} (a job's synthetic datasets "
                          "are registered when its job module is loaded)")
    return _SYNTHETIC[name](seed=seed, **kwargs)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


SCHEMES = ("hf", "disk", "parquet", "jsonl", "csv", "imagefolder", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _split_spec(spec: str) -> tuple[str, str]:
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ExplabError(f"dataset spec {spec!r} needs a scheme: hf:<name>, disk:<dir>, parquet:<path>, "
                          "jsonl:<path>, csv:<path>, imagefolder:<dir> or synthetic:<name>")
    if scheme not in SCHEMES:
        raise ExplabError(f"unknown dataset scheme {scheme!r} in {spec!r}: use hf:, disk:, parquet:, jsonl:, csv:, "
                          "imagefolder: or synthetic:")
    return scheme, rest


def load_dataset(spec: str, *, seed: int = 0, split: str = "train", limit: int | None = None,
                 streaming: bool = False, **kwargs: Any) -> Any:
    """A Ray ``Dataset`` for ``spec`` (see the module docstring)."""
    import ray.data

    scheme, rest = _split_spec(spec)
    if scheme == "synthetic":
        ds = ray.data.from_items(synthetic_rows(rest, seed=seed, **kwargs))
    elif scheme == "imagefolder":
        ds = ray.data.from_items(image_folder_rows(rest))
    elif scheme in ("parquet", "jsonl", "csv"):
        path = _existing(rest, scheme)
        reader = {"parquet": ray.data.read_parquet, "jsonl": ray.data.read_json, "csv": ray.data.read_csv}[scheme]
        ds = reader(str(path))
    elif scheme == "disk":
        ds = ray.data.from_huggingface(_disk_dataset(rest, split=split))
    else:
        ds = ray.data.from_huggingface(_hf_dataset(rest, split=split, streaming=streaming, **kwargs))
    return ds.limit(limit) if limit is not None else ds


def read_rows(spec: str, *, seed: int = 0, split: str = "train", limit: int | None = None,
              **kwargs: Any) -> list[dict[str, Any]]:
    """The rows of ``spec`` as a list of dicts, read in this process without Ray (small data, tests)."""
    import pandas as pd

    scheme, rest = _split_spec(spec)
    if scheme == "synthetic":
        return synthetic_rows(rest, seed=seed, **kwargs)[:limit]
    if scheme == "imagefolder":
        return image_folder_rows(rest)[:limit]
    if scheme in ("hf", "disk"):
        hf = _hf_dataset(rest, split=split, **kwargs) if scheme == "hf" else _disk_dataset(rest, split=split)
        if limit is not None:
            hf = hf.select(range(min(limit, len(hf))))
        return list(hf)
    readers = {"parquet": pd.read_parquet, "jsonl": lambda p: pd.read_json(p, lines=True), "csv": pd.read_csv}
    path = _existing(rest, scheme)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))) \
        if path.is_dir() else [path]
    frame = pd.concat([readers[scheme](f) for f in files], ignore_index=True)
    return frame.iloc[:limit].to_dict("records")


def image_folder_rows(root: str | Path) -> list[dict[str, Any]]:
    """``imagefolder:<root>``: one row per image file (sorted), ``label`` = its sub-folder's name."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ExplabError(f"image folder {folder} does not exist: check the imagefolder: spec")
    files = image_files(folder)
    if not files:
        raise ExplabError(f"image folder {folder} holds no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    return [{"image": str(f), "label": f.parent.name if f.parent != folder else "", "path": str(f)} for f in files]


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_label_names(spec: str, column: str) -> list[str] | None:
    """The names of a Hugging Face dataset's ``ClassLabel`` column, from its builder metadata.

    None when ``spec`` is not ``hf:``, the metadata cannot be read, or the column is not a
    ``ClassLabel`` (callers then fall back to the label values or ask for the names).
    """
    if not spec.startswith("hf:"):
        return None
    import datasets

    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        feature = datasets.load_dataset_builder(name, config or None).info.features[column]
    except Exception:  # noqa: BLE001 - hub errors come in many types; no metadata → no names
        return None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _existing(rest: str, scheme: str) -> Path:
    path = Path(rest).expanduser()
    if not path.exists():
        raise ExplabError(f"dataset path {path} does not exist: check the {scheme}: spec")
    return path


def _hf_dataset(rest: str, *, split: str, **kwargs: Any) -> Any:
    import datasets

    name, _, config = rest.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, **kwargs)
    except Exception as err:  # hub errors come in many types
        raise ExplabError(f"could not load Hugging Face dataset {rest!r} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}): check the name/config/split, "
                          "or use a local parquet: path") from None


def _disk_dataset(rest: str, *, split: str) -> Any:
    """A dataset written by ``save_to_disk``: a ``Dataset``, or the ``split`` of a ``DatasetDict``."""
    import datasets

    path = _existing(rest, "disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ExplabError(f"{path} is not a dataset saved with save_to_disk ({str(err).splitlines()[0]}): "
                          "use parquet: for parquet files") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ExplabError(f"dataset {path} has no split {split!r}: pick one of {', '.join(ds)}")
        ds = ds[split]
    return ds


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    """Data to stream: a Ray view (`build`), a plain view (`rows`) and a `key` that identifies it.

    ``key`` changes when the data does (local files are fingerprinted by size and modification
    time; in-memory data by content), so it can key a cache; ``slug`` is a readable name for it.
    ``columns`` are the column names when known without building the dataset.
    """

    key: dict[str, Any]
    slug: str
    columns: list[str] | None
    build: Callable[[], Any]  # () -> ray Dataset
    rows: Callable[[], list[dict[str, Any]]]  # () -> the same rows, without Ray


def resolve_source(data: Any, *, split: str = "train", limit: int | None = None, seed: int = 0,
                   **kwargs: Any) -> Source:
    """A `Source` for a dataset spec string, a pandas DataFrame, or a list of texts or images.

    A list of strings becomes a ``text`` column, any other list (PIL images, HWC arrays, bytes,
    paths) an ``image`` column; a 4-d array is a stack of images.
    """
    import pandas as pd

    if isinstance(data, str):
        scheme, rest = _split_spec(data)
        key: dict[str, Any] = {"spec": data, "split": split, "limit": limit, "kwargs": kwargs}
        if scheme == "imagefolder":
            rows = image_folder_rows(rest)[:limit]
            root = Path(rest).expanduser()
            key.update(root=str(root.resolve()), fingerprint=fingerprint(image_files(root)))
            return Source(key, slug(root.name), ["image", "label", "path"], lambda: _from_rows(rows), lambda: rows)
        if scheme in ("parquet", "jsonl", "csv", "disk"):
            path = _existing(rest, scheme)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            key.update(path=str(path.resolve()), fingerprint=fingerprint(files))
        if scheme == "synthetic":
            key["seed"] = seed
        return Source(key, slug(rest), None,
                      lambda: load_dataset(data, seed=seed, split=split, limit=limit, **kwargs),
                      lambda: read_rows(data, seed=seed, split=split, limit=limit, **kwargs))
    if isinstance(data, pd.DataFrame):
        frame = data if limit is None else data.iloc[:limit]
        digest = hashlib.sha1(pd.util.hash_pandas_object(frame.map(_hashable), index=False).values.tobytes())
        key = {"frame": digest.hexdigest(), "columns": list(frame.columns)}
        rows = frame.to_dict("records")
        return Source(key, "frame", list(frame.columns), lambda: _from_rows(rows), lambda: rows)
    if isinstance(data, np.ndarray) and data.ndim == 4:  # a stack of images
        data = list(data)
    if isinstance(data, (list, tuple)):
        items = list(data)[:limit]
        if not items:
            raise ExplabError("no data: the list is empty")
        column = "text" if all(isinstance(x, str) for x in items) else "image"
        h = hashlib.sha1()
        for x in items:
            h.update(_item_bytes(x))
            h.update(b"\x00")
        rows = [{column: x} for x in items]
        return Source({"items": h.hexdigest(), "n": len(items), "column": column}, f"{column}s",
                      [column], lambda: _from_rows(rows), lambda: rows)
    raise ExplabError(f"cannot read data of type {type(data).__name__}: give a dataset spec string, a list of "
                      "texts or images, or a pandas DataFrame")


def fingerprint(files: list[Path]) -> str:
    """A digest of the files' paths, sizes and modification times (new contents → new digest)."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _from_rows(rows: list[dict[str, Any]]) -> Any:
    import ray.data

    return ray.data.from_items([{k: _ray_cell(v) for k, v in r.items()} for r in rows])


def _ray_cell(value: Any) -> Any:
    from PIL import Image

    return np.asarray(value.convert("RGB")) if isinstance(value, Image.Image) else value


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else _item_bytes(value).hex()


def _item_bytes(x: Any) -> bytes:
    from PIL import Image

    if isinstance(x, str):
        return x.encode()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, Path):
        return fingerprint([x]).encode() + str(x).encode()
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, dict):
        return json.dumps({k: _item_bytes(v).hex() for k, v in sorted(x.items())}).encode()
    arr = np.ascontiguousarray(np.asarray(x))
    return str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()


def slug(text: str) -> str:
    """``text`` as a readable file-name part (letters, digits, ``-_.``; at most its last 60 characters)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return (cleaned or "x")[-60:]


def plain_frame(frame: Any) -> Any:
    """A pandas frame from Ray Data with its Arrow-backed columns made plain pandas ones.

    List columns become object columns of Python lists (so the Parquet reads back anywhere);
    other Arrow columns become numpy-backed ones (nulls as NaN/None). Other columns are kept.
    """
    import pandas as pd
    import pyarrow as pa

    cols = {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.ArrowDtype):
            arr = col.array if isinstance(col.array, pa.ChunkedArray) else pa.chunked_array([pa.array(col.array)])
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                col = pd.Series(arr.to_pylist(), index=frame.index, dtype=object)
            else:
                col = pd.Series(arr.to_pandas(), index=frame.index)
        cols[name] = col
    return pd.DataFrame(cols, index=frame.index)


def collect(ds: Any) -> Any:
    """Run a Ray Data pipeline to a `plain_frame`; an `ExplabError` raised inside it comes back as itself."""
    try:
        return plain_frame(ds.to_pandas())
    except Exception as err:
        cause = user_error(err)
        if cause is not None:
            raise cause from None
        raise
