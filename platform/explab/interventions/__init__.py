"""Interventions on PyTorch models: named hook points, plain-data specs, one hook mechanism, one decode loop.

Pure PyTorch (no Ray). See :mod:`.points` for point names (and the helpers that build them:
``points.resid_post(3)``), :mod:`.specs` for the typed specs and position semantics.
"""

from explab.interventions import points
from explab.interventions.decode import DecodeOutput, decode, row_generator, sample_token
from explab.interventions.grids import ImageGrid, grid_layouts
from explab.interventions.hooks import Session, image_token_id, intervene, paragraph_index, run_with_hooks
from explab.interventions.latents import AddVector, LatentIntervention, ReplaceSubspace
from explab.interventions.points import HookPoint, list_points, n_layers, resolve_arch, resolve_point
from explab.interventions.specs import (
    Bidirectional,
    Capture,
    Intervention,
    Interventions,
    Knockout,
    PointName,
    Positions,
    ProjectOut,
    Steer,
    batch_key,
    parse_intervention,
    parse_interventions,
)

__all__ = [
    "AddVector",
    "Bidirectional",
    "Capture",
    "DecodeOutput",
    "HookPoint",
    "ImageGrid",
    "Intervention",
    "Interventions",
    "Knockout",
    "LatentIntervention",
    "PointName",
    "Positions",
    "ProjectOut",
    "ReplaceSubspace",
    "Session",
    "Steer",
    "batch_key",
    "decode",
    "grid_layouts",
    "image_token_id",
    "intervene",
    "list_points",
    "n_layers",
    "paragraph_index",
    "parse_intervention",
    "parse_interventions",
    "points",
    "resolve_arch",
    "resolve_point",
    "row_generator",
    "run_with_hooks",
    "sample_token",
]
