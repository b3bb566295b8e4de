"""The seven interventions on a cut reasoning prefix (benign, neutral, adversarial).

Each returns a `Perturbation`: the perturbed reasoning the evaluated model will continue, and what
the intervention wrote. The two neutral ones are local (a pool paragraph, random characters); the
other five ask the intervention LLM: `llm_request` builds the request, `apply_llm` places its output.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explab.errors import ExplabError
from jobs.cot_robustness.traces import Cut, Steps

INTERVENTIONS: dict[str, str] = {
    "complete_step": "benign",  # last step → the correct next step (LLM, greedy)
    "rewrite_trace": "benign",  # whole prefix → a paraphrase keeping all information (LLM, greedy)
    "add_random_text": "neutral",  # last step → an unrelated encyclopedic paragraph
    "insert_random_characters": "neutral",  # random characters inserted into the last step
    "wrong_reasoning": "adversarial",  # last step → a plausible but wrong next step (LLM)
    "wrong_fact": "adversarial",  # a fabricated false statement appended after the prefix (LLM)
    "unrelated": "adversarial",  # last step → the start of a chain of thought on a random topic (LLM)
}
LLM_INTERVENTIONS = ("complete_step", "rewrite_trace", "wrong_reasoning", "wrong_fact", "unrelated")
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


def check_name(name: str) -> str:
    if name not in INTERVENTIONS:
        raise ExplabError(f"unknown intervention {name!r}: use one of {', '.join(INTERVENTIONS)}")
    return name


@dataclass(frozen=True)
class Perturbation:
    """``prefix``: the perturbed reasoning body; ``text``: what the intervention wrote; ``action``:
    replace_last / edit_last / append / rewrite; ``step``: the index of the step it replaced or edited."""

    prefix: str
    text: str
    action: str
    step: int | None
    meta: dict[str, Any] = field(default_factory=dict)


def before_last(steps: Steps, cut: Cut) -> str:
    """The kept text that precedes the cut's last step (lead, earlier steps and their separators)."""
    return steps.prefix(cut.index) + (steps.seps[cut.index - 1] if cut.index > 0 else "")


def replace_last(steps: Steps, cut: Cut, new_step: str, **meta: Any) -> Perturbation:
    return Perturbation(before_last(steps, cut) + new_step, new_step, "replace_last", cut.index, meta)


def append_after(steps: Steps, cut: Cut, statement: str, **meta: Any) -> Perturbation:
    sep = steps.sep_after(cut.index)
    return Perturbation(steps.prefix(cut.count) + sep + statement, statement, "append", None, meta)


def insert_random_characters(text: str, ratio: float, rng: np.random.Generator) -> tuple[str, list[int]]:
    """``text`` with characters from ALPHABET inserted at random places, as the authors do: the ratio
    is clamped to [0, 1] and max(1, round(ratio · len(text))) characters go in (none at ratio 0).

    Returns the new text and the positions of the inserted characters in it (sorted).
    """
    if ratio < 0:
        raise ExplabError(f"random-character ratio {ratio!r} is negative: use a ratio ≥ 0 (the paper: 0.5)")
    ratio = min(float(ratio), 1.0)
    count = 0 if ratio == 0.0 else max(1, round(ratio * len(text)))
    slots = np.sort(rng.integers(0, len(text) + 1, size=count))  # insertion points in the original
    chars = rng.choice(list(ALPHABET), size=count)
    out, positions, last = [], [], 0
    for k, (slot, ch) in enumerate(zip(slots.tolist(), chars.tolist(), strict=True)):
        out.append(text[last:slot])
        positions.append(slot + k)
        out.append(ch)
        last = slot
    out.append(text[last:])
    return "".join(out), positions


def choose_paragraph(pool: list[str], seed: int) -> tuple[int, str]:
    if not pool:
        raise ExplabError("the paragraph pool is empty: check paragraphs.spec and paragraphs.min_chars")
    index = int(np.random.default_rng(seed).integers(len(pool)))
    return index, pool[index]


def perturb_local(name: str, steps: Steps, cut: Cut, *, seed: int, ratio: float = 0.5,
                  paragraph: str | None = None, pool_index: int | None = None) -> Perturbation:
    """add_random_text (``paragraph`` replaces the last step) or insert_random_characters."""
    if name == "add_random_text":
        if paragraph is None:
            raise ExplabError("add_random_text needs a paragraph from the pool")
        return replace_last(steps, cut, paragraph, pool_index=pool_index)
    if name == "insert_random_characters":
        edited, positions = insert_random_characters(steps.steps[cut.index], ratio, np.random.default_rng(seed))
        p = replace_last(steps, cut, edited, inserted=len(positions), positions=positions, ratio=ratio)
        return Perturbation(p.prefix, p.text, "edit_last", p.step, p.meta)
    raise ExplabError(f"{check_name(name)!r} is not a local intervention: it needs the intervention LLM")


def llm_messages(name: str, prompts: Any, question: str, steps: Steps, cut: Cut, topic: str = "",
                 opening: str = "") -> list[dict]:
    """The chat messages asking the intervention LLM for ``name``'s text.

    As the authors show it: ``{reasoning_so_far}`` (the steps before the replaced one) and
    ``{prefix}`` (every kept step) join the steps with single newlines; ``{trace}`` (what
    rewrite_trace paraphrases) joins them with blank lines. ``question`` should carry the evaluated
    model's step-by-step instruction (`generation.task_text`).
    """
    if name not in LLM_INTERVENTIONS:
        raise ExplabError(f"{check_name(name)!r} does not use the intervention LLM")
    prompt = prompts.interventions[name]
    kept = steps.steps[: cut.count]
    return prompt.messages(question=question, reasoning_so_far="\n".join(kept[:-1]), prefix="\n".join(kept),
                           trace="\n\n".join(kept), topic=topic, opening=opening)


def rejoin_paraphrase(text: str) -> str:
    """A paraphrase as the authors place it: split at "\n\n", steps stripped, empty ones dropped,
    joined with blank lines (so the evaluated model sees paragraphs whatever the LLM wrote)."""
    return "\n\n".join(part.strip() for part in text.split("\n\n") if part.strip())


def choose_topic(topics: tuple[str, ...] | list[str], seed: int) -> str:
    return topics[int(np.random.default_rng(seed).integers(len(topics)))]


def apply_llm(name: str, steps: Steps, cut: Cut, output: str, *, opening: str = "", **meta: Any) -> Perturbation:
    """Place the intervention LLM's ``output`` (stripped) the way ``name`` says. For ``unrelated``,
    ``opening`` is the text the LLM's reply was seeded with (its assistant prefix) and goes first."""
    text = output.strip()
    if name == "unrelated" and opening:
        text = opening + ("" if opening.endswith((" ", "\n")) or not text else " ") + text
    if name in ("complete_step", "wrong_reasoning", "unrelated"):
        return replace_last(steps, cut, text, **meta)
    if name == "wrong_fact":
        return append_after(steps, cut, text, **meta)
    if name == "rewrite_trace":
        text = rejoin_paraphrase(text)
        return Perturbation(steps.lead + text, text, "rewrite", None, meta)
    raise ExplabError(f"{check_name(name)!r} does not use the intervention LLM")


def append_marker(prefix: str, marker: str) -> str:
    """The forced-doubt resume point: ``marker`` in a new paragraph after the perturbed prefix."""
    if not marker:
        return prefix
    return prefix + ("" if not prefix or prefix.endswith(("\n", " ")) else "\n\n") + marker
