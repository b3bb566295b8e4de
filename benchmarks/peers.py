"""explab's HookedModel server vs TransformerLens and nnsight on the same work, in one run.

Same weights (each peer gets a deep copy of the model explab loads), same prompts (token ids of one
length, so nobody pads), float32, the same torch thread count in the server actor and in this
process. Per model (a random Llama, default 6 layers x 512, and the real SmolLM2-135M-Instruct):

1. capture: the residual stream after every block (``blocks.{i}.resid_post``) for ``--prompts``
   prompts of ``--tokens`` tokens. explab: one ``forward`` call to the shared server (it batches up
   to ``--batch`` rows); TransformerLens: ``run_with_cache`` with a names filter on batches of
   ``--batch``; nnsight: ``trace`` saving every layer's output on batches of ``--batch``. Also timed:
   explab's hooks in this process (``run_with_hooks``, no server), which shows what the server's
   process boundary (activations shipped to the caller through Ray) costs.
2. steered generation: ``alpha * v`` added at ``blocks.{L}.resid_post`` on generated positions,
   greedy, ``--new-tokens`` tokens. explab: one ``generate`` call with a ``Steer`` spec;
   TransformerLens: ``generate`` under a hook that acts on one-position (KV-cache) steps; nnsight:
   ``generate`` with ``tracer.iter[1:]`` (plus ``min_new_tokens``, which its bounded loop needs).
3. steering sweep: ``--strengths`` strengths x ``--sweep-prompts`` prompts. explab: one caller
   thread per strength, all at once, through the shared server (rows with different strengths share
   batches where the server supports mixed interventions; otherwise one batch per strength); the
   peers as their users write it: a loop over strengths, each batching the prompts.

Tokens are counted up to and including each row's first EOS (explab stops a row there). The steered
greedy tokens of the three are compared and reported (``tokens_agree``). Reports sequences/s and
tokens/s (prompt tokens for capture, generated tokens for generation) and explab / peer ratios, with
the 1-minute load average at the start and the end.

    python benchmarks/peers.py                       # 64 prompts x 64 tokens, 32 new, 16 x 16 sweep
    python benchmarks/peers.py --prompts 16 --tokens 32 --new-tokens 16 --strengths 8 --models llama
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import threading
import time
from typing import Any

import torch

LLAMA = {"name": "tiny:llama", "tiny": {"num_hidden_layers": 6, "hidden_size": 512, "intermediate_size": 1408,
                                        "num_attention_heads": 8, "num_key_value_heads": 8}}
SMOLLM2 = {"name": "smollm2-135m-instruct"}
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "sound", "north", "green", "the",
         "of", "bright", "window", "quiet", "market", "ocean", "paper", "garden", "winter"]


# --- prompts ---------------------------------------------------------------------------------------
def prompts(tok: Any, n: int, length: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """``n`` (text, token ids) pairs of exactly ``length`` tokens, where explab's encoding of the text
    (`encode_request` of a raw prompt, as the server does) gives back exactly those ids."""
    from explab.servers import GenerationRequest
    from explab.servers.prompts import encode_request

    def encode(text: str) -> list[int]:
        return encode_request(tok, GenerationRequest(prompt=text))

    g = torch.Generator().manual_seed(seed)
    out: list[tuple[str, list[int]]] = []
    for _ in range(50 * n):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (2 * length,), generator=g).tolist()]
        ids = encode(" ".join(words))[:length]
        text = tok.decode(ids, skip_special_tokens=True)
        if len(ids) == length and encode(text) == ids:
            out.append((text, ids))
            if len(out) == n:
                return out
    from explab.errors import ExplabError

    raise ExplabError(f"could not build {n} prompts of {length} tokens that re-encode exactly: "
                      "give a smaller --tokens")


def _useful(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first EOS."""
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[: j + 1]
    return tokens


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- the peers, written as their users would -------------------------------------------------------
class TransformerLens:
    name = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any, folder: str):
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        tokenizer.save_pretrained(folder)  # TransformerLens re-loads the tokenizer by its folder
        self.tl = TransformerBridge.boot_transformers(
            "explab-model", hf_model=model, tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
        self.layers = model.config.num_hidden_layers

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> list[torch.Tensor]:
        names = [f"blocks.{i}.hook_resid_post" for i in range(self.layers)]
        _, cache = self.tl.run_with_cache(ids, names_filter=names)
        return [cache[n] for n in names]

    @torch.no_grad()
    def steer(self, ids: torch.Tensor, layer: int, vector: torch.Tensor, new_tokens: int) -> list[list[int]]:
        def add_on_generated(resid: torch.Tensor, hook: Any) -> torch.Tensor:
            return resid + vector if resid.shape[1] == 1 else resid

        with self.tl.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add_on_generated)]):
            out = self.tl.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_type="tokens",
                                   verbose=False)
        return out[:, ids.shape[1]:].tolist()


class NNsight:
    name = "nnsight"

    def __init__(self, model: Any, tokenizer: Any, folder: str):
        import nnsight

        self.lm = nnsight.LanguageModel(model, tokenizer=tokenizer)
        self.layers = model.config.num_hidden_layers

    def capture(self, ids: torch.Tensor) -> list[torch.Tensor]:
        saved = []
        with self.lm.trace(ids):
            for i in range(self.layers):
                saved.append(self.lm.model.layers[i].output.save())
        return [s[0] if isinstance(s, tuple) else s for s in saved]

    def steer(self, ids: torch.Tensor, layer: int, vector: torch.Tensor, new_tokens: int) -> list[list[int]]:
        with self.lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False) as tracer:
            for _ in tracer.iter[1:new_tokens]:
                self.lm.model.layers[layer].output[:] += vector
            out = tracer.result.save()
        return out[:, ids.shape[1]:].tolist()


# --- explab's hooks in this process (no server): where the server's process boundary costs ----------
class ExplabInProcess:
    name = "explab_in_process"

    def __init__(self, model: Any, layers: int):
        self.model, self.layers = model, layers

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> list[torch.Tensor]:
        from explab.interventions import run_with_hooks

        specs = [{"type": "capture", "point": f"blocks.{i}.resid_post"} for i in range(self.layers)]
        _, session = run_with_hooks(self.model, {"input_ids": ids}, specs, logits_to_keep=1)
        return [torch.stack(session.captures[f"blocks.{i}.resid_post"]) for i in range(self.layers)]


# --- explab, through the shared server -------------------------------------------------------------
class Explab:
    name = "explab"

    def __init__(self, server: Any, layers: int):
        self.server, self.layers = server, layers

    def capture(self, batch: list[list[int]]) -> list[Any]:
        specs = [{"type": "capture", "point": f"blocks.{i}.resid_post"} for i in range(self.layers)]
        return self.server.forward([{"token_ids": ids, "interventions": specs} for ids in batch])

    def steer(self, texts: list[str], layer: int, vector: torch.Tensor, alpha: float,
              new_tokens: int) -> list[list[int]]:
        spec = {"type": "steer", "point": f"blocks.{layer}.resid_post", "vector": vector.tolist(),
                "alpha": alpha, "positions": "generated"}
        requests = [{"prompt": t, "interventions": [spec],
                     "params": {"temperature": 0.0, "max_tokens": new_tokens}} for t in texts]
        return [r.completions[0].token_ids for r in self.server.generate(requests)]


# --- the three workloads ---------------------------------------------------------------------------
def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_model(spec: dict, args: argparse.Namespace) -> dict[str, Any]:
    from explab.models import load_model
    from explab.servers import get_server

    loaded = load_model(spec)
    model, tok = loaded.model, loaded.tokenizer
    layers = model.config.num_hidden_layers
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    options = {"max_batch": args.batch, "max_wait_ms": 10, "torch_threads": args.threads}
    server = get_server("hooked", spec, options)
    folder = tempfile.mkdtemp(prefix="peers-tok-")
    systems: dict[str, Any] = {"explab": Explab(server, layers)}
    for cls in (TransformerLens, NNsight):
        systems[cls.name] = cls(copy.deepcopy(model), tok, folder)
    systems[ExplabInProcess.name] = ExplabInProcess(model, layers)
    # prompts of their own for the warm-up and for each repeat of the capture/steering runs and of the
    # sweep: explab's server keeps the prefills of prompts it generated from (its prefix cache), so no
    # timed run may start with prompts an earlier one already sent
    per_rep = args.prompts + args.sweep_prompts
    pairs = prompts(tok, 2 + args.repeats * per_rep, args.tokens)
    warm = [p[1] for p in pairs[:2]]
    warm_texts = [p[0] for p in pairs[:2]]
    reps = [pairs[2 + r * per_rep: 2 + (r + 1) * per_rep] for r in range(args.repeats)]
    main = [([p[0] for p in rep[: args.prompts]], [p[1] for p in rep[: args.prompts]]) for rep in reps]
    sweep = [([p[0] for p in rep[args.prompts:]], [p[1] for p in rep[args.prompts:]]) for rep in reps]
    layer = layers // 3
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(model.config.hidden_size, generator=g)
    resid = systems["transformer_lens"].capture(torch.tensor(warm))[layer]
    norm = float(resid.float().norm(dim=-1).mean())
    vector = direction / direction.norm() * norm * args.strength  # a strength relative to the residual norm
    report: dict[str, Any] = {"model": spec["name"], "layers": layers, "hidden": model.config.hidden_size}

    # warm up each system on two prompts
    systems["explab"].capture(warm)
    systems["explab"].steer(warm_texts, layer, vector, 1.0, 2)
    for name in ("transformer_lens", "nnsight"):
        systems[name].capture(torch.tensor(warm))
        systems[name].steer(torch.tensor(warm), layer, vector, 2)

    workloads = {w.strip() for w in args.workloads.split(",")}
    # 1. capture
    if "capture" in workloads:
        _best(report, "capture", [_capture(systems, ids, args) for _, ids in main])

    # 2. steered generation, one setting
    if "steer" in workloads:
        _best(report, "steer", [_steer(systems, texts, ids, layer, vector, eos, args) for texts, ids in main])

    # 3. steering sweep: strengths x prompts
    if "sweep" in workloads:
        _best(report, "sweep", [_sweep(systems, texts, ids, layer, vector, eos, args) for texts, ids in sweep])
    stats = server.stats()
    report["server_batching"] = stats["batching"]["batcher"]
    report["prefix_cache"] = stats["prefix_cache"]
    return report


def _best(report: dict[str, Any], workload: str, runs: list[dict[str, Any]]) -> None:
    """Each system's fastest repeat (highest tokens/s; rates and ratios from it); ``tokens_agree``: the
    lowest over the repeats."""
    best = {name: max(runs, key=lambda run, n=name: run["tokens"][n] / run["seconds"][n])
            for name in runs[0]["seconds"]}
    report[workload] = _rates({n: run["seconds"][n] for n, run in best.items()},
                              {n: run["seqs"] for n, run in best.items()},
                              {n: run["tokens"][n] for n, run in best.items()})
    report[workload]["all_s"] = {name: [round(run["seconds"][name], 3) for run in runs] for name in best}
    if "agree" in runs[0]:
        report[workload]["tokens_agree"] = {name: min(run["agree"][name] for run in runs)
                                            for name in runs[0]["agree"]}


def _capture(systems: dict[str, Any], ids: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    t, _ = _timed(lambda: systems["explab"].capture(ids))
    res["explab"] = t
    for name in ("transformer_lens", "nnsight", "explab_in_process"):
        sysm = systems[name]
        t, _ = _timed(lambda s=sysm: [s.capture(torch.tensor(b)) for b in _chunks(ids, args.batch)])
        res[name] = t
    return {"seconds": res, "seqs": len(ids), "tokens": {name: len(ids) * args.tokens for name in res}}


def _steer(systems: dict[str, Any], texts: list[str], ids: list[list[int]], layer: int, vector: torch.Tensor,
           eos: set[int], args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    outs: dict[str, Any] = {}
    t, out = _timed(lambda: systems["explab"].steer(texts, layer, vector, 1.0, args.new_tokens))
    res["explab"], outs["explab"] = t, [_useful(o, eos) for o in out]
    for name in ("transformer_lens", "nnsight"):
        sysm = systems[name]
        t, out = _timed(lambda s=sysm: [row for b in _chunks(ids, args.batch)
                                        for row in s.steer(torch.tensor(b), layer, vector, args.new_tokens)])
        res[name], outs[name] = t, [_useful(o, eos) for o in out]
    toks = {k: sum(map(len, v)) for k, v in outs.items()}
    return {"seconds": res, "seqs": len(ids), "tokens": toks, "agree": _agree(outs, eos)}


def _sweep(systems: dict[str, Any], texts: list[str], ids: list[list[int]], layer: int, vector: torch.Tensor,
           eos: set[int], args: argparse.Namespace) -> dict[str, Any]:
    alphas = [2.0 * k / max(args.strengths - 1, 1) for k in range(args.strengths)]
    sweep_texts, sweep_ids = texts, ids
    res, outs = {}, {}
    results: dict[float, list[list[int]]] = {}

    def caller(alpha: float) -> None:
        results[alpha] = systems["explab"].steer(sweep_texts, layer, vector, alpha, args.new_tokens)

    def explab_sweep() -> None:
        threads = [threading.Thread(target=caller, args=(a,)) for a in alphas]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    res["explab"], _ = _timed(explab_sweep)
    outs["explab"] = [_useful(o, eos) for a in alphas for o in results[a]]
    for name in ("transformer_lens", "nnsight"):
        sysm = systems[name]
        def loop(s: Any = sysm) -> list[list[int]]:
            return [row for a in alphas for b in _chunks(sweep_ids, args.batch)
                    for row in s.steer(torch.tensor(b), layer, a * vector, args.new_tokens)]

        t, out = _timed(loop)
        res[name], outs[name] = t, [_useful(o, eos) for o in out]
    toks = {k: sum(map(len, v)) for k, v in outs.items()}
    return {"seconds": res, "seqs": len(alphas) * len(sweep_ids), "tokens": toks, "agree": _agree(outs, eos)}


def _agree(outs: dict[str, list[list[int]]], eos: set[int]) -> dict[str, float]:
    """Fraction of rows whose tokens equal explab's before explab's EOS (nnsight's loop suppresses EOS)."""
    ours = [o[:-1] if o and o[-1] in eos else o for o in outs["explab"]]
    return {name: sum(o == theirs[: len(o)] for o, theirs in zip(ours, rows, strict=True)) / len(ours)
            for name, rows in outs.items() if name != "explab"}


def _rates(seconds: dict[str, float], seqs: dict[str, int], tokens: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, t in seconds.items():
        out[name] = {"s": round(t, 3), "seq_per_s": round(seqs[name] / t, 2), "tok_per_s": round(tokens[name] / t, 1)}
    for name in [n for n in seconds if n != "explab"]:
        out[f"explab/{name}"] = round(out["explab"]["tok_per_s"] / out[name]["tok_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,smollm2", help="comma list of: llama, smollm2")
    parser.add_argument("--workloads", default="capture,steer,sweep", help="comma list of: capture, steer, sweep")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strengths", type=int, default=16)
    parser.add_argument("--sweep-prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64,
                        help="rows per batch, every system (the server's max_batch)")
    parser.add_argument("--strength", type=float, default=1.0, help="|v| / mean residual norm at the layer")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per workload, each on prompts of its own; the fastest counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", type=int, default=6, help="random Llama depth")
    parser.add_argument("--hidden", type=int, default=512, help="random Llama width")
    args = parser.parse_args()

    from explab import runtime

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    runtime.init(dashboard=False)
    llama = copy.deepcopy(LLAMA)
    llama["tiny"].update(num_hidden_layers=args.layers, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    chosen = {"llama": llama, "smollm2": SMOLLM2}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in chosen]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {sorted(chosen)}")
    report = {"threads": args.threads, "dtype": "float32", "load_1min_start": round(load_start, 2),
              "args": vars(args), "models": [bench_model(chosen[m], args) for m in names],
              "load_1min_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
