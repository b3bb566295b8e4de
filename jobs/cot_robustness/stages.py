"""Ray Data batch functions of the pipeline (pandas in, pandas out; servers reached through handles).

references → judge references → (cut, on the driver) → perturb → add doubt markers → continue (n
samples each) → judge answers → judge doubt; and doubt before the cut for every (model, item, τ).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from explab.seeds import derive_seed
from jobs.cot_robustness import generation, judge, perturbations
from jobs.cot_robustness.metrics import authors_length_overhead, doubt_rate, relative_change
from jobs.cot_robustness.traces import Cut, Segmentation, extract_reasoning, final_answer, split_steps


def _rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    return df.to_dict("records")


def references(df: pd.DataFrame, *, generators: dict[str, Any], models: dict[str, dict[str, Any]], seed: int,
               paragraph_tokens: int | None, segmentation: Segmentation = "authors") -> pd.DataFrame:
    """Each row's (``model``, question) reference trace, with its think block and step count."""
    rows = _rows(df)
    out: list[dict[str, Any]] = []
    for label in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == label]
        made = generation.generate_references(generators[label], models[label], group, seed=seed,
                                              paragraph_tokens=paragraph_tokens)
        for row, ref in zip(group, made, strict=True):
            reasoning = extract_reasoning(ref["output"])
            out.append({**row, "size_b": models[label]["size_b"], **ref, "closed_think": reasoning.closed,
                        "n_steps": len(split_steps(reasoning.body, segmentation))})
    return pd.DataFrame(out)


def judge_answers(df: pd.DataFrame, *, judge_server: Any, prompts: Any, max_tokens: int, max_answer_chars: int,
                  text_column: str, strict: bool = True, check: str = "llm") -> pd.DataFrame:
    """Judge ``text_column`` (a complete output) against the reference answer. ``verdict`` follows
    the configured rule (``strict``: only an exact "Correct"); ``verdict_strict`` and
    ``verdict_lenient`` record both rules and ``judge_rule_changed`` where they disagree.
    ``check="exact"``: no judge LLM; ``judge_raw`` is the answer the output states and every
    verdict is `judge.exact_verdict`'s."""
    rows = _rows(df)
    if check == "exact":
        answers = [final_answer(r[text_column])[-max_answer_chars:] for r in rows]
        verdicts = [judge.exact_verdict(a, r["reference_answer"]) for a, r in zip(answers, rows, strict=True)]
        return df.assign(judge_raw=[judge.stated_answer(a) for a in answers], verdict=verdicts,
                         correct=[v == "correct" for v in verdicts], verdict_strict=verdicts, verdict_lenient=verdicts,
                         judge_rule_changed=False)
    messages = [judge.answer_messages(prompts, r["question"], r["reference_answer"], r[text_column], max_answer_chars)
                for r in rows]
    replies = judge.ask(judge_server, messages, max_tokens)
    by_strict = [judge.parse_verdict(t, strict=True) for t in replies]
    by_lenient = [judge.parse_verdict(t, strict=False) for t in replies]
    verdicts = by_strict if strict else by_lenient
    return df.assign(judge_raw=replies, verdict=verdicts, correct=[v == "correct" for v in verdicts],
                     verdict_strict=by_strict, verdict_lenient=by_lenient,
                     judge_rule_changed=[a != b for a, b in zip(by_strict, by_lenient, strict=True)])


def perturb(df: pd.DataFrame, *, llm: Any, prompts: Any, decoding: dict[str, dict[str, Any]], ratio: float,
            seed: int, models: dict[str, dict[str, Any]] | None = None,
            segmentation: Segmentation = "authors") -> pd.DataFrame:
    """Apply each row's intervention to its cut prefix (LLM requests of the batch go in one call).

    ``models`` (label → `job.model_info`) gives the instruction the intervention LLM sees after the
    question and the opening words an ``unrelated`` step is seeded with (defaults: none).
    """
    rows = _rows(df)
    models = models or {}
    done: list[perturbations.Perturbation | None] = [None] * len(rows)
    asks: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    for i, r in enumerate(rows):
        name = r["intervention"]
        steps = split_steps(extract_reasoning(r["output"]).body, segmentation)
        cut = Cut(r["tau_target"], r["tau_actual"], int(r["cut_count"]))
        key = (seed, r["model"], r["item_id"], r["tau_target"], name)
        if name in perturbations.LLM_INTERVENTIONS:
            dec = decoding[name]
            base = dec["seed"] if dec["seed"] is not None else seed
            info = models.get(r["model"], {})
            topic = perturbations.choose_topic(prompts.topics, derive_seed(base, *key[1:], "topic")) \
                if name == "unrelated" else ""
            opening = info.get("opening", "") if name == "unrelated" else ""
            question = generation.task_text(r["question"], info.get("instruction", ""))
            request = {"messages": perturbations.llm_messages(name, prompts, question, steps, cut, topic, opening),
                       "assistant_prefix": opening,
                       "params": {"temperature": dec["temperature"], "top_p": dec["top_p"],
                                  "max_tokens": dec["max_tokens"], "seed": derive_seed(base, *key[1:])}}
            meta = {"topic": topic} if topic else {}
            asks.append((i, request, {**meta, "opening": opening} if opening else meta))
        else:
            done[i] = perturbations.perturb_local(name, steps, cut, seed=derive_seed(*key), ratio=ratio,
                                                  paragraph=r["paragraph"] or None, pool_index=r["pool_index"])
    if asks:
        results = llm.generate([req for _, req, _ in asks])
        for (i, _, meta), result in zip(asks, results, strict=True):
            r = rows[i]
            steps = split_steps(extract_reasoning(r["output"]).body, segmentation)
            cut = Cut(r["tau_target"], r["tau_actual"], int(r["cut_count"]))
            opening = meta.pop("opening", "")
            done[i] = perturbations.apply_llm(r["intervention"], steps, cut, result.completions[0].text,
                                              opening=opening, llm_output=result.completions[0].text, **meta)
    out = []
    for r, p in zip(rows, done, strict=True):
        assert p is not None
        out.append({**r, "perturbed_trace": p.prefix, "intervention_text": p.text, "action": p.action,
                    "edited_step": -1 if p.step is None else p.step, "intervention_meta": json.dumps(p.meta)})
    return pd.DataFrame(out).drop(columns=["paragraph"])


def add_markers(df: pd.DataFrame, *, markers: list[str]) -> pd.DataFrame:
    """Each perturbed trace as is (marker "") and, for the forced-doubt ablation, with each marker appended."""
    parts = [df.assign(marker="", resume_trace=df["perturbed_trace"])]
    for m in markers:
        parts.append(df.assign(marker=m,
                               resume_trace=[perturbations.append_marker(t, m) for t in df["perturbed_trace"]]))
    return pd.concat(parts, ignore_index=True)


def continue_traces(df: pd.DataFrame, *, generators: dict[str, Any], models: dict[str, dict[str, Any]],
                    continuation: dict[str, Any], seed: int, segmentation: Segmentation = "authors") -> pd.DataFrame:
    """n continuations of each resume trace by its own model; one output row per sample, with three
    length measures (characters): ``length_overhead`` (continuation vs the original remainder),
    ``length_change`` (complete output vs original output) and ``authors_length_overhead`` (the
    authors': complete output less the intervention's text vs original output, floored at 0)."""
    rows = _rows(df)
    out: list[dict[str, Any]] = []
    for label in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == label]
        model = models[label]
        requests = []
        for r in group:
            head = extract_reasoning(r["output"]).head
            s = continuation["seed"] if continuation["seed"] is not None else derive_seed(
                seed, label, r["item_id"], r["tau_target"], r["intervention"], r["marker"], "continue")
            requests.append(generation.continuation_request(model, r["question"],
                                                            model["think_prefix"] + head + r["resume_trace"],
                                                            continuation, s))
        results = generators[label].generate(requests)
        for r, result in zip(group, results, strict=True):
            reasoning = extract_reasoning(r["output"])
            steps = split_steps(reasoning.body, segmentation)
            remainder = r["output"][len(reasoning.head) + len(steps.prefix(int(r["cut_count"]))):]
            # what the intervention inserted: its text, plus a forced-doubt marker and its break (as the authors)
            inserted = len(r.get("intervention_text", "")) + len(r["resume_trace"]) - len(
                r.get("perturbed_trace", r["resume_trace"]))
            for k, c in enumerate(result.completions):
                complete = reasoning.head + r["resume_trace"] + c.text
                out.append({**r, "sample": k, "continuation": c.text, "finish_reason": c.finish_reason,
                            "continuation_tokens": len(c.token_ids), "complete_output": complete,
                            "continuation_chars": len(c.text), "remainder_chars": len(remainder),
                            "length_overhead": relative_change(len(c.text), len(remainder)),
                            "original_chars": len(r["output"]), "complete_chars": len(complete),
                            "length_change": relative_change(len(complete), len(r["output"])),
                            "authors_length_overhead": authors_length_overhead(
                                len(complete), inserted, len(r["output"]))})
    return pd.DataFrame(out)


def continuation_doubt(df: pd.DataFrame, *, judge_server: Any, prompts: Any, doubt: dict[str, Any]) -> pd.DataFrame:
    """The doubt judge on each unit of each continuation."""
    unit_lists = [judge.units(t, doubt["unit"], doubt["max_units"], doubt["max_unit_chars"])
                  for t in df["continuation"]]
    flags = judge.doubt_flags(judge_server, prompts, unit_lists, doubt["max_tokens"])
    return df.assign(doubt_units=[len(u) for u in unit_lists], doubt_flags=flags,
                     doubt_count=[sum(f == "yes" for f in fl) for fl in flags],
                     doubt_rate=[doubt_rate(fl) for fl in flags],
                     doubt_any=[any(f == "yes" for f in fl) for fl in flags])


def cut_doubt(df: pd.DataFrame, *, judge_server: Any, prompts: Any, doubt: dict[str, Any],
              segmentation: Segmentation = "authors") -> pd.DataFrame:
    """Doubt before the cut (the last units of the kept prefix) and in the unperturbed remainder of
    the reasoning (its first units) for each (model, item, τ)."""
    prefixes, remainders = [], []
    for r in _rows(df):
        steps = split_steps(extract_reasoning(r["output"]).body, segmentation)
        count = int(r["cut_count"])
        prefixes.append(judge.units(steps.prefix(count), doubt["unit"], doubt["max_units"], doubt["max_unit_chars"],
                                    from_end=True))
        rest = steps.text()[len(steps.prefix(count)):]
        remainders.append(judge.units(rest, doubt["unit"], doubt["max_units"], doubt["max_unit_chars"]))
    flags = judge.doubt_flags(judge_server, prompts, prefixes + remainders, doubt["max_tokens"])
    before, after = flags[: len(prefixes)], flags[len(prefixes):]
    keep = ["model", "size_b", "domain", "item_id", "tau_target", "tau_actual", "cut_count", "n_steps"]
    return df[keep].assign(doubt_flags_prefix=before, doubt_rate_prefix=[doubt_rate(f) for f in before],
                           doubt_flags_remainder=after, doubt_rate_remainder=[doubt_rate(f) for f in after])
