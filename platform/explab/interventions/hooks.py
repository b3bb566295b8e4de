"""The one hook mechanism: :func:`intervene` registers hooks for a list of specs and removes them on exit.

Every forward pass of the hooked model (a plain call, ``model.generate`` or :func:`decode`) is
tracked: a pre-hook on the model reads ``input_ids``/``inputs_embeds``, the 2D ``attention_mask`` and
``past_key_values`` to find, for each row, its left-padding offset, its prompt length and which
sequence positions the forward covers. Position sets (see :class:`~explab.interventions.specs.Positions`)
are resolved per row from that. A forward without a cache (or with an empty one) starts a new batch
of sequences; captures are kept per sequence, in the order sequences were seen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explab.errors import ExplabError
from explab.interventions.points import (
    Arch,
    HookPoint,
    _layer_index,
    attention_module,
    resolve_arch,
    resolve_point,
)
from explab.interventions.specs import (
    Bidirectional,
    Capture,
    Knockout,
    Positions,
    ProjectOut,
    Steer,
    parse_interventions,
)

Spec = Capture | Steer | ProjectOut | Knockout | Bidirectional
_BREAK = re.compile(r"\n\s*\n")


def paragraph_index(text: str) -> int:
    """Number of paragraph breaks (newline, optional whitespace, newline) in ``text``, leading space ignored."""
    return len(_BREAK.findall(text.lstrip()))


@dataclass
class Layout:
    """Where the tokens of one forward pass sit in their sequences (one row per sequence)."""

    past: int  # tokens already in the cache (tensor columns)
    q: int  # new tokens in this forward
    pad: Tensor  # (B,) left-padding offset of each row
    prompt_len: Tensor  # (B,) prompt length P of each row
    real: Tensor  # (B, q) non-pad columns of this forward
    key_real: Tensor | None  # (B, past+q) non-pad columns of the whole sequence (from the 2D mask)
    para: Tensor  # (B, G) paragraph index of generated position j; -1 where unknown
    row0: int  # global index of row 0 in Session.captures
    image: Tensor | None = None  # (B, S) ordinal of the image token at sequence position s; -1: none

    def positions(self, start_col: int, n: int) -> Tensor:
        """(B, n) sequence positions of tensor columns [start_col, start_col+n); negative: padding."""
        cols = torch.arange(start_col, start_col + n, device=self.pad.device)
        return cols[None, :] - self.pad[:, None]


def _plain_layout(b: int, q: int, device: torch.device, row0: int) -> Layout:
    z = torch.zeros(b, dtype=torch.long, device=device)
    ones = torch.ones(b, q, dtype=torch.bool, device=device)
    return Layout(0, q, z, z + q, ones, None, torch.full((b, 0), -1, device=device), row0)


def select(p: Positions, lay: Layout, pos: Tensor, valid: Tensor) -> Tensor:
    """(B, n) bool: which of the positions ``pos`` (with ``valid`` = real token) are in the set ``p``."""
    P = lay.prompt_len[:, None]

    def resolve(v: int) -> Tensor:
        return P + v if v < 0 else torch.full_like(P, v)

    k = p.kind
    if k == "all":
        return valid
    if k == "prompt":
        return valid & (pos < P)
    if k == "generated":
        return valid & (pos >= P)
    if k == "last":
        newest = pos.masked_fill(~valid, -(2**62)).amax(1, keepdim=True)
        return valid & (pos == newest)
    if k == "indices":
        idx = torch.cat([resolve(i) for i in p.indices or ()], dim=1)  # (B, k)
        return valid & (pos[:, :, None] == idx[:, None, :]).any(-1)
    if k == "span":
        end = resolve(p.end) if p.end is not None else torch.full_like(P, 2**62)
        return valid & (pos >= resolve(p.start or 0)) & (pos < end)
    if k == "image":
        if lay.image is None or lay.image.shape[1] == 0:
            return torch.zeros_like(valid)
        n = lay.image.shape[1]
        ordinal = lay.image.gather(1, pos.clamp(0, n - 1)).masked_fill((pos < 0) | (pos >= n), -1)
        if p.indices is None:
            return valid & (ordinal >= 0)
        wanted = torch.tensor(p.indices, dtype=ordinal.dtype, device=ordinal.device)
        return valid & (ordinal >= 0) & (ordinal[..., None] == wanted).any(-1)
    # paragraph
    g = pos - P
    if lay.para.shape[1] == 0:
        return torch.zeros_like(valid)
    par = lay.para.gather(1, g.clamp(0, lay.para.shape[1] - 1))
    return valid & (g >= 0) & (g < lay.para.shape[1]) & (par == p.paragraph)


@dataclass
class _PointOp:
    idx: int
    spec: Capture | Steer | ProjectOut
    point: HookPoint
    vec: Tensor | None = None  # float32 master copy (steer vector or unit direction)
    cache: dict[tuple[Any, Any], Tensor] = field(default_factory=dict)

    def vector(self, like: Tensor) -> Tensor:
        assert self.vec is not None
        if self.vec.numel() != like.shape[-1]:
            raise ExplabError(
                f"{self.spec.type} at {self.point.name!r}: vector has {self.vec.numel()} entries but the activation "
                f"has size {like.shape[-1]}: give a vector of that size"
            )
        key = (like.device, like.dtype)
        if key not in self.cache:
            self.cache[key] = self.vec.to(device=like.device, dtype=like.dtype)
        return self.cache[key]


class Session:
    """The live hooks of one :func:`intervene` block and what they recorded.

    ``captures[key]`` is a list with one tensor per sequence (row), in the order sequences were
    processed: ``(n, *shape)`` stacking the row's captured positions in sequence order (for
    ``per_step`` captures: one entry per forward pass, the newest position). Attention patterns are
    ``(n, heads, S)`` with key axis = sequence position (pads dropped; zero beyond the query).
    ``capture_positions[key]`` gives the sequence position of each entry. ``n_applied[i]`` counts
    the (row, position) activations spec ``i`` modified.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[Spec | Mapping[str, Any]],
        tokenizer: Any = None,
        prompt_lengths: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.specs: list[Spec] = parse_interventions(list(specs))
        self.tokenizer = tokenizer
        self.prompt_lengths = list(prompt_lengths) if prompt_lengths is not None else None
        self.n_applied = [0] * len(self.specs)
        self.layout: Layout | None = None
        self.generated_ids: list[list[int]] = []
        self._para: list[list[int]] = []
        self._n_rows = 0
        self._tower_rows: dict[str, int] = {}
        self._chunks: dict[str, dict[int, list[Tensor]]] = {}
        self._cpos: dict[str, dict[int, list[Tensor]]] = {}
        self._owner: nn.Module | None = None
        self._handles: list[Any] = []
        self._attn_restore: Callable[[], None] | None = None
        self.image_token_id = image_token_id(model)
        self.vision_inputs: list[dict[str, Tensor]] = []  # per batch: pixel_values, image_sizes, ...
        self._track_para = any(_uses_paragraph(s) for s in self.specs)
        if self._track_para and tokenizer is None:
            raise ExplabError(
                "a 'paragraph' position set needs the text: pass tokenizer= to intervene()/decode()"
            )
        self._install()

    # -- results ---------------------------------------------------------------------------------
    @property
    def captures(self) -> dict[str, list[Tensor]]:
        return {k: self._rows(k, self._chunks) for k in self._chunks}

    @property
    def capture_positions(self) -> dict[str, list[Tensor]]:
        return {k: self._rows(k, self._cpos) for k in self._cpos}

    def grids(self, key: str) -> list[list[Tensor]]:
        """Capture ``key`` as spatial grids: per captured row, a list of (H_t, W_t, ...) tensors.

        For a tower point (``vision.blocks.{i}``, ``projector``, captured at ``all`` positions) a row
        is a tower input (an image or tile; Qwen-VL: every image of the batch); for a language-model
        point captured at ``Positions(kind="image")`` a row is a sequence, with one grid per image
        (LLaVA-NeXT: base and high-res view). See :mod:`explab.interventions.grids`. Needs the
        captures of one batch (call :meth:`reset` between batches).
        """
        from explab.interventions.grids import grid_layouts

        spec = next((s for s in self.specs if isinstance(s, Capture) and s.key == key), None)
        if spec is None:
            raise ExplabError(f"no capture named {key!r}: grids come from one of {sorted(self._chunks)}")
        stream = resolve_point(self.model, spec.point, self.arch).stream
        want = "all" if stream == "tower" else "image"
        if spec.positions != Positions(kind=want) or spec.per_step:  # type: ignore[arg-type]
            raise ExplabError(
                f"grids of {key!r}: capture {spec.point!r} at positions {want!r} (every image token, "
                "in order) to lay it out as a grid"
            )
        if len(self.vision_inputs) != 1:
            raise ExplabError(
                f"grids of {key!r}: the session saw {len(self.vision_inputs)} batches: "
                "take grids after each batch and call reset() between them"
            )
        rows = self.captures[key]
        layouts = grid_layouts(self.model, spec.point, [r.shape[0] for r in rows], self.vision_inputs[0])
        return [[g.take(r) for g in gs] for r, gs in zip(rows, layouts, strict=True)]

    def _rows(self, key: str, store: dict[str, dict[int, list[Tensor]]]) -> list[Tensor]:
        rows = store[key]
        n = self._tower_rows[key] if key in self._tower_rows else self._n_rows
        proto = next((c for cs in rows.values() for c in cs), None)
        empty = proto.new_zeros((0, *proto.shape[1:])) if proto is not None else torch.zeros(0)
        return [_cat(rows[r]) if rows.get(r) else empty for r in range(n)]

    def reset(self) -> None:
        """Forget captures, counts and sequences (the hooks stay)."""
        self._chunks.clear()
        self._cpos.clear()
        self._tower_rows.clear()
        self._n_rows = 0
        self.n_applied = [0] * len(self.specs)
        self.layout = None
        self.vision_inputs.clear()

    # -- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        model, arch = self.model, resolve_arch(self.model)
        self.arch = arch
        groups: dict[tuple[int, str], tuple[nn.Module, list[_PointOp]]] = {}
        masks: dict[int, list[Knockout | Bidirectional]] = {}
        keys: set[str] = set()
        d_model = _embed_dim(model)
        needs_eager = False
        for i, s in enumerate(self.specs):
            if isinstance(s, (Knockout, Bidirectional)):
                if arch.layers is None:
                    raise ExplabError(
                        f"{s.type}: {type(model).__name__} has no language-model attention layers"
                    )
                n = len(arch.layers)
                for li in s.layers if s.layers is not None else range(n):
                    masks.setdefault(_layer_index(li, n, f"{s.type}.layers"), []).append(s)
                continue  # float 4-D masks: eager and sdpa give the same result
            pt = resolve_point(model, s.point, arch)
            if pt.stream == "tower" and s.positions.kind == "image":
                raise ExplabError(
                    f"{s.type} at {s.point!r}: positions 'image' select image tokens in the language model; "
                    "every token of a tower point is an image token: use positions 'all' or 'indices'"
                )
            op = _PointOp(i, s, pt)
            if pt.index == 1:  # attention pattern
                if not isinstance(s, Capture):
                    raise ExplabError(f"{s.type} at {s.point!r}: attention patterns can only be captured")
                needs_eager = True
            if isinstance(s, Capture):
                if s.key in keys:
                    raise ExplabError(f"two captures write to {s.key!r}: give them distinct `name`s")
                keys.add(s.key)
                self._chunks[s.key], self._cpos[s.key] = {}, {}
            else:
                raw = s.vector if isinstance(s, Steer) else s.direction
                vec = torch.tensor(raw, dtype=torch.float32)
                if pt.stream == "lm" and d_model is not None and vec.numel() != d_model:
                    raise ExplabError(
                        f"{s.type} at {s.point!r}: vector has {vec.numel()} entries but the model's hidden size "
                        f"is {d_model}: give a vector of that size"
                    )
                if isinstance(s, ProjectOut):
                    if float(vec.norm()) == 0.0:
                        raise ExplabError(f"project_out at {s.point!r}: the direction is all zeros")
                    vec = vec / vec.norm()
                else:
                    vec = vec * s.alpha
                op.vec = vec
            groups.setdefault((id(pt.module), pt.kind), (pt.module, []))[1].append(op)
        if needs_eager:
            self._attn_restore = _force_eager(model)
        # track the layout of every forward: on the model, and on the LM's own root as a fallback
        roots = [model]
        if arch.layers is not None:
            lm_root = next((m for m in model.modules() if any(c is arch.layers for c in m.children())), None)
            if lm_root is not None and lm_root is not model:
                roots.append(lm_root)
        for root in roots:
            self._handles.append(
                root.register_forward_pre_hook(self._on_forward, with_kwargs=True, prepend=True)
            )
            self._handles.append(root.register_forward_hook(self._on_forward_end, always_call=True))
        for (_, kind), (module, ops) in groups.items():
            if kind == "pre":
                h = module.register_forward_pre_hook(self._pre_hook(ops), with_kwargs=True, prepend=True)
            else:
                h = module.register_forward_hook(self._post_hook(ops), prepend=True)
            self._handles.append(h)
        for li, ms in masks.items():
            attn = attention_module(model, li, arch)
            self._handles.append(attn.register_forward_pre_hook(self._mask_hook(ms), with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attn_restore is not None:
            self._attn_restore()
            self._attn_restore = None

    # -- layout tracking -------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._owner is not None:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            ids = args[0]
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(ref, Tensor) or ref.ndim < 2:
            return
        self._owner = module
        b, q, dev = ref.shape[0], ref.shape[1], ref.device
        pkv = kwargs.get("past_key_values")
        past = int(pkv.get_seq_length()) if hasattr(pkv, "get_seq_length") else 0
        am = kwargs.get("attention_mask")
        if isinstance(am, Tensor) and am.ndim == 2 and am.shape[1] >= q:
            full = am.to(dev).bool()
            pad = torch.where(full.any(1), full.int().argmax(1), full.shape[1])
            real, key_real = full[:, -q:], full
        else:
            pad = torch.zeros(b, dtype=torch.long, device=dev)
            real, key_real = torch.ones(b, q, dtype=torch.bool, device=dev), None
        lay = self.layout
        new = past == 0 or lay is None or lay.pad.shape[0] != b
        if new:  # a new batch of sequences
            if self.prompt_lengths is not None:
                if len(self.prompt_lengths) != b:
                    raise ExplabError(
                        f"prompt_lengths has {len(self.prompt_lengths)} entries for a batch of {b}"
                    )
                plen = torch.tensor(self.prompt_lengths, dtype=torch.long, device=dev)
            else:
                plen = real.sum(1)
            row0, self._n_rows = self._n_rows, self._n_rows + b
            self.generated_ids = [[] for _ in range(b)]
            self._para = [[] for _ in range(b)]
        else:
            plen, row0 = lay.prompt_len, lay.row0
        para = torch.full((b, 0), -1, dtype=torch.long, device=dev) if new or lay is None else lay.para
        lay = Layout(past, q, pad, plen, real, key_real, para, row0)
        lay.image = self._image_ordinals(ids, lay, None if new else self.layout)
        if new:
            self.vision_inputs.append({k: kwargs[k] for k in VISION_INPUTS if isinstance(kwargs.get(k), Tensor)})
        if ids is not None:
            self._track_generated(ids, lay)
        self.layout = lay

    def _image_ordinals(self, ids: Tensor | None, lay: Layout, prev: Layout | None) -> Tensor | None:
        """(B, past+q): the ordinal of each image token among its row's image tokens (-1: not one)."""
        if ids is None or self.image_token_id is None:
            return prev.image if prev is not None else None
        is_img = (ids == self.image_token_id) & lay.real
        ordinal = (is_img.long().cumsum(1) - 1).masked_fill(~is_img, -1)
        pos = lay.positions(lay.past, lay.q)
        width = lay.past + lay.q
        out = torch.full((ids.shape[0], width), -1, dtype=torch.long, device=ids.device)
        if prev is not None and prev.image is not None:
            n = min(prev.image.shape[1], width)
            out[:, :n] = prev.image[:, :n]
            ordinal = torch.where(is_img, ordinal + (out.amax(1, keepdim=True) + 1), ordinal)
        keep = is_img & (pos >= 0)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(pos)
        out[rows[keep], pos[keep]] = ordinal[keep]
        return out

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is self._owner:
            self._owner = None

    def _track_generated(self, ids: Tensor, lay: Layout) -> None:
        pos = lay.positions(lay.past, lay.q).tolist()
        real, plen, ids_l = lay.real.tolist(), lay.prompt_len.tolist(), ids.tolist()
        for b, gen in enumerate(self.generated_ids):
            for c, p in enumerate(pos[b]):
                if real[b][c] and p - plen[b] == len(gen):
                    gen.append(ids_l[b][c])
                    if self._track_para:
                        text = self.tokenizer.decode(gen, skip_special_tokens=True)
                        self._para[b].append(paragraph_index(text))
        if self._track_para:
            g = max((len(p) for p in self._para), default=0)
            para = torch.full((len(self._para), g), -1, dtype=torch.long)
            for b, p in enumerate(self._para):
                para[b, : len(p)] = torch.tensor(p, dtype=torch.long)
            lay.para = para.to(lay.pad.device)

    def _lm_layout(self, b: int, q: int, device: torch.device) -> Layout:
        lay = self.layout
        if lay is not None and lay.pad.shape[0] == b and lay.q == q:
            return lay
        row0, self._n_rows = self._n_rows, self._n_rows + b  # a layer called outside a tracked forward
        return _plain_layout(b, q, device, row0)

    # -- point hooks -----------------------------------------------------------------------------
    def _pre_hook(self, ops: list[_PointOp]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            for op in ops:
                x = self._apply(op, x)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _post_hook(self, ops: list[_PointOp]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for op in ops:
                i = op.point.index
                x = output if isinstance(output, Tensor) else output[i]
                if x is None:
                    raise ExplabError(
                        f"{op.point.name!r}: the module returned no tensor here (attention not eager?)"
                    )
                y = self._apply(op, x)
                if y is not x:
                    output = (
                        y if isinstance(output, Tensor) else type(output)((*output[:i], y, *output[i + 1 :]))
                    )
            return output

        return hook

    def _apply(self, op: _PointOp, x: Tensor) -> Tensor:
        if x.ndim == 2 and op.point.stream == "tower":  # a packed (tokens, D) tower: Qwen2-VL's ViT
            return self._apply(op, x[None])[0]
        pt, spec = op.point, op.spec
        if pt.seq_first:
            x = x.transpose(0, 1)
        is_pattern = pt.index == 1
        b, q = x.shape[0], x.shape[2] if is_pattern else x.shape[1]
        if pt.stream == "lm":
            lay = self._lm_layout(b, q, x.device)
            pos, valid = lay.positions(lay.past, q), lay.real
        else:
            row0 = self._tower_rows.get(spec.key, 0) if isinstance(spec, Capture) else 0
            if isinstance(spec, Capture):
                self._tower_rows[spec.key] = row0 + b
            lay = _plain_layout(b, q, x.device, row0)
            pos, valid = lay.positions(0, q), lay.real
        if isinstance(spec, Capture):
            sel = select(Positions(kind="last") if spec.per_step else spec.positions, lay, pos, valid)
            self._record(spec.key, x, sel, pos, lay, is_pattern)
            return x.transpose(0, 1) if pt.seq_first else x
        sel = select(spec.positions, lay, pos, valid)
        self.n_applied[op.idx] += int(sel.sum())
        v = op.vector(x)
        if isinstance(spec, Steer):
            y = torch.where(sel[..., None], x + v, x)
        else:
            y = torch.where(sel[..., None], x - (x @ v)[..., None] * v, x)
        return y.transpose(0, 1) if pt.seq_first else y

    def _record(self, key: str, x: Tensor, sel: Tensor, pos: Tensor, lay: Layout, pattern: bool) -> None:
        xd, sel_c, pos_c = x.detach(), sel.cpu(), pos.cpu()
        for b in range(xd.shape[0]):
            if not bool(sel_c[b].any()):
                continue
            if pattern:  # (H, q, kv) -> (n, H, S), key axis = sequence position
                w = xd[b][:, sel[b]].transpose(0, 1)
                kv = w.shape[-1]
                kpos = torch.arange(lay.past + lay.q - kv, lay.past + lay.q, device=w.device) - lay.pad[b]
                keep = kpos >= 0
                w = w[..., keep]
                first = int(kpos[keep][0]) if bool(keep.any()) else 0
                val = F.pad(w, (first, 0)).cpu() if first > 0 else w.cpu()
            else:
                val = xd[b][sel[b]].cpu()
            r = lay.row0 + b
            self._chunks[key].setdefault(r, []).append(val)
            self._cpos[key].setdefault(r, []).append(pos_c[b][sel_c[b]])

    # -- attention masks -------------------------------------------------------------------------
    def _mask_hook(self, specs: list[Knockout | Bidirectional]) -> Callable[..., Any]:
        """Rewrite the layer's attention mask as an additive float 4-D mask (0 / finfo.min).

        Always float: transformers' eager attention adds the mask to the scores, so a boolean 4-D mask
        would add 1/0 and let future tokens through; sdpa takes the float mask as it is. The layer's
        own mask (None when sdpa runs causal, boolean or float otherwise) is converted first.
        """

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            b, q = hidden.shape[:2]
            lay = self._lm_layout(b, q, hidden.device)
            mask = kwargs.get("attention_mask")
            kv = mask.shape[-1] if isinstance(mask, Tensor) else lay.past + q
            qpos, kpos = lay.positions(lay.past, q), lay.positions(lay.past + q - kv, kv)
            qvalid = lay.real
            kvalid = lay.key_real[:, -kv:] if lay.key_real is not None else kpos >= 0
            mask = float_mask(mask, qpos, kpos, kvalid, hidden.dtype).expand(b, -1, q, kv)
            neg = torch.finfo(mask.dtype).min
            for s in specs:
                if isinstance(s, Knockout):
                    qs, ks = select(s.queries, lay, qpos, qvalid), select(s.keys, lay, kpos, kvalid)
                    mask = _block(mask, (qs[:, :, None] & ks[:, None, :])[:, None], neg)
                else:
                    qs, ks = select(s.span, lay, qpos, qvalid), select(s.span, lay, kpos, kvalid)
                    mask = mask.masked_fill((qs[:, :, None] & ks[:, None, :])[:, None], 0.0)
            return args, {**kwargs, "attention_mask": mask}

        return hook


def float_mask(mask: Tensor | None, qpos: Tensor, kpos: Tensor, kvalid: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive float form (0 = attend, finfo.min = blocked) of a layer's attention mask.

    ``mask``: None (causal over the real keys, built from the sequence positions ``qpos`` (B, q) and
    ``kpos`` (B, kv) and the real keys ``kvalid``), a boolean mask (True = attend) or a float mask
    (returned as is, in ``dtype``). The result is (B or 1, 1 or heads, q, kv).
    """
    neg = torch.finfo(dtype).min
    if mask is None:
        allowed = (kpos[:, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=qpos.device).masked_fill(~allowed, neg)[:, None]
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, neg)
    else:
        out = mask.to(dtype)
    return out if out.ndim == 4 else out[:, None]


def _block(mask: Tensor, block: Tensor, neg: float) -> Tensor:
    """``mask`` (additive float) with the entries in ``block`` set to ``neg``."""
    out = mask.masked_fill(block, neg)
    dead = (out <= neg / 2).all(-1) & ~(mask <= neg / 2).all(-1)
    if bool(dead.any()):  # a query with no key left keeps attending to itself
        q, kv = mask.shape[-2], mask.shape[-1]
        eye = torch.zeros(q, kv, dtype=torch.bool, device=mask.device)
        eye[torch.arange(q), torch.arange(kv - q, kv)] = True
        out = out.masked_fill(dead[..., None] & eye, 0.0)
    return out


VISION_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")


def image_token_id(model: nn.Module) -> int | None:
    """The id of the token a vision-language model replaces by image features (None: not a VLM)."""
    cfg = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def _cat(chunks: list[Tensor]) -> Tensor:
    if len(chunks) == 1:
        return chunks[0]
    if chunks[0].ndim == 0:
        return torch.stack(chunks)
    width = max(c.shape[-1] for c in chunks)
    if any(c.shape[-1] != width for c in chunks) and chunks[0].ndim == 3:  # attention patterns
        chunks = [F.pad(c, (0, width - c.shape[-1])) for c in chunks]
    return torch.cat(chunks)


def _uses_paragraph(s: Spec) -> bool:
    ps = (
        [s.queries, s.keys]
        if isinstance(s, Knockout)
        else []
        if isinstance(s, Bidirectional)
        else [s.positions]
    )
    return any(p.kind == "paragraph" for p in ps)


def _embed_dim(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return int(emb.weight.shape[1]) if isinstance(emb, nn.Embedding) else None


def _force_eager(model: nn.Module) -> Callable[[], None] | None:
    """Switch a transformers model to eager attention; return how to switch it back."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        return None
    prev: dict[str, Any] = {"": cfg._attn_implementation}
    for k in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, k, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            prev[k] = sub._attn_implementation
    if all(v == "eager" for v in prev.values()):
        return None
    model.set_attn_implementation("eager")
    return lambda: model.set_attn_implementation(prev)


@contextmanager
def intervene(
    model: nn.Module,
    specs: Sequence[Spec | Mapping[str, Any]] = (),
    *,
    tokenizer: Any = None,
    prompt_lengths: Sequence[int] | None = None,
) -> Iterator[Session]:
    """Run ``model`` with ``specs`` active inside the block; yields the :class:`Session`.

    ``prompt_lengths`` (one per row of the next batch) marks positions ``>= P`` as generated even in
    a single forward (teacher forcing); by default ``P`` is the row's real-token count at the prefill.
    ``tokenizer`` is needed for ``paragraph`` positions. Attention-pattern captures switch the model to
    eager attention for the block; knockout and bidirectional specs keep the model's attention (they
    pass additive float 4-D masks, which eager and sdpa apply alike).
    """
    session = Session(model, specs, tokenizer, prompt_lengths)
    try:
        yield session
    finally:
        session.close()


def run_with_hooks(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Any],
    specs: Sequence[Spec | Mapping[str, Any]] = (),
    *,
    tokenizer: Any = None,
    prompt_lengths: Sequence[int] | None = None,
    **forward_kwargs: Any,
) -> tuple[Any, Session]:
    """One forward pass of ``model`` with ``specs``: returns (model output, session)."""
    kwargs = {"input_ids": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    with intervene(model, specs, tokenizer=tokenizer, prompt_lengths=prompt_lengths) as session:
        out = model(**kwargs, **forward_kwargs)
    return out, session


__all__ = ["Arch", "Layout", "Session", "intervene", "paragraph_index", "run_with_hooks", "select"]
