"""Released benchmarks from the Hugging Face hub in the job's item schema.

- ``finer_mcq`` (FINER-CompreCap ``xiaorui638/finer-comprecap-mcq``): columns ``image``, ``image_filename``,
  ``qtype`` (``<kind>_pos`` / ``<kind>_neg``), ``question``, ``choice1..5``, ``gt_index`` (0-based). The
  k-th pos row and the k-th neg row of one image and kind form pair k.
- ``pope`` (yes/no hallucination benchmarks: POPE and its relatives, e.g. ``lmms-lab/POPE``; HallusionBench,
  ``lmms-lab/HallusionBench`` split ``image``, with ``columns: {gt_answer: answer, filename: image_id}``; AMBER's
  discriminative part from a local copy joined with its annotations, ``columns: {query: question, truth: answer,
  type: category}``): ``image``, ``question``, ``answer`` (yes/no or 1/0), optional ``image_id`` /
  ``image_source`` and ``category``; a yes-question and a no-question of the same image and category form a pair
  (pos: the thing asked about is there, neg: it is not), each asked as a two-option MC row ("Yes" / "No");
  questions without a partner drop out. POPE's own scores (accuracy, precision, recall, F1, yes-ratio) come
  from `metrics.yes_no_scores`.
- ``mcq_letter`` (general MC checks, e.g. MMStar): ``image``, ``question``, ``options`` or ``A..E`` columns,
  ``answer`` (a letter); each row is paired with itself so paired accuracy equals row accuracy.
- ``vqa`` (open-ended, TextVQA ``lmms-lab/textvqa`` split ``validation``): ``image``, ``question``, ``answers``
  (the ten human answers), optional ``question_id`` / ``image_id``; scored by VQA accuracy (`openended.py`).
- ``mmhal`` (open-ended, MMHal-Bench ``Shengcao1006/MMHal-Bench`` split ``test``): ``image`` (an image, or a
  file name next to a local copy: map the hub form's ``image_path`` with ``columns: {image_path: image}``),
  ``question``, ``gt_answer``, ``image_content`` (a list of strings, or the hub form's ``{"class": [...]}``),
  ``question_type``, ``question_topic``, optional ``image_id``; judged by an LLM. Open-ended items carry
  their own columns (``answers`` / ``gt_answer``, no ``choices``) and never enter the paired MC metric.

``data`` is ``hf:<dataset id>`` or ``local:<path>`` (a ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` file, or a
directory written by ``Dataset.save_to_disk``); ``columns`` renames a dataset's columns to the names above.
Nothing is fetched at test time; offline (``HF_HUB_OFFLINE=1``) `load` raises one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from explab.errors import ConfigError
from explab.images import to_pil

_LETTERS = "ABCDE"


_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _open(bench: Any) -> Any:
    from datasets import load_dataset, load_from_disk

    if bench.data.startswith("hf:"):
        return load_dataset(bench.data[3:], bench.config_name, split=bench.split, **bench.kwargs)
    path = Path(bench.data.removeprefix("local:")).expanduser()
    if path.is_dir():
        ds = load_from_disk(str(path))
        return ds[bench.split] if hasattr(ds, "keys") else ds
    if path.suffix not in _BUILDERS:
        raise ConfigError(f"benchmark {bench.name!r}: local file {path} is not one of {sorted(_BUILDERS)}: "
                          "convert it, or save the dataset with Dataset.save_to_disk")
    ds = load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train", **bench.kwargs)
    image_column = next((k for k, v in bench.columns.items() if v == "image"), "image")
    if getattr(ds.features.get(image_column), "dtype", None) == "string":  # image file names: next to the file
        ds = ds.map(lambda ex: {image_column: str(path.parent / ex[image_column])})
    return ds


def fetch(bench: Any) -> Any:
    """The ``datasets.Dataset`` a `HubBenchmark` names (hub or local copy, columns renamed, limited)."""
    if not bench.data.startswith(("hf:", "local:")):
        raise ConfigError(f"benchmark {bench.name!r}: data {bench.data!r} is neither hf:<dataset id> nor "
                          "local:<path>: name a hub dataset or a local copy")
    try:
        ds = _open(bench)
    except ConfigError:
        raise
    except Exception as err:  # offline, unknown id, missing split: one line
        raise ConfigError(f"benchmark {bench.name!r}: cannot load {bench.data} split {bench.split!r} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160]}): go online or pre-download "
                          "it into the HF cache, or drop it from `benchmarks`") from None
    if bench.columns:
        missing = sorted(set(bench.columns) - set(ds.column_names))
        if missing:
            raise ConfigError(f"benchmark {bench.name!r}: columns {missing} are not in the dataset "
                              f"({ds.column_names}): fix `columns`")
        ds = ds.rename_columns(dict(bench.columns))
    if bench.limit is not None:
        ds = ds.select(range(min(bench.limit, len(ds))))
    return ds


def _finer(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images, seen = [], {}, {}
    for i, ex in enumerate(ds):
        image_id = str(ex.get("image_filename") or i)
        images.setdefault(image_id, to_pil(ex["image"]))
        kind, _, polarity = ex["qtype"].rpartition("_")
        k = seen.get((image_id, kind, polarity), 0)
        seen[(image_id, kind, polarity)] = k + 1
        choices = [ex[f"choice{j}"] for j in range(1, 6)]
        rows.append({"item_id": f"{name}-{i}", "pair_id": f"{image_id}-{kind}-{k}", "image_id": image_id,
                     "kind": kind, "polarity": polarity, "qtype": ex["qtype"], "question": ex["question"],
                     "choices": choices, "gt_index": int(ex["gt_index"]), "granularity": float("nan"),
                     "split": "test", "source": name})
    return pd.DataFrame(rows), images


_YES, _NO = {"yes", "1", "true"}, {"no", "0", "false"}


def _polarity(answer: Any, name: str, i: int) -> str:
    word = str(answer).strip().lower().rstrip(".")
    if word not in _YES | _NO:
        raise ConfigError(f"benchmark {name!r} row {i}: answer {answer!r} is not yes/no or 1/0: map the answer "
                          "column with `columns`, or use another format")
    return "pos" if word in _YES else "neg"


def _pope(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images, seen = [], {}, {}
    for i, ex in enumerate(ds):
        path = ex["image"] if isinstance(ex["image"], str) else None  # an image file: its name identifies it
        image_id = str(ex.get("image_id") or ex.get("image_source") or path or ex.get("question_id") or i)
        images.setdefault(image_id, to_pil(ex["image"]))
        polarity = _polarity(ex["answer"], name, i)
        kind = str(ex.get("category") or "pope")
        k = seen.get((image_id, kind, polarity), 0)
        seen[(image_id, kind, polarity)] = k + 1
        rows.append({"item_id": f"{name}-{i}", "pair_id": f"{image_id}-{kind}-{k}", "image_id": image_id,
                     "kind": kind, "polarity": polarity, "qtype": f"{kind}_{polarity}", "question": ex["question"],
                     "choices": ["Yes", "No"], "gt_index": 0 if polarity == "pos" else 1,
                     "granularity": float("nan"), "split": "test", "source": name})
    frame = pd.DataFrame(rows)
    complete = frame.groupby("pair_id")["polarity"].transform("nunique") == 2  # unmatched questions drop out
    return frame[complete].reset_index(drop=True), images


def _mcq(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images = [], {}
    for i, ex in enumerate(ds):
        image_id = f"{name}-{i}"
        images[image_id] = to_pil(ex["image"])
        choices = list(ex["options"]) if "options" in ex else [ex[c] for c in _LETTERS if ex.get(c) is not None]
        gt = _LETTERS.index(str(ex["answer"]).strip()[:1].upper())
        for polarity in ("pos", "neg"):  # the row twice: paired accuracy equals row accuracy
            rows.append({"item_id": f"{name}-{i}-{polarity}", "pair_id": image_id, "image_id": image_id,
                         "kind": "mcq", "polarity": polarity, "qtype": f"mcq_{polarity}", "question": ex["question"],
                         "choices": choices, "gt_index": gt, "granularity": float("nan"), "split": "test",
                         "source": name})
    return pd.DataFrame(rows), images


def _vqa(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images = [], {}
    for i, ex in enumerate(ds):
        image_id = str(ex.get("image_id") or f"{name}-{i}")
        images.setdefault(image_id, to_pil(ex["image"]))
        answers = [str(a) for a in (ex["answers"] or [])]
        if not answers:
            raise ConfigError(f"benchmark {name!r} row {i}: no human `answers`: map the answers column with "
                              "`columns`, or drop the row")
        rows.append({"item_id": f"{name}-{ex.get('question_id', i)}", "image_id": image_id, "kind": "vqa",
                     "question": ex["question"], "answers": answers, "split": "test", "source": name})
    return pd.DataFrame(rows), images


def _content(value: Any) -> list[str]:
    if isinstance(value, dict):  # the hub form's Sequence({"class": ...})
        value = next(iter(value.values()), [])
    return [str(v) for v in (value or [])]


def _mmhal(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images = [], {}
    for i, ex in enumerate(ds):
        source = ex.get("image") if ex.get("image") is not None else ex.get("image_path")
        if source is None:
            raise ConfigError(f"benchmark {name!r} row {i}: no `image` or `image_path` (columns "
                              f"{sorted(ex)}): download the images and name their column with `columns`")
        image_id = str(ex.get("image_id") or f"{name}-{i}")
        images.setdefault(image_id, to_pil(source))
        rows.append({"item_id": f"{name}-{i}", "image_id": image_id, "kind": str(ex.get("question_type") or "mmhal"),
                     "topic": str(ex.get("question_topic") or ""), "question": ex["question"],
                     "gt_answer": str(ex["gt_answer"]), "image_content": _content(ex.get("image_content")),
                     "split": "test", "source": name})
    return pd.DataFrame(rows), images


def load(bench: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(items, images by image_id)`` of a `HubBenchmark`."""
    ds = fetch(bench)
    loaders = {"finer_mcq": _finer, "pope": _pope, "mcq_letter": _mcq, "vqa": _vqa, "mmhal": _mmhal}
    return loaders[bench.format](ds, bench.name)
