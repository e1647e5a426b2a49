"""The bad-pixel mask of a camera: hot pixels from the master dark, dead/low pixels and bad
columns from the master flat. Saturation comes from the profile and is flagged per frame."""

from __future__ import annotations

import numpy as np

from photowatch.calib.combine import robust_level
from photowatch.core.config import Calibration
from photowatch.core.frame import MasterImage


def bad_pixel_mask(*, dark: MasterImage | None, flat: MasterImage | None,
                   settings: Calibration) -> np.ndarray | None:
    """Boolean bad-pixel mask (True = bad), or None without any master."""
    bad = None
    if dark is not None:
        med, sigma = robust_level(dark.data, central=1.0)
        noise = np.sqrt(np.maximum(dark.var, 0))
        hot = (dark.data - med) > settings.bpm_hot_sigma * np.maximum(noise, sigma)
        bad = hot
    if flat is not None:
        low = (flat.data < settings.bpm_low_flat) | (flat.data > settings.bpm_high_flat)
        low |= ~np.isfinite(flat.data)
        # bad columns: most of the column low
        col_low = np.mean(flat.data < settings.bpm_low_flat, axis=0) > 0.5
        low[:, col_low] = True
        bad = low if bad is None else (bad | low)
    return bad
