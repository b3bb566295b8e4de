"""LLM roles (base LLM, simulated user, judge): a shared Generator server, or a scripted stand-in.

Every role is an object with the `ServerHandle.generate(requests)` interface, picked by config:
``{kind: llm, model: ...}`` is ``ctx.model(spec, "generator", server)`` (vLLM or transformers, shared
by every task and trial), ``{kind: scripted}`` is one of the deterministic implementations below.
The scripted roles read the same requests an LLM gets (the labelled lines of ``prompts/*.yaml``)
and act on them by rule, so the whole pipeline runs offline and a test knows what to expect:

- `ScriptedLLM` (base LLM / history candidates): follows principle instructions found in its
  system or user message, imitates the style markers shared by the preferred example responses in
  its context (in-context learning), and, asked for a system prompt (``<prompt>`` tags), writes the
  instructions of the principles whose markers separate preferred from rejected examples.
- `ScriptedUser`: writes a prompt in its attributes' voice about the given topic; picks the
  candidate with the most preferred and fewest disliked principle markers (ties: seeded draw).
- `ScriptedJudge`: scores one principle by whether the response carries that principle's markers.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from explab.config import Section
from explab.errors import ConfigError, ExplabError
from explab.models import ModelSpec
from explab.seeds import derive_seed
from explab.servers import (
    Completion,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ServerOptions,
    as_requests,
)
from jobs.apm.benchmark import Vocab


class RoleConfig(Section):
    """One LLM role: ``kind: llm`` with a model on a shared Generator server, or ``kind: scripted``."""

    kind: Literal["llm", "scripted"] = "llm"
    model: ModelSpec | None = None
    server: ServerOptions = ServerOptions()
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    imitation_threshold: float = Field(0.3, gt=0.0, le=1.0)  # scripted base LLM: share of examples to imitate

    @model_validator(mode="after")
    def _needs_model(self) -> RoleConfig:
        if self.kind == "llm" and self.model is None:
            raise ValueError("a role with kind 'llm' needs `model` (e.g. model: {name: tiny:llama}), "
                             "or use kind: scripted")
        return self

    @property
    def label(self) -> str:
        return self.model.name if self.kind == "llm" and self.model is not None else "scripted"

    def params(self, seed: int | None, *, n: int = 1, max_tokens: int | None = None,
               temperature: float | None = None) -> dict[str, Any]:
        return {"temperature": self.temperature if temperature is None else temperature, "top_p": self.top_p,
                "max_tokens": max_tokens or self.max_tokens, "n": n, "seed": seed}


def make_role(cfg: RoleConfig, ctx: Any, role: Literal["llm", "user", "judge"], vocab: Vocab,
              judge_scale: tuple[int, int] = (1, 5)) -> Any:
    """The generator-like object for a role (a shared-server handle or a scripted implementation)."""
    if cfg.kind == "llm":
        return ctx.model(cfg.model, "generator", cfg.server)
    if role == "user":
        return ScriptedUser(vocab)
    if role == "judge":
        return ScriptedJudge(vocab, judge_scale)
    return ScriptedLLM(vocab, cfg.imitation_threshold)


# ---- request helpers --------------------------------------------------------------------------
def chat(user: str, system: str = "", params: dict[str, Any] | None = None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": user}]
    return {"messages": messages, "params": params or {}}


def generate_texts(llm: Any, requests: list[dict[str, Any]]) -> list[list[str]]:
    """Texts of all completions, one list per request (one batched call)."""
    if not requests:
        return []
    return [[c.text for c in r.completions] for r in llm.generate(requests)]


def fill(template: str, field: str, **values: Any) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"prompt template {field}: bad or unknown field {err}: use only "
                          f"{', '.join('{' + k + '}' for k in values)}") from None


# ---- scripted roles ----------------------------------------------------------------------------
_EXAMPLE = re.compile(r"<example>(.*?)</example>", re.S)
_RESPONSE = re.compile(r"<response ([A-Z])>\n?(.*?)\n?</response \1>", re.S)
_PROMPT_TAG = re.compile(r"<prompt>(.*?)</prompt>", re.S)


def has_marker(text: str, markers: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(m.lower() in low for m in markers)


def _label(text: str, label: str) -> str | None:
    m = re.search(rf"^{re.escape(label)}[ \t]*(.*)$", text, re.M)
    return m.group(1).strip() if m else None


def _section(block: str, label: str, stops: tuple[str, ...]) -> str:
    start = block.find(label)
    if start < 0:
        return ""
    text = block[start + len(label):]
    ends = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(ends)].strip() if ends else text.strip()


class ScriptedGenerator:
    """Base of the scripted roles: the `ServerHandle.generate` interface over a rule ``complete``."""

    name = "scripted"

    def describe(self, refresh: bool = False) -> dict[str, Any]:
        return {"kind": "scripted", "model": self.name}

    def generate(self, requests: Any, params: SamplingParams | dict | None = None) -> list[GenerationResult]:
        out = []
        for request in as_requests(requests, params):
            comps = []
            for j in range(request.params.n):
                text = self.complete(request, j)
                comps.append(Completion(text=text, token_ids=[], finish_reason="stop"))
            out.append(GenerationResult(prompt_token_ids=[], completions=comps))
        return out

    def complete(self, request: GenerationRequest, sample: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _messages(request: GenerationRequest) -> tuple[str, str]:
        if request.messages is None:
            return "", request.prompt or ""
        system = "\n".join(m.content for m in request.messages if m.role == "system")
        users = [m.content for m in request.messages if m.role == "user"]
        return system, users[-1] if users else ""

    @staticmethod
    def _rng(request: GenerationRequest, sample: int, *parts: Any) -> np.random.Generator:
        system, user = ScriptedGenerator._messages(request)
        seed = request.params.seed if request.params.seed is not None else derive_seed(system, user)
        return np.random.default_rng(derive_seed(seed, sample, *parts))


class ScriptedLLM(ScriptedGenerator):
    """A deterministic instruction-following, in-context-imitating stand-in for the base LLM."""

    name = "scripted:llm"

    def __init__(self, vocab: Vocab, imitation_threshold: float = 0.3):
        self.principles = vocab.principles
        self.threshold = imitation_threshold

    def complete(self, request: GenerationRequest, sample: int) -> str:
        system, user = self._messages(request)
        if "<prompt>" in user:
            return self._write_system_prompt(user, sample)
        outside = _EXAMPLE.sub(" ", user)
        request_line = [m for m in re.findall(r"^Request:[ \t]*(.*)$", outside, re.M) if m.strip()]
        question = request_line[-1].strip() if request_line else " ".join(outside.split())
        context = f"{system}\n{outside}".lower()
        preferred = [_section(b, "Preferred response:", ("Rejected response:",)) for b in _EXAMPLE.findall(user)]
        shown = []
        for p in self.principles:
            instructed = p.instruction.lower() in context
            imitated = bool(preferred) and np.mean([has_marker(t, p.markers) for t in preferred]) >= self.threshold
            if (instructed or imitated) and p.markers:
                shown.append(p.markers[0])
        return " ".join([*shown, f"About: {question[:120]} Here is a helpful answer."])

    def _write_system_prompt(self, user: str, sample: int) -> str:
        blocks = _EXAMPLE.findall(user)
        chosen = [_section(b, "Preferred response:", ("Rejected response:",)) for b in blocks]
        rejected = [_section(b, "Rejected response:", ("Preferred response:",)) for b in blocks]
        margins = []
        for p in self.principles:
            if not chosen:
                break
            f_c = np.mean([has_marker(t, p.markers) for t in chosen])
            f_r = np.mean([has_marker(t, p.markers) for t in rejected]) if rejected else 0.0
            if f_c - f_r > 0:
                margins.append((f_c - f_r, p.instruction))
        margins.sort(key=lambda m: -m[0])
        keep = max(1, len(margins) - sample) if margins else 0  # sample j drops the j weakest
        body = " ".join(instr for _, instr in margins[:keep]) or "You are a helpful assistant."
        return f"<prompt>{body}</prompt>"


class ScriptedUser(ScriptedGenerator):
    """A deterministic simulated user: writes prompts in its attributes' voice and picks by preference."""

    name = "scripted:user"

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.attributes = {a.name: a for a in vocab.attributes}
        self.principles = {p.name: p for p in vocab.principles}

    def complete(self, request: GenerationRequest, sample: int) -> str:
        _, user = self._messages(request)
        if _label(user, "Question idea:") is not None:
            return self._write(request, user, sample)
        if _label(user, "Preferred traits:") is not None:
            return self._choose(request, user, sample)
        raise ExplabError("scripted user: its request has neither 'Question idea:' nor 'Preferred traits:' lines: "
                          "keep the labelled lines of prompts/user.yaml")

    def _write(self, request: GenerationRequest, user: str, sample: int) -> str:
        names = [n.strip() for n in (_label(user, "Attributes:") or "").split(",") if n.strip()]
        question = _label(user, "Question idea:") or ""
        rng = self._rng(request, sample, "write")
        voices = [str(rng.choice(self.attributes[n].voice)) for n in names if n in self.attributes]
        return " ".join([*voices, question])

    def _traits(self, user: str, label: str) -> list[str]:
        line = _label(user, label) or ""
        return [n for n in re.findall(r"([A-Za-z_][\w-]*) \(", line) if n in self.principles]

    def _choose(self, request: GenerationRequest, user: str, sample: int) -> str:
        liked = [self.principles[n] for n in self._traits(user, "Preferred traits:")]
        disliked = [self.principles[n] for n in self._traits(user, "Disliked traits:")]
        candidates = _RESPONSE.findall(user)
        if not candidates:
            raise ExplabError("scripted user: no <response X> blocks in its choice request: keep prompts/user.yaml's "
                              "candidate template")
        utility = [sum(has_marker(t, p.markers) for p in liked) - sum(has_marker(t, p.markers) for p in disliked)
                   for _, t in candidates]
        best = [letter for (letter, _), u in zip(candidates, utility, strict=True) if u == max(utility)]
        return str(self._rng(request, sample, "choose").choice(best))


class ScriptedJudge(ScriptedGenerator):
    """A deterministic principle-wise judge: the top score if the principle's markers are present, else the lowest."""

    name = "scripted:judge"

    def __init__(self, vocab: Vocab, scale: tuple[int, int] = (1, 5)):
        self.principles = {p.name: p for p in vocab.principles}
        self.low, self.high = scale

    def complete(self, request: GenerationRequest, sample: int) -> str:
        _, user = self._messages(request)
        name = _label(user, "Principle:")
        match = re.search(r"<response>\n?(.*?)\n?</response>", user, re.S)
        if name not in self.principles or match is None:
            raise ExplabError("scripted judge: its request lacks a known 'Principle:' line or a <response> block: "
                              "keep the labelled lines of prompts/judge.yaml")
        return f"Score: {self.high if has_marker(match.group(1), self.principles[name].markers) else self.low}"


def extract_prompt(text: str) -> str:
    """A system prompt written by an optimizer LLM: the text inside <prompt> tags, else the whole text."""
    found = _PROMPT_TAG.findall(text)
    return (found[-1] if found else text).strip()
