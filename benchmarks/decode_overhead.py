"""Per-step cost of `explab.interventions.decode` against bare ``model.generate``, one JSON line.

A random Llama (``tiny:llama``, ``--layers`` x ``--hidden``), ``--batch`` left-padded prompts of
``--tokens`` tokens, ``--new-tokens`` greedy tokens with ``ignore_eos`` (every row runs to the end,
as ``min_new_tokens`` makes ``generate`` do). Three workloads through ``decode``:

- ``plain``: no interventions;
- ``steer``: one `Steer` on generated positions at the middle block, shared by every row;
- ``sweep``: each row its own strength and layer (``per_prompt``), as a steering sweep sends them.

Per-step ms is wall time / new tokens (the prefill included, as for ``generate``), best of
``--repeats``. ``syncs_per_step`` counts host<->device scalar reads (``aten::_local_scalar_dense``,
what ``.item()``/``.tolist()``/``int(t)`` run) per decode step under ``torch.profiler``, and
``ops_per_step`` all aten ops per step: on a GPU, where a small model's step is launch and sync bound,
these are the overhead that CPU wall time hides behind compute.

    python benchmarks/decode_overhead.py [--layers 2 --hidden 64 --batch 64 --tokens 64 --new-tokens 64
                                          --device cpu|cuda --dtype float32|bfloat16 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _load(args: argparse.Namespace):
    from explab.models import load_model

    heads = max(1, args.hidden // 64)
    return load_model({"name": "tiny:llama", "device": args.device, "dtype": args.dtype, "tiny": {
        "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
        "num_attention_heads": heads, "num_key_value_heads": heads,
    }})


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    # lengths vary so that rows are left padded, as in a server batch
    return [torch.randint(3, vocab, (args.tokens - (i % 8),), generator=g).tolist() for i in range(args.batch)]


def _workloads(args: argparse.Namespace, hidden: int, layers: int) -> dict[str, dict]:
    from explab.interventions import Positions, Steer, points

    g = torch.Generator().manual_seed(1)
    v = torch.randn(hidden, generator=g)
    v = (v / v.norm()).tolist()
    gen = Positions(kind="generated")
    steer = [Steer(point=points.resid_post(layers // 2), vector=v, alpha=2.0, positions=gen)]
    sweep = [[Steer(point=points.resid_post(r % layers), vector=v, alpha=0.5 + 0.25 * (r % 7), positions=gen)]
             for r in range(args.batch)]
    return {"plain": {}, "steer": {"specs": steer}, "sweep": {"per_prompt": sweep}}


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _counts(fn, steps: int) -> tuple[float, float]:
    """(scalar reads, aten ops) per step of one profiled run of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return syncs / steps, ops / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="plain,steer,sweep")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler op/sync counts")
    args = ap.parse_args()

    from explab.generation import SamplingParams
    from explab.interventions.decode import decode

    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    prompts = _prompts(args, cfg.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    n = args.new_tokens

    @torch.no_grad()
    def bare() -> None:
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=pad)

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    result: dict = {"layers": args.layers, "hidden": args.hidden, "batch": args.batch, "tokens": args.tokens,
                    "new_tokens": n, "device": str(model.device), "dtype": args.dtype,
                    "threads": torch.get_num_threads()}
    bare()  # warm up
    t_bare = _best(bare, args.repeats)
    result["generate_ms_per_step"] = round(1000 * t_bare / n, 3)
    if not args.no_profile:
        result["generate_syncs_per_step"], result["generate_ops_per_step"] = (
            round(x, 1) for x in _counts(bare, n))
    work = _workloads(args, cfg.hidden_size, cfg.num_hidden_layers)
    for name in args.workloads.split(","):
        kwargs = work[name]

        def run(kwargs=kwargs) -> None:
            out = decode(model, tok, prompts, params, **kwargs)
            assert all(len(o.completions[0].token_ids) == n for o in out)

        run()
        t = _best(run, args.repeats)
        result[f"{name}_ms_per_step"] = round(1000 * t / n, 3)
        result[f"{name}_ratio"] = round(t / t_bare, 2)  # decode time / generate time (1.0: no overhead)
        if not args.no_profile:
            result[f"{name}_syncs_per_step"], result[f"{name}_ops_per_step"] = (round(x, 1) for x in _counts(run, n))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
