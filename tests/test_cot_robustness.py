"""cot_robustness: segmentation, the cut, the seven interventions, continuation, metrics, the tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explab.config import load_config
from explab.errors import ConfigError, ExplabError
from explab.seeds import derive_seed
from explab.servers.handle import as_requests
from explab.servers.types import Completion, GenerationResult
from jobs.cot_robustness import judge, metrics, stages
from jobs.cot_robustness import perturbations as iv
from jobs.cot_robustness.config import Config
from jobs.cot_robustness.data import addition_items, arithmetic_items, logic_items, normalize_item, word_problem_items
from jobs.cot_robustness.prompts import load_prompts
from jobs.cot_robustness.traces import Cut, cut_at, extract_reasoning, final_answer, split_steps, timesteps

TINY = Path(__file__).resolve().parents[1] / "jobs" / "cot_robustness" / "configs" / "tiny.yaml"


# ---- segmentation ------------------------------------------------------------------------------

HAND_TRACES = [
    "",
    "one step only",
    "\n\n",
    "a\n\nb",
    "\n\nleading blank line\n\nsecond\n\n",
    "\n\n\nthree newlines first\n\n\n\nfour between\n\n\nthree after",
    "Windows\r\n\r\nline endings\r\n\r\n\r\nand a trailing one\r\n",
    "spaces on the blank line  \n \t \nnext step\n",
    "unicode: αβγ ∑ 🙂\n\n数学的な手順\n\n\u200bzero width\n\nend 🙂",
    "\nsingle newline start\n\nthen a step",
    "   \n\n  indented step\n\n\t\ttabbed\n\n   ",
]


def _fuzz(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\r\n", "é", "🙂", "x y", "\n\n"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 40)))) for _ in range(n)]


def _check_restores(trace):
    steps = split_steps(trace, "blank_lines")
    assert steps.text() == trace
    assert all(s.strip() for s in steps.steps)  # a step always holds text
    assert all("\n\n" not in s and "\r\n\r\n" not in s for s in steps.steps)
    assert all(not p.strip() for p in (steps.lead, *steps.seps))  # separators are whitespace only
    for k in range(len(steps) + 1):
        assert trace.startswith(steps.prefix(k))


@pytest.mark.parametrize("trace", HAND_TRACES)
def test_segmentation_restores_every_trace_exactly(trace):
    _check_restores(trace)


def test_segmentation_restores_random_traces_exactly():
    for trace in _fuzz(500):
        _check_restores(trace)
        _check_authors(trace)


def _check_authors(trace):
    steps = split_steps(trace)  # the default: the authors' plain split at "\n\n"
    assert steps.text() == trace and list(steps.steps) == trace.split("\n\n") and steps.lead == ""
    assert steps.seps == ("\n\n",) * (len(steps) - 1) + ("",)
    for k in range(len(steps) + 1):
        assert trace.startswith(steps.prefix(k))


@pytest.mark.parametrize("trace", HAND_TRACES)
def test_authors_segmentation_restores_every_trace_exactly(trace):
    _check_authors(trace)


def test_authors_segmentation_keeps_extra_newlines_and_spaces_in_steps():
    assert split_steps("a\n\n\nb").steps == ("a", "\nb")  # three newlines: the next step starts with one
    assert split_steps("a\n\n\n\nb").steps == ("a", "", "b")  # four: an empty step between
    assert split_steps("a  \n\nb").steps == ("a  ", "b")  # spaces before the blank line stay in the step
    assert split_steps("a\n \nb").steps == ("a\n \nb",)  # a line of spaces is no separator here
    assert split_steps("a\n \nb", "blank_lines").steps == ("a", "b")
    assert timesteps(split_steps("aa\n\n\nbb")) == pytest.approx([2 / 5, 1.0])  # the newline counts
    with pytest.raises(ExplabError, match="unknown segmentation 'lines'"):
        split_steps("a", "lines")


def test_issue_trace_is_cut_where_the_authors_cut_it():
    """"aaaa␣␣\n\nbb\n\ncccccc\n\ndddddddd" at τ = 0.5: the authors' steps are 6, 2, 6, 8 characters
    (22): timesteps 6/22, 8/22, 14/22, 1; 8/22 and 14/22 are equally near 0.5, the earlier wins → 2
    steps at τ ≈ 0.364. The blank-line segmentation drops the spaces (4, 2, 6, 8) → 3 steps at 0.6."""
    trace = "aaaa  \n\nbb\n\ncccccc\n\ndddddddd"
    cut = cut_at(split_steps(trace), 0.5)
    assert (cut.count, cut.actual) == (2, pytest.approx(8 / 22)) and round(cut.actual, 3) == 0.364
    assert split_steps(trace).prefix(cut.count) == "aaaa  \n\nbb"
    other = cut_at(split_steps(trace, "blank_lines"), 0.5)
    assert (other.count, other.actual) == (3, pytest.approx(0.6))
    # three and four newlines: the step after them carries the extra newline / an empty step counts
    three = split_steps("aaaa\n\n\nbb\n\ncccccc")  # steps 4, 3 ("\nbb"), 6 = 13
    assert timesteps(three) == pytest.approx([4 / 13, 7 / 13, 1.0]) and cut_at(three, 0.5).count == 2
    four = split_steps("aaaa\n\n\n\nbb\n\ncccccc")  # steps 4, 0, 2, 6 = 12
    assert timesteps(four) == pytest.approx([4 / 12, 4 / 12, 6 / 12, 1.0])
    assert cut_at(four, 0.45).count == 3 and cut_at(four, 0.3).count == 2  # the empty step is a step


def test_segmentation_splits_where_expected():
    s = split_steps("\n\nA\n\n\n\nB  \r\n\r\nC\n", "blank_lines")
    assert s.lead == "\n\n" and s.steps == ("A", "B", "C\n") and s.seps == ("\n\n\n\n", "  \r\n\r\n", "")
    assert s.prefix(2) == "\n\nA\n\n\n\nB" and s.sep_after(1) == "  \r\n\r\n" and s.sep_after(2) == "\n\n"
    assert split_steps("no break\nhere", "blank_lines").steps == ("no break\nhere",)


def test_think_block_extraction_is_exact():
    out = "<think>\nA.\n\nB.</think>\nThe answer is \\boxed{4}."
    r = extract_reasoning(out)
    assert (r.head, r.body, r.tail) == ("<think>", "\nA.\n\nB.", "</think>\nThe answer is \\boxed{4}.")
    assert r.closed and final_answer(out) == "The answer is \\boxed{4}."
    r = extract_reasoning("pre<thought>x\n\ny</thought>z")
    assert (r.head, r.body, r.tail) == ("pre<thought>", "x\n\ny", "</thought>z")
    r = extract_reasoning("template opened it\n\nno close")  # the chat template opened <think>
    assert (r.head, r.body, r.tail) == ("", "template opened it\n\nno close", "") and not r.closed
    assert final_answer("no tags at all") == "no tags at all"
    for trace in HAND_TRACES:
        r = extract_reasoning(trace)
        assert r.head + r.body + r.tail == trace


# ---- the cut -----------------------------------------------------------------------------------

# step lengths 4, 2, 6, 8 (total 20): normalized timesteps 0.2, 0.3, 0.6, 1.0
CUT_TRACE = "aaaa\n\nbb\n\ncccccc\n\ndddddddd"


@pytest.mark.parametrize(("tau", "count", "actual", "prefix"), [
    (0.1, 2, 0.3, "aaaa\n\nbb"),  # nearest is step 0 (0.2), raised to the 2-step minimum
    (0.3, 2, 0.3, "aaaa\n\nbb"),  # exactly step 1
    (0.5, 3, 0.6, "aaaa\n\nbb\n\ncccccc"),  # |0.6-0.5| = 0.1 beats |0.3-0.5| = 0.2
    (0.7, 3, 0.6, "aaaa\n\nbb\n\ncccccc"),  # 0.1 from step 2, 0.3 from step 3
    (0.9, 4, 1.0, CUT_TRACE),  # 0.1 from step 3
])
def test_cut_picks_the_step_nearest_tau(tau, count, actual, prefix):
    steps = split_steps(CUT_TRACE)
    assert timesteps(steps) == pytest.approx([0.2, 0.3, 0.6, 1.0])
    cut = cut_at(steps, tau)
    assert (cut.count, cut.index, cut.target) == (count, count - 1, tau)
    assert cut.actual == pytest.approx(actual)
    assert steps.prefix(cut.count) == prefix


def test_cut_minimum_steps_and_ties():
    steps = split_steps("aa\n\nbb\n\ncc\n\ndd")  # timesteps 0.25, 0.5, 0.75, 1.0
    assert cut_at(steps, 0.625).count == 2  # a tie goes to the earlier step
    assert cut_at(steps, 0.1, min_steps=3).count == 3
    assert cut_at(steps, 0.1, min_steps=1).count == 1
    with pytest.raises(ExplabError, match="cannot be cut"):
        cut_at(split_steps("just one step"), 0.5)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ExplabError, match=r"outside \(0, 1\)"):
            cut_at(steps, bad)


# ---- the seven interventions ---------------------------------------------------------------------

TRACE = ("Okay, I need the product of 5 and 4.\n\n"
         "First, 2 + 3 = 5, so the first factor is 5.\n\n"
         "Now 5 times 4 is 20, since 5 + 5 + 5 + 5 = 20.\n\n\n"
         "Let me double check: 20 / 4 = 5.\n\n"
         "So the answer is 20.")
STEPS = split_steps(TRACE)  # the authors' segmentation: step 3 starts with the third newline
# step lengths 36, 43, 46, 33, 20 of 178: timesteps ≈ 0.202, 0.444, 0.702, 0.888, 1.0 → τ = 0.7 keeps steps 0-2
CUT = cut_at(STEPS, 0.7)
KEPT = TRACE[: TRACE.index(" = 20.") + len(" = 20.")]  # the text through step 2


class ScriptedGenerator:
    """The Generator interface (``generate(requests)``) with scripted replies; records the requests."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def generate(self, requests, params=None):
        requests = as_requests(requests, params)
        self.requests += requests
        return [GenerationResult(prompt_token_ids=[1], completions=[
            Completion(text=self.reply(r, j), token_ids=[2, 3], finish_reason="stop") for j in range(r.params.n)])
            for r in requests]


def _rows(names, tau=0.7, question="What is 5 times 4?"):
    cut = cut_at(STEPS, tau)
    out = []
    for name in names:
        index, paragraph = (-1, "")
        if name == "add_random_text":
            index, paragraph = iv.choose_paragraph(POOL, derive_seed(0, "m", "item", tau, name))
        out.append({"model": "m", "item_id": "item", "question": question, "output": TRACE, "tau_target": tau,
                    "tau_actual": cut.actual, "cut_count": cut.count, "intervention": name, "paragraph": paragraph,
                    "pool_index": index})
    return pd.DataFrame(out)


POOL = ["The first paragraph of the pool talks about basalt, a volcanic rock that cools fast at the surface.",
        "The second paragraph of the pool is about lighthouses, towers that guide ships along dangerous coasts."]
DECODING = {k: v.model_dump() for k, v in Config().intervention_decoding.items()}


def test_fixed_trace_cut():
    ts = timesteps(STEPS)
    assert len(STEPS) == 5 and STEPS.seps[2] == "\n\n" and STEPS.steps[3].startswith("\nLet me")
    assert [len(x) for x in STEPS.steps] == [36, 43, 46, 33, 20]
    assert ts == pytest.approx([36 / 178, 79 / 178, 125 / 178, 158 / 178, 1.0])
    nearest = int(np.argmin([abs(t - 0.7) for t in ts]))
    assert CUT.count == nearest + 1 == 3  # steps 0, 1, 2 kept; step 2 is the last
    assert STEPS.prefix(CUT.count) == KEPT
    blank = split_steps(TRACE, "blank_lines")  # the other segmentation: the run of newlines is one separator
    assert len(blank) == 5 and blank.seps[2] == "\n\n\n"
    assert [len(x) for x in blank.steps] == [36, 43, 46, 32, 20]
    assert timesteps(blank) == pytest.approx([36 / 177, 79 / 177, 125 / 177, 157 / 177, 1.0])
    assert blank.prefix(cut_at(blank, 0.7).count) == KEPT


def test_insert_random_characters_edits_only_the_last_step():
    last = STEPS.steps[CUT.index]
    for ratio in (0.5, 0.0, 0.1, 1.3):
        p = iv.perturb_local("insert_random_characters", STEPS, CUT, seed=11, ratio=ratio)
        head = TRACE[: TRACE.index(last)]
        assert p.prefix.startswith(head) and p.prefix == head + p.text  # steps before untouched
        assert (p.action, p.step) == ("edit_last", CUT.index)
        added = 0 if ratio == 0 else max(1, round(min(ratio, 1.0) * len(last)))  # the authors' clamp
        assert len(p.text) - len(last) == added == p.meta["inserted"] == len(p.meta["positions"])
        kept = [c for i, c in enumerate(p.text) if i not in set(p.meta["positions"])]
        assert "".join(kept) == last  # the original characters, in order
        assert all(p.text[i] in iv.ALPHABET for i in p.meta["positions"])
    a = iv.perturb_local("insert_random_characters", STEPS, CUT, seed=11, ratio=0.5)
    b = iv.perturb_local("insert_random_characters", STEPS, CUT, seed=11, ratio=0.5)
    c = iv.perturb_local("insert_random_characters", STEPS, CUT, seed=12, ratio=0.5)
    assert a == b and a.text != c.text
    with pytest.raises(ExplabError, match="negative"):
        iv.perturb_local("insert_random_characters", STEPS, CUT, seed=1, ratio=-0.1)


def test_insert_random_characters_inserts_at_least_one_and_clamps_the_ratio():
    rng = np.random.default_rng(0)
    for text, ratio, count in [("ab", 0.1, 1), ("", 0.5, 1), ("abcd", 0.01, 1), ("abcd", 1.3, 4), ("abcd", 7.0, 4),
                               ("abcdefghij", 0.5, 5), ("abc", 0.0, 0)]:
        out, positions = iv.insert_random_characters(text, ratio, rng)
        assert len(out) - len(text) == len(positions) == count, (text, ratio)


def test_add_random_text_replaces_the_last_step():
    index, paragraph = iv.choose_paragraph(POOL, 5)
    assert (index, paragraph) == iv.choose_paragraph(POOL, 5) and paragraph == POOL[index]
    p = iv.perturb_local("add_random_text", STEPS, CUT, seed=0, paragraph=paragraph, pool_index=index)
    head = TRACE[: TRACE.index(STEPS.steps[CUT.index])]
    assert p.prefix == head + paragraph and (p.action, p.step, p.meta["pool_index"]) == ("replace_last", 2, index)
    assert STEPS.steps[CUT.index] not in p.prefix
    with pytest.raises(ExplabError, match="empty"):
        iv.choose_paragraph([], 0)


MODELS = {"m": {"instruction": "Please reason step by step.", "opening": "Okay, so I need to"}}


def test_llm_interventions_place_the_output_as_they_say():
    prompts = load_prompts()
    llm = ScriptedGenerator(lambda r, j: f"  <<{r.params.temperature}:{r.params.seed}>>\n")
    names = list(iv.LLM_INTERVENTIONS)
    out = stages.perturb(_rows(names), llm=llm, prompts=prompts, decoding=DECODING, ratio=0.5, seed=0, models=MODELS)
    by = out.set_index("intervention")
    requests = dict(zip(names, llm.requests, strict=True))
    before_last = TRACE[: TRACE.index(STEPS.steps[2])]  # lead, steps 0-1 and the separator after step 1
    for name in names:
        req, row = requests[name], by.loc[name]
        written = f"<<{req.params.temperature}:{req.params.seed}>>"
        if name == "unrelated":  # the reply was seeded with the model's opening words, which go first
            assert req.assistant_prefix == "Okay, so I need to"
            written = "Okay, so I need to " + written
        else:
            assert req.assistant_prefix == ""
        assert row["intervention_text"] == written  # stripped LLM output
        user = req.messages[-1].content
        if name in ("complete_step", "wrong_reasoning", "unrelated"):  # the last kept step is replaced
            assert row["perturbed_trace"] == before_last + written
            assert (row["action"], row["edited_step"]) == ("replace_last", 2)
        if name != "unrelated":  # the question carries the model's step-by-step instruction
            assert "What is 5 times 4?\n\nPlease reason step by step." in user
        if name in ("complete_step", "wrong_reasoning"):  # the reasoning before the replaced step, one step a line
            assert STEPS.steps[0] + "\n" + STEPS.steps[1] + "\n\n" in user and STEPS.steps[2] not in user
        if name == "wrong_fact":  # appended after the whole prefix with "\n\n"; it saw the steps one a line
            assert row["perturbed_trace"] == KEPT + "\n\n" + written
            assert (row["action"], row["edited_step"]) == ("append", -1)
            assert "\n".join(STEPS.steps[:3]) + "\n\n" in user
        if name == "rewrite_trace":  # the whole prefix (steps between blank lines) is replaced by the paraphrase
            assert row["perturbed_trace"] == written and row["action"] == "rewrite"
            assert KEPT in user and STEPS.steps[3].strip() not in user
        if name == "unrelated":
            topic = json.loads(row["intervention_meta"])["topic"]
            assert topic in prompts.topics and topic in user and "5 times 4" not in user
        d = DECODING[name]
        assert (req.params.temperature, req.params.top_p, req.params.max_tokens) == (
            d["temperature"], d["top_p"], d["max_tokens"])
    assert requests["complete_step"].params.temperature == 0.0 == requests["rewrite_trace"].params.temperature
    assert (requests["wrong_reasoning"].params.temperature, requests["wrong_reasoning"].params.top_p) == (0.7, 0.9)
    assert requests["unrelated"].params.temperature == 1.0
    # the same seeds give the same requests; another item gets other seeds
    again = ScriptedGenerator(llm.reply)
    stages.perturb(_rows(names), llm=again, prompts=prompts, decoding=DECODING, ratio=0.5, seed=0, models=MODELS)
    assert again.requests == llm.requests
    other = ScriptedGenerator(llm.reply)
    stages.perturb(_rows(names).assign(item_id="other"), llm=other, prompts=prompts, decoding=DECODING,
                   ratio=0.5, seed=0, models=MODELS)
    assert other.requests[2].params.seed != llm.requests[2].params.seed


def test_paraphrase_is_resplit_and_joined_with_blank_lines():
    llm = ScriptedGenerator(lambda r, j: "  First, 2 + 3 = 5.  \n\n\n\nThen 5 · 4 = 20.\n\n  \n\nDone.  ")
    out = stages.perturb(_rows(["rewrite_trace"]), llm=llm, prompts=load_prompts(), decoding=DECODING, ratio=0.5,
                         seed=0)
    assert out.loc[0, "perturbed_trace"] == "First, 2 + 3 = 5.\n\nThen 5 · 4 = 20.\n\nDone."
    assert iv.rejoin_paraphrase("one line\ntwo lines") == "one line\ntwo lines"


def test_every_intervention_through_the_batch_function():
    llm = ScriptedGenerator(lambda r, j: "NEW")
    out = stages.perturb(_rows(list(iv.INTERVENTIONS)), llm=llm, prompts=load_prompts(), decoding=DECODING,
                         ratio=0.5, seed=3)
    assert list(out["intervention"]) == list(iv.INTERVENTIONS) and len(llm.requests) == 5
    local = out.set_index("intervention")
    assert local.loc["add_random_text", "intervention_text"] in POOL
    chars = local.loc["insert_random_characters", "intervention_text"]
    assert len(chars) == len(STEPS.steps[2]) + round(0.5 * len(STEPS.steps[2]))
    # the forced-doubt ablation appends each marker in a new paragraph after the intervention
    marked = stages.add_markers(out, markers=["Wait", "Hmm, wait,"])
    assert len(marked) == 3 * len(out) and set(marked["marker"]) == {"", "Wait", "Hmm, wait,"}
    m = marked[marked["marker"] == "Wait"].set_index("intervention")
    assert m.loc["complete_step", "resume_trace"] == m.loc["complete_step", "perturbed_trace"] + "\n\nWait"
    assert iv.append_marker("ends with newline\n", "Wait") == "ends with newline\nWait"


def test_unknown_intervention_is_one_clear_error():
    with pytest.raises(ExplabError, match="unknown intervention 'paraphrase'"):
        iv.perturb_local("paraphrase", STEPS, CUT, seed=0)
    with pytest.raises(ExplabError, match="unknown intervention"):
        iv.apply_llm("nope", STEPS, CUT, "x")


# ---- config and item errors ---------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("interventions=[complete_step, paraphrase]", "unknown intervention 'paraphrase'"),
    ("timesteps=[0.1, 1.2]", r"outside \(0, 1\)"),
    ("timesteps=[0.0]", r"outside \(0, 1\)"),
    ("random_char_ratio=-0.5", "greater than or equal to 0"),
    ("intervention_decoding={add_random_text: {temperature: 1.0}}", "not an LLM intervention"),
    ("doubt.markers=['']", "marker is empty"),
])
def test_bad_config_is_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(Config, TINY, [override])
    assert "\n" not in str(err.value)


def test_malformed_items():
    entry = {"spec": "synthetic:x", "domain": "Math", "question_field": "question", "answer_field": "answer",
             "id_field": None, "choices_fields": []}
    with pytest.raises(ExplabError, match="no question in field 'question'"):
        normalize_item({"prompt": "2+2?", "answer": "4"}, entry=entry, seed=0)
    with pytest.raises(ExplabError, match="no answer in field 'answer'"):
        normalize_item({"question": "2+2?", "answer": None}, entry=entry, seed=0)
    mc = {**entry, "answer_field": "right", "choices_fields": ["right", "w1", "w2"]}
    item = normalize_item({"question": "Pick", "right": "yes", "w1": "no", "w2": "maybe"}, entry=mc, seed=0)
    letter = item["reference_answer"][1]
    assert f"({letter}) yes" in item["question"] and item["reference_answer"] == f"({letter}) yes"


def test_references_kept_as_the_paper_filters():
    from jobs.cot_robustness.job import mark_kept

    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    refs = pd.DataFrame([{"model": "m", "domain": "Math", "item_id": f"q{i}", "output": "x" * n,
                          "correct": i != 0, "closed_think": i != 1, "n_steps": 1 if i == 2 else 5,
                          "reference_answer": "A" if i in (3, 4, 5) else str(i)} for i, n in enumerate(lengths)])
    config = load_config(Config, TINY, ["references.keep_only_correct=true", "references.require_closed_think=true",
                                        "datasets=[{domain: Math, spec: 'synthetic:cot_arithmetic', "
                                        "drop_longest_fraction: 0.1, max_per_answer: 2}]"])
    out = mark_kept(refs, config).set_index("item_id")
    assert out["drop_reason"].to_dict() == {
        "q0": "answered incorrectly", "q1": "think block not closed", "q2": "fewer than 2 steps", "q3": "", "q4": "",
        "q5": "over 2 items with this answer", "q6": "", "q7": "", "q8": "", "q9": "among the longest outputs"}
    assert out["kept"].sum() == 5 and not out.loc[out["drop_reason"] != "", "kept"].any()


def test_synthetic_items_have_checkable_answers():
    for row in arithmetic_items(n=20, seed=1):
        expr = row["question"].removeprefix("Compute ").rstrip(".").replace("×", "*")
        assert str(eval(expr)) == row["answer"]  # noqa: S307 - our own generated arithmetic
    for row in logic_items(n=20, seed=1):
        facts = [f.split(" is taller than ") for f in row["question"].split(".")[:3]]
        taller = {a.strip(): b.strip() for a, b in facts}
        tallest = (set(taller) - set(taller.values())).pop()
        shortest = (set(taller.values()) - set(taller)).pop()
        assert row["answer"] == (shortest if "shortest" in row["question"] else tallest)



def test_word_problems_have_checked_answers():
    rows = word_problem_items(n=40, seed=3, low=2, high=9)
    assert len({r["id"] for r in rows}) == 40
    for row in rows:
        words = row["question"].split()
        start, change = int(words[2]), next(int(w) for w in words[5:] if w.isdigit())
        gain = any(v in row["question"] for v in ("buys", "gets", "finds"))
        assert int(row["answer"]) == (start + change if gain else start - change) >= 2, row
    assert [r["question"] for r in word_problem_items(n=5, seed=3)] == [r["question"] for r in rows[:5]]
    with pytest.raises(ExplabError, match="low <= high"):
        word_problem_items(n=1, low=9, high=2)
    adds = addition_items(n=81, seed=3, low=1, high=9)
    assert len({r["question"] for r in adds}) == 81  # every pair once
    for row in adds:
        a, b = row["question"].removeprefix("What is ").rstrip("?").split(" + ")
        assert int(row["answer"]) == int(a) + int(b) and 1 <= int(a) <= 9 and 1 <= int(b) <= 9
    with pytest.raises(ExplabError, match="distinct pairs"):
        addition_items(n=82, low=1, high=9)

# ---- judge parsing and metrics on hand-made trajectories -------------------------------------------

def test_judge_parsing_and_units():
    replies = ("Correct", " incorrect.", "**Correct**", "\n\n\n", "Maybe", "correct", "Correct.", " Correct\n")
    assert [judge.parse_verdict(t, strict=False) for t in replies] == [
        "correct", "incorrect", "correct", "unparsable", "unparsable", "correct", "correct", "correct"]
    # strict (the default, the authors' rule): only the exact reply "Correct" counts
    assert [judge.parse_verdict(t) for t in replies] == [
        "correct", "incorrect", "incorrect", "unparsable", "unparsable", "incorrect", "incorrect", "correct"]
    assert [judge.parse_doubt(t) for t in ("Yes.", "no", "", "Perhaps")] == ["yes", "no", "unparsable", "unparsable"]
    text = "Wait, that is wrong. Let me redo it!\n\nSo 4 + 4 = 8? Yes.\n\nDone"
    assert judge.units(text, "sentence", 10, 100) == ["Wait, that is wrong.", "Let me redo it!", "So 4 + 4 = 8?",
                                                      "Yes.", "Done"]
    assert judge.units(text, "step", 2, 6) == ["Wait, ", "So 4 +"]
    assert judge.units(text, "sentence", 2, 100, from_end=True) == ["Yes.", "Done"]


def test_exact_check_reads_the_stated_answer():
    assert [judge.stated_answer(t) for t in ("So 3 + 4 = 7 apples.", "It is \\boxed{\\frac{1}{2}}, not 5",
                                              "1,234 in all.", "no number")] == ["7", "\\frac{1}{2}", "1234", ""]
    assert [judge.exact_verdict(t, "7") for t in ("3 + 4 = 7.", "\\boxed{ 7 } apples", "7.0", "3 + 5 = 8.", "")] == [
        "correct", "correct", "correct", "incorrect", "incorrect"]
    assert judge.exact_verdict("the answer is \\boxed{Ada}", "ada") == "correct"
    rows = pd.DataFrame({"question": ["q", "q"], "reference_answer": ["7", "7"],
                         "output": ["<think>\n7 + 1 = 8\n</think>\n3 + 4 = 7", "<think>\n7\n</think>\nIt is 8."]})
    out = stages.judge_answers(rows, judge_server=None, prompts=None, max_tokens=4, max_answer_chars=100,
                               text_column="output", check="exact")  # no judge LLM is asked
    assert out["judge_raw"].tolist() == ["7", "8"] and out["correct"].tolist() == [True, False]
    assert out["verdict_strict"].tolist() == out["verdict_lenient"].tolist() == ["correct", "incorrect"]
    assert not out["judge_rule_changed"].any()


def _traj():
    """Two perturbed traces × 4 samples (k correct = 3 and 1) and one forced-doubt trace (k = 2)."""
    rows = []
    spec = [("complete_step", "benign", "", [1, 1, 1, 0], [100, 50, 0, 150]),
            ("wrong_fact", "adversarial", "", [0, 1, 0, 0], [300, 200, 100, 400]),
            ("wrong_fact", "adversarial", "Wait", [1, 0, 1, 0], [100, 100, 100, 100])]
    flags = [["yes", "no"], ["no", "no"], [], ["unparsable", "yes", "yes", "no"]]
    for name, cat, marker, correct, lengths in spec:
        for k, (c, n) in enumerate(zip(correct, lengths, strict=True)):
            rows.append({"model": "m", "size_b": 7.0, "domain": "Math", "item_id": "q1", "intervention": name,
                         "category": cat, "tau_target": 0.5, "tau_actual": 0.55, "marker": marker, "sample": k,
                         "correct": bool(c), "verdict": "correct" if c else ("unparsable" if k == 3 else "incorrect"),
                         "continuation_chars": n, "remainder_chars": 100,
                         "length_overhead": metrics.relative_change(n, 100),
                         "length_change": metrics.relative_change(n + 100, 200),
                         "authors_length_overhead": metrics.authors_length_overhead(n + 150, 30, 200),
                         "judge_rule_changed": k == 0 and c == 1,
                         "doubt_flags": flags[k], "doubt_rate": metrics.doubt_rate(flags[k]),
                         "doubt_any": "yes" in flags[k]})
    return pd.DataFrame(rows)


def test_robustness_length_and_doubt_by_hand():
    assert metrics.robustness([True, True, True, False]) == {"n": 4, "k_correct": 3, "at_least_once": 1.0,
                                                             "majority": 1.0, "all": 0.0}
    assert metrics.robustness([True, True, False, False])["majority"] == 0.0  # a tie is no majority
    assert metrics.robustness([False] * 8) == {"n": 8, "k_correct": 0, "at_least_once": 0.0, "majority": 0.0,
                                               "all": 0.0}
    assert metrics.robustness([True] * 8)["all"] == 1.0
    assert math.isnan(metrics.relative_change(5, 0)) and math.isnan(metrics.doubt_rate([]))
    assert metrics.doubt_rate(["unparsable", "yes", "yes", "no"]) == 0.5

    traj = _traj()
    items = metrics.item_robustness(traj).set_index(["intervention", "marker"])
    assert items.loc[("complete_step", ""), ["k_correct", "at_least_once", "majority", "all"]].tolist() == [3, 1, 1, 0]
    assert items.loc[("wrong_fact", ""), ["k_correct", "at_least_once", "majority", "all"]].tolist() == [1, 1, 0, 0]
    assert items.loc[("wrong_fact", "Wait"), "majority"] == 0.0
    # length overhead: complete_step (0 − 50 − 100 + 50) / 4 = −25 %; wrong_fact (200 + 100 + 0 + 300) / 4 = 150 %
    cut_doubt = pd.DataFrame([{"model": "m", "domain": "Math", "item_id": "q1", "tau_target": 0.5,
                               "doubt_rate_prefix": 0.25, "doubt_rate_remainder": 0.5}])
    s = metrics.summarize(traj, cut_doubt)
    math_rows = s[s["domain"] == "Math"].set_index(["intervention", "marker"])
    assert math_rows.loc[("complete_step", ""), "length_overhead_pct"] == pytest.approx(-25.0)
    assert math_rows.loc[("wrong_fact", ""), "length_overhead_pct"] == pytest.approx(150.0)
    assert math_rows.loc[("complete_step", ""), "accuracy"] == 0.75
    assert math_rows.loc[("wrong_fact", ""), "accuracy"] == 0.25
    # doubt after the cut: per-sample rates 0.5, 0, NaN (no units), 0.5 → mean 1/3; any-doubt 2 of 4 samples
    assert math_rows.loc[("complete_step", ""), "doubt_rate_after"] == pytest.approx(1 / 3)
    assert math_rows.loc[("complete_step", ""), "doubt_any_after"] == 0.5
    # sample 3 of each trace got an unparsable verdict, counted as Incorrect
    assert math_rows.loc[("complete_step", ""), "judge_unparsable"] == 0.25
    assert math_rows.loc[("wrong_fact", "Wait"), "judge_unparsable"] == 0.25
    assert (math_rows["doubt_rate_before"] == 0.25).all() and (math_rows["doubt_rate_unperturbed"] == 0.5).all()
    assert set(s["domain"]) == {"Math", "all"}
    # doubt vs recovery: the doubting samples (0 and 3) vs the others (1 and 2), over both interventions
    rec = metrics.doubt_vs_recovery(traj)
    cs = rec[(rec["intervention"] == "complete_step")].set_index("doubt")
    assert cs.loc[True, "accuracy"] == 0.5 and cs.loc[False, "accuracy"] == 1.0
    head = metrics.headline(traj, s)
    assert head["accuracy"] == 0.5 and head["forced_doubt_accuracy"] == 0.5 and head["forced_doubt_delta"] == 0.0
    assert head["accuracy_benign"] == 0.75 and head["accuracy_adversarial"] == 0.25
    assert head["majority_robustness"] == 0.5 and head["length_overhead_pct"] == pytest.approx(62.5)
    # the authors' overhead: (n + 150 − 30 − 200) / 200 = (n − 80) / 200 → complete_step mean n 75: −2.5 %,
    # wrong_fact mean n 250: 85 %; the judge rule changed sample 0 where it was correct (2 of 4 traces' first)
    assert math_rows.loc[("complete_step", ""), "authors_length_overhead_pct"] == pytest.approx(-2.5)
    assert math_rows.loc[("wrong_fact", ""), "authors_length_overhead_pct"] == pytest.approx(85.0)
    assert metrics.authors_length_overhead(10, 50, 100) == -1.0  # floored at 0 before the comparison
    assert math_rows.loc[("complete_step", ""), "judge_rule_changed"] == 0.25
    assert math_rows.loc[("wrong_fact", ""), "judge_rule_changed"] == 0.0
    assert head["authors_length_overhead_pct"] == pytest.approx((-2.5 + 85.0) / 2)
    assert head["judge_rule_changed"] == pytest.approx(2 / 12)


# ---- through Ray: continuation on tiny:llama, items, the tiny run -----------------------------------

T = 32  # reference length in tokens


def _tokenizer():
    from explab.models.tokenizer import byte_tokenizer

    return byte_tokenizer()


def test_greedy_continuation_of_the_unperturbed_prefix_reproduces_the_reference(ray_local):
    """The reference is the job's greedy trace; any prefix of it that text can carry (a random model's
    bytes are often not valid UTF-8, so only the head round-trips) continues into exactly the rest."""
    from explab.servers import get_server
    from jobs.cot_robustness.config import EvaluatedModel
    from jobs.cot_robustness.generation import continuation_request, generate_references
    from jobs.cot_robustness.job import model_info

    generator = get_server("generator", "tiny:llama", {"torch_threads": 1})  # the shared Generator server
    model = model_info(EvaluatedModel(model={"name": "tiny:llama"}, label="L", think_prefix="<think>\n",
                                      temperature=0.0, max_tokens=T))
    rows = [{"item_id": r["id"], "question": r["question"]} for r in arithmetic_items(n=8, seed=0)]
    refs = generate_references(generator, model, rows, seed=0)  # the job's reference traces, greedy
    direct = generator.generate([continuation_request(model, r["question"], "<think>\n",
                                                      {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": T},
                                                      0) for r in rows])
    tok = _tokenizer()

    def clean(ids):  # leading tokens of a reference that survive a text round trip (random bytes often don't)
        return max(k for k in range(len(ids) + 1)
                   if tok(tok.decode(ids[:k]), add_special_tokens=False)["input_ids"] == ids[:k])

    best = max(range(len(rows)), key=lambda i: clean(direct[i].completions[0].token_ids))
    row, output = rows[best], refs[best]["output"]
    ref_ids = direct[best].completions[0].token_ids
    assert output == direct[best].completions[0].text and len(ref_ids) == refs[best]["output_tokens"] == T
    k = clean(ref_ids)
    assert k >= 2, f"no reference whose first tokens round-trip through text (best: {k})"
    for cut in range(k + 1):  # every prefix of the reference that text can carry, the empty one included
        prefix = tok.decode(ref_ids[:cut])
        frame = pd.DataFrame([{**row, "model": "L", "intervention": "none", "tau_target": 0.5, "marker": "",
                               "output": output, "cut_count": 0, "resume_trace": prefix}])
        cont = {"n": 2, "temperature": 0.0, "top_p": 1.0, "max_tokens": T - cut, "seed": None}
        out = stages.continue_traces(frame, generators={"L": generator}, models={"L": model}, continuation=cont,
                                     seed=0)
        assert len(out) == 2
        for r in out.to_dict("records"):
            assert r["continuation"] == output[len(prefix):]  # it goes on exactly where the prefix stops
            assert r["complete_output"] == output and r["length_change"] == 0.0
        result = generator.generate([continuation_request(model, row["question"], "<think>\n" + prefix, cont, 0)])[0]
        assert result.prompt_token_ids[-cut - 3:] == tok(
            "<think>\n" + prefix, add_special_tokens=False)["input_ids"][-cut - 3:]
        assert result.completions[0].token_ids == ref_ids[cut:]
    # a one-character change to the prefix changes what follows
    cont = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": T - k, "seed": None}
    prefix = tok.decode(ref_ids[:k])
    changed = generator.generate([continuation_request(model, row["question"], "<think>\n" + prefix + "Z", cont, 0)])
    assert changed[0].completions[0].token_ids[:8] != ref_ids[k + 1: k + 9]


def test_continuation_resumes_exactly_after_the_perturbed_trace(ray_local):
    """The job's continuation request for a perturbed trace (with a think head in the output) is the
    chat prompt + head + perturbed reasoning, and the server continues exactly that token sequence."""
    from explab.interventions.decode import decode
    from explab.models import load_model
    from explab.servers import get_server
    from explab.servers.types import SamplingParams
    from jobs.cot_robustness.config import EvaluatedModel
    from jobs.cot_robustness.generation import continuation_request
    from jobs.cot_robustness.job import model_info

    generator = get_server("generator", "tiny:llama", {"torch_threads": 1})
    model = model_info(EvaluatedModel(model={"name": "tiny:llama"}, label="L"))
    output = "<think>" + TRACE + "</think>\nThe answer is 20."
    perturbed = iv.perturb_local("insert_random_characters", STEPS, CUT, seed=4).prefix
    frame = pd.DataFrame([{"model": "L", "item_id": "q", "question": "What is 5 times 4?", "intervention": "x",
                           "tau_target": 0.7, "marker": "", "output": output, "cut_count": CUT.count,
                           "resume_trace": perturbed}])
    cont = {"n": 2, "temperature": 0.0, "top_p": 1.0, "max_tokens": 12, "seed": None}
    out = stages.continue_traces(frame, generators={"L": generator}, models={"L": model}, continuation=cont, seed=0)
    loaded, tok = load_model("tiny:llama"), _tokenizer()
    chat = tok.apply_chat_template([{"role": "system", "content": model["system_prompt"]},
                                    {"role": "user", "content": f"What is 5 times 4?\n\n{model['instruction']}"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(chat + "<think>" + perturbed, add_special_tokens=False)["input_ids"]
    local = decode(loaded.model, loaded.tokenizer, [ids], SamplingParams(temperature=0.0, max_tokens=12))
    assert list(out["continuation"]) == [local[0].completions[0].text] * 2
    assert (out["complete_output"] == "<think>" + perturbed + local[0].completions[0].text).all()
    assert (out["remainder_chars"] == len(output) - len("<think>" + KEPT)).all()
    request = continuation_request(model, "What is 5 times 4?", "<think>" + perturbed, cont, 0)
    assert generator.generate([request])[0].prompt_token_ids == ids


def test_malformed_dataset_rows_fail_with_one_line_through_ray_data(ray_local):
    from explab.data import load_dataset
    from jobs.cot_robustness.job import collect, items_dataset

    class Ctx:
        seed = 0

        def dataset(self, spec, **kwargs):
            return load_dataset(spec, seed=0, **kwargs)

    config = load_config(Config, TINY, ["datasets=[{domain: Math, spec: 'synthetic:cot_arithmetic', "
                                        "question_field: problem, kwargs: {n: 2}}]"])
    with pytest.raises(ExplabError, match="no question in field 'problem'") as err:
        collect(items_dataset(Ctx(), config))
    assert "\n" not in str(err.value)


def test_tiny_run_writes_every_table_and_plot(ray_local, tmp_path):
    from explab.job import get_job
    from explab.runs import execute

    job = get_job("cot_robustness")
    config = load_config(job.config, TINY)
    run_dir, result = execute(job, config, tmp_path)
    for table in ("references", "cut_doubt", "trajectories", "robustness", "summary", "doubt_recovery"):
        assert (run_dir / "tables" / f"{table}.parquet").is_file(), table
    for plot in ("accuracy_vs_tau", "length_overhead", "doubt_vs_recovery", "forced_doubt", "robustness_vs_size"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    refs = pd.read_parquet(run_dir / "tables" / "references.parquet")
    traj = pd.read_parquet(run_dir / "tables" / "trajectories.parquet")
    kept = refs[refs["kept"]]
    assert len(refs) == 2 * 2 and len(kept) >= 1
    assert (refs.loc[~refs["kept"], "drop_reason"] != "").all()
    n_markers = 1 + len(config.doubt.markers)
    assert len(traj) == len(kept) * len(config.timesteps) * 7 * n_markers * config.continuation.n
    assert set(traj["intervention"]) == set(iv.INTERVENTIONS) and set(traj["tau_target"]) == set(config.timesteps)
    assert set(traj["marker"]) == {"", "Wait,"} and set(traj["verdict"]) <= {"correct", "incorrect", "unparsable"}
    assert not traj["correct"][traj["verdict"] != "correct"].any()  # unparsable counts as Incorrect
    # every trajectory resumes from its reference's reasoning up to the cut, then the intervention
    for r in traj.sample(20, random_state=0).to_dict("records"):
        ref = kept[(kept["model"] == r["model"]) & (kept["item_id"] == r["item_id"])].iloc[0]
        steps = split_steps(extract_reasoning(ref["output"]).body)
        cut = Cut(r["tau_target"], r["tau_actual"], r["cut_count"])
        assert r["resume_trace"].startswith(steps.prefix(cut.count - 1) if r["action"] != "rewrite" else steps.lead)
        assert r["remainder_chars"] == len(ref["output"]) - len(steps.prefix(cut.count))
        assert r["continuation_chars"] == len(r["continuation"])
    summary = pd.read_parquet(run_dir / "tables" / "summary.parquet")
    assert {"accuracy", "majority", "length_overhead_pct", "doubt_rate_after", "doubt_rate_before"} <= set(summary)
    assert set(summary["domain"]) == set(kept["domain"]) | {"all"}
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["trajectories"] == len(traj) and saved["judge_unparsable"] == pytest.approx(
        float((traj["verdict"] == "unparsable").mean()))
    assert result["accuracy"] == pytest.approx(traj.loc[traj["marker"] == "", "correct"].mean())


# ---- the whole pipeline with scripted models: values, not only shapes ------------------------------

REFERENCE_OUT = ("<think>I need 5 times 4.\n\nFive fours: 4 + 4 + 4 + 4 + 4.\n\nThat is 20.\n\n"
                 "Check: 20 / 5 = 4.</think> The answer is 20.")


def _evaluated(r, j):
    """A scripted reasoning model: the reference trace above; a continuation right on its first sample
    (written "20!" after a paraphrase, "20." otherwise) and wrong on its second."""
    if r.assistant_prefix == "<think>":  # the think prefix alone: a reference trace
        return REFERENCE_OUT.removeprefix("<think>")
    mark = "!" if "PARA" in r.assistant_prefix else "."
    doubt = ", I doubt that step." if r.assistant_prefix.endswith("Wait") else ""  # after the forced marker
    return doubt + (f"</think> The answer is 20{mark}" if j == 0 else "</think> The answer is 7.")


def _judge(r, j):
    """A scripted judge: "Correct" for "20.", the variant "**Correct**" for "20!", "Incorrect" else;
    doubt: "Yes" for a unit that says "doubt"."""
    user = r.messages[-1].content
    if "Reference answer" in user:
        end = user.rsplit("Answer text", 1)[1]
        return "Correct" if "is 20." in end else "**Correct**" if "is 20!" in end else "Incorrect"
    return "Yes" if "doubt" in user.split("Text:", 1)[1] else "No"


def _llm(r, j):
    system = r.messages[0].content
    return "PARA one.\n\nPARA two." if "Paraphrase" in system else "<<LLM step>>"


@pytest.mark.parametrize("strict", [True, False])
def test_pipeline_with_scripted_models_gives_the_expected_values(strict):
    """Every stage in order (references, judge, cut, the seven interventions, a forced-doubt marker,
    continuations, judge, doubt, aggregates) on scripted servers: the accuracies, the judge rule's
    effect, the length overheads and the doubt rates are what the script implies."""
    from jobs.cot_robustness.config import EvaluatedModel
    from jobs.cot_robustness.job import intervention_rows, make_cuts, mark_kept, model_info

    config = load_config(Config, TINY, [f"judge.strict={str(strict).lower()}", "timesteps=[0.5]"])
    prompts = load_prompts()
    model = model_info(EvaluatedModel(model={"name": "tiny:llama"}, label="m", think_prefix="<think>"))
    gen, jdg, llm = ScriptedGenerator(_evaluated), ScriptedGenerator(_judge), ScriptedGenerator(_llm)
    items = pd.DataFrame([{"model": "m", "domain": "Math", "item_id": "q1", "question": "What is 5 times 4?",
                           "reference_answer": "20"}])
    refs = stages.references(items, generators={"m": gen}, models={"m": model}, seed=0, paragraph_tokens=None)
    refs = stages.judge_answers(refs, judge_server=jdg, prompts=prompts, max_tokens=4, max_answer_chars=400,
                                text_column="output", strict=strict)
    assert refs.loc[0, "output"] == REFERENCE_OUT.removeprefix("<think>") and refs.loc[0, "n_steps"] == 4
    refs = mark_kept(refs, config)
    assert refs["kept"].all()
    cuts = make_cuts(refs, [0.5], 2)
    assert cuts.loc[0, "cut_count"] == 2  # steps of 23, 32, 12, 18 characters: 55/85 ≈ 0.65 is nearest 0.5
    rows = pd.DataFrame(intervention_rows(cuts, list(iv.INTERVENTIONS), POOL, 0))
    out = stages.perturb(rows, llm=llm, prompts=prompts, decoding=DECODING, ratio=0.5, seed=0, models={"m": model})
    out = stages.add_markers(out, markers=["Wait"])
    cont = {"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 16, "seed": None}
    traj = stages.continue_traces(out, generators={"m": gen}, models={"m": model}, continuation=cont, seed=0)
    traj = stages.judge_answers(traj, judge_server=jdg, prompts=prompts, max_tokens=4, max_answer_chars=400,
                                text_column="complete_output", strict=strict)
    traj = stages.continuation_doubt(traj, judge_server=jdg, prompts=prompts, doubt=config.doubt.model_dump())
    assert len(traj) == 7 * 2 * 2

    para = traj["intervention"] == "rewrite_trace"
    first = traj["sample"] == 0
    # the first sample is right, the second wrong; after a paraphrase the judge wrote "**Correct**"
    assert (traj.loc[first & para, "verdict_lenient"] == "correct").all()
    assert (traj.loc[first & para, "verdict_strict"] == "incorrect").all()
    assert traj["judge_rule_changed"].tolist() == (first & para).tolist()
    assert traj.loc[first & ~para, "correct"].all() and not traj.loc[~first, "correct"].any()
    assert traj.loc[first & para, "correct"].tolist() == [not strict] * 2
    # the authors' length overhead of one completion, by hand
    row = traj[(traj["intervention"] == "complete_step") & (traj["marker"] == "") & first].iloc[0]
    complete = "I need 5 times 4.\n\n<<LLM step>></think> The answer is 20."
    assert row["complete_output"] == complete
    assert row["authors_length_overhead"] == pytest.approx(
        (len(complete) - len("<<LLM step>>") - len(REFERENCE_OUT.removeprefix("<think>")))
        / len(REFERENCE_OUT.removeprefix("<think>")))
    marked = traj[(traj["intervention"] == "complete_step") & (traj["marker"] == "Wait") & first].iloc[0]
    complete = "I need 5 times 4.\n\n<<LLM step>>\n\nWait, I doubt that step.</think> The answer is 20."
    assert marked["complete_output"] == complete
    assert marked["authors_length_overhead"] == pytest.approx(  # the marker and its break count as inserted text
        (len(complete) - len("<<LLM step>>\n\nWait") - len(REFERENCE_OUT.removeprefix("<think>")))
        / len(REFERENCE_OUT.removeprefix("<think>")))
    # the unrelated step opens with the model's words; the LLM request was seeded with them
    un = traj[(traj["intervention"] == "unrelated") & (traj["marker"] == "")].iloc[0]
    assert un["intervention_text"] == "Okay, so I need to <<LLM step>>"

    summary = metrics.summarize(traj)
    s = summary[(summary["domain"] == "Math") & (summary["marker"] == "")].set_index("intervention")
    expect_para = 0.5 if not strict else 0.0
    assert s.loc["rewrite_trace", "accuracy"] == expect_para and s.loc["complete_step", "accuracy"] == 0.5
    assert s.loc["rewrite_trace", "judge_rule_changed"] == 0.5 and s.loc["complete_step", "judge_rule_changed"] == 0.0
    assert s.loc["complete_step", "majority"] == 0.0 and s.loc["complete_step", "at_least_once"] == 1.0
    head = metrics.headline(traj, summary)
    assert head["accuracy"] == pytest.approx((6 * 0.5 + expect_para) / 7)
    assert head["judge_rule_changed"] == pytest.approx(2 / 28)
    assert head["judge_unparsable"] == 0.0
    # doubt: the judge's "Yes" only where the continuation doubts (after the forced "Wait" marker)
    assert head["doubt_rate_after"] == 0.0
    w = summary[(summary["domain"] == "Math") & (summary["marker"] == "Wait")]
    assert (w["doubt_rate_after"] == 1.0).all() and (w["doubt_any_after"] == 1.0).all()


# ---- the paper config on a GPU node: waves, context lengths, decoding, the gated set -------------

PAPER = TINY.parent / "paper.yaml"


def test_paper_models_run_in_waves_that_fit_one_8_gpu_node():
    from jobs.cot_robustness.job import helper_specs, plan_waves

    config = load_config(Config, PAPER)
    helpers = sum(o.num_gpus for _, o in helper_specs(config, True).values())
    assert helpers == 2  # the intervention LLM and the judge are one server
    assert sum(m.server.num_gpus for m in config.models) + helpers == 14  # all at once: 14 GPUs
    waves = plan_waves(config, True, 8)
    assert [m.name for w in waves for m in w] == [m.name for m in config.models]  # every model, in order
    assert len(waves) == 2 and all(sum(m.server.num_gpus for m in w) + helpers <= 8 for w in waves)
    assert plan_waves(config, True, None) == [config.models] == plan_waves(config, True, 0)
    with pytest.raises(ExplabError, match="needs 2 GPUs beside"):
        plan_waves(config, True, 3)


def test_paper_config_fits_each_models_context_and_decoding():
    config = load_config(Config, PAPER)
    by = {m.name: m for m in config.models}
    for name in ("Phi-4-reasoning-plus", "EXAONE-Deep-32B"):  # 32,768-token context: vLLM refuses more
        assert by[name].server.engine["max_model_len"] <= 32768
    phi = by["Phi-4-reasoning-plus"]
    assert (phi.temperature, phi.top_p, phi.top_k) == (0.8, 0.95, 50)
    assert config.segmentation == "authors" and config.judge.strict
    assert [d.gated for d in config.datasets] == [False, True, False]


def test_gated_dataset_without_a_token_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from jobs.cot_robustness.job import check_gated

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    config = load_config(Config, PAPER)
    with pytest.raises(ExplabError, match=r"hf:Idavidrein/gpqa:gpqa_diamond is gated .*HF_TOKEN") as err:
        check_gated(config)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    check_gated(config)  # a token: no error
    check_gated(load_config(Config, TINY))  # nothing gated
