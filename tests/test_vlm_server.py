"""Image grids and image-span masks through the shared HookedModel server (a real local Ray)."""

import numpy as np
import torch

from explab.interventions import Bidirectional, Capture, Positions, intervene
from explab.models import load_model
from explab.servers import get_server, stop_server

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def test_qwen2_5_vl_grids_through_the_server_equal_the_in_process_session(ray_local):
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    text = f"{QWEN_IMAGE}Describe the image."
    specs = [
        Capture(point="vision.blocks.0"),
        Capture(point="projector"),
        Capture(point="blocks.1.resid_post", positions=Positions(kind="image")),
        Bidirectional(image=True),
    ]
    wire = [s.model_dump() for s in specs]
    handle = get_server("hooked", "tiny:qwen2_5_vl", {"max_wait_ms": 20})
    try:
        keys = ["vision.blocks.0", "projector", "blocks.1.resid_post"]
        got = handle.forward([{"text": text, "images": [img], "interventions": wire, "grids": keys}
                              for img in images])
    finally:
        stop_server(handle.name)
    loaded = load_model("tiny:qwen2_5_vl")
    for img, result in zip(images, got, strict=True):
        inputs = dict(loaded.processor(images=[img], text=[text], return_tensors="pt"))
        with torch.no_grad(), intervene(loaded.model, specs) as s:
            loaded.model(**inputs)
        assert [g.shape for g in result.grids["vision.blocks.0"]] == [(8, 8, 32)]
        assert [g.shape for g in result.grids["blocks.1.resid_post"]] == [(4, 4, 64)]
        for key in keys:
            (ref,) = [g for row in s.grids(key) for g in row]
            np.testing.assert_allclose(result.grids[key][0], ref.numpy(), atol=1e-5)


def test_chat_messages_with_images_match_the_training_encoding_and_return_the_greedy_token(ray_local):
    # the server renders messages + images with the processor's chat template; the last-position logits
    # equal an in-process pass over the encoding explab.train uses (template BOS, no second one)
    rng = np.random.default_rng(1)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    messages = [{"role": "user", "content": "Which colour? Answer with a letter."}]
    handle = get_server("hooked", "tiny:llava", {"max_wait_ms": 20})
    try:
        got = handle.forward([{"messages": messages, "images": [img], "return_logits": "last",
                               "assistant_prefix": prefix} for img, prefix in zip(images, ["", "("], strict=True)])
    finally:
        stop_server(handle.name)
    loaded = load_model("tiny:llava")
    proc = loaded.processor
    for img, prefix, result in zip(images, ["", "("], got, strict=True):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": messages[0]["content"]}]}]
        text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + prefix
        inputs = dict(proc(images=[img], text=[text], return_tensors="pt", add_special_tokens=False))
        with torch.no_grad():
            ref = loaded.model(**inputs).logits[0, -1]
        assert result.token_ids == inputs["input_ids"][0].tolist()
        np.testing.assert_allclose(result.logits, ref.numpy(), atol=1e-4)
        assert result.next_token == loaded.tokenizer.decode([int(ref.argmax())], skip_special_tokens=True)
