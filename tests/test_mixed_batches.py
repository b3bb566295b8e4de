"""One batch, different interventions per row: every row equals the same row run alone (pure PyTorch)."""

from __future__ import annotations

import pytest
import torch
from test_decode import PROMPTS, TOK, _first_with_break
from test_decode import tiny as tiny_char
from test_interventions import D, L, padded_batch, tiny, tiny_llava

from explab.errors import ExplabError
from explab.interventions import (
    Bidirectional,
    Capture,
    Knockout,
    Positions,
    ProjectOut,
    Steer,
    batch_key,
    decode,
    intervene,
    points,
    run_with_hooks,
)
from explab.servers.types import SamplingParams

ALL_POINT_KINDS = [
    points.EMBED,
    points.resid_pre(1),
    points.resid_post(0),
    points.attn_out(1),
    points.mlp_out(2),
    points.FINAL,
]


def vec(seed: int, scale: float = 1.0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale


def alone(model, ids, mask, row, specs, **kw):
    """Row ``row`` of a left-padded batch run by itself, without padding, with shared (not per-row) specs."""
    real = mask[row].bool()
    return run_with_hooks(model, {"input_ids": ids[row : row + 1, real]}, specs, **kw)


def assert_row_equals_alone(model, ids, mask, per_row, batched, session, **kw):
    out, s = batched, session
    for r, specs in enumerate(per_row):
        with torch.no_grad():
            ref, rs = alone(model, ids, mask, r, specs, **{k: [v[r]] for k, v in kw.items()})
        n = int(mask[r].sum())
        torch.testing.assert_close(out.logits[r, -n:], ref.logits[0], atol=1e-5, rtol=1e-5)
        asked = [sp.key for sp in specs if isinstance(sp, Capture)]
        for key in asked:
            torch.testing.assert_close(s.captures[key][r], rs.captures[key][0], atol=1e-5, rtol=1e-5)
            assert torch.equal(s.capture_positions[key][r], rs.capture_positions[key][0])
        for key in s.captures:
            if key not in asked:  # a row captures only what it asked for
                assert s.captures[key][r].shape[0] == 0
        assert s.row_n_applied[r] == rs.n_applied


def test_mixed_forward_equals_each_row_alone() -> None:
    model = tiny("llama")
    ids, mask = padded_batch([7, 4, 9, 6, 5])
    P = [5, 2, 6, 6, 3]  # prompt lengths: later positions count as generated (teacher forcing)
    per_row = [
        # captures at every point kind, steering at a second layer on the prompt
        [
            *(Capture(point=p) for p in ALL_POINT_KINDS),
            Steer(point=points.resid_post(1), vector=vec(1), alpha=3.0, positions="prompt"),
        ],
        # another layer, strength and position set; a capture before and after the steer at one point
        [
            Capture(point=points.resid_post(0), name="before"),
            Steer(
                point=points.resid_post(0),
                vector=vec(2),
                alpha=-2.0,
                positions=Positions(kind="indices", indices=[0, -1]),
            ),
            Capture(point=points.resid_post(0), positions="last"),
        ],
        # projection on a span, steering on generated positions, at the same point
        [
            ProjectOut(
                point=points.resid_post(1), direction=vec(3), positions=Positions(kind="span", start=1, end=5)
            ),
            Steer(point=points.resid_post(1), vector=vec(4), alpha=5.0, positions="generated"),
            Capture(point=points.resid_post(1), positions="generated"),
        ],
        [],  # nothing at all
        # the same steer as row 0 but on every position, and a capture of it under another name
        [
            Steer(point=points.resid_post(1), vector=vec(1), alpha=3.0),
            Capture(point=points.mlp_out(2), name="mlp", positions="prompt"),
        ],
    ]
    with torch.no_grad():
        out, s = run_with_hooks(
            model, {"input_ids": ids, "attention_mask": mask}, [], per_row=per_row, prompt_lengths=P
        )
    assert_row_equals_alone(model, ids, mask, per_row, out, s, prompt_lengths=P)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.logits[3], plain[3])  # a row without interventions is untouched, bitwise
    assert s.row_n_applied[0][-1] == 5 and s.row_n_applied[1][1] == 2 and s.row_n_applied[4][0] == 5


def test_same_settings_in_every_row_collapse_to_one_vector() -> None:
    model = tiny("qwen2")
    ids, mask = padded_batch([5, 8, 3])
    steer = Steer(point=points.resid_post(1), vector=vec(7), alpha=2.0, positions="last")
    with torch.no_grad(), intervene(model, per_row=[[steer]] * 3) as s:
        out = model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        shared, _ = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [steer])
    [op] = s._vec_ops
    assert op.vec.shape == (D,) and op.groups[0][1] is None  # the homogeneous batch's kernels
    assert torch.equal(out.logits, shared.logits)
    assert s.n_applied == [] and s.row_n_applied == [[1], [1], [1]]


def test_mixed_batch_with_shared_specs_and_gpt2() -> None:
    model = tiny("gpt2")
    ids, mask = padded_batch([6, 3, 8])
    shared = [Capture(point=points.resid_post(0))]
    per_row = [
        [Steer(point=points.attn_out(0), vector=vec(5), alpha=1.5)],
        [ProjectOut(point=points.resid_pre(2), direction=vec(6))],
        [Steer(point=points.resid_post(2), vector=vec(8), positions="last"), Capture(point=points.FINAL)],
    ]
    # GPT-2's positions are absolute: count them from each row's first real token
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out, s = run_with_hooks(
            model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, shared, per_row=per_row
        )
    assert_row_equals_alone(model, ids, mask, [[*shared, *r] for r in per_row], out, s)
    assert s.n_applied[0] == 0  # the shared capture modifies nothing


def test_knockout_and_bidirectional_group_with_per_row_steering() -> None:
    model = tiny("llama")
    model.set_attn_implementation("eager")  # the rows alone run eager too (the masks force it)
    ids, mask = padded_batch([9, 7, 8])
    for masks in (
        [
            Knockout(
                layers=[0, 1],
                queries=Positions(kind="span", start=4),
                keys=Positions(kind="indices", indices=[1]),
            )
        ],
        [Bidirectional(layers=[0], start=1, end=4)],
    ):
        per_row = [
            [
                *masks,
                Steer(point=points.resid_post(0), vector=vec(1), alpha=2.0),
                Capture(point=points.attn_pattern(1)),
            ],
            [*masks, Capture(point=points.resid_post(2), positions="last")],
            [
                *masks,
                ProjectOut(point=points.mlp_out(1), direction=vec(2)),
                Capture(point=points.attn_pattern(1)),
            ],
        ]
        with torch.no_grad():
            out, s = run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [], per_row=per_row)
        assert_row_equals_alone(model, ids, mask, per_row, out, s)
        assert len({batch_key(r) for r in per_row}) == 1  # the masks force eager attention on every row
    with pytest.raises(ExplabError, match="separate batches"):
        intervene(model, per_row=[[Knockout(queries="all", keys="prompt")], []]).__enter__()
    assert batch_key([Capture(point=points.attn_pattern(0))]) != batch_key([Capture(point=points.EMBED)])
    assert batch_key([Steer(point="embed", vector=[1.0], alpha=3)]) == batch_key([Capture(point="final")])


def test_mixed_batch_needs_one_spec_list_per_row() -> None:
    model = tiny("llama")
    ids, mask = padded_batch([4, 5, 6])
    per_row = [[Steer(point=points.resid_post(0), vector=vec(1))], []]
    with pytest.raises(ExplabError, match="batch has 3"):
        run_with_hooks(model, {"input_ids": ids, "attention_mask": mask}, [], per_row=per_row)


def test_vision_points_per_row() -> None:
    model = tiny_llava()
    n_img = 16
    ids = torch.cat(
        [torch.tensor([[2, 5]]), torch.full((1, n_img), 47), torch.tensor([[7, 8, 9]])], 1
    ).repeat(3, 1)
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    per_row = [
        [Capture(point=points.vision_block(1)), Capture(point=points.resid_post(0))],
        [
            Steer(
                point=points.vision_block(0),
                vector=vec(3, d=24),
                positions=Positions(kind="indices", indices=[0, 3]),
            ),
            Capture(point=points.PROJECTOR),
        ],
        [
            Capture(point=points.PROJECTOR, positions="last"),
            Capture(point=points.vision_block(1), positions="last"),
        ],
    ]
    with torch.no_grad():
        out, s = run_with_hooks(model, {"input_ids": ids, "pixel_values": pix}, [], per_row=per_row)
        for r, specs in enumerate(per_row):
            ref, rs = run_with_hooks(
                model, {"input_ids": ids[r : r + 1], "pixel_values": pix[r : r + 1]}, specs
            )
            torch.testing.assert_close(out.logits[r], ref.logits[0], atol=1e-5, rtol=1e-5)
            for key in (sp.key for sp in specs if isinstance(sp, Capture)):
                torch.testing.assert_close(s.captures[key][r], rs.captures[key][0], atol=1e-5, rtol=1e-5)
    assert s.captures["vision.blocks.1"][1].shape[0] == 0 and s.captures["projector"][0].shape[0] == 0


def test_mixed_decode_equals_each_prompt_alone() -> None:
    model = tiny_char()
    prompt, sp, _, _ = _first_with_break(model)  # a sample with a paragraph break
    v = [vec(i, 3.0) for i in range(4)]
    prompts = [prompt, *PROMPTS]
    params = [
        sp,
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=9),
        SamplingParams(temperature=0.8, max_tokens=10, seed=4, n=2),
    ]
    per_prompt = [
        [
            Steer(
                point=points.resid_post(0),
                vector=v[0],
                alpha=2.0,
                positions=Positions(kind="paragraph", paragraph=1),
            ),
            Capture(point=points.resid_post(0), name="after", per_step=True),
        ],
        [
            Steer(point=points.resid_post(1), vector=v[1], alpha=-1.0, positions="generated"),
            Capture(point=points.EMBED, positions="generated"),
        ],
        [],
        [
            Steer(point=points.resid_post(0), vector=v[3], positions="prompt"),
            ProjectOut(point=points.resid_post(1), direction=v[2], positions="generated"),
            Capture(point=points.mlp_out(1), per_step=True),
        ],
    ]
    batched = decode(model, TOK, prompts, params, per_prompt=per_prompt)
    for p, prm, specs, got in zip(prompts, params, per_prompt, batched, strict=True):
        ref = decode(model, TOK, [p], prm, specs)[0]
        assert [c.token_ids for c in got.completions] == [c.token_ids for c in ref.completions]
        for caps, rcaps in zip(got.captures, ref.captures, strict=True):
            assert caps.keys() == rcaps.keys() == {s.key for s in specs if isinstance(s, Capture)}
            for key in caps:
                torch.testing.assert_close(caps[key], rcaps[key], atol=1e-4, rtol=1e-4)
    plain = decode(model, TOK, prompts[:2], params[:2])
    assert batched[1].completions[0].token_ids != plain[1].completions[0].token_ids  # the steer acts


def test_typed_constructors_fail_where_built_with_one_line() -> None:
    assert (
        points.resid_post(3) == "blocks.3.resid_post" and points.attn_pattern(-1) == "blocks.-1.attn.pattern"
    )
    assert points.vision_block(0) == "vision.blocks.0" and points.text_block(2) == "text.blocks.2"
    bad = [
        lambda: Capture(point="blocks.0.resid_middle"),
        lambda: Capture(point="blocks.one.resid_post"),
        lambda: Steer(point=points.resid_post(0), vector=[]),
        lambda: Steer(point=points.resid_post(0), vector=[1.0, float("nan")]),
        lambda: Steer(point=points.resid_post(0), vector=[1.0], positions=Positions(kind="indices")),
        lambda: Steer(point=points.resid_post(0), vector=[1.0], positions={"kind": "span"}),
        lambda: ProjectOut(point=points.EMBED, direction=[0.0, 0.0]),
        lambda: Bidirectional(start=4, end=2),
        lambda: points.resid_post("3"),
        lambda: points.mlp_out(True),
    ]
    for make in bad:
        with pytest.raises(ExplabError) as err:
            make()
        assert "\n" not in str(err.value) and ": " in str(err.value)
    s = Steer(point=points.resid_post(L - 1), vector=torch.ones(D), alpha=2)
    assert s.vector == [1.0] * D and isinstance(s.vector[0], float)
    assert Steer.model_validate_json(s.model_dump_json()) == s


def _prefill_rows(model):
    """Record the batch size of every prefill (a forward without a filled KV cache)."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        if pkv is None or pkv.get_seq_length() == 0:
            sizes.append(int(kwargs["input_ids"].shape[0]))

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_sweep_over_strengths_prefills_each_prompt_once_and_equals_each_row_alone() -> None:
    model = tiny_char()
    v = vec(7, 3.0)
    alphas = [-2.0, 0.0, 1.0, 2.5]
    prompts = [p for p in PROMPTS for _ in alphas]
    params = [SamplingParams(temperature=0, max_tokens=8) for _ in prompts]
    per_prompt = [
        [Steer(point=points.resid_post(1), vector=v, alpha=a, positions="generated"),
         Capture(point=points.resid_post(0), positions="generated")]
        for _ in PROMPTS for a in alphas
    ]
    sizes, handle = _prefill_rows(model)
    try:
        batched = decode(model, TOK, prompts, params, per_prompt=per_prompt)
        assert sizes == [len(PROMPTS)]  # 12 rows, 3 distinct prompts: one prefill of 3 rows
        sizes.clear()
        sampled = decode(model, TOK, PROMPTS[:1], SamplingParams(temperature=0.9, max_tokens=6, seed=3, n=4))
        assert sizes == [1]  # n samples of one prompt share its prefill too
        sizes.clear()
        # a row whose spec acts on prompt positions (or records the prefill's last step) prefills every row
        for spec in (Steer(point=points.resid_post(1), vector=v, positions="prompt"),
                     Capture(point=points.resid_post(1), per_step=True)):
            decode(model, TOK, prompts[:2], params[:2], per_prompt=[[spec], []])
            assert sizes == [2]
            sizes.clear()
    finally:
        handle.remove()
    key = per_prompt[0][1].key
    for p, prm, specs, got in zip(prompts, params, per_prompt, batched, strict=True):
        ref = decode(model, TOK, [p], prm, specs)[0]
        assert got.completions[0].token_ids == ref.completions[0].token_ids
        torch.testing.assert_close(got.captures[0][key], ref.captures[0][key], atol=1e-4, rtol=1e-4)
        assert torch.equal(got.capture_positions[0][key], ref.capture_positions[0][key])
    # the same samples from a full prefill: a zero steer on the prompt turns the sharing off
    off = [Steer(point=points.resid_post(0), vector=v, alpha=0.0, positions="prompt")]
    full = decode(model, TOK, PROMPTS[:1], SamplingParams(temperature=0.9, max_tokens=6, seed=3, n=4), off)
    assert [c.token_ids for c in sampled[0].completions] == [c.token_ids for c in full[0].completions]
    assert len({tuple(c.token_ids) for c in sampled[0].completions}) > 1
    tokens = [tuple(o.completions[0].token_ids) for o in batched[: len(alphas)]]
    assert len(set(tokens)) > 1  # the strengths steer differently


def test_a_prefix_cache_prefills_each_prompt_once_across_calls() -> None:
    from explab.interventions.prefixes import PrefixCache

    model = tiny_char()
    v = vec(11, 3.0)
    cache = PrefixCache(2**20)
    greedy = SamplingParams(temperature=0, max_tokens=8)

    def sweep(alpha: float, prompts: list[list[int]], prefixes=cache):
        specs = [[Steer(point=points.resid_post(1), vector=v, alpha=alpha, positions="generated"),
                  Capture(point=points.mlp_out(0), positions="generated")] for _ in prompts]
        return decode(model, TOK, prompts, greedy, per_prompt=specs, prefix_cache=prefixes)

    sizes, handle = _prefill_rows(model)
    try:
        sweep(1.0, PROMPTS[:2])  # first sight of each prompt: remembered, not stored
        assert sizes == [2] and cache.stats()["entries"] == 0
        sizes.clear()
        second = sweep(-2.0, PROMPTS)  # the first two seen again: stored; the third remembered
        assert sizes == [3] and cache.stats()["entries"] == 2 and cache.hits == 0
        sizes.clear()
        third = sweep(0.5, PROMPTS)  # two known: only the third is prefilled (and now stored)
        assert sizes == [1] and cache.hits == 2 and cache.stats()["entries"] == 3
        sizes.clear()
        fourth = sweep(-2.0, PROMPTS)
        assert sizes == [] and cache.hits == 5
        sizes.clear()
        twice = [[2, *TOK.encode("a new prompt")]] * 2  # twice in one batch: stored at once
        sweep(1.0, twice)
        assert sizes == [1] and cache.stats()["entries"] == 4
    finally:
        handle.remove()
    for alpha, got in ((-2.0, second), (0.5, third), (-2.0, fourth)):
        ref = sweep(alpha, PROMPTS, prefixes=None)
        for g, r in zip(got, ref, strict=True):
            assert g.completions[0].token_ids == r.completions[0].token_ids
            key = next(iter(r.captures[0]))
            torch.testing.assert_close(g.captures[0][key], r.captures[0][key], atol=1e-4, rtol=1e-4)
            assert torch.equal(g.capture_positions[0][key], r.capture_positions[0][key])
    assert [o.completions[0].token_ids for o in second] != [o.completions[0].token_ids for o in third]


def test_the_prefix_cache_drops_the_least_recently_used_prompt_past_its_bytes() -> None:
    from explab.interventions.prefixes import Prefill, PrefixCache

    def entry(n: int) -> Prefill:  # n positions of one head: 2 * n * 50 floats, and 28 logits
        return Prefill(((torch.zeros(1, n, 50), torch.zeros(1, n, 50)),), torch.zeros(28))

    size = entry(1).nbytes
    assert size == (2 * 50 + 28) * 4
    cache = PrefixCache(3 * size)
    assert not cache.admit((1,)) and cache.admit((1,)) and cache.admit((2,), repeated=True)
    for key in ((1,), (2,), (3,)):
        cache.put(key, entry(1))
    assert cache.get((1,)) is not None  # (2,) is now the least recently used
    cache.put((4,), entry(1))
    assert cache.get((2,)) is None and all(cache.get(k) is not None for k in ((1,), (3,), (4,)))
    cache.put((5,), entry(4))  # bigger than the whole cache: not kept, nothing dropped for it
    assert cache.get((5,)) is None and cache.stats()["entries"] == 3 and cache.stats()["bytes"] == 3 * size
