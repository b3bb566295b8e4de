"""Training objectives as pure torch functions (no Ray): CE, logit and hidden-state KD, their mix.

Labels follow the Hugging Face convention: ``labels[b, t]`` is the token at position t and -100
(`IGNORE_INDEX`) marks a position that is not trained on (prompt, image and padding tokens); the
logits at t predict the token at t + 1. `chat_example` builds such labels from a model's chat
template (and processor, for image-text examples).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from explab.errors import ExplabError

IGNORE_INDEX = -100


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` [B, T, V] against ``labels`` [B, T] (-100 ignored).

    ``reduction``: ``mean`` over the trained tokens, or ``sum`` (to normalise by a count that
    spans several workers, as `explab.train.loops` does)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def trained_tokens(labels: torch.Tensor) -> int:
    """How many tokens `next_token_ce` averages over."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) per row [B]: the sum of the next-token log-probabilities of the
    tokens whose label is not -100 (DPO's sequence log-probability)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:].to(logits.device)
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO's sigmoid loss per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on
    sequence log-probabilities (`sequence_logprob`). It is ln 2 when policy = reference."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 2.0,
    reverse: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit distillation: KL(p_T || p_S) at temperature ``tau`` (``reverse``: KL(p_S || p_T)).

    Summed over every position and the vocabulary, times tau^2, divided by the batch size B (the
    recovery recipe of SPECS-2 §1: ``reduction=sum x tau^2 / B``, no mask). ``mask`` [B, T] (1 =
    keep) restricts the sum to chosen positions, e.g. to leave out padding."""
    if student_logits.shape != teacher_logits.shape:
        raise ExplabError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: distil between models with one vocabulary"
        )
    log_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    if reverse:
        per_position = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        per_position = per_position * mask.to(per_position.dtype)
    return per_position.sum() * tau**2 / student_logits.shape[0]


def hidden_mse(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    layers: list[int],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden-state distillation: the mean over ``layers`` of MSE(h_S[l], h_T[l]).

    ``*_hidden`` are ``output_hidden_states`` tuples (entry 0 = embeddings, -1 = after the final
    norm). ``mask`` [B, T] (1 = keep) averages over the kept positions only."""
    if not layers:
        raise ExplabError("hidden_mse needs at least one layer index: set objective.hidden_layers")
    losses = []
    for layer in layers:
        try:
            s, t = student_hidden[layer].float(), teacher_hidden[layer].float()
        except IndexError:
            raise ExplabError(
                f"hidden layer {layer} is out of range (the models have {len(student_hidden)} "
                "hidden states): pick indices in range"
            ) from None
        if s.shape != t.shape:
            raise ExplabError(
                f"hidden states at layer {layer} differ in shape ({tuple(s.shape)} vs "
                f"{tuple(t.shape)}): distil between layers of one width"
            )
        sq = (s - t).pow(2).mean(-1)
        if mask is None:
            losses.append(sq.mean())
        else:
            keep = mask.to(sq.dtype)
            losses.append((sq * keep).sum() / keep.sum().clamp(min=1))
    return torch.stack(losses).mean()


def mix(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * kd + (1 - alpha) * ce``; alpha 0 is plain CE (the KD term is not even added)."""
    if alpha == 0:
        return ce
    return alpha * kd + (1 - alpha) * ce


# ---- chat-formatted examples ------------------------------------------------------------------------
def chat_example(
    loaded: Any, messages: list[dict[str, Any]], images: list[Any] | None = None
) -> dict[str, Any]:
    """One training example from chat ``messages`` whose last turn is the assistant's response.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` ([1, T] tensors) and, with images,
    the processor's pixel inputs. ``labels`` is -100 over the prompt: everything the chat template
    renders before the response, i.e. the rendering of ``messages[:-1]`` with the generation
    prompt (image tokens included, as the processor expands them). ``loaded`` is a
    `explab.models.LoadedModel` (its processor for a VLM, else its tokenizer)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ExplabError(
            "a training example's messages must end with the assistant's response: "
            "append {'role': 'assistant', 'content': ...}"
        )
    tokenizer = loaded.tokenizer
    template_owner = loaded.processor if images else tokenizer
    if not getattr(template_owner, "chat_template", None):
        raise ExplabError(f"model {loaded.spec.name!r} has no chat template: use an instruct/chat checkpoint")
    prompt = template_owner.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = template_owner.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ExplabError(
            "the chat template does not render the prompt as a prefix of the full chat: "
            "this model's template cannot mask prompt tokens by prefix"
        )
    if images:
        if loaded.processor is None or loaded.kind != "vlm":
            raise ExplabError(f"model {loaded.spec.name!r} is a {loaded.kind}: only a VLM takes images")
        # the template already renders BOS: no second one from the tokenizer (as for text)
        enc = loaded.processor(images=images, text=[full], return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer([full], add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"]
    prompt_ids = _prompt_ids(loaded, prompt, images)
    n_prompt = len(prompt_ids)
    if not torch.equal(ids[0, :n_prompt], prompt_ids):
        raise ExplabError(
            "the prompt's tokens are not a prefix of the full chat's tokens: the tokenizer "
            "merges across the response boundary; mask by another rule"
        )
    labels = ids.clone()
    labels[:, :n_prompt] = IGNORE_INDEX
    out = {k: v for k, v in enc.items()}
    out["attention_mask"] = out.get("attention_mask", torch.ones_like(ids))
    out["labels"] = labels
    return out


def _prompt_ids(loaded: Any, prompt: str, images: list[Any] | None) -> torch.Tensor:
    if images:
        return loaded.processor(images=images, text=[prompt], return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ][0]
    return loaded.tokenizer([prompt], add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `chat_example` outputs into one batch (padding: -100 labels, 0 attention);
    pixel inputs are concatenated along the image axis."""
    width = max(e["input_ids"].shape[1] for e in examples)
    batch: dict[str, Any] = {}
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    for key, value in pads.items():
        batch[key] = torch.cat([F.pad(e[key], (0, width - e[key].shape[1]), value=value) for e in examples])
    extra = sorted({k for e in examples for k in e} - set(pads))
    for key in extra:
        parts = [e[key] for e in examples if key in e]
        batch[key] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts
    return batch
