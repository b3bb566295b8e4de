"""explab.models: tiny presets, the byte tokenizer, save/reload through the real loader, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from explab.errors import ModelError
from explab.models import TINY_FAMILIES, LoadedModel, ModelSpec, build_tiny, load_model, save_tiny
from explab.models.tokenizer import byte_tokenizer

KINDS = {
    "llama": "causal_lm",
    "qwen": "causal_lm",
    "gpt2": "causal_lm",
    "phi3": "causal_lm",
    "llava": "vlm",
    "llava_next": "vlm",
    "qwen2_5_vl": "vlm",
    "internvl": "vlm",
    "clip": "clip",
    "vae": "vae",
}


VLM_PLACEHOLDERS = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>"}


def _image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@torch.no_grad()
def _forward(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Run the model on a fixed input; returns the outputs to compare, after checking their shapes."""
    model, kind = loaded.model, loaded.kind
    if kind == "causal_lm":
        ids = loaded.tokenizer(["hello world", "hi"], return_tensors="pt", padding=True)
        logits = model(**ids).logits
        assert logits.shape == (2, ids["input_ids"].shape[1], len(loaded.tokenizer))
        return {"logits": logits}
    if kind == "vlm":
        placeholder = VLM_PLACEHOLDERS.get(model.config.model_type, "<image>")
        inputs = loaded.processor(images=_image(), text=f"describe {placeholder} now", return_tensors="pt")
        image_id = model.config.image_token_id
        n_image = int((inputs["input_ids"] == image_id).sum())
        if model.config.model_type == "llava":
            n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
            assert n_image == n_patches
        else:  # tiles / dynamic resolution: as many image tokens as the tower yields features
            vision = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
            pooled = model.model.get_image_features(**vision).pooler_output
            pooled = pooled if isinstance(pooled, (list, tuple)) else [pooled]
            assert n_image == sum(f.numel() // f.shape[-1] for f in pooled) > 0
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, len(loaded.tokenizer))
        return {"logits": logits}
    if kind == "clip":
        image = loaded.processor(_image()).unsqueeze(0)
        text = loaded.tokenizer(["a photo of a cat", "a dog"])
        img, txt = model.encode_image(image), model.encode_text(text)
        assert img.shape == (1, 32) and txt.shape == (2, 32)
        return {"image": img, "text": txt}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode(x).latent_dist.mean
    assert latents.shape == (2, model.config.latent_channels, 16, 16)
    recon = model.decode(latents).sample
    assert recon.shape == x.shape
    return {"latents": latents, "recon": recon}


# the diffusers pipelines (tiny:flux, tiny:sd) have their own build/save/reload test in test_diffuser.py
@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f not in ("flux", "sd")])
def test_tiny_builds_deterministically_and_reloads(family: str, tmp_path: Path) -> None:
    a, b = build_tiny(f"tiny:{family}"), load_model(f"tiny:{family}")
    assert a.kind == b.kind == KINDS[family] and a.source == f"tiny:{family}"
    assert not a.model.training and a.dtype == torch.float32 and a.device.type == "cpu"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    before = _forward(a)

    path = save_tiny(f"tiny:{family}", tmp_path / family)
    rng = torch.random.get_rng_state()
    reloaded = load_model(str(path))
    assert torch.equal(rng, torch.random.get_rng_state())  # loading leaves the global RNG alone
    assert reloaded.kind == KINDS[family] and reloaded.source == str(path.resolve())
    after = _forward(reloaded)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    if reloaded.tokenizer is not None and hasattr(reloaded.tokenizer, "padding_side"):
        assert reloaded.tokenizer.padding_side == "left" and reloaded.tokenizer.pad_token is not None


def test_different_families_differ() -> None:
    llama, qwen = build_tiny("tiny:llama").model, build_tiny("tiny:qwen").model
    assert type(llama).__name__ == "LlamaForCausalLM" and type(qwen).__name__ == "Qwen2ForCausalLM"
    assert qwen.config.tie_word_embeddings and any(
        n.endswith("q_proj.bias") for n, _ in qwen.named_parameters()
    )


def test_bfloat16_dtype() -> None:
    loaded = load_model({"name": "tiny:llama", "dtype": "bfloat16", "device": "cpu"})
    assert loaded.dtype == torch.bfloat16
    ids = loaded.tokenizer("abc", return_tensors="pt")
    assert loaded.model(**ids).logits.dtype == torch.bfloat16


TEXTS = [
    "",
    "plain ascii",
    "héllo wörld ✓ — 日本語 🚀🧪",
    "cafe\u0301 vs caf\u00e9",
    "  lead\tand\r\ntrail  ",
    "\x00\x7f",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_is_context_free(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids) == text
    prefix = "Let me think: "
    joined = tok(prefix + text, add_special_tokens=False)["input_ids"]
    assert joined == tok(prefix, add_special_tokens=False)["input_ids"] + ids
    assert tok(text)["input_ids"] == [tok.bos_token_id, *ids]


def test_tokenizer_round_trips_through_save(tmp_path: Path) -> None:
    path = save_tiny("tiny:qwen", tmp_path / "qwen")  # AutoTokenizer would swap in Qwen2Tokenizer (NFC)
    tok = load_model(str(path)).tokenizer
    for text in TEXTS:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template() -> None:
    tok = build_tiny("tiny:llama").tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|assistant|>") in ids
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_gen.endswith("<|assistant|>\n")


def test_llava_chat_template_with_image_parts() -> None:
    loaded = build_tiny("tiny:llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\n<image>what is it?<|end|>\n<|assistant|>\n"
    inputs = loaded.processor(images=_image(1), text=prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_tiny_overrides_change_config() -> None:
    spec = ModelSpec(
        name="tiny:llama", tiny={"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 6}
    )
    config = build_tiny(spec).model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (3, 96, 16)
    llava = build_tiny(
        ModelSpec(name="tiny:llava", tiny={"text_config": {"num_hidden_layers": 1}})
    ).model.config
    assert llava.text_config.num_hidden_layers == 1 and llava.text_config.hidden_size == 64
    clip = build_tiny(ModelSpec(name="tiny:clip", tiny={"embed_dim": 16, "vision_cfg": {"layers": 1}}))
    assert clip.model.encode_image(clip.processor(_image()).unsqueeze(0)).shape == (1, 16)
    vae = build_tiny(ModelSpec(name="tiny:vae", tiny={"latent_channels": 16})).model
    assert vae.config.latent_channels == 16


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "tiny:llama", "tiny": {"num_layers": 2}}, "unknown tiny override 'num_layers'"),
        ({"name": "tiny:llava", "tiny": {"text_config": {"bogus": 1}}}, r"tiny:llava\.text_config"),
        ({"name": "tiny:vae", "tiny": {"channels": 1}}, "unknown tiny override"),
        ({"name": "tiny:mamba"}, "unknown tiny model family 'tiny:mamba'.*tiny:llama"),
        ({"name": "/no/such/model/dir"}, "model path '/no/such/model/dir' does not exist"),
        ({"name": "./missing-model"}, "does not exist"),
        ({"name": "tiny:llama", "kind": "clip"}, "is a causal_lm model but the spec asks for kind='clip'"),
    ],
)
def test_bad_specs_raise_model_error(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_model(spec)


def test_unknown_hub_id_raises_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(
        ModelError, match="could not load model 'no-such-org/no-such-model' from the Hugging Face"
    ):
        load_model("no-such-org/no-such-model")


def test_local_dir_kind_mismatch_and_bad_dir(tmp_path: Path) -> None:
    path = save_tiny("tiny:vae", tmp_path / "vae")
    with pytest.raises(ModelError, match="is a vae model but the spec asks for kind='causal_lm'"):
        load_model(ModelSpec(name=str(path), kind="causal_lm"))
    assert load_model(ModelSpec(name=str(path), kind="vae")).kind == "vae"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(empty))
