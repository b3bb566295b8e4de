"""``synthetic:unbox_groups``: a small labelled set with a group column, Waterbirds-shaped.

Every (label, place) pair gets ``n_per_group`` images drawn by `WordRenderer` from a short
description: a red bird in the centre over water (blue ring) or land (green ring), with seeded
noise. Columns: ``image`` (uint8 H x W x 3), ``label`` (0 = landbird, 1 = waterbird) and ``place``
(0 = land, 1 = water), the columns Waterbirds has on the Hub. It validates slices in the tiny config.
"""

from __future__ import annotations

from typing import Any

from jobs.unbox.renderers import WordRenderer, default_words

PLACES = {0: "in the forest", 1: "on the water"}


def group_rows(*, seed: int = 0, n_per_group: int = 4, size: int = 32, part: str = "test",
               **_: Any) -> list[dict[str, Any]]:
    painter = WordRenderer(default_words(), size)
    rows = []
    for label, name in ((0, "landbird"), (1, "waterbird")):
        for place, phrase in PLACES.items():
            for i in range(n_per_group):
                image = painter.paint(f"a {name}, red, {phrase}", seed * 100_003 + i)
                rows.append({"image": image, "label": label, "place": place})
    return rows
