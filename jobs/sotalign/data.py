"""Data for SOTAlign: a synthetic shared-latent world, and real embeddings through the pipeline.

Synthetic (`make_synthetic`): a latent z in R^k drawn around one of C class centres; the "image
encoder" and the "text encoder" are two different random nonlinear maps of z (two-layer tanh
networks with their own seeds, plus observation noise), so the modalities share only z, as
frozen unimodal encoders share the world they describe. Pairs are (x(z_i), y(z_i)); unpaired
images and texts come from independent latent draws; a class's prompt is the text encoder at its
centre. Retrieval is evaluated on held-out pairs, zero-shot classification on held-out images
against the class prompts.

Real (`embed_sources`): image/text columns of datasets through `explab.embeddings` (cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from explab.config import Section
from explab.data import class_label_names


@dataclass
class AlignData:
    """Everything a SOTAlign run needs, as float32 matrices (rows = samples)."""

    pairs_x: np.ndarray  # pool of paired images (the first n of the pool are the n pairs)
    pairs_y: np.ndarray  # their texts
    unpaired_x: np.ndarray  # images without texts
    unpaired_y: np.ndarray  # texts without images
    test_x: np.ndarray  # held-out pairs for retrieval (with test_groups: one row per image)
    test_y: np.ndarray
    test_groups: np.ndarray | None = None  # test text j shows image test_groups[j] (None: row i ↔ row i)
    zs_x: np.ndarray | None = None  # images for zero-shot classification
    zs_labels: np.ndarray | None = None
    class_y: np.ndarray | None = None  # one text embedding per class (prompt-averaged)
    class_names: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"pairs_pool": len(self.pairs_x), "unpaired_images": len(self.unpaired_x),
                "unpaired_texts": len(self.unpaired_y), "test_pairs": len(self.test_x),
                "zeroshot_images": 0 if self.zs_x is None else len(self.zs_x)}


class SyntheticConfig(Section):
    latent_dim: int = Field(8, ge=1)  # the shared latent
    private_dim: int = Field(0, ge=0)  # per-modality nuisance factors (style, wording) not shared
    private_std: float = Field(1.0, ge=0)
    n_classes: int = Field(10, ge=2)
    class_spread: float = Field(1.0, gt=0)  # std of the class centres
    within_std: float = Field(0.7, ge=0)  # std of z around its centre
    image_dim: int = Field(64, ge=1)
    text_dim: int = Field(48, ge=1)
    hidden: int = Field(128, ge=1)  # width of the random encoders
    nonlinearity: float = Field(1.5, gt=0)  # gain before the tanh: larger = more nonlinear
    noise: float = Field(0.05, ge=0)  # observation noise (relative to the feature scale)
    n_pairs_pool: int = Field(2000, ge=2)
    n_unpaired: int = Field(8192, ge=0)  # unpaired images and (independently) unpaired texts
    n_test: int = Field(1000, ge=10)
    n_zeroshot: int = Field(1000, ge=0)
    encoder_seed: int = 1234  # the two "encoders" (fixed across runs: the same frozen models)


class _RandomEncoder:
    def __init__(self, rng: np.random.Generator, k: int, hidden: int, out: int, gain: float):
        self.W1 = rng.normal(size=(k, hidden)) * gain / np.sqrt(k)
        self.b1 = rng.normal(size=hidden) * 0.5
        self.W2 = rng.normal(size=(hidden, out)) / np.sqrt(hidden)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.tanh(z @ self.W1 + self.b1) @ self.W2


def make_synthetic(cfg: SyntheticConfig, seed: int = 0) -> AlignData:
    enc_rng = np.random.default_rng(cfg.encoder_seed)
    k = cfg.latent_dim + cfg.private_dim
    image_enc = _RandomEncoder(enc_rng, k, cfg.hidden, cfg.image_dim, cfg.nonlinearity)
    text_enc = _RandomEncoder(enc_rng, k, cfg.hidden, cfg.text_dim, cfg.nonlinearity)
    centres = enc_rng.normal(size=(cfg.n_classes, cfg.latent_dim)) * cfg.class_spread
    rng = np.random.default_rng(seed)

    def latents(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, cfg.n_classes, size=n)
        return centres[labels] + rng.normal(size=(n, cfg.latent_dim)) * cfg.within_std, labels

    def observe(enc: _RandomEncoder, z: np.ndarray, private: bool = True) -> np.ndarray:
        s = rng.normal(size=(len(z), cfg.private_dim)) * (cfg.private_std if private else 0.0)
        x = enc(np.concatenate([z, s], axis=1))
        return (x + rng.normal(size=x.shape) * cfg.noise * x.std()).astype(np.float32)

    z_pairs, _ = latents(cfg.n_pairs_pool)
    z_ux, _ = latents(cfg.n_unpaired)
    z_uy, _ = latents(cfg.n_unpaired)
    z_test, _ = latents(cfg.n_test)
    z_zs, zs_labels = latents(cfg.n_zeroshot)
    return AlignData(
        pairs_x=observe(image_enc, z_pairs), pairs_y=observe(text_enc, z_pairs),
        unpaired_x=observe(image_enc, z_ux), unpaired_y=observe(text_enc, z_uy),
        test_x=observe(image_enc, z_test), test_y=observe(text_enc, z_test),
        zs_x=observe(image_enc, z_zs), zs_labels=zs_labels.astype(np.int64),
        class_y=text_enc(np.concatenate([centres, np.zeros((cfg.n_classes, cfg.private_dim))], 1)).astype(np.float32),
        class_names=[f"class_{c}" for c in range(cfg.n_classes)],
    )


def subsample(rng: np.random.Generator, X: np.ndarray, n: int | None) -> np.ndarray:
    if n is None or n >= len(X):
        return X
    return X[np.sort(rng.choice(len(X), size=n, replace=False))]


def describe(data: AlignData) -> dict[str, Any]:
    return {**data.sizes(), "image_dim": int(data.pairs_x.shape[1]), "text_dim": int(data.pairs_y.shape[1])}


# ---------------------------------------------------------------- real features through the pipeline


def embed_pairs(image_encoder: Any, text_encoder: Any, source: Any, *, options: Any,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of the same rows of a paired dataset (row i ↔ row i)."""
    from explab.embeddings import embed

    common = dict(split=source.split, limit=source.limit, options=options, seed=seed, **source.kwargs)
    x = embed(image_encoder, source.data, modality="image", column=source.image_column, **common).array()
    y = embed(text_encoder, source.data, modality="text", column=source.text_column, **common).array()
    if len(x) != len(y):
        from explab.errors import ExplabError

        raise ExplabError(f"paired source {source.data!r} gave {len(x)} images but {len(y)} texts: "
                          "use one dataset whose rows hold both")
    return x, y


def embed_grouped(image_encoder: Any, text_encoder: Any, source: Any, *, options: Any,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A paired set with one row per caption (COCO): rows sharing ``source.image_id_column`` show
    the same image. ``limit`` counts images, drawn by a seeded shuffle of the image ids (not the
    first rows). Returns (image of each kept row, its caption, the row's image index, one image
    row per kept image). The whole split is embedded once (cached) to see every caption."""
    from explab.embeddings import embed
    from explab.errors import ExplabError

    col = source.image_id_column
    common = dict(split=source.split, options=options, seed=seed, keep=[col], **source.kwargs)
    xs = embed(image_encoder, source.data, modality="image", column=source.image_column, **common)
    ys = embed(text_encoder, source.data, modality="text", column=source.text_column, **common)
    ids_x, ids_y = xs.frame()[col].to_numpy(), ys.frame()[col].to_numpy()
    if len(ids_x) != len(ids_y) or not (ids_x == ids_y).all():
        raise ExplabError(f"paired source {source.data!r}: image and text rows disagree on {col!r}: "
                          "use one dataset whose rows hold both")
    unique = list(dict.fromkeys(ids_x.tolist()))
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order[: source.limit]]
    index = {v: i for i, v in enumerate(chosen)}
    rows = np.array([i for i, v in enumerate(ids_x.tolist()) if v in index], dtype=np.int64)
    groups = np.array([index[v] for v in ids_x[rows].tolist()], dtype=np.int64)
    first = np.array([rows[np.flatnonzero(groups == g)[0]] for g in range(len(chosen))], dtype=np.int64)
    x, y = xs.array(), ys.array()
    return x[rows], y[rows], groups, x[first]


def embed_source(encoder: Any, source: Any, modality: str, *, options: Any, seed: int) -> np.ndarray:
    from explab.embeddings import embed

    return embed(encoder, source.data, modality=modality, column=source.column, split=source.split,
                 limit=source.limit, options=options, seed=seed, **source.kwargs).array()


def embed_zeroshot(image_encoder: Any, text_encoder: Any, zs: Any, *, options: Any,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Images + integer labels of the zero-shot set, and one prompt-averaged text embedding per class."""
    from explab.embeddings import embed
    from explab.errors import ConfigError

    images = embed(image_encoder, zs.data, modality="image", column=zs.image_column, keep=[zs.label_column],
                   split=zs.split, limit=zs.limit, options=options, seed=seed, **zs.kwargs)
    labels_raw = images.frame()[zs.label_column].to_numpy()
    names = zs.class_names or class_label_names(zs.data, zs.label_column)
    if names is None:
        names = sorted({str(v) for v in labels_raw})
    if labels_raw.dtype.kind in "iu":
        labels = labels_raw.astype(np.int64)
    else:
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in labels_raw} - set(index))
        if unknown:
            raise ConfigError(f"zeroshot labels {unknown[:3]} are not among class_names: fix class_names")
        labels = np.array([index[str(v)] for v in labels_raw], dtype=np.int64)
    if labels.max(initial=-1) >= len(names):
        raise ConfigError(f"zeroshot label {labels.max()} has no class name ({len(names)} given): fix class_names")
    shown = [n.split(",")[0].strip() for n in names] if zs.first_synonym else list(names)
    prompts = [t.format(n) for n in shown for t in zs.templates]
    T = embed(text_encoder, prompts, modality="text", options=options).array()
    T = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
    class_y = T.reshape(len(names), len(zs.templates), -1).mean(axis=1)
    return images.array(), labels, class_y.astype(np.float32), shown


# ---------------------------------------------------------------- a tiny image-caption dataset

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")


def shapes_rows(n: int = 64, seed: int = 0, size: int = 32, stream: int = 0) -> list[dict[str, Any]]:
    """``synthetic:sotalign_shapes``: coloured shapes with captions ("a red circle") and shape labels.

    Drawn by the platform's `explab.shapes.shape_rows` (four colours × `SHAPES`, balanced);
    ``label`` is the shape's index in `SHAPES`. ``stream`` draws an independent set for the same
    seed (pairs, test pairs, unpaired sets).
    """
    from explab.shapes import shape_rows

    rows = shape_rows(n=n, seed=seed, stream=stream, size=size, colours=COLOURS, shapes=SHAPES)
    return [{"image": r["image"], "caption": r["caption"], "label": r["shape_label"]} for r in rows]

