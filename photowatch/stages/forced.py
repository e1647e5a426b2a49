"""Forced photometry at given sky positions (issue 21): the same aperture, aperture
correction and zero point as the catalogue (CAT), measured whether or not a source was
detected there.

Per position: the aperture sum at the WCS position (no re-centring: a forced measurement
must not wander onto a neighbour; a masked or off-frame pixel of the aperture takes the
value of the pixel opposite the position, so a bad pixel or the frame's edge does not
take the source's light, and the point keeps its MASKED or EDGE flag) less the local
background (clipped median of an
annulus, :func:`photowatch.stages.depth.local_background`: a target sits on whatever the
sky subtraction left there), its error: the measurement's noise, from the ERR plane (sky,
read noise and the source's own Poisson noise) plus that of the annulus median (on a
coadd, the background part scaled by a measured ``noise_factor``), S/N, the
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
                      noise_factor: float | None = None, local_bkg: bool = True):
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
        None (a frame): the error is the measurement's own noise, ERR's in the aperture
        plus the local background's (the annulus median of N pixels adds
        ``(pi / 2) A^2 sky_var / N``, :func:`photowatch.stages.depth.background_error_factor`).
        A number (a coadd, whose resampling correlates the noise): measured over
        ERR-predicted background noise of an aperture sum
        (:func:`photowatch.stages.depth.empty_aperture_noise`, which includes the
        background's noise), scaling the background part of ERR's error.
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

    from photowatch.stages.depth import (
        ANNULUS,
        background_error_factor,
        limiting_flux,
        local_background,
    )

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
    half = int(math.ceil(ANNULUS[1] * r)) + 3
    measured = noise_factor is not None
    k2 = float(noise_factor) ** 2 if measured else 1.0
    area = math.pi * r * r
    # each target in its own cutout: the cost is per target, not per frame pixel
    box = 2 * half + 1
    for k in np.flatnonzero(on):
        ix, iy = int(round(x[k])), int(round(y[k]))
        bx, by = ix - half, iy - half  # the box's origin on the frame: off the frame = NODATA
        x0, x1, y0, y1 = max(bx, 0), min(bx + box, nx), max(by, 0), min(by + box, ny)
        inner = (slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx))
        data = np.zeros((box, box), np.float32)
        v = np.ones((box, box), np.float32)
        m = np.ones((box, box), bool)
        data[inner] = sci[y0:y1, x0:x1]
        v[inner] = var[y0:y1, x0:x1]
        bad = ~np.isfinite(data) | ~(v > 0) | ~np.isfinite(v)
        m[inner] = bad[inner]
        cosmic = None
        if mask is not None:
            mk = np.asarray(mask[y0:y1, x0:x1])
            m[inner] |= (mk & _FLAG_BITS) != 0
            cosmic = np.zeros((box, box), np.float32)
            cosmic[inner] = (mk & int(Mask.COSMIC)) != 0
        if bad.any():
            data[bad] = 0.0
            v[bad] = np.float32(np.median(v[~bad])) if (~bad).any() else np.float32(1.0)
        xc, yc = np.array([x[k] - bx]), np.array([y[k] - by])
        # masked or off-frame pixels of the aperture take the value of the pixel opposite
        # the position (a point source is symmetric): its flux is kept, not lost
        ad, av, am, cov = _mirror_fill(data, v, m, float(xc[0]), float(yc[0]), r)
        f_ap, e_ap, _ = sep.sum_circle(ad, xc, yc, r, var=av, mask=am, subpix=5)
        e_ap = np.sqrt(e_ap ** 2 + cov)
        # truncated by the frame's edge (not by the cutout's)
        trunc = (x[k] - r < -0.5) or (y[k] - r < -0.5) or (x[k] + r > nx - 0.5) or \
            (y[k] + r > ny - 0.5)
        f = 0
        yy, xx = np.nonzero(m[inner])
        if ((xx + x0 - x[k]) ** 2 + (yy + y0 - y[k]) ** 2 <= (r + 0.5) ** 2).any():
            f |= FLAG_MASKED
        if trunc:
            f |= FLAG_EDGE
        if cosmic is not None and cosmic.any():
            hit, _, _ = sep.sum_circle(cosmic, xc, yc, max(2.0, r / 2), subpix=1)
            if hit[0] > 0:
                f |= FLAG_COSMIC
        # the aperture's own background noise: the median variance of the annulus
        # (without the source, whose Poisson noise is in e_ap) gives the local limit
        sky_var = _local_variance(v, m, xc, yc, r)[0]
        flux_ap = float(f_ap[0])
        kb = 1.0  # the local background's noise over the aperture sum's (background part)
        if local_bkg:
            bkg, nb = local_background(data, m, xc, yc, r)
            if np.isfinite(bkg[0]):
                flux_ap -= area * float(bkg[0])
                kb = background_error_factor(area, float(nb[0]))
            else:
                f |= FLAG_NOBKG
        sv = sky_var if np.isfinite(sky_var) else 0.0
        kf = math.sqrt(k2) if measured else kb
        e_tot = math.sqrt(max(float(e_ap[0]) ** 2 + (kf * kf - 1.0) * area * sv, 0.0))
        flux[k] = flux_ap * apcor
        fluxerr[k] = e_tot * apcor
        limflux[k] = limiting_flux(math.sqrt(sky_var), r, apcor, nsigma, kf) \
            if sky_var > 0 else np.nan
        flags[k] |= f
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


def _mirror_fill(data, var, bad, xc: float, yc: float, r: float):
    """Copies of ``data``, ``var`` and ``bad`` where each bad pixel within ``r + 1`` of
    (xc, yc) takes the value at the opposite point ``2 (xc, yc) - (x, y)``, interpolated
    bilinearly between its four good pixels (SExtractor's MASK_TYPE CORRECT, sub-pixel:
    the nearest pixel is up to 1 px off near the core, +2.5 % of a star's flux for one
    column); and the variance the aperture sum gains because the copied noise now counts
    twice (``2 sum var``: a pair sums ``2 n``, variance ``4 var``, not ``2 var``). Pixels
    whose opposite point touches a bad or outside pixel stay bad (their light lost; the
    flag tells)."""
    yy, xx = np.nonzero(bad)
    near = (xx - xc) ** 2 + (yy - yc) ** 2 <= (r + 1.0) ** 2
    if not near.any():
        return data, var, bad, 0.0
    yy, xx = yy[near], xx[near]
    px, py = 2.0 * xc - xx, 2.0 * yc - yy
    jx, jy = np.floor(px).astype(int), np.floor(py).astype(int)
    ny, nx = data.shape
    ok = (jx >= 0) & (jx + 1 < nx) & (jy >= 0) & (jy + 1 < ny)
    yy, xx, px, py, jx, jy = yy[ok], xx[ok], px[ok], py[ok], jx[ok], jy[ok]
    ok = ~(bad[jy, jx] | bad[jy, jx + 1] | bad[jy + 1, jx] | bad[jy + 1, jx + 1])
    yy, xx, px, py, jx, jy = yy[ok], xx[ok], px[ok], py[ok], jx[ok], jy[ok]
    if not yy.size:
        return data, var, bad, 0.0
    fx, fy = (px - jx).astype(np.float32), (py - jy).astype(np.float32)
    w = [((1 - fy) * (1 - fx), jy, jx), ((1 - fy) * fx, jy, jx + 1),
         (fy * (1 - fx), jy + 1, jx), (fy * fx, jy + 1, jx + 1)]
    val = sum(wk * data[a, b] for wk, a, b in w)
    vv = sum(wk * var[a, b] for wk, a, b in w)
    data, var, bad = data.copy(), var.copy(), bad.copy()
    data[yy, xx] = val
    var[yy, xx] = vv
    bad[yy, xx] = False
    inside = (xx - xc) ** 2 + (yy - yc) ** 2 <= r * r
    return data, var, bad, float(2.0 * vv[inside].sum())


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
