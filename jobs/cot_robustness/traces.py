"""Reasoning traces: the think block, steps, normalized timesteps, the cut at τ.

Two segmentations (``SEGMENTATIONS``): ``authors`` (the default) splits at every two-character
string "\n\n" exactly as the authors' code does, so "\n\n\n" leaves a step that starts with a
newline, "\n\n\n\n" an empty step, and spaces before a blank line stay in their step;
``blank_lines`` treats a run of blank lines (with spaces, tabs or ``\r\n``) as one separator.

Everything here is pure and byte-exact: ``Reasoning.head + body + tail`` is the model's output and
``Steps.text()`` is the body it was split from, under either segmentation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from explab.errors import ExplabError

Segmentation = Literal["authors", "blank_lines"]
SEGMENTATIONS: tuple[str, ...] = ("authors", "blank_lines")
AUTHORS_SEP = "\n\n"

OPEN_TAGS = ("<think>", "<thought>")
CLOSE_TAGS = ("</think>", "</thought>")
# a blank line: a line break, then one or more lines holding only spaces/tabs (\n or \r\n endings)
_BLANK_RUN = re.compile(r"(?:[ \t]*\r?\n){2,}")


@dataclass(frozen=True)
class Reasoning:
    """A model output split as ``head`` (up to and including the opening tag), ``body`` (the
    reasoning) and ``tail`` (the closing tag and the answer after it)."""

    head: str
    body: str
    tail: str

    @property
    def closed(self) -> bool:
        return any(self.tail.startswith(tag) for tag in CLOSE_TAGS)


def extract_reasoning(output: str) -> Reasoning:
    """The text inside ``<think>…</think>`` (or ``<thought>…</thought>``), as the authors cut it.

    The reasoning ends at the first closing tag (the whole output when there is none) and starts
    after the last opening tag before that point (at the start when there is none, as when the chat
    template already opened the block).
    """
    end = len(output)
    for tag in CLOSE_TAGS:
        if (i := output.find(tag)) >= 0:
            end = i
            break
    start = 0
    for tag in OPEN_TAGS:
        if (i := output.rfind(tag, 0, end)) >= 0:
            start = i + len(tag)
            break
    return Reasoning(output[:start], output[start:end], output[end:])


def final_answer(output: str) -> str:
    """The answer part of an output: the text after the last closing tag (all of it without one)."""
    cut = max((output.rfind(tag) + len(tag) for tag in CLOSE_TAGS if tag in output), default=0)
    return output[cut:].strip()


@dataclass(frozen=True)
class Steps:
    """A reasoning body as steps: ``lead + steps[0] + seps[0] + steps[1] + seps[1] + …``.

    ``seps[i]`` is the separator after step ``i`` (``""`` or trailing whitespace for the last).
    Under ``blank_lines`` a step always holds text, ``seps[i]`` is the blank-line run after it and
    ``lead`` the whitespace before the first step; under ``authors`` ``lead`` is ``""``, every
    separator is "\n\n" (the last ``""``), and a step may be empty or start with newlines.
    """

    lead: str
    steps: tuple[str, ...]
    seps: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.steps)

    def text(self) -> str:
        return self.lead + "".join(s + p for s, p in zip(self.steps, self.seps, strict=True))

    def prefix(self, count: int) -> str:
        """The text through step ``count - 1``, without the separator after it."""
        if not 0 <= count <= len(self.steps):
            raise ExplabError(f"prefix of {count} steps asked from a trace of {len(self.steps)} steps")
        if count == 0:
            return self.lead
        return self.lead + "".join(s + p for s, p in zip(self.steps[: count - 1], self.seps, strict=False)) + \
            self.steps[count - 1]

    def sep_after(self, index: int, default: str = "\n\n") -> str:
        """The separator that followed step ``index`` in the trace (``default`` when it was the last)."""
        return self.seps[index] if index < len(self.steps) - 1 else default


def split_steps(body: str, segmentation: Segmentation = "authors") -> Steps:
    """Split a reasoning body into steps: ``authors`` (default) at every "\n\n", as the authors'
    ``str.split("\n\n")``; ``blank_lines`` at blank lines (a run of them is one separator)."""
    if segmentation == "authors":
        parts = body.split(AUTHORS_SEP)
        return Steps("", tuple(parts), (AUTHORS_SEP,) * (len(parts) - 1) + ("",))
    if segmentation != "blank_lines":
        raise ExplabError(f"unknown segmentation {segmentation!r}: use one of {', '.join(SEGMENTATIONS)}")
    return _split_blank_lines(body)


def _split_blank_lines(body: str) -> Steps:
    parts = _BLANK_RUN.split(body)
    seps_found = _BLANK_RUN.findall(body)
    lead, steps, seps = "", [], []
    pending = ""  # whitespace not yet attached: goes to the lead or to the previous step's separator
    for i, chunk in enumerate(parts):
        if chunk.strip():
            if steps:
                seps[-1] += pending
            else:
                lead += pending
            steps.append(chunk)
            seps.append("")
            pending = ""
        else:
            pending += chunk
        if i < len(seps_found):
            pending += seps_found[i]
    if steps:
        seps[-1] += pending
    else:
        lead += pending
    return Steps(lead, tuple(steps), tuple(seps))


def timesteps(steps: Steps) -> list[float]:
    """Normalized timestep of each step: characters of the steps through it / characters of all steps
    (separators not counted; under ``authors`` a step's leading newlines and spaces are counted)."""
    lengths = [len(s) for s in steps.steps]
    total = sum(lengths)
    if total == 0:
        return [0.0] * len(lengths)
    out, running = [], 0
    for n in lengths:
        running += n
        out.append(running / total)
    return out


@dataclass(frozen=True)
class Cut:
    """The prefix kept at a target timestep: steps ``0 .. count-1``; ``index = count - 1`` is the last."""

    target: float
    actual: float
    count: int

    @property
    def index(self) -> int:
        return self.count - 1


def check_timestep(tau: float) -> float:
    if not 0.0 < tau < 1.0:
        raise ExplabError(f"timestep τ={tau!r} is outside (0, 1): use a fraction of the trace such as 0.1 … 0.9")
    return float(tau)


def cut_at(steps: Steps, tau: float, min_steps: int = 2) -> Cut:
    """The prefix through the step whose timestep is nearest ``tau`` (the earlier on a tie), with at
    least ``min_steps`` steps. A trace of fewer than ``min_steps`` steps cannot be cut: ExplabError."""
    tau = check_timestep(tau)
    if min_steps < 1:
        raise ExplabError(f"min_steps={min_steps} must be at least 1")
    if len(steps) < min_steps:
        raise ExplabError(f"a trace of {len(steps)} steps cannot be cut with at least {min_steps} steps")
    ts = timesteps(steps)
    nearest = min(range(len(ts)), key=lambda i: abs(ts[i] - tau))
    count = min(max(nearest + 1, min_steps), len(ts))
    return Cut(target=tau, actual=ts[count - 1], count=count)
