"""The shared Diffuser server vs the bare diffusers pipeline, as a throughput ratio measured in one run.

8 concurrent callers each send single-image requests (their own prompt and seed) to the shared
`Diffuser`, which batches requests of the same size and step count; baseline: the same prompts and
seeds through the pipeline itself in batches of ``--batch`` in this process (latents out, then the
same VAE decode to uint8 images), with the same torch thread count. Before timing, each server image
is compared with the bare one of the same prompt and seed (``max_abs_diff`` in uint8 levels).

    python benchmarks/diffuser.py [--model tiny:flux --images 32 --steps 8 --size 64 --batch 8]

Target: server / bare >= 0.8 (the server adds request validation, the step callback, Ray transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import torch


def bare_images(pipe, prompts: list[str], seeds: list[int], args: argparse.Namespace) -> list[np.ndarray]:
    """The pipeline as a user calls it: batches of ``args.batch``, seeded generators, decoded to uint8."""
    from explab.models.diffusion import decode, pipeline_family

    extra = {"max_sequence_length": args.text_length} if pipeline_family(pipe) == "flux" else {}
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), args.batch):
        latents = pipe(prompts[i:i + args.batch], height=args.size, width=args.size, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, output_type="latent",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + args.batch]],
                       **extra).images
        out += list(decode(pipe, latents, args.size, args.size))
    return out


def served_images(diffuser, prompts: list[str], seeds: list[int], args: argparse.Namespace,
                  callers: int = 8) -> list[np.ndarray]:
    """``callers`` threads, each sending its share one request at a time; images in prompt order."""
    from explab.servers import DiffusionRequest

    out: list[np.ndarray | None] = [None] * len(prompts)

    def work(rows: list[int]) -> None:
        for i in rows:
            request = DiffusionRequest(prompt=prompts[i], seed=seeds[i], steps=args.steps, guidance=args.guidance,
                                       size=(args.size, args.size), max_sequence_length=args.text_length)
            out[i] = diffuser.generate([request])[0].image

    threads = [threading.Thread(target=work, args=(list(range(c, len(prompts), callers)),)) for c in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:flux", help="a diffusers model spec (tiny:flux, tiny:sd, a hub id)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--text-length", type=int, default=32, help="FLUX's T5 length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from explab import runtime
    from explab.models import load_model
    from explab.servers import get_server

    torch.set_num_threads(os.cpu_count() or 1)
    runtime.init(dashboard=False)
    pipe = load_model(args.model).model
    diffuser = get_server("diffuser", args.model, {"max_batch": args.batch, "max_wait_ms": 10})
    words = ["red", "blue", "green", "cube", "ball", "tree", "house", "river", "cat", "cloud"]
    prompts = [f"a {words[i % 10]} {words[(3 * i + 1) % 10]} on a {words[(7 * i + 2) % 10]} table"
               for i in range(args.images)]
    seeds = list(range(args.images))
    report: dict = {"model": args.model, "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
                    "images": args.images, "steps": args.steps, "size": args.size, "batch": args.batch}
    with torch.inference_mode():
        bare = bare_images(pipe, prompts[:args.batch], seeds[:args.batch], args)  # warm-up, and the reference
    served = served_images(diffuser, prompts[:args.batch], seeds[:args.batch], args)
    report["max_abs_diff"] = int(max(np.abs(a.astype(int) - b).max() for a, b in zip(bare, served, strict=True)))
    best_bare = best_served = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            bare_images(pipe, prompts, seeds, args)
        best_bare = min(best_bare, time.perf_counter() - start)
        before = diffuser.stats()["batching"]["batcher"]
        start = time.perf_counter()
        served_images(diffuser, prompts, seeds, args)
        best_served = min(best_served, time.perf_counter() - start)
        after = diffuser.stats()["batching"]["batcher"]
        report["mean_batch"] = (after["requests"] - before["requests"]) / max(after["batches"] - before["batches"], 1)
    report["bare_images_per_s"] = args.images / best_bare
    report["server_images_per_s"] = args.images / best_served
    report["ratio"] = best_bare / best_served
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
