"""cosmics: cosmic-ray cleaning with astroscrappy (L.A.Cosmic; PhotoPipe's ``z`` step).

The frame is in electrons and carries its own variance, so astroscrappy gets
``gain=1`` and the variance plane (``invar``) as its noise model; bad,
saturated and no-data pixels are excluded (``inmask``). Cleaned pixels are
flagged COSMIC in the mask, not hidden: the product keeps the cleaned data and
the mask says which pixels were replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from photowatch.config import Cosmics
from photowatch.frame import Frame, Mask

_EXCLUDE = int(Mask.BAD | Mask.SATURATED | Mask.NODATA | Mask.LOWFLAT)


@dataclass(frozen=True)
class CosmicsResult:
    npix: int  #: pixels flagged as cosmic rays
    fraction: float


def flag_cosmics(frame: Frame, *, settings: Cosmics) -> tuple[Frame, CosmicsResult]:
    """Detect and clean cosmic rays; flag them with :attr:`Mask.COSMIC`."""
    import astroscrappy

    if not settings.enabled:
        return frame, CosmicsResult(0, 0.0)
    inmask = (frame.mask & _EXCLUDE) != 0
    rn = float(frame.header.get("RDNOISE", 5.0))
    crmask, cleaned = astroscrappy.detect_cosmics(
        np.ascontiguousarray(frame.sci, dtype=np.float32),
        inmask=inmask,
        invar=np.ascontiguousarray(np.maximum(frame.var, rn * rn), dtype=np.float32),
        sigclip=settings.sigclip,
        sigfrac=settings.sigfrac,
        objlim=settings.objlim,
        gain=1.0,
        readnoise=rn,
        satlevel=1e30,
        niter=settings.niter,
        sepmed=settings.sepmed,
        cleantype=settings.cleantype,
        fsmode=settings.fsmode,
        psffwhm=settings.psffwhm,
        psfsize=settings.psfsize,
    )
    if settings.grow_px:
        crmask = ndimage.binary_dilation(crmask, iterations=settings.grow_px) & ~inmask
    npix = int(np.count_nonzero(crmask))
    sci = np.asarray(cleaned, dtype=np.float32)
    mask = frame.mask | (crmask * np.uint16(Mask.COSMIC))
    hdr = frame.header.copy()
    hdr["NCRPIX"] = (npix, "pixels cleaned as cosmic rays (MASK bit 4)")
    hdr["CRCLEAN"] = (f"astroscrappy niter={settings.niter} sigclip={settings.sigclip}",
                      "cosmic-ray method")
    return (frame.replace(sci=sci, mask=mask.astype(np.uint16), header=hdr),
            CosmicsResult(npix, npix / crmask.size))
