"""Seeds derived from a run's seed and names: the same parts give the same seed, in any process.

A job derives the seed of each random draw (a user's sampling seed, a perturbation's choice, a
shuffle) from the run's seed plus what identifies the draw, so results do not depend on the order
or the process in which draws happen. Python's ``hash`` is salted per process, so it cannot serve.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def derive_seed(*parts: Any) -> int:
    """A reproducible 31-bit seed from any printable parts (ints, strings, floats, ...).

    The parts' ``str`` forms, joined with a unit separator, are hashed with SHA-256; the first four
    bytes, masked to 31 bits, are the seed: in range for every RNG API (numpy, torch, ``random``,
    vLLM, scikit-learn's ``random_state``).
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def rng_for(*parts: Any) -> np.random.Generator:
    """``numpy.random.default_rng(derive_seed(*parts))``."""
    return np.random.default_rng(derive_seed(*parts))
