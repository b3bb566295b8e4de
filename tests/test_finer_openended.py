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
                 extra_inputs={"pixel_values": inputs["pixel_values"].to(loaded.model.device, loaded.dtype)})
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
    """The text-only refusal runs the HookedModel's own class in process (`__ray_actor_class__`: the same code
    the actor runs, without a second model worker); the Generator refuses through its served actor."""
    from explab.servers import get_server
    from explab.servers.hooked import HookedModel
    from explab.servers.types import GenerationRequest

    request = {"messages": [{"role": "user", "content": "hi"}], "images": [_image(0)]}
    text_only = HookedModel.__ray_actor_class__({"name": "tiny:llama", "device": "cpu"}, {})
    with pytest.raises(ExplabError, match="only a VLM takes `images`"):
        text_only._generate_batch([GenerationRequest.model_validate(request)])
    generator = get_server("generator", "tiny:llama", {"backend": "transformers", "max_wait_ms": 20})
    with pytest.raises(ExplabError, match="takes no `images`"):
        generator.generate([request], {"max_tokens": 2})


@pytest.mark.gpu
def test_a_gpu_hooked_server_generates_with_images_in_bf16_like_decode_in_process(ray_local):
    """On CUDA (skipped without one): the tiny LLaVA served on the GPU in bf16 (pixels cast to bf16) generates
    with an image the tokens `decode` gives with the processor's pixels in this process."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from explab.models import ModelSpec, load_model
    from explab.servers import get_server, stop_server
    from explab.servers.types import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    server = get_server("hooked", {"name": "tiny:llava"}, {"num_gpus": 1, "shared": False})
    try:
        described = server.describe()
        assert "cuda" in str(described.get("device")) and "bfloat16" in str(described.get("dtype")), described
        loaded = load_model(ModelSpec(name="tiny:llava"))
        for seed in (0, 1):
            request = {"messages": [{"role": "user", "content": "What is shown?"}], "images": [_image(seed)]}
            served = server.generate([request], params)[0].completions[0].token_ids
            _, local = _reference(loaded, "What is shown?", _image(seed), params)
            assert served == local.token_ids
    finally:
        stop_server(server.name)


# ---- VQA accuracy and the MMHal judge (pure) ---------------------------------------------------------------
def test_vqa_accuracy_is_the_leave_one_out_mean_on_normalised_answers():
    from jobs.finer.openended import normalize_answer, vqa_accuracy

    assert normalize_answer("Two dogs.") == normalize_answer("2 dogs") == "2 dogs"
    assert normalize_answer("The 1,000 cats!") == "1000 cats"
    assert normalize_answer("Dont") == normalize_answer("don't") == "don't"
    assert normalize_answer("3.5 kg.") == "3.5 kg"
    others = ["cat"] * 7
    assert vqa_accuracy("x", ["x"] * 3 + others) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("x", ["x"] + ["cat"] * 9) == pytest.approx(0.3, abs=1e-12)
    assert vqa_accuracy("x", ["x"] * 2 + ["cat"] * 8) == pytest.approx(0.6, abs=1e-12)
    assert vqa_accuracy("x", ["cat"] * 10) == 0.0
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 4 + ["cat"] * 6) == 1.0


def test_judge_ratings_parse_or_count_as_unparsed_and_mmhal_metrics_on_planted_ratings():
    import math

    import pandas as pd
    from pydantic import ValidationError

    from jobs.finer.config import HubBenchmark
    from jobs.finer.openended import judge_prompt, mmhal_scores, parse_rating, score_rows

    assert parse_rating("The response names a dog that is not there.\nRating: 1") == 1
    assert parse_rating("**Rating:** 6") == 6
    assert parse_rating("rating: 4 ... on reflection, Rating: 5") == 5
    assert parse_rating("Rating: 9") is None and parse_rating("I like it") is None and parse_rating("") is None
    prompt = judge_prompt(["dog", "ball"], "What is the dog doing?", "Chasing a ball.", "Sleeping.")
    assert "dog, ball" in prompt and "Chasing a ball." in prompt and "Sleeping." in prompt and "Rating: N" in prompt
    frame = pd.DataFrame({"kind": ["count", "count", "attribute", "attribute"], "rating": [6.0, 2.0, 1.0, math.nan]})
    got = mmhal_scores(frame)
    assert got["mmhal_score"] == 3.0 and got["mmhal_hallucination_rate"] == pytest.approx(2 / 3)
    assert got["mmhal_unparsed"] == 0.25 and got["n"] == 4
    rows = {r["split"]: r for r in score_rows("mmhal", frame)}
    assert rows["count"]["mmhal_score"] == 4.0 and rows["count"]["mmhal_hallucination_rate"] == 0.5
    assert rows["attribute"]["mmhal_hallucination_rate"] == 1.0 and rows["attribute"]["mmhal_unparsed"] == 0.5
    with pytest.raises(ValidationError, match="needs a `judge`"):
        HubBenchmark(name="mmhal", data="hf:Shengcao1006/MMHal-Bench", format="mmhal")


# ---- the job's open-ended evaluation on local copies ---------------------------------------------------------
def test_textvqa_and_mmhal_from_local_copies_run_through_the_jobs_evaluation(tmp_path, llava):
    """Local copies in the hub forms go through the job's `run` beside a synthetic MC set (the tiny LLaVA
    answers with the image, a tiny Llama judges): eval rows in range, every junk judgement unparsed, MC and
    open-ended columns NaN where they do not apply; planted answers and ratings in the job's predictions give
    the exact scores through the same `openended.table_rows` the job writes."""
    import pandas as pd
    from datasets import Dataset
    from PIL import Image

    from explab.models import ModelSpec
    from explab.runs import RunContext
    from jobs.finer import hub, openended
    from jobs.finer.config import Config, HubBenchmark
    from jobs.finer.job import run
    from jobs.finer.scenes import SceneConfig

    pics = [Image.fromarray(_image(s)) for s in (3, 4)]
    Dataset.from_dict({"image": pics, "question": ["What brand?", "What number?"], "question_id": [7, 8],
                       "answers": [["Nike"] * 3 + ["adidas"] * 7, ["Two"] + ["3"] * 9]}).save_to_disk(
        str(tmp_path / "textvqa"))
    Dataset.from_dict({"image": pics, "question_type": ["counting", "attribute"],
                       "question_topic": ["animal", "vehicle"], "image_id": ["a", "b"],
                       "image_content": [{"class": ["Dog", "Ball"]}, {"class": ["Car"]}],
                       "question": ["How many dogs?", "What colour is the car?"],
                       "gt_answer": ["There is one dog.", "The car is red."]}).save_to_disk(str(tmp_path / "mmhal"))
    judge = ModelSpec(name="tiny:llama")
    benches = [HubBenchmark(name="textvqa", data=f"local:{tmp_path / 'textvqa'}", format="vqa", max_new_tokens=4),
               HubBenchmark(name="mmhal", data=f"local:{tmp_path / 'mmhal'}", format="mmhal", max_new_tokens=4,
                            judge=judge, judge_server={"backend": "transformers", "max_wait_ms": 20},
                            judge_max_tokens=12)]
    scenes = SceneConfig(colours=["red", "green"], shapes=["circle", "square"], sizes=["large"], grid=2,
                         min_objects=2, max_objects=2, image_size=32)
    config = Config(models=[ModelSpec(name="tiny:llava")], benchmarks=benches, server={"max_wait_ms": 20},
                    scenes=scenes, build={"max_objects_named": 2, "max_relations": 2},
                    n_images={"train": 0, "test": 1}, tuning=None)
    items = hub.load(benches[1])[0]
    assert list(items["image_content"].iloc[0]) == ["Dog", "Ball"] and list(items["kind"]) == ["counting", "attribute"]
    ctx = RunContext("finer", config, tmp_path / "run")
    run(config, ctx)  # the synthetic MC set beside the two open-ended ones, base model only
    table = pd.read_parquet(ctx.path("tables", "eval.parquet"))
    predictions = pd.read_parquet(ctx.path("tables", "predictions.parquet"))
    assert (table["benchmark"] == "synthetic").any() and table.loc[table["benchmark"] == "synthetic", "vqa_accuracy"
                                                                   ].isna().all()
    vqa = table[table["benchmark"] == "textvqa"]
    assert len(vqa) == 1 and 0.0 <= vqa["vqa_accuracy"].iloc[0] <= 1.0 and vqa["paired_accuracy"].isna().all()
    mmhal = table[table["benchmark"] == "mmhal"].set_index("split")
    assert set(mmhal.index) == {"all", "counting", "attribute"}
    # a random tiny judge writes no "Rating: N": counted as unparsed, never a crash or a zero
    assert (mmhal["mmhal_unparsed"] == 1.0).all() and mmhal["mmhal_score"].isna().all()
    opened = predictions[predictions["benchmark"].isin(["textvqa", "mmhal"])].reset_index(drop=True)
    assert len(opened) == 4 and opened["response"].map(lambda t: isinstance(t, str)).all()
    assert opened.loc[opened["benchmark"] == "mmhal", "judge_text"].map(len).gt(0).all()
    planted = opened.copy()  # the job's predictions with planted answers and ratings, scored as the job scores
    planted.loc[planted["benchmark"] == "textvqa", "response"] = ["nike.", "2"]  # 3 of 10 -> 0.9; 1 of 10 -> 0.3
    planted.loc[planted["benchmark"] == "mmhal", "rating"] = [5.0, 2.0]
    rows = {(r["benchmark"], r["split"]): r for r in openended.table_rows("tiny:llava", "base", planted)}
    assert rows[("textvqa", "all")]["vqa_accuracy"] == pytest.approx(0.6, abs=1e-12)
    assert rows[("mmhal", "all")]["mmhal_score"] == 3.5 and rows[("mmhal", "all")]["mmhal_hallucination_rate"] == 0.5
    assert 0 <= rows[("mmhal", "counting")]["mmhal_score"] <= 6
