"""Diffusers pipelines as explab models: loading, the latent layout, and VAE encode/decode.

Two families: ``flux`` (`FluxPipeline`: latents packed into 2x2-patch tokens, the VAE's latents
shifted and scaled) and ``sd`` (Stable Diffusion / SDXL: UNet latents (C, H, W) scaled). The
latents these functions take and return are exactly the ones the pipeline denoises: what its
``callback_on_step_end`` sees and what it decodes after the last step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from explab.errors import ModelError

FAMILIES = ("flux", "sd")


def pipeline_family(pipe: Any) -> str:
    """``flux`` for a FLUX pipeline (a transformer over packed latents), ``sd`` for a UNet pipeline."""
    if hasattr(pipe, "transformer") and hasattr(pipe, "_pack_latents"):
        return "flux"
    if hasattr(pipe, "unet"):
        return "sd"
    raise ModelError(
        f"{type(pipe).__name__} is neither a FLUX nor a UNet (Stable Diffusion / SDXL) pipeline: "
        "use one of those families"
    )


def load_pipeline(where: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> Any:
    """`DiffusionPipeline.from_pretrained` of a ``model_index.json`` directory or hub id, on ``device``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(where, revision=revision, dtype=dtype)
    pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_size(pipe: Any) -> tuple[int, int]:
    """(height, width) the pipeline renders when none is given."""
    if pipeline_family(pipe) == "flux":
        side = pipe.default_sample_size * pipe.vae_scale_factor
    else:
        sample = pipe.unet.config.sample_size
        side = (sample if isinstance(sample, int) else sample[0]) * pipe.vae_scale_factor
    return side, side


def size_multiple(pipe: Any) -> int:
    """Height and width must be multiples of this (FLUX packs 2x2 latent patches)."""
    return pipe.vae_scale_factor * (2 if pipeline_family(pipe) == "flux" else 1)


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, ...]:
    """One row's latent: FLUX (tokens, 4 * latent channels), SD (latent channels, h, w)."""
    channels = pipe.vae.config.latent_channels
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    if pipeline_family(pipe) == "flux":
        return (h // 2) * (w // 2), 4 * channels
    return channels, h, w


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, 3) as uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def encode(pipe: Any, images: np.ndarray, generator: list[torch.Generator] | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to the latents the pipeline denoises (packed for FLUX).

    With ``generator`` (one per image) the VAE's posterior is sampled (``latent_dist.sample``), as
    FLUX's training and the LCS paper do; without, its mean is used.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ModelError(f"images of shape {images.shape} and dtype {images.dtype}: give uint8 (N, H, W, 3)")
    height, width = images.shape[1:3]
    multiple = size_multiple(pipe)
    if height % multiple or width % multiple:
        raise ModelError(
            f"image size {height}x{width} is not a multiple of {multiple}: resize or crop the images"
        )
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images.astype(np.float32) / 255.0)  # [-1, 1], (N, 3, H, W)
    pixels = pixels.to(vae.device, vae.dtype)
    rows = []
    for i in range(len(images)):  # one image at a time: batched equals unbatched
        dist = vae.encode(pixels[i : i + 1]).latent_dist
        rows.append(dist.sample(generator[i]) if generator is not None else dist.mode())
    latents = torch.cat(rows)
    if pipeline_family(pipe) == "flux":
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        n, c, h, w = latents.shape
        return pipe._pack_latents(latents, n, c, h, w)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Latents as the pipeline denoises them to uint8 images (N, H, W, 3), as its last step does."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    expected = latent_shape(pipe, height, width)
    if tuple(latents.shape[1:]) != expected:
        raise ModelError(
            f"latents of shape {tuple(latents.shape[1:])} per image do not fit a {height}x{width} "
            f"image ({expected}): give the size the latents were made at"
        )
    if pipeline_family(pipe) == "flux":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    else:
        latents = latents / vae.config.scaling_factor
    rows = [vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(len(latents))]
    images = pipe.image_processor.postprocess(torch.cat(rows), output_type="np")
    return to_uint8(images)
