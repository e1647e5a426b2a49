"""Forced photometry at given sky positions (issue 21): the same aperture, aperture
correction and zero point as the catalogue (CAT), measured whether or not a source was
detected there.

Per position: the aperture sum at the WCS position (no re-centring: a forced measurement
must not wander onto a neighbour) less the local background (clipped median of an
annulus, :func:`photowatch.stages.depth.local_background`: a target sits on whatever the
sky subtraction left there), its error from the ERR plane (sky, read noise and the
source's own Poisson noise) with the background part scaled by the frame's measured
``noise_factor`` (:func:`photowatch.stages.depth.empty_aperture_noise`), S/N, the
calibrated magnitude when detected (S/N >= nsigma) and always the ``nsigma`` upper limit
at that position (``LIMMAG`` with the local noise). Pure: arrays and numbers in, a table
out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from photowatch.core.frame import Mask

#: a target whose aperture touches one of these pixels is flagged (its flux is kept)
_FLAG_BITS = int(Mask.BAD | Mask.NODATA | Mask.LOWFLAT | Mask.SATURATED)

FLAG_OFFFRAME = 1  #: the position is not on the frame (no measurement)
FLAG_MASKED = 2  #: a bad, no-data, low-flat or saturated pixel in the aperture
FLAG_EDGE = 4  #: the aperture is cut by the frame's edge
FLAG_NOWCS = 8  #: the frame has no astrometric solution
FLAG_NOBKG = 16  #: no local background (annulus off the frame or masked): global sky kept
FLAG_COSMIC = 32  #: cosmic-ray-cleaned pixels in the core (r < max(2, r_ap / 2)): a faint
#: sharp source may have been taken for a cosmic ray and removed

COLUMNS = ("name", "ra", "dec", "x", "y", "flux", "fluxerr", "snr", "mag", "magerr",
           "limmag", "uplim", "limflux", "detected", "flags")


def forced_photometry(sci: np.ndarray, var: np.ndarray, mask: np.ndarray | None, wcs,
                      targets: Iterable[tuple[str, float, float]], *, r_ap_px: float,
                      apcor: float = 1.0, magzp: float | Callable | None = None,
                      magzp_err: float = 0.0, nsigma: float = 5.0,
                      noise_factor: float = 1.0, local_bkg: bool = True):
    """Aperture photometry at each target's position.

    Parameters
    ----------
    sci, var, mask
        The product's planes (electrons, electrons squared, MASK bits).
    wcs
        The frame's solution (astropy WCS) or None (every row flagged NOWCS).
    targets
        (name, ra_deg, dec_deg) triples.
    r_ap_px, apcor
        CAT's aperture radius (APRAD) and aperture correction (APCOR).
    magzp
        MAGZP (float), or a function ``zp(x, y)`` (a spatial zero point), or None
        (no calibration: mag, magerr and limmag NaN; flux and S/N still given).
    nsigma
        Detection threshold and upper-limit significance.
    noise_factor
        Measured over ERR-predicted background noise of an aperture sum.
    local_bkg
        Subtract the annulus background (else the frame's sky subtraction alone).

    Returns
    -------
    astropy.table.Table with :data:`COLUMNS` (flux and fluxerr aperture-corrected,
    electrons; ``limmag``/``limflux`` the ``nsigma`` detection limit at the position;
    ``detected`` = S/N >= nsigma; ``uplim``, for a non-detection, the magnitude of
    ``max(flux, 0) + nsigma x fluxerr``: the source is fainter than that at the
    ``nsigma`` level, NaN when detected).
    """
    import sep
    from astropy.table import Table

    from photowatch.stages.depth import limiting_flux, local_background

    targets = list(targets)
    n = len(targets)
    names = [str(t[0]) for t in targets]
    ra = np.array([float(t[1]) for t in targets], float)
    dec = np.array([float(t[2]) for t in targets], float)
    ny, nx = sci.shape
    flags = np.zeros(n, np.int16)
    x = np.full(n, np.nan)
    y = np.full(n, np.nan)
    if wcs is not None and n:
        x, y = (np.asarray(v, float) for v in wcs.all_world2pix(ra, dec, 0))
    else:
        flags |= FLAG_NOWCS
    on = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & \
        (y < ny - 0.5)
    flags |= np.where(on, 0, FLAG_OFFFRAME).astype(np.int16)
    flux = np.full(n, np.nan)
    fluxerr = np.full(n, np.nan)
    limflux = np.full(n, np.nan)
    r = float(r_ap_px)
    if on.any():
        data = np.ascontiguousarray(sci, dtype=np.float32)
        v = np.ascontiguousarray(var, dtype=np.float32)
        bad = ~np.isfinite(data) | ~(v > 0) | ~np.isfinite(v)
        m = bad if mask is None else (bad | ((np.asarray(mask) & _FLAG_BITS) != 0))
        if bad.any():
            data = np.where(bad, np.float32(0), data)
            v = np.where(bad, np.float32(np.median(v[~bad]) if (~bad).any() else 1.0), v)
        xi, yi = x[on], y[on]
        f_ap, e_ap, aflag = sep.sum_circle(data, xi, yi, r, var=v, mask=m, subpix=5)
        # the aperture's own background noise: the median variance of its pixels
        # (without the source, whose Poisson noise is in e_ap) gives the local limit
        sky_var = np.asarray(_local_variance(v, m, xi, yi, r), float)
        area = math.pi * r * r
        f = flags[on]
        if local_bkg:
            bkg, _ = local_background(data, m, xi, yi, r)
            f |= np.where(np.isfinite(bkg), 0, FLAG_NOBKG).astype(np.int16)
            f_ap = f_ap - area * np.where(np.isfinite(bkg), bkg, 0.0)
        k2 = float(noise_factor) ** 2
        with np.errstate(invalid="ignore"):
            e_tot = np.sqrt(np.maximum(e_ap ** 2 + (k2 - 1.0) * area *
                                       np.where(np.isfinite(sky_var), sky_var, 0.0), 0.0))
        flux[on] = f_ap * apcor
        fluxerr[on] = e_tot * apcor
        limflux[on] = [limiting_flux(math.sqrt(s), r, apcor, nsigma, noise_factor)
                       if s > 0 else np.nan for s in sky_var]
        f |= np.where((aflag & sep.APER_HASMASKED) != 0, FLAG_MASKED, 0).astype(np.int16)
        f |= np.where((aflag & sep.APER_TRUNC) != 0, FLAG_EDGE, 0).astype(np.int16)
        if mask is not None:
            cosmic = (np.asarray(mask) & int(Mask.COSMIC)).astype(np.float32)
            hit, _, _ = sep.sum_circle(np.ascontiguousarray(cosmic), xi, yi, max(2.0, r / 2),
                                       subpix=1)
            f |= np.where(hit > 0, FLAG_COSMIC, 0).astype(np.int16)
        flags[on] = f
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fluxerr > 0, flux / fluxerr, np.nan)
    detected = np.isfinite(snr) & (snr >= nsigma)
    zp = np.full(n, np.nan)
    if magzp is not None:
        zp = np.asarray(magzp(x, y), float) if callable(magzp) else np.full(n, float(magzp))
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(detected & (flux > 0), zp - 2.5 * np.log10(np.where(flux > 0, flux, 1)),
                       np.nan)
        magerr = np.where(detected & (flux > 0), np.hypot(1.0857 * fluxerr / flux,
                                                          magzp_err or 0.0), np.nan)
        limmag = zp - 2.5 * np.log10(limflux)
        # a non-detection's upper limit on the source itself: max(flux, 0) + nsigma error
        upflux = np.maximum(np.where(np.isfinite(flux), flux, 0.0), 0.0) + nsigma * fluxerr
        uplim = np.where(~detected & (upflux > 0), zp - 2.5 * np.log10(
            np.where(upflux > 0, upflux, 1)), np.nan)
    return Table({"name": names, "ra": ra, "dec": dec, "x": x, "y": y, "flux": flux,
                  "fluxerr": fluxerr, "snr": snr, "mag": mag, "magerr": magerr,
                  "limmag": limmag, "uplim": uplim, "limflux": limflux,
                  "detected": detected, "flags": flags})


def _local_variance(var: np.ndarray, mask: np.ndarray, x, y, r: float) -> list[float]:
    """Median variance of an annulus (r .. 2r) around each position: the background
    noise there without the source's own photons."""
    ny, nx = var.shape
    out = []
    R = int(math.ceil(2 * r)) + 1
    for xc, yc in zip(x, y):
        x0, x1 = max(int(xc) - R, 0), min(int(xc) + R + 1, nx)
        y0, y1 = max(int(yc) - R, 0), min(int(yc) + R + 1, ny)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (xx - xc) ** 2 + (yy - yc) ** 2
        sel = (d2 >= r * r) & (d2 <= 4 * r * r) & ~mask[y0:y1, x0:x1]
        vals = var[y0:y1, x0:x1][sel]
        out.append(float(np.median(vals)) if vals.size else float("nan"))
    return out
