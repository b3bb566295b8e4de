"""Named hook points, resolved per architecture by inspecting the module tree.

Names (TransformerLens-style). ``i`` may be negative (Python indexing over the blocks).

Language model (Llama/Qwen2/Mistral/Gemma ``model.layers``, GPT-2 ``transformer.h``, the language
model inside LLaVA-style VLMs):

- ``embed``: the residual stream entering block 0 (token (+ position) embeddings, after any scaling),
  i.e. ``output_hidden_states[0]``.
- ``blocks.{i}.resid_pre``: input hidden state of decoder layer ``i``.
- ``blocks.{i}.resid_post``: output hidden state of decoder layer ``i`` (``output_hidden_states[i+1]``
  for every layer but the last, whose HF entry is taken after the final norm).
- ``blocks.{i}.attn_out`` / ``blocks.{i}.mlp_out``: what the attention / MLP sub-block adds to the stream.
- ``blocks.{i}.attn.pattern``: attention probabilities ``(heads, query, key)``; needs eager attention,
  which :func:`explab.interventions.intervene` switches on by itself.
- ``final``: output of the final norm (what the LM head reads).

Vision-language models and CLIP towers: ``projector`` (LLaVA / LLaVA-NeXT / InternVL
``multi_modal_projector`` output, Qwen2.5-VL ``visual.merger`` output),
``vision.blocks.{i}`` (output of vision-tower encoder layer ``i``; HF vision towers and open_clip
``visual.transformer.resblocks``), ``text.blocks.{i}`` (output of text-tower layer ``i`` of a
dual-encoder CLIP model, open_clip or HF ``CLIPModel``).

Jobs build names with the helpers below (``resid_post(3)`` -> ``"blocks.3.resid_post"``), in the
spirit of TransformerLens's ``get_act_name``; :func:`check_point_name` validates a name's form
without a model (specs call it where they are built; the model-specific check is :func:`resolve_point`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from explab.errors import ExplabError

_LM_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "layers",
    "h",
)
_VISION_PATHS = (
    "model.vision_tower.encoder.layers",
    "model.vision_tower.vision_model.encoder.layers",
    "vision_tower.vision_model.encoder.layers",
    "vision_tower.encoder.layers",
    "model.vision_tower.encoder.layer",  # InternViT
    "model.visual.blocks",
    "visual.blocks",
    "vision_model.encoder.layers",
    "visual.transformer.resblocks",
)
_TEXT_PATHS = ("transformer.resblocks", "text_model.encoder.layers", "text.transformer.resblocks")
_PROJECTOR_PATHS = (
    "model.multi_modal_projector",
    "multi_modal_projector",
    "model.mm_projector",
    "mm_projector",
    "model.visual.merger",  # Qwen2-VL / Qwen2.5-VL: the 2x2 patch merger feeds the LLM
)
_NORM_ATTRS = ("norm", "ln_f", "final_layer_norm", "final_norm")
_ATTN_ATTRS = ("self_attn", "attn", "attention", "self_attention")
_MLP_ATTRS = ("mlp", "feed_forward", "ffn")
_SUBPOINTS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn.pattern")
_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(resid_pre|resid_post|attn_out|mlp_out|attn\.pattern)$")
_TOWER_RE = re.compile(r"^(vision|text)\.blocks\.(-?\d+)$")
_NAMED = ("embed", "final", "projector")

EMBED = "embed"
FINAL = "final"
PROJECTOR = "projector"


def _index(i: int, helper: str) -> int:
    if isinstance(i, bool):
        raise ExplabError(f"points.{helper}({i!r}): the block index must be an int, e.g. {helper}(0)")
    try:
        return operator.index(i)
    except TypeError:
        raise ExplabError(
            f"points.{helper}({i!r}): the block index must be an int, e.g. {helper}(0)"
        ) from None


def resid_pre(i: int) -> str:
    """``blocks.{i}.resid_pre``: the residual stream entering decoder block ``i``."""
    return f"blocks.{_index(i, 'resid_pre')}.resid_pre"


def resid_post(i: int) -> str:
    """``blocks.{i}.resid_post``: the residual stream leaving decoder block ``i``."""
    return f"blocks.{_index(i, 'resid_post')}.resid_post"


def attn_out(i: int) -> str:
    """``blocks.{i}.attn_out``: what the attention of block ``i`` adds to the stream."""
    return f"blocks.{_index(i, 'attn_out')}.attn_out"


def mlp_out(i: int) -> str:
    """``blocks.{i}.mlp_out``: what the MLP of block ``i`` adds to the stream."""
    return f"blocks.{_index(i, 'mlp_out')}.mlp_out"


def attn_pattern(i: int) -> str:
    """``blocks.{i}.attn.pattern``: attention probabilities of block ``i`` (capture only)."""
    return f"blocks.{_index(i, 'attn_pattern')}.attn.pattern"


def vision_block(i: int) -> str:
    """``vision.blocks.{i}``: output of vision-tower layer ``i``."""
    return f"vision.blocks.{_index(i, 'vision_block')}"


def text_block(i: int) -> str:
    """``text.blocks.{i}``: output of text-tower layer ``i`` (dual-encoder CLIP)."""
    return f"text.blocks.{_index(i, 'text_block')}"


def is_attention_pattern(name: str) -> bool:
    """Whether ``name`` is an attention-pattern point (capture only; needs eager attention)."""
    return name.endswith(".attn.pattern")


def check_point_name(name: str) -> str:
    """``name`` if it has the form of a hook point name, else a one-line :class:`ExplabError`.

    Only the form is checked (a layer index may still be out of range for a given model).
    """
    if not isinstance(name, str):
        raise ExplabError(
            f"hook point {name!r} is not a string: build names with explab.interventions.points"
        )
    if name in _NAMED or _BLOCK_RE.match(name) or _TOWER_RE.match(name):
        return name
    raise ExplabError(
        f"unknown hook point {name!r}: use {', '.join(_NAMED)}, blocks.{{i}}.{{{'|'.join(_SUBPOINTS)}}}, "
        "vision.blocks.{i} or text.blocks.{i} (helpers: points.resid_post(i), points.attn_out(i), ...)"
    )


@dataclass(frozen=True)
class HookPoint:
    """Where a named point lives.

    ``kind`` "pre" hooks the module's first input, "post" its output (``index``: element of a tuple
    output; 0 also for plain tensors). ``stream`` "lm": token positions follow the per-sequence
    semantics of :class:`explab.interventions.specs.Positions` (padding, prompt, generated);
    "tower": positions are plain token indices of the tensor (no padding, everything is "prompt").
    ``seq_first``: the tensor is (seq, batch, ...) (open_clip with ``batch_first=False``).
    """

    name: str
    module: nn.Module
    kind: Literal["pre", "post"]
    index: int
    stream: Literal["lm", "tower"]
    layer: int | None = None
    seq_first: bool = False


@dataclass
class Arch:
    """The parts of a model that hook points refer to (None where the model has none)."""

    layers: nn.ModuleList | None
    final_norm: nn.Module | None
    projector: nn.Module | None
    vision: nn.ModuleList | None
    vision_seq_first: bool
    text: nn.ModuleList | None
    text_seq_first: bool


def _get(model: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def _first_list(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.ModuleList] | None:
    for p in paths:
        mod = _get(model, p)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return p, mod
    return None


def _seq_first(model: nn.Module, path: str) -> bool:
    parent = _get(model, path.rsplit(".", 1)[0]) if "." in path else model
    return getattr(parent, "batch_first", True) is False


def _is_dual_encoder(model: nn.Module) -> bool:
    return (hasattr(model, "encode_image") and hasattr(model, "encode_text")) or (
        isinstance(getattr(model, "text_model", None), nn.Module)
        and isinstance(getattr(model, "vision_model", None), nn.Module)
    )


def resolve_arch(model: nn.Module) -> Arch:
    """Find decoder layers, final norm, projector and tower layers of ``model``."""
    dual = _is_dual_encoder(model)
    lm = None if dual else _first_list(model, _LM_PATHS)
    final_norm = None
    if lm is not None:
        parent = _get(model, lm[0].rsplit(".", 1)[0]) if "." in lm[0] else model
        final_norm = next(
            (m for a in _NORM_ATTRS if isinstance(m := getattr(parent, a, None), nn.Module)), None
        )
    vision = _first_list(model, _VISION_PATHS)
    if vision is None:  # generic fallback: a block list under a vision-ish name
        for name, mod in model.named_modules():
            if (
                isinstance(mod, nn.ModuleList)
                and len(mod) > 0
                and re.search(r"vision|visual", name)
                and name.rsplit(".", 1)[-1] in ("layers", "blocks", "resblocks")
            ):
                vision = (name, mod)
                break
    text = _first_list(model, _TEXT_PATHS) if dual else None
    projector = next((m for p in _PROJECTOR_PATHS if (m := _get(model, p)) is not None), None)
    return Arch(
        layers=lm[1] if lm else None,
        final_norm=final_norm,
        projector=projector,
        vision=vision[1] if vision else None,
        vision_seq_first=_seq_first(model, vision[0]) if vision else False,
        text=text[1] if text else None,
        text_seq_first=_seq_first(model, text[0]) if text else False,
    )


def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks of the language model (text-tower blocks for a dual-encoder CLIP)."""
    arch = resolve_arch(model)
    blocks = arch.layers if arch.layers is not None else arch.text
    if blocks is None:
        raise ExplabError(
            f"{type(model).__name__} has no transformer blocks explab can find: pass a causal LM, VLM or CLIP model"
        )
    return len(blocks)


def list_points(model: nn.Module) -> list[str]:
    """Every hook point name valid for ``model``."""
    arch = resolve_arch(model)
    names: list[str] = []
    if arch.layers is not None:
        names.append("embed")
        names += [f"blocks.{i}.{s}" for i in range(len(arch.layers)) for s in _SUBPOINTS]
        if arch.final_norm is not None:
            names.append("final")
    if arch.projector is not None:
        names.append("projector")
    if arch.vision is not None:
        names += [f"vision.blocks.{i}" for i in range(len(arch.vision))]
    if arch.text is not None:
        names += [f"text.blocks.{i}" for i in range(len(arch.text))]
    return names


def _layer_index(i: int, n: int, name: str) -> int:
    if not -n <= i < n:
        raise ExplabError(
            f"hook point {name!r}: layer {i} out of range, the model has {n} blocks (0..{n - 1})"
        )
    return i % n


def _child(layer: nn.Module, attrs: tuple[str, ...], name: str) -> nn.Module:
    for a in attrs:
        if isinstance(m := getattr(layer, a, None), nn.Module):
            return m
    raise ExplabError(f"hook point {name!r}: {type(layer).__name__} has none of the submodules {attrs}")


def resolve_point(model: nn.Module, name: str, arch: Arch | None = None) -> HookPoint:
    """Map a point name to its module and hook kind; unknown names raise :class:`ExplabError`."""
    arch = arch or resolve_arch(model)

    def unknown(why: str) -> ExplabError:
        examples = ", ".join(list_points(model)[:6])
        return ExplabError(
            f"unknown hook point {name!r} ({why}): use one of list_points(model), e.g. {examples}"
        )

    if name in ("embed", "final") or _BLOCK_RE.match(name):
        if arch.layers is None:
            raise unknown(f"{type(model).__name__} has no language-model blocks")
        layers = arch.layers
        if name == "embed":
            return HookPoint(name, layers[0], "pre", 0, "lm", 0)
        if name == "final":
            if arch.final_norm is None:
                raise unknown("no final norm found")
            return HookPoint(name, arch.final_norm, "post", 0, "lm")
        m = _BLOCK_RE.match(name)
        assert m is not None
        i = _layer_index(int(m.group(1)), len(layers), name)
        layer, sub = layers[i], m.group(2)
        if sub == "resid_pre":
            return HookPoint(name, layer, "pre", 0, "lm", i)
        if sub == "resid_post":
            return HookPoint(name, layer, "post", 0, "lm", i)
        if sub == "mlp_out":
            return HookPoint(name, _child(layer, _MLP_ATTRS, name), "post", 0, "lm", i)
        attn = _child(layer, _ATTN_ATTRS, name)
        return HookPoint(name, attn, "post", 1 if sub == "attn.pattern" else 0, "lm", i)
    if name == "projector":
        if arch.projector is None:
            raise unknown("the model has no multimodal projector")
        return HookPoint(name, arch.projector, "post", 0, "tower")
    if m := _TOWER_RE.match(name):
        tower, seq_first = (
            (arch.vision, arch.vision_seq_first)
            if m.group(1) == "vision"
            else (arch.text, arch.text_seq_first)
        )
        if tower is None:
            raise unknown(f"the model has no {m.group(1)} tower")
        i = _layer_index(int(m.group(2)), len(tower), name)
        return HookPoint(name, tower[i], "post", 0, "tower", i, seq_first)
    raise unknown("not a known name")


def attention_module(model: nn.Module, layer: int, arch: Arch | None = None) -> nn.Module:
    """The self-attention module of decoder layer ``layer``."""
    return resolve_point(model, f"blocks.{layer}.attn_out", arch).module
