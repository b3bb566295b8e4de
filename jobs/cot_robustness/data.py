"""Task items and the paragraph pool, through Ray Data.

- `normalize_item` turns a dataset row into ``{item_id, domain, question, reference_answer}``
  (multiple-choice sets get lettered options, shuffled per item with the seed);
- ``synthetic:cot_arithmetic`` / ``synthetic:cot_logic``: items with checkable answers (tests, tiny);
  ``synthetic:cot_word_problems`` (one-step word problems) and ``synthetic:cot_additions`` ("What
  is 3 + 4?"): small numbers, for small models (``small.yaml``);
- `paragraph_rows` splits encyclopedic documents into paragraphs of at least ``min_chars``.

File specs (``jsonl:``, ``parquet:``, ``csv:``) with a relative path that does not exist from the
working directory are read from this job's folder (``jsonl:data/paragraphs.json`` is packaged).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from explab.errors import ExplabError

JOB_DIR = Path(__file__).parent
LETTERS = "ABCDEFGHIJ"


def resolve_spec(spec: str) -> str:
    scheme, sep, rest = spec.partition(":")
    if sep and scheme in ("jsonl", "parquet", "csv"):
        path = Path(rest).expanduser()
        if not path.is_absolute() and not path.exists() and (JOB_DIR / path).exists():
            return f"{scheme}:{JOB_DIR / path}"
    return spec


def _text(row: dict[str, Any], field: str, spec: str, what: str) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise ExplabError(f"dataset {spec}: an item has no {what} in field {field!r} (its fields: {fields}): "
                          f"set the dataset's {what.replace(' ', '_')}_field or fix the item")
    return str(value)


def normalize_item(row: dict[str, Any], *, entry: dict[str, Any], seed: int) -> dict[str, Any]:
    """A dataset row as a task item (a malformed row is an ExplabError naming the field)."""
    spec = entry["spec"]
    question = _text(row, entry["question_field"], spec, "question")
    if entry["id_field"]:
        key = _text(row, entry["id_field"], spec, "id")
    else:
        key = hashlib.sha1(question.encode()).hexdigest()[:12]
    item_id = f"{entry['domain']}/{key}"
    if entry["choices_fields"]:
        options = [_text(row, f, spec, "choice") for f in entry["choices_fields"]]
        if len(options) > len(LETTERS):
            raise ExplabError(f"dataset {spec}: {len(options)} choices, at most {len(LETTERS)} are supported")
        order = np.random.default_rng(
            int(hashlib.sha1(f"{seed}/{item_id}".encode()).hexdigest()[:8], 16)).permutation(len(options))
        lines = [f"({LETTERS[j]}) {options[i]}" for j, i in enumerate(order)]
        correct = int(np.flatnonzero(order == 0)[0])
        question = question.rstrip() + "\n\n" + "\n".join(lines)
        reference = f"({LETTERS[correct]}) {options[0]}"
    else:
        reference = _text(row, entry["answer_field"], spec, "answer")
    return {"item_id": item_id, "domain": entry["domain"], "question": question, "reference_answer": reference}


def paragraph_rows(row: dict[str, Any], *, field: str, min_chars: int, spec: str) -> list[dict[str, str]]:
    """The paragraphs (split at blank lines) of one document with at least ``min_chars`` characters."""
    text = _text(row, field, spec, "text")
    return [{"paragraph": p.strip()} for p in text.split("\n\n") if len(p.strip()) >= min_chars]


# ---- synthetic items with checkable answers ---------------------------------------------------


def arithmetic_items(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Two-operation integer arithmetic: ``a op1 b op2 c`` with the usual precedence."""
    rng = np.random.default_rng(seed)
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}
    rows = []
    for i in range(n):
        a, b, c = (int(v) for v in rng.integers(2, 30, size=3))
        o1, o2 = (str(o) for o in rng.choice(list(ops), size=2))
        if o2 == "×" and o1 != "×":
            value = ops[o1](a, b * c)
        else:
            value = ops[o2](ops[o1](a, b), c)
        rows.append({"id": f"arith-{i}", "question": f"Compute {a} {o1} {b} {o2} {c}.", "answer": str(value)})
    return rows


_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")


def logic_items(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Orderings from pairwise comparisons: who is the tallest (or shortest) of four people?"""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        people = [str(p) for p in rng.choice(_NAMES, size=4, replace=False)]  # tallest first
        facts = [f"{people[k]} is taller than {people[k + 1]}." for k in range(3)]
        facts = [facts[j] for j in rng.permutation(3)]
        shortest = bool(rng.integers(2))
        ask = "shortest" if shortest else "tallest"
        rows.append({"id": f"logic-{i}", "question": " ".join(facts) + f" Who is the {ask}?",
                     "answer": people[-1] if shortest else people[0]})
    return rows


_OBJECTS = ("apples", "books", "pencils", "marbles", "cookies", "stickers", "stamps", "shells")
_GAIN = ("buys {b} more {obj}", "gets {b} more {obj} from a friend", "finds {b} more {obj}")
_LOSS = ("gives {b} {obj} to a friend", "loses {b} {obj}", "sells {b} {obj}")


def word_problem_items(n: int = 8, seed: int = 0, low: int = 2, high: int = 9) -> list[dict[str, Any]]:
    """One-step word problems, alternately an addition and a subtraction of small numbers:
    "Ada has 5 apples. She buys 3 more apples. How many apples does Ada have now?" (answer 8).

    Both numbers are drawn from [low, high]; a subtraction starts from their sum, so every answer is
    in [low, high] or [2·low, 2·high] and never negative.
    """
    if not 0 <= low <= high:
        raise ExplabError(f"cot_word_problems: low={low}, high={high}: need 0 <= low <= high")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name, obj = str(rng.choice(_NAMES)), str(rng.choice(_OBJECTS))
        a, b = (int(v) for v in rng.integers(low, high + 1, size=2))
        if i % 2 == 0:
            start, verb, value = a, str(rng.choice(_GAIN)), a + b
        else:
            start, verb, value = a + b, str(rng.choice(_LOSS)), a
        question = (f"{name} has {start} {obj}. {name} {verb.format(b=b, obj=obj)}. "
                    f"How many {obj} does {name} have now?")
        rows.append({"id": f"word-{i}", "question": question, "answer": str(value)})
    return rows


def addition_items(n: int = 8, seed: int = 0, low: int = 1, high: int = 9) -> list[dict[str, Any]]:
    """Distinct additions of two numbers from [low, high]: "What is 3 + 4?" (answer 7)."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    if not 0 <= low <= high or n > len(pairs):
        raise ExplabError(f"cot_additions: n={n}, low={low}, high={high}: need 0 <= low <= high and "
                          f"n <= {max(len(pairs), 0)} distinct pairs")
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [{"id": f"add-{i}", "question": f"What is {pairs[k][0]} + {pairs[k][1]}?", "answer": str(sum(pairs[k]))}
            for i, k in enumerate(order)]
