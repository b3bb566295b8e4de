"""explab.interventions: hook points, captures, steering, projection, knockout, bidirectional attention."""

from __future__ import annotations

import pickle

import pytest
import torch
import transformers as T

from explab.errors import ExplabError
from explab.interventions import (
    Bidirectional,
    Capture,
    Knockout,
    Positions,
    ProjectOut,
    Steer,
    intervene,
    list_points,
    n_layers,
    paragraph_index,
    parse_intervention,
    run_with_hooks,
)

V, D, L = 48, 32, 3


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=V, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "gpt2":
        cfg = T.GPT2Config(n_embd=D, n_layer=L, n_head=4, n_positions=128, initializer_range=0.2, **common)
        return T.GPT2LMHeadModel(cfg).eval()
    arch = dict(
        hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2
    )
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(initializer_range=0.2, **arch, **common)).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(initializer_range=0.2, **arch, **common)).eval()


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vc = T.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    tc = T.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return T.LlavaForConditionalGeneration(
        T.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=V - 1)
    ).eval()


def padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random token batch; pads are id 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids, mask = torch.zeros(len(lengths), n, dtype=torch.long), torch.zeros(len(lengths), n, dtype=torch.long)
    for b, k in enumerate(lengths):
        ids[b, n - k :] = torch.randint(3, V - 1, (k,), generator=g)
        mask[b, n - k :] = 1
    return ids, mask


def layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


# -- hook points and captures ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_capture_matches_hidden_states(kind: str) -> None:
    model = tiny(kind)
    ids, mask = padded_batch([7, 4, 6])
    specs = [Capture(point=f"blocks.{i}.resid_post") for i in range(L)] + [
        Capture(point="embed"),
        Capture(point="final"),
    ]
    with torch.no_grad():
        out, s = run_with_hooks(
            model, {"input_ids": ids, "attention_mask": mask}, specs, output_hidden_states=True
        )
    hs = out.hidden_states
    for b, n in enumerate(mask.sum(1).tolist()):
        real = slice(ids.shape[1] - n, None)  # captures hold only the real (non-pad) positions
        for i in range(L - 1):
            assert torch.equal(s.captures[f"blocks.{i}.resid_post"][b], hs[i + 1][b, real])
        assert torch.equal(s.captures["embed"][b], hs[0][b, real])
        assert torch.equal(s.captures["final"][b], hs[L][b, real])  # HF's last entry is after the final norm
        final_norm = model.transformer.ln_f if kind == "gpt2" else model.model.norm
        last = final_norm(s.captures[f"blocks.{L - 1}.resid_post"][b])
        torch.testing.assert_close(last, hs[L][b, real])
        assert s.capture_positions["embed"][b].tolist() == list(range(n))


def test_points_listing_and_errors() -> None:
    model = tiny("llama")
    assert n_layers(model) == L
    names = list_points(model)
    assert {"embed", "final", "blocks.2.attn.pattern", "blocks.0.mlp_out"} <= set(names)
    assert not any(n.startswith("vision") for n in names)
    with pytest.raises(ExplabError, match="unknown hook point"):
        intervene(model, [Capture(point="blocks.0.resid_middle")]).__enter__()
    with pytest.raises(ExplabError, match="out of range"):
        intervene(model, [Capture(point=f"blocks.{L}.resid_post")]).__enter__()
    with pytest.raises(ExplabError, match="hidden size"):
        intervene(model, [Steer(point="blocks.0.resid_post", vector=[1.0, 2.0])]).__enter__()
    with pytest.raises(ExplabError, match="vision"):
        intervene(model, [Capture(point="vision.blocks.0")]).__enter__()
    with pytest.raises(ExplabError, match="out of range"):
        intervene(model, [Knockout(layers=[7], queries="all", keys="prompt")]).__enter__()
    with pytest.raises(ExplabError, match="type is one of"):
        parse_intervention({"type": "ablate", "point": "embed"})
    with pytest.raises(ExplabError, match="paragraph"):
        parse_intervention({"type": "capture", "point": "embed", "positions": {"kind": "paragraph"}})
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_specs_are_plain_data() -> None:
    raw = {
        "type": "steer",
        "point": "blocks.1.resid_post",
        "vector": [0.5] * D,
        "alpha": 4,
        "positions": "generated",
    }
    spec = parse_intervention(raw)
    assert isinstance(spec, Steer) and spec.positions == Positions(kind="generated")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert parse_intervention(spec.model_dump()) == spec
    k = parse_intervention(
        {
            "type": "knockout",
            "queries": {"kind": "span", "start": 3},
            "keys": {"kind": "indices", "indices": [0]},
        }
    )
    assert isinstance(k, Knockout) and k.layers is None


def test_llava_points() -> None:
    model = tiny_llava()
    n_img_tok = 16  # (32 / 8) ** 2 patches, CLS dropped by the default feature strategy
    ids = torch.cat(
        [torch.tensor([[2, 5]]), torch.full((1, n_img_tok), V - 1), torch.tensor([[7, 8, 9]])], 1
    ).repeat(2, 1)
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    specs = [
        Capture(point="blocks.0.resid_post"),
        Capture(point="projector"),
        Capture(point="vision.blocks.1"),
    ]
    assert "projector" in list_points(model) and "vision.blocks.1" in list_points(model)
    with torch.no_grad():
        out, s = run_with_hooks(
            model, {"input_ids": ids, "pixel_values": pix}, specs, output_hidden_states=True
        )
        vis = model.model.vision_tower(pix, output_hidden_states=True).hidden_states
    assert torch.equal(s.captures["blocks.0.resid_post"][1], out.hidden_states[1][1])
    assert [t.shape for t in s.captures["projector"]] == [(n_img_tok, D)] * 2
    assert [t.shape for t in s.captures["vision.blocks.1"]] == [(n_img_tok + 1, 24)] * 2
    assert torch.equal(s.captures["vision.blocks.1"][0], vis[2][0])


def test_open_clip_towers() -> None:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),
        text_cfg=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2),
    ).eval()
    assert {"vision.blocks.1", "text.blocks.0"} <= set(list_points(model))
    img, txt = torch.randn(3, 3, 32, 32), torch.randint(1, 64, (2, 12))
    v = torch.randn(32)
    specs = [Capture(point="vision.blocks.1"), Capture(point="text.blocks.0")]
    with torch.no_grad():
        _, s = run_with_hooks(model, {"image": img, "text": txt}, specs)
        base = model.encode_image(img)
        with intervene(
            model,
            [
                Steer(
                    point="vision.blocks.1",
                    vector=v.tolist(),
                    positions=Positions(kind="indices", indices=[0]),
                )
            ],
        ):
            steered = model.encode_image(img)
    assert [t.shape for t in s.captures["vision.blocks.1"]] == [(17, 32)] * 3
    assert [t.shape for t in s.captures["text.blocks.0"]] == [(12, 32)] * 2
    assert not torch.allclose(base, steered)


# -- steering and projection ------------------------------------------------------------------------


def _hand_hook(model: torch.nn.Module, point: str, vec: torch.Tensor, cols: list[list[int]]):
    """A hand-written hook adding ``vec`` at tensor columns ``cols[b]`` of row b."""
    i, what = int(point.split(".")[1]), point.split(".", 2)[2]
    layer = layers_of(model)[i]

    def add(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for b, cs in enumerate(cols):
            x[b, cs] += vec
        return x

    if what == "resid_pre":
        return layer.register_forward_pre_hook(lambda m, a: (add(a[0]), *a[1:]))
    mod = {
        "resid_post": layer,
        "mlp_out": layer.mlp,
        "attn_out": getattr(layer, "self_attn", None) or getattr(layer, "attn", None),
    }[what]
    return mod.register_forward_hook(
        lambda m, a, o: add(o) if isinstance(o, torch.Tensor) else (add(o[0]), *o[1:])
    )


@pytest.mark.parametrize(
    ("kind", "point"),
    [
        ("llama", "blocks.1.resid_post"),
        ("llama", "blocks.1.resid_pre"),
        ("qwen2", "blocks.0.mlp_out"),
        ("gpt2", "blocks.1.attn_out"),
    ],
)
def test_steer_equals_hand_written_hook(kind: str, point: str) -> None:
    model = tiny(kind)
    ids, mask = padded_batch([8, 5])
    pad = (ids.shape[1] - mask.sum(1)).tolist()
    v, alpha = torch.randn(D, generator=torch.Generator().manual_seed(3)), 2.5
    spec = Steer(
        point=point, vector=v.tolist(), alpha=alpha, positions=Positions(kind="span", start=1, end=4)
    )
    with torch.no_grad():
        ours, s = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [spec])
        h = _hand_hook(model, point, alpha * v, [[p + j for j in range(1, 4)] for p in pad])
        try:
            hand = model(input_ids=ids, attention_mask=mask)
        finally:
            h.remove()
        plain = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(ours.logits, hand.logits)
    assert s.n_applied == [6]
    # positions before the span see no change at all; after it, the steer propagates
    for b, p in enumerate(pad):
        assert torch.equal(ours.logits[b, p : p + 1], plain.logits[b, p : p + 1])
        assert not torch.allclose(ours.logits[b, p + 1], plain.logits[b, p + 1])


def test_steer_and_project_at_point() -> None:
    model = tiny("llama")
    ids, mask = padded_batch([6, 9])
    v = torch.randn(D, generator=torch.Generator().manual_seed(4))
    u = v / v.norm()
    pt = "blocks.1.resid_post"
    pos = Positions(kind="indices", indices=[0, -1])  # first token and last prompt token of each row
    with torch.no_grad():
        _, base = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [Capture(point=pt)])
        _, st = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [Steer(point=pt, vector=v.tolist(), alpha=3.0, positions=pos), Capture(point=pt)],
        )
        _, pr = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [ProjectOut(point=pt, direction=v.tolist(), positions=pos), Capture(point=pt)],
        )
    for b, n in enumerate([6, 9]):
        x0, xs, xp = base.captures[pt][b], st.captures[pt][b], pr.captures[pt][b]
        for j in range(n):
            if j in (0, n - 1):
                torch.testing.assert_close(xs[j] - x0[j], 3.0 * v)
                assert abs(float(xp[j] @ u)) < 1e-5 < abs(float(x0[j] @ u))
                torch.testing.assert_close(xp[j], x0[j] - (x0[j] @ u) * u)
            else:  # outside the set: bitwise unchanged at the point
                assert torch.equal(xs[j], x0[j]) and torch.equal(xp[j], x0[j])
    # specs at one point run in order: a capture listed before the steer sees the unsteered value
    with torch.no_grad():
        _, st2 = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [Capture(point=pt, name="before"), Steer(point=pt, vector=v.tolist(), positions=pos)],
        )
    for b in range(2):
        assert torch.equal(st2.captures["before"][b], base.captures[pt][b])


# -- attention: patterns, knockout, bidirectional ---------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pattern_capture(kind: str) -> None:
    model = tiny(kind)
    ids, mask = padded_batch([7, 4])
    before = model.config._attn_implementation
    with torch.no_grad():
        out, s = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [Capture(point="blocks.1.attn.pattern")],
            output_attentions=True,
        )
    assert model.config._attn_implementation == before  # switched to eager only inside the block
    for b, n in enumerate([7, 4]):
        p = s.captures["blocks.1.attn.pattern"][b]  # (query, head, key position)
        assert p.shape == (n, 4, n)
        torch.testing.assert_close(p.sum(-1), torch.ones(n, 4))
        hf = out.attentions[1][b, :, -n:, -n:].transpose(0, 1)
        torch.testing.assert_close(p, hf)
        assert torch.all(torch.triu(p.transpose(0, 1), diagonal=1) == 0)


def test_knockout_changes_only_affected_queries() -> None:
    model = tiny("llama")
    model.set_attn_implementation("eager")  # the baseline must use the same kernels as the knockout run
    ids, mask = padded_batch([9, 7])
    knock = Knockout(
        layers=[0, 1], queries=Positions(kind="span", start=4), keys=Positions(kind="indices", indices=[1])
    )
    pt = "blocks.0.attn.pattern"
    with torch.no_grad():
        base, _ = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [])
        ko, s = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [knock, Capture(point=pt)])
    for b, n in enumerate([9, 7]):
        p0 = ids.shape[1] - n
        assert torch.equal(
            ko.logits[b, p0 : p0 + 4], base.logits[b, p0 : p0 + 4]
        )  # queries before 4 untouched
        for j in range(4, n):
            assert not torch.allclose(ko.logits[b, p0 + j], base.logits[b, p0 + j])
        pat = s.captures[pt][b]
        assert torch.all(pat[4:, :, 1] == 0) and torch.all(pat[1:4, :, 1] > 0)
        torch.testing.assert_close(pat.sum(-1), torch.ones(n, 4))


def test_bidirectional_span() -> None:
    model = tiny("qwen2")
    model.set_attn_implementation("eager")
    ids, mask = padded_batch([10, 8])
    start, end = 2, 6
    specs = [Capture(point="blocks.0.resid_post"), Capture(point="blocks.2.resid_post")]
    with torch.no_grad():
        _, base = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, specs)
        _, bi = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [Bidirectional(layers=[0], start=start, end=end), *specs],
        )
    for b in range(2):
        x0, x1 = base.captures["blocks.0.resid_post"][b], bi.captures["blocks.0.resid_post"][b]
        # first layer where it applies: before the span and from the span's last token on, nothing changes
        # (the last span token already saw the whole span; later tokens attend causally as before);
        # span tokens that now see later span tokens change
        assert torch.equal(x1[:start], x0[:start]) and torch.equal(x1[end - 1 :], x0[end - 1 :])
        for j in range(start, end - 1):
            assert not torch.allclose(x1[j], x0[j])
        y0, y1 = base.captures["blocks.2.resid_post"][b], bi.captures["blocks.2.resid_post"][b]
        assert torch.equal(y1[:start], y0[:start]) and not torch.allclose(y1[end:], y0[end:])


# -- position semantics -----------------------------------------------------------------------------


def test_positions_per_sequence_with_prompt_lengths_and_paragraphs() -> None:
    model = tiny("llama")
    ids, mask = padded_batch([9, 6])
    P = [4, 2]
    with torch.no_grad():
        _, s = run_with_hooks(
            model,
            {"input_ids": ids, "attention_mask": mask},
            [
                Capture(point="embed", name="gen", positions=Positions(kind="generated")),
                Capture(point="embed", name="prompt", positions=Positions(kind="prompt")),
                Capture(point="embed", name="last", positions=Positions(kind="last")),
                Capture(point="embed", name="neg", positions=Positions(kind="indices", indices=[-1, 0])),
            ],
            prompt_lengths=P,
        )
    cp = s.capture_positions
    assert [t.tolist() for t in cp["gen"]] == [list(range(4, 9)), list(range(2, 6))]
    assert [t.tolist() for t in cp["prompt"]] == [[0, 1, 2, 3], [0, 1]]
    assert [t.tolist() for t in cp["last"]] == [[8], [5]]
    assert [t.tolist() for t in cp["neg"]] == [[0, 3], [0, 1]]
    assert paragraph_index("\n\nab\n \ncd\n\n\n") == 2 and paragraph_index("ab\n") == 0


def test_hooks_removed_and_attention_restored() -> None:
    model = tiny("llama")
    with intervene(model, [Knockout(queries="all", keys="prompt"), Capture(point="blocks.0.attn.pattern")]):
        assert model.config._attn_implementation == "eager"
        assert any(m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
