"""Persistent defects: pixels flagged as cosmic rays at the same place in most frames.

A cosmic ray never strikes the same pixel in most frames of a night; a pixel that
has the COSMIC bit (4) in most of them is a defect the bad-pixel mask missed (a warm
pixel below the dark's hot cut, a trap, a residue beside a bad column). Finalize
(:func:`photowatch.run.defects.mark_night_defects`, which does the reading and
writing) adds such pixels to the night's bad-pixel mask
(``masters/<night>/bpm_<camera>.fits``), turns their COSMIC bit into BAD in the
night's products, and reports them.
"""

from __future__ import annotations

import numpy as np

COSMIC, BAD = 4, 1


def persistent_defects(masks, *, min_fraction: float = 0.6, min_frames: int = 3
                       ) -> np.ndarray | None:
    """Pixels with the COSMIC bit in at least ``min_fraction`` of the masks (and in at
    least ``min_frames`` of them); None with fewer than ``min_frames`` masks of one shape."""
    masks = list(masks)
    if len(masks) < min_frames or len({m.shape for m in masks}) != 1:
        return None
    count = np.zeros(masks[0].shape, np.int32)
    for m in masks:
        count += (np.asarray(m) & COSMIC) != 0
    need = max(min_frames, int(np.ceil(min_fraction * len(masks))))
    return count >= need
