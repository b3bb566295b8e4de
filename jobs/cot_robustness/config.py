"""The job's typed config: defaults are the paper's settings (see configs/paper.yaml for the full grid)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section, Seed
from explab.models import ModelSpec
from explab.servers import ServerOptions
from jobs.cot_robustness.perturbations import INTERVENTIONS, LLM_INTERVENTIONS
from jobs.cot_robustness.traces import Segmentation

INSTRUCT = "Qwen/Qwen2.5-32B-Instruct"
PAPER_SEED = 80129


class Decoding(Section):
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)
    seed: Seed | None = None  # None: derived from the run's seed


class EvaluatedModel(Section):
    """A reasoning model under test, with its own prompt and reference-trace decoding."""

    model: ModelSpec
    label: str = ""  # name in tables and plots (default: the last part of the model name)
    size_b: float | None = Field(None, gt=0.0)  # parameters in billions, for robustness vs size
    system_prompt: str | None = "You are a helpful AI assistant."  # None: no system message
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    think_prefix: str = ""  # what the assistant turn starts with when the chat template does not open <think>
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # reference traces only (Phi-4-reasoning-plus: 50); 0 = no top-k cut
    max_tokens: int = Field(32768, ge=1)
    # the words an `unrelated` step opens with, as this model opens its own traces (the intervention
    # LLM's reply is seeded with them)
    opening: str = "Okay, so I need to"
    server: ServerOptions = ServerOptions()

    @property
    def name(self) -> str:
        return self.label or self.model.name.rstrip("/").split("/")[-1]


class DatasetEntry(Section):
    """One task set: a dataset spec and which fields hold the question and the reference answer."""

    domain: str  # Math, Science, Logic, ...
    spec: str  # hf:<name>[:<config>], parquet:/jsonl:/csv:<path>, synthetic:<name>
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None  # default: the row's position
    choices_fields: list[str] = []  # multiple choice: the first holds the correct option; shuffled per item
    # filters on the kept (correct) references of each model, as the paper's MATH setup: drop this top
    # fraction of the longest outputs, and keep at most this many items per reference answer
    drop_longest_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_per_answer: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = {}  # passed to the loader (e.g. n for synthetic sets)
    gated: bool = False  # the hub set needs accepted terms and a token (GPQA): checked before anything runs


class ParagraphPool(Section):
    """Encyclopedic paragraphs for add_random_text: documents split at blank lines, long ones kept."""

    spec: str = "hf:wikimedia/wikipedia:20231101.en"
    split: str = "train"
    field: str = "text"
    documents: int = Field(1000, ge=1)  # how many documents to read from the start of the set
    min_chars: int = Field(100, ge=1)
    streaming: bool = True


class References(Section):
    seed: Seed | None = PAPER_SEED  # sampling seed of the reference traces (None: the run's seed)
    keep_only_correct: bool = True  # the paper keeps only questions the model answered correctly
    require_closed_think: bool = False  # also drop traces whose think block never closed
    # Generate the trace in rounds of at most this many tokens, continuing from the text so far and
    # starting a new paragraph ("\n\n") between rounds. None (the paper): one call. Tiny random models
    # never write blank lines on their own; this gives their traces steps.
    paragraph_tokens: int | None = Field(None, ge=1)


class Continuation(Section):
    n: int = Field(8, ge=1)
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(32768, ge=1)
    seed: Seed | None = None  # None: derived from the run's seed per trajectory


class Judge(Section):
    model: ModelSpec = ModelSpec(name=INSTRUCT)
    server: ServerOptions = ServerOptions()
    max_tokens: int = Field(10, ge=1)
    max_answer_chars: int = Field(8000, ge=1)  # the answer extract's last characters go to the judge
    # True (the authors'): only the exact reply "Correct" counts; False: the first word, any case
    strict: bool = True
    # llm (the paper): the judge LLM grades each answer; exact: the answer the output states (its last
    # \boxed{…}, else its last number) must equal the reference, for numeric sets and models too small
    # to grade (the doubt judge stays the LLM)
    check: Literal["llm", "exact"] = "llm"


class Doubt(Section):
    unit: Literal["sentence", "step"] = "sentence"
    max_units: int = Field(20, ge=1)
    max_unit_chars: int = Field(1000, ge=1)
    max_tokens: int = Field(10, ge=1)
    markers: list[str] = ["Wait"]  # forced-doubt ablation: each is appended after the intervention; [] = no ablation

    @field_validator("markers")
    @classmethod
    def _markers(cls, value: list[str]) -> list[str]:
        if any(not m.strip() for m in value):
            raise ValueError("a doubt marker is empty: give text such as 'Wait'")
        if len(set(value)) != len(value):
            raise ValueError("doubt markers repeat: list each once")
        return value


def _check_tau(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"timestep {value!r} is outside (0, 1): use fractions such as 0.1 … 0.9")
    return value


def _check_intervention(value: str) -> str:
    if value not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {value!r}: use one of {', '.join(INTERVENTIONS)}")
    return value


def _default_decoding() -> dict[str, Decoding]:
    return {
        "complete_step": Decoding(temperature=0.0, max_tokens=2048),
        "rewrite_trace": Decoding(temperature=0.0, max_tokens=8192),
        "wrong_reasoning": Decoding(temperature=0.7, top_p=0.9, max_tokens=2048, seed=PAPER_SEED),
        "wrong_fact": Decoding(temperature=0.7, top_p=0.9, max_tokens=2048, seed=PAPER_SEED),
        "unrelated": Decoding(temperature=1.0, top_p=0.9, max_tokens=1024, seed=PAPER_SEED),
    }


class Config(JobConfig):
    seed: Seed = PAPER_SEED
    models: list[EvaluatedModel] = [
        EvaluatedModel(model=ModelSpec(name="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"), size_b=1.5),
    ]
    datasets: list[DatasetEntry] = [
        DatasetEntry(domain="Math", spec="hf:HuggingFaceH4/MATH-500", split="test",
                     question_field="problem", answer_field="answer", id_field="unique_id"),
    ]
    references: References = References()
    # authors: split at every "\n\n" (their code); blank_lines: a run of blank lines is one separator
    segmentation: Segmentation = "authors"
    timesteps: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    timestep: float | None = None  # one τ instead of `timesteps` (what a sweep sets)
    min_steps: int = Field(2, ge=1)
    interventions: list[str] = Field(default_factory=lambda: list(INTERVENTIONS), min_length=1)
    intervention: str | None = None  # one intervention instead of `interventions` (what a sweep sets)
    intervention_model: ModelSpec = ModelSpec(name=INSTRUCT)
    intervention_server: ServerOptions = ServerOptions()
    intervention_decoding: dict[str, Decoding] = Field(default_factory=_default_decoding)
    # insert_random_characters: max(1, round(min(ratio, 1) · len)) characters (none at 0), as the authors
    random_char_ratio: float = Field(0.5, ge=0.0)
    paragraphs: ParagraphPool = ParagraphPool()
    continuation: Continuation = Continuation()
    judge: Judge = Judge()
    doubt: Doubt = Doubt()
    prompts_dir: str | None = None  # a folder of prompt YAML files replacing the packaged ones
    batch_size: int = Field(16, ge=1)  # rows per Ray Data batch
    # GPUs the job's servers may hold at once (None: the cluster's when the job starts). Evaluated
    # models run in waves that fit beside the judge and intervention LLM; a wave's servers stop after it.
    gpus: float | None = Field(None, ge=0.0)

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("no timesteps: give at least one τ in (0, 1), e.g. [0.1, 0.5, 0.9]")
        for t in value:
            _check_tau(t)
        if len(set(value)) != len(value):
            raise ValueError("timesteps repeat: list each once")
        return value

    @field_validator("timestep")
    @classmethod
    def _timestep(cls, value: float | None) -> float | None:
        return None if value is None else _check_tau(value)

    @field_validator("interventions")
    @classmethod
    def _interventions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"no interventions: give some of {', '.join(INTERVENTIONS)}")
        for v in value:
            _check_intervention(v)
        if len(set(value)) != len(value):
            raise ValueError("interventions repeat: list each once")
        return value

    @field_validator("intervention")
    @classmethod
    def _intervention(cls, value: str | None) -> str | None:
        return None if value is None else _check_intervention(value)

    @model_validator(mode="after")
    def _single(self) -> Config:
        """``timestep`` / ``intervention`` (one value, as a sweep trial sets) replace the lists."""
        if self.timestep is not None:
            self.timesteps = [self.timestep]
        if self.intervention is not None:
            self.interventions = [self.intervention]
        return self

    @field_validator("intervention_decoding")
    @classmethod
    def _decoding(cls, value: dict[str, Decoding]) -> dict[str, Decoding]:
        unknown = [k for k in value if k not in LLM_INTERVENTIONS]
        if unknown:
            raise ValueError(f"decoding for {unknown[0]!r}, which is not an LLM intervention: "
                             f"use {', '.join(LLM_INTERVENTIONS)}")
        return {**_default_decoding(), **value}

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[EvaluatedModel]) -> list[EvaluatedModel]:
        if not value:
            raise ValueError("no evaluated models: list at least one under models")
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError("two evaluated models share a label: give each a distinct label")
        return value

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, value: list[DatasetEntry]) -> list[DatasetEntry]:
        if not value:
            raise ValueError("no datasets: list at least one under datasets")
        return value
