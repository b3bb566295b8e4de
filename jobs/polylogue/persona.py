"""Step 1: persona vectors — contrastive system prompts, responses, judge filter, mean difference.

For a trait, every (instruction pair, extraction question, sample) is answered twice: under the
positive system prompt ("You are a <trait> assistant. <pos>") and under the negative one ("You are a
helpful assistant. <neg>"). Optionally a judge scores trait expression and coherence and only pairs
with a clear contrast are kept. The persona vector at block ``i`` is the mean over kept positive
responses of the mean ``blocks.{i}.resid_post`` activation over the response's tokens, minus the
same under the negative prompts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from explab.errors import ConfigError, ExplabError
from explab.interventions import Capture, points
from jobs.polylogue.catalog import load_trait, system_prompt

POLARITIES = ("pos", "neg")


def extraction_rows(traits: list[str], n_instructions: int | None, n_questions: int | None,
                    samples: int, seed: int) -> list[dict[str, Any]]:
    """One row per (trait, pair, question, sample, polarity), each with its own sampling seed."""
    rows = []
    for trait_name in traits:
        trait = load_trait(trait_name)
        pairs = range(min(n_instructions or len(trait.instruction), len(trait.instruction)))
        questions = trait.questions[: n_questions or len(trait.questions)]
        for pair in pairs:
            for qi, question in enumerate(questions):
                for sample in range(samples):
                    for polarity in POLARITIES:
                        rows.append({"trait": trait_name, "pair": pair, "question_index": qi, "sample": sample,
                                     "polarity": polarity, "system": system_prompt(trait, pair, polarity),
                                     "question": question, "seed": seed * 1_000_003 + len(rows)})
    return rows


def response_tokens(completion: Any) -> list[int]:
    """The response's token ids without the final eos/stop token (the text the judge reads)."""
    ids = list(completion.token_ids)
    return ids[:-1] if completion.finish_reason == "stop" and ids else ids


def persona_messages(system: str, question: str, system_in_user: bool = False) -> list[dict[str, str]]:
    if system_in_user:  # for chat templates without a system role
        return [{"role": "user", "content": f"{system}\n\n{question}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def generate_batch(batch: pd.DataFrame, *, generator: Any, params: dict[str, Any],
                   system_in_user: bool = False) -> pd.DataFrame:
    """Ray Data batch function: answer each question under its system prompt (the Generator)."""
    requests = [{"messages": persona_messages(r.system, r.question, system_in_user),
                 "params": {**params, "seed": int(r.seed)}} for r in batch.itertuples(index=False)]
    results = generator.generate(requests)
    out = batch.copy()
    out["prompt_ids"] = [list(r.prompt_token_ids) for r in results]
    out["response_ids"] = [response_tokens(r.completions[0]) for r in results]
    out["response"] = [r.completions[0].text for r in results]
    out["n_tokens"] = [len(ids) for ids in out["response_ids"]]
    return out


def activation_batch(batch: pd.DataFrame, *, hooked: Any, n_layers: int,
                     extra: dict[str, list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """Ray Data batch function: per (trait, polarity), the sum and count of the responses' mean
    activation over response tokens at every block (teacher-forced through the HookedModel).

    ``extra`` maps a polarity to interventions active while its responses are read (before the
    captures), e.g. a planted direction in a test.
    """
    names = [points.resid_post(i) for i in range(n_layers)]
    captures = [Capture(point=p, positions="generated") for p in names]
    requests = []
    for r in batch.itertuples(index=False):
        prompt, response = [int(t) for t in r.prompt_ids], [int(t) for t in r.response_ids]
        requests.append({"token_ids": prompt + response, "prompt_length": len(prompt), "capture_reduce": "mean",
                         "interventions": [*(extra or {}).get(r.polarity, []), *captures]})
    results = hooked.forward(requests)
    sums: dict[tuple[str, str], list[Any]] = {}
    for r, result in zip(batch.itertuples(index=False), results, strict=True):
        if len(r.response_ids) == 0:
            continue  # an empty response has no response tokens to average
        mean = np.concatenate([result.captures[p][0] for p in names]).astype(np.float64)
        acc = sums.setdefault((r.trait, r.polarity), [np.zeros_like(mean), 0])
        acc[0] += mean
        acc[1] += 1
    return pd.DataFrame([{"trait": t, "polarity": p, "count": c, "sum": s.tolist()}
                         for (t, p), (s, c) in sums.items()], columns=["trait", "polarity", "count", "sum"])


def mean_activations(rows: pd.DataFrame, hooked: Any, n_layers: int, batch_size: int,
                     extra: dict[str, list[dict[str, Any]]] | None = None,
                     ) -> dict[tuple[str, str], tuple[np.ndarray, int]]:
    """(trait, polarity) -> (mean over responses of the response-token mean, (n_layers, d); count)."""
    import ray.data

    columns = ["trait", "polarity", "prompt_ids", "response_ids"]
    ds = ray.data.from_pandas(rows[columns].reset_index(drop=True))
    parts = ds.map_batches(activation_batch, batch_size=batch_size, batch_format="pandas",
                           fn_kwargs={"hooked": hooked, "n_layers": n_layers, "extra": extra}).to_pandas()
    out: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
    for (trait, polarity), group in parts.groupby(["trait", "polarity"]):
        total = np.sum([np.asarray(s, dtype=np.float64) for s in group["sum"]], axis=0)
        count = int(group["count"].sum())
        out[(trait, polarity)] = ((total / count).reshape(n_layers, -1), count)
    return out


def persona_vectors(means: dict[tuple[str, str], tuple[np.ndarray, int]], traits: list[str]) -> dict[str, np.ndarray]:
    """trait -> (n_layers, d): mean activation under the positive prompts minus the negative ones."""
    vectors = {}
    for trait in traits:
        missing = [p for p in POLARITIES if (trait, p) not in means]
        if missing:
            raise ExplabError(f"trait {trait!r}: no usable {'/'.join(missing)} responses to average "
                              "(all were filtered out or empty): raise persona.max_tokens or lower judge.threshold")
        vectors[trait] = (means[(trait, "pos")][0] - means[(trait, "neg")][0]).astype(np.float32)
    return vectors


def load_vectors(ref: str, tag: str, traits: list[str], n_layers: int) -> dict[str, np.ndarray]:
    """Persona vectors of model ``tag`` from an earlier run's persona_vectors.safetensors."""
    from safetensors.numpy import load_file

    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "artifacts" / "persona_vectors.safetensors"
    if not path.is_file():
        raise ConfigError(f"persona.load: {path} does not exist: give a run directory or a persona_vectors.safetensors")
    tensors = load_file(str(path))
    vectors = {}
    for trait in traits:
        key = f"{tag}/{trait}"
        if key not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise ConfigError(f"persona.load: {path} has no vector {key!r} (it has {have}): "
                              "extract it or drop the trait")
        if tensors[key].shape[0] != n_layers:
            raise ConfigError(f"persona.load: {key!r} has {tensors[key].shape[0]} layers, the model has {n_layers}")
        vectors[trait] = tensors[key].astype(np.float32)
    return vectors


def vector_metadata(traits: list[str], responses: pd.DataFrame | None) -> dict[str, str]:
    """safetensors metadata: layer semantics, and per trait the prompts used and the kept counts."""
    info: dict[str, Any] = {}
    for name in traits:
        trait = load_trait(name)
        entry: dict[str, Any] = {"pos_system": [system_prompt(trait, k, "pos") for k in range(len(trait.instruction))],
                                 "neg_system": [system_prompt(trait, k, "neg") for k in range(len(trait.instruction))],
                                 "questions": trait.questions, "eval_prompt": trait.eval_prompt}
        if responses is not None and len(responses):
            mine = responses[responses.trait == name]
            entry["responses"] = int(len(mine))
            entry["kept"] = int(mine["kept"].sum())
        info[name] = entry
    return {"layers": "row i = blocks.{i}.resid_post (decoder block i output); key = <model tag>/<trait>",
            "method": "mean over responses of the mean response-token activation: positive minus negative prompts",
            "traits": json.dumps(info)}


def extract(*, generator: Any, judge: Any | None, hooked: Any, n_layers: int, section: Any, judge_cfg: Any,
            seed: int, system_in_user: bool = False) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Generate, judge, filter and average: returns (trait -> (n_layers, d) vector, responses table)."""
    import ray.data

    from jobs.polylogue.judge import judge_batch, keep_pairs, number_tokens

    rows = extraction_rows(section.traits, section.n_instructions, section.n_questions, section.samples, seed)
    params = {"temperature": section.temperature, "top_p": section.top_p, "max_tokens": section.max_tokens}
    ds = ray.data.from_items(rows).map_batches(generate_batch, batch_size=section.batch_size, batch_format="pandas",
                                               fn_kwargs={"generator": generator, "params": params,
                                                          "system_in_user": system_in_user})
    if judge is not None:
        numbers = number_tokens(judge) if judge_cfg.score == "weighted" else None
        ds = ds.map_batches(judge_batch, batch_size=judge_cfg.batch_size, batch_format="pandas",
                            fn_kwargs={"judge": judge, "max_tokens": judge_cfg.max_tokens,
                                       "coherence": judge_cfg.coherence is not None, "numbers": numbers,
                                       "min_mass": judge_cfg.min_mass})
    frame = ds.to_pandas().sort_values(["trait", "pair", "question_index", "sample", "polarity"]).reset_index(drop=True)
    if judge is None:
        frame["trait_score"] = np.nan
        frame["coherence"] = np.nan
    traits = list(section.traits)
    if judge is not None and judge_cfg.filter:
        frame["kept"] = keep_pairs(frame, judge_cfg.threshold, judge_cfg.coherence)
        skipped = skip_thin_traits(frame, traits, judge_cfg.min_pairs)
        traits = [t for t in traits if t not in skipped]
    else:
        frame["kept"] = True
    frame["kept"] &= frame["n_tokens"] > 0
    means = mean_activations(frame[frame.kept], hooked, n_layers, section.batch_size)
    return persona_vectors(means, traits), frame


def skip_thin_traits(frame: pd.DataFrame, traits: list[str], min_pairs: int) -> list[str]:
    """The traits whose judge kept fewer than ``min_pairs`` contrastive pairs: each is skipped with a
    warning (its rows un-kept in ``frame``, in place) so the other traits go on; if every trait is
    that thin, one ExplabError."""
    skipped = []
    for trait in traits:
        pairs = int(frame[(frame.trait == trait) & (frame.polarity == "pos")]["kept"].sum())
        if pairs < min_pairs:
            skipped.append(trait)
            frame.loc[frame.trait == trait, "kept"] = False
            warnings.warn(f"trait {trait!r}: the judge kept {pairs} contrastive pairs (< judge.min_pairs={min_pairs}): "
                          "skipped; lower judge.threshold or add samples to keep it", stacklevel=2)
    if skipped and len(skipped) == len(traits):
        raise ExplabError(f"every trait has fewer than judge.min_pairs={min_pairs} kept contrastive pairs: "
                          "lower judge.threshold, add samples, or set judge.filter: false")
    return skipped
