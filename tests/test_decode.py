"""explab.interventions.decode: the token-by-token generation loop."""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from explab.interventions import Capture, Positions, Steer, decode, intervene, paragraph_index, run_with_hooks
from explab.servers.types import SamplingParams

D = 32


def char_tokenizer() -> T.PreTrainedTokenizerBase:
    """One token per character, plus a single "\\n\\n" token; ids 0-3 are pad, eos, bos, unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in [*"abcdefghijklmnopqrstuvwxyz .,\n", "\n\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


TOK = char_tokenizer()
VOCAB = len(TOK)


def tiny(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.3)
    if kind == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_embd=D, n_layer=2, n_head=4, n_positions=256, **common)
        ).eval()
    cfg = T.LlamaConfig(
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    return T.LlamaForCausalLM(cfg).eval()


PROMPTS = [TOK.encode(t) for t in ["the cat sat", "a", "on the mat, quietly"]]
PROMPTS = [[2, *p] for p in PROMPTS]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, prompts))
    ids, mask = torch.zeros(len(prompts), n, dtype=torch.long), torch.zeros(len(prompts), n, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, n - len(p) :], mask[b, n - len(p) :] = torch.tensor(p), 1
    return ids, mask


def test_greedy_equals_generate() -> None:
    for kind in ("llama", "gpt2"):
        model = tiny(kind)
        res = decode(model, TOK, PROMPTS, SamplingParams(temperature=0, max_tokens=24))
        ids, mask = left_pad(PROMPTS)
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=0,
            eos_token_id=1,
        )[:, ids.shape[1] :]
        for r, out in enumerate(res):
            got = out.completions[0].token_ids
            assert got == ref[r, : len(got)].tolist()
            assert len(got) == 24 or got[-1] == 1  # stopped only at EOS or max_tokens
            assert out.completions[0].finish_reason == (
                "length" if len(got) == 24 and got[-1] != 1 else "stop"
            )


def test_batched_equals_single_and_seeded_sampling_reproducible() -> None:
    model = tiny()
    params = [
        SamplingParams(temperature=0, max_tokens=20, logprobs=True),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, n=2, seed=7, logprobs=True),
        SamplingParams(temperature=0.7, max_tokens=25, n=3, seed=11, logprobs=True),
    ]
    batched = decode(model, TOK, PROMPTS, params)
    for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True)):
        alone = decode(model, TOK, [p], [sp])[0]
        assert [c.token_ids for c in alone.completions] == [c.token_ids for c in batched[i].completions]
        for a, b in zip(alone.completions, batched[i].completions, strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    again = decode(model, TOK, PROMPTS, params)
    assert [c.token_ids for o in again for c in o.completions] == [
        c.token_ids for o in batched for c in o.completions
    ]
    samples = [c.token_ids for c in batched[2].completions]
    assert len({tuple(s) for s in samples}) == 3  # the n samples of one request differ
    other = decode(model, TOK, [PROMPTS[2]], SamplingParams(temperature=0.7, max_tokens=25, n=3, seed=12))[0]
    assert [c.token_ids for c in other.completions] != samples


def test_logprobs_equal_teacher_forced() -> None:
    model = tiny()
    res = decode(model, TOK, PROMPTS, SamplingParams(temperature=1.0, max_tokens=20, seed=3, logprobs=True))
    for p, out in zip(PROMPTS, res, strict=True):
        c = out.completions[0]
        seq = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0].float(), -1)
        want = [float(lp[len(p) - 1 + t, tok]) for t, tok in enumerate(c.token_ids)]
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4, rtol=0)


def test_stop_strings_and_max_tokens() -> None:
    model = tiny()
    base = decode(model, TOK, PROMPTS, SamplingParams(temperature=1.0, max_tokens=40, seed=5))
    checked = 0
    for p, out in zip(PROMPTS, base, strict=True):
        full = out.completions[0]
        if len(full.text) < 6:
            continue
        stop = full.text[3:5]
        cut = full.text.find(stop)
        got = decode(
            model, TOK, [p], SamplingParams(temperature=1.0, max_tokens=40, seed=5, stop=["zzzz", stop])
        )
        c = got[0].completions[0]
        assert c.finish_reason == "stop" and c.text == full.text[:cut]
        assert c.token_ids == full.token_ids[: len(c.token_ids)]
        assert stop in TOK.decode(c.token_ids) and stop not in TOK.decode(c.token_ids[:-1])
        checked += 1
    assert checked >= 2
    short = decode(model, TOK, PROMPTS, SamplingParams(temperature=1.0, max_tokens=3, seed=5))
    for out in short:
        c = out.completions[0]
        assert (c.finish_reason, len(c.token_ids)) in {("length", 3)} or c.token_ids[-1] == 1


def test_ignore_eos_generates_past_eos_to_max_tokens() -> None:
    model = tiny()
    eos = TOK.eos_token_id
    # planted: EOS is every step's greedy choice
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 100.0)))
    try:
        stops = decode(model, TOK, PROMPTS, SamplingParams(temperature=0.0, max_tokens=5))
        kept = decode(model, TOK, PROMPTS, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finally:
        handle.remove()
    for out in stops:
        assert (out.completions[0].token_ids, out.completions[0].finish_reason) == ([eos], "stop")
    for out in kept:
        assert (out.completions[0].token_ids, out.completions[0].finish_reason) == ([eos] * 5, "length")


def test_per_step_capture_matches_teacher_forcing() -> None:
    model = tiny()
    specs = [
        Capture(point="blocks.0.resid_post", per_step=True),
        Capture(point="embed", positions="generated"),
    ]
    res = decode(model, TOK, PROMPTS, SamplingParams(temperature=1.0, max_tokens=15, seed=1), specs)
    for p, out in zip(PROMPTS, res, strict=True):
        toks, cap = out.completions[0].token_ids, out.captures[0]
        steps = cap["blocks.0.resid_post"]
        assert steps.shape == (len(toks), D)
        with torch.no_grad():
            hs = model(torch.tensor([p + toks]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(steps, hs[1][0, len(p) - 1 : len(p) - 1 + len(toks)], atol=1e-5, rtol=1e-5)
        # generated positions: every generated token that was fed back (all but the last)
        assert out.capture_positions[0]["embed"].tolist() == list(range(len(p), len(p) + len(toks) - 1))
        torch.testing.assert_close(cap["embed"], hs[0][0, len(p) : len(p) + len(toks) - 1])


def _break_index(toks: list[int]) -> int | None:
    """Index of the generated token that completes the first paragraph break (it opens paragraph 1)."""
    paras = [paragraph_index(TOK.decode(toks[: j + 1], skip_special_tokens=True)) for j in range(len(toks))]
    return paras.index(1) if 1 in paras else None


def _first_with_break(model: torch.nn.Module) -> tuple[list[int], SamplingParams, list[int], int]:
    """A (prompt, params) whose unsteered sample has a paragraph break with several tokens after it."""
    for seed in range(200):
        sp = SamplingParams(temperature=1.0, max_tokens=40, seed=seed)
        for p in PROMPTS:
            toks = decode(model, TOK, [p], sp)[0].completions[0].token_ids
            j = _break_index(toks)
            if j is not None and 0 < j < len(toks) - 6 and 1 not in toks:
                return p, sp, toks, j
    raise AssertionError("no sample with a paragraph break")


def test_paragraph_schedule_steers_only_paragraph_k() -> None:
    model = tiny()
    prompt, sp, base, j = _first_with_break(model)  # base[j] completes the first break: opens paragraph 1
    v = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 4
    pt, para1 = "blocks.0.resid_post", Positions(kind="paragraph", paragraph=1)
    specs = [
        Capture(point=pt, name="before", per_step=True),
        Steer(point=pt, vector=v.tolist(), alpha=2.0, positions=para1),
        Capture(point=pt, name="after", per_step=True),
    ]
    out = decode(model, TOK, [prompt], sp, specs)[0]
    toks, cap = out.completions[0].token_ids, out.captures[0]
    assert toks[: j + 1] == base[: j + 1]  # everything up to the break is sampled unsteered
    assert toks[j + 1 :] != base[j + 1 : len(toks)]
    # step s feeds generated token s-1: the steer fires exactly on steps whose fed token is in paragraph 1
    for s in range(len(toks)):
        fed_para = paragraph_index(TOK.decode(toks[:s], skip_special_tokens=True)) if s > 0 else -1
        diff = cap["after"][s] - cap["before"][s]
        if fed_para == 1:
            torch.testing.assert_close(diff, 2.0 * v)
        else:
            assert torch.equal(diff, torch.zeros(D))
    assert _break_index(toks) == j


def test_generate_under_intervene_matches_decode() -> None:
    model = tiny()
    v = torch.randn(D, generator=torch.Generator().manual_seed(2)) * 3
    steer = Steer(point="blocks.0.resid_post", vector=v.tolist(), positions=Positions(kind="generated"))
    res = decode(model, TOK, PROMPTS, SamplingParams(temperature=0, max_tokens=12), [steer])
    plain = decode(model, TOK, PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    ids, mask = left_pad(PROMPTS)
    with intervene(model, [steer]) as s:
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=0,
            eos_token_id=1,
        )[:, ids.shape[1] :]
    assert s.n_applied[0] > 0
    for r, out in enumerate(res):
        got = out.completions[0].token_ids
        assert got == ref[r, : len(got)].tolist()
        assert got[0] == plain[r].completions[0].token_ids[0]  # the first token is sampled from the prompt
    assert [o.completions[0].token_ids for o in res] != [o.completions[0].token_ids for o in plain]


def test_teacher_forced_paragraph_positions() -> None:
    text = "ab\n\ncd e\n\nf"
    resp = TOK.encode(text)
    prompt = [2, *TOK.encode("the")]
    model = tiny()
    caps = [
        Capture(point="embed", name=f"p{k}", positions=Positions(kind="paragraph", paragraph=k))
        for k in range(3)
    ]
    _, s = run_with_hooks(
        model, torch.tensor([prompt + resp]), caps, tokenizer=TOK, prompt_lengths=[len(prompt)]
    )
    P = len(prompt)
    # "a","b" -> 0; "\n\n","c","d"," ","e" -> 1; "\n\n","f" -> 2
    assert s.capture_positions["p0"][0].tolist() == [P, P + 1]
    assert s.capture_positions["p1"][0].tolist() == list(range(P + 2, P + 7))
    assert s.capture_positions["p2"][0].tolist() == [P + 7, P + 8]


def test_top_k_samples_only_among_the_k_most_likely_tokens() -> None:
    from explab.interventions import row_generator, sample_token

    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0, 2.8])  # top-3: tokens 1, 3, 5
    hot = SamplingParams(temperature=50.0, top_k=3)  # nearly uniform without the cut
    seen = {sample_token(logits, hot, row_generator(7, i)) for i in range(300)}
    assert seen == {1, 3, 5}
    assert {sample_token(logits, SamplingParams(temperature=50.0, top_k=1), row_generator(7, i))
            for i in range(50)} == {1}
    assert len({sample_token(logits, SamplingParams(temperature=50.0), row_generator(7, i)) for i in range(300)}) == 6


def test_growing_cache_equals_dynamic_cache_and_writes_steps_in_place() -> None:
    from explab.interventions.kvcache import GrowingCache, full_attention

    for kind in ("llama", "gpt2"):
        model = tiny(kind)
        assert full_attention(model)
        ids, mask = left_pad(PROMPTS)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = {"dynamic": T.DynamicCache(), "growing": GrowingCache(reserve=3)}
        outs = {name: model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True) for name, cache in caches.items()}
        storage = caches["growing"].layers[0].keys.untyped_storage().data_ptr()
        for step in range(6):  # past the reserve of 3: the buffers grow once
            if step == 4:  # a reorder (beam search, prefill sharing) replaces the tensors; writing goes on
                order = torch.tensor([2, 0, 1])
                for name in outs:
                    caches[name].reorder_cache(order)
                    outs[name].logits = outs[name].logits[order]
                mask = mask[order]
            nxt = outs["dynamic"].logits[:, -1].argmax(-1, keepdim=True)
            torch.testing.assert_close(outs["growing"].logits[:, -1], outs["dynamic"].logits[:, -1],
                                       atol=1e-5, rtol=1e-5)
            mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
            pos = (mask.cumsum(-1) - 1)[:, -1:]
            outs = {name: model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True) for name, cache in caches.items()}
            layer = caches["growing"].layers[0]
            assert layer.keys.shape == caches["dynamic"].layers[0].keys.shape
            torch.testing.assert_close(layer.keys, caches["dynamic"].layers[0].keys)
            if step < 3:  # within the reserve every step lands in the same buffer: no copy of the cache
                assert layer.keys.untyped_storage().data_ptr() == storage
        torch.testing.assert_close(outs["growing"].logits, outs["dynamic"].logits, atol=1e-5, rtol=1e-5)


def test_tokens_read_at_the_end_equal_tokens_read_every_step() -> None:
    """Rows that can only end at max_tokens keep their tokens on the device until the end; the same
    batch with a stop string on one row (one that never matches) reads every step instead: every row's
    tokens, logprobs, text and captures are the same either way, and each row's tokens the same as
    decoding it alone."""
    model = tiny()
    v = torch.randn(D, generator=torch.Generator().manual_seed(4)).tolist()
    gen = Positions(kind="generated")
    params = [
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=0.9, top_k=12, max_tokens=12, n=2, seed=3, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=1.0, max_tokens=4, seed=8, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
    ]
    watched = [*params[:3], params[3].model_copy(update={"stop": ["never said"]})]
    prompts = [*PROMPTS, PROMPTS[0]]
    own = [[Steer(point="blocks.1.resid_post", vector=v, alpha=float(i), positions=gen),
            Capture(point="blocks.0.resid_post", per_step=True)] for i in range(4)]
    deferred = decode(model, TOK, prompts, params, per_prompt=own)
    stepped = decode(model, TOK, prompts, watched, per_prompt=own)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        alone = decode(model, TOK, [p], [sp], per_prompt=[own[i]])[0]
        for a, b, c in zip(deferred[i].completions, stepped[i].completions, alone.completions, strict=True):
            assert a == b and len(a.token_ids) == sp.max_tokens and a.finish_reason == "length"
            assert a.token_ids == c.token_ids and a.text == TOK.decode(a.token_ids, skip_special_tokens=True)
            assert (a.logprobs is not None) == sp.logprobs
        for a, b in zip(deferred[i].captures, stepped[i].captures, strict=True):
            assert torch.equal(a["blocks.0.resid_post"], b["blocks.0.resid_post"])
            assert a["blocks.0.resid_post"].shape[0] == sp.max_tokens


def test_tokens_read_every_k_steps_equal_tokens_read_every_step(monkeypatch) -> None:
    """Without interventions a GPU reads the tokens every few steps (READ_EVERY): rows that end at EOS
    or a stop string between two reads are cut exactly where reading every step cuts them (planted:
    a big EOS logit from step 5 on for one row's prompt), with the same logprobs and texts."""
    from explab.interventions.decode import READ_EVERY

    model = tiny()
    eos = TOK.eos_token_id
    fed = {"n": 0}

    def plant(module, args, out):  # from the 5th forward on, EOS wins for row 0 (its prompt is PROMPTS[0])
        fed["n"] += 1
        if fed["n"] >= 5:
            out = out.clone()
            out[0, -1, eos] += 100.0
        return out

    params = [
        SamplingParams(temperature=0, max_tokens=30, logprobs=True),
        SamplingParams(temperature=1.0, max_tokens=23, n=2, seed=5, logprobs=True),
        SamplingParams(temperature=1.0, max_tokens=40, seed=6, stop=["e", "a"]),
    ]
    got = {}
    for every in (1, 3, 7):
        monkeypatch.setitem(READ_EVERY, "cpu", every)
        fed["n"] = 0
        handle = model.lm_head.register_forward_hook(plant)
        try:
            got[every] = decode(model, TOK, PROMPTS, params)
        finally:
            handle.remove()
    first = got[1][0].completions[0]
    assert first.finish_reason == "stop" and first.token_ids[-1] == eos and len(first.token_ids) == 5
    assert any(c.finish_reason == "stop" for c in got[1][2].completions)  # a stop string cut row 2
    for every in (3, 7):
        assert got[every] == got[1]


def test_generation_with_images_equals_transformers_generate_on_llava_and_on_mrope_qwen2_5_vl() -> None:
    """`decode` with a VLM's pixels in its prefill (`extra_inputs`, as the HookedModel passes them) gives the
    tokens and the logprobs of transformers' own greedy ``generate`` on the same left-padded batch. For
    Qwen2.5-VL (M-RoPE) the text after an image counts on from the end of the image's position grid, not from
    the token count: the rotary positions of the prefill and of every step equal ``generate``'s."""
    import numpy as np

    from explab.models import ModelSpec, load_model

    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype("uint8") for _ in range(2)]
    for name in ("tiny:llava", "tiny:qwen2_5_vl"):
        loaded = load_model(ModelSpec(name=name, device="cpu"))
        texts = [loaded.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True, tokenize=False) for q in ("What is it?", "Describe the picture briefly.")]
        inputs = loaded.processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
        rotary = loaded.model.model.language_model.rotary_emb if name == "tiny:qwen2_5_vl" else None
        seen: list[torch.Tensor] = []
        handle = rotary.register_forward_hook(lambda m, args, out, into=seen: into.append(args[1].clone())) \
            if rotary else None
        with torch.no_grad():
            ref = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                        output_logits=True, return_dict_in_generate=True)
        theirs = seen[:]
        seen.clear()
        prompts = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = decode(loaded.model, loaded.tokenizer, prompts,
                     SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True), extra_inputs=extra)
        if handle is not None:
            handle.remove()
        tokens = ref.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = torch.stack([torch.log_softmax(x.float(), -1) for x in ref.logits], 1)
        for b, o in enumerate(out):
            assert o.completions[0].token_ids == tokens[b].tolist(), name
            want = logprobs[b].gather(-1, tokens[b][:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(o.completions[0].logprobs), want, atol=1e-5, rtol=0)
        if name == "tiny:qwen2_5_vl":
            assert len(seen) == len(theirs) == 6
            for a, b in zip(theirs, seen, strict=True):
                assert a.shape == b.shape and torch.equal(a, b)
            assert int(theirs[0][0, 1, -1]) < inputs["input_ids"].shape[1] - 1  # the grid really shortens them
