"""The job's config: the paper's settings as defaults (SPECS-2 §1; LLaVA-1.5-7B's recipe where models differ)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section
from explab.models import ModelSpec
from explab.servers import ServerOptions
from explab.train import LoraConfig, TrainerConfig
from jobs.vlm_compression.widthwise import Salience

Method = Literal["layerwise", "widthwise"]
# none: zero-shot; mm: projector only; sft: full fine-tuning (or LoRA with recovery.lora); kd: logit KD;
# hidden_kd: hidden-state KD; sft_hidden: alpha * hidden KD + (1 - alpha) * CE (the paper's best)
Recovery = Literal["none", "mm", "sft", "lora", "kd", "hidden_kd", "sft_hidden"]


def one_or_many(value: Any) -> Any:
    """A scalar is a one-element list (a sweep trial sets one method / ratio / mode / fraction)."""
    return [value] if isinstance(value, (str, int, float)) else value


class LayerConfig(Section):
    """ShortGPT: block influence on ``n_samples`` calibration samples; ``angular``: the contiguous variant."""

    n_samples: int = Field(50, ge=1)
    angular: bool = False
    batch: int = Field(4, ge=1)  # calibration requests per server call (each returns L + 1 [T, d] captures)


class WidthConfig(Section):
    """LLM-Pruner block-wise: Taylor salience from the SFT loss on ``n_samples`` calibration samples
    (truncated to ``max_length`` tokens, the authors' ``seq_len_prune``); local ratio inside the
    end-exclusive block ranges (None: every block)."""

    n_samples: int = Field(10, ge=1)
    max_length: int | None = Field(128, ge=1)
    salience: Salience = "first"
    attn_layers: tuple[int, int] | None = (3, 21)
    mlp_layers: tuple[int, int] | None = (3, 20)


class RecoveryConfig(Section):
    """Recovery training after pruning: one run per mode x data fraction (``none`` = zero-shot rows)."""

    modes: list[Recovery] = Field(default_factory=lambda: ["none", "sft_hidden"], min_length=1)
    fractions: list[float] = Field(default_factory=lambda: [0.05], min_length=1)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the KD term in sft_hidden
    tau: float = Field(2.0, gt=0)
    logit_kd: Literal["kl", "rkl"] = "kl"
    hidden_layers: list[int] = Field(default_factory=lambda: [-1])  # InternVL's hidden_states[-1]
    projector: list[str] = Field(default_factory=lambda: ["multi_modal_projector"])  # what `mm` trains
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(
        r=16, alpha=32.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]))
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(lr=2e-5, batch_size=16, steps=100))
    epochs: float | None = 1.0  # steps from the data size (fraction x rows / batch); None: trainer.steps

    _lists = field_validator("modes", "fractions", mode="before")(one_or_many)

    @model_validator(mode="after")
    def _check(self) -> RecoveryConfig:
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError("recovery.fractions must lie in (0, 1]: e.g. [0.01, 0.05, 0.1, 1.0]")
        return self


class BenchmarkSource(Section):
    """One of the paper's benchmarks (`jobs.vlm_compression.benchmarks`): ``name``, and where to read it
    (``source``: a dataset spec, ``hf:<id>[:<config>]``, ``disk:<dir>`` or ``parquet:<path>``; None: its Hub
    dataset), the ``split`` (None: the benchmark's), the first ``limit`` rows; ``images``: GQA's images table."""

    name: Literal["mmmu", "scienceqa", "mathvista", "ai2d", "mme", "pope", "docvqa", "gqa"]
    source: str | None = None
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    images: str | None = None


class DataConfig(Section):
    """The synthetic shapes world (`jobs.vlm_compression.data`): scenes for calibration, training and
    evaluation (each scene gives three questions) and sentences for perplexity. ``images: false`` puts
    the scene's description into the question, for text-only backbones.

    ``sources``: the paper's benchmarks, evaluated next to the synthetic ones listed in ``benchmarks``;
    ``train``: a LLaVA-style conversation JSON (`jobs.vlm_compression.mix`) that replaces the synthetic
    training / calibration rows (its image paths relative to ``image_root``, default the file's folder;
    the first ``train_limit`` records); ``max_new_tokens``: the greedy answer's length for open questions."""

    images: bool = True
    image_size: int = Field(32, ge=8)
    n_train_scenes: int = Field(200, ge=1)
    n_eval_scenes: int = Field(100, ge=1)
    n_ppl_texts: int = Field(50, ge=1)
    benchmarks: list[str] = Field(default_factory=lambda: ["shapes_colour", "shapes_count", "shapes_yesno"])
    sources: list[BenchmarkSource] = Field(default_factory=list)
    train: str | None = None
    image_root: str | None = None
    train_limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(16, ge=1)


class Config(JobConfig):
    model: ModelSpec = ModelSpec(name="llava-hf/llava-1.5-7b-hf")
    server: ServerOptions = ServerOptions()
    methods: list[Method] = Field(default_factory=lambda: ["layerwise", "widthwise"], min_length=1)
    ratios: list[float] = Field(default_factory=lambda: [0.15, 0.30, 0.45, 0.60], min_length=1)
    layer: LayerConfig = LayerConfig()
    width: WidthConfig = WidthConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    data: DataConfig = DataConfig()
    eval_batch: int = Field(16, ge=1)  # requests in flight to a server at once

    _lists = field_validator("methods", "ratios", mode="before")(one_or_many)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError("ratios are compression fractions of the decoder blocks: each in (0, 1)")
        return self
