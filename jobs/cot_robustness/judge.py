"""The judge LLM: is the reference answer in an output (Correct/Incorrect), and does a unit of
reasoning doubt what came before it (Yes/No). Output that is neither counts as Incorrect / No and
is recorded as ``unparsable``.

Two rules read the answer judge's reply: ``strict`` (the authors', the default) counts only a reply
that is exactly "Correct" (surrounding whitespace aside); the lenient rule reads the first word
case-insensitively ("**correct**." counts). Both verdicts are recorded so the share of replies the
rule changes is known.

``check: exact`` (an option; the paper always asks the judge LLM) replaces the answer judge by a
rule for sets with numeric answers: the answer an output states (its last ``\\boxed{…}``, else its
last number) must equal the reference. It is for models too small to grade (SmolLM2-135M); the
doubt judge stays an LLM.
"""

from __future__ import annotations

import re
from typing import Any

from jobs.cot_robustness.traces import final_answer, split_steps

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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


def stated_answer(text: str) -> str:
    """The answer ``text`` states: the content of its last ``\\boxed{…}`` (nested braces kept), else
    its last number (thousands commas dropped); ``""`` when it has neither."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def exact_verdict(text: str, reference: str) -> str:
    """``correct`` when the answer ``text`` states equals ``reference`` (as numbers when both are
    numbers, else as case-insensitive text without spaces), else ``incorrect``."""
    stated = stated_answer(text)
    a, b = _number(stated), _number(reference)
    if a is not None and b is not None:
        return "correct" if a == b else "incorrect"
    same = "".join(stated.split()).lower() == "".join(reference.split()).lower() and bool(stated.strip())
    return "correct" if same else "incorrect"


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
