"""The job's settings; defaults are the authors' (DPO: sigmoid, beta 0.1, LoRA r 32 on q/v, lr 5e-6,
one epoch, cosine, warmup 0.1)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from explab.config import JobConfig, Section
from explab.models import ModelSpec
from explab.train import DPOConfig, LoraConfig, TrainerConfig
from jobs.finer.benchmark import BuildConfig
from jobs.finer.scenes import SceneConfig
from jobs.finer.tuning import Method


def _paper_trainer() -> TrainerConfig:
    return TrainerConfig(lr=5e-6, batch_size=32, warmup_ratio=0.1, schedule="cosine",
                         lora=LoraConfig(r=32, alpha=64.0, target_modules=["q_proj", "v_proj"]))


class TuningConfig(Section):
    """One FINER-Tuning variant: the objective and which questions the pairs ask."""

    name: str = Field("finer_tuned", pattern=r"^[A-Za-z0-9_]+$")
    method: Method = "dpo"
    mode: Literal["pon", "both", "neg"] = "pon"  # pon: the positive or the negative question per probe (authors)
    format: Literal["answer", "letter"] = "answer"  # answer: the authors' templates; letter: the MC row itself
    epochs: float | None = Field(1.0, gt=0)  # sets trainer.steps from the pair count; None: trainer.steps
    trainer: TrainerConfig = Field(default_factory=_paper_trainer)
    dpo: DPOConfig = Field(default_factory=DPOConfig)


class HubBenchmark(Section):
    """A published benchmark on the Hugging Face hub, read into the job's item schema (`hub.py`).

    The open-ended formats (``vqa``: TextVQA; ``mmhal``: MMHal-Bench; `openended.py`) are answered by greedy
    generation of at most ``max_new_tokens`` (default 32 for ``vqa``, 256 for ``mmhal``) after the question
    and ``instruction`` (default: TextVQA's short-answer line for ``vqa``, none for ``mmhal``); ``mmhal`` needs
    a ``judge`` LLM (served as a `Generator` with ``judge_server`` options) that rates every response."""

    name: str
    data: str  # hf:<dataset id> or local:<path> (parquet / json / jsonl / csv file, or a save_to_disk directory)
    format: Literal["finer_mcq", "pope", "mcq_letter", "vqa", "mmhal"] = "finer_mcq"
    split: str = "test"
    config_name: str | None = None
    limit: int | None = Field(None, ge=1)
    columns: dict[str, str] = Field(default_factory=dict)  # dataset column -> the name the format reads
    kwargs: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int | None = Field(None, ge=1)  # open-ended formats only
    instruction: str | None = None  # open-ended formats only
    judge: ModelSpec | None = None  # mmhal only: the judge LLM
    judge_server: dict[str, Any] = Field(default_factory=dict)
    judge_max_tokens: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _judged(self) -> HubBenchmark:
        if self.format == "mmhal" and self.judge is None:
            raise ValueError(f"benchmark {self.name!r}: format mmhal needs a `judge` model (an instruct LLM)")
        return self

    @property
    def open_ended(self) -> bool:
        return self.format in ("vqa", "mmhal")


class FilterConfig(Section):
    """The filtering pass: a strong VLM that must answer a pair's positive row right for the pair to stay."""

    model: ModelSpec
    server: dict[str, Any] = Field(default_factory=dict)  # HookedModel server options


class CaptionConfig(Section):
    """Benchmark construction from captions: an LLM (served `Generator`) extracts each caption's scene graph.

    ``data``: ``synthetic`` (captions written from the synthetic test scenes, `captions.describe`, their
    rendered images) or a dataset (``hf:<id>`` / ``local:<path>``, as `HubBenchmark`) with ``image`` and
    ``caption`` columns (rename others with ``columns``)."""

    generator: ModelSpec
    server: dict[str, Any] = Field(default_factory=dict)  # Generator server options
    data: str = "synthetic"
    split: str = "test"
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)
    max_tokens: int = Field(256, ge=8)


class Config(JobConfig):
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name="Qwen/Qwen2.5-VL-7B-Instruct")],
                                    min_length=1)
    scenes: SceneConfig = Field(default_factory=SceneConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    n_images: dict[Literal["train", "test"], int] = Field(default_factory=lambda: {"train": 2000, "test": 500})
    synthetic_eval: bool = True  # evaluate on the synthetic test split
    captions: CaptionConfig | None = None  # None: no caption-built items
    filter: FilterConfig | None = None  # None: keep every built item (synthetic answers are checked by construction)
    benchmarks: list[HubBenchmark] = Field(default_factory=list)  # released benchmarks (FINER-CompreCap, POPE, ...)
    tuning: TuningConfig | None = Field(default_factory=TuningConfig)  # None: evaluate the base models only
    ablations: list[TuningConfig] = Field(default_factory=list)  # e.g. SFT, negatives-only
    server: dict[str, Any] = Field(default_factory=dict)  # HookedModel server options (num_gpus, max_batch, ...)

    @model_validator(mode="after")
    def _has_a_paired_set(self) -> Config:
        names = [v.name for v in [self.tuning, *self.ablations] if v is not None]
        if len(set(names)) < len(names):
            raise ValueError(f"tuning and ablations share a name ({names}): give every variant its own `name`")
        if not self.synthetic_eval and self.captions is None and all(b.open_ended for b in self.benchmarks):
            raise ValueError("no multiple-choice set to evaluate (paired accuracy is the headline): keep "
                             "synthetic_eval, add captions, or add a finer_mcq / pope / mcq_letter benchmark")
        return self
