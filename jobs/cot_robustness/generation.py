"""Requests to the evaluated model: its reference traces and its continuations of perturbed traces.

A continuation is assistant-prefix continuation: the chat turn opens with ``think_prefix`` (text
the chat template leaves to the model, e.g. ``<think>\\n``), then the reference output's head, then
the perturbed reasoning; the model writes on from its last character.
"""

from __future__ import annotations

from typing import Any

from explab.seeds import derive_seed


def task_text(question: str, instruction: str) -> str:
    """The question as the evaluated model reads it: followed by its step-by-step instruction."""
    return f"{question}\n\n{instruction}" if instruction else question


def task_messages(system_prompt: str | None, instruction: str, question: str) -> list[dict[str, str]]:
    """The evaluated model's chat: its system prompt (if any) and the question with the instruction."""
    user = task_text(question, instruction)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": user}]


def _paragraph_break(text: str) -> str:
    """What starts a new paragraph after ``text``."""
    if text.endswith("\n\n"):
        return ""
    return "\n" if text.endswith("\n") else "\n\n"


def generate_references(generator: Any, model: dict[str, Any], rows: list[dict[str, Any]], *, seed: int,
                        paragraph_tokens: int | None = None) -> list[dict[str, Any]]:
    """One reference trace per row (``question``, ``item_id``) from the evaluated model.

    With ``paragraph_tokens`` the trace is written in rounds of at most that many tokens, each
    continuing the text so far, with a paragraph break between rounds; it ends at the model's own
    end of turn or after ``max_tokens`` tokens in all.
    """
    messages = [task_messages(model["system_prompt"], model["instruction"], r["question"]) for r in rows]
    base = {"temperature": model["temperature"], "top_p": model["top_p"], "top_k": model.get("top_k", 0)}
    seeds = [derive_seed(seed, model["label"], r["item_id"], "reference") for r in rows]
    if paragraph_tokens is None:
        results = generator.generate([
            {"messages": m, "assistant_prefix": model["think_prefix"],
             "params": {**base, "max_tokens": model["max_tokens"], "seed": s}}
            for m, s in zip(messages, seeds, strict=True)])
        return [{"output": r.completions[0].text, "finish_reason": r.completions[0].finish_reason,
                 "output_tokens": len(r.completions[0].token_ids), "rounds": 1, "breaks_inserted": 0}
                for r in results]
    state = [{"output": "", "finish_reason": "length", "output_tokens": 0, "rounds": 0, "breaks_inserted": 0}
             for _ in rows]
    active = list(range(len(rows)))
    while active:
        requests = []
        for i in active:
            left = model["max_tokens"] - state[i]["output_tokens"]
            requests.append({"messages": messages[i], "assistant_prefix": model["think_prefix"] + state[i]["output"],
                             "params": {**base, "max_tokens": min(paragraph_tokens, left),
                                        "seed": derive_seed(seeds[i], state[i]["rounds"])}})
        results = generator.generate(requests)
        still = []
        for i, result in zip(active, results, strict=True):
            c, s = result.completions[0], state[i]
            s["output"] += c.text
            s["output_tokens"] += len(c.token_ids)
            s["rounds"] += 1
            s["finish_reason"] = c.finish_reason
            if c.finish_reason == "length" and s["output_tokens"] < model["max_tokens"]:
                brk = _paragraph_break(s["output"])
                s["output"] += brk
                s["breaks_inserted"] += bool(brk)
                still.append(i)
        active = still
    return state


def continuation_request(model: dict[str, Any], question: str, assistant_prefix: str,
                         continuation: dict[str, Any], seed: int) -> dict[str, Any]:
    """The request that continues ``assistant_prefix`` (think prefix + head + perturbed reasoning) n times."""
    return {
        "messages": task_messages(model["system_prompt"], model["instruction"], question),
        "assistant_prefix": assistant_prefix,
        "params": {"n": continuation["n"], "temperature": continuation["temperature"],
                   "top_p": continuation["top_p"], "max_tokens": continuation["max_tokens"], "seed": seed},
    }
