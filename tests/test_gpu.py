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
