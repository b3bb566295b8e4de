"""Shared servers through a real local Ray: one load per spec, batching, backends, continuation."""

import numpy as np
import pytest
import ray
import torch

from explab.errors import ExplabError, ModelError
from explab.interventions import Capture, Knockout, Positions, ProjectOut, Steer, points
from explab.models import load_model
from explab.servers import GenerationRequest, SamplingParams, get_server, list_servers, stop_server
from explab.servers.hooked import ForwardRequest
from explab.servers.prompts import encode_request

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
QUESTIONS = ["What is 2+2?", "Name a colour.", "Say something long about rivers and the sea.", "Hi"]


def chat(text, **kw):
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def hooked(ray_local):
    return get_server("hooked", "tiny:llama", {"max_wait_ms": 20})


@pytest.fixture(scope="module")
def generator(ray_local):
    return get_server("generator", "tiny:llama", {"backend": "transformers", "max_wait_ms": 20})


def test_concurrent_callers_share_one_actor_and_one_load(ray_local):
    @ray.remote
    def caller():
        handle = get_server("hooked", {"name": "tiny:qwen"})
        return handle.describe()["pid"], handle.stats()["loads"], handle.name

    results = ray.get([caller.remote() for _ in range(3)])
    assert len({pid for pid, _, _ in results}) == 1
    assert all(loads == 1 for _, loads, _ in results)
    names = [s["name"] for s in list_servers()]
    assert names.count(results[0][2]) == 1
    stop_server(results[0][2])
    assert results[0][2] not in [s["name"] for s in list_servers()]


def test_batched_forward_equals_unbatched(hooked):
    capture = [{"type": "capture", "point": "blocks.1.resid_post"}]
    texts = ["a", "a longer prompt here", "mid length", "x y z w v u t s r q p"]
    requests = [{"text": t, "interventions": capture, "return_logits": "all"} for t in texts]
    before = hooked.stats()["batching"]["batcher"]["batches"]
    batched = hooked.forward(requests)
    after = hooked.stats()["batching"]["batcher"]["batches"]
    assert after - before == 1  # one call of four requests ran as one batch
    for request, got in zip(requests, batched, strict=True):
        alone = hooked.forward([request])[0]
        assert got.token_ids == alone.token_ids
        np.testing.assert_allclose(
            got.captures["blocks.1.resid_post"], alone.captures["blocks.1.resid_post"], atol=1e-5
        )
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-4)
        assert got.captures["blocks.1.resid_post"].shape == (len(got.token_ids), 64)


def test_concurrent_callers_are_batched_together(hooked):
    refs = [hooked.forward_async([{"text": f"prompt {i}"}]) for i in range(8)]
    ray.get(refs)
    stats = hooked.stats()["batching"]["batcher"]
    assert stats["max_batch_size"] > 1


def test_transformers_backend_greedy_equals_model_generate(generator):
    loaded = load_model("tiny:llama")
    requests = [chat(q, params=GREEDY) for q in QUESTIONS]
    results = generator.generate(requests)
    for request, result in zip(requests, results, strict=True):
        ids = encode_request(loaded.tokenizer, request)
        assert result.prompt_token_ids == ids
        ref = loaded.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        expected = ref[0, len(ids) :].tolist()
        eos = set(loaded.model.generation_config.eos_token_id)
        completion = result.completions[0]
        assert completion.token_ids == expected  # like vLLM, the EOS token id is kept
        assert completion.finish_reason == ("stop" if expected[-1] in eos else "length")


def test_assistant_prefix_continuation_is_exact(generator):
    """The assistant turn is left open: prompt = chat template + generation prompt + prefix, nothing
    closes it, and the continuation is what the model generates from exactly those tokens."""
    loaded = load_model("tiny:llama")
    prefix = "<think>\nLet me think step by step.\n\nFirst, "
    messages = [{"role": "user", "content": "Tell me a story"}]
    opened = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    opened_ids = loaded.tokenizer(opened, add_special_tokens=False)["input_ids"]
    prefix_ids = loaded.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    result = generator.generate(
        [
            chat(
                "Tell me a story",
                assistant_prefix=prefix,
                params=SamplingParams(temperature=0.0, max_tokens=16),
            )
        ]
    )[0]
    assert result.prompt_token_ids == opened_ids + prefix_ids
    ids = torch.tensor([opened_ids + prefix_ids])
    ref = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    assert result.completions[0].token_ids == ref[0, ids.shape[1] :].tolist()
    assert not result.completions[0].text.startswith(prefix)  # the prefix is not repeated


def test_seeded_sampling_is_reproducible_and_batch_independent(generator):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, n=3, seed=7)
    alone = generator.generate([chat("Hello", params=params)])[0]
    mixed = generator.generate([chat("Other", params=params), chat("Hello", params=params)])[1]
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in mixed.completions]
    assert len({tuple(c.token_ids) for c in alone.completions}) > 1


def test_score_equals_teacher_forced_logprobs(hooked):
    loaded = load_model("tiny:llama")
    prompt, conts = "The sky is", [" blue", " very green today"]
    got = hooked.score(prompt, conts)
    for cont, lps in zip(conts, got, strict=True):
        p = loaded.tokenizer(prompt)["input_ids"]
        c = loaded.tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([p + c])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(-1, torch.tensor(c)[:, None])[:, 0]
        np.testing.assert_allclose(lps, ref.numpy(), atol=1e-4)


def test_hooked_generation_steers_and_captures_per_step(hooked):
    d = 64
    vector = np.random.default_rng(0).normal(size=d).tolist()
    capture = {"type": "capture", "point": "blocks.1.resid_post", "per_step": True}
    steer = {
        "type": "steer",
        "point": "blocks.0.resid_post",
        "vector": vector,
        "alpha": 8.0,
        "positions": "generated",
    }
    params = SamplingParams(temperature=0.0, max_tokens=10)
    plain = hooked.generate([chat("Hi", params=params, interventions=[capture])])[0]
    steered = hooked.generate([chat("Hi", params=params, interventions=[capture, steer])])[0]
    caps = plain.captures[0]["blocks.1.resid_post"]
    assert caps.shape == (len(plain.completions[0].token_ids), d)
    assert plain.completions[0].token_ids != steered.completions[0].token_ids
    # the first token is sampled from the prompt's last position, which "generated" does not touch
    assert plain.completions[0].token_ids[0] == steered.completions[0].token_ids[0]


def _batch_counts(handle):
    stats = handle.stats()["batching"]["batcher"]
    return stats["requests"], stats["batches"]


def test_mixed_interventions_run_as_one_batch_and_equal_each_row_alone(hooked):
    rng = np.random.default_rng(1)
    v = [rng.normal(size=64) for _ in range(4)]
    texts = ["a", "a longer prompt here", "mid length", "x y z w v u t s r q p", "two words", "short"]
    interventions = [  # every row different: layers, strengths, position sets, projections, captures
        [Steer(point=points.resid_post(0), vector=v[0], alpha=4.0), Capture(point=points.resid_post(1))],
        [Steer(point=points.resid_post(1), vector=v[1], alpha=-2.0, positions="last"),
         Capture(point=points.mlp_out(0), positions=Positions(kind="indices", indices=[0, -1]))],
        [ProjectOut(point=points.resid_pre(1), direction=v[2]), Capture(point=points.EMBED, name="e")],
        [],
        [Steer(point=points.attn_out(1), vector=v[3], positions=Positions(kind="span", start=2)),
         Capture(point=points.FINAL)],
        [Steer(point=points.resid_post(0), vector=v[0], alpha=1.0, positions="prompt")],
    ]
    requests = [ForwardRequest(text=t, interventions=iv, return_logits="last")
                for t, iv in zip(texts, interventions, strict=True)]
    r0, b0 = _batch_counts(hooked)
    batched = hooked.forward(requests)
    r1, b1 = _batch_counts(hooked)
    assert (r1 - r0, b1 - b0) == (6, 1)  # six different settings, one batch
    for request, got in zip(requests, batched, strict=True):
        alone = hooked.forward([request])[0]
        assert got.token_ids == alone.token_ids
        assert set(got.captures) == {s.key for s in request.interventions if isinstance(s, Capture)}
        for key, value in alone.captures.items():
            np.testing.assert_allclose(got.captures[key], value, atol=1e-5)
            np.testing.assert_array_equal(got.capture_positions[key], alone.capture_positions[key])
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-4)
    plain = hooked.forward([ForwardRequest(text=texts[3], return_logits="last")])[0]
    np.testing.assert_allclose(batched[3].logits, plain.logits, atol=1e-5)
    unsteered = hooked.forward([{"text": texts[0], "return_logits": "last"}])[0]
    assert not np.allclose(batched[0].logits, unsteered.logits)


def test_concurrent_steering_sweep_shares_batches_and_equals_alone(hooked):
    vector = np.random.default_rng(0).normal(size=64)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    settings = [(layer, alpha) for layer in (0, 1) for alpha in (-8.0, -2.0, 4.0, 12.0)]
    requests = [chat("Hi there", params=params, interventions=[
        Steer(point=points.resid_post(layer), vector=vector, alpha=alpha, positions="generated"),
        *([Capture(point=points.resid_post(1), per_step=True)] if alpha > 0 else []),
    ]) for layer, alpha in settings]
    r0, b0 = _batch_counts(hooked)
    refs = [hooked.generate_async([r]) for r in requests]  # eight concurrent callers, one request each
    results = [ray.get(ref)[0] for ref in refs]
    r1, b1 = _batch_counts(hooked)
    assert (r1 - r0) / (b1 - b0) > 1  # different interventions, shared batches
    tokens = set()
    for request, got in zip(requests, results, strict=True):
        alone = hooked.generate([request])[0]
        assert got.completions[0].token_ids == alone.completions[0].token_ids
        assert got.captures[0].keys() == alone.captures[0].keys()
        for key, value in alone.captures[0].items():
            np.testing.assert_allclose(got.captures[0][key], value, atol=1e-4)
        tokens.add(tuple(got.completions[0].token_ids))
    assert len(tokens) > 1  # the settings really differ


def test_a_sweep_prefills_its_prompt_once_on_the_server(hooked):
    vector = np.random.default_rng(1).normal(size=64)
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def request(alpha, *extra):
        steer = Steer(point=points.resid_post(1), vector=vector, alpha=alpha, positions="generated")
        return chat("A prompt only this test sends", params=params, interventions=[steer, *extra])

    def cache():
        return hooked.stats()["prefix_cache"]

    before = cache()
    results = [hooked.generate([request(alpha)])[0] for alpha in (-6.0, 0.0, 6.0)]
    after = cache()
    # first sight: remembered; second: stored; third: reused
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (2, 1)
    # the same rows with the prompt's own forward pass: a zero steer on the prompt turns the sharing off
    off = Steer(point=points.resid_post(0), vector=vector, alpha=0.0, positions="prompt")
    for alpha, got in zip((-6.0, 0.0, 6.0), results, strict=True):
        full = hooked.generate([request(alpha, off)])[0]
        assert got.completions[0].token_ids == full.completions[0].token_ids
    assert cache()["hits"] == after["hits"]  # those did not use the cache
    assert len({tuple(r.completions[0].token_ids) for r in results}) > 1


def test_knockout_rows_run_in_their_own_batch(hooked):
    knock = Knockout(queries=Positions(kind="span", start=3), keys=Positions(kind="indices", indices=[1]))
    requests = [ForwardRequest(text=t, interventions=iv, return_logits="last") for t, iv in [
        ("knock me out please", [knock, Capture(point=points.resid_post(1))]),
        ("and me as well, please", [knock, Steer(point=points.resid_post(0), vector=[0.5] * 64)]),
        ("leave me alone", [Capture(point=points.resid_post(1))]),
    ]]
    r0, b0 = _batch_counts(hooked)
    batched = hooked.forward(requests)
    r1, b1 = _batch_counts(hooked)
    assert (r1 - r0, b1 - b0) == (3, 2)  # the two knockout rows together, the plain row apart
    for request, got in zip(requests, batched, strict=True):
        alone = hooked.forward([request])[0]
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-4)
        for key, value in alone.captures.items():
            np.testing.assert_allclose(got.captures[key], value, atol=1e-5)


def test_requests_take_spec_objects_and_reject_bad_specs_where_built():
    steer = Steer(point=points.resid_post(0), vector=np.ones(4), alpha=2.0)
    request = chat("Hi", interventions=[steer, {"type": "capture", "point": "embed"}])
    assert request.interventions[0] == steer.model_dump()  # plain data on the wire
    assert request.interventions[1]["type"] == "capture"
    forward = ForwardRequest(text="hi", interventions=[steer.model_dump()])
    assert forward.interventions == [steer]
    for bad in ([{"type": "capture", "point": "blocks.0.resid"}], [{"type": "steer", "point": "embed"}]):
        with pytest.raises(ExplabError) as err:
            ForwardRequest(text="hi", interventions=bad)
        assert "\n" not in str(err.value)
        with pytest.raises(ExplabError):
            chat("Hi", interventions=bad)


def test_unknown_model_is_a_clear_error(ray_local):
    with pytest.raises(ModelError, match="tiny"):
        get_server("hooked", "tiny:nonexistent")


def test_private_servers_are_separate_actors_and_shared_ones_are_one(ray_local):
    import time

    from explab.servers.registry import release_private_servers

    first, second = (get_server("hooked", "tiny:gpt2", {"shared": False}) for _ in range(2))
    shared_a, shared_b = (get_server("hooked", "tiny:gpt2") for _ in range(2))
    private_pids = {first.describe()["pid"], second.describe()["pid"]}
    assert len(private_pids) == 2 and first.name != second.name  # each caller loaded its own copy
    assert shared_a.name == shared_b.name and first.name.startswith(f"{shared_a.name}#")
    assert shared_a.describe()["pid"] == shared_b.describe()["pid"] not in private_pids
    request = [{"text": "same weights", "return_logits": "last"}]
    np.testing.assert_allclose(first.forward(request)[0].logits, shared_a.forward(request)[0].logits, atol=1e-5)
    assert release_private_servers() == 2  # a sweep trial stops its own private servers when it ends
    deadline = time.monotonic() + 30
    while {first.name, second.name} & {s["name"] for s in list_servers()} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not {first.name, second.name} & {s["name"] for s in list_servers()}
    assert shared_a.describe(refresh=True)["pid"] in {shared_b.describe()["pid"]}


def test_start_servers_creates_every_actor_before_waiting_for_any(ray_local, monkeypatch):
    """Several servers side by side (a run's roles): all actors exist before the first load is waited
    for; the handles are `get_server`'s; a server that cannot load is the same one clear error."""
    from explab.servers import registry

    events = []
    create, wait = registry._create, registry._wait_loaded
    monkeypatch.setattr(registry, "_create", lambda *args: events.append("create") or create(*args))
    monkeypatch.setattr(registry, "_wait_loaded", lambda handle: events.append("wait") or wait(handle))
    private, shared = registry.start_servers([("hooked", "tiny:gpt2", {"shared": False}),
                                              ("hooked", "tiny:gpt2", None)])
    assert events == ["create", "create", "wait", "wait"]
    assert shared.name == get_server("hooked", "tiny:gpt2").name and private.name.startswith(f"{shared.name}#")
    assert private.describe()["pid"] != shared.describe()["pid"]  # both loaded, each in its own actor
    assert registry.release_private_servers() == 1
    with pytest.raises(ModelError, match="tiny"):
        registry.start_servers([("hooked", "tiny:gpt2", None), ("hooked", "tiny:nonexistent", None)])


def test_a_server_started_inside_a_placement_group_outlives_it(ray_local):
    """A sweep trial runs in a placement group that captures its children; the shared server it
    starts must not be placed in that group, or it would die when the trial's group is removed."""
    import time

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    spec = {"name": "tiny:llama", "tiny": {"num_hidden_layers": 1}}
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready())

    @ray.remote(num_cpus=1)
    def trial():
        return get_server("hooked", spec).describe()["pid"]

    inside = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    pid = ray.get(trial.options(scheduling_strategy=inside).remote())
    remove_placement_group(group)
    time.sleep(2)
    handle = get_server("hooked", spec)
    assert handle.describe(refresh=True)["pid"] == pid
    assert handle.forward(["still here"])[0].token_ids
    stop_server(handle.name)
