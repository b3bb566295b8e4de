"""Embedding pipelines: stream images or texts through a frozen encoder, cache the vectors as Parquet.

One call computes (or finds) the embeddings of one column of one dataset under one encoder::

    from explab.embeddings import EncoderSpec, EmbedOptions, embed, load_embeddings

    images = embed("tiny:clip", "hf:cifar100", modality="image", split="test", keep=["fine_label"])
    texts = embed("st:sentence-transformers/all-mpnet-base-v2", ["a photo of a cat", "a dog"])
    V = images.array()                    # (n, d) float32, in dataset order
    labels = images.frame()["fine_label"]  # kept columns ride along
    V2 = load_embeddings(images.path)     # the same, read back from the cache entry

**Encoders** (`EncoderSpec.name`; a plain string is accepted wherever an `EncoderSpec` is):

- ``tiny:clip`` — the offline random open_clip preset (`explab.models.load_model`);
  image tower (``encode_image``) or text tower (``encode_text``) by ``modality``;
- ``open_clip:<arch>/<pretrained>`` — ``open_clip.create_model_and_transforms(arch,
  pretrained=...)``, e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``;
  ``open_clip:hf-hub:<org>/<repo>`` also works;
- ``hf:<id-or-dir>`` — a Hugging Face vision encoder (``AutoModel`` + ``AutoImageProcessor``,
  e.g. ``hf:facebook/dinov2-large``); ``pooling`` = ``cls`` | ``mean`` (patch tokens) |
  ``cls+mean`` (concatenated) | ``pooler``; models with ``get_image_features`` (HF CLIP/SigLIP)
  use it;
- ``st:<id-or-dir>`` — a sentence-transformers text encoder (e.g.
  ``st:sentence-transformers/all-mpnet-base-v2``; ``prompt`` is passed to ``encode``);
- a bare local directory — detected: ``open_clip_config.json`` → open_clip (via `load_model`),
  ``modules.json`` → sentence-transformers, ``config.json`` → HF vision.

Vectors are the encoder's raw outputs as float32 (``normalize: true`` L2-normalises them).

**Data** (``data`` argument): a dataset spec string understood by `explab.data.load_dataset`
(``hf:<name>[:<config>]``, ``parquet:``, ``jsonl:``, ``csv:``, ``synthetic:``) plus
``imagefolder:<dir>`` (images under class sub-folders; a ``label`` column holds the folder name),
or in-memory data: a list of strings (texts), a list of images (PIL images, HWC uint8 arrays,
encoded bytes or file paths), or a pandas DataFrame. Image cells may be PIL images, arrays,
``{"bytes", "path"}`` dicts (Hugging Face ``Image`` features), bytes or paths; a text cell that
holds a list of captions (COCO's five per image) is embedded by its first caption.

**Pipeline**: the rows go through ``Dataset.map_batches`` with a callable class (`EncodeBatch`)
on an actor pool — ``EmbedOptions.concurrency`` actors, each with ``num_gpus`` (a fraction is
fine) and ``num_cpus`` (on explab's embedded Ray the pool must leave a CPU slot to Ray Data's own
tasks, else `embed` refuses it rather than wait forever) — and the driver writes the outputs, in dataset order, as Parquet shards
(``part-00000.parquet`` ...: an ``index`` column, a fixed-size-list ``embedding`` column and the
``keep`` columns) plus ``meta.json``. ``EmbedOptions.engine = "local"`` runs the same class
in-process without Ray (small text lists, debugging).

**Cache**: an entry per (encoder, data, split, column, limit) under `cache_root()` —
``$EXPLAB_CACHE/embeddings`` if ``EXPLAB_CACHE`` is set, else ``<runs-dir>/../cache/embeddings``
(so ``./cache/embeddings`` next to ``./runs`` by default). The entry directory is renamed into
place only when complete, and a file lock makes concurrent callers (sweep trials on one node)
wait for the first one instead of computing again. A second call is a cache hit: nothing is
loaded, no Ray task runs, and ``EmbeddingSet.cached`` is True. Local files (parquet/csv/jsonl,
image folders, and a local encoder directory's weights) are fingerprinted by their sizes and
modification times; ``refresh=True`` recomputes. On a multi-node cluster point ``EXPLAB_CACHE`` at shared storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from explab.config import Section
from explab.errors import ConfigError, ExplabError

FORMAT_VERSION = 1
Modality = Literal["image", "text"]
EncoderKind = Literal["open_clip", "hf_vision", "sentence_transformers"]
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "jpeg", "pixel_values")
TEXT_COLUMNS = ("text", "caption", "sentence", "prompt", "captions", "txt")

__all__ = [
    "EmbedOptions", "EmbeddingSet", "EncodeBatch", "EncoderSpec", "Encoder", "cache_root", "embed",
    "embed_array", "load_embeddings", "load_encoder", "to_pil",
]


# ---------------------------------------------------------------- specs


class EncoderSpec(Section):
    """A frozen encoder (see the module docstring for the name schemes). A bare string is a name."""

    name: str = Field(description="tiny:clip | open_clip:<arch>/<pretrained> | hf:<id> | st:<id> | <dir>")
    pooling: Literal["cls", "mean", "cls+mean", "pooler"] = "cls"  # HF vision encoders only
    normalize: bool = False  # L2-normalise the stored vectors
    prompt: str | None = None  # sentence-transformers: prompt prepended by encode()
    device: str = "auto"  # auto (cuda if the worker has one), cpu, cuda, cuda:1
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # compute dtype; stored as float32
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: dict[str, Any] = Field(default_factory=dict)  # overrides of a tiny: preset

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @classmethod
    def of(cls, value: EncoderSpec | str | dict[str, Any]) -> EncoderSpec:
        return value if isinstance(value, EncoderSpec) else cls.model_validate(value)

    @property
    def kind(self) -> EncoderKind:
        return encoder_kind(self.name)

    @property
    def key(self) -> str:
        payload = self.model_dump(exclude={"device"})  # the device does not change the vectors' meaning
        return _digest(payload)


class EmbedOptions(Section):
    """How the pipeline runs (part of a job's config)."""

    batch_size: int = Field(64, ge=1)  # rows per map_batches call
    concurrency: int = Field(1, ge=1)  # actors in the pool
    num_gpus: float = Field(0.0, ge=0.0)  # GPU (fraction) per actor, e.g. 0.25 puts four on one GPU
    num_cpus: float = Field(1.0, ge=0.0)  # CPU slots per actor
    torch_threads: int | None = None  # intra-op threads inside each actor (default: torch's)
    shard_rows: int = Field(50_000, ge=1)  # rows per Parquet shard
    engine: Literal["ray", "local"] = "ray"  # local: the same batch class in-process, no Ray


def encoder_kind(name: str) -> EncoderKind:
    """Which loader reads ``name`` (raises ConfigError naming the accepted schemes)."""
    if name.startswith("tiny:"):
        if name != "tiny:clip":
            raise ConfigError(f"encoder {name!r}: the only tiny encoder is tiny:clip")
        return "open_clip"
    if name.startswith("open_clip:"):
        return "open_clip"
    if name.startswith("hf:"):
        return "hf_vision"
    if name.startswith("st:"):
        return "sentence_transformers"
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip"
        if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
            return "sentence_transformers"
        if (path / "config.json").is_file():
            return "hf_vision"
        raise ConfigError(f"encoder directory {str(path)!r} has no open_clip_config.json, modules.json or "
                          "config.json: point at a saved open_clip, sentence-transformers or HF model")
    raise ConfigError(f"encoder {name!r} is not recognised: use tiny:clip, open_clip:<arch>/<pretrained>, "
                      "hf:<vision model id>, st:<sentence-transformers id> or an existing model directory")


# ---------------------------------------------------------------- encoders


class Encoder:
    """A loaded frozen encoder: ``encode(items, modality) -> (n, d) float32``.

    ``items`` are strings for ``text`` and PIL images for ``image``. `load_encoder` builds one;
    `EncodeBatch` (the Ray Data callable class) holds one per actor.
    """

    def __init__(self, spec: EncoderSpec):
        import torch

        self.spec = spec
        self.kind = spec.kind
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if spec.device == "auto" else spec.device)
        auto = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = auto if spec.dtype == "auto" else getattr(torch, spec.dtype)
        self.modalities: tuple[str, ...]
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None
        try:
            getattr(self, f"_load_{self.kind}")()
        except ExplabError:
            raise
        except Exception as err:  # hub errors, bad directories, missing weights
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExplabError(f"could not load encoder {spec.name!r} ({type(err).__name__}: {reason}): "
                              "check the name, revision and network/cache, or use a local directory") from None

    # -- loading
    def _load_open_clip(self) -> None:
        name = self.spec.name
        if name.startswith("open_clip:"):
            import open_clip

            arch, _, pretrained = name.removeprefix("open_clip:").partition("/")
            if arch.startswith("hf-hub:"):  # open_clip:hf-hub:org/repo names config and weights at once
                arch, pretrained = name.removeprefix("open_clip:"), ""
            precision = {"float32": "fp32", "float16": "pure_fp16", "bfloat16": "pure_bf16"}[_dtype_name(self.dtype)]
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or None, precision=precision, device=self.device)
            self.model, self.processor = model.eval(), preprocess
            self.tokenizer = open_clip.get_tokenizer(arch)
        else:  # tiny:clip or a local open_clip directory: the platform's one loader
            from explab.models import ModelSpec, load_model

            loaded = load_model(ModelSpec(name=name, kind="clip", device=str(self.device),
                                          dtype=_dtype_name(self.dtype), tiny=self.spec.tiny))
            self.model, self.tokenizer, self.processor = loaded.model, loaded.tokenizer, loaded.processor
        self.modalities = ("image", "text")

    def _load_hf_vision(self) -> None:
        from transformers import AutoImageProcessor, AutoModel

        where = self.spec.name.removeprefix("hf:")
        common = {"revision": self.spec.revision, "trust_remote_code": self.spec.trust_remote_code}
        model = AutoModel.from_pretrained(where, dtype=self.dtype, **common)
        self.model = model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(where, **common)
        self.modalities = ("image",)

    def _load_sentence_transformers(self) -> None:
        from sentence_transformers import SentenceTransformer

        where = self.spec.name.removeprefix("st:")
        self.model = SentenceTransformer(where, device=str(self.device), revision=self.spec.revision,
                                         trust_remote_code=self.spec.trust_remote_code,
                                         model_kwargs={"dtype": self.dtype})
        self.model.eval()
        self.modalities = ("text",)

    # -- encoding
    def encode(self, items: Sequence[Any], modality: Modality) -> np.ndarray:
        import torch

        if modality not in self.modalities:
            raise ExplabError(f"encoder {self.spec.name!r} has no {modality} tower: it encodes "
                              f"{' and '.join(self.modalities)}")
        if len(items) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        with torch.inference_mode():
            out = getattr(self, f"_{self.kind}_{modality}")(list(items))
        out = out.float()
        if self.spec.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def _open_clip_image(self, images: list[Any]) -> Any:
        import torch

        pixels = torch.stack([self.processor(to_pil(im)) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)

    def _open_clip_text(self, texts: list[str]) -> Any:
        tokens = self.tokenizer([str(t) for t in texts]).to(self.device)
        return self.model.encode_text(tokens)

    def _hf_vision_image(self, images: list[Any]) -> Any:
        import torch

        pixels = self.processor(images=[to_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        if hasattr(self.model, "get_image_features"):
            feats = self.model.get_image_features(pixel_values=pixels)
            return feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        if self.spec.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ExplabError(f"encoder {self.spec.name!r} has no pooler output: use pooling cls or mean")
            return out.pooler_output
        cls = hidden[:, 0]
        skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        mean = hidden[:, skip:].mean(dim=1) if hidden.shape[1] > skip else cls
        return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=-1)}[self.spec.pooling]

    def _sentence_transformers_text(self, texts: list[str]) -> Any:
        return self.model.encode([str(t) for t in texts], prompt=self.spec.prompt, batch_size=len(texts),
                                 convert_to_tensor=True, show_progress_bar=False)


def load_encoder(spec: EncoderSpec | str | dict[str, Any]) -> Encoder:
    """Load ``spec`` in this process (the pipeline's actors do the same)."""
    return Encoder(EncoderSpec.of(spec))


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def to_pil(item: Any) -> Any:
    """A PIL RGB image from a PIL image, an HWC/HW array, encoded bytes, a path, or an HF image dict."""
    from PIL import Image

    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(item))).convert("RGB")
    if isinstance(item, (str, Path)):
        return Image.open(item).convert("RGB")
    arr = np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW → HWC
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ExplabError(f"image cell of shape {arr.shape} is not an HW or HWC image")
    return Image.fromarray(arr).convert("RGB")


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


# ---------------------------------------------------------------- the data side


@dataclass
class _Source:
    key: dict[str, Any]  # what identifies the data in the cache key
    slug: str  # readable part of the cache path
    columns: list[str] | None  # known column names (None: ask the dataset)
    build: Any  # () -> ray Dataset
    rows: Any  # () -> list of row dicts (engine=local)


def _resolve_source(data: Any, *, split: str, limit: int | None, seed: int, kwargs: dict[str, Any]) -> _Source:
    import pandas as pd

    if isinstance(data, str):
        scheme, sep, rest = data.partition(":")
        if not sep or not rest:
            raise ExplabError(f"dataset spec {data!r} needs a scheme: hf:, parquet:, jsonl:, csv:, synthetic: "
                              "or imagefolder:")
        if scheme not in ("hf", "parquet", "jsonl", "csv", "synthetic", "imagefolder"):
            raise ExplabError(f"unknown dataset scheme {scheme!r} in {data!r}: use hf:, parquet:, jsonl:, csv:, "
                              "synthetic: or imagefolder:")
        key: dict[str, Any] = {"spec": data, "split": split, "limit": limit, "kwargs": kwargs}
        if scheme == "imagefolder":
            root = Path(rest).expanduser()
            if not root.is_dir():
                raise ExplabError(f"image folder {root} does not exist: check the imagefolder: spec")
            files = _image_files(root)
            if not files:
                raise ExplabError(f"image folder {root} holds no images (png, jpg, jpeg, bmp, gif, tif)")
            key.update(root=str(root.resolve()), fingerprint=_fingerprint(files))
            rows = [{"image": str(f), "label": f.parent.name if f.parent != root else "", "path": str(f)}
                    for f in files][:limit]
            return _Source(key, _slug(root.name), ["image", "label", "path"],
                           lambda: _from_rows(rows), lambda: rows)
        if scheme in ("parquet", "jsonl", "csv"):
            path = Path(rest).expanduser()
            if not path.exists():
                raise ExplabError(f"dataset path {path} does not exist: check the {scheme}: spec")
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            key.update(path=str(path.resolve()), fingerprint=_fingerprint(files))
        if scheme == "synthetic":
            key["seed"] = seed

        def build() -> Any:
            from explab.data import load_dataset

            return load_dataset(data, seed=seed, split=split, limit=limit, **kwargs)

        def rows() -> list[dict[str, Any]]:  # engine=local: the same rows without Ray
            return _local_rows(scheme, rest, split=split, limit=limit, seed=seed, kwargs=kwargs)

        return _Source(key, _slug(rest), None, build, rows)
    if isinstance(data, pd.DataFrame):
        frame = data if limit is None else data.iloc[:limit]
        digest = hashlib.sha1(pd.util.hash_pandas_object(frame.map(_hashable), index=False).values.tobytes())
        key = {"frame": digest.hexdigest(), "columns": list(frame.columns)}
        rows = frame.to_dict("records")
        return _Source(key, "frame", list(frame.columns), lambda: _from_rows(rows), lambda: rows)
    if isinstance(data, np.ndarray) and data.ndim == 4:  # a stack of images
        data = list(data)
    if isinstance(data, (list, tuple)):
        items = list(data)[:limit]
        if not items:
            raise ExplabError("no data to embed: the list is empty")
        column = "text" if all(isinstance(x, str) for x in items) else "image"
        h = hashlib.sha1()
        for x in items:
            h.update(_item_bytes(x))
            h.update(b"\x00")
        rows = [{column: x} for x in items]
        return _Source({"items": h.hexdigest(), "n": len(items), "column": column}, f"{column}s",
                       [column], lambda: _from_rows(rows), lambda: rows)
    raise ExplabError(f"cannot embed data of type {type(data).__name__}: give a dataset spec string, a list of "
                      "texts or images, or a pandas DataFrame")


def _local_rows(scheme: str, rest: str, *, split: str, limit: int | None, seed: int,
                kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    import pandas as pd

    if scheme == "synthetic":
        from explab.data import synthetic_rows

        return synthetic_rows(rest, seed=seed, **kwargs)[:limit]
    if scheme == "hf":
        import datasets

        name, _, config = rest.partition(":")
        try:
            hf = datasets.load_dataset(name, config or None, split=split, **kwargs)
        except Exception as err:  # hub errors come in many types
            raise ExplabError(f"could not load Hugging Face dataset {rest!r} ({type(err).__name__}): check the "
                              "name/config/split, or use a local parquet: path") from None
        if limit is not None:
            hf = hf.select(range(min(limit, len(hf))))
        return list(hf)
    readers = {"parquet": pd.read_parquet, "jsonl": lambda p: pd.read_json(p, lines=True), "csv": pd.read_csv}
    if scheme not in readers:
        raise ExplabError(f"unknown dataset scheme {scheme!r}: use hf:, parquet:, jsonl:, csv:, synthetic: "
                          "or imagefolder:")
    path = Path(rest).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))) \
        if path.is_dir() else [path]
    frame = pd.concat([readers[scheme](f) for f in files], ignore_index=True)
    return frame.iloc[:limit].to_dict("records")


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
        return _fingerprint([x]).encode() + str(x).encode()
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, dict):
        return json.dumps({k: _item_bytes(v).hex() for k, v in sorted(x.items())}).encode()
    arr = np.ascontiguousarray(np.asarray(x))
    return str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes()


def _image_files(root: Path) -> list[Path]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _pick_column(columns: Sequence[str], modality: Modality, column: str | None, what: str) -> str:
    if column is not None:
        if column not in columns:
            raise ExplabError(f"{what} has no column {column!r} (it has {', '.join(columns)}): set column to one of them")
        return column
    candidates = IMAGE_COLUMNS if modality == "image" else TEXT_COLUMNS
    for c in candidates:
        if c in columns:
            return c
    raise ExplabError(f"{what} has no {modality} column among {', '.join(columns)}: pass column=<name>")


# ---------------------------------------------------------------- the cache


def cache_root(runs_dir: str | Path | None = None) -> Path:
    """``$EXPLAB_CACHE/embeddings``, else ``<runs-dir>/../cache/embeddings``."""
    if os.environ.get("EXPLAB_CACHE"):
        return Path(os.environ["EXPLAB_CACHE"]).expanduser() / "embeddings"
    from explab.runs import runs_root

    return runs_root(runs_dir).resolve().parent / "cache" / "embeddings"


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


def load_embeddings(ref: EmbeddingSet | str | Path, *, as_frame: bool = False, columns: Sequence[str] | None = None) -> Any:
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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    source = _resolve_source(data, split=split, limit=limit, seed=seed, kwargs=dataset_kwargs)
    modality = _pick_modality(spec, kind, modality, source, column)
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    key_payload = {"v": FORMAT_VERSION, "encoder": spec.model_dump(exclude={"device"}), "data": source.key,
                   "modality": modality, "column": column, "keep": list(keep), "weights": _weights_key(spec)}
    key = _digest(key_payload)
    entry = root / _slug(spec.name) / source.slug / _slug(split) / f"{modality}-{_slug(column or 'auto')}-{key[:16]}"
    if not refresh and (entry / "meta.json").is_file():
        return _set_from(entry, cached=True)
    with _locked(entry.parent / f".{entry.name}.lock"):
        if not refresh and (entry / "meta.json").is_file():  # another caller finished it meanwhile
            return _set_from(entry, cached=True)
        return _compute(spec, source, modality, column, list(keep), opts, entry, key, key_payload)


def embed_array(encoder: EncoderSpec | str | dict[str, Any], data: Any, **kwargs: Any) -> np.ndarray:
    """``embed(...).array()``: the (n, d) float32 matrix (cached like `embed`)."""
    return embed(encoder, data, **kwargs).array()


def _weights_key(spec: EncoderSpec) -> str | None:
    """A local model directory's fingerprint (its files' sizes and times): new weights, new entry."""
    name = spec.name
    for prefix in ("hf:", "st:"):
        name = name.removeprefix(prefix)
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    return _fingerprint(sorted(p for p in path.rglob("*") if p.is_file()))


def _pick_modality(spec: EncoderSpec, kind: EncoderKind, modality: str | None, source: _Source,
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


def _compute(spec: EncoderSpec, source: _Source, modality: Modality, column: str | None, keep: list[str],
             opts: EmbedOptions, entry: Path, key: str, key_payload: dict[str, Any]) -> EmbeddingSet:
    started = time.time()
    tmp = entry.parent / f".{entry.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
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
        meta = {"key": key, "format": FORMAT_VERSION, "encoder": spec.model_dump(), "modality": modality,
                "column": col, "keep": keep, "data": key_payload["data"], "n": writer.n, "dim": writer.dim,
                "shards": writer.shards, "seconds": round(time.time() - started, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if entry.exists():  # refresh: replace the old entry
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, ExplabError):
            raise
        cause = _user_error(err)
        if cause is not None:
            raise cause from None
        raise
    return _set_from(entry, cached=False)


def _user_error(err: BaseException) -> ExplabError | None:
    """An ExplabError raised inside a Ray actor comes back wrapped: unwrap it."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ExplabError):
            return ExplabError(str(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__
    text = str(err)
    marker = "ExplabError: "
    if marker in text:
        return ExplabError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
    return None


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


def _digest(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return (cleaned or "x")[-60:]
