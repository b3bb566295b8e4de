"""`Diffuser`: one diffusers pipeline (FLUX, Stable Diffusion / SDXL) behind a shared Ray actor.

- ``generate(requests)``: text-to-image; per request a prompt and a seed, and on request the latents
  at chosen steps, latent interventions (`explab.interventions.latents`, applied through the
  pipeline's ``callback_on_step_end``) and image-token x text-token attention maps of chosen blocks
  for chosen prompt tokens (`explab.interventions.diffusion_attention`);
- ``encode(images)`` / ``decode(latents)``: through the pipeline's VAE, in the latent layout the
  pipeline denoises (FLUX: shifted, scaled and packed; SD: scaled);
- ``tokenize(prompts)``: each token's character span, to find a word's position for attention maps.

Requests with the same size, step count, guidance (and text length and attention blocks/steps)
are batched into one pipeline call; every row draws its noise from its own seeded CPU generator
and is decoded on its own, so a batched result equals the unbatched one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from explab.errors import ExplabError
from explab.interventions.latents import LatentIntervention
from explab.servers.base import ServerBase


class AttentionRequest(BaseModel):
    """Which attention maps to record: ``blocks`` (FLUX: joint blocks; SD: cross-attention layers),
    ``tokens`` (positions in the prompt's tokenization: FLUX's T5 tokens, SD's CLIP tokens; see
    `DiffusionResult.token_ids`) and ``steps`` (the transformer call of each denoising step)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blocks: list[int] = Field(min_length=1)
    tokens: list[int] = Field(min_length=1)
    steps: list[int] = Field(min_length=1)


class DiffusionRequest(BaseModel):
    """One image: ``prompt`` rendered from ``seed`` in ``steps`` steps at ``guidance``.

    ``size`` is (height, width), default the pipeline's. ``capture_steps``: return the latent after
    these denoising steps (0-based, as the step-end callback sees it, before that step's
    interventions). ``max_sequence_length``: FLUX's T5 text length (default 512).
    ``negative_prompt``: Stable Diffusion's classifier-free guidance (guidance > 1).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    seed: int = 0
    steps: int = Field(28, ge=1)
    guidance: float = 3.5
    size: tuple[int, int] | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = Field(None, ge=1, le=512)
    capture_steps: list[int] = Field(default_factory=list)
    interventions: list[LatentIntervention] = Field(default_factory=list)
    attention: AttentionRequest | None = None

    @field_validator("capture_steps")
    @classmethod
    def _non_negative(cls, steps: list[int]) -> list[int]:
        if any(t < 0 for t in steps):
            raise ValueError("capture steps count from 0 (the latent after the first denoising step)")
        return sorted(set(steps))


class DiffusionResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Any  # np.ndarray (H, W, 3) uint8
    latents: dict[int, Any] = Field(default_factory=dict)  # step -> np.ndarray: FLUX (N, C), SD (C, h, w)
    attention: dict[int, Any] = Field(
        default_factory=dict
    )  # block -> np.ndarray (steps, image tokens, tokens)
    token_ids: list[int] = Field(default_factory=list)  # the prompt's tokens that `attention.tokens` index


def diffusion_requests(
    prompts: str | list[str], seeds: int | list[int] = 0, **common: Any
) -> list[DiffusionRequest]:
    """One request per prompt (``seeds``: one for all or one per prompt); ``common`` fields go to every one."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise ExplabError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one per prompt")
    return [DiffusionRequest(prompt=p, seed=s, **common) for p, s in zip(prompts, seeds, strict=True)]


def as_diffusion_requests(requests: Any, common: dict[str, Any] | None = None) -> list[DiffusionRequest]:
    """Accept requests, dicts or prompt strings; ``common`` fields fill what a dict or string leaves out."""
    if isinstance(requests, (str, dict, DiffusionRequest)):
        requests = [requests]
    out = []
    for item in requests:
        if isinstance(item, str):
            item = {"prompt": item}
        if isinstance(item, dict):
            item = DiffusionRequest.model_validate({**(common or {}), **item})
        out.append(item)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


@ray.remote
class Diffuser(ServerBase):
    kind = "diffuser"

    def _load(self) -> None:
        from explab.models import load_model
        from explab.models.diffusion import pipeline_family

        self.loaded = load_model(self.spec)
        if self.loaded.kind != "diffusion":
            raise ExplabError(
                f"model {self.spec.name!r} is a {self.loaded.kind}, not a diffusers pipeline: "
                "give a FLUX or Stable Diffusion pipeline (model_index.json), tiny:flux or tiny:sd"
            )
        self.pipe = self.loaded.model
        self.pipe.set_progress_bar_config(disable=True)
        self.family = pipeline_family(self.pipe)
        self.batcher = self._batcher(self._run, group_key=lambda item: item[2])

    def _info(self) -> dict[str, Any]:
        from explab.interventions.diffusion_attention import attention_layers
        from explab.models.diffusion import default_size

        return {
            "model_kind": "diffusion",
            "family": self.family,
            "pipeline": type(self.pipe).__name__,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "revision": self.loaded.revision,
            "default_size": list(default_size(self.pipe)),
            "attention_blocks": len(attention_layers(self.pipe)),
        }

    # --- public methods -----------------------------------------------------------------------
    async def generate(self, requests: list[DiffusionRequest]) -> list[DiffusionResult]:
        items = []
        for r in requests:
            size = self._size(r.size)
            self._check(r, size)
            attention = r.attention.model_dump(exclude={"tokens"}) if r.attention else None
            key = ("generate", size, r.steps, r.guidance, r.max_sequence_length, json.dumps(attention))
            items.append(("generate", r.model_copy(update={"size": size}), key))
        return await self.batcher.submit_many(items)

    async def encode(self, images: list[Any], seeds: list[int] | None = None) -> list[Any]:
        """uint8 (H, W, 3) images to latents; ``seeds``: sample the VAE posterior (else its mean)."""
        if seeds is not None and len(seeds) != len(images):
            raise ExplabError(
                f"{len(seeds)} seeds for {len(images)} images: give one seed per image, or none"
            )
        items = [
            (
                "encode",
                (np.asarray(img), None if seeds is None else seeds[i]),
                ("encode", np.asarray(img).shape, seeds is None),
            )
            for i, img in enumerate(images)
        ]
        return await self.batcher.submit_many(items)

    async def decode(self, latents: list[Any], size: tuple[int, int] | None = None) -> list[Any]:
        """Latents (as `generate` captures them) to uint8 (H, W, 3) images of ``size`` (height, width)."""
        size = self._size(size)
        items = [("decode", np.asarray(z, dtype=np.float32), ("decode", size)) for z in latents]
        return await self.batcher.submit_many(items)

    async def tokenize(self, prompts: list[str], max_sequence_length: int | None = None) -> list[list[tuple[int, int]]]:
        """Per prompt, the (start, end) characters of each token of the tokenization that attention maps
        index (FLUX's T5, SD's CLIP); special tokens are (0, 0). Finds a word's token positions."""
        tokenizer = self.loaded.tokenizer
        length = max_sequence_length or (512 if self.family == "flux" else tokenizer.model_max_length)
        out = []
        for prompt in prompts:
            encoded = tokenizer(prompt, max_length=length, truncation=True, return_offsets_mapping=True)
            out.append([(int(a), int(b)) for a, b in encoded["offset_mapping"]])
        return out

    # --- checks (before batching: a bad request fails alone) -----------------------------------
    def _size(self, size: tuple[int, int] | list[int] | None) -> tuple[int, int]:
        from explab.models.diffusion import default_size, size_multiple

        height, width = default_size(self.pipe) if size is None else (int(size[0]), int(size[1]))
        multiple = size_multiple(self.pipe)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ExplabError(
                f"image size {height}x{width} does not fit this {self.family} pipeline: "
                f"give a height and width that are positive multiples of {multiple}"
            )
        return height, width

    def _check(self, r: DiffusionRequest, size: tuple[int, int]) -> None:
        from explab.interventions.diffusion_attention import attention_layers
        from explab.interventions.latents import LatentEditor
        from explab.models.diffusion import latent_shape

        LatentEditor([r.capture_steps], [r.interventions]).check_steps(r.steps)
        shape = latent_shape(self.pipe, *size)
        tokens, channels = (shape[0], shape[1]) if self.family == "flux" else (shape[1] * shape[2], shape[0])
        for spec in r.interventions:
            width = len(spec.basis[0]) if spec.type == "replace_subspace" else len(spec.vector)
            if width != channels:
                raise ExplabError(
                    f"a {spec.type} intervention of {width} channels for latents of {channels}: "
                    f"give vectors of {channels} entries"
                )
            if spec.mask is not None and len(spec.mask) != tokens:
                raise ExplabError(
                    f"a token mask of {len(spec.mask)} entries for latents of {tokens} tokens "
                    f"at {size[0]}x{size[1]}: give one entry per token"
                )
        if r.attention is not None:
            blocks = len(attention_layers(self.pipe))
            if any(not 0 <= b < blocks for b in r.attention.blocks):
                raise ExplabError(
                    f"attention blocks {r.attention.blocks}: this model has blocks 0..{blocks - 1}"
                )
            if any(not 0 <= t < r.steps for t in r.attention.steps):
                raise ExplabError(
                    f"attention steps {r.attention.steps}: a {r.steps}-step run has steps 0..{r.steps - 1}"
                )
            length = self._text_length(r)
            if any(not 0 <= t < length for t in r.attention.tokens):
                raise ExplabError(
                    f"attention tokens {r.attention.tokens}: the prompt is encoded as {length} "
                    f"tokens, so use positions 0..{length - 1}"
                )
        if self.family == "flux" and r.negative_prompt is not None:
            raise ExplabError(
                "negative_prompt is Stable Diffusion's classifier-free guidance: "
                "leave it out for FLUX (guidance is embedded)"
            )

    def _text_length(self, r: DiffusionRequest) -> int:
        if self.family == "flux":
            return r.max_sequence_length or 512
        return self.pipe.tokenizer.model_max_length

    def _token_ids(self, r: DiffusionRequest) -> list[int]:
        tokenizer = self.loaded.tokenizer
        return list(tokenizer(r.prompt, max_length=self._text_length(r), truncation=True)["input_ids"])

    # --- batched work, on the model thread ----------------------------------------------------
    def _run(self, items: list[tuple[str, Any, Any]]) -> list[Any]:
        op = items[0][0]
        payload = [item[1] for item in items]
        if op == "generate":
            return self._generate_batch(payload)
        if op == "encode":
            return self._encode_batch(payload)
        return self._decode_batch(payload, items[0][2][1])

    @torch.no_grad()
    def _generate_batch(self, requests: list[DiffusionRequest]) -> list[DiffusionResult]:
        from contextlib import nullcontext

        from explab.interventions.diffusion_attention import record_attention
        from explab.interventions.latents import LatentEditor
        from explab.models.diffusion import decode

        first = requests[0]
        height, width = first.size
        editor = LatentEditor([r.capture_steps for r in requests], [r.interventions for r in requests])
        kwargs: dict[str, Any] = {
            "prompt": [r.prompt for r in requests],
            "height": height,
            "width": width,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": [torch.Generator("cpu").manual_seed(r.seed) for r in requests],
            "output_type": "latent",
            "callback_on_step_end": editor,
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if self.family == "flux":
            kwargs["max_sequence_length"] = self._text_length(first)
        elif any(r.negative_prompt is not None for r in requests):
            kwargs["negative_prompt"] = [r.negative_prompt or "" for r in requests]
        if first.attention is not None:
            att = first.attention
            recording = record_attention(
                self.pipe, att.blocks, att.steps, [r.attention.tokens for r in requests]
            )
        else:
            recording = nullcontext()
        with recording as record:
            if record is not None:
                editor.on_step = record.set_step
            latents = self.pipe(**kwargs).images
        images = decode(self.pipe, latents, height, width)
        results = []
        for row, r in enumerate(requests):
            results.append(
                DiffusionResult(
                    image=images[row],
                    latents={t: z.numpy() for t, z in editor.captures[row].items()},
                    attention={b: m.numpy() for b, m in record.result(row).items()}
                    if record is not None
                    else {},
                    token_ids=self._token_ids(r),
                )
            )
        return results

    @torch.no_grad()
    def _encode_batch(self, payload: list[tuple[np.ndarray, int | None]]) -> list[np.ndarray]:
        from explab.models.diffusion import encode

        images = np.stack([img for img, _ in payload])
        seeds = [seed for _, seed in payload]
        generators = None if seeds[0] is None else [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return list(_np(encode(self.pipe, images, generators)))

    @torch.no_grad()
    def _decode_batch(self, latents: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
        from explab.models.diffusion import decode

        return list(decode(self.pipe, torch.from_numpy(np.stack(latents)), *size))
