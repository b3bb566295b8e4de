"""The one token-by-token generation loop (batched, left padded, KV cache, interventions at every step).

Rows are the prompts expanded ``n`` times. Each row samples with its own ``torch.Generator``, seeded
from ``(params.seed, sample index)``, so a request's samples do not depend on what it was batched
with. ``temperature == 0`` is greedy. Logprobs are ``log_softmax`` of the raw logits (before
temperature/top-p), as vLLM reports them. A row stops at EOS (kept in ``token_ids``, dropped from the
text), when its decoded text contains a stop string (the text is cut before it; ``token_ids`` keep
the token that completed it) or at ``max_tokens`` (finish_reason ``"length"``); with ``ignore_eos``
EOS is a token like any other.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explab.errors import ExplabError
from explab.generation import Completion, SamplingParams
from explab.interventions.hooks import Spec, intervene
from explab.interventions.prefixes import PrefixCache, assemble, split
from explab.interventions.specs import Capture, ProjectOut, Steer, batch_key, parse_interventions

RESERVE = 256  # most positions a KV cache reserves ahead (then it doubles when full)
# Without interventions, sampled tokens reach the host (for EOS and stop-string checks) every this many steps,
# per device type (others: 8): on a GPU each read is a sync that stalls the queue of kernels, on a CPU it costs
# nothing, while each read later than a row's end costs one forward pass more. The tokens are the same for any value.
READ_EVERY: dict[str, int] = {"cpu": 1}


@dataclass
class DecodeOutput:
    """The ``n`` completions of one prompt and, per completion, its captures.

    ``captures[j][key]``: for a ``per_step`` capture a ``(T, *shape)`` tensor, row ``t`` the activation
    that sampled generated token ``t`` (``T`` = number of generated tokens); otherwise the captured
    positions in sequence order (``capture_positions[j][key]`` gives them). The last sampled token is
    never fed back, so no position at or after it is captured.
    """

    prompt_token_ids: list[int]
    completions: list[Completion]
    captures: list[dict[str, Tensor]] = field(default_factory=list)
    capture_positions: list[dict[str, Tensor]] = field(default_factory=list)


def row_generator(
    seed: int | None, sample: int, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """The generator of sample ``sample`` of a request with ``seed`` (None: drawn from torch's global RNG)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    state = np.random.SeedSequence([seed & (2**63 - 1), sample]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_token(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Pick a token from one row of raw logits (V,) under ``p`` (greedy when temperature is 0)."""
    return int(_sample_row(logits, p, gen))


def _sample_row(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> Tensor:
    """`sample_token`'s token as a 0-d tensor on ``logits``' device (no host sync)."""
    if p.temperature == 0.0:
        return logits.argmax()
    logits = logits.float()
    if 0 < p.top_k < logits.shape[-1]:  # keep the k most likely tokens (ties at the k-th kept)
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = (sp.cumsum(-1) - sp) >= p.top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, si, sp)
    return torch.multinomial(probs, 1, generator=gen)[0]


class _Steps:
    """The decode loop's per-step state, kept on the device: sampled tokens and logprobs go into
    buffers and reach the host once at the end, unless some row can stop early (at EOS or a stop
    string, ``watch``), when the tokens of the last ``every`` steps are read in one transfer, or sooner
    when a row reaches its ``max_tokens``. Finished rows are fed ``pad_id`` and sample nothing (their
    generators are not advanced), as if they were not there; a row that ended between two reads runs on
    until the read (its own tokens only: rows do not see each other), and what it made after its end is
    dropped, so the tokens are the same for any ``every``."""

    def __init__(
        self,
        plist: list[SamplingParams],
        gens: list[torch.Generator | None],
        eos: set[int],
        pad_id: int,
        device: torch.device,
        every: int = 1,
    ) -> None:
        R, cap = len(plist), max(1, max(p.max_tokens for p in plist))
        self.plist, self.gens, self.pad_id, self.device = plist, gens, pad_id, device
        self.watch = any(p.stop for p in plist) or (bool(eos) and any(not p.ignore_eos for p in plist))
        self.count = [0] * R
        self.every = max(1, every)
        self._read_to = 0  # steps before this one have been read
        self._active = [True] * R
        self._active_t: Tensor | None = None  # None: every row is active
        self._stale = False  # _active_t and the row lists below are behind _active
        self._rows: list[int] = []  # active rows that sample (temperature > 0)
        self._lp_now: list[int] = []  # active rows that report logprobs
        self._rows_t = self._lp_t = torch.zeros(0, dtype=torch.long)
        self._sampled = [r for r, p in enumerate(plist) if p.temperature > 0]
        self._lp_rows = [r for r, p in enumerate(plist) if p.logprobs]
        self._toks = torch.full((R, cap), pad_id, dtype=torch.long, device=device)
        self._lps = torch.zeros((R, cap), dtype=torch.float, device=device) if self._lp_rows else None
        self._host: list[list[int]] = [[] for _ in range(R)]
        self._mask: Tensor | None = None
        self._t = 0

    def active(self) -> list[int]:
        return [r for r, a in enumerate(self._active) if a]

    def sample(self, logits: Tensor) -> Tensor:
        """(R,) the next token of every row (``pad_id`` for finished rows), from the float logits (R, V)."""
        if self._stale or self._t == 0:  # the rows that sample, as host lists and device indices
            self._rows = [r for r in self._sampled if self._active[r]]
            self._lp_now = [r for r in self._lp_rows if self._active[r]]
            self._rows_t, self._lp_t = (torch.tensor(x, dtype=torch.long, device=self.device)
                                        for x in (self._rows, self._lp_now))
            if self._stale:
                self._active_t = torch.tensor(self._active, device=self.device)
            self._stale = False
        nxt = logits.argmax(-1)  # greedy rows (the others are overwritten)
        if self._rows:
            picked = torch.stack([_sample_row(logits[r], self.plist[r], self.gens[r]) for r in self._rows])
            nxt[self._rows_t] = picked
        if self._active_t is not None:
            nxt = nxt.masked_fill(~self._active_t, self.pad_id)
        t = self._t
        self._toks[:, t] = nxt
        if self._lp_now and self._lps is not None:
            idx = self._lp_t
            lp = torch.log_softmax(logits[idx], -1).gather(1, nxt[idx, None])[:, 0]
            self._lps[idx, t] = lp
        for r, a in enumerate(self._active):
            if a:
                self.count[r] += 1
        self._t += 1
        return nxt

    def due(self) -> bool:
        """Whether the tokens must be read now: ``every`` steps since the last read, or a row is at its end."""
        if self._t - self._read_to >= self.every:
            return True
        return any(a and n >= p.max_tokens for a, n, p in zip(self._active, self.count, self.plist, strict=True))

    def read(self) -> list[tuple[int, list[int]]]:
        """(row, its tokens since the last read) of every active row, in one device-to-host transfer."""
        window = self._toks[:, self._read_to : self._t].tolist()
        self._read_to = self._t
        return [(r, window[r]) for r in self.active()]

    def tokens(self, r: int) -> list[int]:
        """Row ``r``'s kept tokens (in ``watch`` mode: the caller appends what `read` gives)."""
        return self._host[r]

    def finish(self, r: int, kept: int | None = None) -> None:
        """Row ``r`` is done, with its first ``kept`` tokens (default: all it sampled)."""
        self._active[r] = False
        if kept is not None:
            self.count[r] = kept
        self._stale = True

    def mask(self, prompt_mask: Tensor) -> Tensor:
        """The attention mask of the next step: the prompt's, then ones for every token fed so far."""
        if self._mask is None:
            R, cap = self._toks.shape
            self._mask = torch.cat([prompt_mask, prompt_mask.new_ones((R, cap))], dim=1)
        return self._mask[:, : prompt_mask.shape[1] + self._t]

    def result(self) -> tuple[list[list[int]], list[list[float]]]:
        """Per row: its tokens and (rows that asked) logprobs, in one transfer each."""
        if self.watch:
            ids = self._host
        else:
            toks = self._toks[:, : self._t].tolist()
            ids = [row[: n] for row, n in zip(toks, self.count, strict=True)]
        lps: list[list[float]] = [[] for _ in ids]
        if self._lps is not None:
            vals = self._lps[:, : self._t].tolist()
            for r in self._lp_rows:
                lps[r] = vals[r][: self.count[r]]
        return ids, lps


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for v in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _inert_in_prompt(specs: Sequence[Spec]) -> bool:
    """Whether ``specs`` leave a prompt's forward pass untouched: every spec acts on (or captures)
    generated positions only, with the model's own attention (no masks, no attention patterns)."""
    if batch_key(specs):
        return False
    return all(
        isinstance(s, (Steer, ProjectOut, Capture))
        and s.positions.kind in ("generated", "paragraph")
        and not (isinstance(s, Capture) and s.per_step)
        for s in specs
    )


def _find_stop(text: str, stops: Sequence[str]) -> int:
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


@torch.no_grad()
def decode(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    specs: Sequence[Spec | Mapping[str, Any]] = (),
    *,
    per_prompt: Sequence[Sequence[Spec | Mapping[str, Any]]] | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> list[DecodeOutput]:
    """Generate for ``prompts`` (token ids) with per-prompt ``params`` and ``specs`` active at every step.

    ``per_prompt`` (one list per prompt) adds each prompt's own specs to the shared ``specs``; all
    prompts still decode as one batch (see ``per_row`` of :func:`~explab.interventions.intervene`),
    and each prompt's result equals decoding it alone with its specs. ``extra_inputs`` (e.g.
    ``pixel_values``) go to the prefill forward as given; they must match the rows after ``n``-expansion.

    When no spec of any row touches prompt positions (steering or captures on generated tokens: a
    steering sweep, ``n`` samples), the prefill runs without hooks and once per distinct prompt; its KV
    cache and last logits are copied to the prompt's rows. With ``prefix_cache`` (a server's
    `~explab.interventions.prefixes.PrefixCache`), prompts prefilled by earlier calls are not run
    again, and new ones are stored.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ExplabError(
            f"decode: {len(prompts)} prompts but {len(params)} SamplingParams: give one per prompt"
        )
    if any(len(p) == 0 for p in prompts):
        raise ExplabError("decode: an empty prompt: give at least one token (e.g. BOS)")
    specs = parse_interventions(list(specs))
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise ExplabError(
            f"decode: {len(prompts)} prompts but {len(per_prompt)} per_prompt spec lists: give one per prompt"
        )
    own = [parse_interventions(list(p)) for p in per_prompt] if per_prompt is not None else None
    device = next(model.parameters()).device
    rows = [(i, j) for i, p in enumerate(params) for j in range(p.n)]
    plist = [params[i] for i, _ in rows]
    gens = [
        row_generator(p.seed, j, device) if p.temperature > 0 else None
        for p, (_, j) in zip(plist, rows, strict=True)
    ]
    pad_id = next(
        (
            v
            for v in (getattr(tokenizer, "pad_token_id", None), *sorted(_eos_ids(model, tokenizer)))
            if v is not None
        ),
        0,
    )
    eos = _eos_ids(model, tokenizer)
    R, L = len(rows), max(len(p) for p in prompts)
    ids = torch.full((R, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((R, L), dtype=torch.long, device=device)
    for r, (i, _) in enumerate(rows):
        n = len(prompts[i])
        ids[r, L - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
        mask[r, L - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keep1 = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    texts = [""] * R
    finish: list[str | None] = [None] * R
    per_row = [own[i] for i, _ in rows] if own is not None else None
    row_specs = [[*specs, *(own[i] if own is not None else ())] for i, _ in rows]
    from explab.interventions.kvcache import full_attention  # imports transformers

    # a KV cache with room for the new tokens (not copied at every step; past RESERVE tokens it doubles,
    # so a long max_tokens that stops early at EOS does not reserve memory it never uses); sliding-window
    # or linear-attention layers keep transformers' own cache, and no prefix cache
    reserve = min(max(p.max_tokens for p in plist), RESERVE) if full_attention(model) else None
    if reserve is None:
        prefix_cache = None
    prefilled = None
    if extra_inputs is None and all(_inert_in_prompt(row) for row in row_specs):
        prefilled = _prefill_apart(model, [prompts[i] for i, _ in rows], ids, mask, pos, keep1, prefix_cache, reserve)
    mrope = _mrope(model, ids, mask, extra_inputs)
    with intervene(model, specs, tokenizer=tokenizer, per_row=per_row) as session:
        if prefilled is None:
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos if mrope is None else mrope[0],
                use_cache=True,
                **_cache(reserve),
                **keep1,
                **(extra_inputs or {}),
            )
        else:  # the hooks did not see the prefill (nothing of theirs acts on it): give them its layout
            session.track(input_ids=ids, attention_mask=mask)
            out = prefilled
        # with interventions every step is read: a row's steps past its end would count in n_applied
        every = 1 if any(row_specs) else READ_EVERY.get(device.type, 8)
        step = _Steps(plist, gens, eos, pad_id, device, every)
        while True:
            nxt = step.sample(out.logits[:, -1, :].float())
            if step.watch:  # a row may stop at EOS or a stop string: check its tokens at each read
                for r, window in step.read() if step.due() else ():
                    p, kept = plist[r], step.tokens(r)
                    for tok in window:
                        kept.append(tok)
                        if p.stop:
                            texts[r] = tokenizer.decode(kept, skip_special_tokens=True)
                        if tok in eos and not p.ignore_eos:
                            finish[r] = "stop"
                        elif p.stop and (k := _find_stop(texts[r], p.stop)) >= 0:
                            texts[r], finish[r] = texts[r][:k], "stop"
                        elif len(kept) >= p.max_tokens:
                            finish[r] = "length"
                        if finish[r] is not None:
                            step.finish(r, len(kept))
                            break
            else:  # rows end at max_tokens only: nothing to read before the end
                for r in step.active():
                    if step.count[r] >= plist[r].max_tokens:
                        finish[r] = "length"
                        step.finish(r)
            if all(f is not None for f in finish):
                break
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=step.mask(mask),
                position_ids=pos if mrope is None else (pos + mrope[1]).expand(3, -1, -1),
                past_key_values=out.past_key_values,
                use_cache=True,
                **keep1,
            )
        out_ids, out_lp = step.result()
        for r in range(R):
            if not plist[r].stop:  # rows with stop strings have their (cut) text already
                texts[r] = tokenizer.decode(out_ids[r], skip_special_tokens=True)
        caps, cpos = session.captures, session.capture_positions
    results = [DecodeOutput(list(prompts[i]), []) for i in range(len(prompts))]
    for r, (i, _) in enumerate(rows):
        asked = [s for s in row_specs[r] if isinstance(s, Capture)]
        per_step = {s.key for s in asked if s.per_step}
        g, limit = len(out_ids[r]), len(prompts[i]) + len(out_ids[r]) - 1
        comp = Completion(
            text=texts[r],
            token_ids=out_ids[r],
            logprobs=out_lp[r] if plist[r].logprobs else None,
            finish_reason=finish[r],  # type: ignore[arg-type]
        )
        results[i].completions.append(comp)
        row_caps, row_pos = {}, {}
        for key in (s.key for s in asked):
            vals = caps[key]
            if len(vals) != R:
                raise ExplabError(
                    f"decode: capture {key!r} got {len(vals)} rows for {R} sequences: use one image per row"
                )
            keep = slice(0, g) if key in per_step else cpos[key][r] < limit
            row_caps[key], row_pos[key] = vals[r][keep], cpos[key][r][keep]
        results[i].captures.append(row_caps)
        results[i].capture_positions.append(row_pos)
    return results


def _mrope(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
           extra_inputs: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For an M-RoPE VLM (the Qwen2-VL family: its inner model's ``get_rope_index``) given images or videos:
    the prefill's 3-D positions [3, R, L] and each row's offset [R, 1] of its text positions after the
    prompt (image tokens take a grid of positions, so the text after them counts on from the grid's end,
    not from the token count). None for every other model and for text-only prompts, whose positions are
    the token counts."""
    rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    grids = ("image_grid_thw", "video_grid_thw")
    if rope_index is None or not extra_inputs or not any(extra_inputs.get(k) is not None for k in grids):
        return None
    takes = inspect.signature(rope_index).parameters
    kwargs = {k: v for k, v in extra_inputs.items()
              if k in takes and k not in ("input_ids", "attention_mask") and v is not None}
    positions, deltas = rope_index(ids, attention_mask=mask, **kwargs)
    return positions, deltas.to(ids.device).reshape(-1, 1)


def _cache(reserve: int | None) -> dict[str, Any]:
    """The prefill's ``past_key_values``: a `GrowingCache` with room for ``reserve`` tokens (None: the model's)."""
    from explab.interventions.kvcache import GrowingCache

    return {} if reserve is None else {"past_key_values": GrowingCache(reserve)}


def _store(
    cache: PrefixCache, keys: list[tuple[int, ...]], repeated: list[bool], out: Any, every: bool = False
) -> dict[tuple[int, ...], Any]:
    """Store the prefills of ``keys`` (the rows of ``out``, in order) that the cache admits; returns
    those entries (``every``: the entries of all rows)."""
    admitted = [cache.admit(key, rep) for key, rep in zip(keys, repeated, strict=True)]
    rows = [i for i, yes in enumerate(admitted) if yes or every]
    entries = split(out.past_key_values, out.logits[:, -1], [len(k) for k in keys], rows)
    found = {keys[i]: entry for i, entry in zip(rows, entries, strict=True)}
    for key, yes in zip(keys, admitted, strict=True):
        if yes:
            cache.put(key, found[key])
    return found


def _prefill_apart(
    model: nn.Module,
    prompts: list[Sequence[int]],
    ids: Tensor,
    mask: Tensor,
    pos: Tensor,
    keep1: dict[str, int],
    cache: PrefixCache | None,
    reserve: int | None,
) -> Any:
    """The batch's prefill (KV cache and last logits of every row), run without hooks and once per
    distinct prompt not in ``cache``; None when that saves nothing (every prompt new and no cache)."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    if cache is None and len(first) == len(prompts):
        return None
    found = {key: cache.get(key) for key in first} if cache is not None else {}
    missing = [key for key in first if found.get(key) is None]
    counts = [index.count(u) for u in range(len(first))]
    if len(missing) == len(first):  # nothing known: one prefill of the distinct prompts, copied to their rows
        rows = [index.index(u) for u in range(len(first))]
        out = model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=pos[rows], use_cache=True,
                    **_cache(reserve), **keep1)
        if cache is not None:
            _store(cache, list(first), [counts[first[key]] > 1 for key in first], out)
        if len(rows) < len(prompts):
            chosen = torch.tensor(index, dtype=torch.long, device=ids.device)
            out.past_key_values.reorder_cache(chosen)
            out.logits = out.logits.index_select(0, chosen)
        return out
    if missing:  # the unknown prompts alone, at their own padded width
        rows = [index.index(first[key]) for key in missing]
        cols = slice(ids.shape[1] - max(map(len, missing)), None)
        out = model(input_ids=ids[rows, cols], attention_mask=mask[rows, cols], position_ids=pos[rows, cols],
                    use_cache=True, **keep1)
        repeated = [counts[first[key]] > 1 for key in missing]
        found.update(_store(cache, missing, repeated, out, every=True))  # type: ignore[arg-type]
    kv, logits = assemble([found[tuple(p)] for p in prompts], ids.shape[1], reserve or 0)  # type: ignore[misc]
    return SimpleNamespace(past_key_values=kv, logits=logits)


__all__ = ["DecodeOutput", "decode", "row_generator", "sample_token"]
