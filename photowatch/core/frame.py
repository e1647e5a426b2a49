"""The in-memory frame that every stage takes and returns.

A frame holds the science data (float32, electrons), its variance (float32,
electrons squared), a uint16 mask of :class:`Mask` bits, the FITS header and
the classified description of the raw frame. Pixels are 0-based in code
(``sci[y, x]``); FITS sections and CRPIX are 1-based.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntFlag
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from astropy.io import fits

    from photowatch.core.classify import FrameInfo


class Mask(IntFlag):
    """Bits of the MASK plane (the product contract: 1, 2, 4, 8, 16)."""

    BAD = 1  #: bad pixel (hot, dead, bad column) from the bad-pixel mask
    SATURATED = 2  #: saturated, or on the bleed trail of a saturated star
    COSMIC = 4  #: cosmic ray, replaced by astroscrappy (data cleaned)
    NODATA = 8  #: no data (outside the data section, or not covered)
    LOWFLAT = 16  #: the master flat is too low to trust the pixel


#: Bits that make a pixel unusable for measurement and stacking.
UNUSABLE = Mask.BAD | Mask.SATURATED | Mask.NODATA | Mask.LOWFLAT


@dataclass(frozen=True, eq=False)
class Frame:
    """One detector image with its variance, mask and header.

    Stages never modify a frame in place: they return a new one made with
    :meth:`replace` (arrays not changed by the stage are shared, not copied).
    """

    sci: np.ndarray
    var: np.ndarray
    mask: np.ndarray
    header: fits.Header
    info: FrameInfo | None = None

    def replace(self, **changes) -> Frame:
        """Return a copy of the frame with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.sci.shape  # type: ignore[return-value]

    @property
    def err(self) -> np.ndarray:
        """1-sigma uncertainty (electrons), float32."""
        return np.sqrt(np.maximum(self.var, 0), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class MasterImage:
    """A calibration master as a stage uses it.

    ``data`` is in electrons (bias), electrons per second (dark) or
    normalised to 1 (flat, sky); ``var`` is its variance in the same units
    squared.
    """

    kind: str  #: bias | dark | flat | sky
    data: np.ndarray
    var: np.ndarray
    label: str = ""  #: file name, for product headers
    version: int = 0
    master_id: int | None = None
    provisional: bool = False
    night: str = ""  #: the night the master was taken (products say which nights' masters)
