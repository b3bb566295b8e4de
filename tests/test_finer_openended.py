"""Open-ended evaluation for `finer`: image-conditioned generation on the HookedModel server (equal to
`decode` in process with the processor's pixels; the image reaches the model; one clear error where images
cannot go), the VQA accuracy and its normaliser on planted answers, the MMHal judge's rating parser and
metrics, and the job's open-ended wiring on local copies of TextVQA / MMHal-Bench."""

import numpy as np
import pytest

from explab.errors import ExplabError


def _image(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---- image-conditioned generation on the HookedModel (platform) --------------------------------------------
@pytest.fixture(scope="module")
def llava(ray_local):
    from explab.servers import get_server

    return get_server("hooked", "tiny:llava", {"max_wait_ms": 20})


def _reference(loaded, question: str, image: np.ndarray, params):
    """Greedy decoding in process: the processor's chat template and pixels, `decode` with extra_inputs."""
    from explab.interventions.decode import decode

    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = loaded.tokenizer.bos_token
    text = text[len(bos):] if bos and text.startswith(bos) else text
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    out = decode(loaded.model, loaded.tokenizer, [ids], params,
                 extra_inputs={"pixel_values": inputs["pixel_values"].to(loaded.dtype)})
    return ids, out[0].completions[0]


def test_generation_with_images_equals_decode_with_the_processors_pixels_and_the_image_matters(llava):
    from explab.models import ModelSpec, load_model
    from explab.servers.types import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
    questions = ["What is in the picture?", "Which colour?"]
    images = [_image(0), _image(1)]
    requests = [{"messages": [{"role": "user", "content": q}], "images": [im]}
                for q, im in zip(questions, images, strict=True)]
    served = llava.generate(requests, params)  # one batch of two rows with different images
    loaded = load_model(ModelSpec(name="tiny:llava", device="cpu"))
    for q, im, got in zip(questions, images, served, strict=True):
        ids, ref = _reference(loaded, q, im, params)
        assert got.prompt_token_ids == ids
        assert got.completions[0].token_ids == ref.token_ids
        np.testing.assert_allclose(got.completions[0].logprobs, ref.logprobs, atol=1e-4)
    swapped = llava.generate([{"messages": [{"role": "user", "content": questions[0]}], "images": [images[1]]}],
                             params)[0]
    first = served[0].completions[0]
    assert swapped.completions[0].token_ids != first.token_ids or not np.allclose(
        swapped.completions[0].logprobs, first.logprobs, atol=1e-4)


def test_images_to_a_text_only_model_or_the_generator_are_one_clear_error(ray_local):
    from explab.servers import get_server

    request = {"messages": [{"role": "user", "content": "hi"}], "images": [_image(0)]}
    hooked = get_server("hooked", "tiny:llama", {"max_wait_ms": 20})
    with pytest.raises(ExplabError, match="only a VLM takes `images`"):
        hooked.generate([request], {"max_tokens": 2})
    generator = get_server("generator", "tiny:llama", {"backend": "transformers", "max_wait_ms": 20})
    with pytest.raises(ExplabError, match="takes no `images`"):
        generator.generate([request], {"max_tokens": 2})
