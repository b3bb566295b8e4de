"""Dataset specs → Ray Datasets.

- ``hf:<name>[:<config>]`` — a Hugging Face dataset (``split`` kwarg, default ``train``);
- ``parquet:<path>`` / ``jsonl:<path>`` / ``csv:<path>`` — local files or folders;
- ``synthetic:<name>`` — a generator registered with `register_synthetic` (tests and demos).

Model inference over a dataset goes through ``Dataset.map_batches`` on an actor pool, or calls a
shared server from inside the batch function.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def load_dataset(spec: str, *, seed: int = 0, split: str = "train", limit: int | None = None,
                 streaming: bool = False, **kwargs: Any) -> Any:
    """A Ray ``Dataset`` for ``spec`` (see the module docstring)."""
    import ray.data

    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ExplabError(f"dataset spec {spec!r} needs a scheme: hf:<name>, parquet:<path>, jsonl:<path>, "
                          "csv:<path> or synthetic:<name>")
    if scheme == "synthetic":
        ds = ray.data.from_items(synthetic_rows(rest, seed=seed, **kwargs))
    elif scheme in ("parquet", "jsonl", "csv"):
        path = Path(rest).expanduser()
        if not path.exists():
            raise ExplabError(f"dataset path {path} does not exist: check the {scheme}: spec")
        reader = {"parquet": ray.data.read_parquet, "jsonl": ray.data.read_json, "csv": ray.data.read_csv}[scheme]
        ds = reader(str(path))
    elif scheme == "hf":
        import datasets

        name, _, config = rest.partition(":")
        try:
            hf = datasets.load_dataset(name, config or None, split=split, streaming=streaming, **kwargs)
        except Exception as err:  # hub errors come in many types
            raise ExplabError(f"could not load Hugging Face dataset {rest!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): check the name/config/split, "
                              "or use a local parquet: path") from None
        ds = ray.data.from_huggingface(hf)
    else:
        raise ExplabError(f"unknown dataset scheme {scheme!r} in {spec!r}: use hf:, parquet:, jsonl:, csv: or synthetic:")
    return ds.limit(limit) if limit is not None else ds


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
