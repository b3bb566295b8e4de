"""Image-token positions and spatial grids on the tiny VLM presets; presets save and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explab.errors import ExplabError
from explab.interventions import Capture, Positions, intervene, list_points
from explab.models import load_model, save_tiny

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "internvl")
IMAGE = Positions(kind="image")


def image(seed: int = 0, h: int = 32, w: int = 32) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def encode(loaded, images: list[np.ndarray]) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return dict(loaded.processor(images=images, text=[text] * len(images), return_tensors="pt",
                                 padding=True, add_special_tokens=False))


def captures(model, inputs: dict, keys: dict[str, Positions]) -> dict[str, list[list[torch.Tensor]]]:
    specs = [Capture(point=p, positions=pos) for p, pos in keys.items()]
    with torch.no_grad(), intervene(model, specs) as s:
        model(**inputs)
    return {k: s.grids(k) for k in keys}


@pytest.mark.parametrize("family", FAMILIES)
def test_grids_have_the_image_shape_and_the_llm_receives_the_projector_grid(family: str) -> None:
    loaded = load_model(f"tiny:{family}")
    model = loaded.model
    g = captures(model, encode(loaded, [image()]),
                 {"vision.blocks.-1": Positions(), "projector": Positions(), "embed": IMAGE})
    emb, proj = g["embed"][0], g["projector"]
    assert all(t.shape == (4, 4, 64) for t in emb[:1])  # a 32x32 image is a 4x4 grid in the LLM
    if family == "qwen2_5_vl":
        (tower,) = g["vision.blocks.-1"][0]  # 8x8 patches of 4px, merged 2x2 into the 4x4 LLM grid
        assert tower.shape == (8, 8, 32)
        units = tower.reshape(4, 2, 4, 2, 32).permute(0, 2, 1, 3, 4).reshape(16, 4 * 32)
        merger = model.model.visual.merger
        merged = merger.mlp(merger.ln_q(units.view(64, 32)).view(16, -1))
        torch.testing.assert_close(merged.view(4, 4, 64), proj[0][0])
    else:  # CLS dropped; InternViT has 4px patches (8x8), pixel-shuffled 2x2 before its projector
        side = 8 if family == "internvl" else 4
        assert all(t.shape[:2] == (side, side) for row in g["vision.blocks.-1"] for t in row)
    # the embedding stream at the image positions is exactly the projector's output, cell by cell
    assert torch.equal(emb[0], proj[0][0])
    if family == "llava_next":
        assert len(emb) == 2 and emb[1].shape == (4, 4, 64)  # base view + high-res view of a square image
    if family == "internvl":
        assert len(emb) == len(proj) and all(torch.equal(e, p[0]) for e, p in zip(emb, proj, strict=True))


def test_llava_grids_follow_the_vision_towers_patch_order() -> None:
    """Without attention in the tower, a pixel change inside patch (r, c) moves exactly grid cell (r, c)."""
    loaded = load_model("tiny:llava")
    model = loaded.model
    for layer in model.model.vision_tower.encoder.layers:
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.out_proj.bias)
    a = image(1)
    b = a.copy()
    b[8:16, 16:24] = 255 - b[8:16, 16:24]  # patch row 1, column 2 (8px patches)
    keys = {"vision.blocks.0": Positions(), "projector": Positions(), "blocks.0.resid_pre": IMAGE}
    ga, gb = captures(model, encode(loaded, [a]), keys), captures(model, encode(loaded, [b]), keys)
    cell = torch.zeros(4, 4, dtype=torch.bool)
    cell[1, 2] = True
    for k in keys:
        changed = (ga[k][0][0] - gb[k][0][0]).abs().amax(-1) > 1e-6
        assert torch.equal(changed, cell), k
    # the projector reads vision layer -2 (= block 0 here): the grid is the projected tower grid
    projected = model.model.multi_modal_projector(ga["vision.blocks.0"][0][0])
    torch.testing.assert_close(projected, ga["projector"][0][0])


def test_image_positions_per_row_with_padding() -> None:
    loaded = load_model("tiny:llava")
    inputs = encode(loaded, [image(0), image(1)])
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:1], inputs["input_ids"][1:]])
    ids = inputs["input_ids"]
    tok = loaded.model.config.image_token_id
    spec = Capture(point="embed", positions=Positions(kind="image", indices=[0, 5]))
    with torch.no_grad(), intervene(loaded.model, [spec]) as s:
        loaded.model(**inputs)
    first = int((ids[0] == tok).nonzero()[0])
    assert [p.tolist() for p in s.capture_positions["embed"]] == [[first, first + 5]] * 2
    with pytest.raises(ExplabError, match="tower point"):
        intervene(loaded.model, [Capture(point="projector", positions=IMAGE)]).__enter__()


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_vlm_preset_saves_and_reloads_with_identical_logits(family: str, tmp_path) -> None:
    built = load_model(f"tiny:{family}")
    reloaded = load_model(str(save_tiny(f"tiny:{family}", tmp_path / family)))
    assert type(reloaded.processor) is type(built.processor)
    outs = []
    for m in (built, reloaded):
        with torch.no_grad():
            outs.append(m.model(**encode(m, [image(2, 32, 48)])).logits)
    assert torch.equal(outs[0], outs[1])
    points = set(list_points(reloaded.model))
    assert {"projector", "vision.blocks.0", "vision.blocks.1", "blocks.1.resid_post"} <= points
