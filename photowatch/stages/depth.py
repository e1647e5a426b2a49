"""Depth: the 5-sigma point-source limiting magnitude of a frame (issue 21).

A point source is "at the limit" when the catalogue would give it a signal-to-noise
ratio of ``nsigma``: the same circular aperture as CAT (radius APRAD = aperture_fwhm x
FWHM), the same per-pixel noise the CAT flux errors come from (the ERR plane), the same
aperture correction (APCOR) and zero point (MAGZP). With ``sigma_ap = noise sqrt(pi r^2)``
the aperture noise of the background and ``f`` the source's electrons in the aperture
(its own Poisson noise included, as in ERR)::

    f / sqrt(sigma_ap^2 + f) = n   =>   f = (n^2 + sqrt(n^4 + 4 n^2 sigma_ap^2)) / 2

and the limit is ``LIMMAG = MAGZP - 2.5 log10(f * APCOR)``.

The noise is that of a measurement at a known position: ERR's in the aperture (right per
pixel, sky and stars, to 1 % on the simulator at 1k and 2k) plus the noise of the local
background that forced photometry subtracts, the median of the annulus
(:func:`background_error_factor`; ``BKG_FACTOR`` = 1.110 for the full annulus).
:func:`empty_aperture_noise` puts apertures on empty sky (away from every CAT source),
each with its local background from an annulus as forced photometry does, and compares
their robust scatter with what ERR predicts: the ratio (``apnoise_factor``, typically
1.1-1.4). On a frame that ratio is mostly confusion, not noise: random empty positions
catch stars below the detection limit (on the simulator 1.3, where positions with no star
at all in the footprint give 1.11 = ``BKG_FACTOR``), a constant offset at a given
position rather than a frame-to-frame scatter; it scales the noise of a coadd, whose
resampling correlates its pixels (:func:`coadd_depth`). Forced photometry at a known
position detects the sources brighter than LIMMAG (``stages/forced.py``), and so does
blind detection, the CAT: its
PSF-matched pass (``stages/sources._detect_faint``, ``psf_detect_snr``) thresholds at the
same 5 sigma in the CAT aperture against the filtered image's measured noise — see
benchmarks/README.md, "Depth".
"""

from __future__ import annotations

import math

import numpy as np


def aperture_noise(noise_e: float, r_ap_px: float) -> float:
    """Background noise (e-) of a circular aperture sum of radius ``r_ap_px``."""
    return float(noise_e) * math.sqrt(math.pi * float(r_ap_px) ** 2)


def background_error_factor(area_px: float, n_bkg: float) -> float:
    """Noise of a local-background-subtracted aperture sum over that of the sum alone:
    ``sqrt(1 + (pi / 2) A / N)`` for an aperture of ``A`` pixels and a background that is
    the median of ``N`` annulus pixels of the same per-pixel noise (a median's variance is
    ``pi / 2 sigma^2 / N``; the 3-sigma clipping of :func:`local_background` hardly
    changes it). The full annulus :data:`ANNULUS` (N = 6.75 A) gives 1.110. NaN without
    background pixels."""
    if not (n_bkg > 0 and area_px > 0):
        return float("nan")
    return math.sqrt(1.0 + 0.5 * math.pi * float(area_px) / float(n_bkg))


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


def pixel_noise(var: np.ndarray, mask: np.ndarray | None = None, step: int = 4,
                bits: int | None = None) -> float:
    """Median per-pixel noise (e-) of a frame's unmasked pixels (every ``step``-th pixel:
    a median of ~1e6 values is exact enough and costs ~10 ms at 4k). ``mask``: True or
    nonzero = masked, or with ``bits`` the MASK bits that mask."""
    v = np.asarray(var)[::step, ::step]
    ok = np.isfinite(v) & (v > 0)
    if mask is not None:
        m = np.asarray(mask)[::step, ::step]
        ok &= ((m & bits) if bits is not None else m) == 0
    if not ok.any():
        return float("nan")
    return float(np.sqrt(np.median(v[ok])))


def coadd_depth(*, weights, qcs, sum_w: float, aperture_fwhm: float,
                pixel_scale_arcsec: float, magzp: float | None, nsigma: float = 5.0) -> dict:
    """A quick-look coadd's aperture, aperture correction, noise and depth where every
    member overlaps.

    ``weights`` and ``qcs``: each member's coadd weight and frame qc (fwhm_arcsec,
    apcor, apnoise_factor, zp_err). Their weighted means (the coadd's own weights) give
    the aperture ``aperture_fwhm x FWHM``, APCOR, the measured noise excess (confusion
    and sky residues do not average down) and the zero point's error
    ``sqrt(sum w^2 e^2) / sum w``; the weighted mean's per-pixel noise is
    ``1 / sqrt(sum_w)`` (reference electrons), so LIMMAG = MAGZP - 2.5 log10(limiting
    flux). Empty dict when no member has a FWHM and APCOR.
    """
    use = [(w, q) for w, q in zip(weights, qcs) if q.get("fwhm_arcsec") and q.get("apcor")]
    if not use or not sum_w > 0:
        return {}
    w = np.array([u[0] for u in use], float)

    def mean(key, default):
        return float(np.sum(w * np.array([q.get(key) or default for _, q in use])) / w.sum())

    fwhm = mean("fwhm_arcsec", np.nan)
    apcor = mean("apcor", 1.0)
    factor = mean("apnoise_factor", 1.0)
    zperr = np.array([q.get("zp_err") or 0.0 for _, q in use])
    zp_err = float(np.sqrt(np.sum(w ** 2 * zperr ** 2)) / w.sum())
    r_ap = aperture_fwhm * fwhm / pixel_scale_arcsec
    flux = limiting_flux(1.0 / math.sqrt(sum_w), r_ap, apcor, nsigma, factor)
    limmag = magzp - 2.5 * math.log10(flux) if magzp is not None and np.isfinite(flux) \
        else None
    return {"fwhm_arcsec": fwhm, "apcor": apcor, "aprad_px": r_ap, "limmag": limmag,
            "limflux": flux, "apnoise_factor": factor, "zp_err": zp_err}


#: local background annulus of forced photometry and of the empty apertures (x r_ap)
ANNULUS = (1.5, 3.0)
#: :func:`background_error_factor` of the full annulus: the noise a point source's
#: aperture sum has on a frame whose ERR is right (LIMMAG's and forced photometry's)
BKG_FACTOR = background_error_factor(1.0, ANNULUS[1] ** 2 - ANNULUS[0] ** 2)


def _disc(r_in: float, r_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel offsets (dy, dx) with r_in <= distance <= r_out from a pixel centre."""
    R = int(math.ceil(r_out))
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1]
    d2 = xx * xx + yy * yy
    sel = (d2 >= r_in * r_in) & (d2 <= r_out * r_out)
    return yy[sel], xx[sel]


def _stack(img: np.ndarray, ix, iy, dy, dx, fill=np.nan) -> np.ndarray:
    """``img`` at the offsets around each integer centre: (positions, offsets); ``fill``
    outside the image."""
    ny, nx = img.shape
    yy = iy[:, None] + dy[None, :]
    xx = ix[:, None] + dx[None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    vals = img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
    if inside.all():
        return vals
    vals = vals.astype(np.float64 if vals.dtype.kind == "f" else vals.dtype)
    vals[~inside] = fill
    return vals


def _bad_stack(bad, bits, ix, iy, dy, dx) -> np.ndarray:
    st = _stack(bad, ix, iy, dy, dx, fill=True if bits is None else 0xFFFF)
    return (st & bits) != 0 if bits is not None else st.astype(bool)


def local_background(data: np.ndarray, bad: np.ndarray | None, x, y, r_ap: float,
                     annulus: tuple[float, float] = ANNULUS,
                     bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the 3-sigma-clipped median of the annulus ``annulus x r_ap`` around
    the nearest pixel centre (e- per pixel) and the number of pixels it used (NaN, 0 where
    fewer than 10). Vectorised: all positions at once. ``bad``: True = excluded, or with
    ``bits`` a MASK plane and the bits that exclude (read only where needed)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size == 0:
        return np.zeros(0), np.zeros(0, int)
    dy, dx = _disc(annulus[0] * r_ap, annulus[1] * r_ap)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    vals = _stack(data, ix, iy, dy, dx).astype(np.float32)
    if bad is not None:
        vals[_bad_stack(bad, bits, ix, iy, dy, dx)] = np.nan
    # one sort per row (NaN last), then clipping moves two indices: 3-sigma (IQR) clip,
    # twice, and the median of what is left; no per-row Python loop
    srt = np.sort(vals, axis=1)
    rows = np.arange(srt.shape[0])
    last = srt.shape[1] - 1
    lo = np.zeros(srt.shape[0], int)
    hi = np.isfinite(srt).sum(axis=1)
    for _ in range(2):
        k = hi - lo
        med = srt[rows, np.clip(lo + k // 2, 0, last)]
        iqr = srt[rows, np.clip(lo + (3 * k) // 4, 0, last)] - \
            srt[rows, np.clip(lo + k // 4, 0, last)]
        sig = np.where(iqr > 0, iqr / 1.349, np.inf)
        with np.errstate(invalid="ignore"):
            new_lo = (srt < (med - 3 * sig)[:, None]).sum(axis=1)
            new_hi = (srt <= (med + 3 * sig)[:, None]).sum(axis=1)
        ok = (k >= 10) & np.isfinite(sig)
        lo, hi = np.where(ok, new_lo, lo), np.where(ok, new_hi, hi)
    count = hi - lo
    level = srt[rows, np.clip(lo + count // 2, 0, last)].astype(np.float64)
    level = np.where(count >= 10, level, np.nan)
    return level, np.where(count >= 10, count, 0)


def empty_aperture_noise(data: np.ndarray, var: np.ndarray, bad: np.ndarray | None,
                         sources_xy: np.ndarray, r_ap: float, fwhm_px: float, *,
                         n: int = 300, seed: int = 0, bits: int | None = None
                         ) -> tuple[float, int]:
    """Measured over predicted noise of local-background-subtracted aperture sums on
    empty sky: (factor, apertures used); (1.0, n) when fewer than 30 fit on the frame.

    Apertures (the pixels whose centres lie within ``r_ap`` of a pixel centre) are placed
    at random where no CAT source lies within ``r_out + 2 FWHM`` and no pixel of the
    aperture is bad; the factor is the robust (MAD) scatter of
    ``(sum - A bkg) / sqrt(sum var)``. Touches only those pixels (~10 ms at any size).
    """
    from scipy.spatial import cKDTree

    ny, nx = data.shape
    r_out = ANNULUS[1] * r_ap
    margin = int(math.ceil(r_out)) + 2
    if nx <= 2 * margin + 1 or ny <= 2 * margin + 1:
        return 1.0, 0
    rng = np.random.default_rng(seed)
    m = max(8 * n, 1000)
    x = rng.integers(margin, nx - margin, m)
    y = rng.integers(margin, ny - margin, m)
    if len(sources_xy):
        d, _ = cKDTree(np.asarray(sources_xy, float)).query(np.column_stack([x, y]))
        keep = d > r_out + 2 * max(fwhm_px, 1.0)
        x, y = x[keep], y[keep]
    x, y = x[:n], y[:n]
    if x.size < 30:
        return 1.0, int(x.size)
    dy, dx = _disc(0.0, r_ap)
    vals = _stack(data, x, y, dy, dx).astype(np.float64)
    vv = _stack(var, x, y, dy, dx).astype(np.float64)
    ok = np.isfinite(vals).all(axis=1) & (vv > 0).all(axis=1)
    if bad is not None:
        ok &= ~_bad_stack(bad, bits, x, y, dy, dx).any(axis=1)
    bkg, _ = local_background(data, bad, x, y, r_ap, bits=bits)
    ok &= np.isfinite(bkg)
    if ok.sum() < 30:
        return 1.0, int(ok.sum())
    pull = (vals[ok].sum(axis=1) - dy.size * bkg[ok]) / np.sqrt(vv[ok].sum(axis=1))
    width = 1.4826 * float(np.median(np.abs(pull - np.median(pull))))
    return (width if np.isfinite(width) and width > 0 else 1.0), int(ok.sum())
