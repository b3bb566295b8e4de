"""Released benchmarks from the Hugging Face hub in the job's item schema.

- ``finer_mcq`` (FINER-CompreCap ``xiaorui638/finer-comprecap-mcq``): columns ``image``, ``image_filename``,
  ``qtype`` (``<kind>_pos`` / ``<kind>_neg``), ``question``, ``choice1..5``, ``gt_index`` (0-based). The
  k-th pos row and the k-th neg row of one image and kind form pair k.
- ``pope`` (POPE and its relatives, e.g. ``lmms-lab/POPE``): ``image``, ``question``, ``answer`` (yes/no),
  ``category``; a yes-question and a no-question of the same image form a pair (pos: the object is
  there, neg: it is not), each asked as a two-option MC row ("Yes" / "No").
- ``mcq_letter`` (general MC checks, e.g. MMStar): ``image``, ``question``, ``options`` or ``A..E`` columns,
  ``answer`` (a letter); each row is paired with itself so paired accuracy equals row accuracy.

Nothing is fetched at test time; offline (``HF_HUB_OFFLINE=1``) `load` raises one clear line.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from explab.errors import ConfigError
from explab.images import to_pil

_LETTERS = "ABCDE"


def _fetch(bench: Any) -> Any:
    if not bench.data.startswith("hf:"):
        raise ConfigError(f"benchmark {bench.name!r}: data {bench.data!r} is not hf:<dataset id>: name a hub dataset")
    from datasets import load_dataset

    try:
        ds = load_dataset(bench.data[3:], bench.config_name, split=bench.split, **bench.kwargs)
    except Exception as err:  # offline, unknown id, missing split: one line
        raise ConfigError(f"benchmark {bench.name!r}: cannot load {bench.data} split {bench.split!r} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160]}): go online or pre-download "
                          "it into the HF cache, or drop it from `benchmarks`") from None
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


def _pope(ds: Any, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, images, seen = [], {}, {}
    for i, ex in enumerate(ds):
        image_id = str(ex.get("image_source") or ex.get("question_id") or i)
        images.setdefault(image_id, to_pil(ex["image"]))
        polarity = "pos" if str(ex["answer"]).strip().lower() == "yes" else "neg"
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


def load(bench: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(items, images by image_id)`` of a `HubBenchmark`."""
    ds = _fetch(bench)
    return {"finer_mcq": _finer, "pope": _pope, "mcq_letter": _mcq}[bench.format](ds, bench.name)
