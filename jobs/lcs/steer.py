"""Step 5: colour interventions on the subspace coordinates of a latent after step t.

In normalised coordinates C_hat (see `normalisation`), on the chosen tokens:

- type 1 (mean shift): C_hat + c* - mean(C_hat), with c* the target colour's coordinates;
- type 2 (per-token HSL shift): each token's HSL moved by the circular hue difference and the S and L
  differences between the target and the HSL of mean(C_hat); S and L are clamped to [0, 1];
- blend: gamma * type1 + (1 - gamma) * type2.

The new coordinates are denormalised back to step t and written with the platform's `ReplaceSubspace`
(``mode="set"``, one target row per token): z += (c_new - c) B, so only span(B) changes.
"""

from __future__ import annotations

import numpy as np

from explab.errors import ConfigError
from explab.interventions import ReplaceSubspace
from jobs.lcs.geometry import Geometry
from jobs.lcs.normalisation import Normalisation
from jobs.lcs.subspace import Subspace

# the authors' schedule: 1 - gamma once t of their 50 denoising steps are done, t = 0..50 (from their
# intervention code); it grows from 0 to 1, so late interventions lean on the per-token HSL shift
AUTHORS_ONE_MINUS_GAMMA = (
    0.0, 0.0108, 0.0218, 0.0330, 0.0444, 0.0560, 0.0678, 0.0799, 0.0922, 0.1048, 0.1176,
    0.1307, 0.1441, 0.1578, 0.1718, 0.1861, 0.2007, 0.2156, 0.2308, 0.2464, 0.2623,
    0.2786, 0.2953, 0.3124, 0.3299, 0.3478, 0.3662, 0.3850, 0.4043, 0.4241, 0.4444,
    0.4652, 0.4866, 0.5086, 0.5312, 0.5544, 0.5783, 0.6028, 0.6281, 0.6541, 0.6809,
    0.7085, 0.7369, 0.7662, 0.7965, 0.8277, 0.8600, 0.8933, 0.9278, 0.9635, 1.0,
)


def authors_blend(step: int, steps: int) -> float:
    """The authors' gamma for an intervention after ``step`` (0-based step-end callback) of a ``steps``-step run:
    1 - table[step + 1] on their 50-step table (0.8952 after step 8, their t = 9); a run of another length
    reads the table at the same fraction of the run, interpolating linearly."""
    if not 0 <= step < steps:
        raise ConfigError(f"step {step} is outside a {steps}-step run: intervene after steps 0..{steps - 1}")
    done = (step + 1) * (len(AUTHORS_ONE_MINUS_GAMMA) - 1) / steps
    return float(1.0 - np.interp(done, np.arange(len(AUTHORS_ONE_MINUS_GAMMA)), AUTHORS_ONE_MINUS_GAMMA))


def shift_hsl(hsl: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """HSL rows moved by (target - source): hue circularly (shortest way round), S and L clamped to [0, 1]."""
    dh = (target[0] - source[0] + 0.5) % 1.0 - 0.5
    out = np.array(hsl, dtype=np.float64, copy=True)
    out[..., 0] = np.mod(out[..., 0] + dh, 1.0)
    out[..., 1] = (out[..., 1] + target[1] - source[1]).clip(0, 1)
    out[..., 2] = (out[..., 2] + target[2] - source[2]).clip(0, 1)
    return out


def steer_coordinates(coords: np.ndarray, mask: np.ndarray, target_hsl: np.ndarray, geometry: Geometry,
                      norm: Normalisation, step: int, gamma: float) -> np.ndarray:
    """New raw subspace coordinates (N, k) of the tokens of a step-``step`` latent: the masked tokens steered
    to ``target_hsl`` (type 1 for gamma = 1, type 2 for gamma = 0, the blend between); the others as given."""
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"blend gamma {gamma} is outside [0, 1]: 1 is the mean shift, 0 the per-token HSL shift")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ConfigError("the intervention mask selects no token: lower the attention mass or use mode global")
    chat = norm.normalise(coords[mask], step)
    target = np.asarray(target_hsl, dtype=np.float64)
    mean = chat.mean(0)
    new = np.zeros_like(chat)
    if gamma > 0:
        new += gamma * (chat + geometry.hsl_to_lcs(target) - mean)
    if gamma < 1:
        source = geometry.lcs_to_hsl(mean)
        source[1:] = source[1:].clip(0, 1)
        new += (1 - gamma) * geometry.hsl_to_lcs(shift_hsl(geometry.lcs_to_hsl(chat), source, target))
    out = np.array(coords, dtype=np.float64, copy=True)
    out[mask] = norm.denormalise(new, step)
    return out


def colour_intervention(tokens: np.ndarray, mask: np.ndarray, target_hsl: np.ndarray, subspace: Subspace,
                        geometry: Geometry, norm: Normalisation, step: int, gamma: float) -> ReplaceSubspace:
    """The `ReplaceSubspace` that steers a packed latent (N, C) captured after ``step`` towards the target."""
    coords = subspace.coordinates(tokens)
    new = steer_coordinates(coords, mask, target_hsl, geometry, norm, step, gamma)
    return ReplaceSubspace(step=step, basis=subspace.basis.tolist(), origin=subspace.mean.tolist(),
                           target=new.tolist(), mask=np.asarray(mask, dtype=bool).tolist(), mode="set")
