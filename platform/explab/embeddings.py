"""Embedding pipelines: stream images or texts through a frozen encoder, cache the vectors as Parquet.

One call computes (or finds) the embeddings of one column of one dataset under one encoder::

    from explab.embeddings import EncoderSpec, EmbedOptions, embed, load_embeddings

    images = embed("tiny:clip", "hf:cifar100", modality="image", split="test", keep=["fine_label"])
    texts = embed("st:sentence-transformers/all-mpnet-base-v2", ["a photo of a cat", "a dog"])
    V = images.array()                    # (n, d) float32, in dataset order
    labels = images.frame()["fine_label"]  # kept columns ride along
    V2 = load_embeddings(images.path)     # the same, read back from the cache entry

**Encoders**: an `explab.models.EncoderSpec` (a bare string such as ``tiny:clip``,
``open_clip:<arch>/<pretrained>``, ``hf:<id>``, ``st:<id>`` or a model directory is accepted
wherever one is; see `explab.models.encoders`), loaded with `explab.models.load_encoder`.

**Data** (``data`` argument): whatever `explab.data.resolve_source` accepts — a dataset spec
(``hf:``, ``parquet:``, ``jsonl:``, ``csv:``, ``imagefolder:``, ``synthetic:``), a pandas DataFrame,
or a list of texts or images. Image cells may be PIL images, arrays, ``{"bytes", "path"}`` dicts
(Hugging Face ``Image`` features), bytes or paths (`explab.images.to_pil`); a text cell that
holds a list of captions (COCO's five per image) is embedded by its first caption.

**Pipeline**: the rows go through ``Dataset.map_batches`` with a callable class (`EncodeBatch`)
on an actor pool — ``EmbedOptions.concurrency`` actors, each with ``num_gpus`` (a fraction is
fine) and ``num_cpus`` (on explab's embedded Ray the pool must leave a CPU slot to Ray Data's own
tasks, else `embed` refuses it rather than wait forever) — and the driver writes the outputs, in dataset order,
as Parquet shards (``part-00000.parquet`` ...: an ``index`` column, a fixed-size-list ``embedding`` column and the
``keep`` columns) plus ``meta.json``. ``EmbedOptions.engine = "local"`` runs the same class
in-process without Ray (small text lists, debugging).

**Cache**: an entry per (encoder, data, split, column, limit) under `cache_root()` —
``$EXPLAB_CACHE/embeddings`` if ``EXPLAB_CACHE`` is set, else ``<runs-dir>/../cache/embeddings``
(so ``./cache/embeddings`` next to ``./runs`` by default), made by `explab.cache.entry`: renamed
into place only when complete, and concurrent callers (sweep trials on one node) wait for the
first one instead of computing again. A second call is a cache hit: nothing is
loaded, no Ray task runs, and ``EmbeddingSet.cached`` is True. Local files (parquet/csv/jsonl,
image folders, and a local encoder directory's weights) are fingerprinted by their sizes and
modification times; ``refresh=True`` recomputes. On a multi-node cluster point ``EXPLAB_CACHE`` at shared storage,
or at an object store (``s3://bucket/cache``): an entry another node computed is brought down instead of
recomputed, and a new entry is uploaded with its ``meta.json`` last (`explab.cache.entry`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from explab import cache
from explab.config import Section
from explab.data import Source, fingerprint, resolve_source, slug
from explab.errors import ConfigError, ExplabError, user_error
from explab.images import to_pil
from explab.models.encoders import Encoder, EncoderKind, EncoderSpec, Modality, load_encoder
from explab.paths import cache_dir

FORMAT_VERSION = 2  # 2: the encoder is stored as an EncoderSpec holding a ModelSpec
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "jpeg", "pixel_values")
TEXT_COLUMNS = ("text", "caption", "sentence", "prompt", "captions", "txt")

__all__ = [
    "EmbedOptions", "EmbeddingSet", "EncodeBatch", "Encoder", "EncoderSpec", "cache_root", "embed", "embed_array",
    "load_embeddings", "to_pil",
]  # Encoder, EncoderSpec (explab.models) and to_pil (explab.images) are re-exported: what embed works with


# ---------------------------------------------------------------- options


class EmbedOptions(Section):
    """How the pipeline runs (part of a job's config)."""

    batch_size: int = Field(64, ge=1)  # rows per map_batches call
    concurrency: int = Field(1, ge=1)  # actors in the pool
    num_gpus: float = Field(0.0, ge=0.0)  # GPU (fraction) per actor, e.g. 0.25 puts four on one GPU
    num_cpus: float = Field(1.0, ge=0.0)  # CPU slots per actor
    torch_threads: int | None = None  # intra-op threads inside each actor (default: torch's)
    shard_rows: int = Field(50_000, ge=1)  # rows per Parquet shard
    engine: Literal["ray", "local"] = "ray"  # local: the same batch class in-process, no Ray


# ---------------------------------------------------------------- the actor pool's batch class


class EncodeBatch:
    """The Ray Data callable class: loads the encoder once per actor, embeds one column per batch.

    ``batch`` (numpy format) → ``{"embedding": (b, d) float32, <keep columns>}``.
    """

    def __init__(self, spec: dict[str, Any], modality: Modality, column: str, keep: Sequence[str] = (),
                 torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.encoder = load_encoder(spec)
        self.modality, self.column, self.keep = modality, column, tuple(keep)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cells = batch[self.column]
        items = [_text(c) for c in cells] if self.modality == "text" else list(cells)
        out = {"embedding": self.encoder.encode(items, self.modality)}
        out.update({k: np.asarray(batch[k]) for k in self.keep})
        return out


def _text(cell: Any) -> str:
    """A text cell: a string, or the first of a list of captions (e.g. COCO's five per image)."""
    if isinstance(cell, (list, tuple, np.ndarray)) and not isinstance(cell, str):
        if len(cell) == 0:
            return ""
        return str(cell[0])
    return str(cell)


def _pick_column(columns: Sequence[str], modality: Modality, column: str | None, what: str) -> str:
    if column is not None:
        if column not in columns:
            raise ExplabError(f"{what} has no column {column!r} (it has {', '.join(columns)}): "
                              "set column to one of them")
        return column
    candidates = IMAGE_COLUMNS if modality == "image" else TEXT_COLUMNS
    for c in candidates:
        if c in columns:
            return c
    raise ExplabError(f"{what} has no {modality} column among {', '.join(columns)}: pass column=<name>")


# ---------------------------------------------------------------- the cache


def cache_root(runs_dir: str | Path | None = None) -> Path:
    """``$EXPLAB_CACHE/embeddings``, else ``<runs-dir>/../cache/embeddings``."""
    return cache_dir("embeddings", runs_dir)


@dataclass(frozen=True)
class EmbeddingSet:
    """A finished cache entry: ``path`` holds ``meta.json`` and ``part-*.parquet``.

    ``cached`` is True when the entry existed before the call (no encoder was loaded).
    """

    path: Path
    key: str
    cached: bool
    n: int
    dim: int
    encoder: str
    modality: str
    column: str

    def array(self) -> np.ndarray:
        """The (n, dim) float32 matrix, rows in dataset order."""
        return load_embeddings(self.path)

    def frame(self) -> Any:
        """A pandas DataFrame: ``index``, ``embedding`` (one array per row) and the kept columns."""
        return load_embeddings(self.path, as_frame=True)

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())


def load_embeddings(ref: EmbeddingSet | str | Path, *, as_frame: bool = False,
                    columns: Sequence[str] | None = None) -> Any:
    """Read a cache entry back: the (n, d) float32 matrix, or (``as_frame``) a pandas DataFrame.

    ``ref`` is an `EmbeddingSet` or an entry directory (``EmbeddingSet.path``). ``columns``
    restricts the frame's kept columns.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ref.path if isinstance(ref, EmbeddingSet) else Path(ref)
    if not (path / "meta.json").is_file():
        raise ExplabError(f"{path} is not a finished embedding cache entry (no meta.json): compute it with embed()")
    meta = json.loads((path / "meta.json").read_text())
    shards = [path / s for s in meta["shards"]]
    if as_frame:
        read = None if columns is None else ["index", "embedding", *columns]
        tables = [pq.read_table(s, columns=read) for s in shards]
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            import pandas as pd

            return pd.DataFrame(columns=["index", "embedding", *(columns or meta["keep"])])
        frame = table.to_pandas()
        frame["embedding"] = list(_matrix(table.column("embedding"), meta["dim"]))
        return frame
    if not shards:
        return np.zeros((0, meta["dim"]), dtype=np.float32)
    return np.concatenate([_matrix(pq.read_table(s, columns=["embedding"]).column("embedding"), meta["dim"])
                           for s in shards])


def _matrix(column: Any, dim: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


def _set_from(path: Path, cached: bool) -> EmbeddingSet:
    meta = json.loads((path / "meta.json").read_text())
    return EmbeddingSet(path=path, key=meta["key"], cached=cached, n=meta["n"], dim=meta["dim"],
                        encoder=meta["encoder"]["name"], modality=meta["modality"], column=meta["column"])


# ---------------------------------------------------------------- the entry point


def embed(encoder: EncoderSpec | str | dict[str, Any], data: Any, *, modality: Modality | None = None,
          column: str | None = None, split: str = "train", limit: int | None = None, keep: Sequence[str] = (),
          options: EmbedOptions | dict[str, Any] | None = None, cache_dir: str | Path | None = None,
          refresh: bool = False, seed: int = 0, **dataset_kwargs: Any) -> EmbeddingSet:
    """Embed one column of ``data`` with ``encoder`` through a Ray Data actor pool; cached.

    - ``modality``: ``image`` or ``text``; by default the encoder's only one (HF vision → image,
      sentence-transformers → text), else the in-memory data's kind (strings → text), else from
      ``column``'s name. open_clip encoders with a dataset spec need it (or a telling column).
    - ``column``: the column to embed (default: the first of ``image, img, jpg, png`` for images,
      ``text, caption, sentence, prompt`` for texts); ``keep``: columns stored beside the vectors
      (labels, ids).
    - ``split``/``limit``/``seed``/``dataset_kwargs``: passed to `explab.data.load_dataset`.
    - ``cache_dir``: the cache root (default `cache_root()`); ``refresh``: recompute.

    Returns an `EmbeddingSet` (``.array()``, ``.frame()``, ``.path``, ``.cached``). Raises
    `ExplabError` (one line) for a bad spec, column, modality or encoder.
    """
    spec = EncoderSpec.of(encoder)
    kind = spec.kind  # validates the name before anything else
    opts = options if isinstance(options, EmbedOptions) else EmbedOptions.model_validate(options or {})
    source = resolve_source(data, split=split, limit=limit, seed=seed, **dataset_kwargs)
    modality = _pick_modality(spec, kind, modality, source, column)
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    key_payload = {"v": FORMAT_VERSION, "encoder": _meaning(spec), "data": source.key,
                   "modality": modality, "column": column, "keep": list(keep), "weights": _weights_key(spec)}
    key = cache.digest(key_payload)
    entry = root / slug(spec.name) / source.slug / slug(split) / f"{modality}-{slug(column or 'auto')}-{key[:16]}"
    done = cache.entry(entry, lambda staging: _compute(spec, source, modality, column, list(keep), opts, staging,
                                                       key, key_payload), refresh=refresh)
    return _set_from(done.path, cached=done.cached)


def embed_array(encoder: EncoderSpec | str | dict[str, Any], data: Any, **kwargs: Any) -> np.ndarray:
    """``embed(...).array()``: the (n, d) float32 matrix (cached like `embed`)."""
    return embed(encoder, data, **kwargs).array()


def _meaning(spec: EncoderSpec) -> dict[str, Any]:
    """What identifies the vectors an encoder gives (its device does not change their meaning)."""
    return spec.model_dump(exclude={"model": {"device"}})


def _weights_key(spec: EncoderSpec) -> str | None:
    """A local model directory's fingerprint (its files' sizes and times): new weights, new entry."""
    path = Path(spec.model.name).expanduser()
    if not path.is_dir():
        return None
    return fingerprint(sorted(p for p in path.rglob("*") if p.is_file()))


def _pick_modality(spec: EncoderSpec, kind: EncoderKind, modality: str | None, source: Source,
                   column: str | None) -> Modality:
    only = {"hf_vision": "image", "sentence_transformers": "text"}.get(kind)
    if modality is not None:
        if modality not in ("image", "text"):
            raise ExplabError(f"modality {modality!r} is not image or text")
        if only and modality != only:
            raise ExplabError(f"encoder {spec.name!r} encodes {only}s only, not {modality}s: use an open_clip "
                              f"encoder or modality={only!r}")
        return modality  # type: ignore[return-value]
    if only:
        return only  # type: ignore[return-value]
    if "items" in source.key:
        return "text" if source.key["column"] == "text" else "image"
    if column in IMAGE_COLUMNS:
        return "image"
    if column in TEXT_COLUMNS:
        return "text"
    raise ExplabError(f"encoder {spec.name!r} has image and text towers: pass modality='image' or 'text'")


def _compute(spec: EncoderSpec, source: Source, modality: Modality, column: str | None, keep: list[str],
             opts: EmbedOptions, tmp: Path, key: str, key_payload: dict[str, Any]) -> None:
    """Encode ``source`` into the staging directory ``tmp`` (shards, then ``meta.json``)."""
    started = time.time()
    try:
        writer = _ShardWriter(tmp, opts.shard_rows, keep)
        if opts.engine == "local":
            rows = source.rows()
            names = list(rows[0]) if rows else []
            col = _pick_column(names, modality, column, "the data")
            _check_keep(keep, names)
            fn = EncodeBatch(spec.model_dump(), modality, col, keep, opts.torch_threads)
            for i in range(0, len(rows), opts.batch_size):
                chunk = rows[i:i + opts.batch_size]
                batch = {c: _column_array([r[c] for r in chunk]) for c in {col, *keep}}
                writer.add(fn(batch))
        else:
            _ensure_ray()
            _check_pool_fits(opts)
            import ray.data

            ds = source.build()
            names = source.columns or list(ds.columns())
            col = _pick_column(names, modality, column, "the dataset")
            _check_keep(keep, names)
            ds = ds.select_columns(list(dict.fromkeys([col, *keep])))
            out = ds.map_batches(
                EncodeBatch, batch_size=opts.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"spec": spec.model_dump(), "modality": modality, "column": col,
                                       "keep": keep, "torch_threads": opts.torch_threads},
                compute=ray.data.ActorPoolStrategy(size=opts.concurrency),
                num_gpus=opts.num_gpus or None, num_cpus=opts.num_cpus,
            )
            out.context.execution_options.preserve_order = True
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
        writer.close()
        meta = {"key": key, "format": FORMAT_VERSION, "encoder": {"name": spec.name, **spec.model_dump()},
                "modality": modality, "column": col, "keep": keep, "data": key_payload["data"],
                "n": writer.n, "dim": writer.dim,
                "shards": writer.shards, "seconds": round(time.time() - started, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    except Exception as err:
        if isinstance(err, ExplabError):
            raise
        cause = user_error(err)
        if cause is not None:
            raise cause from None
        raise


def _check_keep(keep: Sequence[str], names: Sequence[str]) -> None:
    missing = [k for k in keep if k not in names]
    if missing:
        raise ExplabError(f"keep column(s) {', '.join(missing)} not in the data (it has {', '.join(names)})")


def _column_array(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        from explab import runtime

        runtime.init(dashboard=False)


def _check_pool_fits(opts: EmbedOptions) -> None:
    """On explab's embedded Ray (a fixed size), refuse an actor pool that takes every CPU slot:
    Ray Data then has none left for its own tasks and the pipeline waits forever. (A cluster may
    grow on demand, so there the request is left to Ray's autoscaler.)"""
    import ray

    from explab import runtime

    info = runtime.info()
    if info is None or not info.embedded:
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    wanted = opts.concurrency * opts.num_cpus
    if total and wanted > total - 1:
        raise ConfigError(
            f"the embedding pipeline asks for {opts.concurrency} actor(s) x {opts.num_cpus:g} CPU = {wanted:g} "
            f"of this Ray's {total:g} CPUs, leaving less than one for Ray Data's own tasks: lower "
            "num_cpus or concurrency in the embed options (torch_threads sets an actor's threads)")


class _ShardWriter:
    def __init__(self, folder: Path, shard_rows: int, keep: list[str]):
        self.folder, self.shard_rows, self.keep = folder, shard_rows, keep
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.n = 0
        self.dim = 0
        self.shards: list[str] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        if emb.ndim != 2 or len(emb) == 0:
            return
        self.dim = self.dim or emb.shape[1]
        self.pending.append({"embedding": emb, **{k: np.asarray(batch[k]) for k in self.keep}})
        self.pending_rows += len(emb)
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, rows: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        merged = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        now = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.pending = [rest] if len(rest["embedding"]) else []
        self.pending_rows = len(rest["embedding"])
        emb = now["embedding"]
        columns = {
            "index": pa.array(np.arange(self.n, self.n + len(emb), dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }
        for k in self.keep:
            values = now[k]
            columns[k] = pa.array(values.tolist() if values.dtype == object else values)
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(pa.table(columns), self.folder / name)
        self.shards.append(name)
        self.n += len(emb)
