"""Diffusion: tiny:flux / tiny:sd presets, latent interventions, attention maps, the `Diffuser` server."""

import numpy as np
import pytest
import torch

from explab.errors import ExplabError
from explab.interventions.latents import (
    AddVector,
    LatentEditor,
    ReplaceSubspace,
    apply_latent_intervention,
    subspace_coordinates,
)
from explab.models import diffusion as D
from explab.models import load_model, save_tiny

SIZE = (32, 32)
STEPS = 4
TEXT = 32  # FLUX's T5 length in these tests


def run(pipe, prompts, seeds, callback=None, output_type="latent", steps=STEPS, guidance=3.5):
    kwargs = {"max_sequence_length": TEXT} if D.pipeline_family(pipe) == "flux" else {}
    return pipe(
        prompts,
        height=SIZE[0],
        width=SIZE[1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type=output_type,
        callback_on_step_end=callback,
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def flux():
    return load_model("tiny:flux").model


@pytest.fixture(scope="module")
def sd():
    return load_model("tiny:sd").model


def orthonormal(k, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, k, generator=g))
    return q.T.contiguous()  # k x C


# ---------------------------------------------------------------- latent interventions (pure)


@pytest.mark.parametrize("shape", [(64, 64), (4, 8, 8)], ids=["flux-packed", "unet-chw"])
def test_subspace_replacement_changes_only_the_subspace_on_masked_tokens(shape):
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(*shape, generator=g)
    tokens = latent if latent.dim() == 2 else latent.flatten(1).T
    n, c = tokens.shape
    basis = orthonormal(min(3, c - 1), c)
    origin = torch.randn(c, generator=g)
    mask = (torch.rand(n, generator=g) < 0.5).tolist()
    target = [0.5, -1.0, 2.0][: basis.shape[0]]
    spec = ReplaceSubspace(step=0, basis=basis.tolist(), target=target, origin=origin.tolist(), mask=mask)
    out = apply_latent_intervention(latent, spec)
    out_tokens = out if out.dim() == 2 else out.flatten(1).T
    m = torch.tensor(mask)
    # the masked tokens' coordinates are the target
    coords = subspace_coordinates(out_tokens, basis, origin)
    torch.testing.assert_close(coords[m], torch.tensor(target).expand(int(m.sum()), -1), atol=1e-5, rtol=0)
    # unmasked tokens are untouched, bit for bit
    assert torch.equal(out_tokens[~m], tokens[~m])
    # the orthogonal complement of every token is unchanged
    complement = torch.eye(c) - basis.T @ basis
    torch.testing.assert_close((out_tokens - tokens) @ complement, torch.zeros(n, c), atol=1e-5, rtol=0)


def test_subspace_mean_mode_moves_the_mean_and_keeps_each_deviation():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(64, 64, generator=g)
    basis = orthonormal(3, 64, seed=3)
    mask = [i % 3 != 0 for i in range(64)]
    spec = ReplaceSubspace(step=0, basis=basis.tolist(), target=[1.0, 2.0, 3.0], mask=mask, mode="mean")
    out = apply_latent_intervention(tokens, spec)
    m = torch.tensor(mask)
    before, after = subspace_coordinates(tokens, basis)[m], subspace_coordinates(out, basis)[m]
    torch.testing.assert_close(after.mean(0), torch.tensor([1.0, 2.0, 3.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(after - after.mean(0), before - before.mean(0), atol=1e-5, rtol=0)


def test_add_vector_adds_only_on_masked_tokens():
    tokens = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    vector = torch.arange(8.0)
    mask = [i < 5 for i in range(16)]
    out = apply_latent_intervention(tokens, AddVector(step=0, vector=vector.tolist(), scale=0.5, mask=mask))
    torch.testing.assert_close(out[:5], tokens[:5] + 0.5 * vector)
    assert torch.equal(out[5:], tokens[5:])


def test_bad_latent_interventions_are_refused_in_one_line():
    with pytest.raises(ValueError, match="orthonormal"):
        ReplaceSubspace(step=0, basis=[[1.0, 1.0]], target=[0.0])
    with pytest.raises(ValueError, match="coordinates"):
        ReplaceSubspace(step=0, basis=[[1.0, 0.0]], target=[0.0, 1.0])
    with pytest.raises(ExplabError, match="token mask of 3 entries"):
        apply_latent_intervention(torch.zeros(4, 2), AddVector(step=0, vector=[1.0, 0.0], mask=[True] * 3))
    editor = LatentEditor([[STEPS]], [[]])
    with pytest.raises(ExplabError, match=f"names step {STEPS} of a {STEPS}-step run"):
        editor.check_steps(STEPS)


# ---------------------------------------------------------------- through the real pipelines


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_captured_latent_equals_what_the_pipelines_own_callback_sees(family, request):
    pipe = request.getfixturevalue(family)
    seen = {}

    def own(p, step, timestep, kwargs):
        seen[step] = kwargs["latents"].clone()
        return kwargs

    run(pipe, ["a red car", "sky"], [5, 6], callback=own)
    editor = LatentEditor([[0, 2], [1, 3]], [[], []])
    run(pipe, ["a red car", "sky"], [5, 6], callback=editor)
    for row, steps in enumerate([[0, 2], [1, 3]]):
        assert sorted(editor.captures[row]) == steps
        for t in steps:
            assert torch.equal(editor.captures[row][t], seen[t][row])


def test_an_edit_at_step_t_is_what_the_next_step_denoises(flux):
    basis = orthonormal(3, 64, seed=7)
    spec = ReplaceSubspace(step=1, basis=basis.tolist(), target=[3.0, -3.0, 1.0])
    edited = LatentEditor([[1, 2]], [[spec]])
    run(flux, ["a red car"], [9], callback=edited)

    expected = {}

    def by_hand(p, step, timestep, kwargs):  # the same edit written into the loop by hand
        if step == 1:
            kwargs["latents"] = torch.stack([apply_latent_intervention(kwargs["latents"][0], spec)])
        expected[step] = kwargs["latents"].clone()
        return kwargs

    run(flux, ["a red car"], [9], callback=by_hand)
    plain = LatentEditor([[2]], [[]])
    run(flux, ["a red car"], [9], callback=plain)
    assert torch.equal(edited.captures[0][2], expected[2][0])
    assert not torch.allclose(edited.captures[0][2], plain.captures[0][2])


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_decode_of_the_final_latent_is_the_pipelines_image_and_encode_has_its_layout(family, request):
    pipe = request.getfixturevalue(family)
    final = run(pipe, ["a red car"], [3])
    own = D.to_uint8(run(pipe, ["a red car"], [3], output_type="np"))
    ours = D.decode(pipe, final, *SIZE)
    assert ours.shape == (1, *SIZE, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - own).max() <= 1  # one rounding step at most
    z = D.encode(pipe, ours)
    assert tuple(z.shape) == (1, *D.latent_shape(pipe, *SIZE)) == tuple(final.shape)
    assert torch.isfinite(z).all()
    sampled = D.encode(pipe, ours, [torch.Generator().manual_seed(0)])
    assert sampled.shape == z.shape and not torch.equal(sampled, z)
    again = D.decode(pipe, z, *SIZE)
    assert again.shape == ours.shape and again.dtype == np.uint8


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_save_and_reload_gives_identical_images(family, request, tmp_path):
    pipe = request.getfixturevalue(family)
    built = load_model(f"tiny:{family}")  # two builds are identical
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            a, b = module.state_dict(), built.model.components[name].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name
    path = save_tiny(f"tiny:{family}", tmp_path / family)
    assert (path / "model_index.json").is_file()
    rng = torch.random.get_rng_state()
    loaded = load_model(str(path))
    assert torch.equal(rng, torch.random.get_rng_state())  # loading leaves the global RNG alone
    assert loaded.kind == "diffusion" and type(loaded.model) is type(pipe)
    assert loaded.tokenizer.padding_side == "right"  # a text encoder's tokenizer pads on the right
    a = run(pipe, ["a red car", "a blue house"], [1, 2])
    b = run(loaded.model, ["a red car", "a blue house"], [1, 2])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(D.decode(pipe, a, *SIZE), D.decode(loaded.model, b, *SIZE))


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_attention_maps_with_zero_queries_are_uniform(family, tmp_path):
    """Planted: with the recorded block's query projection zeroed, every image token attends uniformly
    (FLUX: over all text and image tokens; SD: over the text tokens) - an exactly known map."""
    from explab.interventions.diffusion_attention import attention_layers, record_attention

    pipe = load_model(f"tiny:{family}").model
    _, module = attention_layers(pipe)[1]
    plain = run(pipe, ["a red car"], [1])
    with record_attention(pipe, [1], [0, 2], [[0, 3, 5]]) as record:
        editor = LatentEditor([[]], [[]], on_step=record.set_step)
        recorded = run(pipe, ["a red car"], [1], callback=editor)
    assert torch.equal(plain, recorded)  # recording changes nothing
    with torch.no_grad():
        module.to_q.weight.zero_()
        if module.to_q.bias is not None:
            module.to_q.bias.zero_()
    with record_attention(pipe, [1], [0, 2], [[0, 3, 5]]) as record:
        editor = LatentEditor([[]], [[]], on_step=record.set_step)
        run(pipe, ["a red car"], [1], callback=editor)
    maps = record.result(0)[1]
    n_image = D.latent_shape(pipe, *SIZE)[0] if family == "flux" else None
    if family == "flux":
        assert maps.shape == (2, n_image, 3)
        torch.testing.assert_close(maps, torch.full_like(maps, 1 / (TEXT + n_image)))
    else:
        assert maps.shape[0] == 2 and maps.shape[2] == 3
        torch.testing.assert_close(maps, torch.full_like(maps, 1 / pipe.tokenizer.model_max_length))


# ---------------------------------------------------------------- the Diffuser server (Ray)


@pytest.fixture(scope="module")
def diffuser(ray_local):
    from explab.servers import get_server

    return get_server("diffuser", "tiny:flux", {"max_wait_ms": 50})


def requests(**kw):
    from explab.servers.diffuser import diffusion_requests

    common = {
        "steps": STEPS,
        "size": SIZE,
        "max_sequence_length": TEXT,
        "capture_steps": [1, STEPS - 1],
        **kw,
    }
    return diffusion_requests(["a red car", "a blue house", "sky"], [1, 2, 3], **common)


def test_server_is_shared_and_a_seeded_request_equals_itself_batched_and_unbatched(diffuser):
    from explab.servers import get_server

    again = get_server("diffuser", "tiny:flux", {"max_wait_ms": 50})
    assert again.describe()["pid"] == diffuser.describe()["pid"] and again.stats()["loads"] == 1
    before = diffuser.stats()["batching"]["batcher"]["batches"]
    batched = diffuser.generate(requests())
    assert diffuser.stats()["batching"]["batcher"]["batches"] - before == 1
    for request, got in zip(requests(), batched, strict=True):
        alone = diffuser.generate([request])[0]
        assert got.image.shape == (*SIZE, 3) and got.image.dtype == np.uint8
        assert np.abs(got.image.astype(int) - alone.image).max() <= 1
        for t in (1, STEPS - 1):
            np.testing.assert_allclose(got.latents[t], alone.latents[t], atol=1e-5)
    assert not np.array_equal(batched[0].image, batched[1].image)  # the seeds and prompts matter


def test_server_replacement_at_the_last_step_is_what_gets_decoded(diffuser):
    basis = orthonormal(3, 64, seed=11)
    mask = [i % 2 == 0 for i in range(64)]
    spec = ReplaceSubspace(step=STEPS - 1, basis=basis.tolist(), target=[2.0, 0.0, -2.0], mask=mask)
    got = diffuser.generate(requests(interventions=[spec])[:1])[0]
    edited = apply_latent_intervention(torch.tensor(got.latents[STEPS - 1]), spec)
    image = diffuser.decode([edited.numpy()], SIZE)[0]
    np.testing.assert_array_equal(got.image, image)
    plain = diffuser.generate(requests()[:1])[0]
    np.testing.assert_array_equal(
        plain.latents[STEPS - 1], got.latents[STEPS - 1]
    )  # captured before the edit
    assert not np.array_equal(plain.image, got.image)


def test_server_attention_maps_and_vae_round_trip(diffuser):
    from explab.servers.diffuser import AttentionRequest

    attention = AttentionRequest(blocks=[0, 1], tokens=[1, 2], steps=[0, STEPS - 1])
    got = diffuser.generate(requests(attention=attention)[:2])
    for result in got:
        assert sorted(result.attention) == [0, 1]
        maps = result.attention[1]
        assert maps.shape == (2, 64, 2) and (maps > 0).all() and (maps.sum(-1) < 1).all()
    assert len(got[0].token_ids) == len("a red car") + 2  # BOS, one byte each, EOS
    latents = diffuser.encode([got[0].image, got[1].image])
    assert [z.shape for z in latents] == [(64, 64), (64, 64)]
    images = diffuser.decode(latents, SIZE)
    assert all(img.shape == (*SIZE, 3) and img.dtype == np.uint8 for img in images)


def test_server_tokenize_gives_the_character_span_of_every_attention_token(diffuser):
    prompt = "a red car"
    spans = diffuser.tokenize([prompt], TEXT)[0]
    ids = diffuser.generate(requests()[:1])[0].token_ids  # the same tokenization the attention maps index
    assert len(spans) == len(ids) == len(prompt) + 2  # byte tokens between BOS and EOS
    assert spans[0] == spans[-1] == (0, 0)
    assert "".join(prompt[a:b] for a, b in spans) == prompt


def test_server_refuses_a_bad_request_in_one_line(diffuser):
    from explab.servers.diffuser import DiffusionRequest

    with pytest.raises(ExplabError, match="multiples of 4"):
        diffuser.generate([DiffusionRequest(prompt="x", steps=2, size=(30, 32))])
    with pytest.raises(ExplabError, match="blocks 0..1"):
        diffuser.generate(requests(attention={"blocks": [5], "tokens": [0], "steps": [0]})[:1])


def test_flux_attention_map_equals_the_stock_processors_own_attention(flux, monkeypatch):
    """The recorded map equals softmax(q k^T / sqrt(d)) of the q and k the stock processor itself hands to
    its attention kernel (after FLUX's norms and rotary embedding), computed here by that kernel's API."""
    import diffusers.models.transformers.transformer_flux as tf

    from explab.interventions.diffusion_attention import record_attention

    calls = []
    original = tf.dispatch_attention_fn

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.clone(), key.clone()))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
    tokens = [0, 2, 7]
    with record_attention(flux, [0], [0], [tokens, tokens]) as record:
        run(flux, ["a red car", "sky"], [1, 2], callback=LatentEditor([[], []], [[], []], on_step=record.set_step))
    query, key = calls[0]  # the first attention call: joint block 0 at step 0
    q, k = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, S, D)
    eye = torch.eye(k.shape[2]).expand(*k.shape[:2], -1, -1)
    probs = torch.nn.functional.scaled_dot_product_attention(q, k, eye)  # (B, H, S, S): the softmax itself
    expected = probs[:, :, TEXT:, :][..., tokens].mean(1)  # image queries x chosen text keys, head mean
    for row in range(2):
        torch.testing.assert_close(record.result(row)[0][0], expected[row], atol=1e-5, rtol=1e-4)
