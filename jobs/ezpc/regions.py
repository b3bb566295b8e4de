"""Concept–region alignment: where in an image each concept of the bottleneck is active.

Patch (or spatial) tokens of the image tower are projected into the joint embedding space and
scored through A like whole images are (``unit(p) · A_j``). As in the authors' heatmaps, each
concept's patch scores are centred on their mean over the image (what the concept adds at that
place beyond the image as a whole), then scaled to [0, 1] and upsampled to the image.

- open_clip ``VisionTransformer`` (``ViT-*/openai``, ``tiny:clip``): the tower's output tokens
  without the class token, after ``ln_post``, times ``proj``;
- open_clip ``ModifiedResNet`` (``RN50``): the last feature map through the attention pool's value
  and output projections position by position (the pool's attention mixes positions; its value
  path keeps them apart), as is usual for dense CLIP ResNet features;
- open_clip ``TimmModel`` towers whose trunk pools with timm's ``AttentionPoolLatent`` (the "MAP"
  head of open_clip's SigLIP models, ``ViT-*-SigLIP*``): see `map_head_tokens`.

**SigLIP's MAP head, derived.** The trunk's output tokens x_i (after its final norm) are pooled by
one learned latent query: per head h, o_h = Σ_i a_hi v_hi with v_i = W_v x_i + b_v and attention
weights a_hi ≥ 0 that sum to 1 over i. Then u = W_o o + b_o, and the image embedding is
z = u + MLP(LN(u)) (then the trunk's ``fc_norm``/``head`` and open_clip's ``head``, identities
for SigLIP). Where the heads agree on the weights (a_hi = a_i), u = Σ_i a_i u_i with
u_i = W_o v_i + b_o, because the weights sum to 1: the pooled token is an attention-weighted mixture of
per-patch tokens u_i, and the embedding is the head's nonlinearity of that mixture. A patch's token
in the joint space is therefore p_i = u_i + MLP(LN(u_i)): the embedding the tower would give if its
pooling attended to patch i alone. It is exact in two cases one can check: when the attention is
one-hot on a patch, and when all tokens are equal (then z = p_i for every i). Only the query–key
path (which patch to look at) is left out, as the value path of the ResNet pool above keeps
positions apart. Towers with a latent of more than one token, and other timm heads, are not
covered.

Other towers raise `UnsupportedTower`; the job then logs a warning and records
``region_images = 0`` for that backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from explab.errors import ExplabError
from explab.images import to_pil


class UnsupportedTower(ExplabError):
    """The image tower has no patch tokens this module knows how to project."""


def patch_tokens(model: Any, pixels: Any) -> Any:
    """(n, h, w, d) patch embeddings in the joint space (not normalised) of an open_clip model."""
    import torch
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    with torch.inference_mode():
        if isinstance(visual, VisionTransformer):
            before = visual.output_tokens
            visual.output_tokens = True
            try:
                _, tokens = visual(pixels)
            finally:
                visual.output_tokens = before
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            grid = visual.grid_size
            return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1)
        if isinstance(visual, ModifiedResNet):
            x = visual.stem(pixels)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (n, c, h, w)
            pool = visual.attnpool
            n, c, h, w = x.shape
            x = x.flatten(2).permute(0, 2, 1)  # (n, hw, c)
            if pool.positional_embedding.shape[0] == h * w + 1:
                x = x + pool.positional_embedding[1:].to(x.dtype)
            tokens = pool.c_proj(pool.v_proj(x))
            return tokens.reshape(n, h, w, -1)
        if _has_map_head(visual):
            return map_head_tokens(visual, pixels)
    raise UnsupportedTower(f"concept-region heatmaps need an open_clip ViT, ModifiedResNet or timm tower with an "
                           f"attention-pool (MAP) head, not {type(visual).__name__}: set eval.region_images: 0 for "
                           "this backbone")


def _has_map_head(visual: Any) -> bool:
    from open_clip.timm_model import TimmModel
    from timm.layers import AttentionPoolLatent

    pool = getattr(getattr(visual, "trunk", None), "attn_pool", None)
    return isinstance(visual, TimmModel) and isinstance(pool, AttentionPoolLatent) and pool.latent_len == 1


def map_head_tokens(visual: Any, pixels: Any) -> Any:
    """(n, h, w, d) patch embeddings of a timm tower pooled by ``AttentionPoolLatent`` (SigLIP): each patch
    token through the pool's value and output projections and its MLP, as if the pooling attended to that
    patch alone (derived in the module docstring), then the trunk's and open_clip's heads."""
    trunk, pool = visual.trunk, visual.trunk.attn_pool
    x = trunk.forward_features(pixels)  # (n, prefix + patches, width), after the trunk's final norm
    prefix = trunk.num_prefix_tokens
    if not trunk.pool_include_prefix:
        x, prefix = x[:, prefix:], 0
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    width = pool.kv.out_features // 2
    values = pool.kv(x)[..., width:]  # kv's output is [keys | values], each split into heads in order
    u = pool.proj(values)
    if pool.mlp is not None:
        u = u + pool.mlp(pool.norm(u))
    tokens = visual.head(trunk.head(trunk.fc_norm(u)))[:, prefix:]
    size = tuple(pixels.shape[-2:])
    embed = trunk.patch_embed
    h, w = embed.dynamic_feat_size(size) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
    if h * w != tokens.shape[1]:
        raise UnsupportedTower(f"the timm tower gave {tokens.shape[1]} patch tokens for a {h}×{w} grid: "
                               "set eval.region_images: 0 for this backbone")
    return tokens.reshape(tokens.shape[0], h, w, -1)


def concept_maps(patches: np.ndarray, A: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """(n, m, h, w) maps in [0, 1]: concept ``concepts[i, j]`` of image i through A, mean-centred over its
    patches and min–max scaled per map. ``patches``: (n, h, w, d); ``concepts``: (n, m) column indices of A."""
    P = np.asarray(patches, dtype=np.float64)
    P = P / np.linalg.norm(P, axis=-1, keepdims=True).clip(1e-12)
    n, h, w, _ = P.shape
    out = np.zeros((n, concepts.shape[1], h, w))
    for i in range(n):
        scores = P[i] @ A[:, concepts[i]]  # (h, w, m)
        scores = scores - scores.mean(axis=(0, 1), keepdims=True)
        lo, hi = scores.min(axis=(0, 1), keepdims=True), scores.max(axis=(0, 1), keepdims=True)
        out[i] = np.moveaxis((scores - lo) / np.where(hi > lo, hi - lo, 1.0), -1, 0)
    return out


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (..., h, w) maps to (..., H, W)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(maps, dtype=torch.float32)
    lead = t.shape[:-2]
    t = F.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return t.reshape(*lead, *size).numpy()


def heatmaps(encoder: Any, images: Sequence[Any], A: np.ndarray, concepts: np.ndarray
             ) -> tuple[list[Any], np.ndarray]:
    """The images (PIL) and their (n, m, H, W) concept heatmaps at the encoder's input size, for a loaded
    open_clip `explab.models.encoders.Encoder` (``encoder.model``, ``encoder.processor``)."""
    import torch

    pil = [to_pil(im).convert("RGB") for im in images]
    pixels = torch.stack([encoder.processor(im) for im in pil]).to(encoder.device, encoder.dtype)
    patches = patch_tokens(encoder.model, pixels).float().cpu().numpy()
    size = tuple(pixels.shape[-2:])
    shown = [im.resize(size[::-1]) for im in pil]
    return shown, upsample(concept_maps(patches, A, concepts), size)
