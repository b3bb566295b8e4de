"""GPU paths (bf16 on CUDA, vLLM picked by `auto`); skipped on machines without a CUDA GPU."""

import pytest
import torch

from explab.models import ModelSpec, load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_dtype_on_cuda_is_bf16_and_matches_cpu_float32():
    gpu = load_model(ModelSpec(name="tiny:llama"))
    cpu = load_model(ModelSpec(name="tiny:llama", device="cpu"))
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        a = gpu.model(ids.cuda()).logits.float().cpu()
        b = cpu.model(ids).logits
    assert torch.allclose(a, b, atol=5e-2)


def test_auto_backend_prefers_vllm_with_a_gpu():
    from explab.servers.backends.vllm_backend import vllm_available
    from explab.servers.generator import choose_backend

    assert choose_backend("auto") == ("vllm" if vllm_available() else "transformers")


def test_tiny_flux_on_cuda_is_bf16_seeded_and_its_subspace_replacement_stays_in_the_subspace():
    """The Diffuser's pipeline path on a GPU: bf16 weights on CUDA (the auto dtype), a seeded batch equals
    itself, and a subspace replacement at the last step is what comes out (the latent captured at that
    step, before the edit, with the edit applied), leaving the orthogonal complement unchanged."""
    from explab.interventions.latents import LatentEditor, ReplaceSubspace, apply_latent_intervention
    from explab.models.diffusion import decode

    pipe = load_model("tiny:flux").model
    assert pipe.transformer.device.type == "cuda" and pipe.transformer.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 3, generator=g))  # 64 = tiny:flux's packed channels
    spec = ReplaceSubspace(step=3, basis=basis.T.tolist(), target=[1.0, -1.0, 0.5])

    def run(interventions):
        editor = LatentEditor([[3], [3]], [interventions, interventions])
        latents = pipe(["a red cube", "a blue ball"], height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                       max_sequence_length=32, output_type="latent", callback_on_step_end=editor,
                       callback_on_step_end_tensor_inputs=["latents"],
                       generator=[torch.Generator("cpu").manual_seed(s) for s in (1, 2)]).images
        return editor.captures, latents.float().cpu(), decode(pipe, latents, 32, 32)

    captures, _, images = run([])
    again, _, images_again = run([])
    assert images.shape == (2, 32, 32, 3) and (images == images_again).all()
    captured, edited, _ = run([spec])
    b = basis.float()

    def complement(z):
        return z - (z @ b) @ b.T

    for row in range(2):
        before = captured[row][3].float()
        assert torch.equal(before, again[row][3].float())
        assert torch.allclose(edited[row], apply_latent_intervention(before, spec).float(), atol=5e-2)
        assert torch.allclose(complement(edited[row]), complement(before), atol=5e-2)  # bf16 rounding


def test_decode_on_cuda_writes_its_kv_cache_in_place_and_equals_transformers():
    """`decode` on CUDA (its in-place `GrowingCache`, past one growth of the reserve): float32 greedy tokens
    equal transformers' ``generate``; in bf16 every step's logprob equals the teacher-forced forward pass of
    the whole sequence (bf16 tolerance) and each greedy token is that pass's argmax up to bf16 ties."""
    import importlib

    from test_decode import PROMPTS, TOK, left_pad, tiny

    from explab.interventions import decode
    from explab.servers.types import SamplingParams

    steps = importlib.import_module("explab.interventions.decode").RESERVE + 8  # the buffers double once
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny("llama").to("cuda", dtype)
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=True)
        res = decode(model, TOK, PROMPTS, params)
        for p, out in zip(PROMPTS, res, strict=True):
            c = out.completions[0]
            assert len(c.token_ids) == steps
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p + c.token_ids], device="cuda")).logits[0].float(), -1)
            forced = lp[len(p) - 1: len(p) - 1 + steps]
            got = torch.tensor(c.logprobs)
            want = forced.gather(-1, torch.tensor(c.token_ids, device="cuda")[:, None])[:, 0].cpu()
            tol = 1e-4 if dtype == torch.float32 else 0.1
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
            assert (forced.max(-1).values.cpu() - want).max() <= tol  # greedy, up to ties at this precision
        if dtype == torch.float32:
            ids, mask = left_pad(PROMPTS)
            ref = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), do_sample=False,
                                 max_new_tokens=24, pad_token_id=0, eos_token_id=1)[:, ids.shape[1]:].cpu()
            for r, out in enumerate(res):
                got = out.completions[0].token_ids[:24]
                stop = got.index(1) + 1 if 1 in got else 24
                assert got[:stop] == ref[r, :stop].tolist()


def test_a_prefix_cache_on_cuda_serves_a_bf16_sweep_with_the_tokens_of_a_full_prefill():
    """A steering sweep on CUDA in bf16: the third call takes every prompt's prefill from the prefix cache (kept
    on the GPU) and its tokens and captures equal the same call without the cache."""
    from test_decode import PROMPTS, TOK, tiny

    from explab.interventions import Capture, Steer, decode, points
    from explab.interventions.prefixes import PrefixCache
    from explab.servers.types import SamplingParams

    model = tiny("llama").to("cuda", torch.bfloat16)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(11)) * 3.0
    cache = PrefixCache(2**24)
    greedy = SamplingParams(temperature=0, max_tokens=12)

    def sweep(alpha, prefixes):
        specs = [[Steer(point=points.resid_post(1), vector=v, alpha=alpha, positions="generated"),
                  Capture(point=points.mlp_out(0), positions="generated")] for _ in PROMPTS]
        return decode(model, TOK, PROMPTS, greedy, per_prompt=specs, prefix_cache=prefixes)

    sweep(1.0, cache)
    sweep(-2.0, cache)  # seen twice: stored
    assert cache.stats()["entries"] == len(PROMPTS)
    hits = cache.hits
    got = sweep(0.5, cache)
    assert cache.hits == hits + len(PROMPTS)
    ref = sweep(0.5, None)
    for g, r in zip(got, ref, strict=True):
        assert g.completions[0].token_ids == r.completions[0].token_ids
        key = next(iter(r.captures[0]))
        assert g.captures[0][key].dtype == r.captures[0][key].dtype
        torch.testing.assert_close(g.captures[0][key].float(), r.captures[0][key].float(), atol=2e-2, rtol=2e-2)


def test_a_hooked_server_on_a_gpu_steers_like_decode_in_the_callers_process(ray_local):
    """A HookedModel actor placed on the GPU (``num_gpus: 1``) loads its model there in bf16 and its steered
    greedy generation equals `decode` of the same bf16 model in this process."""
    import numpy as np

    from explab.interventions import Steer, decode, points
    from explab.servers import get_server, stop_server
    from explab.servers.prompts import encode_request
    from explab.servers.types import GenerationRequest, SamplingParams

    spec = {"name": "tiny:llama"}
    server = get_server("hooked", spec, {"num_gpus": 1, "shared": False})
    try:
        described = server.describe()
        assert "cuda" in str(described.get("device")) and "bfloat16" in str(described.get("dtype")), described
        loaded = load_model(ModelSpec(name="tiny:llama"))
        vector = np.random.default_rng(1).normal(size=loaded.model.config.hidden_size)
        params = SamplingParams(temperature=0.0, max_tokens=16)
        for alpha in (-4.0, 0.0, 4.0):
            steer = Steer(point=points.resid_post(1), vector=vector.tolist(), alpha=alpha, positions="generated")
            request = GenerationRequest(messages=[{"role": "user", "content": "Name a colour."}], params=params,
                                        interventions=[steer])
            served = server.generate([request])[0].completions[0].token_ids
            ids = encode_request(loaded.tokenizer, request)
            local = decode(loaded.model, loaded.tokenizer, [ids], params, [steer])[0].completions[0].token_ids
            assert served == local
    finally:
        stop_server(server.name)


def test_dpo_in_bf16_on_a_gpu_starts_at_ln2_and_raises_the_margin(tmp_path):
    """trl's DPOTrainer through `build_dpo_trainer` on CUDA (bf16 weights and mixed precision) on the tiny
    LLaVA's FINER training pairs: the first loss is ln 2 (policy = reference) and the reward margin rises."""
    import math

    import numpy as np

    from explab.train import DPOConfig, TrainerConfig, build_dpo_trainer
    from jobs.finer.benchmark import BuildConfig, synthetic, training_pairs
    from jobs.finer.scenes import SceneConfig

    world = SceneConfig(colours=["red", "green", "blue", "yellow", "purple"], shapes=["square"], sizes=["large"],
                        grid=2, min_objects=1, max_objects=1)
    build = BuildConfig(kinds=["multi_attr"], max_objects_named=1)
    data = synthetic(world, build, {"train": 8}, seed=0)
    rng = np.random.default_rng(0)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected", "images")} for p in data.probes["train"]
             for r in training_pairs(p, data.images[p.image_id], rng, "both", "letter", build)]
    policy = load_model(ModelSpec(name="tiny:llava"))
    assert policy.device.type == "cuda"
    reference = load_model(ModelSpec(name="tiny:llava"))
    trainer = TrainerConfig(lr=1e-3, batch_size=8, steps=16, warmup_ratio=0.0, schedule="constant",
                            workers={"num_workers": 1, "use_gpu": True})
    hf = build_dpo_trainer(policy, reference, pairs, trainer, DPOConfig(beta=0.1, max_length=512), tmp_path, seed=0)
    assert hf.args.bf16
    hf.args.save_strategy = "no"
    hf.train()
    logs = [h for h in hf.state.log_history if "rewards/margins" in h]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-2
    margins = [h["rewards/margins"] for h in logs]
    assert np.mean(margins[-3:]) > max(0.05, np.mean(margins[:3]) + 0.05), margins
