"""Evaluation questions in the MMLU-Pro schema: loading through Ray Data, validation, prompts, scoring.

MMLU-Pro rows hold ``question_id``, ``question``, ``options`` (up to 10, letters A-J), ``answer``
(the letter), ``answer_index``, ``category`` (and ``cot_content``, ``src``). ``synthetic:mmlu_pro``
is an arithmetic set in the same schema for tests and the tiny config.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from explab.errors import ExplabError
from jobs.polylogue.catalog import prompts

LETTERS = "ABCDEFGHIJ"


def synthetic_mmlu_pro(n: int = 40, seed: int = 0, n_options: int = 10) -> list[dict[str, Any]]:
    """Arithmetic multiple-choice questions in the MMLU-Pro schema (deterministic in ``seed``)."""
    if not 2 <= n_options <= len(LETTERS):
        raise ExplabError(f"synthetic:mmlu_pro n_options={n_options}: use 2..{len(LETTERS)}")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        op = str(rng.choice(["+", "-", "*"]))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = set()
        while len(wrong) < n_options - 1:
            cand = value + int(rng.integers(-25, 26))
            if cand != value:
                wrong.add(cand)
        options = [str(v) for v in [value, *sorted(wrong)]]
        order = rng.permutation(n_options)
        options = [options[j] for j in order]
        index = int(np.flatnonzero(order == 0)[0])
        rows.append({"question_id": i, "question": f"What is {a} {op} {b}?", "options": options,
                     "answer": LETTERS[index], "answer_index": index, "cot_content": "",
                     "category": "arithmetic", "src": "synthetic"})
    return rows


def validate_row(row: dict[str, Any], where: int) -> dict[str, Any]:
    """One MMLU-Pro row, checked; a malformed row is one `ExplabError` line naming it and the field."""
    qid = row.get("question_id", where)

    def bad(field: str, why: str) -> ExplabError:
        return ExplabError(f"dataset row {where} (question_id={qid!r}): field {field!r} {why}: "
                           "give rows in the MMLU-Pro schema (question, options, answer letter)")

    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("question", "must be a non-empty string")
    options = row.get("options")
    if isinstance(options, np.ndarray):
        options = options.tolist()
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
        raise bad("options", f"must be a list of 2-{len(LETTERS)} strings")
    if not all(isinstance(o, str) for o in options):
        raise bad("options", "must hold only strings")
    answer = row.get("answer")
    if not isinstance(answer, str) or answer not in LETTERS[: len(options)]:
        raise bad("answer", f"must be one of the option letters {LETTERS[: len(options)]}, got {answer!r}")
    index = row.get("answer_index")
    if index is not None and not isinstance(index, bool) and int(index) != LETTERS.index(answer):
        raise bad("answer_index", f"is {index} but answer {answer!r} is option {LETTERS.index(answer)}")
    return {"question_id": str(qid), "question": question, "options": list(options), "answer": answer,
            "category": str(row.get("category") or "general")}


def load_questions(ctx: Any, spec: str, split: str, n: int, categories: list[str] | None,
                   options: dict[str, Any]) -> list[dict[str, Any]]:
    """``n`` validated questions, sampled with the run's seed, read through Ray Data (a synthetic set is
    generated with ``n`` rows and kept in order)."""
    kwargs = dict(options)
    if spec.startswith("synthetic:"):
        kwargs.setdefault("n", n)
    else:
        kwargs["split"] = split
    ds = ctx.dataset(spec, **kwargs)
    if categories:
        wanted = set(categories)
        ds = ds.filter(lambda r: r.get("category") in wanted)
    rows = ds.take_all()  # MMLU-Pro's test split is 12k short rows: sample them here, with the run's seed
    if len(rows) < 2:
        raise ExplabError(f"dataset {spec} gave {len(rows)} questions"
                          f"{' in categories ' + str(categories) if categories else ''}: need at least 2")
    rows.sort(key=_id_order)  # Ray Data does not promise an order
    pick = np.random.default_rng(ctx.seed).permutation(len(rows))[:n]
    rows = [rows[i] for i in sorted(pick)] if spec.startswith("synthetic:") else [rows[i] for i in pick]
    return [validate_row(r, i) for i, r in enumerate(rows)]


def _id_order(row: dict[str, Any]) -> tuple[int, int, str]:
    qid = row.get("question_id")
    return (0, int(qid), "") if isinstance(qid, (int, np.integer)) else (1, 0, str(qid))


def question_prompt(row: dict[str, Any]) -> str:
    """The MMLU-Pro chain-of-thought prompt of one question (one user turn)."""
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    return prompts().mmlu_pro.format(category=row["category"], question=row["question"], options=opts)


def extract_answer(text: str, n_options: int = 10) -> str | None:
    """The answer letter as MMLU-Pro's evaluation extracts it: the first "answer is (X)", else the
    last "Answer: X", else the last standalone letter; only the question's option letters count."""
    valid = f"[{LETTERS[0]}-{LETTERS[n_options - 1]}]"
    for pattern, flags in ((rf"answer is \(?({valid})\)?", 0), (rf".*[aA]nswer:\s*\(?({valid})\)?", re.DOTALL),
                           (rf"\b({valid})\b(?!.*\b{valid}\b)", re.DOTALL)):
        match = re.search(pattern, text, flags)
        if match:
            return match.group(1)
    return None
