"""Open-ended evaluation: TextVQA (VQA accuracy) and MMHal-Bench (an LLM judge's 0-6 rating).

The served VLM (`HookedModel`) answers each question about its image by greedy generation
(``HookedModel.generate`` with ``images``); open-ended items are not MC pairs and never enter the
paired metric.

- **VQA accuracy** (the standard metric of VQA v2 / TextVQA): the answer and the ten human answers are
  normalised (`normalize_answer`); the accuracy is the mean, over the ten ways to leave one human
  answer out, of ``min(#matches among the other nine / 3, 1)``. Unlike the official script, the
  normalisation is applied even when all ten human answers agree (it changes nothing then).
- **MMHal-Bench**: a judge LLM (served `Generator`) reads the image's annotated content, the question,
  the standard answer and the model's response, and rates the response 0-6 following MMHal's scale
  (6-3: no hallucination, from very to not informative; 2-0: a hallucination, from very to not
  informative); a rating below 3 counts as a hallucination. A judge output holding no ``Rating: <0-6>``
  is *unparsed* (its share is reported), never a crash nor a zero. The authors of MMHal used GPT-4 as
  the judge with their own prompt; the rubric here is written anew.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from explab.generation import SamplingParams

VQA_PROMPT = "Answer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = {"vqa": 32, "mmhal": 256}

# ---- VQA answer normalisation --------------------------------------------------------------------------------
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# apostrophe-less spellings -> the contraction (both spellings then compare equal)
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
    "mightnt": "mightn't", "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youre": "you're", "youve": "you've", "yall": "y'all",
    "lets": "let's", "oclock": "o'clock",
}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(text: str) -> str:
    """``text`` in the form VQA answers are compared in: lower case, punctuation dropped (a decimal point
    and a thousands comma between digits kept / joined), number words zero-ten as digits, articles
    dropped, contractions written with their apostrophe ("dont" == "don't"), single spaces.
    "Two dogs." -> "2 dogs"; "The 1,000 cats" -> "1000 cats"."""
    out = " ".join(str(text).lower().replace("\n", " ").replace("\t", " ").split())
    out = _DIGIT_COMMA.sub("", out)
    out = _LONE_PERIOD.sub("", out)
    out = _PUNCT.sub(" ", out)
    words = []
    for word in out.split():
        word = word.strip("'")
        word = _NUMBERS.get(word, word)
        if not word or word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (ten in VQA / TextVQA): the mean over
    the leave-one-out subsets of min(#subset answers equal to the prediction / 3, 1), after
    `normalize_answer`. 3 of 10 humans gave it -> 0.9; 1 of 10 -> 0.3; 0 -> 0."""
    answers = [normalize_answer(a) for a in answers]
    if not answers:
        return math.nan
    pred = normalize_answer(prediction)
    hits = sum(a == pred for a in answers)
    per_subset = [min((hits - (a == pred)) / 3.0, 1.0) for a in answers]
    return sum(per_subset) / len(per_subset)


def vqa_scores(frame: pd.DataFrame) -> dict[str, float]:
    """``vqa_accuracy`` (mean over rows of ``frame``'s ``response`` against its ``answers``) and ``n``."""
    acc = [vqa_accuracy(r, list(a)) for r, a in zip(frame["response"], frame["answers"], strict=True)]
    return {"vqa_accuracy": float(pd.Series(acc, dtype=float).mean()), "n": float(len(acc))}


# ---- MMHal judge ---------------------------------------------------------------------------------------------
JUDGE_RUBRIC = """You grade answers of an AI assistant that looks at an image. You cannot see the image; \
instead you get a list of what the image is annotated to contain, the question the user asked, a \
reference answer written by a person, and the assistant's response.

Decide first whether the response hallucinates: it hallucinates when it claims something about the image \
that the annotated contents or the reference answer contradict, or that neither of them supports. \
Claims that are merely cautious or vague are not hallucinations. Then decide how informative the \
response is for the question. Give one rating from this scale:
6 - very informative, a good analysis or reasoning, no hallucination
5 - informative, no hallucination
4 - somewhat informative, no hallucination
3 - not informative, no hallucination
2 - very informative, but with a hallucination
1 - somewhat informative, with a hallucination
0 - not informative, with a hallucination

Explain your decision in a few sentences, and end with a last line of exactly the form "Rating: N" \
with N one digit from 0 to 6."""

_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*([0-9]+)", re.IGNORECASE)


def judge_prompt(image_content: list[str], question: str, gt_answer: str, response: str) -> str:
    """The judge's user message for one MMHal item."""
    contents = ", ".join(str(c) for c in image_content) or "(none annotated)"
    return (f"{JUDGE_RUBRIC}\n\nAnnotated image contents: {contents}\nQuestion: {question}\n"
            f"Reference answer: {gt_answer}\nAssistant's response: {response}")


def parse_rating(text: str) -> int | None:
    """The rating 0-6 the judge gave (its last ``Rating: N``), or None when there is none or it is out of range."""
    found = _RATING.findall(text or "")
    if not found:
        return None
    value = int(found[-1])
    return value if 0 <= value <= 6 else None


def mmhal_scores(frame: pd.DataFrame) -> dict[str, float]:
    """From ``rating`` (NaN: unparsed): ``mmhal_score`` (mean parsed rating, 0-6), ``mmhal_hallucination_rate``
    (share of parsed ratings below 3), ``mmhal_unparsed`` (share of judge outputs without a rating), ``n``."""
    ratings = pd.to_numeric(frame["rating"], errors="coerce")
    parsed = ratings.dropna()
    return {"mmhal_score": float(parsed.mean()) if len(parsed) else math.nan,
            "mmhal_hallucination_rate": float((parsed < 3).mean()) if len(parsed) else math.nan,
            "mmhal_unparsed": float(ratings.isna().mean()) if len(ratings) else math.nan,
            "n": float(len(ratings))}


# ---- generation and judging through the servers -----------------------------------------------------------
def question_text(fmt: str, question: str, instruction: str | None = None) -> str:
    """The user turn for an open-ended item: TextVQA adds the short-answer instruction (lmms-eval's),
    MMHal asks the question as it is; ``instruction`` replaces the format's own ("" for none)."""
    suffix = instruction if instruction is not None else (VQA_PROMPT if fmt == "vqa" else "")
    return f"{question}\n{suffix}" if suffix else question


def respond(handle: Any, frame: pd.DataFrame, images: dict[str, Any], fmt: str, max_new_tokens: int,
            instruction: str | None = None, chunk: int = 32) -> list[str]:
    """The served VLM's greedy answer to each item of ``frame`` with its image (``HookedModel.generate``)."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    rows = frame.to_dict("records")
    texts: list[str] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        requests = [{"messages": [{"role": "user", "content": question_text(fmt, r["question"], instruction)}],
                     "images": [images[r["image_id"]]], "params": params} for r in part]
        texts += [result.completions[0].text.strip() for result in handle.generate(requests)]
    return texts


def judge(generator: Any, frame: pd.DataFrame, max_tokens: int = 256, chunk: int = 32) -> tuple[list[str], list]:
    """The judge's text and parsed rating (None: unparsed) for each MMHal row of ``frame`` (with ``response``)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    rows = frame.to_dict("records")
    texts: list[str] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        prompts = [judge_prompt(list(r["image_content"]), r["question"], r["gt_answer"], r["response"]) for r in part]
        texts += [result.completions[0].text for result in generator.generate(prompts, params)]
    return texts, [parse_rating(t) for t in texts]


def score_rows(fmt: str, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Metric rows of one open-ended benchmark's scored ``frame``: ``split`` "all", then one per question type
    (MMHal) — VQA accuracy for ``vqa``, the judge's metrics for ``mmhal``."""
    scorer = vqa_scores if fmt == "vqa" else mmhal_scores
    splits = [("all", frame)]
    if fmt == "mmhal":
        splits += list(frame.groupby("kind", sort=False))
    return [{"split": str(split), **scorer(part)} for split, part in splits]


# ---- the job's entry points ---------------------------------------------------------------------------------
def evaluate(handle: Any, bench: Any, frame: pd.DataFrame, images: dict[str, Any], judge_handle: Any = None,
             ) -> pd.DataFrame:
    """``frame`` (items of one open-ended `HubBenchmark`) with the served VLM's ``response`` and its score:
    ``vqa_accuracy`` per row (``vqa``), or the judge's ``judge_text`` and ``rating`` (NaN: unparsed; ``mmhal``)."""
    tokens = bench.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.format]
    scored = frame.assign(response=respond(handle, frame, images, bench.format, tokens, bench.instruction))
    if bench.format == "vqa":
        return scored.assign(vqa_accuracy=[vqa_accuracy(r, list(a))
                                           for r, a in zip(scored["response"], scored["answers"], strict=True)])
    texts, ratings = judge(judge_handle, scored, bench.judge_max_tokens)
    return scored.assign(judge_text=texts, rating=[math.nan if r is None else float(r) for r in ratings])


def evaluate_sets(handle: Any, open_sets: dict[str, tuple[Any, pd.DataFrame, dict[str, Any]]],
                  judge_for: Any) -> pd.DataFrame:
    """Every open-ended benchmark (``name -> (bench, items, images)``) through `evaluate`, one frame with a
    ``benchmark`` and ``format`` column; ``judge_for(bench)`` gives the judge's server handle (mmhal)."""
    frames = []
    for name, (bench, frame, images) in open_sets.items():
        judge_handle = judge_for(bench) if bench.format == "mmhal" else None
        frames.append(evaluate(handle, bench, frame, images, judge_handle).assign(benchmark=name, format=bench.format))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def table_rows(model: str, variant: str, scored: pd.DataFrame) -> list[dict[str, Any]]:
    """`tables/eval.parquet` rows of `evaluate_sets`'s frame: one per benchmark and split (`score_rows`)."""
    if scored.empty:
        return []
    return [{"model": model, "variant": variant, "tuned": variant != "base", "benchmark": name, **row}
            for name, part in scored.groupby("benchmark", sort=False)
            for row in score_rows(str(part["format"].iloc[0]), part)]
