"""`HookedModel`: one PyTorch model behind a shared Ray actor, with interventions on every call.

- ``forward(requests)``: one batched forward pass for concurrent requests, each row with its own
  interventions; returns captured activations as numpy arrays (and optionally logits);
- ``generate(requests)``: token-by-token generation (`explab.interventions.decode`) with each
  request's interventions active at every step and per-step captures; a request's ``images`` (VLMs) go
  through the processor with its prompt and its ``pixel_values`` (and ``image_sizes`` ...) into the
  prefill; rows with images never use the prefix cache; prompts whose rows act on
  generated tokens only are prefilled once and kept (``prefix_cache_mb``; `explab.interventions.prefixes`),
  so a sweep that sends the same prompts under many strengths prefills each prompt once;
- ``score(prompt, continuations)``: per-token logprobs of each continuation after the prompt;
- ``paragraphs(token_ids)``: the paragraph index of every token of generated token sequences, as
  the ``paragraph`` position set counts it.

Requests from concurrent callers are merged by the dynamic batcher; a batched result equals the
unbatched one (left padding with explicit position ids). One batch carries different interventions
per row (steering vectors, strengths, layers, position sets, captures, projections: the ``per_row``
specs of `explab.interventions.intervene`); only requests whose attention changes differ
(knockout, bidirectional masks, attention-pattern captures, which switch to eager attention: see
`explab.interventions.batch_key`) run in separate batches.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from explab.errors import ExplabError
from explab.interventions.specs import Capture, Interventions, batch_key
from explab.models import load_model, parameter_count
from explab.servers.base import ServerBase
from explab.servers.prompts import encode_request
from explab.servers.types import ChatMessage, GenerationRequest, GenerationResult


class ForwardRequest(BaseModel):
    """One sequence for a hooked forward pass: ``text``, chat ``messages`` or ``token_ids``.

    ``images`` (H×W×3 uint8 arrays) go through the VLM's processor with the text, which must
    hold the model's image token, or with chat ``messages``: the processor's chat template renders
    them with the images at the start of the first user turn (plus the generation prompt and
    ``assistant_prefix``), so a caller needs no model-specific image placeholder.
    ``prompt_length``: positions from here on count as *generated* for the interventions' position
    sets (teacher-forced responses); default: all are prompt.
    ``capture_reduce="mean"`` returns each capture averaged over its captured positions (one row,
    NaN when none was captured; ``capture_positions`` still lists them), so a caller that needs a
    mean over many layers and tokens does not ship every position back. ``interventions`` takes spec
    objects (``Capture(point=points.resid_post(3))``) or their dicts, validated here.
    ``grids``: capture keys to return also as spatial image grids (``ForwardResult.grids``, see
    ``Session.grids``): tower points captured at ``all`` positions, language-model points at
    ``Positions(kind="image")``. Such a request runs in a forward pass of its own, so every tower row
    (image or tile) belongs to it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    text: str | None = None
    messages: list[ChatMessage] | None = None
    assistant_prefix: str = ""
    token_ids: list[int] | None = None
    images: list[Any] | None = None
    interventions: Interventions = Field(default_factory=list)
    prompt_length: int | None = None
    return_logits: Literal["none", "last", "all"] = "none"
    add_special_tokens: bool = True
    capture_reduce: Literal["none", "mean"] = "none"
    grids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_input(self) -> ForwardRequest:
        if sum(x is not None for x in (self.text, self.messages, self.token_ids)) != 1:
            raise ValueError("give exactly one of `text`, `messages` or `token_ids`")
        return self


class ForwardResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    token_ids: list[int]
    captures: dict[str, Any]  # key -> np.ndarray (positions × ...)
    capture_positions: dict[str, Any]  # key -> np.ndarray of sequence positions
    logits: Any | None = None  # np.ndarray: (V,) for "last", (T, V) for "all"
    next_token: str | None = None  # with return_logits "last": the greedy next token ("" for a special one)
    grids: dict[str, list[Any]] = Field(default_factory=dict)  # key -> [np.ndarray (H_t, W_t, D)] per image


class HookedGeneration(GenerationResult):
    """A `GenerationResult` plus, per completion, the captured activations (numpy arrays)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    captures: list[dict[str, Any]] = Field(default_factory=list)


def as_forward_requests(requests: Any) -> list[ForwardRequest]:
    if isinstance(requests, (str, dict, ForwardRequest)):
        requests = [requests]
    out = []
    for item in requests:
        if isinstance(item, str):
            item = ForwardRequest(text=item)
        elif isinstance(item, dict):
            item = ForwardRequest.model_validate(item)
        out.append(item)
    return out


def _image_kind(images: list[Any] | None) -> tuple[tuple[int, ...], ...] | None:
    """The batching key of a request's images: None without images, else each image's shape."""
    if images is None:
        return None
    return tuple(tuple(np.asarray(img).shape) for img in images)


def _captured(interventions: list[Any]) -> list[str]:
    return [s.key for s in interventions if isinstance(s, Capture)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).numpy()


@ray.remote
class HookedModel(ServerBase):
    kind = "hooked"

    def _load(self) -> None:
        self.loaded = load_model(self.spec)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.batcher = self._batcher(self._run, group_key=lambda item: (item[0], item[2]))
        from explab.interventions.kvcache import full_attention
        from explab.interventions.prefixes import PrefixCache

        # a single forward pass builds no KV cache (nothing generates from it)
        self._no_cache = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        mb = self.options.prefix_cache_mb
        self.prefixes = PrefixCache(int(mb * 2**20)) if mb > 0 and full_attention(self.model) else None

    def _info(self) -> dict[str, Any]:
        from explab.interventions import n_layers, resolve_arch

        vision = resolve_arch(self.model).vision  # the vision tower's blocks (VLMs), else None
        return {"model_kind": self.loaded.kind, "device": str(self.device),
                "dtype": str(self.loaded.dtype).replace("torch.", ""),
                "revision": self.loaded.revision, "n_layers": n_layers(self.model),
                "n_params": parameter_count(self.model),
                "n_vision_layers": len(vision) if vision is not None else 0,
                "prefix_cache": self.prefixes.stats() if self.prefixes is not None else None}

    # --- public methods (each request becomes one batcher item: (op, request, group)) --------
    async def forward(self, requests: list[ForwardRequest]) -> list[ForwardResult]:
        # rows of one batch may differ in everything but their attention masks (and the LM head's width);
        # a request that asks for image grids runs alone (every tower row of the pass is its own)
        items = [("forward", r, (batch_key(r.interventions), r.images is not None, r.return_logits == "all",
                                 id(r) if r.grids else None)) for r in requests]
        return await self.batcher.submit_many(items)

    async def generate(self, requests: list[GenerationRequest]) -> list[HookedGeneration]:
        # rows with images batch only with rows whose images have the same count and sizes
        return await self.batcher.submit_many([("generate", r, (batch_key(r.interventions), _image_kind(r.images)))
                                               for r in requests])

    async def score(self, prompt: str | list[dict[str, str]], continuations: list[str]) -> list[list[float]]:
        if isinstance(prompt, str):
            request = GenerationRequest(prompt=prompt)
        else:
            request = GenerationRequest(messages=[ChatMessage.model_validate(m) for m in prompt])
        prompt_ids = encode_request(self.tokenizer, request)
        items = [("score", (prompt_ids, self.tokenizer(c, add_special_tokens=False)["input_ids"]), None)
                 for c in continuations]
        return await self.batcher.submit_many(items)

    async def paragraphs(self, token_ids: list[list[int]]) -> list[list[int]]:
        """For each generated token sequence, the paragraph of every token (`Positions` ``paragraph``)."""
        import asyncio

        from explab.interventions import paragraph_index

        def labels(ids: list[int]) -> list[int]:
            decode = self.tokenizer.decode
            return [paragraph_index(decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]

        return await asyncio.to_thread(lambda: [labels(list(ids)) for ids in token_ids])

    # --- batched work, on the model thread ----------------------------------------------------
    def _run(self, items: list[tuple[str, Any, Any]]) -> list[Any]:
        op = items[0][0]
        payload = [item[1] for item in items]
        if op == "forward":
            return self._forward_batch(payload)
        if op == "generate":
            return self._generate_batch(payload)
        return self._score_batch(payload)

    def _encode(self, r: ForwardRequest) -> list[int]:
        if r.token_ids is not None:
            return list(r.token_ids)
        if r.messages is not None:
            return encode_request(self.tokenizer,
                                  GenerationRequest(messages=r.messages, assistant_prefix=r.assistant_prefix))
        return list(self.tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"])

    def _padded(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}

    @torch.no_grad()
    def _forward_batch(self, requests: list[ForwardRequest]) -> list[ForwardResult]:
        from explab.interventions import intervene

        if requests[0].images is not None:
            inputs, seqs = self._vision_inputs(requests)
        else:
            seqs = [self._encode(r) for r in requests]
            inputs = self._padded(seqs)
        lengths = [r.prompt_length if r.prompt_length is not None else len(s)
                   for r, s in zip(requests, seqs, strict=True)]
        keep = {}  # without "all" logits, skip the LM head on every other position (B x T x vocab)
        if (all(r.return_logits != "all" for r in requests)
                and "logits_to_keep" in inspect.signature(self.model.forward).parameters):
            keep["logits_to_keep"] = 1
        per_row = [r.interventions for r in requests]
        opts = {"per_row": per_row, "tokenizer": self.tokenizer, "prompt_lengths": lengths}
        with intervene(self.model, **opts) as session:
            out = self.model(**inputs, **keep, **self._no_cache)
        captures, positions = session.captures, session.capture_positions
        width = inputs["input_ids"].shape[1]
        results = []
        for row, (r, seq) in enumerate(zip(requests, seqs, strict=True)):
            logits = None
            next_token = None
            if r.return_logits == "last":
                logits = _np(out.logits[row, -1])
                next_token = self.tokenizer.decode([int(out.logits[row, -1].argmax())], skip_special_tokens=True)
            elif r.return_logits == "all":
                logits = _np(out.logits[row, width - len(seq):])
            asked = _captured(r.interventions)  # only this row's captures
            if r.capture_reduce == "mean":
                row_caps = {k: _np(captures[k][row].float().mean(0, keepdim=True)) for k in asked}
            else:
                row_caps = {k: _np(captures[k][row]) for k in asked}
            results.append(ForwardResult(
                token_ids=seq,
                captures=row_caps,
                capture_positions={k: _np(positions[k][row]) for k in asked},
                logits=logits,
                next_token=next_token,
                grids={k: [_np(g) for g in self._grids(session, k, row)] for k in r.grids},
            ))
        return results

    def _grids(self, session: Any, key: str, row: int) -> list[torch.Tensor]:
        """The grids of capture ``key`` for request ``row`` (a grid request is alone in its batch)."""
        from explab.interventions import resolve_point

        rows = session.grids(key)
        point = next(s.point for s in session.row_specs[row] if getattr(s, "key", None) == key)
        if resolve_point(self.model, point).stream == "tower":
            return [g for gs in rows for g in gs]  # tower rows are the request's images / tiles
        return rows[row]

    def _vision_inputs(self, requests: list[ForwardRequest],
                       padding_side: str | None = None) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        processor = self.loaded.processor
        if self.loaded.kind != "vlm" or processor is None:
            raise ExplabError(f"model {self.spec.name!r} is a {self.loaded.kind}: only a VLM takes `images`")
        texts = []
        for r in requests:
            if r.text is not None:
                texts.append(r.text)
            elif r.messages is not None:
                texts.append(self._vision_chat(r))
            else:
                raise ExplabError("a request with `images` needs `text` holding the model's image token, "
                                  "or chat `messages`")
        images = [img for r in requests for img in (r.images or [])]
        side = {"padding_side": padding_side} if padding_side is not None else {}  # else the tokenizer's own
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, **side)
        mask = inputs["attention_mask"]
        if not hasattr(getattr(self.model, "model", None), "get_rope_index"):  # M-RoPE finds its own
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        seqs = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], mask, strict=True)]
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        return inputs, seqs

    def _vision_chat(self, r: ForwardRequest) -> str:
        """``r.messages`` rendered by the processor's chat template, the images opening the first user turn.
        A BOS the template renders is dropped: the processor's tokenizer adds its own."""
        owner = self.loaded.processor if getattr(self.loaded.processor, "chat_template", None) else self.tokenizer
        messages, placed = [], False
        for m in r.messages or []:
            content: list[dict[str, Any]] = [{"type": "text", "text": m.content}]
            if m.role == "user" and not placed:
                content = [{"type": "image"} for _ in r.images or []] + content
                placed = True
            messages.append({"role": m.role, "content": content})
        text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + r.assistant_prefix
        bos = self.tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[HookedGeneration]:
        from explab.interventions.decode import decode

        extra = None
        if requests[0].images is not None:  # the batcher groups rows with images apart (`_image_kind`)
            prompts, extra = self._vision_prompts(requests)
        else:
            prompts = [encode_request(self.tokenizer, r) for r in requests]
        # decode runs no prefix cache with extra inputs: a prefill is never served across different images
        outputs = decode(self.model, self.tokenizer, prompts, [r.params for r in requests],
                         per_prompt=[r.interventions for r in requests], extra_inputs=extra,
                         prefix_cache=self.prefixes)
        self._metrics.tokens(sum(len(c.token_ids) for o in outputs for c in o.completions))
        return [HookedGeneration(prompt_token_ids=p, completions=o.completions,
                                 captures=[{k: _np(v) for k, v in caps.items()} for caps in o.captures])
                for p, o in zip(prompts, outputs, strict=True)]

    def _vision_prompts(self, requests: list[GenerationRequest]) -> tuple[list[list[int]], dict[str, Any]]:
        """Prompt ids and the processor's other inputs (``pixel_values``, ``image_sizes``, ...) for the prefill
        of generation requests with images, rendered as `forward` renders them (`_vision_inputs`). Each request
        is repeated ``params.n`` times, as `decode` expands its rows, and padded on the left as `decode` pads,
        so every processor output lines up with decode's rows."""
        rows = [ForwardRequest(text=r.prompt, messages=r.messages, assistant_prefix=r.assistant_prefix,
                               images=r.images)
                for r in requests for _ in range(r.params.n)]
        inputs, seqs = self._vision_inputs(rows, padding_side="left")
        firsts = np.cumsum([0] + [r.params.n for r in requests])[:-1]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        return [seqs[i] for i in firsts], extra

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        seqs = [p + c for p, c in pairs]
        inputs = self._padded(seqs)
        logprobs = torch.log_softmax(self.model(**inputs, **self._no_cache).logits.float(), dim=-1)
        width = inputs["input_ids"].shape[1]
        results = []
        for row, (_, cont) in enumerate(pairs):
            if not cont:
                results.append([])
                continue
            start = width - len(cont)  # the continuation's first token sits here
            targets = torch.tensor(cont, device=logprobs.device)
            lp = logprobs[row, start - 1: width - 1].gather(-1, targets[:, None])[:, 0]
            results.append(lp.tolist())
        return results
