"""Token-grid features of every probed layer, streamed through Ray Data into the explab cache.

One forward per image through the shared `HookedModel` captures, as spatial grids (H_t, W_t, D):
every chosen vision-encoder layer (``vision.blocks.{i}``, patch tokens, CLS dropped), the adapter
(``projector``) and every chosen LLM layer (``blocks.{i}.resid_post`` at ``Positions(kind="image")``).
The images go through ``Dataset.map_batches`` (a task per batch calling the server), and the driver
writes what comes out, a batch at a time, as safetensors shards (one tensor per point plus the
labels and the squared images), so no more than a shard of features is ever held in memory while extracting.

With bidirectional image attention on, each image also gets a second forward with the
`Bidirectional` mask (a *variant*); both variants' grids come out of the same pass and the same shards.

A cache entry lives under ``cache_dir("seg_probe")`` (``$EXPLAB_CACHE/seg_probe``, else beside the
runs folder), keyed by the model, the data, the layers, the prompt and the variants' interventions;
made by `explab.cache.entry`: renamed into place only when complete, so a crash leaves nothing
half-written and a second run reads it back without touching the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from explab import cache
from explab.errors import ExplabError
from explab.images import to_pil
from explab.interventions import Capture, Positions, points
from jobs.seg_probe.data import to_label

FORMAT = 3  # 2: the squared images beside the labels; 3: variants (causal, bidirectional) in one pass


@dataclass(frozen=True)
class Layer:
    """One probed layer: its stage (encoder, adapter, llm), index inside the stage and hook point."""

    stage: str
    index: int
    point: str

    @property
    def name(self) -> str:
        return self.stage if self.stage == "adapter" else f"{self.stage}.{self.index}"


def layer_list(n_vision: int, n_llm: int, vision: list[int] | None, llm: list[int] | None) -> list[Layer]:
    """The probed layers in the paper's order: encoder -> adapter -> LLM (None: every layer)."""
    out = [Layer("encoder", i, points.vision_block(i)) for i in (range(n_vision) if vision is None else vision)]
    out.append(Layer("adapter", 0, points.PROJECTOR))
    out += [Layer("llm", i, points.resid_post(i)) for i in (range(n_llm) if llm is None else llm)]
    return out


def captures(layers: list[Layer]) -> list[Capture]:
    """A capture per layer, keyed by the layer's name: tower points at every token, LLM points at the image's."""
    return [Capture(point=ly.point, name=ly.name, positions=Positions(kind="image") if ly.stage == "llm" else "all")
            for ly in layers]


def square(image: Any, label: Any, size: int, *, offset: int, ignore_index: int,
           n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the shorter side to ``size`` and centre-crop: image bilinear, labels nearest (kept aligned)."""
    img = to_pil(image).convert("RGB")
    lab = Image.fromarray(to_label(label, offset, ignore_index, n_classes).astype(np.int32))
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img, lab = img.resize((nw, nh), Image.BILINEAR), lab.resize((nw, nh), Image.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    return np.asarray(img.crop(box), dtype=np.uint8), np.asarray(lab.crop(box), dtype=np.int64)


@dataclass(frozen=True)
class Variant:
    """One way to run the model over every image: ``extra`` interventions (plain dicts) and the layers kept.

    Features of variant ``v`` at layer ``l`` are stored under ``"{v}/{l.name}"``; the features of every
    variant come out of the same pass over the data (one forward per image and variant)."""

    name: str
    layers: tuple[Layer, ...]
    extra: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, layers: list[Layer], extra: list[Any] = ()) -> Variant:
        return cls(name, tuple(layers), tuple(s.model_dump(mode="json") if hasattr(s, "model_dump") else s
                                              for s in extra))


def feature_batch(batch: dict[str, np.ndarray], *, hooked: Any, variants: list[Variant], prompt: str,
                  prep: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data batch function: square each image, one grid-capturing forward per image and variant."""
    images, labels, requests = [], [], []
    for image, label in zip(batch[prep["image_column"]], batch[prep["label_column"]], strict=True):
        img, lab = square(image, label, prep["size"], offset=prep["offset"], ignore_index=prep["ignore_index"],
                          n_classes=prep["n_classes"])
        images.append(img)
        labels.append(lab)
        requests += [{"text": prompt, "images": [img], "interventions": [*v.extra, *captures(list(v.layers))],
                      "grids": [ly.name for ly in v.layers]} for v in variants]
    results = hooked.forward(requests)
    out: dict[str, np.ndarray] = {"label": np.stack(labels).astype(np.int16), "image": np.stack(images)}
    dtype = np.float16 if prep["half"] else np.float32
    for vi, v in enumerate(variants):
        mine = results[vi::len(variants)]
        for ly in v.layers:
            grids = []
            for r in mine:
                if len(r.grids[ly.name]) != 1:
                    raise ExplabError(f"{ly.name}: a request with one image gave {len(r.grids[ly.name])} grids: "
                                      "seg_probe supports one grid per image (LLaVA-1.5, InternVL, Qwen-VL)")
                grids.append(r.grids[ly.name][0])
            out[f"{v.name}/{ly.name}"] = np.stack(grids).astype(dtype)
    return out


@dataclass(frozen=True)
class FeatureSet:
    """A finished cache entry: ``meta.json`` and ``shard-*.safetensors``; read one layer at a time."""

    path: Path
    meta: dict[str, Any]
    cached: bool

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    def layer(self, name: str, variant: str = "causal") -> torch.Tensor:
        """(N, H_t, W_t, D) float32 features of one layer under one variant, rows in data order."""
        key = f"{variant}/{name}"
        if key not in self.meta["keys"]:
            raise ExplabError(f"layer {key!r} is not in the feature cache {self.path} (it has "
                              f"{', '.join(self.meta['keys'])}): extract it first")
        return self._read(key).float()

    def labels(self) -> torch.Tensor:
        """(N, S, S) int64 pixel labels, aligned with the images the model saw."""
        return self._read("label").long()

    def images(self, n: int | None = None) -> list[np.ndarray]:
        """The first ``n`` (default: all) images exactly as the model saw them: (S, S, 3) uint8."""
        out: list[np.ndarray] = []
        from safetensors import safe_open

        for shard in self.meta["shards"]:
            if n is not None and len(out) >= n:
                break
            with safe_open(str(self.path / shard), framework="np") as fh:
                out += list(fh.get_tensor("image"))
        return out[:n]

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        parts = []
        for shard in self.meta["shards"]:
            with safe_open(str(self.path / shard), framework="pt") as fh:
                parts.append(fh.get_tensor(key))
        return torch.cat(parts)


def extract(hooked: Any, dataset: Any, variants: list[Variant], *, root: Path, key: dict[str, Any], prompt: str,
            prep: dict[str, Any], batch_size: int, shard_images: int) -> FeatureSet:
    """Features of every row of ``dataset`` (a Ray Dataset) for each variant, cached under ``root``."""
    payload = {"format": FORMAT, **key, "prompt": prompt, "prep": prep,
               "variants": [[v.name, [ly.point for ly in v.layers], list(v.extra)] for v in variants]}

    def build(staging: Path) -> None:
        meta = _write_shards(hooked, dataset, variants, staging, prompt, prep, batch_size, shard_images)
        meta["key"] = payload
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=str))

    done = cache.entry(root / f"{key.get('slug', 'features')}-{cache.digest(payload)[:16]}", build)
    return FeatureSet(done.path, json.loads((done.path / "meta.json").read_text()), cached=done.cached)


def _write_shards(hooked: Any, dataset: Any, variants: list[Variant], folder: Path, prompt: str,
                  prep: dict[str, Any], batch_size: int, shard_images: int) -> dict[str, Any]:
    from safetensors.numpy import save_file

    keys = [f"{v.name}/{ly.name}" for v in variants for ly in v.layers]
    out = dataset.map_batches(feature_batch, batch_size=batch_size, batch_format="numpy",
                              fn_kwargs={"hooked": hooked, "variants": variants, "prompt": prompt, "prep": prep})
    out.context.execution_options.preserve_order = True
    shards: list[str] = []
    shapes: dict[str, list[int]] = {}
    n = 0
    for batch in out.iter_batches(batch_size=shard_images, batch_format="numpy"):
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in batch.items()}, str(folder / name))
        shards.append(name)
        n += len(batch["label"])
        shapes = {k: list(batch[k].shape[1:]) for k in keys}
    if n == 0:
        raise ExplabError("the dataset gave no images: check data spec, split and limit")
    return {"n": n, "keys": keys, "shapes": shapes, "shards": shards}
