"""Seeds derived from a run's seed and names: the same parts give the same seed, in any process.

A job derives the seed of each random draw (a user's sampling seed, a perturbation's choice, a
shuffle) from the run's seed plus what identifies the draw, so results do not depend on the order
or the process in which draws happen. Python's ``hash`` is salted per process, so it cannot serve.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts: the same parts give the same seed.

    Each part becomes a 32-bit word (a non-negative int is taken as it is, anything else as the
    CRC-32 of its ``str``), and numpy's `SeedSequence` mixes the words into two 32-bit outputs,
    combined as ``(a << 31) ^ b``. Any RNG that takes a 64-bit seed accepts it (numpy, torch,
    ``random``, vLLM's sampling seed).
    """
    words = [p if isinstance(p, int) and p >= 0 else zlib.crc32(str(p).encode())
             for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def rng_for(*parts: Any) -> np.random.Generator:
    """``numpy.random.default_rng(derive_seed(*parts))``."""
    return np.random.default_rng(derive_seed(*parts))
