"""The judge LLM: is the reference answer in an output (Correct/Incorrect), and does a unit of
reasoning doubt what came before it (Yes/No). Output that is neither counts as Incorrect / No and
is recorded as ``unparsable``.

Two rules read the answer judge's reply: ``strict`` (the authors', the default) counts only a reply
that is exactly "Correct" (surrounding whitespace aside); the lenient rule reads the first word
case-insensitively ("**correct**." counts). Both verdicts are recorded so the share of replies the
rule changes is known.
"""

from __future__ import annotations

import re
from typing import Any

from jobs.cot_robustness.traces import final_answer, split_steps

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]+")


def answer_messages(prompts: Any, question: str, reference: str, output: str, max_chars: int) -> list[dict]:
    """The answer judge's messages: the question, the reference and the end of the output's answer."""
    return prompts.answer.messages(question=question, reference=reference, answer=final_answer(output)[-max_chars:])


def _first_word(text: str) -> str:
    m = _WORD.search(text)
    return m.group(0).lower() if m else ""


def parse_verdict(text: str, strict: bool = True) -> str:
    """``correct`` / ``incorrect`` / ``unparsable`` from the judge's reply.

    Lenient: the first word, case-insensitively. Strict (the authors'): ``correct`` only for the
    exact reply "Correct"; a reply the lenient rule reads as correct is ``incorrect`` here.
    """
    word = _first_word(text)
    lenient = word if word in ("correct", "incorrect") else "unparsable"
    if not strict:
        return lenient
    if text.strip() == "Correct":
        return "correct"
    return "incorrect" if lenient == "correct" else lenient


def parse_doubt(text: str) -> str:
    """``yes`` / ``no`` from the doubt judge's first word, else ``unparsable``."""
    word = _first_word(text)
    return word if word in ("yes", "no") else "unparsable"


def units(text: str, unit: str, max_units: int, max_chars: int, *, from_end: bool = False) -> list[str]:
    """Text units for the doubt judge: sentences (within steps) or steps; the first ``max_units``
    (the last ones with ``from_end``), each cut to ``max_chars`` characters."""
    steps = [s.strip() for s in split_steps(text, "blank_lines").steps]
    if unit == "step":
        found = steps
    elif unit == "sentence":
        found = [s.strip() for step in steps for s in _SENTENCE_END.split(step) if s.strip()]
    else:
        raise ValueError(f"unknown doubt unit {unit!r}: use sentence or step")
    found = found[-max_units:] if from_end else found[:max_units]
    return [u[:max_chars] for u in found]


def doubt_messages(prompts: Any, unit: str) -> list[dict]:
    return prompts.doubt.messages(unit=unit.replace("\n", " "))


def judge_params(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0.0, "max_tokens": max_tokens}


def ask(judge: Any, messages: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy judge replies to a list of message lists (one server call, batched there)."""
    if not messages:
        return []
    results = judge.generate([{"messages": m, "params": judge_params(max_tokens)} for m in messages])
    return [r.completions[0].text for r in results]


def doubt_flags(judge: Any, prompts: Any, unit_lists: list[list[str]], max_tokens: int) -> list[list[str]]:
    """Per text, the doubt judge's verdict (yes/no/unparsable) on each of its units."""
    flat = [doubt_messages(prompts, u) for us in unit_lists for u in us]
    replies = iter(ask(judge, flat, max_tokens))
    return [[parse_doubt(next(replies)) for _ in us] for us in unit_lists]
