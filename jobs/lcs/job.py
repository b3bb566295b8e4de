"""lcs: the latent colour subspace (LCS) of the FLUX VAE — find it, read colour off latents during
denoising, and steer an object's colour by moving only that subspace (authors' code: ExplainableML/LCS).

1. subspace — solid-colour images over an HSV grid, VAE-encoded through the shared `Diffuser` (shifted,
   scaled, packed), averaged over tokens; PCA to 3 components (`subspace`);
2. geometry — the anchors (six hues, black, white) in the subspace; HSL <-> subspace maps (`geometry`);
3. normalisation — alphas and betas of the subspace coordinates at every step of "<colour> wall"
   generations (`normalisation`);
4. observation — each token of a latent at step t read as a colour and compared (ΔE00) with the decoded
   latent at t and with the final image (`observe`);
5. intervention — after step t, the mean shift, the per-token HSL shift or their blend, on the whole
   latent or on one object's tokens from its prompt token's attention (`steer`, `masks`), written back
   through the platform's `ReplaceSubspace`;
6. evaluation — ΔE00, ΔH, ΔS, ΔL of the object's mean colour against the target, by family and hue
   (`evaluate`, `segment`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from explab.job import Job
from explab.runs import RunContext
from explab.servers import AttentionRequest, DiffusionRequest
from jobs.lcs import plots
from jobs.lcs.colours import (
    anchor_hsl,
    delta_e00,
    describe,
    hex_to_rgb,
    hsl_to_rgb,
    hsv_grid,
    hsv_to_rgb,
    rgb_to_hex,
    rgb_to_hsl,
    target_set,
)
from jobs.lcs.config import GENEVAL_COLOURS, Benchmark, Config
from jobs.lcs.evaluate import colour_errors, evaluation_mask, object_colour, summary
from jobs.lcs.geometry import Geometry
from jobs.lcs.masks import attention_mask, first_token
from jobs.lcs.normalisation import Normalisation, fit_normalisation
from jobs.lcs.observe import block_means, compare, token_colours, token_grid
from jobs.lcs.steer import authors_blend, colour_intervention
from jobs.lcs.subspace import Subspace, colour_means, fit_subspace

CHUNK = 64  # requests per generate call (bounds the latents held at once)


def _solid(rgb: np.ndarray, size: int) -> list[np.ndarray]:
    pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return [np.broadcast_to(p, (size, size, 3)).copy() for p in pixels]


def _hue_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1 - d)


def _request(config: Config, prompt: str, seed: int, **fields: Any) -> DiffusionRequest:
    return DiffusionRequest(prompt=prompt, seed=seed, steps=config.steps, guidance=config.guidance,
                            size=(config.size, config.size), max_sequence_length=config.max_sequence_length,
                            **fields)


def _generate(server: Any, requests: list[DiffusionRequest]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(requests), CHUNK):
        out.extend(server.generate(requests[i : i + CHUNK]))
    return out


# ---------------------------------------------------------------- 1-2: subspace and geometry


def find_subspace(config: Config, server: Any, ctx: RunContext) -> tuple[Subspace, Geometry, dict[str, float]]:
    hsv = hsv_grid(config.subspace.grid)
    rgb = hsv_to_rgb(hsv)
    anchors = anchor_hsl()
    anchor_rgb = hsl_to_rgb(np.stack(list(anchors.values())))
    images = _solid(np.concatenate([rgb, anchor_rgb]), config.size)
    seeds = [config.seed + i for i in range(len(images))] if config.subspace.sample else None
    means = colour_means(np.stack(server.encode(images, seeds)))
    sub = fit_subspace(means[: len(hsv)], 3)
    coords = sub.coordinates(means)
    geometry = Geometry(dict(zip(anchors, coords[len(hsv):], strict=True)), origin=config.subspace.origin)
    grid = coords[: len(hsv)]
    true_hsl = rgb_to_hsl(rgb)
    read = geometry.lcs_to_hsl(grid)
    read_rgb = hsl_to_rgb(np.concatenate([read[:, :1], read[:, 1:].clip(0, 1)], 1))
    table = pd.DataFrame({"hex": [rgb_to_hex(c) for c in rgb], "h": hsv[:, 0], "s": hsv[:, 1], "v": hsv[:, 2],
                          **{f"c{i}": grid[:, i] for i in range(sub.k)},
                          "read_h": read[:, 0], "read_s": read[:, 1], "read_l": read[:, 2],
                          "dH": np.where(true_hsl[:, 1] > 0.1, _hue_error(read[:, 0], true_hsl[:, 0]), np.nan),
                          "dS": np.abs(read[:, 1] - true_hsl[:, 1]), "dL": np.abs(read[:, 2] - true_hsl[:, 2]),
                          "dE00": delta_e00(read_rgb, rgb)})
    ctx.save_table("subspace", table)
    ctx.save_table("variance", pd.DataFrame({"component": np.arange(1, len(sub.ratios) + 1),
                                             "ratio": sub.ratios, "cumulative": np.cumsum(sub.ratios)}))
    ctx.save_table("anchors", pd.DataFrame(
        [{"name": n, "hex": rgb_to_hex(c), **{f"c{i}": v for i, v in enumerate(geometry.anchors[n])},
          "radius": float(geometry.radii[geometry.hue_names.index(n)]) if n in geometry.hue_names else np.nan}
         for n, c in zip(anchors, anchor_rgb, strict=True)]))
    ctx.save_plot("subspace", plots.subspace_scatter(grid, rgb, geometry.anchors, sub.ratios))
    back = geometry.lcs_to_hsl(geometry.hsl_to_lcs(true_hsl))
    chromatic = true_hsl[:, 1] > 0.1
    stats = {"variance_explained": float(sub.ratios[:3].sum()),
             **{f"variance_pc{i + 1}": float(r) for i, r in enumerate(sub.ratios[:4])},
             "readback_dE00": float(table["dE00"].mean()),
             "roundtrip_dH": float(_hue_error(back[chromatic, 0], true_hsl[chromatic, 0]).mean()),
             "roundtrip_dS": float(np.abs(back[:, 1] - true_hsl[:, 1]).mean()),
             "roundtrip_dL": float(np.abs(back[:, 2] - true_hsl[:, 2]).mean())}
    return sub, geometry, stats


# ---------------------------------------------------------------- 3: per-step normalisation


def fit_steps(config: Config, server: Any, sub: Subspace, ctx: RunContext) -> Normalisation:
    steps = list(range(config.steps))
    cfg = config.normalisation
    requests = [_request(config, cfg.prompt.format(colour=c), seed, capture_steps=steps)
                for c, seed in zip(cfg.colours, cfg.seeds, strict=True)]
    coords = np.stack([np.stack([sub.coordinates(r.latents[t].mean(0)) for t in steps])
                       for r in _generate(server, requests)])
    norm = fit_normalisation(coords, steps)
    ctx.save_table("normalisation", pd.DataFrame(
        [{"step": t, "axis": a, "alpha": norm.alphas[i, a], "beta": norm.betas[i, a]}
         for i, t in enumerate(steps) for a in range(norm.alphas.shape[1])]))
    return norm


# ---------------------------------------------------------------- 4: observation


def observe(config: Config, server: Any, sub: Subspace, geometry: Geometry, norm: Normalisation,
            ctx: RunContext) -> pd.DataFrame:
    cfg = config.observation
    last = config.steps - 1
    steps = sorted(set(cfg.steps))
    requests = [_request(config, p, s, capture_steps=sorted({*steps, last})) for p in cfg.prompts for s in cfg.seeds]
    results = _generate(server, requests)
    rows, figure_rows = [], []
    for request, result in zip(requests, results, strict=True):
        n = result.latents[last].shape[0]
        grid = token_grid(n, config.size, config.size)
        decoded = server.decode([result.latents[t] for t in steps], (config.size, config.size))
        final = block_means(result.image, grid)
        maps = []
        for t, image in zip(steps, decoded, strict=True):
            colour_map = token_colours(result.latents[t], t, sub, geometry, norm).reshape(*grid, 3)
            maps.append(colour_map)
            at_t, block = compare(colour_map, block_means(image, grid)), compare(colour_map, final)
            decoded_vs_final = compare(block_means(image, grid), final)
            rows.append({"prompt": request.prompt, "seed": request.seed, "step": t,
                         "dE00_decoded_pixel": at_t["pixel"], "dE00_decoded_mean": at_t["mean"],
                         "dE00_final_pixel": block["pixel"], "dE00_final_mean": block["mean"],
                         "dE00_decoded_vs_final_pixel": decoded_vs_final["pixel"]})
        figure_rows.append((request.prompt, maps, decoded))
    table = pd.DataFrame(rows)
    ctx.save_table("observation", table)
    ctx.save_plot("observation", plots.observation_maps(figure_rows[:4], steps))
    for t, group in table.groupby("step"):
        ctx.log(step=int(t), observe_dE00_decoded=float(group["dE00_decoded_pixel"].mean()),
                observe_dE00_final=float(group["dE00_final_pixel"].mean()))
    return table


# ---------------------------------------------------------------- 5-6: intervention and evaluation


def targets(bench: Benchmark) -> list[dict[str, Any]]:
    if bench.targets == "families":
        return target_set()
    if bench.targets == "geneval":
        return [{"name": n, "hex": h, "family": describe(hex_to_rgb(h))[0], "hue": n}
                for n, h in GENEVAL_COLOURS.items()]
    out = []
    for code in bench.targets:
        family, hue = describe(hex_to_rgb(code))
        out.append({"name": code, "hex": code, "family": family, "hue": hue})
    return out


def _method(blend: float | None) -> str:
    if blend is None:
        return "authors"  # the blend with the authors' schedule gamma(t)
    return "type1" if blend == 1.0 else ("type2" if blend == 0.0 else "blend")


def intervene(config: Config, server: Any, sub: Subspace, geometry: Geometry, norm: Normalisation,
              ctx: RunContext) -> pd.DataFrame:
    cfg = config.intervention
    steps = sorted(set(cfg.steps))
    size = (config.size, config.size)
    segmenter = None
    if config.evaluation.segmenter:
        from jobs.lcs.segment import Segmenter

        segmenter = Segmenter(config.evaluation.segmenter, config.evaluation.segmenter_device,
                              config.evaluation.threshold)
    rows: list[dict[str, Any]] = []
    pairs: list[tuple[np.ndarray, np.ndarray, str, np.ndarray]] = []
    for bench in config.benchmarks:
        local = "local" in bench.modes
        prompts = [bench.prompt.format(object=o) for o in bench.objects]
        offsets = server.tokenize(prompts, config.max_sequence_length) if local else [None] * len(prompts)
        base_requests, keys = [], []
        for obj, prompt, spans in zip(bench.objects, prompts, offsets, strict=True):
            attention = (AttentionRequest(blocks=[cfg.block], tokens=[first_token(spans, prompt, obj)], steps=steps)
                         if local else None)
            for seed in bench.seeds_of(obj):
                base_requests.append(_request(config, prompt, seed, capture_steps=steps, attention=attention))
                keys.append((obj, prompt, seed))
        baselines = _generate(server, base_requests)
        colours = targets(bench)
        steered: list[DiffusionRequest] = []
        meta: list[dict[str, Any]] = []
        for (obj, prompt, seed), base in zip(keys, baselines, strict=True):
            grid = token_grid(base.latents[steps[0]].shape[0], *size)
            for mode in bench.modes:
                for t in steps:
                    mask = (attention_mask(base.attention[cfg.block][steps.index(t)][:, 0], grid, cfg.mass,
                                           cfg.kernel) if mode == "local" else np.ones(grid[0] * grid[1], bool))
                    common = {"benchmark": bench.name, "object": obj, "prompt": prompt, "seed": seed, "mode": mode,
                              "step": t, "mask": mask, "grid": grid, "base": base,
                              "segment": bench.segment}
                    for target in colours:
                        target_rgb = hex_to_rgb(target["hex"])
                        meta.append({**common, "target": target, "target_rgb": target_rgb, "gamma": None,
                                     "blend": None})
                        for blend in cfg.blends:
                            gamma = authors_blend(t, config.steps) if blend is None else float(blend)
                            spec = colour_intervention(base.latents[t], mask, rgb_to_hsl(target_rgb), sub, geometry,
                                                       norm, t, gamma)
                            steered.append(_request(config, prompt, seed, interventions=[spec]))
                            meta.append({**common, "target": target, "target_rgb": target_rgb, "gamma": gamma,
                                         "blend": blend})
        results = iter(_generate(server, steered))
        for m in meta:
            after = m["base"].image if m["gamma"] is None else next(results).image
            pixel_mask, source = evaluation_mask(segmenter if m["segment"] else None, after, m["object"], m["mask"],
                                                 m["grid"], m["mode"])
            errors = colour_errors(object_colour(after, pixel_mask), m["target_rgb"])
            rows.append({"benchmark": m["benchmark"], "object": m["object"], "prompt": m["prompt"],
                         "seed": m["seed"], "target": m["target"]["name"], "target_hex": m["target"]["hex"],
                         "family": m["target"]["family"], "hue": m["target"]["hue"], "mode": m["mode"],
                         "step": m["step"], "method": "none" if m["gamma"] is None else _method(m["blend"]),
                         "gamma": np.nan if m["gamma"] is None else m["gamma"], "mask_source": source,
                         "mask_tokens": int(m["mask"].sum()), **errors})
            if m["gamma"] is not None and len(pairs) < config.grid_images:
                pairs.append((m["base"].image, after, f"{m['object']} -> {m['target']['name']} ({m['mode']}, "
                              f"t={m['step']}, γ={m['gamma']:.2f})", m["target_rgb"]))
    table = pd.DataFrame(rows)
    ctx.save_table("intervention", table)
    if len(table):
        steered_rows = table[table["method"] != "none"]
        ctx.save_table("intervention_by_family", summary(steered_rows, ["mode", "step", "method", "family"]))
        ctx.save_table("intervention_by_hue", summary(steered_rows, ["mode", "step", "method", "hue"]))
        ctx.save_plot("delta_e_vs_step", plots.delta_e_vs_step(table))
        ctx.save_plot("before_after", plots.before_after(pairs))
    return table


# ---------------------------------------------------------------- the run


def run(config: Config, ctx: RunContext) -> dict[str, float]:
    server = ctx.model(config.model, "diffuser", config.server)
    sub, geometry, stats = find_subspace(config, server, ctx)
    norm = fit_steps(config, server, sub, ctx)
    obs = observe(config, server, sub, geometry, norm, ctx)
    table = intervene(config, server, sub, geometry, norm, ctx)
    anchors = np.stack([geometry.anchors[n] for n in (*geometry.hue_names, "black", "white")])
    ctx.save_artifact("lcs", {"basis": sub.basis, "mean": sub.mean, "ratios": sub.ratios, "anchors": anchors,
                              "hue_origin": geometry.o, "alphas": norm.alphas, "betas": norm.betas,
                              "steps": np.asarray(norm.steps, dtype=np.int64)},
                      {"anchors": ",".join((*geometry.hue_names, "black", "white")), "origin": geometry.origin,
                       "model": config.model.name, "size": str(config.size)})
    out = dict(stats)
    last = obs[obs["step"] == obs["step"].max()]
    out["observe_dE00_final"] = float(last["dE00_final_pixel"].mean())
    if len(table):
        out["dE00"] = float(table[table["method"] != "none"]["dE00"].mean())
        if (table["method"] == "none").any():
            out["dE00_none"] = float(table[table["method"] == "none"]["dE00"].mean())
    return out


JOB = Job(
    name="lcs",
    description="LCS: the latent colour subspace of the FLUX VAE — find it, read colour during denoising, "
                "steer an object's colour.",
    config=Config,
    run=run,
)
