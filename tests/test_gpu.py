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
