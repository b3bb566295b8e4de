"""Plain-data intervention specs (pydantic; JSON/YAML expressible, picklable).

Position semantics (:class:`Positions`) are per sequence and independent of left padding: position 0
is the first real (non-pad) token of a row. A row's tokens are split into the *prompt*, positions
``[0, P)``, and the *generated* tokens, positions ``[P, P+G)``. ``P`` is the number of real tokens of
the row's first forward pass (the prefill), unless ``prompt_lengths`` is given to ``intervene``
(e.g. to mark a teacher-forced response as "generated"). In a single forward pass every token is
prompt. Tower points (``vision.*``, ``text.*``, ``projector``) have no padding and no generated part:
position ``j`` is simply token ``j`` of the tower's sequence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from explab.errors import ExplabError


class Positions(BaseModel):
    """A set of token positions, resolved for each row and each forward pass.

    - ``all``: every real position.
    - ``prompt``: positions ``[0, P)``. ``generated``: positions ``[P, P+G)`` (a generated token is
      "at" the position it is fed back in, so the activation that samples the first generated token
      sits at the last prompt position ``P-1``).
    - ``last``: the newest position of each forward pass (the last prompt token at the prefill, the
      token just fed at each decode step).
    - ``indices``: the listed positions; a negative index counts back from the end of the prompt
      (``-1`` is ``P-1``).
    - ``span``: ``start <= position < end`` (``end`` None: open ended; negative values count back
      from the end of the prompt like ``indices``).
    - ``paragraph``: generated positions whose token lies in paragraph ``paragraph`` (0-based) of the
      generated text. A generated position's paragraph is the number of paragraph breaks (a newline,
      optional whitespace, a newline) in the decoded generated text up to and including its token,
      leading whitespace ignored. So the token that completes a break opens the next paragraph, and
      steering paragraph ``k`` acts on every forward that samples a token of paragraph ``k``.
      Decided from the text decoded so far (needs a tokenizer).
    - ``image``: the row's image tokens in a vision-language model (the positions holding the model's
      image token id, e.g. LLaVA's ``<image>`` expanded by its processor); with ``indices``, only the
      image tokens with those ordinals (0-based, counted over the row's image tokens in order, so
      for one LLaVA image: raster index into the H_t x W_t grid). Only for language-model points.

    A bare string is accepted for kinds without arguments: ``positions: prompt``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["all", "prompt", "generated", "last", "indices", "span", "paragraph", "image"] = "all"
    indices: list[int] | None = None
    start: int | None = None
    end: int | None = None
    paragraph: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _args(self) -> Positions:
        if self.kind == "indices" and not self.indices:
            raise ValueError("positions kind 'indices' needs a non-empty `indices` list")
        if self.kind == "span" and self.start is None:
            raise ValueError("positions kind 'span' needs `start` (and optionally `end`)")
        if self.kind == "image" and self.indices is not None and min(self.indices, default=0) < 0:
            raise ValueError("positions kind 'image' counts image tokens from 0: give `indices` >= 0")
        if self.kind == "paragraph" and self.paragraph is None:
            raise ValueError("positions kind 'paragraph' needs `paragraph` (0-based index)")
        return self


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Capture(_Spec):
    """Record the activation at ``point`` for the positions in ``positions``.

    ``per_step=True`` records the newest position of every forward pass instead (the activation that
    samples each generated token: T_generated rows per sequence in :func:`decode`); ``positions``
    must then be ``all`` or ``last``. ``name`` is the key in ``Session.captures`` (default: point).
    """

    type: Literal["capture"] = "capture"
    point: str
    positions: Positions = Field(default_factory=Positions)
    per_step: bool = False
    name: str | None = None

    @model_validator(mode="after")
    def _step(self) -> Capture:
        if self.per_step and self.positions.kind not in ("all", "last"):
            raise ValueError(
                "a per_step capture records the newest position of each step: leave `positions` as 'all'"
            )
        return self

    @property
    def key(self) -> str:
        return self.name or self.point


class Steer(_Spec):
    """Add ``alpha * vector`` to the activation at ``point`` on the positions in ``positions``."""

    type: Literal["steer"] = "steer"
    point: str
    vector: list[float]
    alpha: float = 1.0
    positions: Positions = Field(default_factory=Positions)


class ProjectOut(_Spec):
    """Remove the component along the unit vector ``direction`` (x -> x - (x.u) u) at ``point``."""

    type: Literal["project_out"] = "project_out"
    point: str
    direction: list[float]
    positions: Positions = Field(default_factory=Positions)


class Knockout(_Spec):
    """In the attention of ``layers`` (None: all), queries in ``queries`` cannot attend to keys in ``keys``.

    A query whose every key would be blocked keeps attending to itself (softmax needs one key).
    """

    type: Literal["knockout"] = "knockout"
    layers: list[int] | None = None
    queries: Positions
    keys: Positions


class Bidirectional(_Spec):
    """In ``layers`` (None: all), tokens at positions ``[start, end)`` attend to each other fully.

    ``image=True`` instead makes each row's image tokens (``Positions(kind="image")``) attend to each
    other fully. Everything else stays causal. With a KV cache, a token only sees span tokens that
    exist when it is processed (in practice: put the span inside the prompt, e.g. the image tokens).
    """

    type: Literal["bidirectional"] = "bidirectional"
    layers: list[int] | None = None
    start: int | None = None
    end: int | None = None
    image: bool = False

    @model_validator(mode="after")
    def _order(self) -> Bidirectional:
        if self.image:
            if self.start is not None or self.end is not None:
                raise ValueError("bidirectional: give either image=true or start/end, not both")
        elif self.start is None or self.end is None or self.end <= self.start:
            raise ValueError("bidirectional span needs start < end (or image: true for the image tokens)")
        return self

    @property
    def span(self) -> Positions:
        if self.image:
            return Positions(kind="image")
        return Positions(kind="span", start=self.start, end=self.end)


Intervention = Annotated[Capture | Steer | ProjectOut | Knockout | Bidirectional, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Intervention)
KINDS = ("capture", "steer", "project_out", "knockout", "bidirectional")


def parse_intervention(
    data: dict[str, Any] | _Spec,
) -> Capture | Steer | ProjectOut | Knockout | Bidirectional:
    """Validate one spec dict (``type`` picks the kind); bad specs raise a one-line :class:`ExplabError`."""
    if isinstance(data, _Spec):
        return data  # type: ignore[return-value]
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        raise ExplabError(
            f"bad intervention spec {data!r}: {where}: {e['msg']} (type is one of {', '.join(KINDS)})"
        ) from None


def parse_interventions(items: Any) -> list[Capture | Steer | ProjectOut | Knockout | Bidirectional]:
    """Validate a list of spec dicts/objects."""
    return [parse_intervention(d) for d in (items or ())]
