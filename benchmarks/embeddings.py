"""The embedding pipeline vs the bare encoder, as a throughput ratio measured in one run.

Pipeline: `explab.embeddings.embed` — images streamed through a Ray Data ``map_batches`` actor
pool (one actor, started by the call), vectors written as Parquet shards to a fresh cache entry.
Baseline: the same `Encoder` (preprocessing + ``encode_image``) loaded and called on the same
batches in this process, vectors kept in memory. Both timings include loading the encoder. Both use the same
number of torch threads. The encoder is open_clip's ViT-B/32 with random weights (no download), so the model
dominates as it does with real weights.
Target: ratio >= 0.8.

    python benchmarks/embeddings.py [--images 256 --batch 64 --layers 12 --width 768]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12, help="image tower depth (ViT-B/32: 12)")
    parser.add_argument("--width", type=int, default=768, help="image tower width (ViT-B/32: 768)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic RGB images")
    args = parser.parse_args()

    from explab import runtime
    from explab.embeddings import EmbedOptions, embed
    from explab.images import to_pil
    from explab.models import load_encoder

    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    encoder = {"name": "tiny:clip", "tiny": {"embed_dim": 512, "vision_cfg": {
        "image_size": 224, "patch_size": 32, "width": args.width, "layers": args.layers, "head_width": 64,
        "mlp_ratio": 4.0}}}

    # both timings include loading the encoder (the pipeline loads it in its actor, once per call)
    start = time.perf_counter()
    enc = load_encoder(encoder)
    bare_out = [enc.encode([to_pil(im) for im in images[i:i + args.batch]], "image")
                for i in range(0, len(images), args.batch)]
    bare_s = time.perf_counter() - start
    bare = np.concatenate(bare_out)
    del enc

    # one CPU slot for the actor (its torch uses all the threads); the rest for Ray Data's own tasks
    runtime.init(num_cpus=max(4, threads), dashboard=False)
    opts = EmbedOptions(batch_size=args.batch, concurrency=1, num_cpus=1, torch_threads=threads)
    with tempfile.TemporaryDirectory() as cache:
        embed(encoder, images[: args.batch], modality="image", options=opts, cache_dir=cache)  # warm Ray Data
        start = time.perf_counter()
        result = embed(encoder, images, modality="image", options=opts, cache_dir=cache)
        pipe_s = time.perf_counter() - start
        vectors = result.array()
    runtime.shutdown()

    out = {
        "image_tower": f"ViT {args.layers}x{args.width}, patch 32, 224 px", "images": args.images, "batch": args.batch,
        "torch_threads": threads,
        "bare_images_per_s": round(args.images / bare_s, 2),
        "pipeline_images_per_s": round(args.images / pipe_s, 2),
        "bare_s": round(bare_s, 2), "pipeline_s": round(pipe_s, 2),
        "ratio": round(bare_s / pipe_s, 3),
        "max_abs_diff_vs_bare": float(np.abs(vectors - bare).max()),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
