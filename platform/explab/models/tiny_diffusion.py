"""`tiny:flux` and `tiny:sd`: diffusers pipelines built offline from tiny configs (random weights).

``tiny:flux`` is a real `FluxPipeline` (FluxTransformer2DModel with guidance embedding like
FLUX.1-dev, a 16-channel AutoencoderKL with FLUX's shift and scale, a CLIP text encoder for the
pooled embedding, a T5 encoder for the token embeddings, FlowMatchEulerDiscreteScheduler with
dynamic shifting). ``tiny:sd`` is a real `StableDiffusionPipeline` (UNet2DConditionModel, a
4-channel VAE, a CLIP text encoder, DDIM). Both use the byte-level tokenizer built in code, padded
on the right and ended by EOS, as the real CLIP / T5 tokenizers are.

A 32x32 image has a 16x16 latent (the VAE downsamples by 2); FLUX packs it into 8x8 = 64 tokens
of 64 channels. ``spec.tiny`` overrides the sub-configs by component name, e.g.
``{"transformer": {"num_layers": 3}, "vae": {"latent_channels": 16}}``.
"""

from __future__ import annotations

import inspect
from typing import Any

from explab.errors import ModelError
from explab.models.tokenizer import BOS, EOS, byte_tokenizer

IMAGE_SIZE = 32
TEXT_LENGTH = 32  # the CLIP tokenizer's model_max_length (77 in the real models)


def _init_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in params.items() if name not in ("self", "args", "kwargs")}


def _component(
    cls: type, defaults: dict[str, Any], overrides: dict[str, Any], known: dict[str, Any], where: str
) -> dict[str, Any]:
    for key in overrides:
        if key not in known:
            raise ModelError(
                f"unknown tiny override {key!r} for {where}: use one of "
                + ", ".join(sorted(k for k in known if not k.startswith("_")))
            )
    return {**defaults, **overrides}


def _split(overrides: dict[str, Any], components: tuple[str, ...], family: str) -> dict[str, dict[str, Any]]:
    for key, value in overrides.items():
        if key not in components or not isinstance(value, dict):
            raise ModelError(
                f"unknown tiny override {key!r} for tiny:{family}: give a dict per component, "
                f"one of {', '.join(components)}"
            )
    return {name: dict(overrides.get(name, {})) for name in components}


def _tokenizer() -> Any:
    """The byte tokenizer as a text encoder's tokenizer: BOS text EOS, right padding, 32 tokens."""
    from tokenizers import processors

    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A $B {EOS}",
        special_tokens=[(BOS, tok.bos_token_id), (EOS, tok.eos_token_id)],
    )
    tok.padding_side = "right"
    tok.model_max_length = TEXT_LENGTH
    return tok


def _clip_text(tok: Any, overrides: dict[str, Any], where: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    defaults = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_LENGTH,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,  # the pooled output is the hidden state at the first EOS
        "pad_token_id": tok.pad_token_id,
    }
    config = _component(CLIPTextConfig, defaults, overrides, CLIPTextConfig().to_dict(), where)
    return CLIPTextModel(CLIPTextConfig(**config))


def _vae(overrides: dict[str, Any], latent_channels: int, flux: bool, where: str) -> Any:
    from diffusers import AutoencoderKL

    defaults = {
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": IMAGE_SIZE,
    }
    if flux:  # FLUX's VAE: no quant convs, latents shifted then scaled
        defaults |= {
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": 0.1159,
            "scaling_factor": 0.3611,
        }
    else:
        defaults |= {"scaling_factor": 0.18215}
    return AutoencoderKL(
        **_component(AutoencoderKL, defaults, overrides, _init_defaults(AutoencoderKL), where)
    )


def flux(overrides: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A tiny `FluxPipeline`, its T5 tokenizer and image processor (call under a fixed torch seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    parts = _split(overrides, ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"), "flux")
    tok, tok_2 = _tokenizer(), _tokenizer()
    text_encoder = _clip_text(tok, parts["text_encoder"], "tiny:flux.text_encoder")
    t5 = {
        "vocab_size": len(tok_2),
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": tok_2.pad_token_id,
        "eos_token_id": tok_2.eos_token_id,
        "decoder_start_token_id": tok_2.pad_token_id,
    }
    t5 = _component(T5Config, t5, parts["text_encoder_2"], T5Config().to_dict(), "tiny:flux.text_encoder_2")
    text_encoder_2 = T5EncoderModel(T5Config(**t5))
    vae = _vae(parts["vae"], 16, True, "tiny:flux.vae")
    transformer = {
        "patch_size": 1,
        "in_channels": 4 * vae.config.latent_channels,  # 2x2 patches of latent channels
        "num_layers": 2,  # joint (double-stream) blocks
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": text_encoder_2.config.d_model,
        "pooled_projection_dim": text_encoder.config.hidden_size,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    }
    transformer = _component(
        FluxTransformer2DModel,
        transformer,
        parts["transformer"],
        _init_defaults(FluxTransformer2DModel),
        "tiny:flux.transformer",
    )
    scheduler = {  # FLUX.1-dev's scheduler config
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
    scheduler = _component(
        FlowMatchEulerDiscreteScheduler,
        scheduler,
        parts["scheduler"],
        _init_defaults(FlowMatchEulerDiscreteScheduler),
        "tiny:flux.scheduler",
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=FluxTransformer2DModel(**transformer),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.tokenizer_2, pipe.image_processor


def sd(overrides: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A tiny `StableDiffusionPipeline`, its tokenizer and image processor (call under a fixed torch seed)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    parts = _split(overrides, ("unet", "vae", "text_encoder", "scheduler"), "sd")
    tok = _tokenizer()
    text_encoder = _clip_text(tok, parts["text_encoder"], "tiny:sd.text_encoder")
    vae = _vae(parts["vae"], 4, False, "tiny:sd.vae")
    unet = {
        "sample_size": IMAGE_SIZE // 2,
        "in_channels": vae.config.latent_channels,
        "out_channels": vae.config.latent_channels,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": text_encoder.config.hidden_size,
    }
    unet = _component(
        UNet2DConditionModel, unet, parts["unet"], _init_defaults(UNet2DConditionModel), "tiny:sd.unet"
    )
    scheduler = {  # Stable Diffusion's noise schedule, deterministic DDIM steps
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    scheduler = _component(
        DDIMScheduler, scheduler, parts["scheduler"], _init_defaults(DDIMScheduler), "tiny:sd.scheduler"
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=UNet2DConditionModel(**unet),
        scheduler=DDIMScheduler(**scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.tokenizer, pipe.image_processor
