"""The paper's evaluation benchmarks as `data.Item` lists, and each benchmark's scoring rule.

Each benchmark reads its Hugging Face dataset (``hf:<id>:<config>``, the split below) or a local copy of it
(``disk:<dir>`` written by ``save_to_disk``, ``parquet:<path>``) through `explab.data.read_rows`, and maps
that dataset's columns (from its dataset card) to question / options / answer / image:

- ``mmmu``: lmms-lab/MMMU (MMMU/MMMU in one table, validation): question, options (a Python list as text), answer
  (a letter), image_1, question_type; rule letter (``open`` questions: exact match);
- ``scienceqa``: derek-thomas/ScienceQA (test): question, hint, choices, answer (an index), image; rows
  without an image are left out (the IMG subset the paper reports); rule letter;
- ``mathvista``: AI4Math/MathVista (testmini): question, choices, answer (the choice's text), decoded_image,
  question_type; rule letter (``free_form``: exact match);
- ``ai2d``: lmms-lab/ai2d (test): question, options, answer (an index as text), image; rule letter;
- ``mme``: lmms-lab/MME (test): question, answer (Yes / No), image, question_id (the image), category;
  rule mme: per category acc + acc+ (every question of an image right), summed;
- ``pope``: lmms-lab/POPE (test): question, answer (yes / no), image, category; rule yes/no accuracy;
- ``docvqa``: lmms-lab/DocVQA (DocVQA, validation): question, answers, image; rule ANLS;
- ``gqa``: lmms-lab/GQA (testdev_balanced_instructions, testdev): question, answer, imageId, its image from
  the images table (testdev_balanced_images: id, image); rule exact match.

Multiple-choice questions list their options as ``A. ...`` and are answered by letter; yes/no questions by
"yes" / "no"; both are scored on the first-token logits (`evaluate.predict`). Open questions are scored on a
greedy answer. Scores are fractions in [0, 1], except MME's (the sum over categories of acc + acc+, in
percent, as MME reports it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from explab.data import read_rows
from explab.errors import ConfigError
from explab.images import to_pil
from jobs.vlm_compression.data import Item

Rule = Literal["letter", "yesno", "mme", "anls", "exact"]
LETTERS = "ABCDEFGHIJKLMNOP"
YES_NO = ["yes", "no"]


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the Hub, how one row becomes items, and how it is scored."""

    name: str
    hf: str  # "<id>" or "<id>:<config>"
    split: str
    rule: Rule
    items: Callable[[dict[str, Any]], list[Item]]
    images: str | None = None  # a separate images table (GQA), "<id>:<config>"


def _image(cell: Any) -> np.ndarray | None:
    return None if cell is None else np.array(to_pil(cell))


def _lettered(name: str, question: str, options: list[str], answer: int, image: Any, **kw: Any) -> Item:
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    text = f"{question}\n{listed}\nAnswer with the option's letter from the given choices directly."
    return Item(name, text, list(LETTERS[: len(options)]), answer, _image(image), **kw)


def _yes_no(name: str, question: str, answer: str, image: Any, **kw: Any) -> Item:
    text = question if "yes or no" in question.lower() else f"{question} Please answer yes or no."
    return Item(name, text, list(YES_NO), YES_NO.index(answer.strip().lower()), _image(image), **kw)


def _open(name: str, question: str, answers: list[str], image: Any) -> Item:
    text = f"{question}\nAnswer the question using a single word or phrase."
    return Item(name, text, [], -1, _image(image), answers=[str(a) for a in answers])


def _mmmu(row: dict[str, Any]) -> list[Item]:
    question = re.sub(r"<image (\d+)>", r"(image \1)", row["question"])
    if row.get("question_type") == "open":
        return [_open("mmmu", question, [row["answer"]], row.get("image_1"))]
    options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
    return [_lettered("mmmu", question, options, LETTERS.index(row["answer"].strip()), row.get("image_1"))]


def _scienceqa(row: dict[str, Any]) -> list[Item]:
    if row.get("image") is None:
        return []
    context = f"Context: {row['hint']}\n" if row.get("hint") else ""
    return [_lettered("scienceqa", context + row["question"], list(row["choices"]), int(row["answer"]),
                      row["image"])]


def _mathvista(row: dict[str, Any]) -> list[Item]:
    image = row.get("decoded_image", row.get("image"))
    if row.get("question_type") == "multi_choice":
        choices = list(row["choices"])
        return [_lettered("mathvista", row["question"], choices, choices.index(row["answer"]), image)]
    return [_open("mathvista", row["question"], [row["answer"]], image)]


def _ai2d(row: dict[str, Any]) -> list[Item]:
    return [_lettered("ai2d", row["question"], list(row["options"]), int(row["answer"]), row["image"])]


def _mme(row: dict[str, Any]) -> list[Item]:
    return [_yes_no("mme", row["question"], row["answer"], row["image"], group=str(row["question_id"]),
                    category=str(row["category"]))]


def _pope(row: dict[str, Any]) -> list[Item]:
    return [_yes_no("pope", row["question"], row["answer"], row["image"], category=str(row.get("category", "")))]


def _docvqa(row: dict[str, Any]) -> list[Item]:
    return [_open("docvqa", row["question"], list(row["answers"]), row["image"])]


def _gqa(row: dict[str, Any]) -> list[Item]:
    return [_open("gqa", row["question"], [row["answer"]], row["image"])]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmmu", "lmms-lab/MMMU", "validation", "letter", _mmmu),  # all 30 subjects in one table
    Benchmark("scienceqa", "derek-thomas/ScienceQA", "test", "letter", _scienceqa),
    Benchmark("mathvista", "AI4Math/MathVista", "testmini", "letter", _mathvista),
    Benchmark("ai2d", "lmms-lab/ai2d", "test", "letter", _ai2d),
    Benchmark("mme", "lmms-lab/MME", "test", "mme", _mme),
    Benchmark("pope", "lmms-lab/POPE", "test", "yesno", _pope),
    Benchmark("docvqa", "lmms-lab/DocVQA:DocVQA", "validation", "anls", _docvqa),
    Benchmark("gqa", "lmms-lab/GQA:testdev_balanced_instructions", "testdev", "exact", _gqa,
              images="lmms-lab/GQA:testdev_balanced_images"),
)}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}: pick one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load(name: str, source: str | None = None, split: str | None = None, limit: int | None = None,
         images: str | None = None) -> list[Item]:
    """The items of benchmark ``name`` from ``source`` (a dataset spec; default its Hub dataset) and ``split``
    (default the benchmark's), the first ``limit`` rows. GQA's images come from ``images`` (a spec of the
    table with ``id`` and ``image``; default the Hub's images config)."""
    bench = get(name)
    spec = source or f"hf:{bench.hf}"
    rows = read_rows(spec, split=split or bench.split, limit=limit)
    if bench.images is not None:
        pictures = read_rows(images or f"hf:{bench.images}", split=split or bench.split)
        table = {str(r["id"]): r["image"] for r in pictures}
        missing = sorted({str(r["imageId"]) for r in rows} - set(table))
        if missing:
            raise ConfigError(f"{name}: images {missing[:3]} are not in the images table {images or bench.images}: "
                              "give the matching data.sources[].images")
        rows = [{**r, "image": table[str(r["imageId"])]} for r in rows]
    try:
        return [item for row in rows for item in bench.items(row)]
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{name}: {spec} does not have the {name} columns ({type(err).__name__}: {err}): "
                          f"give the {bench.hf} dataset or a copy of it") from None


# ---------------------------------------------------------------- scoring rules


def rule_of(benchmark: str) -> Rule:
    """The scoring rule of a benchmark (the synthetic shapes benchmarks: letter / yes-no accuracy)."""
    if benchmark in BENCHMARKS:
        return BENCHMARKS[benchmark].rule
    return "yesno" if benchmark.endswith("yesno") else "letter"


def normalize(text: str) -> str:
    """Lower case, outer whitespace and trailing punctuation removed, inner whitespace collapsed."""
    return " ".join(text.strip().lower().rstrip(".!?,;:").split())


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one answer: max over references of 1 - normalized edit distance (0 at or above
    ``threshold``), on lower-cased, stripped strings."""
    best = 0.0
    p = " ".join(prediction.strip().lower().split())
    for ref in answers:
        r = " ".join(ref.strip().lower().split())
        dist = levenshtein(p, r) / max(len(p), len(r), 1)
        best = max(best, 1.0 - dist if dist < threshold else 0.0)
    return best


def correct(item: Item, prediction: int | str) -> bool:
    """A closed item's picked option index, or an open item's text, against its answer(s) (exact match)."""
    if item.open:
        return normalize(str(prediction)) in {normalize(a) for a in item.answers}
    return int(prediction) == item.answer


def mme_score(items: list[Item], predictions: list[int | str]) -> float:
    """MME: per category, acc (questions right, %) + acc+ (images with every question right, %); summed."""
    total = 0.0
    for category in sorted({it.category for it in items}):
        pairs = [(it, p) for it, p in zip(items, predictions, strict=True) if it.category == category]
        hits = [correct(it, p) for it, p in pairs]
        by_image: dict[str, list[bool]] = {}
        for (it, _), hit in zip(pairs, hits, strict=True):
            by_image.setdefault(it.group, []).append(hit)
        total += 100.0 * np.mean(hits) + 100.0 * np.mean([all(v) for v in by_image.values()])
    return float(total)


def score(benchmark: str, items: list[Item], predictions: list[int | str]) -> float:
    """The benchmark's score of ``predictions`` (option indices for closed items, texts for open ones)."""
    rule = rule_of(benchmark)
    if rule == "mme":
        return mme_score(items, predictions)
    if rule == "anls":
        return float(np.mean([anls(str(p), it.answers) for it, p in zip(items, predictions, strict=True)]))
    return float(np.mean([correct(it, p) for it, p in zip(items, predictions, strict=True)]))


def score_all(items: list[Item], predictions: list[int | str]) -> dict[str, float]:
    """Every benchmark's score, in the order the benchmarks first appear."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(it.benchmark for it in items):
        idx = [i for i, it in enumerate(items) if it.benchmark == name]
        out[name] = score(name, [items[i] for i in idx], [predictions[i] for i in idx])
    return out
