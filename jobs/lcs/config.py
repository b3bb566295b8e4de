"""The LCS job's settings; the defaults are the paper's (FLUX.1-dev, 512², 50 steps, guidance 3.5)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section
from explab.models import ModelSpec
from explab.servers import ServerOptions
from jobs.lcs.geometry import Origin

GENEVAL_COLOURS = {"red": "#ff0000", "orange": "#ffa500", "yellow": "#ffff00", "green": "#008000",
                   "blue": "#0000ff", "purple": "#800080", "pink": "#ffc0cb", "brown": "#a52a2a",
                   "black": "#000000", "white": "#ffffff"}  # GenEval's ten colour words, as CSS colours
WALL_COLOURS = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "sky blue", "blue", "navy", "indigo",
                "violet", "purple", "magenta", "pink", "rose", "maroon", "brown", "beige", "olive", "gold",
                "silver", "grey", "black", "white", "turquoise"]  # 26 plain coloured scenes


def _listify(value: Any) -> Any:
    return [value] if value is None or isinstance(value, (int, float, str)) else value


class SubspaceConfig(Section):
    grid: int = Field(6, ge=2)  # HSV grid size g (the shipped parameters: 6 -> 156 colours)
    sample: bool = True  # sample the VAE posterior (latent_dist.sample, as the authors) instead of its mean
    origin: Origin = "axis"  # hue origin o: per-axis mean ("axis") or the authors' scalar mean ("scalar")


class NormalisationConfig(Section):
    prompt: str = "a {colour} wall"
    colours: list[str] = Field(default_factory=lambda: list(WALL_COLOURS), min_length=2)
    seed: int = 0


class ObservationConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["a red car on a street", "a blue bird on a branch"])
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: list[int] = Field(default_factory=lambda: [0, 9, 19, 29, 39, 49], min_length=1)  # after these steps


class Benchmark(Section):
    """Objects x target colours x seeds. ``prompt`` holds ``{object}`` and no colour word."""

    name: str
    prompt: str = "a photo of a {object}"
    objects: list[str] = Field(min_length=1)
    # hex codes, "families" (51: 12 hues x bright/dark/light/muted + black, grey, white) or "geneval" (its 10)
    targets: list[str] | Literal["families", "geneval"] = "families"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    modes: list[Literal["global", "local"]] = Field(default_factory=lambda: ["local"], min_length=1)

    @field_validator("prompt")
    @classmethod
    def _has_object(cls, value: str) -> str:
        if "{object}" not in value:
            raise ValueError("the prompt must hold {object}, where each object's word goes")
        return value


class InterventionConfig(Section):
    steps: list[int] = Field(default_factory=lambda: [9], min_length=1)  # intervene after these steps (0-based)
    blends: list[float | None] = Field(default_factory=lambda: [None])  # gamma: 1 mean shift, 0 per-token HSL;
    # None: the authors' schedule gamma = 1 - mean(beta_t)
    block: int = Field(18, ge=0)  # joint block whose attention locates the object (local mode)
    mass: float = Field(0.8, gt=0, le=1)  # share of attention mass the local mask keeps
    kernel: int = Field(5, ge=1)  # max-pool closing size (odd)

    _lists = field_validator("steps", "blends", mode="before")(classmethod(lambda cls, v: _listify(v)))

    @field_validator("blends")
    @classmethod
    def _unit(cls, value: list[float | None]) -> list[float | None]:
        if any(b is not None and not 0 <= b <= 1 for b in value):
            raise ValueError("every blend gamma must be in [0, 1] (or null for the authors' schedule)")
        return value


class EvaluationConfig(Section):
    # a transformers panoptic segmentation model (Mask2Former); None: the attention mask (local) or whole image
    segmenter: str | None = None
    segmenter_device: str = "auto"


class Config(JobConfig):
    model: ModelSpec = ModelSpec(name="black-forest-labs/FLUX.1-dev", dtype="bfloat16")
    server: ServerOptions = ServerOptions(num_gpus=1.0, max_batch=8)
    size: int = Field(512, ge=1)  # square images, height = width
    steps: int = Field(50, ge=2)
    guidance: float = 3.5
    max_sequence_length: int = Field(512, ge=1, le=512)
    subspace: SubspaceConfig = SubspaceConfig()
    normalisation: NormalisationConfig = NormalisationConfig()
    observation: ObservationConfig = ObservationConfig()
    intervention: InterventionConfig = InterventionConfig()
    benchmarks: list[Benchmark] = Field(default_factory=list)
    evaluation: EvaluationConfig = EvaluationConfig()
    grid_images: int = Field(6, ge=1)  # before/after pairs drawn in the image-grid plot

    @model_validator(mode="after")
    def _steps_in_range(self) -> Config:
        late = [t for t in (*self.observation.steps, *self.intervention.steps) if not 0 <= t < self.steps]
        if late:
            raise ValueError(f"steps {late} are outside a {self.steps}-step run: observe and intervene after "
                             f"steps 0..{self.steps - 1}")
        return self
