"""Source extraction: a sky-subtracted frame → a table of measured sources.

:func:`extract_sources` runs sep on the frame's SCI plane with its ERR plane
as the per-pixel noise (the threshold is ``detect_sigma`` times ERR) and its
MASK plane (bad, no-data and low-flat pixels are excluded from detection;
saturated pixels are kept so a saturated star is detected as one object and
then flagged). A second, PSF-matched pass (:func:`_detect_faint`) adds the faint
point sources down to ``psf_detect_snr`` in the CAT aperture: the depth LIMMAG
states (stages/depth.py). For every source it measures a windowed centroid
(``sep.winpos``, SExtractor's XWIN/YWIN), a FWHM, an ellipticity, the flux in
a circular aperture of radius ``aperture_fwhm`` times the frame's median
stellar FWHM, and an aperture-corrected total flux.

Conventions: pixel positions are 0-based, ``(0, 0)`` is the centre of the
first pixel, ``x`` is the fast (column) axis. Fluxes are in the units of SCI
(electrons). Magnitudes are instrumental, ``-2.5 log10(flux)``, until a zero
point is known.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from enum import IntFlag

import numpy as np
from astropy.stats import mad_std

from photowatch.core.config import Sources
from photowatch.core.frame import Frame, Mask
from photowatch.core.rowstats import median, nanmedian_rows

log = logging.getLogger(__name__)

#: FWHM of a Gaussian in units of its sigma
GAUSS_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: sources with a smaller FWHM (pixels) are single-pixel events, never stars
MIN_STAR_FWHM_PX = 1.5
#: mask bits that exclude a pixel from detection (saturated pixels stay: see the module doc)
_DETECT_MASKED = int(Mask.BAD | Mask.NODATA | Mask.LOWFLAT)
#: mask bits that exclude a pixel from an aperture sum (sep fills them with the aperture mean)
_PHOT_MASKED = int(Mask.BAD | Mask.SATURATED | Mask.NODATA | Mask.LOWFLAT)


class SourceFlag(IntFlag):
    """Bits of the ``flags`` column of a source table (photowatch's own flags).

    The raw sep extraction and aperture flags are kept apart in ``sepflags``.
    """

    SATURATED = 1  #: a saturated pixel within the photometric aperture
    MASKED = 2  #: a bad, no-data or low-flat pixel within the aperture
    COSMIC = 4  #: a cosmic-ray-cleaned pixel within the aperture
    EDGE = 8  #: the aperture (or the detected object) is cut by the image edge
    BLENDED = 16  #: deblended from a neighbour (sep ``OBJ_MERGED``)
    CENTROID = 32  #: the windowed centroid failed; the isophotal barycentre is used
    BADFLUX = 64  #: the aperture flux is not positive or not finite
    SHARP = 128  #: sharper than any star (one pixel): a hot pixel or cosmic-ray residual
    #: found by the PSF-matched pass only (:func:`_detect_faint`): fainter than the first
    #: pass's threshold (aperture S/N below ~11). Not a defect: what needs bright clean
    #: stars (zero point, new-source search) leaves these out, as it did before that pass.
    #: (256 and 512 are the coadd catalogues' bits, stages/photometry.py)
    FAINT = 1024


#: columns of a source table, in order, with their units
COLUMNS = {
    "id": ("i4", None),
    "x": ("f8", "pix"),
    "y": ("f8", "pix"),
    "ra": ("f8", "deg"),
    "dec": ("f8", "deg"),
    "flux": ("f8", "electron"),
    "fluxerr": ("f8", "electron"),
    "flux_aper": ("f8", "electron"),
    "fluxerr_aper": ("f8", "electron"),
    "mag": ("f8", "mag"),
    "magerr": ("f8", "mag"),
    "snr": ("f4", None),
    "fwhm": ("f4", "pix"),
    "ellipticity": ("f4", None),
    "theta": ("f4", "deg"),
    "peak": ("f4", "electron"),
    "npix": ("i4", None),
    "flags": ("i2", None),
    "sepflags": ("i2", None),
    "stellar": ("?", None),
}


@dataclass(frozen=True, eq=False)
class SourceList:
    """The sources of one frame and the frame's median image quality.

    Attributes
    ----------
    table : astropy.table.Table
        One row per source, columns :data:`COLUMNS` (``x, y`` 0-based pixels;
        ``ra, dec`` NaN until a WCS is known, see
        :func:`photowatch.stages.astrometry.radec_for`).
    fwhm_px, fwhm_arcsec : float
        Median FWHM of the unflagged stellar sources (NaN when there are none).
    ellipticity : float
        Median ``1 - b/a`` of the unflagged stellar sources (NaN when none).
    aperture_radius_px : float
        Radius of the photometric aperture (pixels).
    aperture_correction : float
        Multiplicative correction from the aperture to the large aperture
        (``flux = flux_aper * aperture_correction``); 1.0 when it could not be
        measured (``n_apcor == 0``).
    aperture_correction_err : float
        Its standard error (common to all sources; not included in ``fluxerr``).
    aperture_correction_sem : float
        The statistical part of that error: for a Moffat model, the scatter of its stars'
        corrections over their number, without the model's systematic floor (what
        :attr:`aperture_correction_settled` judges); NaN without a correction.
    n_apcor : int
        Bright isolated unsaturated stars used for the aperture correction.
    n_stellar : int
        Sources classified as stellar (the ``stellar`` column).
    """

    table: object
    fwhm_px: float = float("nan")
    fwhm_arcsec: float = float("nan")
    ellipticity: float = float("nan")
    aperture_radius_px: float = float("nan")
    aperture_correction: float = 1.0
    aperture_correction_err: float = 0.0
    aperture_correction_sem: float = float("nan")
    n_apcor: int = 0
    n_stellar: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def aperture_correction_settled(self) -> bool:
        """The frame's own correction stands without the night's: a precise growth curve,
        or a Moffat model its own stars pin down (at least :data:`_APCOR_MODEL_MIN_STARS`,
        statistical error within the model's own floor, :data:`_APCOR_MODEL_SYS`: the
        night's frames cannot make it more precise than that). At the same FWHM the
        profile's wings still change from frame to frame (a Moffat beta of 2.6 or 3.9 at
        2.2 px: corrections of 1.064 and 1.017 at 2 FWHM), so such a frame is not pulled
        to the night's mean; a frame of few or scattered stars borrows (RATIR: 3-9 stars,
        0.2-1 %)."""
        source = self.meta.get("APCORSRC")
        if source == "growth":
            return True
        return (source == "psf" and self.n_apcor >= _APCOR_MODEL_MIN_STARS
                and bool(self.aperture_correction_sem <= _APCOR_MODEL_SYS))

    def with_aperture_correction(self, apcor: float, err: float, n: int, source: str
                                 ) -> SourceList:
        """The same sources with another aperture correction (``flux``, ``fluxerr`` and
        ``mag`` rescaled from ``flux_aper``; the meta APCOR* updated)."""
        table = self.table.copy()
        ratio = float(apcor) / self.aperture_correction if self.aperture_correction else 1.0
        if len(table):
            table["flux"] = table["flux_aper"] * np.float32(apcor)
            table["fluxerr"] = table["fluxerr_aper"] * np.float32(apcor)
            if ratio > 0:
                table["mag"] = table["mag"] - np.float32(2.5 * np.log10(ratio))
        meta = {**self.meta, "APCOR": float(apcor), "APCORERR": float(err), "APCORN": int(n),
                "APCORSRC": source}
        table.meta.update(meta)
        return replace(self, table=table, aperture_correction=float(apcor),
                       aperture_correction_err=float(err), n_apcor=int(n), meta=meta)


def pool_aperture_correction(own: tuple, night: list[tuple], *, fwhm_tol: float = 0.15
                             ) -> tuple[float, float, int] | None:
    """A frame's aperture correction borrowed from the night (issue 17).

    ``own`` and each of ``night``: (apcor, err, fwhm) as each frame measured it (its
    growth curve or its stars' Moffat model). The frames of the night within
    ``fwhm_tol`` of this frame's FWHM (same camera and filter) and this frame are
    combined by their inverse-variance weighted mean (errors floored at 0.5 %): a PSF
    model built over several frames, steadier than one 10 s frame's handful of stars.
    Returns (apcor >= 1, its error, frames combined) or None without a usable peer.
    Only for a frame whose own correction is not settled
    (:attr:`SourceList.aperture_correction_settled`).
    """
    def floored(e):  # no error known: 1 %; never below the model's own floor
        return max(e if e is not None and np.isfinite(e) and e > 0 else 0.01, _APCOR_MODEL_SYS)

    a0, e0, f0 = own
    if not (np.isfinite(a0) and np.isfinite(f0) and f0 > 0):
        return None
    vals, errs = [a0], [floored(e0)]
    for a, e, f in night:
        if a is None or f is None or not (np.isfinite(a) and np.isfinite(f)):
            continue
        if abs(f / f0 - 1.0) <= fwhm_tol and a >= 1.0:
            vals.append(a)
            errs.append(floored(e))
    if len(vals) < 2:
        return None
    w = 1.0 / np.square(errs)
    mean = float(np.sum(w * np.asarray(vals)) / w.sum())
    return max(mean, 1.0), float(1.0 / np.sqrt(w.sum())), len(vals)


def empty_table():
    """A source table with every column and no rows."""
    from astropy.table import Table

    table = Table()
    for name, (dtype, unit) in COLUMNS.items():
        table[name] = np.zeros(0, dtype=dtype)
        if unit:
            table[name].unit = unit
    return table


def _stamps(arr: np.ndarray, xi: np.ndarray, yi: np.ndarray, half: int, fill):
    """Square cut-outs ``(n, 2*half+1, 2*half+1)`` centred on integer pixels.

    Returns the values (``fill`` outside the image), and the offsets of the
    stamp pixels from ``(xi, yi)`` along x and y (broadcastable).
    """
    ny, nx = arr.shape
    off = np.arange(-half, half + 1)
    xs = xi[:, None, None] + off[None, None, :]
    ys = yi[:, None, None] + off[None, :, None]
    inside = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    vals = arr[np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)]
    vals = np.where(inside, vals, fill)
    return vals, off[None, None, :], off[None, :, None]


def _interpolated_peak(core: np.ndarray) -> np.ndarray:
    """Peak of each star from 5x5 cut-outs: the brightest pixel of the central 3x3,
    corrected by a Gaussian (log-parabola) through it and its four neighbours.

    The brightest pixel alone underestimates the peak of an undersampled star
    centred between pixels, which would bias the half-maximum area high.
    """
    n = core.shape[0]
    inner = core[:, 1:4, 1:4].reshape(n, -1)
    k = inner.argmax(axis=1)
    jy, jx = np.divmod(k, 3)
    jy += 1
    jx += 1
    rows = np.arange(n)
    c = core[rows, jy, jx].astype(np.float64)
    corr = np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo, hi in (((jy, jx - 1), (jy, jx + 1)), ((jy - 1, jx), (jy + 1, jx))):
            a = core[rows, lo[0], lo[1]].astype(np.float64)
            b = core[rows, hi[0], hi[1]].astype(np.float64)
            la, lb, lc = np.log(a), np.log(b), np.log(c)
            curv = 2 * lc - la - lb
            term = (lb - la) ** 2 / (8 * curv)
            ok = (a > 0) & (b > 0) & (c > 0) & (curv > 0) & np.isfinite(term)
            corr += np.where(ok, np.minimum(term, np.log(2.0)), 0)
    return c * np.exp(corr)


def _half_max_fwhm(data: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> tuple:
    """FWHM (pixels) from the area above half the peak, and the peak value.

    The FWHM of any round profile is ``2 sqrt(A / pi)`` where ``A`` is the
    area above half its maximum; pixels are counted within ``half`` pixels of
    the centre (see :func:`_interpolated_peak` for the peak).
    """
    xi = np.rint(x).astype(np.intp)
    yi = np.rint(y).astype(np.intp)
    vals, ox, oy = _stamps(data, xi, yi, half, np.float32(0))
    c = half
    peak = _interpolated_peak(vals[:, c - 2 : c + 3, c - 2 : c + 3])
    dx = ox + (xi - x)[:, None, None]
    dy = oy + (yi - y)[:, None, None]
    near = dx * dx + dy * dy <= half * half
    # a soft threshold (levels 0.4 to 0.6 of the peak count linearly) removes the
    # quantisation of a pixel count; to first order it is the area above 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        level = vals / peak[:, None, None].astype(np.float32)
    frac = np.clip((level - np.float32(0.4)) * np.float32(5.0), 0, 1)
    area = np.where(near, frac, 0).sum(axis=(1, 2), dtype=np.float64)
    fwhm = 2.0 * np.sqrt(area / np.pi)
    fwhm[~(peak > 0)] = np.nan
    return fwhm, peak


#: sub-pixels per pixel side of the pixel-integrated profile fit, at most ...
_FIT_SUB = 5
#: ... and enough that the midpoint rule's missing pixel variance, 1 / (12 n²) px², biases
#: the fitted FWHM by at most this fraction (1 / (24 n² sigma²) of a Gaussian core): 4 from
#: FWHM 2.7 px, 3 from 3.6, 2 from 5.4, 1 from 10.7; below 2.7 px the cap (0.23 % at 2 px)
_FIT_SUB_BIAS = 0.002
#: stars fitted for the frame's FWHM (the brightest unflagged stellar ones)
_FIT_STARS = 20
#: radius of the fitted stamps, in FWHM (+2 px)
_FIT_HALF_FWHM = 3.0
#: evaluations a star's fit may take (each of the two methods):
#: a star's fit converges in 4-5 (median), 14-42 (its slowest of a night, 3 nights of
#: 512-1024 px), a donut's or a trail's in up to 94; what does not converge by then ran to
#: scipy's own limit (600) for nothing: 1.35 s of one star on a 3 px frame, a defocused
#: frame's fits 3 s
_FIT_MAX_NFEV = 100
#: bounds of the fitted (x, y offsets, flux, ln alpha, ln(beta - 1), background)
_FIT_LOWER = np.array([-2, -2, 0, np.log(0.1), np.log(0.2), -np.inf])
_FIT_UPPER = np.array([2, 2, np.inf, np.log(2000), np.log(499), np.inf])


def _fit_subpixels(fwhm: float) -> int:
    """Sub-pixels per pixel side for a pixel-integrated fit of stars of ``fwhm`` pixels."""
    sigma = fwhm / GAUSS_FWHM
    return int(np.clip(np.ceil(np.sqrt(1.0 / (24.0 * sigma**2 * _FIT_SUB_BIAS))), 1, _FIT_SUB))


def _fitted_fwhm(data, var, x, y, fwhm0: float) -> tuple[float, int, list]:
    """The frame's FWHM (pixels) from pixel-integrated Moffat fits of its brightest stars.

    Each star's stamp (radius ``2 fwhm0 + 2``) is fitted with a circular Moffat of free
    centre, flux, width and ``beta`` plus a constant, integrated over each pixel
    (``_FIT_SUB``² sub-pixels), weighted by the variance plane; FWHM =
    ``2 alpha sqrt(2^(1/beta) - 1)``. The half-maximum area of the pixels is biased
    high for undersampled stars (a peak between pixels reads low); the fit is not.
    Returns (median FWHM, stars fitted, [(alpha, beta) per star]) or (NaN, 0, []).
    """
    from scipy.optimize import least_squares

    if not len(x) or not np.isfinite(fwhm0):
        return float("nan"), 0, []
    half = int(np.clip(np.ceil(_FIT_HALF_FWHM * fwhm0) + 2, 4, 30))
    xi, yi = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    vals, ox, oy = _stamps(data, xi, yi, half, np.nan)
    vvar, _, _ = _stamps(var, xi, yi, half, np.nan)
    # sub-pixels matter for undersampled stars only: the cost of an evaluation goes as
    # their number, (stamp x nsub)², and 5x5 sub-pixels of 43-61 px stamps made
    # defocused frames cost 3-70 s in these fits
    nsub = _fit_subpixels(fwhm0)
    sub = (np.arange(nsub) + 0.5) / nsub - 0.5
    gx = (ox[0, 0][:, None] + sub[None, :]).ravel()  # sub-pixel x positions, (W*S,)
    gy = (oy[0, :, 0][:, None] + sub[None, :]).ravel()
    w = 2 * half + 1
    # sub-pixels -> pixels (mean) as two small products, ``B a B^T``: several times
    # faster than a mean over two axes of a reshaped stamp (the fit's main cost after
    # the powers); ``a`` may be a stack of planes
    bin_matrix = np.kron(np.eye(w), np.full(nsub, 1.0 / nsub))  # (w, w*S)
    bin_matrix_t = np.ascontiguousarray(bin_matrix.T)

    def binned(a):
        return bin_matrix @ a @ bin_matrix_t

    out, shapes = [], []
    for k in range(len(x)):
        v = vals[k].astype(np.float64)
        e = np.sqrt(vvar[k].astype(np.float64))
        ok = np.isfinite(v) & np.isfinite(e) & (e > 0)
        if ok.sum() < 0.8 * v.size:
            continue
        fx, fy = x[k] - xi[k], y[k] - yi[k]
        flux0 = float(np.nansum(v))
        if not flux0 > 0:
            continue

        last: dict = {}  # the point of the last evaluation: its Jacobian reuses the powers

        def terms(p, last=last):
            """Sub-pixel powers at ``p``: q = 1 + r²/alpha², t = q^-beta (memo of one)."""
            key = (p[0], p[1], p[3], p[4])
            if last.get("key") != key:
                cx, cy, _, la, lb, _ = p
                alpha2 = np.exp(2.0 * la)
                beta = 1.0 + np.exp(lb)
                dx = gx - cx
                dy = gy - cy
                q = 1.0 + (dy[:, None] ** 2 + dx[None, :] ** 2) / alpha2
                lnq = np.log(q)
                t = np.exp(-beta * lnq)
                last.update(key=key, dx=dx, dy=dy, q=q, lnq=lnq, t=t, alpha2=alpha2,
                            beta=beta, prof=binned(t))
            return last

        def resid(p, v=v, e=e, ok=ok):
            c = terms(p)
            norm = p[2] * (c["beta"] - 1.0) / (np.pi * c["alpha2"])
            return ((norm * c["prof"] + p[5] - v) / e)[ok]

        def jac(p, e=e, ok=ok):
            # analytic derivatives of the pixel-integrated Moffat (the finite-difference
            # Jacobian cost 4 more powers of every sub-pixel and scipy's bookkeeping)
            c = terms(p)
            beta, alpha2, t, q = c["beta"], c["alpha2"], c["t"], c["q"]
            norm = p[2] * (beta - 1.0) / (np.pi * alpha2)
            prof = c["prof"]
            t1 = t / q  # q^-(beta+1)
            g = (2.0 * beta / alpha2) * t1
            b_cx, b_cy, b_la, b_lb = binned(np.stack(
                (g * c["dx"][None, :], g * c["dy"][:, None], beta * 2.0 * (q - 1.0) * t1,
                 c["lnq"] * t)))
            d_cx = norm * b_cx
            d_cy = norm * b_cy
            d_la = norm * (b_la - 2.0 * prof)
            d_lb = norm * (prof - (beta - 1.0) * b_lb)
            d_flux = (beta - 1.0) / (np.pi * alpha2) * prof
            cols = [d_cx, d_cy, d_flux, d_la, d_lb, np.ones_like(prof)]
            return np.stack([col[ok] / e[ok] for col in cols], axis=1)

        alpha0 = fwhm0 / (2.0 * np.sqrt(2.0 ** (1 / 3.0) - 1.0))
        p0 = [fx, fy, flux0, np.log(alpha0), np.log(2.0), 0.0]
        try:
            fit = least_squares(resid, p0, jac=jac, method="lm", x_scale="jac",
                                max_nfev=_FIT_MAX_NFEV)
            if not (fit.success and np.all((fit.x >= _FIT_LOWER) & (fit.x <= _FIT_UPPER))):
                fit = least_squares(resid, p0, jac=jac, method="trf", x_scale="jac",
                                    bounds=(_FIT_LOWER, _FIT_UPPER), max_nfev=_FIT_MAX_NFEV)
        except (ValueError, FloatingPointError):
            continue
        if not fit.success:
            continue
        alpha, beta = np.exp(fit.x[3]), 1.0 + np.exp(fit.x[4])
        fw = 2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0)
        # n sub-pixels a side integrate a pixel short of 1 / (12 n²) px² of variance, which
        # the fit took into the profile: 0.4 % of FWHM at 1.5 px with 5, 0.15 % at 6 px with 2
        fw = np.sqrt(max(fw * fw - GAUSS_FWHM**2 / (12.0 * nsub * nsub), 0.0))
        if np.isfinite(fw) and 0.5 * fwhm0 < fw < 2.0 * fwhm0:
            out.append(fw)
            shapes.append((float(alpha), float(beta)))
    if not out:
        return float("nan"), 0, []
    return float(np.median(out)), len(out), shapes


#: a measured growth-curve correction is used only this well known (fraction) ...
_APCOR_MAX_ERR = 0.005
#: ... and from at least this many stars; otherwise the Moffat model of the fitted stars
_APCOR_MIN_STARS = 5
#: the Moffat model's error is at least this (fraction): real profiles are not Moffats
_APCOR_MODEL_SYS = 0.005
#: a frame's Moffat model stands without the night's when from this many stars whose
#: corrections scatter by at most ``_APCOR_MODEL_SYS`` over their number
_APCOR_MODEL_MIN_STARS = 10


def moffat_alpha(fwhm, beta):
    """The width ``alpha`` of a Moffat profile of FWHM ``fwhm`` and index ``beta``."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_encircled(r, alpha, beta):
    """The fraction of a Moffat star's light within ``r`` of its centre."""
    return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)


def _model_apcor(shapes, r_ap: float) -> tuple[float, float]:
    """Total / flux in ``r_ap`` of the fitted Moffats (median over stars, and its
    statistical error: the stars' scatter over their number; the caller adds the floor)."""
    if not shapes:
        return float("nan"), float("nan")
    vals = np.array([1.0 / moffat_encircled(r_ap, a, b) for a, b in shapes])
    vals = vals[np.isfinite(vals) & (vals >= 1.0)]
    if not vals.size:
        return float("nan"), float("nan")
    med = float(np.median(vals))
    mad = float(mad_std(vals))
    return med, 1.2533 * mad / np.sqrt(vals.size)


def _mask_bits(mask: np.ndarray | None, x, y, r: float) -> np.ndarray:
    """OR of the mask bits of the pixels whose centre lies within ``r`` of each source.

    ``mask=None`` stands for a mask without any bit set.
    """
    if mask is None:
        return np.zeros(len(x), dtype=np.uint16)
    half = int(np.ceil(r)) + 1
    xi = np.rint(x).astype(np.intp)
    yi = np.rint(y).astype(np.intp)
    vals, ox, oy = _stamps(mask, xi, yi, half, np.uint16(0))
    dx = ox + (xi - x)[:, None, None]
    dy = oy + (yi - y)[:, None, None]
    inside = dx * dx + dy * dy <= (r + 0.5) ** 2
    vals = np.where(inside, vals, 0).astype(np.uint16)
    return np.bitwise_or.reduce(vals.reshape(len(x), -1), axis=1)


#: a source is MASKED (or COSMIC) when filled (cleaned) pixels carry more than this share
#: of its light, and left out of the stellar selection when bad ones do (see
#: :func:`_masked_light`)
_MASKED_LIGHT = 0.01
#: mask bits of the pixels photometry fills from their neighbours
_FILLED = int(Mask.BAD | Mask.NODATA | Mask.LOWFLAT)


def _masked_light(mask: np.ndarray | None, x, y, r: float, fwhm: float, bits: int,
                  near: np.ndarray | None = None) -> np.ndarray:
    """The share of each source's light (a Moffat of ``fwhm``, beta 3, within ``r``) that
    falls on pixels with any of ``bits``.

    A filled pixel biases a star's flux by a part of the light it held: a hot pixel on an
    undersampled star's peak holds a fifth of it, the same pixel within a 10 px star's
    FWHM under 1 %. Any bit within a fixed radius (the rule before) flagged half the stars
    of oversampled frames (LMI unbinned, FWHM 10 px, 0.2 % bad pixels) and left their
    zero points a few calibrators. ``near``: :func:`_mask_bits` of the same mask and
    radius, when the caller has it.
    """
    out = np.zeros(len(x))
    if mask is None or not len(x):
        return out
    hit = np.flatnonzero((_mask_bits(mask, x, y, r) if near is None else near) & bits)
    if not hit.size:
        return out
    alpha2 = float(moffat_alpha(max(fwhm, 1.0), 3.0)) ** 2
    half = int(np.ceil(r)) + 1
    for lo in range(0, hit.size, 2000):  # bounded memory on crowded frames
        k = hit[lo:lo + 2000]
        xi = np.rint(x[k]).astype(np.intp)
        yi = np.rint(y[k]).astype(np.intp)
        vals, ox, oy = _stamps(mask, xi, yi, half, np.uint16(0))
        dx = ox + (xi - x[k])[:, None, None]
        dy = oy + (yi - y[k])[:, None, None]
        r2 = dx * dx + dy * dy
        w = np.where(r2 <= (r + 0.5) ** 2, (1.0 + r2 / alpha2) ** -3.0, 0.0)
        on = (vals & np.uint16(bits)) != 0
        out[k] = (w * on).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    return out


def _robust_median(values: np.ndarray, nsigma: float = 3.0) -> tuple[float, np.ndarray]:
    """Median after two passes of MAD clipping, and the kept mask."""
    keep = np.isfinite(values)
    for _ in range(2):
        if keep.sum() < 3:
            break
        med = np.median(values[keep])
        mad = mad_std(values[keep])
        width = max(nsigma * mad, 0.05 * abs(med))
        keep = keep & (np.abs(values - med) <= width)
    if not keep.any():
        return float("nan"), keep
    return float(np.median(values[keep])), keep


def _extract(data, var, mask, settings: Sources, *, thresh: float | None = None,
             minarea: int | None = None, kernel: np.ndarray | None = None):
    import sep

    kwargs = dict(var=var, mask=mask, minarea=settings.min_area_px if minarea is None
                  else minarea, filter_type="conv", deblend_cont=0.005, clean=True)
    if kernel is not None:
        kwargs["filter_kernel"] = kernel
    thresh = settings.detect_sigma if thresh is None else thresh
    try:
        return sep.extract(data, thresh, **kwargs)
    except Exception as exc:  # sep raises a plain Exception on buffer overflow
        if "overflow" not in str(exc) and "buffer" not in str(exc):
            raise
    # crowded or very large objects: a larger pixel stack for this call only
    # (a process-wide sep setting; sep holds the GIL, so no other call runs meanwhile)
    old = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(old * 10, data.size // 4))
    try:
        return sep.extract(data, thresh, **kwargs)
    finally:
        sep.set_extract_pixstack(old)


#: half-size (pixels) of the PSF-matched detection kernel: 0.75 FWHM (98 % of the full
#: matched filter's S/N on a beta-3 Moffat), at least 2 and at most this (its cost grows
#: with its area: 0.36 s of CPU at 4k for a 9x9 kernel, 0.44 s for 11x11)
_PSF_KERNEL_MAX_HALF = 8


def psf_kernel(fwhm_px: float) -> np.ndarray:
    """A circular Gaussian of the frame's FWHM, ±0.75 FWHM wide, normalised to sum 1: the
    matched filter of a point source (a Moffat's wings add little signal per pixel)."""
    half = int(np.clip(np.ceil(0.75 * fwhm_px), 2, _PSF_KERNEL_MAX_HALF))
    s2 = (fwhm_px / GAUSS_FWHM) ** 2
    o = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (o[:, None] ** 2 + o[None, :] ** 2) / s2)
    return (k / k.sum()).astype(np.float32)


def psf_threshold(kernel: np.ndarray, fwhm_px: float, r_ap_px: float, snr: float) -> float:
    """The threshold (units of the pixel noise, sep's ``'conv'`` filter) of the filtered
    image at which a Gaussian point source of FWHM ``fwhm_px`` peaks when the CAT aperture
    of radius ``r_ap_px`` measures it at ``snr`` (background noise only, LIMMAG's
    definition at the limit): ``snr sqrt(pi) r sum(K P) / EE(r)`` with ``K`` the kernel
    (sum 1) and ``P`` the pixel-integrated profile (total 1). The model when the frame
    has too few bright stars for :func:`_matched_gain`."""
    half = kernel.shape[0] // 2
    s = fwhm_px / GAUSS_FWHM
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    o = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * ((o[:, None] + sub[None, :]) / s) ** 2).mean(axis=1) / (
        np.sqrt(2 * np.pi) * s)
    peak = float((kernel * np.outer(g, g)).sum())
    ee = 1.0 - np.exp(-0.5 * (r_ap_px / s) ** 2)
    return float(snr * np.sqrt(np.pi) * r_ap_px * peak / ee)


#: bright stars measured for the filter's gain
_GAIN_STARS = 30


def _matched_gain(data, mask, kernel, bright, r_ap: float) -> tuple[float, int]:
    """Peak of the filtered image over the flux in the CAT aperture, measured on the
    frame's brightest clean first-pass objects (median; the PSF's own shape, whatever
    it is: a Moffat peaks lower than a Gaussian of its FWHM). NaN with fewer than 3."""
    import sep

    half = kernel.shape[0] // 2
    ok = (bright["flag"] == 0) & (bright["npix"] >= 5)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-bright["flux"][idx])][: 3 * _GAIN_STARS]
    if idx.size < 3:
        return float("nan"), 0
    x, y = bright["x"][idx].astype(np.float64), bright["y"][idx].astype(np.float64)
    ny, nx = data.shape
    inside = (x > r_ap + half + 2) & (x < nx - r_ap - half - 3) & \
        (y > r_ap + half + 2) & (y < ny - r_ap - half - 3)
    x, y = x[inside], y[inside]
    if mask is not None and mask.any() and x.size:
        hit = _mask_bits(mask.view(np.uint8), x, y, r_ap) != 0
        x, y = x[~hit], y[~hit]
    # unsaturated: the brightest of them may be flat-topped (no mask bit when the
    # caller kept saturated pixels): the top third is dropped
    x, y = x[x.size // 3:][:_GAIN_STARS], y[y.size // 3:][:_GAIN_STARS]
    if x.size < 3:
        return float("nan"), 0
    flux, _, _ = sep.sum_circle(data, x, y, r_ap, subpix=5)
    xi, yi = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    stamps, _, _ = _stamps(data, xi, yi, half + 2, np.float32(0))
    w = kernel.shape[0]
    peaks = np.full(x.size, -np.inf)
    for dy in range(5):  # the filtered values at the 5x5 pixels about each centre
        for dx in range(5):
            v = (stamps[:, dy:dy + w, dx:dx + w] * kernel).sum(axis=(1, 2))
            peaks = np.maximum(peaks, v)
    good = flux > 0
    if good.sum() < 3:
        return float("nan"), 0
    return float(np.median(peaks[good] / flux[good])), int(good.sum())


def _filtered_noise(data, var, mask, kernel, box: int = 512) -> float:
    """Measured over predicted noise of the filtered image: the robust (MAD) scatter of
    ``K * data`` over ``sigma sqrt(sum K^2)`` in a central box (faint stars below the
    threshold and what the sky subtraction left add to ERR, as for LIMMAG's empty
    apertures); clipped to 0.8-3, 1.0 when it cannot be measured. The kernel is
    separable (:func:`psf_kernel`): two 1-d passes, ~20 ms for the 512^2 box."""
    from scipy.ndimage import correlate1d

    ny, nx = data.shape
    y0, x0 = max((ny - box) // 2, 0), max((nx - box) // 2, 0)
    d = data[y0:y0 + box, x0:x0 + box]
    g = kernel.sum(axis=0).astype(np.float32)  # K = outer(g, g), g sums to 1
    f = correlate1d(correlate1d(d, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    pred = np.sqrt(var[y0:y0 + box, x0:x0 + box]) * np.float32(np.sqrt((kernel ** 2).sum()))
    h = kernel.shape[0]
    ok = pred > 0
    ok[:h], ok[-h:], ok[:, :h], ok[:, -h:] = False, False, False, False
    if mask is not None:
        m = mask[y0:y0 + box, x0:x0 + box]
        if m.any():
            from scipy.ndimage import maximum_filter

            ok &= ~maximum_filter(m, size=h)
    if ok.sum() < 1000:
        return 1.0
    z = f[ok] / pred[ok]
    # 1.4826 median|z - median z|, numpy's numbers with one in-place partition each
    dev = np.abs(z - median(z, overwrite=True))
    width = 1.4826 * median(dev, overwrite=True)
    return float(np.clip(width, 0.8, 3.0)) if np.isfinite(width) else 1.0


def _detect_faint(data, var, mask, bright, fwhm_px: float, settings: Sources):
    """Faint point sources the first pass missed: a PSF-matched detection pass.

    The first pass (``detect_sigma`` per pixel over ``min_area_px`` pixels, sep's 3x3
    kernel) keeps the catalogue's bright, clean list as it was (astrometry, FWHM, APCOR
    and zero point take their stars from it); it needs an aperture S/N of ~11 to detect a
    point source. This pass filters with a Gaussian of the frame's FWHM
    (:func:`psf_kernel`) and thresholds where a point source peaks whose CAT-aperture S/N
    is ``psf_detect_snr``, against the measured noise: the filter's gain (peak over
    aperture flux) measured on the frame's bright stars (:func:`_matched_gain`; the
    Gaussian model :func:`psf_threshold` without them) times the filtered image's
    measured noise excess (:func:`_filtered_noise`, the counterpart of LIMMAG's empty
    apertures). One pixel above the threshold is enough (the filter already integrates
    the source). It reaches the depth LIMMAG states (benchmarks/README.md, "Depth").
    Its objects within a first-pass object (its isophotal radius, at least one FWHM) are
    dropped: those are the first pass's objects again, or their wings.
    """
    from scipy.spatial import cKDTree

    if not (np.isfinite(fwhm_px) and fwhm_px > 0):
        return bright[:0]
    kernel = psf_kernel(fwhm_px)
    r_ap = settings.aperture_fwhm * fwhm_px
    gain, n_gain = _matched_gain(data, mask, kernel, bright, r_ap)
    if np.isfinite(gain) and gain > 0:
        thresh = settings.psf_detect_snr * gain * np.sqrt(np.pi) * r_ap
    else:
        thresh = psf_threshold(kernel, fwhm_px, r_ap, settings.psf_detect_snr)
    excess = _filtered_noise(data, var, mask, kernel)
    thresh *= excess
    found = _extract(data, var, mask, settings, thresh=thresh, minarea=1, kernel=kernel)
    if not len(found) or not len(bright):
        return found
    radius = np.maximum(np.sqrt(bright["npix"] / np.pi), fwhm_px)
    tree = cKDTree(np.column_stack([bright["x"], bright["y"]]))
    k = min(8, len(bright))
    d, j = tree.query(np.column_stack([found["x"], found["y"]]), k=k,
                      distance_upper_bound=float(radius.max()))
    d, j = d.reshape(len(found), k), j.reshape(len(found), k)
    inside = np.isfinite(d) & (d < radius[np.minimum(j, len(bright) - 1)])
    extra = found[~inside.any(axis=1)]
    log.debug("psf-matched pass: threshold %.2f sigma per pixel (gain from %d stars, noise "
              "excess %.2f): %d objects, %d new", thresh, n_gain, excess, len(found),
              len(extra))
    return extra


def _fill_from_neighbours(data: np.ndarray, where: np.ndarray, half: int = 2) -> np.ndarray:
    """A copy of ``data`` with the pixels ``where`` replaced by the median of their unmasked
    neighbours in a (2*half+1)^2 box (0 where a box has none)."""
    if not where.any():
        return data
    out = data.copy()
    ny, nx = data.shape
    # pixels with no usable neighbour in their box become 0 without a median: the
    # no-data margins of a coadd are millions of them (only the box dilation is paid)
    usable = ~where
    near = usable.copy()
    for axis, n in ((0, ny), (1, nx)):
        src = near.copy()
        for off in range(1, min(half, n - 1) + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - off), slice(off, n)
            near[tuple(lo)] |= src[tuple(hi)]
            near[tuple(hi)] |= src[tuple(lo)]
    out[where & ~near] = 0
    ys, xs = np.nonzero(where & near)
    if ys.size == 0:
        return out
    off = np.arange(-half, half + 1)
    yy = np.clip(ys[:, None, None] + off[None, :, None], 0, ny - 1)
    xx = np.clip(xs[:, None, None] + off[None, None, :], 0, nx - 1)
    vals = np.where(where[yy, xx], np.nan, data[yy, xx]).reshape(ys.size, -1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = nanmedian_rows(vals)
    out[ys, xs] = np.where(np.isfinite(med), med, 0).astype(data.dtype)
    return out


#: the measured growth at the large aperture is trusted when known this well (fraction)
_DIRECT_APCOR_SEM = 0.003


def _annulus(r_big: float, fwhm: float) -> tuple[float, float]:
    """Inner and outer radius of the local sky annulus of the aperture correction."""
    inner = 1.2 * r_big
    return inner, inner + max(5.0, 2.0 * fwhm)


#: astropy's mad_std factor, 1 / Phi^-1(3/4)
_MAD_TO_STD = 1.482602218505602


def _aperture_correction(data, mask, var, x, y, r_ap, r_big, fwhm):
    """Aperture correction (total flux / flux in ``r_ap``) from the frame's bright stars.

    For each star: its sky is the 3-sigma-clipped median of its own annulus, its flux
    in ``r_ap`` an exact aperture sum, and the light beyond ``r_ap`` is measured ring by
    ring out to ``r_big`` as the ring's *median* surface brightness times its area. A
    median ignores the few pixels a faint neighbour occupies in a ring, and the
    annulus median ignores neighbours in the sky; sums would add their light to the
    correction and bias every flux of the frame (a dense field does that by a few
    per cent). The growth curves are combined by their median over stars at each
    radius and fitted with a circular Moffat's enclosed flux, which also extrapolates
    the little light beyond ``r_big``.

    Returns (correction, its standard error, stars used).
    """
    import sep

    r_in, r_out = _annulus(r_big, fwhm)
    half = int(np.ceil(r_out)) + 1
    xi, yi = np.round(x).astype(int), np.round(y).astype(int)
    vals, dx, dy = _stamps(data, xi, yi, half, np.nan)
    bad, _, _ = _stamps(mask.view(np.uint8) if mask.dtype == bool else mask, xi, yi, half, 1)
    d = np.hypot(dx + xi[:, None, None] - x[:, None, None], dy + yi[:, None, None] -
                 y[:, None, None])
    usable = (bad == 0) & np.isfinite(vals)
    ring = (d >= r_in) & (d < r_out) & usable
    edges = r_ap * np.array([1.0, 1.25, 1.5, 2.0, 2.5])
    edges = np.unique(np.concatenate([edges[edges < r_big], [r_big]]))
    radii = np.concatenate([[r_ap * 0.75], edges])
    n = len(x)
    growth = np.full((len(radii), n), np.nan)
    f_in, _, fl_in = sep.sum_circle(data, x, y, r_ap * 0.75, var=var, mask=mask, subpix=5)
    f_ap, e_ap, fl_ap = sep.sum_circle(data, x, y, r_ap, var=var, mask=mask, subpix=5)
    # every star at once: values outside a ring are NaN, medians along the pixel axis
    flat_vals = vals.reshape(n, -1)
    flat_d = d.reshape(n, -1)
    flat_use = usable.reshape(n, -1)
    sky_vals = np.where(ring.reshape(n, -1), flat_vals, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no sky, skipped
        for _ in range(3):  # 3-sigma clipping about the median, per star
            med = nanmedian_rows(sky_vals)
            # mad_std(sky_vals, axis=1, ignore_nan=True), the same numbers: astropy's is
            # np.nanmedian of |x - np.nanmedian(x)| times this factor (without bottleneck)
            sig = nanmedian_rows(np.abs(sky_vals - med[:, None])) * _MAD_TO_STD
            sky_vals = np.where(np.abs(sky_vals - med[:, None]) <=
                                3 * np.maximum(sig, 1e-6)[:, None], sky_vals, np.nan)
        enough = np.count_nonzero(np.isfinite(sky_vals), axis=1) >= 20
        sky = np.where(enough, nanmedian_rows(sky_vals), np.nan)
        small = f_ap - sky * np.pi * r_ap**2
        ok = np.isfinite(sky) & (small > 0)
        growth[0] = np.where(ok, (f_in - sky * np.pi * (0.75 * r_ap) ** 2) / small, np.nan)
        growth[1] = np.where(ok, 1.0, np.nan)
        total = small.copy()
        for k in range(1, len(edges)):
            sel = flat_use & (flat_d >= edges[k - 1]) & (flat_d < edges[k])
            ring_med = nanmedian_rows(np.where(sel, flat_vals, np.nan))
            ok &= np.count_nonzero(sel, axis=1) >= 8
            total = total + (ring_med - sky) * np.pi * (edges[k] ** 2 - edges[k - 1] ** 2)
            growth[k + 1] = np.where(ok, total / small, np.nan)
    flags = fl_in | fl_ap
    good = np.all(np.isfinite(growth), axis=0) & \
        ((flags & (sep.APER_HASMASKED | sep.APER_TRUNC)) == 0)
    if good.sum() == 0:
        return 1.0, 0.0, 0
    g = growth[:, good]
    med = np.median(g, axis=1)
    mad = mad_std(g, axis=1)
    nk = g.shape[1]
    sem = np.maximum(1.2533 * mad / np.sqrt(nk), 5e-4)
    sem[1] = 1e-4
    # Where the growth out to r_big is measured precisely (deep frames, coadds: a mix of
    # seeings is no Moffat), it is used, and the fitted model only for the light beyond
    # r_big; otherwise the model fitted to every radius (the inner ones are the precise
    # ones) is steadier than the noisy ratio at r_big alone.
    if sem[-1] <= _DIRECT_APCOR_SEM:
        tail = _moffat_growth_fit(radii, med, sem, r_ap, at=radii[-1]) or 1.0
        return float(med[-1] * tail), float(sem[-1] * tail), nk
    corr = _moffat_growth_fit(radii, med, sem, r_ap, at=r_ap)
    if corr is None:
        return float(med[-1]), float(sem[-1]), nk
    return corr, float(sem[-1]), nk


def _moffat_growth_fit(radii, growth, err, r_ap, at):
    """total/F(at) for a circular Moffat fitted to the growth curve, or None.

    E(r) = 1 − (1 + (r/α)²)^(1−β); the model of F(r)/F(r_ap) is E(r)/E(r_ap), fitted
    with its errors; the result is 1/E(at).
    """
    from scipy.optimize import least_squares

    def enclosed(r, alpha, beta):
        # a trial alpha near 0 overflows (r/alpha)**2: the limit, E = 1, is what it gives
        with np.errstate(over="ignore"):
            return moffat_encircled(r, alpha, beta)

    def resid(p):
        alpha, beta = np.exp(p[0]), 1.0 + np.exp(p[1])
        return (enclosed(radii, alpha, beta) / enclosed(r_ap, alpha, beta) - growth) / err

    fwhm_guess = r_ap / 2.0
    p0 = [np.log(fwhm_guess), np.log(2.0)]
    try:
        fit = least_squares(resid, p0, method="lm")
    except Exception:
        return None
    if not fit.success:
        return None
    alpha, beta = np.exp(fit.x[0]), 1.0 + np.exp(fit.x[1])
    if not (1.2 < beta < 20 and np.isfinite(alpha)):
        return None
    return float(1.0 / enclosed(at, alpha, beta))


def extract_sources(frame: Frame, *, settings: Sources, pixel_scale_arcsec: float) -> SourceList:
    """Detect and measure the sources of a sky-subtracted frame.

    Parameters
    ----------
    frame : Frame
        Sky-subtracted frame: SCI (electrons), VAR (electrons squared), MASK.
    settings : Sources
        ``detect_sigma`` (threshold in units of ERR), ``min_area_px``,
        ``aperture_fwhm`` (aperture radius in units of the median FWHM),
        ``apcor_radius_fwhm`` (radius of the large aperture of the aperture
        correction, in FWHM), ``max_sources`` (the brightest are kept),
        ``psf_detect_snr`` (the PSF-matched pass's threshold: S/N in the CAT
        aperture; 0 = off).
    pixel_scale_arcsec : float
        Pixel scale (arcsec per pixel), for ``fwhm_arcsec``.

    Returns
    -------
    SourceList
        The source table (columns :data:`COLUMNS`, flags :class:`SourceFlag`)
        and the frame's median FWHM, ellipticity and aperture correction.

    Notes
    -----
    ``fwhm`` per source is ``2 sqrt(A / pi)``, ``A`` the number of pixels above
    half the peak pixel: exact for any round profile, slightly high (a few
    per cent) for undersampled stars whose peak falls between pixels. The
    frame's FWHM (``fwhm_px``, FWHM, FWHMPIX, the aperture scale) is the median
    of pixel-integrated Moffat fits of its brightest stellar sources
    (:func:`_fitted_fwhm`), the half-maximum median when fewer than 3 fit.
    ``ellipticity`` is ``1 - b/a`` of sep's isophotal second moments.
    Sources with a FWHM below 1.5 px or half the median (one bright pixel: hot
    pixels, cosmic-ray residuals) are flagged ``SHARP``. Stellar sources
    (column ``stellar``) are unflagged, have a signal-to-noise ratio of at
    least 20 and a FWHM within 3 MAD of the median; the frame
    medians and the aperture size come from them. Masked pixels inside an
    aperture are replaced by the mean of the aperture's other pixels (sep's
    behaviour) and the source is flagged.
    """
    from astropy.table import Table

    data = np.ascontiguousarray(frame.sci, dtype=np.float32)
    var = np.asarray(frame.var, dtype=np.float32)
    mask16 = np.ascontiguousarray(frame.mask, dtype=np.uint16)
    # fast path: one pass each to see whether any pixel needs special care
    clean_input = bool(np.isfinite(data.sum(dtype=np.float64))) and bool(var.min() > 0) and bool(
        np.isfinite(var.max())
    )
    bad = None
    if not clean_input:
        bad = ~np.isfinite(data) | ~(var > 0) | ~np.isfinite(var)
        if not bad.any():
            bad = None
    has_mask = bool(mask16.any())
    if has_mask:
        detect_mask = (mask16 & _DETECT_MASKED) != 0
        phot_mask = (mask16 & _PHOT_MASKED) != 0
    else:
        detect_mask = np.zeros(data.shape, dtype=bool)
        phot_mask = detect_mask
    if bad is not None:
        good_var = var[~bad]
        fill = np.float32(np.median(good_var)) if good_var.size else np.float32(1)
        data = np.where(bad, np.float32(0), data)
        var = np.where(bad, fill, var)
        detect_mask = detect_mask | bad
        phot_mask = phot_mask | bad
    var = np.ascontiguousarray(var, dtype=np.float32)
    sky_err = float(np.sqrt(np.median(var[::8, ::8])))
    # photometry: bad, no-data and low-flat pixels are filled with the median of their
    # usable neighbours, so an aperture's wing touching a hot pixel stays unbiased (an
    # area correction would add the aperture's mean brightness); saturated pixels stay
    # masked (a saturated star is flagged anyway)
    filled = (mask16 & _FILLED) != 0 if has_mask else None
    if bad is not None:
        filled = bad if filled is None else (filled | bad)
    phot_data = _fill_from_neighbours(data, filled) if filled is not None else data
    sat_mask = (mask16 & int(Mask.SATURATED)) != 0 if has_mask else None

    objects = _extract(data, var, detect_mask, settings)
    n = len(objects)
    log.debug("sep found %d objects", n)
    if n > settings.max_sources:
        order = np.argsort(-objects["flux"])[: settings.max_sources]
        objects = objects[np.sort(order)]
        n = len(objects)
    if n == 0:
        table = empty_table()
        return SourceList(table=table)

    ny, nx = data.shape
    x0 = objects["x"].astype(np.float64)
    y0 = objects["y"].astype(np.float64)
    a = objects["a"].astype(np.float64)
    b = objects["b"].astype(np.float64)
    sepflags = objects["flag"].astype(np.int16)

    # a first FWHM from the brightest few hundred objects that are not single pixels
    bright = np.argsort(-objects["flux"])[:400]
    sig_iso = float(np.median(np.sqrt(a[bright] * b[bright])))
    half = int(np.clip(np.ceil(2.0 * GAUSS_FWHM * sig_iso) + 2, 4, 25))
    fwhm0, _ = _half_max_fwhm(data, x0[bright], y0[bright], half)
    starlike = fwhm0 >= MIN_STAR_FWHM_PX
    med0 = float(np.median(fwhm0[starlike])) if starlike.any() else GAUSS_FWHM * max(sig_iso, 1)
    size_ref = float(np.median(np.sqrt(a[bright][starlike] * b[bright][starlike]))) \
        if starlike.any() else sig_iso

    # faint point sources: a second, PSF-matched pass (see _detect_faint)
    first_pass = np.ones(n, bool)
    if settings.psf_detect_snr > 0:
        extra = _detect_faint(data, var, detect_mask, objects, med0, settings)
        if len(extra):
            objects = np.concatenate([objects, extra.astype(objects.dtype)])
            first_pass = np.r_[first_pass, np.zeros(len(extra), bool)]
            if len(objects) > settings.max_sources:
                order = np.sort(np.argsort(-objects["flux"])[: settings.max_sources])
                objects, first_pass = objects[order], first_pass[order]
            n = len(objects)
            x0 = objects["x"].astype(np.float64)
            y0 = objects["y"].astype(np.float64)
            a = objects["a"].astype(np.float64)
            b = objects["b"].astype(np.float64)
            sepflags = objects["flag"].astype(np.int16)

    # windowed centroids (SExtractor XWIN/YWIN): the stellar window, wider for extended objects
    import sep

    grow = np.clip(np.sqrt(a * b) / max(size_ref, 1e-3), 1.0, 2.0)
    sig = grow * med0 / GAUSS_FWHM
    xw, yw, wflag = sep.winpos(data, x0, y0, sig, mask=detect_mask, subpix=0)
    moved = np.hypot(xw - x0, yw - y0)
    # masked or edge-truncated windows still give a centroid (those bits are not failures)
    wbad = (wflag & ~(sep.APER_HASMASKED | sep.APER_TRUNC)) != 0
    failed = wbad | ~np.isfinite(xw) | ~np.isfinite(yw) | (moved > max(2.0, med0))
    x = np.where(failed, x0, xw)
    y = np.where(failed, y0, yw)

    fwhm, peak_stamp = _half_max_fwhm(data, x, y, half)
    ellipticity = np.where(a > 0, 1.0 - b / np.where(a > 0, a, 1), np.nan)
    snr0 = objects["flux"] / (sky_err * np.sqrt(np.maximum(objects["npix"], 1)))

    # stellar selection: unflagged, bright enough, FWHM near the mode
    any_bits = mask16 if has_mask else None
    if bad is not None:  # unusable values count as no data for the flags
        any_bits = (mask16 | (bad * np.uint16(Mask.NODATA))).astype(np.uint16)
    r_sel = max(2.0 * med0, 2.0)
    clean = ((_mask_bits(any_bits, x, y, r_sel) & int(Mask.SATURATED)) == 0) & (
        _masked_light(any_bits, x, y, r_sel, med0, _FILLED) <= _MASKED_LIGHT) & (
        (sepflags & (sep.OBJ_MERGED | sep.OBJ_TRUNC)) == 0
    ) & ~failed
    # a single bright pixel has a half-maximum area of about 1 px (FWHM 1.13 px)
    sharp = ~(fwhm >= MIN_STAR_FWHM_PX)
    candidates = clean & ~sharp & (snr0 >= 20) & (ellipticity < 0.5)
    if candidates.sum() < 3:
        candidates = clean & ~sharp & (snr0 >= 5)
    fwhm_med, keep = _robust_median(np.where(candidates, fwhm, np.nan))
    if np.isfinite(fwhm_med):
        sharp |= fwhm < 0.5 * fwhm_med
    stellar = candidates & keep
    # the frame's FWHM from pixel-integrated profile fits of its brightest stars (the
    # half-maximum areas of undersampled stars read 4-8 % high); apertures scale with it
    if np.isfinite(fwhm_med):
        fit_idx = np.flatnonzero(stellar & (snr0 >= 30))
        fit_idx = fit_idx[np.argsort(-objects["flux"][fit_idx])[:_FIT_STARS]]
        fwhm_fit, n_fit, shapes = _fitted_fwhm(data, var, x[fit_idx], y[fit_idx], fwhm_med)
        if n_fit >= 3 or (n_fit and n_fit == fit_idx.size):
            fwhm_med = fwhm_fit
    else:
        shapes = []
    # without stars the frame has no FWHM (NaN), but apertures still need a size
    fwhm_use = fwhm_med if np.isfinite(fwhm_med) else float(med0)
    ell_med = float(np.median(ellipticity[stellar])) if stellar.any() else float("nan")

    # aperture photometry
    r_ap = settings.aperture_fwhm * fwhm_use
    flux_ap, ferr_ap, aflag = sep.sum_circle(phot_data, x, y, r_ap, var=var, mask=sat_mask,
                                             subpix=5)
    bits = _mask_bits(any_bits, x, y, r_ap)
    # filled (bad) or cleaned (cosmic-ray) pixels matter by the light they held: a star's
    # core, not its wings, and one pixel of a well-sampled star not at all
    flags = np.zeros(n, dtype=np.int16)
    flags |= np.where(bits & int(Mask.SATURATED), int(SourceFlag.SATURATED), 0).astype(np.int16)
    masked = _masked_light(any_bits, x, y, r_ap, fwhm_use, _FILLED, near=bits) > _MASKED_LIGHT
    flags |= np.where(masked, int(SourceFlag.MASKED), 0).astype(np.int16)
    cleaned = _masked_light(any_bits, x, y, r_ap, fwhm_use, int(Mask.COSMIC),
                            near=bits) > _MASKED_LIGHT
    flags |= np.where(cleaned, int(SourceFlag.COSMIC), 0).astype(np.int16)
    edge = (x - r_ap < -0.5) | (y - r_ap < -0.5) | (x + r_ap > nx - 0.5) | (y + r_ap > ny - 0.5)
    edge |= (sepflags & sep.OBJ_TRUNC) != 0
    flags |= np.where(edge, int(SourceFlag.EDGE), 0).astype(np.int16)
    flags |= np.where(sepflags & sep.OBJ_MERGED, int(SourceFlag.BLENDED), 0).astype(np.int16)
    flags |= np.where(failed, int(SourceFlag.CENTROID), 0).astype(np.int16)
    flags |= np.where(sharp, int(SourceFlag.SHARP), 0).astype(np.int16)
    flags |= np.where(first_pass, 0, int(SourceFlag.FAINT)).astype(np.int16)
    badflux = ~(flux_ap > 0) | ~np.isfinite(flux_ap)
    flags |= np.where(badflux, int(SourceFlag.BADFLUX), 0).astype(np.int16)
    sepflags = sepflags | aflag.astype(np.int16)
    stellar &= flags == 0

    # aperture correction from bright, isolated, unflagged stellar sources
    r_big = settings.apcor_radius_fwhm * fwhm_use
    r_big = max(r_big, r_ap)
    apcor, apcor_err, n_apcor = 1.0, 0.0, 0
    snr_ap = np.where(ferr_ap > 0, flux_ap / np.where(ferr_ap > 0, ferr_ap, 1), 0)
    use = stellar & (snr_ap >= 20)
    if use.any() and r_big > r_ap:
        from scipy.spatial import cKDTree

        # isolated: no other first-pass detection within the large aperture (the annulus
        # sky and the rings are medians, robust to a faint neighbour)
        tree = cKDTree(np.column_stack([x[first_pass], y[first_pass]]))
        counts = tree.query_ball_point(np.column_stack([x[use], y[use]]), r_big + r_ap,
                                       return_length=True)
        idx = np.flatnonzero(use)[counts == 1]
        # the brightest 150 are plenty for a median growth curve (and bound the cost)
        idx = idx[np.argsort(-flux_ap[idx])[:150]]
        if idx.size:
            apcor, apcor_err, n_apcor = _aperture_correction(
                phot_data, phot_mask, var, x[idx], y[idx], r_ap, r_big, fwhm_use)
    # a growth curve of a few stars on a real frame jumps by +-10 % (RATIR: 0.76-1.10 with
    # stable seeing): it is used only when known to 0.5 % from 5+ stars; else the Moffat
    # model of the fitted stars' profiles; never below 1 (light beyond r_ap is positive)
    apcor_src, apcor_sem = "growth", apcor_err
    if not (n_apcor >= _APCOR_MIN_STARS and apcor_err <= _APCOR_MAX_ERR and apcor >= 1.0):
        model, model_sem = _model_apcor(shapes, r_ap)
        if np.isfinite(model):
            apcor, apcor_err, n_apcor, apcor_src = (model, max(model_sem, _APCOR_MODEL_SYS),
                                                    len(shapes), "psf")
            apcor_sem = model_sem
        else:
            apcor, apcor_err, n_apcor, apcor_src = 1.0, 0.0, 0, "none"
            apcor_sem = float("nan")
    apcor = max(float(apcor), 1.0)

    flux = flux_ap * apcor
    # the aperture-correction error is common to all sources (a systematic): kept in the
    # metadata (APCORERR), not added to each source's statistical error
    fluxerr = ferr_ap * apcor
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1)), np.nan)
        magerr = np.where(flux > 0, 2.5 / np.log(10) * fluxerr / flux, np.nan)
        snr = np.where(fluxerr > 0, flux / fluxerr, 0)

    table = Table()
    values = {
        "id": np.arange(1, n + 1),
        "x": x,
        "y": y,
        "ra": np.full(n, np.nan),
        "dec": np.full(n, np.nan),
        "flux": flux,
        "fluxerr": fluxerr,
        "flux_aper": flux_ap,
        "fluxerr_aper": ferr_ap,
        "mag": mag,
        "magerr": magerr,
        "snr": snr,
        "fwhm": fwhm,
        "ellipticity": ellipticity,
        "theta": np.degrees(objects["theta"]),
        "peak": np.maximum(objects["peak"], peak_stamp),
        "npix": objects["npix"],
        "flags": flags,
        "sepflags": sepflags,
        "stellar": stellar,
    }
    for name, (dtype, unit) in COLUMNS.items():
        table[name] = np.asarray(values[name]).astype(dtype)
        if unit:
            table[name].unit = unit
    fwhm_arcsec = float(fwhm_med * pixel_scale_arcsec) if np.isfinite(fwhm_med) else float("nan")
    meta = {"NSOURCES": n, "NSTELLAR": int(stellar.sum()), "APRAD": float(r_ap),
            "APCOR": float(apcor), "APCORERR": float(apcor_err), "APCORN": n_apcor,
            "APCORSRC": apcor_src}
    if np.isfinite(fwhm_med):
        meta["FWHMPIX"] = float(fwhm_med)
        meta["FWHM"] = fwhm_arcsec
    if np.isfinite(ell_med):
        meta["ELLIP"] = ell_med
    table.meta.update(meta)
    log.debug("sources: %d, stellar %d, fwhm %.2f px, apcor %.3f (%d stars)", n,
              int(stellar.sum()), fwhm_med, apcor, n_apcor)
    return SourceList(
        table=table,
        fwhm_px=float(fwhm_med),
        fwhm_arcsec=fwhm_arcsec,
        ellipticity=ell_med,
        aperture_radius_px=float(r_ap),
        aperture_correction=float(apcor),
        aperture_correction_err=float(apcor_err),
        aperture_correction_sem=float(apcor_sem),
        n_apcor=n_apcor,
        n_stellar=int(stellar.sum()),
        meta=meta,
    )

