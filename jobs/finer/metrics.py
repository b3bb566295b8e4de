"""The benchmark's answer parser and metrics: paired accuracy (headline), row accuracy, invalid share.

`parse_letter` follows the authors: the first letter A-E (either case) in the generated text is the
answer, else -1 (invalid). `paired_accuracy` pairs each ``<kind>_pos`` row with the ``<kind>_neg`` row
of the same pair id and counts a pair as right only when both rows are right; a pair whose rows show
different images, belong to different kinds, or do not hold one pos and one neg row is refused.
"""

from __future__ import annotations

import re

import pandas as pd

from explab.errors import ExplabError

_LETTER = re.compile(r"[A-Ea-e]")


def parse_letter(text: str) -> int:
    """The option index named by ``text`` ("B" -> 1, "(c)" -> 2), or -1 when it names none."""
    match = _LETTER.search(text or "")
    return "abcde".index(match.group(0).lower()) if match else -1


def base_qtype(qtype: str) -> tuple[str, str]:
    """("multi_obj", "pos") from "multi_obj_pos"."""
    base, _, polarity = qtype.rpartition("_")
    if polarity not in ("pos", "neg") or not base:
        raise ExplabError(f"qtype {qtype!r} does not end in _pos or _neg: give rows of a paired benchmark")
    return base, polarity


def check_pairs(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per pair (``pair_id``, ``kind``, ``pos_correct``, ``neg_correct``) from scored rows.

    ``rows`` needs ``pair_id``, ``image_id``, ``qtype`` and ``correct``. Raises on a pair whose two rows
    differ in image or base qtype, or are not one pos and one neg."""
    out = []
    for pair_id, group in rows.groupby("pair_id", sort=True):
        parsed = [base_qtype(t) for t in group["qtype"]]
        polarities = sorted(p for _, p in parsed)
        if polarities != ["neg", "pos"]:
            raise ExplabError(f"pair {pair_id!r} holds rows {polarities}: each pair needs one _pos and one _neg row")
        if len({b for b, _ in parsed}) != 1:
            raise ExplabError(f"pair {pair_id!r} mixes qtypes {sorted(group['qtype'])}: pair rows of one kind")
        if group["image_id"].nunique() != 1:
            raise ExplabError(f"pair {pair_id!r} spans images {sorted(group['image_id'])}: pair rows of one image")
        correct = dict(zip([p for _, p in parsed], group["correct"].astype(bool), strict=True))
        out.append({"pair_id": pair_id, "kind": parsed[0][0], "pos_correct": correct["pos"],
                    "neg_correct": correct["neg"]})
    return pd.DataFrame(out, columns=["pair_id", "kind", "pos_correct", "neg_correct"])


def score(rows: pd.DataFrame) -> dict[str, float]:
    """Paired accuracy, row accuracy, pos/neg row accuracy and invalid share of scored rows
    (columns ``pair_id``, ``image_id``, ``qtype``, ``gt_index``, ``pred``)."""
    if rows.empty:
        raise ExplabError("no rows to score: evaluate at least one pair")
    rows = rows.assign(correct=rows["pred"] == rows["gt_index"])
    pairs = check_pairs(rows)
    polarity = rows["qtype"].str.rpartition("_")[2]
    return {
        "paired_accuracy": float((pairs["pos_correct"] & pairs["neg_correct"]).mean()),
        "row_accuracy": float(rows["correct"].mean()),
        "pos_accuracy": float(rows.loc[polarity == "pos", "correct"].mean()),
        "neg_accuracy": float(rows.loc[polarity == "neg", "correct"].mean()),
        "invalid": float((rows["pred"] < 0).mean()),
        "pairs": float(len(pairs)),
    }


def by_granularity(rows: pd.DataFrame) -> pd.DataFrame:
    """Row accuracy and paired accuracy per granularity of the asked query (pairs by their pos row)."""
    rows = rows.assign(correct=rows["pred"] == rows["gt_index"])
    pairs = check_pairs(rows)
    level = rows[rows["qtype"].str.endswith("_pos")].set_index("pair_id")["granularity"]
    pairs = pairs.assign(granularity=pairs["pair_id"].map(level), both=pairs["pos_correct"] & pairs["neg_correct"])
    row_acc = rows.groupby("granularity")["correct"].agg(["mean", "size"]).rename(
        columns={"mean": "row_accuracy", "size": "rows"})
    pair_acc = pairs.groupby("granularity")["both"].mean().rename("paired_accuracy")
    return row_acc.join(pair_acc).reset_index()


def yes_no_scores(rows: pd.DataFrame) -> dict[str, float]:
    """POPE's scores of yes/no rows (choices ``["Yes", "No"]``, ``gt_index`` 0 = yes): accuracy, precision,
    recall and F1 of the "yes" class, and the share of "yes" answers; an invalid answer counts as wrong and
    as neither yes nor no."""
    truth_yes = rows["gt_index"] == 0
    said_yes, said_no = rows["pred"] == 0, rows["pred"] == 1
    tp = float((truth_yes & said_yes).sum())
    precision = tp / float(said_yes.sum()) if said_yes.any() else 0.0
    recall = tp / float(truth_yes.sum()) if truth_yes.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = (truth_yes & said_yes) | (~truth_yes & said_no)
    return {"yn_accuracy": float(correct.mean()), "yn_precision": precision, "yn_recall": recall, "yn_f1": f1,
            "yes_ratio": float(said_yes.mean())}
