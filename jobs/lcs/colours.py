"""Colour spaces and colour differences: HSV/HSL <-> RGB, CIEDE2000, OpenCV-style HLS deltas, colour families.

Every colour here is a float array in [0, 1] with the channels last; hue is a fraction of a turn
(0 = red, 1/6 = yellow, 1/3 = green, 1/2 = cyan, 2/3 = blue, 5/6 = magenta).
"""

from __future__ import annotations

import numpy as np

from explab.errors import ConfigError

# the anchors of the colour subspace: six hues at full saturation and mid lightness, black and white
HUE_ANCHORS = {"red": 0.0, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6, "magenta": 5 / 6}
ANCHOR_NAMES = (*HUE_ANCHORS, "black", "white")
HUE_NAMES = ("red", "orange", "yellow", "chartreuse", "green", "spring green", "cyan", "azure", "blue", "violet",
             "magenta", "rose")  # every 30 degrees from red
# the authors' four families of 8-bit colours, from the bright one's channel values (0, 127 or 255)
FAMILIES = {"bright": lambda c: c, "dark": lambda c: c // 2, "light": lambda c: (c + 255) // 2,
            "muted": lambda c: c // 2 + 64}


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb as mpl_hsv_to_rgb

    return mpl_hsv_to_rgb(np.asarray(hsv, dtype=np.float64).clip(0, 1))  # h = 1 is red again


def hsl_to_rgb(hsl: np.ndarray) -> np.ndarray:
    """HSL (h in turns, s, l in [0, 1]) to RGB, channels last."""
    hsl = np.asarray(hsl, dtype=np.float64)
    h, s, lt = np.mod(hsl[..., 0], 1.0), hsl[..., 1].clip(0, 1), hsl[..., 2].clip(0, 1)
    c = (1 - np.abs(2 * lt - 1)) * s
    hp = h * 6
    x = c * (1 - np.abs(np.mod(hp, 2) - 1))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(int) % 6
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.zeros((*h.shape, 3))
    for k, (r, g, b) in enumerate(table):
        pick = sector == k
        rgb[pick] = np.stack([r[pick], g[pick], b[pick]], -1)
    return rgb + (lt - c / 2)[..., None]


def rgb_to_hsl(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] to HSL (h in turns; h = 0 for greys), channels last."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax, vmin = rgb.max(-1), rgb.min(-1)
    diff = vmax - vmin
    lt = (vmax + vmin) / 2
    denom = 1 - np.abs(2 * lt - 1)
    s = np.where(denom > 1e-12, diff / np.maximum(denom, 1e-12), 0.0)
    safe = np.maximum(diff, 1e-12)
    h = np.where(vmax == r, np.mod((g - b) / safe, 6), np.where(vmax == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(diff > 1e-12, h / 6, 0.0)
    return np.stack([np.mod(h, 1.0), s.clip(0, 1), lt], -1)


def hex_to_rgb(code: str) -> np.ndarray:
    text = code.strip().lstrip("#")
    if len(text) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in text):
        raise ConfigError(f"colour {code!r} is not a hex code: write it as #rrggbb")
    return np.array([int(text[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255


def rgb_to_hex(rgb: np.ndarray) -> str:
    r, g, b = (np.clip(np.asarray(rgb, dtype=np.float64), 0, 1) * 255).round().astype(int)
    return f"#{r:02x}{g:02x}{b:02x}"


def hsv_grid(g: int) -> np.ndarray:
    """The authors' HSV grid: h in {0..g}/g, s and v in {0..g-1}/(g-1), duplicates (same RGB hex) removed.

    Returns (n, 3) HSV rows in a fixed order (g = 6 gives 156 colours)."""
    if g < 2:
        raise ConfigError(f"grid size {g} is too small: use at least 2 (the authors use 6)")
    seen: dict[str, np.ndarray] = {}
    for h in np.arange(g + 1) / g:
        for s in np.arange(g) / (g - 1):
            for v in np.arange(g) / (g - 1):
                hsv = np.array([h, s, v])
                seen.setdefault(rgb_to_hex(hsv_to_rgb(hsv)), hsv)
    return np.stack(list(seen.values()))


def anchor_hsl() -> dict[str, np.ndarray]:
    """The eight anchors as HSL: the six hues at s = 1, l = 0.5; black (l = 0); white (l = 1)."""
    out = {name: np.array([h, 1.0, 0.5]) for name, h in HUE_ANCHORS.items()}
    out["black"] = np.array([0.0, 0.0, 0.0])
    out["white"] = np.array([0.0, 0.0, 1.0])
    return out


def target_set() -> list[dict[str, object]]:
    """The authors' 51 target colours of the precise benchmarks: 12 hues every 30 degrees in four families,
    then black, white and gray.

    A bright colour's channels are floor(255 x the hue at full saturation and value) (orange: #ff7f00);
    dark halves them (#7f3f00), light halves the distance to 255 (#ffbf7f), muted is dark plus 64
    (#bf7f40), all in integer 8-bit arithmetic as in the authors' hex list."""
    rows: list[dict[str, object]] = []
    for family, channels in FAMILIES.items():
        for k, hue in enumerate(HUE_NAMES):
            bright = np.floor(255 * hsv_to_rgb(np.array([k / 12, 1.0, 1.0])) + 1e-9).astype(int)
            code = "#" + "".join(f"{int(v):02x}" for v in channels(bright))
            rows.append({"name": f"{family} {hue}", "hex": code, "family": family, "hue": hue})
    for name, code in (("black", "#000000"), ("white", "#ffffff"), ("gray", "#808080")):
        rows.append({"name": name, "hex": code, "family": "achromatic", "hue": name})
    return rows


def describe(rgb: np.ndarray) -> tuple[str, str]:
    """(family, hue name) of a colour: achromatic when s < 0.15 (or very dark / light)."""
    h, s, lt = rgb_to_hsl(rgb)
    if s < 0.15 or lt < 0.06 or lt > 0.94:
        return "achromatic", "black" if lt < 0.25 else ("white" if lt > 0.75 else "gray")
    hue = HUE_NAMES[int(np.floor(h * 12 + 0.5)) % 12]
    if lt < 0.375:
        return "dark", hue
    if lt > 0.625:
        return "light", hue
    return ("bright" if s >= 0.7 else "muted"), hue


# ---------------------------------------------------------------- differences


def delta_e00(rgb_a: np.ndarray, rgb_b: np.ndarray) -> np.ndarray:
    """CIEDE2000 between two RGB arrays (sRGB in [0, 1], channels last), through scikit-image."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    a = np.asarray(rgb_a, dtype=np.float64).clip(0, 1)
    b = np.asarray(rgb_b, dtype=np.float64).clip(0, 1)
    a, b = np.broadcast_arrays(a, b)
    lab_a = rgb2lab(a.reshape(-1, 1, 3)).reshape(a.shape)
    lab_b = rgb2lab(b.reshape(-1, 1, 3)).reshape(b.shape)
    return deltaE_ciede2000(lab_a, lab_b, channel_axis=-1)


def hls_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] as OpenCV's 8-bit HLS (``cv2.COLOR_RGB2HLS`` on uint8): H in 0..180, L and S in 0..255."""
    rgb8 = (np.clip(np.asarray(rgb, dtype=np.float64), 0, 1) * 255).round() / 255
    hsl = rgb_to_hsl(rgb8)
    h = np.round(hsl[..., 0] * 180) % 180
    return np.stack([h, np.round(hsl[..., 2] * 255), np.round(hsl[..., 1] * 255)], -1)


def hls_deltas(rgb: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """|ΔH| (circular, 0..90 in OpenCV's half degrees), |ΔL| and |ΔS| (0..255) of ``rgb`` against ``target``."""
    a, b = hls_uint8(rgb), hls_uint8(target)
    dh = np.abs(a[..., 0] - b[..., 0])
    return {"dH": np.minimum(dh, 180 - dh), "dL": np.abs(a[..., 1] - b[..., 1]), "dS": np.abs(a[..., 2] - b[..., 2])}
