"""The LCS job's settings; the defaults are the paper's (FLUX.1-dev, 512², 50 steps, guidance 3.5)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from explab.config import JobConfig, Section
from explab.models import ModelSpec
from explab.servers import ServerOptions
from jobs.lcs.geometry import Origin

# the authors' colours for GenEval's ten colour words (the words themselves are removed from the prompts)
GENEVAL_COLOURS = {"red": "#f50505", "orange": "#f59905", "yellow": "#f5ed05", "green": "#05f561",
                   "blue": "#0515f5", "purple": "#8d05f5", "pink": "#ed05f5", "brown": "#964b00",
                   "black": "#222222", "white": "#dddddd"}
# the authors' 26 plain coloured scenes ("<colour> wall") for the normalisation, each with its seed
WALLS = {"black": 1, "bright purple": 17, "burnt orange": 13, "dark grey": 1, "light blue": 4, "light peach": 1,
         "white": 7, "bright blue": 1, "bright red": 12, "dark blue": 5, "dark purple eggplant colored": 5,
         "light brown": 18, "light purple": 1, "wine red": 18, "bright green": 1, "bright yellow": 18,
         "dark brown": 5, "golden ochre": 12, "light green": 13, "pale yellow": 12, "bright orange": 12,
         "brown": 18, "dark green": 15, "grey": 1, "light grey": 4, "pink": 13}
WALL_COLOURS = list(WALLS)

def _listify(value: Any) -> Any:
    return [value] if value is None or isinstance(value, (int, float, str)) else value


class SubspaceConfig(Section):
    grid: int = Field(6, ge=2)  # HSV grid size g (the shipped parameters: 6 -> 156 colours)
    sample: bool = True  # sample the VAE posterior (latent_dist.sample, as the authors) instead of its mean
    origin: Origin = "axis"  # hue origin o: per-axis mean ("axis") or the authors' scalar mean ("scalar")


class NormalisationConfig(Section):
    prompt: str = "{colour} wall"
    colours: list[str] = Field(default_factory=lambda: list(WALLS), min_length=2)
    seeds: list[int] = Field(default_factory=lambda: list(WALLS.values()))  # one per colour

    @model_validator(mode="after")
    def _one_seed_per_colour(self) -> NormalisationConfig:
        if len(self.seeds) != len(self.colours):
            raise ValueError(f"{len(self.colours)} normalisation colours but {len(self.seeds)} seeds: give "
                             "normalisation.seeds, one per colour")
        return self


class ObservationConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["a red car on a street", "a blue bird on a branch"])
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: list[int] = Field(default_factory=lambda: [0, 9, 19, 29, 39, 49], min_length=1)  # after these steps


class Benchmark(Section):
    """Objects x target colours x seeds. ``prompt`` holds ``{object}`` and no colour word."""

    name: str
    prompt: str = "a photo of a {object}"
    objects: list[str] = Field(min_length=1)
    # hex codes, "families" (the authors' 51: 12 hues x bright/dark/light/muted + black, white, gray) or
    # "geneval" (GenEval's 10 colour words, the authors' colours for them)
    targets: list[str] | Literal["families", "geneval"] = "families"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    modes: list[Literal["global", "local"]] = Field(default_factory=lambda: ["local"], min_length=1)
    object_seeds: dict[str, list[int]] = Field(default_factory=dict)  # these objects' own seeds (else ``seeds``)
    segment: bool = True  # measure inside the segmenter's object mask (false: the intervention's own tokens)

    @field_validator("prompt")
    @classmethod
    def _has_object(cls, value: str) -> str:
        if "{object}" not in value:
            raise ValueError("the prompt must hold {object}, where each object's word goes")
        return value

    @model_validator(mode="after")
    def _seeded_objects_listed(self) -> Benchmark:
        unknown = sorted(set(self.object_seeds) - set(self.objects))
        if unknown:
            raise ValueError(f"object_seeds names {unknown}, which are not among the benchmark's objects: "
                             "list them in objects or remove them from object_seeds")
        return self

    def seeds_of(self, obj: str) -> list[int]:
        return self.object_seeds.get(obj, self.seeds)


class InterventionConfig(Section):
    # intervene after these steps (0-based step-end callbacks; 8 is the authors' t = 9, after nine steps)
    steps: list[int] = Field(default_factory=lambda: [8], min_length=1)
    blends: list[float | None] = Field(default_factory=lambda: [None])  # gamma: 1 mean shift, 0 per-token HSL;
    # None: the authors' schedule (steer.authors_blend)
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
    threshold: float = Field(0.0, ge=0, le=1)  # lowest instance score kept (the authors keep every instance)


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
