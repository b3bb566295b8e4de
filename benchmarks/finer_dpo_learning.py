"""Does FINER-Tuning's DPO step learn the planted one-square colour world? Held-out accuracy before and
after, against the same run with chosen and rejected swapped (a broken trainer), and SFT beside it.

The world is the tests' `COLOUR_WORLD` / `COLOUR_BUILD` (tests/test_finer.py): one large square of one of
five colours, `multi_attr` MC rows in vocabulary order, so the right letter of both rows of a pair is the
image's colour index. Training pairs: both polarities, `format: letter`. The base is the random tiny
LLaVA after ``--warm`` SFT steps on the training pairs' chosen letters (60 by default: the base of the test
`test_dpo_raises_the_held_out_margin_and_greedy_paired_accuracy_of_an_sft_base_on_the_colour_world`; 0: the
random model), and before that (``--perceive N``) N SFT steps answering "What colour is the square?" with
the colour word (a base that sees but has never seen the MC format). Held-out accuracy is the letter with
the highest first-token logit. DPO is trl's ``DPOTrainer`` through
`explab.train.build_dpo_trainer` (full tuning, a frozen copy of the base as reference), in process;
``--method sft`` trains cross-entropy on the chosen letter instead (`explab.train.objectives`).

    python benchmarks/finer_dpo_learning.py [--seed 0 --warm 60 --steps 100 --lr 1e-4 --beta 0.1 --method dpo]

Prints one JSON line: held-out row/paired accuracy of the base, the tuned and the swapped (and, with
``--blind``, the image-blind) model, DPO's last
reward margins, and the seconds each training took. Measured numbers are in jobs/finer/README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch

from explab.models import ModelSpec, load_model
from explab.train import DPOConfig, TrainerConfig, build_dpo_trainer
from explab.train.objectives import chat_example, collate, next_token_ce
from jobs.finer.benchmark import BuildConfig, items, mc_prompt, synthetic, training_pairs
from jobs.finer.scenes import SceneConfig

WORLD = SceneConfig(colours=["red", "green", "blue", "yellow", "purple"], shapes=["square"], sizes=["large"],
                    grid=2, min_objects=1, max_objects=1)
BUILD = BuildConfig(kinds=["multi_attr"], max_objects_named=1, shuffle_options=False, option_order="vocabulary")


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def held_out(loaded: Any, model: torch.nn.Module, rows: list[dict], images: dict) -> dict[str, float]:
    """Row and paired accuracy of the letter with the highest next-token logit (the greedy first token)."""
    letters = [loaded.tokenizer.convert_tokens_to_ids(c) for c in "ABCDE"]
    model.eval()
    preds = []
    with torch.no_grad():
        for r in rows:
            text = loaded.processor.apply_chat_template(_user(mc_prompt(r["question"], list(r["choices"]))),
                                                        add_generation_prompt=True, tokenize=False)
            enc = loaded.processor(images=[images[r["image_id"]]], text=[text], return_tensors="pt",
                                   add_special_tokens=False)
            preds.append(int(model(**enc).logits[0, -1, letters].argmax()))
    right = (np.asarray(preds) == np.asarray([r["gt_index"] for r in rows])).reshape(-1, 2)  # (pos, neg) pairs
    return {"row": float(right.mean()), "paired": float(right.all(1).mean())}


def sft(loaded: Any, examples: list[dict], steps: int, lr: float, seed: int) -> None:
    """``steps`` AdamW steps of cross-entropy on the examples' responses, batches of 8 drawn at random."""
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loaded.model.train()
    for _ in range(steps):
        batch = collate([examples[i] for i in torch.randperm(len(examples), generator=generator)[:8]],
                        loaded.tokenizer.pad_token_id)
        out = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"])
        loss = next_token_ce(out.logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def tune(base: Any, pairs: list[dict], args: argparse.Namespace, swap: bool,
         blind: bool = False) -> tuple[dict, float | None, float]:
    """A copy of ``base`` tuned on ``pairs`` (chosen/rejected swapped if ``swap``; every pair shown the first
    pair's image if ``blind``): held-out scores, the mean reward margin of the last 5 DPO steps (None for SFT),
    seconds."""
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if swap else r for r in pairs]
    rows = [{**r, "images": pairs[0]["images"]} for r in rows] if blind else rows
    policy = dataclasses.replace(base, model=copy.deepcopy(base.model))
    start = time.time()
    margin = None
    if args.method == "sft":
        sft(policy, [chat_example(policy, r["prompt"] + r["chosen"], r["images"]) for r in rows], args.steps,
            args.lr, args.seed)
    else:
        reference = dataclasses.replace(base, model=copy.deepcopy(base.model))
        trainer = TrainerConfig(lr=args.lr, batch_size=8, steps=args.steps, warmup_ratio=0.0, schedule="constant",
                                grad_clip=None)
        wire = [{k: r[k] for k in ("prompt", "chosen", "rejected", "images")} for r in rows]
        with tempfile.TemporaryDirectory() as out:
            hf = build_dpo_trainer(policy, reference, wire, trainer, DPOConfig(beta=args.beta, max_length=512), out,
                                   seed=args.seed)
            hf.args.save_strategy = "no"
            hf.train()
        logs = [h["rewards/margins"] for h in hf.state.log_history if "rewards/margins" in h]
        margin = float(np.mean(logs[-5:]))
    return held_out(base, policy.model, args.test_rows, args.images), margin, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=200, help="training scenes (two pairs each)")
    parser.add_argument("--test", type=int, default=50, help="held-out scenes (one MC pair each)")
    parser.add_argument("--perceive", type=int, default=0, help="SFT steps on 'What colour is the square?' first")
    parser.add_argument("--warm", type=int, default=60,
                        help="SFT steps on the training pairs' chosen letters first (an SFT'd base, lr 1e-3)")
    parser.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--blind", action="store_true",
                        help="also tune with every pair shown one image (an image-blind broken trainer)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = synthetic(WORLD, BUILD, {"train": args.train, "test": args.test}, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    pairs = [r for p in data.probes["train"]
             for r in training_pairs(p, data.images[p.image_id], rng, "both", "letter", BUILD)]
    args.test_rows = [r for p in data.probes["test"] for r in items(p, rng, BUILD, "test", "synthetic")]
    args.images = data.images
    base = load_model(ModelSpec(name="tiny:llava", device="cpu"))
    if args.perceive:
        colour = [chat_example(base, _user("What colour is the square?")
                               + [{"role": "assistant", "content": data.scenes[i].objects[0].colour}],
                               [data.images[i]]) for i in data.scenes if i.startswith("train")]
        sft(base, colour, args.perceive, 1e-3, args.seed)
    if args.warm:
        sft(base, [chat_example(base, r["prompt"] + r["chosen"], r["images"]) for r in pairs], args.warm, 1e-3,
            args.seed + 100)
    result: dict[str, Any] = {"base": held_out(base, base.model, args.test_rows, args.images)}
    runs = [("tuned", False, False), ("swapped", True, False)] + ([("image_blind", False, True)] if args.blind else [])
    for name, swap, blind in runs:
        scores, margin, seconds = tune(base, pairs, args, swap, blind)
        result[name] = {**scores, "margin": margin, "seconds": round(seconds, 1)}
    print(json.dumps({k: v for k, v in vars(args).items() if k not in ("test_rows", "images")} | result))


if __name__ == "__main__":
    main()
