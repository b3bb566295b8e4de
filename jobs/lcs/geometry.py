"""Step 2: the colour geometry of the subspace — anchors, lightness axis, hue directions, saturation radius.

With b, w the black and white anchors and h_1..h_6 the hue anchors (sorted by hue angle theta_i):

- lightness axis a = w - b, c_L(l) = b + l a;
- hue direction d_H(h) = slerp(unit(h_i - o), unit(h_{i+1} - o), alpha),
  alpha = (h - theta_i) / (theta_{i+1} - theta_i);
- radius R(h) = lerp(|h_i - o|, |h_{i+1} - o|, alpha);
- forward (HSL -> subspace): c = s R (1 - |2l - 1|) d_H + c_L;
- inverse (subspace -> HSL): l from the projection on a, h from the two nearest hue directions and the
  ratio of the angles to them, s = |c - c_L| / (R (1 - |2l - 1|)).

``origin="axis"`` takes o as the per-axis mean of the hue anchors (exact round trip on ideal geometry);
``origin="scalar"`` reproduces the authors' code, ``o = torch.mean(hue_anchors)``: one number for every axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from explab.errors import ExplabError
from jobs.lcs.colours import HUE_ANCHORS

Origin = Literal["axis", "scalar"]
EPS = 1e-9


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


@dataclass
class Geometry:
    """The anchors (name -> k coordinates: red, yellow, green, cyan, blue, magenta, black, white)."""

    anchors: dict[str, np.ndarray]
    origin: Origin = "axis"
    hue_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        missing = [n for n in (*HUE_ANCHORS, "black", "white") if n not in self.anchors]
        if missing:
            raise ExplabError(f"colour anchors {missing} are missing: give all six hues, black and white")
        self.anchors = {n: np.asarray(v, dtype=np.float64) for n, v in self.anchors.items()}
        self.hue_names = sorted(HUE_ANCHORS, key=HUE_ANCHORS.__getitem__)
        self.black, self.white = self.anchors["black"], self.anchors["white"]
        self.axis = self.white - self.black
        hues = np.stack([self.anchors[n] for n in self.hue_names])
        self.o = hues.mean(0) if self.origin == "axis" else np.full(hues.shape[1], hues.mean())
        self.units = _unit(hues - self.o)  # (6, k)
        self.radii = np.linalg.norm(hues - self.o, axis=-1)  # (6,)
        self.thetas = np.array([HUE_ANCHORS[n] for n in self.hue_names])  # ascending, in turns

    # -------------------------------------------------------------------- the pieces
    def lightness_point(self, lt: np.ndarray) -> np.ndarray:
        return self.black + np.asarray(lt)[..., None] * self.axis

    def _segment(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For hues in turns: the segment's first anchor i, the next j, and alpha in [0, 1)."""
        h = np.mod(h, 1.0)
        i = np.searchsorted(self.thetas, h, side="right") - 1
        j = (i + 1) % len(self.thetas)
        end = np.where(j == 0, 1.0, self.thetas[j])
        return i, j, (h - self.thetas[i]) / (end - self.thetas[i])

    def hue_direction(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d_H, R) for hues in turns: slerp of the neighbouring unit directions, lerp of their radii."""
        i, j, alpha = self._segment(np.asarray(h, dtype=np.float64))
        ui, uj = self.units[i], self.units[j]
        omega = np.arccos(np.sum(ui * uj, -1).clip(-1, 1))
        sin = np.sin(omega)
        small = sin < 1e-9
        wi = np.where(small, 1 - alpha, np.sin((1 - alpha) * omega) / np.where(small, 1, sin))
        wj = np.where(small, alpha, np.sin(alpha * omega) / np.where(small, 1, sin))
        direction = wi[..., None] * ui + wj[..., None] * uj
        radius = (1 - alpha) * self.radii[i] + alpha * self.radii[j]
        return direction, radius

    # -------------------------------------------------------------------- the maps
    def hsl_to_lcs(self, hsl: np.ndarray) -> np.ndarray:
        """HSL rows (h in turns) to subspace coordinates: c = s R (1 - |2l - 1|) d_H + c_L."""
        hsl = np.asarray(hsl, dtype=np.float64)
        h, s, lt = hsl[..., 0], hsl[..., 1], hsl[..., 2]
        direction, radius = self.hue_direction(h)
        chroma = s * radius * (1 - np.abs(2 * lt - 1))
        return chroma[..., None] * direction + self.lightness_point(lt)

    def lcs_to_hsl(self, coords: np.ndarray) -> np.ndarray:
        """Subspace coordinates to HSL rows (h in turns; s and l not clipped, so a round trip is testable)."""
        c = np.asarray(coords, dtype=np.float64)
        lt = ((c - self.black) @ self.axis) / max(float(self.axis @ self.axis), EPS)
        radial = c - self.lightness_point(lt)
        angles = np.arccos((_unit(radial) @ self.units.T).clip(-1, 1))  # (..., 6)
        n = len(self.thetas)
        i = angles.argmin(-1)
        nxt, prv = (i + 1) % n, (i - 1) % n
        a_i = np.take_along_axis(angles, i[..., None], -1)[..., 0]
        a_next = np.take_along_axis(angles, nxt[..., None], -1)[..., 0]
        a_prev = np.take_along_axis(angles, prv[..., None], -1)[..., 0]
        forward = a_next <= a_prev  # the colour lies between anchor i and the next one
        start = np.where(forward, i, prv)
        a_start = np.where(forward, a_i, a_prev)
        a_end = np.where(forward, a_next, a_i)
        alpha = a_start / np.maximum(a_start + a_end, EPS)
        end_theta = np.where((start + 1) % n == 0, 1.0, self.thetas[(start + 1) % n])
        h = np.mod(self.thetas[start] + alpha * (end_theta - self.thetas[start]), 1.0)
        _, radius = self.hue_direction(h)
        chroma = radius * (1 - np.abs(2 * lt - 1))
        s = np.where(chroma > EPS, np.linalg.norm(radial, axis=-1) / np.maximum(chroma, EPS), 0.0)
        return np.stack([h, s, lt], -1)
