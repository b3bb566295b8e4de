"""Knockout and bidirectional attention as additive float 4-D masks: the same under eager and sdpa.

Planted checks (SPECS-2 §3): a float causal 4-D mask equals the default forward; knocking out the edge
5<-3 changes position 5 and nothing before it; under a bidirectional mask over the image span, perturbing
image token 6 changes image token 2 but not text token 1, and under the causal mask it changes neither.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from explab.interventions import Bidirectional, Capture, Knockout, Positions, Steer, run_with_hooks

IMPLS = ("eager", "sdpa")
TOL = {"rtol": 1e-5, "atol": 1e-5}  # eager vs sdpa: the same mask, different kernels


def tiny_llama(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2,
    )
    model = T.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def ids_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 2."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def float_causal(n: int) -> torch.Tensor:
    blocked = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.zeros(1, 1, n, n).masked_fill(blocked, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("impl", IMPLS)
def test_float_causal_4d_mask_equals_the_default_forward(impl: str) -> None:
    model = tiny_llama(impl)
    ids = ids_batch()[0][:1]
    with torch.no_grad():
        default = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=float_causal(ids.shape[1])).logits
    torch.testing.assert_close(masked, default, **TOL)


def test_boolean_4d_mask_leaks_under_eager_which_is_why_masks_are_float() -> None:
    """The transformers 5.20 behaviour the float masks avoid: eager adds a bool mask (1/0) to the scores."""
    ids = ids_batch()[0][:1]
    allowed = ~torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        eager, sdpa = tiny_llama("eager"), tiny_llama("sdpa")
        ref = sdpa(input_ids=ids).logits
        torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=allowed).logits, ref, **TOL)
        assert not torch.allclose(eager(input_ids=ids, attention_mask=allowed).logits, ref, atol=1e-3)


def run(impl: str, ids: torch.Tensor, mask: torch.Tensor, specs: list) -> tuple[torch.Tensor, dict]:
    model = tiny_llama(impl)
    with torch.no_grad():
        out, s = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, specs)
    assert model.config._attn_implementation == impl  # masks keep the model's own attention
    return out.logits, s.captures


@pytest.mark.parametrize("impl", IMPLS)
def test_knockout_edge_5_from_3_changes_position_5_and_nothing_before(impl: str) -> None:
    ids, mask = ids_batch()
    edge = Knockout(queries=Positions(kind="indices", indices=[5]), keys=Positions(kind="indices", indices=[3]))
    base, _ = run(impl, ids, mask, [])
    ko, _ = run(impl, ids, mask, [edge])
    for b, pad in enumerate([0, 2]):
        torch.testing.assert_close(ko[b, pad : pad + 5], base[b, pad : pad + 5], **TOL)
        assert (ko[b, pad + 5] - base[b, pad + 5]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "spec",
    [
        Knockout(queries=Positions(kind="indices", indices=[5]), keys=Positions(kind="indices", indices=[3])),
        Knockout(layers=[1], queries=Positions(kind="span", start=4), keys="prompt"),  # every key: self kept
        Bidirectional(start=2, end=8),
        Bidirectional(layers=[0, 2], start=0, end=5),
    ],
    ids=["edge", "all-keys", "bidir", "bidir-layers"],
)
def test_every_mask_intervention_is_equal_under_eager_and_sdpa(spec: Knockout | Bidirectional) -> None:
    ids, mask = ids_batch()
    caps = [Capture(point="blocks.1.resid_post")]
    eager, ce = run("eager", ids, mask, [spec, *caps])
    sdpa, cs = run("sdpa", ids, mask, [spec, *caps])
    base, _ = run("eager", ids, mask, caps)
    real = mask.bool()  # pad queries are garbage either way (HF fills their rows differently per kernel)
    assert (eager - base)[real].abs().max() > 1e-3  # the intervention acts
    torch.testing.assert_close(sdpa[real], eager[real], **TOL)
    for a, b in zip(ce["blocks.1.resid_post"], cs["blocks.1.resid_post"], strict=True):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bidirectional_image_span_perturbing_image_token_6(impl: str) -> None:
    """Image span = positions 2..9 (marked by the image token id); token 6 is perturbed by a steer."""
    model = tiny_llama(impl)
    model.config.image_token_id = 63
    ids = ids_batch()[0][:1].clone()
    ids[0, 2:10] = 63
    bump = Steer(point="embed", vector=[1.0] * 32, positions=Positions(kind="image", indices=[4]))  # pos 6
    cap = Capture(point="blocks.2.resid_post")
    results = {}
    with torch.no_grad():
        for name, extra in [("causal", []), ("bidir", [Bidirectional(image=True)])]:
            _, s0 = run_with_hooks(model, ids, [*extra, cap])
            _, s1 = run_with_hooks(model, ids, [*extra, bump, cap])
            results[name] = (s0.captures[cap.point][0], s1.captures[cap.point][0])
    x0, x1 = results["bidir"]
    assert (x1[2] - x0[2]).abs().max() > 1e-3  # image token 2 (position 2) sees image token 6
    torch.testing.assert_close(x1[1], x0[1], rtol=0, atol=0)  # text token 1 does not
    c0, c1 = results["causal"]
    torch.testing.assert_close(c1[:6], c0[:6], rtol=0, atol=0)  # causally: neither
    assert (c1[6] - c0[6]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_image_masks_on_a_vlm_are_equal_under_eager_and_sdpa(family: str) -> None:
    """Bidirectional image attention and a knockout of text queries from image keys, on a tiny VLM."""
    import numpy as np

    from explab.models import load_model

    loaded = load_model(f"tiny:{family}")
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if family == "qwen2_5_vl" else "<image>"
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    inputs = dict(loaded.processor(images=[img], text=[f"{placeholder}What is it?"], return_tensors="pt"))
    image = Positions(kind="image")
    first = int((inputs["input_ids"][0] == loaded.model.config.image_token_id).nonzero()[0])
    text_after = Positions(kind="span", start=first + 16)
    cap, cap0 = Capture(point="blocks.1.resid_post"), Capture(point="blocks.0.resid_post")
    out = {}
    for impl in IMPLS:
        loaded.model.set_attn_implementation(impl)
        for name, specs in [("base", []), ("bidir", [Bidirectional(image=True)]),
                            ("ko", [Knockout(queries=text_after, keys=image)])]:
            with torch.no_grad():
                _, s = run_with_hooks(loaded.model, inputs, [*specs, cap, cap0])
            out[impl, name] = s.captures[cap.point][0]
            out[impl, name, 0] = s.captures[cap0.point][0]
    for name in ("bidir", "ko"):
        torch.testing.assert_close(out["sdpa", name], out["eager", name], **TOL)
    base, bi, ko = out["eager", "base", 0], out["eager", "bidir", 0], out["eager", "ko"]
    # bidirectional, in block 0: image tokens but the last now see later image tokens; nothing else moves
    assert torch.equal(bi[:first], base[:first]) and torch.equal(bi[first + 15 :], base[first + 15 :])
    assert ((bi[first : first + 15] - base[first : first + 15]).abs().amax(-1) > 1e-4).all()
    base = out["eager", "base"]
    # knockout of text after the image from the image: everything up to the image's end is untouched
    assert torch.equal(ko[: first + 16], base[: first + 16])
    assert (ko[first + 16 :] - base[first + 16 :]).abs().amax() > 1e-3
