"""`tiny:<family>` presets: small random models built offline with a fixed seed.

Two builds of the same spec give identical weights. ``spec.tiny`` overrides the family's config
(nested dicts merge into sub-configs, e.g. ``{"text_config": {"hidden_size": 128}}`` for llava);
an unknown key is a ModelError. ``save_tiny`` writes a directory that ``load_model(path)`` reads.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from explab.errors import ModelError
from explab.models import tiny_diffusion
from explab.models.loaded import LoadedModel, finish, resolve_device, resolve_dtype, vae_processor
from explab.models.spec import ModelSpec
from explab.models.tiny_vlm import internvl, llava_next, qwen2_5_vl, text_defaults
from explab.models.tokenizer import IMAGE_TOKEN, ROLE_TOKENS, byte_tokenizer

SEED = 0
IMAGE_SIZE, PATCH_SIZE = 32, 8

Built = tuple[torch.nn.Module, Any, Any]  # model, tokenizer, processor


def _merge(
    defaults: dict[str, Any], overrides: dict[str, Any], known: dict[str, Any], where: str
) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; keys must exist in ``known`` (recursing into dicts)."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if key not in known:
            raise ModelError(
                f"unknown tiny override {key!r} for {where}: use one of its config fields "
                f"({', '.join(sorted(k for k in known if not k.startswith('_')))})"
            )
        if isinstance(value, dict) and isinstance(known[key], dict):
            value = _merge(merged.get(key) or {}, value, known[key], f"{where}.{key}")
        merged[key] = value
    return merged


def _hf_config(cls: type, defaults: dict[str, Any], overrides: dict[str, Any], family: str) -> Any:
    return cls(**_merge(defaults, overrides, cls().to_dict(), f"tiny:{family}"))


def _stop_at_turn_end(model: Any, tok: Any) -> None:
    """Generation stops at eos or at the end of a chat turn."""
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(ROLE_TOKENS[-1])]
    model.generation_config.pad_token_id = tok.pad_token_id


def _llama(overrides: dict[str, Any]) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    model = LlamaForCausalLM(_hf_config(LlamaConfig, text_defaults(tok), overrides, "llama"))
    _stop_at_turn_end(model, tok)
    return model, tok, None


def _qwen(overrides: dict[str, Any]) -> Built:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()  # Qwen2 differs from Llama: q/k/v biases, tied embeddings here
    defaults = {**text_defaults(tok), "tie_word_embeddings": True}
    model = Qwen2ForCausalLM(_hf_config(Qwen2Config, defaults, overrides, "qwen"))
    _stop_at_turn_end(model, tok)
    return model, tok, None


def _phi3(overrides: dict[str, Any]) -> Built:
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = byte_tokenizer()  # Phi-3 fuses its projections: one qkv_proj, one gate_up_proj per block
    model = Phi3ForCausalLM(_hf_config(Phi3Config, text_defaults(tok), overrides, "phi3"))
    _stop_at_turn_end(model, tok)
    return model, tok, None


def _gpt2(overrides: dict[str, Any]) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_tokenizer()
    ids = {k: v for k, v in text_defaults(tok).items() if k.endswith("token_id")}
    defaults = {"vocab_size": len(tok), "n_positions": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, **ids}
    model = GPT2LMHeadModel(_hf_config(GPT2Config, defaults, overrides, "gpt2"))
    _stop_at_turn_end(model, tok)
    return model, tok, None


def _llava(overrides: dict[str, Any]) -> Built:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = byte_tokenizer(extra_special=(IMAGE_TOKEN,))
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": 32,
    }
    text = {"model_type": "llama", **text_defaults(tok)}
    defaults = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",  # drop CLS: one token per patch
        "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "pad_token_id": tok.pad_token_id,
    }
    config = _hf_config(LlavaConfig, defaults, overrides, "llava")
    model = LlavaForConditionalGeneration(config)
    _stop_at_turn_end(model, tok)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
    )
    return model, tok, processor


def _clip_cfg(overrides: dict[str, Any]) -> dict[str, Any]:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    defaults = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "width": 64,
            "layers": 2,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
            "mlp_ratio": 2.0,
        },
    }
    known = {
        "embed_dim": 0,
        "quick_gelu": False,
        "vision_cfg": asdict(CLIPVisionCfg()),
        "text_cfg": asdict(CLIPTextCfg()),
    }
    return _merge(defaults, overrides, known, "tiny:clip")


def _clip(overrides: dict[str, Any]) -> Built:
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = _clip_cfg(overrides)
    model = open_clip.CLIP(**cfg)
    preprocess = asdict(PreprocessCfg(size=cfg["vision_cfg"]["image_size"]))
    set_model_preprocess_cfg(model, preprocess)
    transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
    return model, open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"]), transform


def _vae(overrides: dict[str, Any]) -> Built:
    from diffusers import AutoencoderKL

    defaults = {
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": IMAGE_SIZE,
    }
    params = inspect.signature(AutoencoderKL.__init__).parameters
    known = {name: p.default for name, p in params.items() if name != "self"}
    model = AutoencoderKL(**_merge(defaults, overrides, known, "tiny:vae"))
    return model, None, vae_processor(model)


def _vlm(build: Callable[[dict[str, Any], Any], Built]) -> Callable[[dict[str, Any]], Built]:
    """A :mod:`explab.models.tiny_vlm` builder with this module's config merging and stop tokens."""

    def builder(overrides: dict[str, Any]) -> Built:
        model, tok, processor = build(overrides, _hf_config)
        _stop_at_turn_end(model, tok)
        return model, tok, processor

    return builder


_BUILDERS: dict[str, tuple[str, Callable[[dict[str, Any]], Built]]] = {
    "llama": ("causal_lm", _llama),
    "qwen": ("causal_lm", _qwen),
    "phi3": ("causal_lm", _phi3),
    "gpt2": ("causal_lm", _gpt2),
    "llava": ("vlm", _llava),
    "llava_next": ("vlm", _vlm(llava_next)),
    "qwen2_5_vl": ("vlm", _vlm(qwen2_5_vl)),
    "internvl": ("vlm", _vlm(internvl)),
    "clip": ("clip", _clip),
    "vae": ("vae", _vae),
    "flux": ("diffusion", tiny_diffusion.flux),
    "sd": ("diffusion", tiny_diffusion.sd),
}
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_tiny(spec: ModelSpec | str) -> LoadedModel:
    """Build a ``tiny:<family>`` model with seeded random weights, on the spec's device and dtype."""
    spec = ModelSpec.of(spec)
    if spec.family not in _BUILDERS:
        raise ModelError(
            f"unknown tiny model family {spec.name!r}: use one of "
            + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES)
        )
    kind, builder = _BUILDERS[spec.family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, tokenizer, processor = builder(dict(spec.tiny))
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype=dtype)
    return finish(model, tokenizer, processor, kind, spec, source=spec.name)


def save_tiny(spec: ModelSpec | str, path: str | Path) -> Path:
    """Write a tiny model (float32, CPU) in the format its real loading path reads; returns the dir."""
    spec = ModelSpec.of(spec).model_copy(update={"dtype": "float32", "device": "cpu"})
    loaded = build_tiny(spec)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if loaded.kind == "clip":
        from safetensors.torch import save_file

        config = {
            "model_cfg": _clip_cfg(dict(spec.tiny)),
            "preprocess_cfg": loaded.model.visual.preprocess_cfg,
        }
        (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(path / "open_clip_model.safetensors"))
    else:
        loaded.model.save_pretrained(path)
        if loaded.kind not in ("vae", "diffusion"):  # a pipeline saves its tokenizers itself
            (loaded.processor or loaded.tokenizer).save_pretrained(path)
    return path
