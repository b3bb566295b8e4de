"""Plain-data intervention specs (pydantic; JSON/YAML expressible, picklable).

Position semantics (:class:`Positions`) are per sequence and independent of left padding: position 0
is the first real (non-pad) token of a row. A row's tokens are split into the *prompt*, positions
``[0, P)``, and the *generated* tokens, positions ``[P, P+G)``. ``P`` is the number of real tokens of
the row's first forward pass (the prefill), unless ``prompt_lengths`` is given to ``intervene``
(e.g. to mark a teacher-forced response as "generated"). In a single forward pass every token is
prompt. Tower points (``vision.*``, ``text.*``, ``projector``) have no padding and no generated part:
position ``j`` is simply token ``j`` of the tower's sequence.

Specs are validated where they are built: ``Steer(point=points.resid_post(3), vector=v, alpha=4)``
with a malformed point name, an empty or non-finite vector or a bad position set raises one
:class:`~explab.errors.ExplabError` line there, not later inside a server actor. Vectors may be given
as lists, tensors or arrays; they are stored as plain lists of floats, so a spec stays plain data
(``model_dump()`` is JSON; request objects take spec objects or such dicts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from explab.errors import ExplabError
from explab.interventions.points import check_point_name, is_attention_pattern


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in e['loc'])}: {msg}" if e["loc"] else msg


class _Strict(BaseModel):
    """Frozen, no extra fields; building one with bad values raises a one-line :class:`ExplabError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ExplabError(f"bad {type(self).__name__}: {_one_line(err)}") from None


def _float_list(value: Any) -> Any:
    """Accept a list, a tensor or an array (anything with ``tolist``) of numbers; check it is usable."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("give a non-empty 1-D list (or tensor/array) of floats")
    if any(isinstance(x, (list, tuple)) for x in value):
        raise ValueError("give a 1-D vector, not a nested list")
    out = [float(x) for x in value]
    if not all(math.isfinite(x) for x in out):
        raise ValueError("the vector has NaN or infinite entries")
    return out


def _point(value: Any) -> str:
    try:
        return check_point_name(value)
    except ExplabError as err:
        raise ValueError(str(err)) from None


PointName = Annotated[str, BeforeValidator(_point)]
Vector = Annotated[list[float], BeforeValidator(_float_list)]


class Positions(_Strict):
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


class _Spec(_Strict):
    pass


class Capture(_Spec):
    """Record the activation at ``point`` for the positions in ``positions``.

    ``per_step=True`` records the newest position of every forward pass instead (the activation that
    samples each generated token: T_generated rows per sequence in :func:`decode`); ``positions``
    must then be ``all`` or ``last``. ``name`` is the key in ``Session.captures`` (default: point).
    """

    type: Literal["capture"] = "capture"
    point: PointName
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
    point: PointName
    vector: Vector
    alpha: float = Field(1.0, allow_inf_nan=False)
    positions: Positions = Field(default_factory=Positions)


class ProjectOut(_Spec):
    """Remove the component along the unit vector ``direction`` (x -> x - (x.u) u) at ``point``."""

    type: Literal["project_out"] = "project_out"
    point: PointName
    direction: Vector
    positions: Positions = Field(default_factory=Positions)

    @field_validator("direction")
    @classmethod
    def _nonzero(cls, value: list[float]) -> list[float]:
        if not any(value):
            raise ValueError("the direction is all zeros: give a non-zero direction")
        return value


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
        shown = repr(data) if len(repr(data)) <= 160 else repr(data)[:157] + "..."
        raise ExplabError(
            f"bad intervention spec {shown}: {where}: {e['msg'].removeprefix('Value error, ')} "
            f"(type is one of {', '.join(KINDS)})"
        ) from None


def parse_interventions(items: Any) -> list[Capture | Steer | ProjectOut | Knockout | Bidirectional]:
    """Validate a list of spec dicts/objects."""
    if isinstance(items, (dict, _Spec)):
        raise ExplabError(
            f"interventions must be a list of specs, got one {type(items).__name__}: wrap it in [...]"
        )
    return [parse_intervention(d) for d in (items or ())]


# A request field holding interventions: takes spec objects or dicts, validated when the request is built.
Interventions = Annotated[list[Intervention], BeforeValidator(parse_interventions)]


def batch_key(specs: Sequence[Any]) -> str:
    """What rows of one batch must share: their knockout/bidirectional masks and eager attention.

    Everything else (captures, steering, projections, position sets) may differ per row of a batch
    (see ``per_row`` of :func:`explab.interventions.intervene`). Two requests whose ``batch_key``
    are equal can run in one batched call.
    """
    parsed = parse_interventions(specs)
    masks = [s.model_dump(mode="json") for s in parsed if isinstance(s, (Knockout, Bidirectional))]
    eager = bool(masks) or any(isinstance(s, Capture) and is_attention_pattern(s.point) for s in parsed)
    return json.dumps([masks, eager], sort_keys=True) if masks or eager else ""
