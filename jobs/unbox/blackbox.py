"""The black box: an image classifier seen only through its class probabilities.

`BlackBox` wraps a classifier (any callable from a float image batch to logits) and hands out one
thing: ``predict_proba(images)``, a detached float64 numpy array of class probabilities, computed
under ``torch.no_grad``. It keeps no attribute that reaches the model; asking it for logits,
gradients, weights or the model raises `ExplabError`, and so does an input tensor that requires
grad. Every classified image is one query, counted per purpose (search, slices, fidelity, ...).

`build_blackbox` makes one from a `ClassifierConfig`:

- ``planted``: `PlantedClassifier`, a classifier with a planted rule over colour regions (the
  tiny config and the tests: the search has a known answer to find);
- ``torchvision``: ``torchvision.models.get_model(name, weights=...)`` with the weights' own
  transforms and categories (ImageNet ResNet-50), or a fine-tuned checkpoint (``checkpoint``, a
  state dict with ``len(classes)`` outputs, e.g. an ERM ResNet-50 on Waterbirds or CelebA);
- ``open_clip``: a CLIP zero-shot classifier through `explab.models.encoders` (image features
  against the class prompts' text features; logits = ``logit_scale`` · cosine).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from explab.config import Section
from explab.errors import ConfigError, ExplabError

REGIONS = ("background", "center")
COLOURS = {"red": 0, "green": 1, "blue": 2}


class PlantedRule(Section):
    """``weight`` · (fraction of ``region`` pixels whose dominant channel is ``colour``) adds to ``cls``'s logit."""

    cls: str
    colour: Literal["red", "green", "blue"]
    region: Literal["background", "center"] = "background"
    weight: float


class ClassifierConfig(Section):
    kind: Literal["planted", "torchvision", "open_clip"] = "torchvision"
    name: str = "resnet50"  # torchvision: architecture; open_clip: an encoder spec (tiny:clip, open_clip:ViT-B-32/...)
    weights: str | None = "IMAGENET1K_V2"  # torchvision weights enum member (None with a checkpoint)
    checkpoint: str | None = None  # torchvision: a fine-tuned state dict (.pt/.pth or .safetensors)
    classes: list[str] | None = None  # class names in output order (torchvision weights and planted: their own)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."])  # open_clip class prompts
    logit_scale: float = Field(100.0, gt=0.0)  # open_clip: CLIP's temperature
    image_size: int = Field(224, ge=8)  # checkpoint and open_clip-free resizing (weights bring their own)
    rules: list[PlantedRule] = Field(default_factory=list)  # planted
    bias: dict[str, float] = Field(default_factory=dict)  # planted: per-class logit offsets
    margin: float = Field(0.15, ge=0.0, lt=1.0)  # planted: how far a channel must exceed the others to dominate
    device: str = "auto"
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        if self.kind == "planted":
            if not self.classes or len(self.classes) < 2:
                raise ConfigError("classifier.classes: a planted classifier needs at least 2 class names")
            if not self.rules:
                raise ConfigError("classifier.rules: a planted classifier needs at least one rule "
                                  "(cls, colour, region, weight)")
            unknown = sorted(({r.cls for r in self.rules} | set(self.bias)) - set(self.classes))
            if unknown:
                raise ConfigError(f"classifier.rules/bias name classes {unknown} that are not in classifier.classes")
        if self.kind == "torchvision" and self.checkpoint and not self.classes:
            raise ConfigError("classifier.classes: a torchvision checkpoint needs its class names (in output order)")
        if self.kind == "open_clip" and not self.classes:
            raise ConfigError("classifier.classes: an open_clip zero-shot classifier needs the class names")
        return self


class BlackBox:
    """Class probabilities for a batch of images, and nothing else (see the module docstring)."""

    __slots__ = ("_predict", "_classes", "_counts", "_lock", "_batch")
    _ALLOWED = frozenset({"predict_proba", "classes", "queries", "query_counts", "class_index"})

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], classes: Sequence[str],
                 transform: Callable[[list[np.ndarray]], torch.Tensor], batch_size: int = 32):
        def probabilities(images: list[np.ndarray]) -> np.ndarray:
            with torch.no_grad():
                logits = predict(transform(images))
                return torch.softmax(logits.float(), dim=-1).detach().cpu().double().numpy()

        object.__setattr__(self, "_predict", probabilities)
        object.__setattr__(self, "_classes", tuple(classes))
        object.__setattr__(self, "_counts", Counter())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_batch", batch_size)

    def __getattr__(self, name: str) -> Any:
        raise ExplabError(f"the black box has no {name!r}: it exposes only predict_proba (class probabilities), "
                          "classes and query counts; no logits, gradients, weights or model")

    def __setattr__(self, name: str, value: Any) -> None:
        raise ExplabError(f"the black box is read-only: cannot set {name!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    def class_index(self, name: str) -> int:
        if name not in self._classes:
            shown = ", ".join(self._classes[:10]) + (" ..." if len(self._classes) > 10 else "")
            raise ConfigError(f"class {name!r} is not one of the classifier's classes ({shown}): fix `classes`")
        return self._classes.index(name)

    @property
    def queries(self) -> int:
        """Images classified so far, over every purpose."""
        with self._lock:
            return sum(self._counts.values())

    def query_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def predict_proba(self, images: Sequence[Any], purpose: str = "search") -> np.ndarray:
        """(n, classes) probabilities of uint8 (H, W, 3) images (arrays or PIL images); counts n queries."""
        if isinstance(images, torch.Tensor) or any(isinstance(x, torch.Tensor) for x in images):
            raise ExplabError("the black box takes images as uint8 arrays or PIL images, not tensors: "
                              "it gives no gradients, so pass pixels (e.g. tensor.detach().numpy())")
        arrays = [np.asarray(x.convert("RGB") if hasattr(x, "convert") else x) for x in images]
        for a in arrays:
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ExplabError(f"an image of shape {a.shape}: give (H, W, 3) uint8 RGB images")
        out = [self._predict(arrays[i:i + self._batch]) for i in range(0, len(arrays), self._batch)]
        with self._lock:
            self._counts[purpose] += len(arrays)
        return np.concatenate(out) if out else np.zeros((0, len(self._classes)))


# ---------------------------------------------------------------- the planted classifier
class PlantedClassifier(nn.Module):
    """Logits from colour regions: logit[c] = bias[c] + Σ_rules(c) weight · fraction of the rule's region
    whose dominant channel is the rule's colour (by more than ``margin``). ``background`` is the border
    ring (the outer quarter on each side), ``center`` the middle half."""

    def __init__(self, classes: Sequence[str], rules: Sequence[PlantedRule], bias: dict[str, float],
                 margin: float = 0.15):
        super().__init__()
        self.classes = list(classes)
        self.rules = list(rules)
        self.margin = margin
        self.register_buffer("bias", torch.tensor([bias.get(c, 0.0) for c in self.classes], dtype=torch.float32))

    @staticmethod
    def masks(h: int, w: int) -> dict[str, torch.Tensor]:
        center = torch.zeros(h, w, dtype=torch.bool)
        center[h // 4: h - h // 4, w // 4: w - w // 4] = True
        return {"center": center, "background": ~center}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        masks = self.masks(*x.shape[-2:])
        logits = self.bias.expand(x.shape[0], -1).clone()
        for rule in self.rules:
            ch = COLOURS[rule.colour]
            others = torch.cat([x[:, :ch], x[:, ch + 1:]], dim=1).amax(dim=1)
            dominant = (x[:, ch] - others > self.margin).float()
            mask = masks[rule.region].to(x.device)
            fraction = dominant[:, mask].mean(dim=1)
            logits[:, self.classes.index(rule.cls)] += rule.weight * fraction
        return logits


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- building one
def build_blackbox(cfg: ClassifierConfig) -> BlackBox:
    """The black box a config names (see the module docstring)."""
    from explab.models import resolve_device

    device = resolve_device(cfg.device)
    if cfg.kind == "planted":
        model = PlantedClassifier(cfg.classes or [], cfg.rules, cfg.bias, cfg.margin).to(device).eval()
        return BlackBox(model, model.classes, lambda ims: _pixels(ims).to(device), cfg.batch_size)
    if cfg.kind == "torchvision":
        return _torchvision(cfg, device)
    return _open_clip(cfg)


def _torchvision(cfg: ClassifierConfig, device: torch.device) -> BlackBox:
    import torchvision
    from torchvision.transforms import v2

    try:
        if cfg.checkpoint:
            model = torchvision.models.get_model(cfg.name, weights=None, num_classes=len(cfg.classes or []))
            model.load_state_dict(_state_dict(Path(cfg.checkpoint).expanduser()))
            preprocess = v2.Compose([v2.Resize(cfg.image_size, antialias=True), v2.CenterCrop(cfg.image_size),
                                     v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
            classes = list(cfg.classes or [])
        else:
            weights = torchvision.models.get_model_weights(cfg.name)[cfg.weights or "DEFAULT"]
            model = torchvision.models.get_model(cfg.name, weights=weights)
            preprocess = weights.transforms()
            classes = list(cfg.classes or weights.meta["categories"])
    except (KeyError, ValueError) as err:
        raise ConfigError(f"classifier: torchvision model {cfg.name!r} / weights {cfg.weights!r} not found ({err}): "
                          "use a torchvision architecture name and one of its weights enum members") from None
    model = model.to(device).eval()

    def transform(images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([preprocess(img) for img in _pixels(images)]).to(device)

    return BlackBox(model, classes, transform, cfg.batch_size)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"classifier.checkpoint {str(path)!r} does not exist: give a saved state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _open_clip(cfg: ClassifierConfig) -> BlackBox:
    from explab.images import to_pil
    from explab.models import load_encoder

    encoder = load_encoder({"name": cfg.name, "device": cfg.device})
    classes = list(cfg.classes or [])
    texts = [t.format(c) for c in classes for t in cfg.templates]
    T = torch.from_numpy(encoder.encode(texts, "text")).view(len(classes), len(cfg.templates), -1)
    T = torch.nn.functional.normalize(torch.nn.functional.normalize(T, dim=-1).mean(dim=1), dim=-1)

    def predict(features: torch.Tensor) -> torch.Tensor:
        return cfg.logit_scale * torch.nn.functional.normalize(features, dim=-1) @ T.T

    def transform(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(encoder.encode([to_pil(x) for x in images], "image")).float()

    return BlackBox(predict, classes, transform, cfg.batch_size)
