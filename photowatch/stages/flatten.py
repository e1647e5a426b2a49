"""flatten: divide by the master flat of the frame's filter and camera (PhotoPipe's ``f`` step).

The variance is propagated (the flat's own variance included); pixels where
the flat is below ``low_flat`` (PhotoPipe: 0.3) are flagged LOWFLAT and their
values left finite.
"""

from __future__ import annotations

import numpy as np

from photowatch.core.config import Flatten
from photowatch.core.errors import StageFailed
from photowatch.core.frame import Frame, Mask, MasterImage
from photowatch.core.schema import set_key

#: the flat is never divided by less than this (masked pixels stay finite)
FLOOR = 0.05


def flatten(frame: Frame, *, flat: MasterImage, settings: Flatten) -> Frame:
    """Flat-field a prepared frame.

    sci' = sci / F;  var' = var / F² + sci'² · var_F / F²
    """
    if flat.data.shape != frame.sci.shape:
        raise StageFailed(f"master flat {flat.label} has shape {flat.data.shape}, "
                          f"the frame {frame.sci.shape}")
    f = np.maximum(flat.data, np.float32(FLOOR))
    inv = (1.0 / f).astype(np.float32, copy=False)
    sci = frame.sci * inv
    inv2 = inv * inv
    var = frame.var * inv2 + sci * sci * flat.var * inv2
    low = flat.data < settings.low_flat
    mask = frame.mask | (low * np.uint16(Mask.LOWFLAT))
    hdr = frame.header.copy()
    set_key(hdr, "MFLAT", flat.label, "master flat used")
    hdr["MFLATV"] = (flat.version, "master flat version")
    if "SATURATE" in hdr:  # the lowest saturation level: where the flat is highest
        usable = (frame.mask & np.uint16(Mask.BAD | Mask.NODATA)) == 0
        usable &= ~low
        highest = float(np.max(f, where=usable, initial=0.0))
        if highest > 0:
            hdr["SATURATE"] = (round(float(hdr["SATURATE"]) / highest, 1),
                               hdr.comments["SATURATE"])
    if flat.night:
        hdr["MFLATN"] = (flat.night, "night of the master flat")
    return frame.replace(sci=sci.astype(np.float32, copy=False),
                         var=var.astype(np.float32, copy=False), mask=mask, header=hdr)
