"""Depth: the 5-sigma point-source limiting magnitude of a frame (issue 21).

A point source is "at the limit" when the catalogue would give it a signal-to-noise
ratio of ``nsigma``: the same circular aperture as CAT (radius APRAD = aperture_fwhm x
FWHM), the same per-pixel noise the CAT flux errors come from (the ERR plane), the same
aperture correction (APCOR) and zero point (MAGZP). With ``sigma_ap = noise sqrt(pi r^2)``
the aperture noise of the background and ``f`` the source's electrons in the aperture
(its own Poisson noise included, as in ERR)::

    f / sqrt(sigma_ap^2 + f) = n   =>   f = (n^2 + sqrt(n^4 + 4 n^2 sigma_ap^2)) / 2

and the limit is ``LIMMAG = MAGZP - 2.5 log10(f * APCOR)``.

The noise is *measured*: ERR predicts a pixel's noise, but an aperture of a few hundred
pixels also sums what the sky subtraction left (wings of bright stars, faint undetected
stars, a residual gradient). :func:`empty_aperture_noise` puts apertures on empty sky
(away from every CAT source), each with its local background from an annulus as forced
photometry does, and compares their robust scatter with what ERR predicts: the ratio
(``apnoise_factor``, typically 1.1-1.4) scales the aperture noise of the limit and of
forced photometry's errors. Forced photometry at a known position detects the sources
brighter than LIMMAG (``stages/forced.py``); blind detection (sep at ``detect_sigma`` per
pixel over ``min_area_px`` pixels) is a stricter test at the default settings — see
benchmarks/README.md, "Depth".
"""

from __future__ import annotations

import math

import numpy as np


def aperture_noise(noise_e: float, r_ap_px: float) -> float:
    """Background noise (e-) of a circular aperture sum of radius ``r_ap_px``."""
    return float(noise_e) * math.sqrt(math.pi * float(r_ap_px) ** 2)


def limiting_flux(noise_e: float, r_ap_px: float, apcor: float = 1.0,
                  nsigma: float = 5.0, factor: float = 1.0) -> float:
    """Aperture-corrected flux (e-, SCI units) of a point source at ``nsigma``.

    ``noise_e``: per-pixel noise (e-) of the background (median ERR of unmasked pixels);
    ``factor``: measured aperture noise over the ERR prediction (:func:`empty_aperture_noise`).
    NaN when the inputs are not finite and positive.
    """
    sig = aperture_noise(noise_e, r_ap_px) * float(factor)
    if not (np.isfinite(sig) and sig > 0 and np.isfinite(apcor) and apcor > 0):
        return float("nan")
    n2 = float(nsigma) ** 2
    f_ap = 0.5 * (n2 + math.sqrt(n2 * n2 + 4.0 * n2 * sig * sig))
    return f_ap * float(apcor)


def limiting_magnitude(noise_e: float, r_ap_px: float, apcor: float, magzp: float | None,
                       nsigma: float = 5.0, factor: float = 1.0) -> float:
    """``MAGZP - 2.5 log10(limiting_flux)``; NaN without a zero point."""
    f = limiting_flux(noise_e, r_ap_px, apcor, nsigma, factor)
    if magzp is None or not np.isfinite(magzp) or not np.isfinite(f):
        return float("nan")
    return float(magzp) - 2.5 * math.log10(f)


def pixel_noise(var: np.ndarray, mask: np.ndarray | None = None, step: int = 4) -> float:
    """Median per-pixel noise (e-) of a frame's unmasked pixels (every ``step``-th pixel:
    a median of ~1e6 values is exact enough and costs ~10 ms at 4k)."""
    v = np.asarray(var)[::step, ::step]
    ok = np.isfinite(v) & (v > 0)
    if mask is not None:
        ok &= np.asarray(mask)[::step, ::step] == 0
    if not ok.any():
        return float("nan")
    return float(np.sqrt(np.median(v[ok])))


def coadd_limiting_flux(weights, member_noise_ap, nsigma: float = 5.0) -> float:
    """5-sigma flux of a weighted-mean coadd from its members' aperture noise.

    ``weights``: the coadd's member weights; ``member_noise_ap``: each member's
    aperture noise in the coadd's flux units (reference electrons). The coadd's flux
    is ``sum w f / sum w`` so its aperture noise is ``sqrt(sum w^2 s^2) / sum w``;
    the 5-sigma flux is 5 times that (a source at a coadd's limit is faint: its own
    Poisson noise is left out). NaN when nothing usable.
    """
    w = np.asarray(weights, float)
    s = np.asarray(member_noise_ap, float)
    ok = np.isfinite(w) & (w > 0) & np.isfinite(s) & (s > 0)
    if not ok.any():
        return float("nan")
    return float(nsigma) * float(np.sqrt(np.sum(w[ok] ** 2 * s[ok] ** 2)) / np.sum(w[ok]))


#: local background annulus of forced photometry and of the empty apertures (x r_ap)
ANNULUS = (1.5, 3.0)


def local_background(data: np.ndarray, bad: np.ndarray | None, x, y, r_ap: float,
                     annulus: tuple[float, float] = ANNULUS) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the 3-sigma-clipped median of the annulus ``annulus x r_ap`` (e- per
    pixel) and the number of pixels it used (NaN, 0 where none)."""
    ny, nx = data.shape
    r_in, r_out = annulus[0] * r_ap, annulus[1] * r_ap
    R = int(math.ceil(r_out)) + 1
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    level = np.full(len(x), np.nan)
    count = np.zeros(len(x), int)
    for k, (xc, yc) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        ix, iy = int(round(xc)), int(round(yc))
        x0, x1, y0, y1 = ix - R, ix + R + 1, iy - R, iy + R + 1
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, nx), max(y0, 0), min(y1, ny)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        sub = data[cy0:cy1, cx0:cx1]
        d2 = (xx[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] + ix - xc) ** 2 + \
            (yy[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] + iy - yc) ** 2
        sel = (d2 >= r_in * r_in) & (d2 <= r_out * r_out)
        if bad is not None:
            sel &= ~bad[cy0:cy1, cx0:cx1]
        vals = sub[sel]
        vals = vals[np.isfinite(vals)]
        for _ in range(3):
            if vals.size < 10:
                break
            med = np.median(vals)
            mad = 1.4826 * np.median(np.abs(vals - med))
            keep = np.abs(vals - med) <= 3 * mad if mad > 0 else np.ones(vals.size, bool)
            if keep.all():
                break
            vals = vals[keep]
        if vals.size >= 10:
            level[k] = float(np.median(vals))
            count[k] = vals.size
    return level, count


def empty_aperture_noise(data: np.ndarray, var: np.ndarray, bad: np.ndarray | None,
                         sources_xy: np.ndarray, r_ap: float, fwhm_px: float, *,
                         n: int = 300, seed: int = 0) -> tuple[float, int]:
    """Measured over predicted noise of local-background-subtracted aperture sums on
    empty sky: (factor, apertures used); (1.0, n) when fewer than 30 fit on the frame.

    Apertures are placed at random where no CAT source lies within ``r_out +
    2 FWHM`` and no pixel of the aperture is bad; the factor is the robust (MAD) scatter
    of ``(sum - A bkg) / sqrt(sum var)``.
    """
    import sep
    from scipy.spatial import cKDTree

    ny, nx = data.shape
    r_out = ANNULUS[1] * r_ap
    margin = r_out + 2
    if nx <= 2 * margin + 1 or ny <= 2 * margin + 1:
        return 1.0, 0
    rng = np.random.default_rng(seed)
    m = max(8 * n, 1000)
    x = rng.uniform(margin, nx - 1 - margin, m)
    y = rng.uniform(margin, ny - 1 - margin, m)
    if len(sources_xy):
        d, _ = cKDTree(np.asarray(sources_xy, float)).query(np.column_stack([x, y]))
        keep = d > r_out + 2 * max(fwhm_px, 1.0)
        x, y = x[keep], y[keep]
    x, y = x[:n], y[:n]
    if x.size < 30:
        return 1.0, int(x.size)
    d32 = np.ascontiguousarray(data, dtype=np.float32)
    v32 = np.ascontiguousarray(var, dtype=np.float32)
    flux, err, flag = sep.sum_circle(d32, x, y, r_ap, var=v32, mask=bad, subpix=5)
    bkg, cnt = local_background(d32, bad, x, y, r_ap)
    ok = (flag & sep.APER_HASMASKED) == 0 if bad is not None else np.ones(x.size, bool)
    ok &= np.isfinite(bkg) & (err > 0)
    if ok.sum() < 30:
        return 1.0, int(ok.sum())
    pull = (flux[ok] - math.pi * r_ap * r_ap * bkg[ok]) / err[ok]
    width = 1.4826 * float(np.median(np.abs(pull - np.median(pull))))
    return (width if np.isfinite(width) and width > 0 else 1.0), int(ok.sum())
