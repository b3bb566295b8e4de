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
class _VecOp:
    """Steering (``kind`` "steer") or projection ("project_out") of one stage, for every row at once.

    ``vec`` (float32) is ``(d,)`` when every row has the same vector, else ``(R, d)``: row ``r``'s
    ``alpha * vector`` (or unit direction), zero where row ``r`` has none. ``groups`` pairs each
    distinct position set with the rows that use it (None: every row). ``owner[r]`` is the index of
    row ``r``'s spec in its list (-1: none); ``counts`` the modified (row, position) pairs so far.
    """

    kind: str
    name: str
    vec: Tensor
    groups: list[tuple[Positions, Tensor | None]]
    owner: list[int]
    counts: Tensor | None = None
    cache: dict[tuple[Any, Any], Tensor] = field(default_factory=dict)

    def vector(self, like: Tensor) -> Tensor:
        """The vector(s) on ``like``'s device and dtype, shaped to broadcast over ``(B, q, d)``."""
        if self.vec.shape[-1] != like.shape[-1]:
            raise ExplabError(
                f"{self.kind} at {self.name!r}: vector has {self.vec.shape[-1]} entries but the activation "
                f"has size {like.shape[-1]}: give a vector of that size"
            )
        key = (like.device, like.dtype)
        if key not in self.cache:
            v = self.vec.to(device=like.device, dtype=like.dtype)
            self.cache[key] = v[:, None, :] if v.ndim == 2 else v
        return self.cache[key]


@dataclass
class _CaptureOp:
    """The captures written to ``key`` in one stage: each position set with the rows that asked."""

    key: str
    groups: list[tuple[Positions, Tensor | None]]


@dataclass
class _Stage:
    """The ``k``-th spec of every row at one hook site; a row has at most one, so the parts commute."""

    captures: list[_CaptureOp]
    steer: _VecOp | None
    project: _VecOp | None


@dataclass
class _Site:
    """One tensor the hooks act on (module, pre/post, tuple index), with its stages in order."""

    point: HookPoint
    stages: list[_Stage]


class Session:
    """The live hooks of one :func:`intervene` block and what they recorded.

    ``captures[key]`` is a list with one tensor per sequence (row), in the order sequences were
    processed: ``(n, *shape)`` stacking the row's captured positions in sequence order (for
    ``per_step`` captures: one entry per forward pass, the newest position). Attention patterns are
    ``(n, heads, S)`` with key axis = sequence position (pads dropped; zero beyond the query).
    ``capture_positions[key]`` gives the sequence position of each entry. ``n_applied[i]`` counts
    the (row, position) activations shared spec ``i`` modified; ``row_n_applied[r][i]`` the same for
    spec ``i`` of row ``r``'s list (``specs`` then that row's ``per_row`` specs).

    With ``per_row`` (one spec list per row of every batch), each row gets the shared ``specs`` plus
    its own. Specs at one hook site run in list order per row; the ``k``-th specs of all rows form a
    stage that runs as one batched operation: steering adds one ``(B, d)`` matrix (zero rows where a
    row has none), projection uses a ``(B, d)`` matrix of unit directions, position sets are resolved
    once per distinct set and masked to their rows, and a capture records only the rows that asked
    for it (the others read as empty). Knockout and bidirectional masks must be the same for every
    row (run rows with different ones in separate batches: :func:`~explab.interventions.specs.batch_key`).
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[Spec | Mapping[str, Any]],
        tokenizer: Any = None,
        prompt_lengths: Sequence[int] | None = None,
        per_row: Sequence[Sequence[Spec | Mapping[str, Any]]] | None = None,
    ) -> None:
        self.model = model
        self.specs: list[Spec] = parse_interventions(list(specs))
        self.per_row = per_row is not None
        if per_row is not None and not len(per_row):
            raise ExplabError("per_row is empty: give one spec list per row of the batch")
        # one virtual row standing for every row when there are no per-row specs
        self.row_specs: list[list[Spec]] = (
            [[*self.specs, *parse_interventions(list(r))] for r in per_row]
            if per_row is not None
            else [self.specs]
        )
        self.tokenizer = tokenizer
        self.prompt_lengths = list(prompt_lengths) if prompt_lengths is not None else None
        self.layout: Layout | None = None
        self.generated_ids: list[list[int]] = []  # per row, its generated tokens (tracked for 'paragraph' sets)
        self._para: list[list[int]] = []
        self._n_rows = 0
        self._tower_rows: dict[str, int] = {}
        self._chunks: dict[str, dict[int, list[Tensor]]] = {}
        self._cpos: dict[str, dict[int, list[Tensor]]] = {}
        self._vec_ops: list[_VecOp] = []
        self._on_device: dict[tuple[int, Any], Tensor] = {}
        self._owner: nn.Module | None = None
        self._handles: list[Any] = []
        self._attn_restore: Callable[[], None] | None = None
        self.image_token_id = image_token_id(model)
        self.vision_inputs: list[dict[str, Tensor]] = []  # per batch: pixel_values, image_sizes, ...
        self._track_para = any(_uses_paragraph(s) for row in self.row_specs for s in row)
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

    @property
    def row_n_applied(self) -> list[list[int]]:
        out = [[0] * len(row) for row in self.row_specs]
        for op in self._vec_ops:
            if op.counts is None:
                continue
            for r, (i, n) in enumerate(zip(op.owner, op.counts.tolist(), strict=True)):
                if i >= 0:
                    out[r][i] += int(n)
        return out

    @property
    def n_applied(self) -> list[int]:
        rows = self.row_n_applied
        return [sum(row[i] for row in rows) for i in range(len(self.specs))]

    def grids(self, key: str) -> list[list[Tensor]]:
        """Capture ``key`` as spatial grids: per captured row, a list of (H_t, W_t, ...) tensors.

        For a tower point (``vision.blocks.{i}``, ``projector``, captured at ``all`` positions) a row
        is a tower input (an image or tile; Qwen-VL: every image of the batch); for a language-model
        point captured at ``Positions(kind="image")`` a row is a sequence, with one grid per image
        (LLaVA-NeXT: base and high-res view). See :mod:`explab.interventions.grids`. Needs the
        captures of one batch (call :meth:`reset` between batches).
        """
        from explab.interventions.grids import grid_layouts

        spec = next((s for row in self.row_specs for s in row if isinstance(s, Capture) and s.key == key), None)
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
        for store in (self._chunks, self._cpos):
            for rows in store.values():
                rows.clear()
        self._tower_rows.clear()
        self._n_rows = 0
        for op in self._vec_ops:
            op.counts = None
        self.layout = None
        self.vision_inputs.clear()

    # -- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        model, arch = self.model, resolve_arch(self.model)
        self.arch = arch
        rows = self.row_specs
        mask_lists = [[s for s in row if isinstance(s, (Knockout, Bidirectional))] for row in rows]
        if any(m != mask_lists[0] for m in mask_lists[1:]):
            raise ExplabError(
                "knockout/bidirectional specs differ between rows of one batch: run rows with different "
                "attention masks in separate batches (group them by explab.interventions.batch_key)"
            )
        masks: dict[int, list[Knockout | Bidirectional]] = {}
        for s in mask_lists[0]:
            if arch.layers is None:
                raise ExplabError(f"{s.type}: {type(model).__name__} has no language-model attention layers")
            n = len(arch.layers)
            for li in s.layers if s.layers is not None else range(n):
                masks.setdefault(_layer_index(li, n, f"{s.type}.layers"), []).append(s)
        needs_eager = False  # knockout/bidirectional pass float 4-D masks: eager and sdpa agree
        d_model = _embed_dim(model)
        resolved: dict[str, HookPoint] = {}
        key_site: dict[str, tuple[int, str, int]] = {}
        # site -> (point, per row: [(index in the row's list, spec)] in order)
        sites: dict[tuple[int, str, int], tuple[HookPoint, list[list[tuple[int, Spec]]]]] = {}
        for r, row in enumerate(rows):
            keys: set[str] = set()
            for i, s in enumerate(row):
                if isinstance(s, (Knockout, Bidirectional)):
                    continue
                if s.point not in resolved:
                    resolved[s.point] = resolve_point(model, s.point, arch)
                pt = resolved[s.point]
                if pt.stream == "tower" and s.positions.kind == "image":
                    raise ExplabError(
                        f"{s.type} at {s.point!r}: positions 'image' select image tokens in the language model; "
                        "every token of a tower point is an image token: use positions 'all' or 'indices'"
                    )
                sid = (id(pt.module), pt.kind, pt.index)
                if pt.index == 1:  # attention pattern
                    if not isinstance(s, Capture):
                        raise ExplabError(f"{s.type} at {s.point!r}: attention patterns can only be captured")
                    needs_eager = True
                if isinstance(s, Capture):
                    if s.key in keys:
                        raise ExplabError(f"two captures write to {s.key!r}: give them distinct `name`s")
                    if key_site.setdefault(s.key, sid) != sid:
                        raise ExplabError(
                            f"capture name {s.key!r} names two different points: give them distinct `name`s"
                        )
                    keys.add(s.key)
                    self._chunks.setdefault(s.key, {})
                    self._cpos.setdefault(s.key, {})
                else:
                    size = len(s.vector if isinstance(s, Steer) else s.direction)
                    if pt.stream == "lm" and d_model is not None and size != d_model:
                        raise ExplabError(
                            f"{s.type} at {s.point!r}: vector has {size} entries but the model's hidden size "
                            f"is {d_model}: give a vector of that size"
                        )
                sites.setdefault(sid, (pt, [[] for _ in rows]))[1][r].append((i, s))
        if needs_eager:
            self._attn_restore = _force_eager(model)
        hooks: dict[tuple[int, str], tuple[nn.Module, list[_Site]]] = {}
        for pt, per in sites.values():
            depth = max(len(p) for p in per)
            stages = [self._stage(pt, [p[k] if k < len(p) else None for p in per]) for k in range(depth)]
            hooks.setdefault((id(pt.module), pt.kind), (pt.module, []))[1].append(_Site(pt, stages))
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
        for (_, kind), (module, site_list) in hooks.items():
            if kind == "pre":
                hook = self._pre_hook(site_list)
                h = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
            else:
                h = module.register_forward_hook(self._post_hook(site_list), prepend=True)
            self._handles.append(h)
        for li, ms in masks.items():
            attn = attention_module(model, li, arch)
            self._handles.append(attn.register_forward_pre_hook(self._mask_hook(ms), with_kwargs=True))

    def _row_groups(self, entries: dict[int, Positions]) -> list[tuple[Positions, Tensor | None]]:
        """Distinct position sets of ``entries`` (row -> set), each with its rows (None: every row)."""
        n = len(self.row_specs)
        by: dict[str, tuple[Positions, list[int]]] = {}
        for r, p in entries.items():
            by.setdefault(p.model_dump_json(), (p, []))[1].append(r)
        out: list[tuple[Positions, Tensor | None]] = []
        for p, rs in by.values():
            if len(rs) == n:
                out.append((p, None))
            else:
                m = torch.zeros(n, dtype=torch.bool)
                m[rs] = True
                out.append((p, m))
        return out

    def _stage(self, pt: HookPoint, entries: list[tuple[int, Spec] | None]) -> _Stage:
        caps: dict[str, dict[int, Positions]] = {}
        vecs: dict[str, dict[int, tuple[int, Steer | ProjectOut]]] = {"steer": {}, "project_out": {}}
        for r, e in enumerate(entries):
            if e is None:
                continue
            i, s = e
            if isinstance(s, Capture):
                caps.setdefault(s.key, {})[r] = Positions(kind="last") if s.per_step else s.positions
            elif isinstance(s, (Steer, ProjectOut)):
                vecs[s.type][r] = (i, s)
        return _Stage(
            [_CaptureOp(k, self._row_groups(v)) for k, v in caps.items()],
            self._vec_op(pt, "steer", vecs["steer"]),
            self._vec_op(pt, "project_out", vecs["project_out"]),
        )

    def _vec_op(
        self, pt: HookPoint, kind: str, entries: dict[int, tuple[int, Steer | ProjectOut]]
    ) -> _VecOp | None:
        if not entries:
            return None
        n = len(self.row_specs)
        vecs: dict[int, Tensor] = {}
        for r, (_, s) in entries.items():
            if isinstance(s, Steer):
                vecs[r] = torch.tensor(s.vector, dtype=torch.float32) * s.alpha
            else:
                v = torch.tensor(s.direction, dtype=torch.float32)
                vecs[r] = v / v.norm()
        sizes = {v.numel() for v in vecs.values()}
        if len(sizes) > 1:
            raise ExplabError(
                f"{kind} at {pt.name!r}: rows give vectors of sizes {sorted(sizes)}: give one size"
            )
        first = next(iter(vecs.values()))
        if len(vecs) == n and all(torch.equal(v, first) for v in vecs.values()):
            vec = first
        else:
            vec = torch.zeros(n, first.numel())
            for r, v in vecs.items():
                vec[r] = v
        owner = [entries[r][0] if r in entries else -1 for r in range(n)]
        groups = self._row_groups({r: s.positions for r, (_, s) in entries.items()})
        op = _VecOp(kind, pt.name, vec, groups, owner)
        self._vec_ops.append(op)
        return op

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attn_restore is not None:
            self._attn_restore()
            self._attn_restore = None

    # -- layout tracking -------------------------------------------------------------------------
    def track(self, **inputs: Any) -> None:
        """Record the layout of a forward pass over ``inputs`` (``input_ids``, ``attention_mask``) that
        ran without these hooks, e.g. a prefill no spec acts on, so later passes count positions on
        from it as if the hooks had seen it."""
        self._on_forward(self.model, (), inputs)
        self._owner = None

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
        if ids is not None and self._track_para:  # only paragraph positions read the generated tokens
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
    def _pre_hook(self, sites: list[_Site]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            for site in sites:
                x = self._run_site(site, x)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _post_hook(self, sites: list[_Site]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for site in sites:
                i = site.point.index
                x = output if isinstance(output, Tensor) else output[i]
                if x is None:
                    raise ExplabError(
                        f"{site.point.name!r}: the module returned no tensor here (attention not eager?)"
                    )
                y = self._run_site(site, x)
                if y is not x:
                    output = (
                        y if isinstance(output, Tensor) else type(output)((*output[:i], y, *output[i + 1 :]))
                    )
            return output

        return hook

    def _on(self, t: Tensor, device: torch.device) -> Tensor:
        key = (id(t), device)
        if key not in self._on_device:
            self._on_device[key] = t.to(device)
        return self._on_device[key]

    def _selection(
        self,
        groups: list[tuple[Positions, Tensor | None]],
        lay: Layout,
        pos: Tensor,
        valid: Tensor,
        name: str,
    ) -> Tensor:
        """(B, q) bool: the positions each row's own set selects (rows without one: none)."""
        sel: Tensor | None = None
        for p, rows in groups:
            s = select(p, lay, pos, valid)
            if rows is not None:
                if rows.shape[0] != s.shape[0]:
                    raise ExplabError(
                        f"{name!r}: per-row interventions were given for {rows.shape[0]} rows but the batch "
                        f"has {s.shape[0]}: give one spec list per row (one image per row at tower points)"
                    )
                s = s & self._on(rows, s.device)[:, None]
            sel = s if sel is None else sel | s
        assert sel is not None
        return sel

    def _run_site(self, site: _Site, x: Tensor) -> Tensor:
        if x.ndim == 2 and site.point.stream == "tower":  # a packed (tokens, D) tower: Qwen2-VL's ViT
            return self._run_site(site, x[None])[0]
        pt = site.point
        if pt.seq_first:
            x = x.transpose(0, 1)
        is_pattern = pt.index == 1
        b, q = x.shape[0], x.shape[2] if is_pattern else x.shape[1]
        tower_row0: dict[str, int] = {}
        n_rows = len(self.row_specs)
        changes = any(st.steer or st.project for st in site.stages)
        if self.per_row and b != n_rows and (pt.stream == "lm" or changes):
            raise ExplabError(
                f"{pt.name!r}: per-row interventions were given for {n_rows} rows but the batch has {b}: "
                "give one spec list per row (one image per row at tower points)"
            )
        if pt.stream == "lm":
            lay = self._lm_layout(b, q, x.device)
            pos = lay.positions(lay.past, q)
        else:
            lay = _plain_layout(b, q, x.device, 0)
            pos = lay.positions(0, q)
        for st in site.stages:
            for cap in st.captures:
                sel = self._selection(cap.groups, lay, pos, lay.real, pt.name)
                row0 = lay.row0
                if pt.stream != "lm":
                    row0 = tower_row0.setdefault(cap.key, self._tower_rows.get(cap.key, 0))
                self._record(cap.key, x, sel, pos, lay, is_pattern, row0)
            for op in (st.steer, st.project):
                if op is None:
                    continue
                sel = self._selection(op.groups, lay, pos, lay.real, pt.name)
                n = sel.sum(1) if self.per_row else sel.sum().reshape(1)
                op.counts = n if op.counts is None else op.counts + n
                v = op.vector(x)
                if op.kind == "steer":
                    x = torch.where(sel[..., None], x + v, x)
                else:
                    x = torch.where(sel[..., None], x - (x * v).sum(-1, keepdim=True) * v, x)
        for key, row0 in tower_row0.items():
            self._tower_rows[key] = row0 + b
        return x.transpose(0, 1) if pt.seq_first else x

    def _record(
        self, key: str, x: Tensor, sel: Tensor, pos: Tensor, lay: Layout, pattern: bool, row0: int
    ) -> None:
        counts = sel.sum(1).tolist()
        if not any(counts):
            return
        xd = x.detach()
        chunks, pos_c = self._chunks.setdefault(key, {}), self._cpos.setdefault(key, {})
        if not pattern:  # one gather and one copy for the whole batch, then split per row
            vals, where = xd[sel].cpu().split(counts), pos[sel].cpu().split(counts)
            for b, n in enumerate(counts):
                if n:
                    chunks.setdefault(row0 + b, []).append(vals[b])
                    pos_c.setdefault(row0 + b, []).append(where[b])
            return
        for b, n in enumerate(counts):
            if not n:
                continue
            # (H, q, kv) -> (n, H, S), key axis = sequence position
            w = xd[b][:, sel[b]].transpose(0, 1)
            kv = w.shape[-1]
            kpos = torch.arange(lay.past + lay.q - kv, lay.past + lay.q, device=w.device) - lay.pad[b]
            keep = kpos >= 0
            w = w[..., keep]
            first = int(kpos[keep][0]) if bool(keep.any()) else 0
            val = F.pad(w, (first, 0)).cpu() if first > 0 else w.cpu()
            chunks.setdefault(row0 + b, []).append(val)
            pos_c.setdefault(row0 + b, []).append(pos[b][sel[b]].cpu())

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
    per_row: Sequence[Sequence[Spec | Mapping[str, Any]]] | None = None,
) -> Iterator[Session]:
    """Run ``model`` with ``specs`` active inside the block; yields the :class:`Session`.

    ``prompt_lengths`` (one per row of the next batch) marks positions ``>= P`` as generated even in
    a single forward (teacher forcing); by default ``P`` is the row's real-token count at the prefill.
    ``tokenizer`` is needed for ``paragraph`` positions. Attention-pattern captures switch the model to
    eager attention for the block; knockout and bidirectional specs keep the model's attention (they
    pass additive float 4-D masks, which eager and sdpa apply alike). ``per_row`` (one list per row of
    every batch) adds row-specific specs to the shared ``specs``: one batch, different interventions per
    row (see :class:`Session`); each row's results equal running it alone with its specs.
    """
    session = Session(model, specs, tokenizer, prompt_lengths, per_row)
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
    per_row: Sequence[Sequence[Spec | Mapping[str, Any]]] | None = None,
    **forward_kwargs: Any,
) -> tuple[Any, Session]:
    """One forward pass of ``model`` with ``specs`` (and ``per_row`` specs): returns (output, session)."""
    kwargs = {"input_ids": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    opts = {"tokenizer": tokenizer, "prompt_lengths": prompt_lengths, "per_row": per_row}
    with intervene(model, specs, **opts) as session:
        out = model(**kwargs, **forward_kwargs)
    return out, session


__all__ = ["Arch", "Layout", "Session", "intervene", "paragraph_index", "run_with_hooks", "select"]
