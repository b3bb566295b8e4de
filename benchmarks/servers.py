"""Shared servers vs the bare library, as throughput ratios measured in one run.

1. Hooked capture: 8 (``--callers``) concurrent callers each send single-sequence forward requests (capturing
   ``blocks.{L}.resid_post``) to the shared HookedModel server, which batches them dynamically;
   baseline: the same sequences as batched forward passes (batch = callers, ``output_hidden_states``) in
   this process.
2. Generation: 8 concurrent callers send single greedy chat requests to the shared Generator
   (transformers backend); baseline: ``model.generate`` on left-padded batches of the same size.
3. Mixed interventions (a steering sweep through the shared HookedModel): 8 concurrent callers send
   single greedy steered generation requests (``alpha * v`` added at ``blocks.{layer}.resid_post`` on
   generated positions); "mixed": each caller has its own alpha and layer, so every batch carries
   different interventions per row; "homogeneous": the same callers with one shared setting.
   Every row generates exactly ``--new-tokens`` tokens (``ignore_eos``): different strengths make
   rows end at different EOS steps, and a batch whose rows end early runs on with fewer rows, which
   is the workload's cost, not the batching's (``--stop-at-eos`` measures that too).
   Target: mixed >= 0.9 of homogeneous throughput. Also the same for steered forward passes with a
   capture (each caller its own layer and alpha).

The default model is a random Llama big enough that the model dominates (``tiny:llama`` with 6
layers, 512 wide; ``--layers``/``--hidden`` change it); ``--model`` takes any model spec name
(e.g. ``smollm2-135m-instruct``). Target for 1-2: ratio >= 0.8.

    python benchmarks/servers.py [--model tiny:llama --layers 6 --hidden 512 --requests 64 --tokens 64
                                  --new-tokens 32 --workloads capture,generate,mixed]

On a GPU (bf16, the servers sharing it): ``--num-gpus 0.5 --callers 64 --max-batch 64 --layers 16 --hidden 2048``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch


def _spec(args: argparse.Namespace) -> dict:
    if args.model != "tiny:llama":
        return {"name": args.model}
    return {"name": "tiny:llama", "tiny": {
        "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
        "num_attention_heads": args.hidden // 64, "num_key_value_heads": args.hidden // 64,
    }}


def _texts(n: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "sound", "north", "green"]
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(words), (length,), generator=g).tolist()
        out.append(" ".join(words[i] for i in idx)[: length * 3])  # byte tokenizer: ~length*3 tokens max
    return out


def _concurrent(n_callers: int, work: list, call) -> float:
    """Run ``call(item)`` over ``work`` from ``n_callers`` threads; returns seconds."""
    chunks = [work[i::n_callers] for i in range(n_callers)]
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda c=c: [call(x) for x in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench_capture(args: argparse.Namespace, loaded, hooked) -> dict:
    from explab.interventions import Capture, points

    tok, model = loaded.tokenizer, loaded.model
    mid = hooked.describe()["n_layers"] // 2
    point = points.resid_post(mid)
    texts = _texts(args.requests, args.tokens)
    n = args.callers
    batches = [texts[i:i + n] for i in range(0, len(texts), n)]

    @torch.no_grad()
    def bare() -> float:
        start = time.perf_counter()
        for batch in batches:
            enc = tok(batch, return_tensors="pt", padding=True).to(model.device)
            enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hs = model(**enc, output_hidden_states=True).hidden_states[mid + 1]
            hs = hs.float().cpu()
            [hs[i, enc["attention_mask"][i].bool().cpu()].numpy() for i in range(len(batch))]
        return time.perf_counter() - start

    capture = [Capture(point=point)]
    served = lambda: _concurrent(n, texts, lambda t: hooked.forward([{"text": t, "interventions": capture}]))  # noqa: E731
    bare(), served()  # warm up both
    t_bare = min(bare() for _ in range(args.repeats))
    t_served = min(served() for _ in range(args.repeats))
    return {"bare_seq_per_s": len(texts) / t_bare, "server_seq_per_s": len(texts) / t_served,
            "ratio": t_bare / t_served}


def bench_generate(args: argparse.Namespace, loaded, generator) -> dict:
    from explab.servers import GenerationRequest, SamplingParams
    from explab.servers.prompts import encode_request

    tok, model = loaded.tokenizer, loaded.model
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    requests = [GenerationRequest(messages=[{"role": "user", "content": t}], params=params)
                for t in _texts(args.requests, args.tokens // 3, seed=1)]
    prompts = [encode_request(tok, r) for r in requests]

    @torch.no_grad()
    def bare() -> tuple[float, int]:
        start, produced = time.perf_counter(), 0
        for i in range(0, len(prompts), args.callers):
            chunk = prompts[i:i + args.callers]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                                 max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
            produced += (out.shape[1] - width) * len(chunk)
        return time.perf_counter() - start, produced

    counts: list[int] = []

    def call(request):
        result = generator.generate([request])[0]
        counts.append(len(result.completions[0].token_ids))

    def served() -> tuple[float, int]:
        counts.clear()
        return _concurrent(args.callers, requests, call), sum(counts)

    bare(), served()
    t_bare, n_bare = min(bare() for _ in range(args.repeats))
    t_served, n_served = min(served() for _ in range(args.repeats))
    return {"bare_tok_per_s": n_bare / t_bare, "server_tok_per_s": n_served / t_served,
            "ratio": (n_served / t_served) / (n_bare / t_bare)}


def _batching(hooked) -> tuple[int, int]:
    stats = hooked.stats()["batching"]["batcher"]
    return stats["requests"], stats["batches"]


def bench_mixed(args: argparse.Namespace, loaded, hooked) -> dict:
    """Steered generation and steered forward passes: per-caller settings vs one shared setting."""
    from explab.interventions import Capture, Steer, points
    from explab.servers import GenerationRequest, SamplingParams

    n_layers = hooked.describe()["n_layers"]
    d = loaded.model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(3)
    unit = torch.randn(d, generator=g)
    unit = (unit / unit.norm()).tolist()
    emb = loaded.model.get_input_embeddings().weight.detach().float()
    scale = float(emb.norm(dim=1).mean())  # a token embedding's norm
    alphas = [scale * a for a in (-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0)]
    mixed = [(i % n_layers, alphas[i % 8]) for i in range(args.callers)]  # caller i: its own layer and strength
    shared = [(n_layers // 2, alphas[-1])] * args.callers
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=not args.stop_at_eos)
    questions = _texts(args.requests, args.tokens // 3, seed=2)
    texts = _texts(args.requests, args.tokens, seed=4)

    def gen_call(setting):
        layer, alpha = setting
        steer = Steer(point=points.resid_post(layer), vector=unit, alpha=alpha, positions="generated")

        def call(q):
            request = GenerationRequest(messages=[{"role": "user", "content": q}], params=params,
                                        interventions=[steer])
            counts.append(len(hooked.generate([request])[0].completions[0].token_ids))
        return call

    def fwd_call(setting):
        layer, alpha = setting
        specs = [Steer(point=points.resid_post(layer), vector=unit, alpha=alpha),
                 Capture(point=points.resid_post(n_layers - 1), positions="last")]
        return lambda t: hooked.forward([{"text": t, "interventions": specs}])

    counts: list[int] = []

    def run(settings, make, work) -> tuple[float, int, float]:
        """(seconds, tokens generated, mean batch size) of one pass: caller i runs with settings[i]."""
        counts.clear()
        calls = [make(s) for s in settings]
        chunks = [work[i::args.callers] for i in range(args.callers)]
        r0, b0 = _batching(hooked)
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda c=c, k=k: [k(x) for x in c])
                   for c, k in zip(chunks, calls, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        r1, b1 = _batching(hooked)
        return seconds, sum(counts), (r1 - r0) / max(b1 - b0, 1)

    report = {}
    workloads = (("steered_generation", gen_call, questions), ("steered_forward", fwd_call, texts))
    for name, make, work in workloads:
        run(mixed, make, work), run(shared, make, work)  # warm up both
        best = {}
        for label, settings in (("homogeneous", shared), ("mixed", mixed)):
            best[label] = min((run(settings, make, work) for _ in range(args.repeats)), key=lambda x: x[0])
        row = {}
        for label, (seconds, tokens, batch) in best.items():
            row[f"{label}_seq_per_s"] = len(work) / seconds
            if tokens:
                row[f"{label}_tok_per_s"] = tokens / seconds
            row[f"{label}_mean_batch"] = batch
        row["ratio"] = best["homogeneous"][0] / best["mixed"][0] if not best["mixed"][1] else (
            (best["mixed"][1] / best["mixed"][0]) / (best["homogeneous"][1] / best["homogeneous"][0]))
        report[name] = row
    report["settings"] = {"stop_at_eos": args.stop_at_eos,
                          "mixed": [{"layer": la, "alpha": round(a, 3)} for la, a in mixed],
                          "homogeneous": {"layer": shared[0][0], "alpha": round(shared[0][1], 3)}}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:llama", help="any model spec name (default: random Llama)")
    parser.add_argument("--workloads", default="capture,generate,mixed")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="mixed workload: rows stop at EOS (default: every row generates --new-tokens)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--callers", type=int, default=8,
                        help="concurrent callers, and the batch of the bare baselines")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPU share of each server actor (0.5: the two servers share one GPU)")
    args = parser.parse_args()

    from explab import runtime
    from explab.models import load_model
    from explab.servers import get_server

    torch.set_num_threads(os.cpu_count() or 1)
    runtime.init(dashboard=False)
    spec = _spec(args)
    loaded = load_model(spec)
    opts = {"max_batch": args.max_batch, "max_wait_ms": 10, "num_gpus": args.num_gpus}
    workloads = set(args.workloads.split(","))
    hooked = get_server("hooked", spec, opts)
    model = f"random Llama {args.layers} layers x {args.hidden}" if args.model == "tiny:llama" else args.model
    report: dict = {"model": model, "device": str(loaded.device), "dtype": str(loaded.dtype),
                    "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}
    if "capture" in workloads:
        report["hooked_capture"] = bench_capture(args, loaded, hooked)
        print(json.dumps({"hooked_capture": report["hooked_capture"]}), file=sys.stderr, flush=True)
    if "generate" in workloads:
        generator = get_server("generator", spec, {**opts, "backend": "transformers"})
        report["generation"] = bench_generate(args, loaded, generator)
        print(json.dumps({"generation": report["generation"]}), file=sys.stderr, flush=True)
        report["generator_batching"] = generator.stats()["batching"]["batcher"]
    if "mixed" in workloads:
        report["mixed_interventions"] = bench_mixed(args, loaded, hooked)
        print(json.dumps({"mixed_interventions": report["mixed_interventions"]}), file=sys.stderr, flush=True)
    report["hooked_batching"] = hooked.stats()["batching"]["batcher"]
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
