"""Image-token x text-token attention maps of a diffusion model, recorded by attention processors.

The recording processors subclass the stock ones and return exactly what they return; on the
chosen steps they also compute the attention probabilities of every image token (query) and keep,
averaged over heads, the columns of the chosen text tokens:

- FLUX (`FluxTransformer2DModel`): block ``i`` is the i-th joint (double-stream) block,
  ``transformer_blocks[i]``. Its attention is joint: the softmax runs over the text and image keys
  together (after FLUX's q/k RMS norms and rotary embedding), and the map is the image-query rows
  at the text-key columns. Text tokens are T5 token positions (``tokenizer_2``).
- Stable Diffusion (`UNet2DConditionModel`): block ``i`` is the i-th cross-attention layer
  (``attn2``) in the UNet's module order; the softmax runs over the text tokens (CLIP positions).
  Under classifier-free guidance only the conditional half of the batch is kept. Image tokens are
  that layer's resolution (row-major).

A map is (image tokens, chosen tokens) per row, block and step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from explab.errors import ExplabError


class AttentionRecord:
    """Shared state of one recording: which steps and per-row tokens, the current step, the maps."""

    def __init__(self, steps: list[int], tokens: list[list[int]]):
        self.steps = set(steps)
        self.tokens = tokens
        self.step = 0
        self.maps: dict[int, dict[int, torch.Tensor]] = {}  # block -> step -> (rows, N_img, n_tok)

    def set_step(self, step: int) -> None:
        self.step = step

    def keep(self, block: int, probs: torch.Tensor) -> None:
        """``probs``: (rows, heads, N_img, N_txt) of this block at the current step."""
        rows = probs.shape[0]
        if rows != len(self.tokens):
            probs = probs[-len(self.tokens) :]  # classifier-free guidance: [uncond, cond]
        picked = []
        for row, tokens in enumerate(self.tokens):
            index = torch.tensor(tokens, dtype=torch.long, device=probs.device)
            picked.append(probs[row].index_select(-1, index).mean(0))  # head mean: (N_img, n_tok)
        self.maps.setdefault(block, {})[self.step] = torch.stack(picked).to("cpu", torch.float32)

    def result(self, row: int) -> dict[int, torch.Tensor]:
        """Row ``row``'s maps: block -> (len(steps), N_img, n_tok), steps in ascending order."""
        return {
            block: torch.stack([per_step[s][row] for s in sorted(per_step)])
            for block, per_step in self.maps.items()
        }


class _Recorder:
    """Mixin before a stock attention processor: on a recorded step, keep the head-wise attention
    probabilities ``_probs`` computes ((rows, heads, N_img, N_txt)); then run the stock processor, so
    the output is exactly the stock one."""

    def __init__(self, record: AttentionRecord, block: int):
        super().__init__()
        self.record, self.block = record, block

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        if self.record.step in self.record.steps and encoder_hidden_states is not None:
            self.record.keep(self.block, self._probs(attn, hidden_states, encoder_hidden_states, *args, **kwargs))
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def _flux_processor_class() -> type:
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class FluxAttentionRecorder(_Recorder, FluxAttnProcessor):
        """FLUX's processor, plus the head-mean image->text attention of the recorded steps."""

        def _probs(self, attn: Any, image: torch.Tensor, text: torch.Tensor, attention_mask: Any = None,
                   image_rotary_emb: Any = None, **_: Any) -> torch.Tensor:
            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.unflatten(-1, (-1, attn.head_dim))

            query = attn.norm_q(heads(attn.to_q(image)))
            keys = torch.cat(
                [attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(image)))], dim=1
            )
            n_text = text.shape[1]
            if image_rotary_emb is not None:  # rotary tables cover [text; image] positions
                cos, sin = image_rotary_emb
                query = apply_rotary_emb(query, (cos[n_text:], sin[n_text:]), sequence_dim=1)
                keys = apply_rotary_emb(keys, image_rotary_emb, sequence_dim=1)
            rows = []
            for q, k in zip(query, keys, strict=True):  # one row at a time: heads x N_img x (N_txt + N_img)
                logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attn.head_dim**-0.5
                rows.append(logits.softmax(-1)[..., :n_text])
            return torch.stack(rows)

    return FluxAttentionRecorder


def _sd_processor_class() -> type:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class CrossAttentionRecorder(_Recorder, AttnProcessor2_0):
        """The UNet's cross-attention processor, plus its head-mean attention on the recorded steps."""

        def _probs(self, attn: Any, image: torch.Tensor, encoder: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
            if image.dim() == 4:  # (B, C, H, W) -> (B, H*W, C)
                image = image.flatten(2).transpose(1, 2)
            if attn.norm_cross:
                encoder = attn.norm_encoder_hidden_states(encoder)
            if attn.group_norm is not None:
                image = attn.group_norm(image.transpose(1, 2)).transpose(1, 2)
            query = attn.head_to_batch_dim(attn.to_q(image))
            key = attn.head_to_batch_dim(attn.to_k(encoder))
            probs = attn.get_attention_scores(query.float(), key.float(), None)  # (B*heads, N_img, N_txt)
            return probs.unflatten(0, (image.shape[0], attn.heads))

    return CrossAttentionRecorder


def attention_layers(pipe: Any) -> list[tuple[str, Any]]:
    """The recordable attention modules of a pipeline's denoiser, in block order: (name, module)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and hasattr(transformer, "transformer_blocks"):
        return [
            (f"transformer_blocks.{i}.attn", block.attn)
            for i, block in enumerate(transformer.transformer_blocks)
        ]
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return [
            (name, module)
            for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "set_processor")
        ]
    raise ExplabError(
        f"{type(pipe).__name__} has no FLUX transformer or UNet to record attention from: "
        "use a FLUX or Stable Diffusion pipeline"
    )


@contextmanager
def record_attention(
    pipe: Any, blocks: list[int], steps: list[int], tokens: list[list[int]]
) -> Iterator[AttentionRecord]:
    """Install recording processors on ``blocks`` for the duration; restores the previous processors."""
    layers = attention_layers(pipe)
    bad = [b for b in blocks if not 0 <= b < len(layers)]
    if bad:
        raise ExplabError(
            f"attention block {bad[0]} does not exist: this model has blocks 0..{len(layers) - 1}"
        )
    record = AttentionRecord(steps, tokens)
    cls = _flux_processor_class() if getattr(pipe, "transformer", None) is not None else _sd_processor_class()
    previous = {}
    try:
        for block in blocks:
            _, module = layers[block]
            previous[block] = module.processor
            module.set_processor(cls(record, block))
        yield record
    finally:
        for block, processor in previous.items():
            layers[block][1].set_processor(processor)
