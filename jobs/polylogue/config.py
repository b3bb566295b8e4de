"""The polylogue job's config: defaults are the paper's settings (see configs/paper.yaml)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section
from explab.models import ModelSpec
from explab.servers import ServerOptions
from jobs.polylogue.catalog import load_trait

DEFAULT_TRAITS = ["confident", "uncertain", "careful", "sycophantic", "optimistic", "analytical"]


class ModelEntry(Section):
    """One evaluated model, the layer(s) its polylogue is read at, and its two shared servers."""

    spec: ModelSpec
    layers: list[int] = Field(min_length=1)  # blocks.{l}.resid_post; the first is the steering default
    generator: ServerOptions = ServerOptions()  # plain generation (vLLM on a GPU)
    hooked: ServerOptions = ServerOptions()  # captures and steering
    system_in_user: bool = False  # chat template without a system role (Gemma-2): prepend it to the user turn

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers lists a layer twice")
        return layers

    @property
    def tag(self) -> str:
        """A short name for tables and artifact keys (the last part of the model id)."""
        return self.spec.name.rstrip("/").split("/")[-1].replace("tiny:", "tiny-")


class PersonaSection(Section):
    """Step 1: persona vectors from contrastive system prompts (the persona-vectors recipe)."""

    traits: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAITS), min_length=1)
    n_instructions: int | None = Field(None, ge=1)  # instruction pairs per trait (None: all in the file)
    n_questions: int | None = Field(None, ge=1)  # extraction questions per trait (None: all)
    samples: int = Field(5, ge=1)  # responses per (pair, question, polarity)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    batch_size: int = Field(32, ge=1)
    load: str | None = None  # reuse persona_vectors.safetensors from this file or run directory

    @field_validator("traits")
    @classmethod
    def _known(cls, traits: list[str]) -> list[str]:
        for t in traits:
            load_trait(t)  # unknown or malformed trait -> ConfigError naming the known ones
        if len(set(traits)) != len(traits):
            raise ValueError("persona.traits lists a trait twice")
        return traits


class JudgeSection(Section):
    """Optional judge of trait expression and coherence (a `Generator` call), as in persona vectors."""

    enabled: bool = True
    filter: bool = True  # keep only pairs with pos >= threshold, neg < 100 - threshold (False: record only)
    model: ModelSpec | None = None  # None: the evaluated model judges itself
    server: ServerOptions = ServerOptions()
    threshold: float = Field(50.0, ge=0.0, le=100.0)
    coherence: float | None = Field(50.0, ge=0.0, le=100.0)  # None: coherence is not judged
    max_tokens: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    min_pairs: int = Field(1, ge=1)  # a trait with fewer kept pairs is skipped with a warning (all: an error)
    # first_number: the first number of the greedy reply; weighted: the persona-vectors score, the
    # probability-weighted mean over the 0-100 number tokens of the judge's next token (a HookedModel)
    score: Literal["first_number", "weighted"] = "first_number"
    min_mass: float = Field(0.25, ge=0.0, le=1.0)  # weighted: less probability on numbers → no score


class DataSection(Section):
    """Evaluation questions in the MMLU-Pro schema (question, options, answer letter, category)."""

    spec: str = "hf:TIGER-Lab/MMLU-Pro"
    split: str = "test"
    n_questions: int = Field(1000, ge=2)
    categories: list[str] | None = None  # None: every category
    options: dict[str, Any] = Field(default_factory=dict)  # extra loader kwargs (synthetic: n, n_options)


class PolylogueSection(Section):
    """Step 2: reasoning responses and their trait-alignment time series (and step 3 on them)."""

    enabled: bool = True  # False: steps 2-3 are not run (e.g. in a steering sweep)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1)
    examples: int = Field(3, ge=1)  # correct and incorrect responses drawn in the time-series plot


class ProbeSection(Section):
    """Step 3: polylogue features -> logistic regression -> P(correct), against baselines."""

    series: Literal["cosine", "projection"] = "cosine"
    window: int = Field(32, ge=1)  # tokens in the first/last-window means
    paragraphs: int = Field(4, ge=0)  # per-paragraph means of paragraphs 0..n-1
    folds: int = Field(5, ge=2)
    C: float = Field(1.0, gt=0.0)
    random_draws: int = Field(5, ge=1)  # random-direction baselines averaged


class SteeringSection(Section):
    """Step 4: add alpha * v_trait at one layer only while generating paragraph `stage`."""

    enabled: bool = True
    traits: list[str] | None = None  # None: every persona trait
    stages: list[int] = Field(default_factory=lambda: [0, 1, 2])
    alphas: list[float] = Field(default_factory=lambda: [-8.0, -4.0, 4.0, 8.0])
    alpha: float | None = None  # one strength instead of `alphas` (the sweep's knob)
    layer: int | None = Field(None, ge=0)  # None: each model's first polylogue layer
    vector: Literal["unit", "raw"] = "unit"  # unit: alpha in residual units; raw: coef * mean-diff
    n_questions: int | None = Field(200, ge=1)  # the first n evaluation questions (None: all)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("steering.stages must be a non-empty list of paragraph indices >= 0")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("steering.alphas must list at least one strength")
        return v


class Config(JobConfig):
    models: list[ModelEntry] = Field(
        default_factory=lambda: [ModelEntry(spec=ModelSpec(name="meta-llama/Llama-3.1-8B-Instruct"), layers=[16])],
        min_length=1,
    )
    persona: PersonaSection = PersonaSection()
    judge: JudgeSection = JudgeSection()
    data: DataSection = DataSection()
    polylogue: PolylogueSection = PolylogueSection()
    probe: ProbeSection = ProbeSection()
    steering: SteeringSection = SteeringSection()

    @model_validator(mode="after")
    def _steering_traits(self) -> Config:
        unknown = [t for t in self.steering.traits or [] if t not in self.persona.traits]
        if unknown:
            raise ValueError(f"steering.traits {unknown} are not in persona.traits {self.persona.traits}")
        if self.steering.alpha == 0.0:
            raise ValueError("steering.alpha is 0: the unsteered baseline is always run; give a non-zero strength")
        if not self.polylogue.enabled and not self.steering.enabled:
            raise ValueError("polylogue and steering are both disabled: enable at least one step after the vectors")
        return self

    def steering_traits(self) -> list[str]:
        return list(self.steering.traits or self.persona.traits)

    def steering_alphas(self) -> list[float]:
        return [self.steering.alpha] if self.steering.alpha is not None else list(self.steering.alphas)
