"""`tiny:` presets of the vision-language families the later jobs name, built offline.

Each builder returns the transformers-native model with seeded random weights, the byte tokenizer
with the family's image token(s), and the family's real processor around an image processor built
in code (no hub files): ``tiny:llava_next`` (LLaVA-1.6, anyres tiling), ``tiny:qwen2_5_vl``
(Qwen2.5-VL, dynamic resolution with 2x2 patch merging and window attention) and
``tiny:internvl`` (InternVL 3/3.5 HF format: pixel shuffle, ``<img>...</img>`` around the image
context tokens). Images are 32x32 pixels by default; every family yields a 4x4 grid of image tokens
in the language model for a 32x32 image (LLaVA-NeXT: a 4x4 base grid plus its high-res views).
"""

from __future__ import annotations

from typing import Any

from explab.models.tokenizer import IMAGE_TOKEN, byte_tokenizer

IMAGE_SIZE = 32
Built = tuple[Any, Any, Any]  # model, tokenizer, processor


def text_defaults(tok: Any) -> dict[str, Any]:
    """The small decoder every tiny language model uses (``tiny:llama``/``qwen`` and the VLMs' LLMs)."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        # head size 32: the smallest vLLM's CPU attention kernels accept (16 is refused)
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def llava_next(overrides: dict[str, Any], config_of: Any) -> Built:
    """LLaVA-1.6: CLIP tower (8px patches), 2-layer MLP projector, Llama decoder, anyres 32..64px."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = byte_tokenizer(extra_special=(IMAGE_TOKEN,))
    patch = 8
    defaults = {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": patch,
            "projection_dim": 32,
        },
        "text_config": {"model_type": "llama", **text_defaults(tok)},
        "image_token_index": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                                 [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
        "image_seq_length": (IMAGE_SIZE // patch) ** 2,
        "pad_token_id": tok.pad_token_id,
    }
    config = config_of(LlavaNextConfig, defaults, overrides, "llava_next")
    model = LlavaNextForConditionalGeneration(config)
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
    )
    return model, tok, processor


QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # Qwen's names


def qwen2_5_vl(overrides: dict[str, Any], config_of: Any) -> Built:
    """Qwen2.5-VL: 4px patches merged 2x2 (an 8x8 grid of patches -> 4x4 LLM tokens), M-RoPE decoder."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    # an image part is <|vision_start|><|image_pad|><|vision_end|>; the processor expands the pad
    tok = byte_tokenizer(extra_special=QWEN_VISION, image_placeholder="".join(QWEN_VISION[:3:2]) + QWEN_VISION[1])
    text = text_defaults(tok)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections
    mrope = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    patch, merge = 4, 2
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION}
    defaults = {
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "window_size": 4 * patch,  # windows of 2x2 merged tokens: window attention is exercised
            "out_hidden_size": text["hidden_size"],
            "fullatt_block_indexes": [1],
        },
        "text_config": {**text, "rope_parameters": {"rope_type": "default", "mrope_section": mrope}},
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
    }
    config = config_of(Qwen2_5_VLConfig, defaults, overrides, "qwen2_5_vl")
    model = Qwen2_5_VLForConditionalGeneration(config)
    vc = config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=vc.patch_size,
        merge_size=vc.spatial_merge_size,
        temporal_patch_size=vc.temporal_patch_size,
        size={"shortest_edge": unit * unit, "longest_edge": 16 * IMAGE_SIZE * IMAGE_SIZE},
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=tok.chat_template,
    )
    return model, tok, processor


INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def internvl(overrides: dict[str, Any], config_of: Any) -> Built:
    """InternVL (HF format): InternViT tower (4px patches, CLS), pixel shuffle 0.5, MLP, Qwen2 decoder."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = byte_tokenizer(named_special=INTERNVL_TOKENS, image_placeholder=INTERNVL_TOKENS["context_image_token"])
    patch = 4
    defaults = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "patch_size": [patch, patch],
        },
        "text_config": {"model_type": "qwen2", **text_defaults(tok)},
        "image_token_id": tok.context_image_token_id,
        "image_seq_length": (IMAGE_SIZE // patch // 2) ** 2,
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }
    config = config_of(InternVLConfig, defaults, overrides, "internvl")
    model = InternVLForConditionalGeneration(config)
    h, w = config.vision_config.image_size
    image_processor = GotOcr2ImageProcessor(
        size={"height": h, "width": w}, crop_to_patches=False, do_convert_rgb=True
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size={"height": h, "width": w}),
        image_seq_length=config.image_seq_length,
        chat_template=tok.chat_template,
    )
    return model, tok, processor
