"""Latent interventions on a diffusion pipeline, applied through its step-end callback (pure PyTorch).

Steps are the pipeline's own: step ``t`` is the latent after denoising step ``t`` (0-based), the
tensor ``callback_on_step_end(pipe, t, timestep, {"latents": ...})`` receives. At each step, the
captures of that step are taken first (what the pipeline handed over), then that step's
interventions apply in order, and the edited latent is what the next step denoises.

A latent is viewed as tokens x channels: FLUX's packed latent already is (N, 64); a UNet latent
(C, H, W) is read as its H*W positions (row-major) of C channels. Every spec is plain data (pydantic),
so it travels to a server actor.

- `ReplaceSubspace`: with an orthonormal basis B (k x C) and an origin mu, the coordinates of a
  token are c = (z - mu) B^T; the masked tokens get z += (c_new - c) B, so only the component
  inside span(B) changes. ``mode="set"``: c_new = target (one k-vector for every token, or one per
  token); ``mode="mean"``: c_new = c + target - mean(c over the masked tokens), which moves the
  mean coordinate to the target and keeps each token's deviation.
- `AddVector`: z += scale * v on the masked tokens.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from explab.errors import ExplabError

ORTHONORMAL_TOL = 1e-4


class ReplaceSubspace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["replace_subspace"] = "replace_subspace"
    step: int = Field(ge=0)
    basis: list[list[float]]  # k x C, orthonormal rows
    target: list[float] | list[list[float]]  # k coordinates, or N x k (one row per token)
    origin: list[float] | None = None  # mu (C); coordinates are taken relative to it
    mask: list[bool] | None = None  # N tokens; None: every token
    mode: Literal["set", "mean"] = "set"

    @model_validator(mode="after")
    def _check(self) -> ReplaceSubspace:
        basis = torch.tensor(self.basis, dtype=torch.float64)
        if basis.dim() != 2 or basis.shape[0] == 0:
            raise ValueError("`basis` must be a non-empty k x C list of rows")
        gram = basis @ basis.T
        if not torch.allclose(gram, torch.eye(basis.shape[0], dtype=torch.float64), atol=ORTHONORMAL_TOL):
            raise ValueError(
                "`basis` rows must be orthonormal: orthonormalise them first (e.g. torch.linalg.qr)"
            )
        target = torch.tensor(self.target, dtype=torch.float64)
        if target.shape[-1] != basis.shape[0] or target.dim() > 2:
            raise ValueError(f"`target` must hold {basis.shape[0]} coordinates (or N rows of them)")
        if self.mode == "mean" and target.dim() != 1:
            raise ValueError("mode 'mean' takes one target k-vector, not one per token")
        if self.origin is not None and len(self.origin) != basis.shape[1]:
            raise ValueError(f"`origin` must have {basis.shape[1]} entries, like each basis row")
        return self


class AddVector(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["add"] = "add"
    step: int = Field(ge=0)
    vector: list[float]  # C
    scale: float = 1.0
    mask: list[bool] | None = None  # N tokens; None: every token


LatentIntervention = Annotated[ReplaceSubspace | AddVector, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(LatentIntervention)


def parse_latent_intervention(spec: LatentIntervention | dict[str, Any]) -> ReplaceSubspace | AddVector:
    if isinstance(spec, (ReplaceSubspace, AddVector)):
        return spec
    try:
        return _ADAPTER.validate_python(spec)
    except Exception as err:  # pydantic's message names the field
        raise ExplabError(
            f"bad latent intervention {spec!r} ({_first_line(err)}): "
            "use {type: replace_subspace | add, step, ...} as explab.interventions.latents documents"
        ) from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else type(err).__name__)


# ---------------------------------------------------------------- token views


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """One row's latent as (tokens, channels): FLUX's packed (N, C) as is, a UNet's (C, H, W) as (H*W, C)."""
    if latent.dim() == 2:
        return latent
    if latent.dim() == 3:
        return latent.flatten(1).T
    raise ExplabError(f"a latent row of shape {tuple(latent.shape)} is neither (N, C) nor (C, H, W)")


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tokens` for a row shaped like ``like``."""
    if like.dim() == 2:
        return tokens
    return tokens.T.reshape(like.shape)


def _mask(mask: list[bool] | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if len(mask) != n:
        raise ExplabError(
            f"a token mask of {len(mask)} entries for a latent of {n} tokens: give one per token"
        )
    return torch.tensor(mask, dtype=torch.bool, device=device)


# ---------------------------------------------------------------- the edits (tokens x channels)


def subspace_coordinates(
    tokens: torch.Tensor, basis: torch.Tensor, origin: torch.Tensor | None = None
) -> torch.Tensor:
    """c = (z - mu) B^T for every token, in float32: (N, k)."""
    z = tokens.float()
    if origin is not None:
        z = z - origin.float()
    return z @ basis.float().T


def replace_subspace(tokens: torch.Tensor, spec: ReplaceSubspace) -> torch.Tensor:
    """The tokens with their span(B) component moved to the target on the masked tokens (same dtype)."""
    n, channels = tokens.shape
    basis = torch.tensor(spec.basis, dtype=torch.float32, device=tokens.device)
    if basis.shape[1] != channels:
        raise ExplabError(
            f"subspace basis rows have {basis.shape[1]} entries but the latent has {channels} "
            "channels: give a k x C basis"
        )
    origin = (
        None if spec.origin is None else torch.tensor(spec.origin, dtype=torch.float32, device=tokens.device)
    )
    mask = _mask(spec.mask, n, tokens.device)
    coords = subspace_coordinates(tokens, basis, origin)
    target = torch.tensor(spec.target, dtype=torch.float32, device=tokens.device)
    if target.dim() == 2 and target.shape[0] != n:
        raise ExplabError(
            f"a per-token target of {target.shape[0]} rows for {n} tokens: give one row per token"
        )
    if spec.mode == "mean":
        new = coords + (target - coords[mask].mean(0))
    else:
        new = target.expand_as(coords)
    edited = (tokens.float() + (new - coords) @ basis).to(tokens.dtype)
    return torch.where(mask[:, None], edited, tokens)


def add_vector(tokens: torch.Tensor, spec: AddVector) -> torch.Tensor:
    n, channels = tokens.shape
    if len(spec.vector) != channels:
        raise ExplabError(
            f"an added vector of {len(spec.vector)} entries for a latent of {channels} channels: "
            "give one entry per channel"
        )
    vector = torch.tensor(spec.vector, dtype=torch.float32, device=tokens.device)
    mask = _mask(spec.mask, n, tokens.device)
    edited = (tokens.float() + spec.scale * vector).to(tokens.dtype)
    return torch.where(mask[:, None], edited, tokens)


def apply_latent_intervention(latent: torch.Tensor, spec: ReplaceSubspace | AddVector) -> torch.Tensor:
    """One row's latent ((N, C) or (C, H, W)) after the intervention."""
    tokens = to_tokens(latent)
    out = replace_subspace(tokens, spec) if isinstance(spec, ReplaceSubspace) else add_vector(tokens, spec)
    return from_tokens(out, latent)


# ---------------------------------------------------------------- the step-end callback


class LatentEditor:
    """A ``callback_on_step_end`` for a batch: per row, its capture steps and its interventions.

    ``captures[row][t]`` holds row ``row``'s latent at step ``t`` (a float32 CPU tensor) after the
    call. ``on_step`` (optional) is called with the step index first (the attention recorder uses it).
    """

    def __init__(self, capture_steps: list[list[int]], interventions: list[list[Any]], on_step: Any = None):
        if len(capture_steps) != len(interventions):
            raise ValueError("one list of capture steps and one of interventions per row")
        self.capture_steps = [set(steps) for steps in capture_steps]
        self.interventions = [[parse_latent_intervention(i) for i in row] for row in interventions]
        self.captures: list[dict[int, torch.Tensor]] = [{} for _ in capture_steps]
        self.on_step = on_step

    def check_steps(self, steps: int) -> None:
        """One clear error (before any work) for a capture or an intervention past the last step."""
        for row, (captures, edits) in enumerate(zip(self.capture_steps, self.interventions, strict=True)):
            late = [t for t in captures if t >= steps] + [i.step for i in edits if i.step >= steps]
            if late:
                raise ExplabError(
                    f"request {row} names step {max(late)} of a {steps}-step run: "
                    f"steps run 0..{steps - 1} (the latent after each denoising step)"
                )

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.on_step is not None:
            self.on_step(step + 1)  # the transformer's next call is step + 1
        latents = kwargs["latents"]
        rows = list(latents.unbind(0))
        changed = False
        for row, latent in enumerate(rows):
            if step in self.capture_steps[row]:
                self.captures[row][step] = latent.detach().to("cpu", torch.float32).clone()
            for spec in self.interventions[row]:
                if spec.step == step:
                    rows[row] = latent = apply_latent_intervention(latent, spec)
                    changed = True
        if changed:
            kwargs["latents"] = torch.stack(rows)
        return kwargs
