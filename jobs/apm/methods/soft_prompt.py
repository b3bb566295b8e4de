"""Soft-prompt optimization: per-user prefix embeddings trained on the history's preferences.

The system message starts with ``length`` placeholder tokens; their input embeddings (the ``embed``
hook point, i.e. the residual stream entering block 0) are replaced by a trained prefix. Training
maximises the likelihood of the preferred over the rejected response of every history turn,
reference-free and length-normalised (SimPO-style):
``loss = -log sigmoid(beta * (logp(chosen) - logp(rejected))) - sft_weight * logp(chosen)``,
with ``logp`` the mean token log-probability of the response after the prompt.

Why not the shared server: training needs gradients through the model, and the shared servers are
no-grad inference actors (vLLM has no backward at all; the HookedModel server runs under
``torch.no_grad`` and batches strangers' requests). So the job loads the base model itself with
``explab.models.load_model`` inside one Ray task per (seed, model) — on a GPU when
``soft_prompt.num_gpus`` > 0 — and trains every user's prefix there, loading the model once.

Evaluation is like every other method's: the shared HookedModel server of the same model
generates with the prefix, as one ``Steer`` per placeholder position on ``embed`` that adds
``prefix_i - embed(placeholder_i)`` (so the activation entering block 0 there is exactly the
prefix, as in training).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from pydantic import Field

from explab.config import Section
from explab.errors import ExplabError
from explab.interventions import Positions, Steer, points
from explab.models import ModelSpec, load_model
from explab.seeds import rng_for
from explab.servers import GenerationRequest, ServerOptions, encode_request, render_prompt
from jobs.apm.methods.base import Method, MethodContext, UserView

_UNITS = (" x", "x", " .", ".", " a", "a")


class SoftPromptConfig(Section):
    length: int = Field(16, ge=1)  # prefix tokens
    lr: float = Field(1e-3, gt=0.0)
    steps: int = Field(100, ge=0)
    batch_pairs: int = Field(8, ge=1)  # (chosen, rejected) pairs per step
    beta: float = Field(2.0, gt=0.0)
    sft_weight: float = Field(0.0, ge=0.0)
    max_response_tokens: int = Field(256, ge=1)
    init_text: str = "Answer in the way this particular user likes best."
    num_gpus: float = Field(0.0, ge=0.0)  # GPUs of the training task
    server: ServerOptions = ServerOptions()  # the HookedModel server that evaluates the prefix
    # recompute each block's activations in the backward pass instead of keeping them (HF gradient
    # checkpointing, non-reentrant): the memory a 32B model's training needs, at ~1/3 more compute
    gradient_checkpointing: bool = False
    # train the base models one after another, each HookedModel server stopped after its model's
    # prompts are answered, so one training task and one server hold GPUs at a time
    sequential: bool = True


class SoftPromptModel:
    """The base model loaded in-process for training, and the prompt layout around the placeholder."""

    def __init__(self, spec: ModelSpec, length: int, system_suffix: str = ""):
        self.loaded = load_model(spec)
        if self.loaded.kind != "causal_lm":
            raise ExplabError(f"soft_prompt: model {spec.name!r} is a {self.loaded.kind}, not a causal LM")
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        from explab.interventions import resolve_point

        self.module = resolve_point(self.model, "embed").module
        self.length, self.suffix = length, system_suffix
        self.device = self.loaded.device
        self.unit = self._pick_unit()

    # ---- prompt layout ---------------------------------------------------------------------
    def request(self, prompt: str, unit: str | None = None) -> GenerationRequest:
        system = (unit or self.unit) * self.length + (f"\n{self.suffix}" if self.suffix else "")
        return GenerationRequest(messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}])

    def layout(self, prompt: str, unit: str | None = None) -> tuple[list[int], list[int]]:
        """Prompt token ids (as the servers encode them) and the placeholder positions."""
        request = self.request(prompt, unit)
        ids = encode_request(self.tok, request)
        text = render_prompt(self.tok, request)
        core = ((unit or self.unit) * self.length).strip()
        start = text.find(core)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if start < 0 or list(enc["input_ids"]) != ids:
            return ids, []
        end = start + len(core)
        positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        return ids, positions

    def _pick_unit(self) -> str:
        for unit in _UNITS:
            _, positions = self.layout("Hello there.", unit)
            if len(positions) == self.length:
                return unit
        raise ExplabError(f"soft_prompt: found no placeholder that this tokenizer splits into exactly {self.length} "
                          "tokens inside the chat template: try another soft_prompt.length")

    # ---- forward with a prefix -------------------------------------------------------------
    def _forward(self, seqs: list[list[int]], positions: list[list[int]], prefix: torch.Tensor | None) -> Any:
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        slot = torch.full((len(seqs), width), -1, dtype=torch.long)
        for row, (seq, pos) in enumerate(zip(seqs, positions, strict=True)):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            slot[row, pos] = torch.arange(len(pos))
        slot = slot.to(self.device)

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            y = torch.where(slot[..., None] >= 0, prefix.to(x.dtype)[slot.clamp(min=0)], x)
            return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

        handle = self.module.register_forward_pre_hook(hook, with_kwargs=True) if prefix is not None else None
        try:
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        finally:
            if handle is not None:
                handle.remove()

    def response_logps(self, prefix: torch.Tensor | None,
                       items: list[tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
        """Mean log-probability of each response after its prompt: items are (prompt ids, positions, response ids)."""
        seqs = [p + r for p, _, r in items]
        logits = self._forward(seqs, [pos for _, pos, _ in items], prefix)
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for row, (p, _, r) in enumerate(items):
            targets = torch.tensor(r, device=logp.device)
            out.append(logp[row, len(p) - 1: len(p) + len(r) - 1].gather(-1, targets[:, None]).mean())
        return torch.stack(out)

    @torch.no_grad()
    def embed_activations(self, ids: list[int]) -> torch.Tensor:
        """The activations at ``embed`` (entering block 0) for a token sequence (T, d), float32."""
        seen: dict[str, torch.Tensor] = {}

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=torch.tensor([ids], device=self.device))
        finally:
            handle.remove()
        return seen["x"][0].float()

    def initial_prefix(self, init_text: str) -> torch.Tensor:
        ids = self.tok(init_text or "x", add_special_tokens=False)["input_ids"] or [0]
        acts = self.embed_activations(list(ids))
        reps = -(-self.length // len(ids))
        return acts.repeat(reps, 1)[: self.length].clone()

    def steer_specs(self, prefix: torch.Tensor, ids: list[int], positions: list[int]) -> list[Steer]:
        """Interventions that make the activation at each placeholder position equal to the prefix."""
        base = self.embed_activations(ids)[positions]
        delta = (prefix.detach().float().to(base.device) - base).cpu().numpy()
        at = [Positions(kind="indices", indices=[int(p)]) for p in positions]
        return [Steer(point=points.EMBED, vector=delta[i], positions=at[i]) for i in range(len(positions))]

    # ---- training ---------------------------------------------------------------------------
    def train(self, view: UserView, cfg: SoftPromptConfig, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        prefix = torch.nn.Parameter(self.initial_prefix(cfg.init_text).to(self.device))
        items = []
        for turn in view.history:
            ids, positions = self.layout(turn.prompt)
            chosen = self._response_ids(turn.chosen, cfg)
            for rej in turn.rejected:
                items.append((ids, positions, chosen, self._response_ids(rej, cfg)))
        stats = {"pairs": float(len(items))}
        if not items:
            return prefix.detach(), stats
        stats["accuracy_before"] = self.pair_accuracy(prefix, items)
        if cfg.gradient_checkpointing:
            self.enable_checkpointing()
        opt = torch.optim.Adam([prefix], lr=cfg.lr)
        rng = rng_for("soft_prompt", seed)
        losses = []
        for _ in range(cfg.steps):
            batch = [items[i] for i in rng.choice(len(items), size=min(cfg.batch_pairs, len(items)), replace=False)]
            with torch.enable_grad(), self._training_mode(cfg.gradient_checkpointing):
                lp = self.response_logps(prefix, [(p, pos, c) for p, pos, c, _ in batch]
                                         + [(p, pos, r) for p, pos, _, r in batch])
                lc, lr_ = lp[: len(batch)], lp[len(batch):]
                loss = -torch.nn.functional.logsigmoid(cfg.beta * (lc - lr_)).mean() - cfg.sft_weight * lc.mean()
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        stats["accuracy_after"] = self.pair_accuracy(prefix, items)
        stats["loss_first"] = losses[0] if losses else float("nan")
        stats["loss_last"] = float(np.mean(losses[-5:])) if losses else float("nan")
        return prefix.detach(), stats

    def enable_checkpointing(self) -> None:
        """Gradient checkpointing of the decoder blocks (non-reentrant: the frozen weights need no
        grad, the prefix entering block 0 carries it)."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ExplabError(f"soft_prompt.gradient_checkpointing: {type(self.model).__name__} does not support it: "
                              "set gradient_checkpointing: false")
        if not self.model.is_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the block the prefix enters through a pre-hook runs as usual: a checkpointed block replays
        # its forward without that hook's tensors (torch refuses the mismatch); one block's activations
        if hasattr(self.module, "gradient_checkpointing"):
            self.module.gradient_checkpointing = False

    @contextlib.contextmanager
    def _training_mode(self, on: bool) -> Any:
        """HF models checkpoint only in train mode; the base models here have no dropout to switch on."""
        if not on:
            yield
            return
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    def _response_ids(self, text: str, cfg: SoftPromptConfig) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])[: cfg.max_response_tokens]
        return ids or [self.tok.eos_token_id or 0]

    @torch.no_grad()
    def pair_accuracy(self, prefix: torch.Tensor,
                      items: list[tuple[list[int], list[int], list[int], list[int]]]) -> float:
        wins = []
        for i in range(0, len(items), 8):
            chunk = items[i:i + 8]
            lp = self.response_logps(prefix, [(p, pos, c) for p, pos, c, _ in chunk]
                                     + [(p, pos, r) for p, pos, _, r in chunk])
            wins += (lp[: len(chunk)] > lp[len(chunk):]).tolist()
        return float(np.mean(wins))


class SoftPrompt(Method):
    """Fits a prefix with a `SoftPromptModel`; responds through the shared HookedModel server."""

    name = "soft_prompt"

    def __init__(self, mctx: MethodContext, cfg: SoftPromptConfig, trainer: SoftPromptModel, hooked: Any):
        super().__init__(mctx, cfg)
        self.trainer, self.hooked = trainer, hooked

    def fit(self, view: UserView) -> None:
        self.prefix, self.stats = self.trainer.train(view, self.cfg, self.mctx.seed)

    def requests(self, prompts: list[str]) -> list[dict[str, Any]]:
        out = []
        for prompt in prompts:
            ids, positions = self.trainer.layout(prompt)
            if len(positions) != self.trainer.length:
                raise ExplabError("soft_prompt: the placeholder tokens moved inside this prompt's chat template")
            request = self.trainer.request(prompt)
            out.append({"messages": [m.model_dump() for m in request.messages],
                        "params": self.params("respond", prompt),
                        "interventions": self.trainer.steer_specs(self.prefix, ids, positions)})
        return out

    def respond_all(self, prompts: list[str]) -> list[str]:
        return [r.completions[0].text for r in self.hooked.generate(self.requests(prompts))]

    def info(self) -> dict[str, Any]:
        return {k: float(v) for k, v in self.stats.items()}
