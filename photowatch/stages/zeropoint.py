"""zeropoint: the frame's photometric zero point and flux scale (PhotoPipe's zpoint, ``t`` step).

With a reference catalogue: the frame's unsaturated, unflagged stars are
matched to the catalogue band of the filter; a robust weighted fit of
``catalogue mag − instrumental mag`` (errors of both, a floor, iterative
clipping at ``clip_sigma`` × 1.48 MAD; optionally a colour term and a
low-order spatial term) gives ``MAGZP``, so that

    mag = MAGZP − 2.5 log10(counts in the SCI image)

where counts are a star's total (aperture-corrected) electrons. In a crowded
field an aperture sum carries the neighbours' light: calibrators whose detected
or catalogued neighbours put more than ``max_contamination`` of their own light
into their aperture are left out, and when ``min_bright`` of them reach S/N
``bright_snr`` only those are fitted (a faint star's aperture holds the light of
the field's undetected stars too). On simulated nights of 65,000-200,000 stars
per square degree the mean MAGZP - truth went from +0.002-+0.015 to -0.002-+0.003
mag (the truth taken to photowatch's flat normalisation; ``benchmarks/sweep_nights.py``,
benchmarks/README.md). Without a
catalogue no zero point is invented: the frame gets a relative flux scale
from the stars it shares with the night's reference frame of its field and
filter.

``FLXSCALE`` multiplies the frame's data to put it on the photometric
reference of its target and filter (the zero point ``ZP_ref`` the coadd is
put on): ``FLXSCALE = 10^(−0.4 (MAGZP − ZP_ref))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.stats import mad_std

from photowatch.core.config import ZeroPoint
from photowatch.stages.matching import project
from photowatch.stages.sources import moffat_alpha

#: neighbour band used for a colour term: band → (blue, red) of the colour
COLOURS = {"u": ("u", "g"), "g": ("g", "r"), "r": ("g", "r"), "i": ("r", "i"), "z": ("i", "z"),
           "y": ("z", "y"), "B": ("B", "V"), "V": ("B", "V"), "R": ("V", "R"), "I": ("R", "I"),
           "J": ("J", "H"), "H": ("J", "H"), "K": ("H", "K")}


@dataclass(frozen=True)
class ZeroPointResult:
    status: str  #: "ok" | "failed"
    magzp: float = float("nan")  #: at the frame centre and colour 0
    magzp_err: float = float("nan")
    n: int = 0  #: stars used after clipping
    n_matched: int = 0  #: stars matched before clipping
    scatter: float = float("nan")  #: robust rms of the residuals (mag)
    color_coeff: float = 0.0
    spatial: tuple = ()  #: coefficients of the spatial terms (mag per half-frame)
    band: str | None = None
    reason: str | None = None

    def zp_at(self, x: np.ndarray, y: np.ndarray, shape) -> np.ndarray:
        """Zero point at pixel positions (spatial term included)."""
        base = np.full(np.shape(x), self.magzp, float)
        if self.spatial:
            xs, ys = _norm_xy(np.asarray(x, float), np.asarray(y, float), shape)
            for coeff, term in zip(self.spatial, _spatial_terms(xs, ys, len(self.spatial))):
                base = base + coeff * term
        return base


def _norm_xy(x, y, shape):
    ny, nx = shape
    return (x - (nx - 1) / 2) / (nx / 2), (y - (ny - 1) / 2) / (ny / 2)


def _spatial_terms(xs, ys, n):
    terms = [xs, ys, xs * xs, xs * ys, ys * ys]
    return terms[:n]


def match_sky(ra1, dec1, ra2, dec2, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour match of two position lists within a radius: (index1, index2)."""
    from scipy.spatial import cKDTree

    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    ok1 = np.isfinite(ra1) & np.isfinite(dec1)
    ok2 = np.isfinite(ra2) & np.isfinite(dec2)
    if not ok1.any() or not ok2.any():
        return np.zeros(0, int), np.zeros(0, int)

    def xyz(ra, dec):
        return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])

    i1 = np.nonzero(ok1)[0]
    i2 = np.nonzero(ok2)[0]
    tree = cKDTree(xyz(ra2[i2], dec2[i2]))
    chord = 2 * math.sin(math.radians(radius_arcsec / 3600.0) / 2)
    dist, idx = tree.query(xyz(ra1[i1], dec1[i1]), distance_upper_bound=chord)
    good = np.isfinite(dist)
    a, b = i1[good], i2[idx[good]]
    # one catalogue star per detection and vice versa: keep the closest pair
    order = np.argsort(dist[good])
    _, first = np.unique(b[order], return_index=True)
    keep = order[first]
    return a[keep], b[keep]


def usable_stars(cat, *, min_snr: float = 10.0, stellar_only: bool = True) -> np.ndarray:
    """Indices of unflagged, positive, reasonably bright sources with positions.

    ``stellar_only``: keep only sources classified stellar when there are at least five
    (a catalogue of stars; a relative flux scale can use any compact source).
    """
    flux = np.asarray(cat["flux"], float)
    err = np.asarray(cat["fluxerr"], float)
    ok = (np.asarray(cat["flags"]) == 0) & np.isfinite(flux) & (flux > 0) & (err > 0)
    ok &= np.isfinite(np.asarray(cat["ra"], float))
    ok &= flux / np.where(err > 0, err, np.inf) >= min_snr
    if stellar_only and "stellar" in cat.colnames:
        stellar = np.asarray(cat["stellar"], bool)
        if stellar[ok].sum() >= 5:
            ok &= stellar
    return np.nonzero(ok)[0]


#: the crowding cut applies when this many calibrators are clean (fewer: all are kept) ...
_MIN_CLEAN = 10
#: ... except where there are fewer calibrators than this: then only clean ones are used,
#: and only where an aperture holds fewer catalogue stars than this on average
_FEW_CALIBRATORS = 5
_FEW_MAX_PER_APERTURE = 0.1
#: radius (arcsec) around the calibrators over which the catalogue's density is counted
_DENSITY_RADIUS = 60.0


def _catalogue_stars_per_aperture(cat, a, reference, radius_arcsec: float) -> float:
    """The catalogue's mean number of stars in an aperture of ``radius_arcsec``, from its
    density within :data:`_DENSITY_RADIUS` of the calibrators ``a`` (0: unknown)."""
    if radius_arcsec <= 0 or not len(a):
        return 0.0
    ra0 = float(np.median(np.asarray(cat["ra"], float)[a]))
    dec0 = float(np.median(np.asarray(cat["dec"], float)[a]))
    xi, eta = project(np.asarray(reference["ra"], float), np.asarray(reference["dec"], float),
                      ra0, dec0)
    near = np.hypot(xi, eta) * 3600.0 <= _DENSITY_RADIUS
    return float(near.sum()) * (radius_arcsec / _DENSITY_RADIUS) ** 2


#: Moffat beta of the model a neighbour's light is spread with (:func:`aperture_contamination`)
_CONTAM_BETA = 3.0
#: how far a neighbour's light is followed, in FWHM beyond the aperture
_CONTAM_REACH = 5.0


def _disc_fraction(fwhm_px: float, radius_px: float, beta: float = _CONTAM_BETA):
    """(distances, fractions): the fraction of a Moffat star's light (FWHM ``fwhm_px``)
    inside a disc of ``radius_px`` whose centre lies that far from the star.

    The disc is sampled on 24 rings of 48 points (midpoint rule, area-weighted) and the
    normalised Moffat summed over them: ~1 ms a frame (a 2-D pixel grid was 0.2 s)."""
    alpha = moffat_alpha(fwhm_px, beta)
    reach = radius_px + _CONTAM_REACH * fwhm_px
    step = min(0.5, fwhm_px / 6.0)
    nr, nt = 24, 48
    r = (np.arange(nr) + 0.5) / nr * radius_px
    t = (np.arange(nt) + 0.5) / nt * 2.0 * np.pi
    rr, tt = np.meshgrid(r, t, indexing="ij")
    px, py = (rr * np.cos(tt)).ravel(), (rr * np.sin(tt)).ravel()
    area = (rr * (radius_px / nr) * (2.0 * np.pi / nt)).ravel()
    ds = np.arange(0.0, reach + step, step)
    d2 = (px[None, :] - ds[:, None]) ** 2 + py[None, :] ** 2
    norm = (beta - 1.0) / (np.pi * alpha ** 2)  # the Moffat's integral over the plane is 1
    inside = (norm * (1.0 + d2 / alpha ** 2) ** (-beta) * area[None, :]).sum(axis=1)
    return ds, inside


def aperture_contamination(cat, idx, *, radius_px: float, fwhm_px: float,
                           neighbours=None) -> np.ndarray:
    """For the sources ``idx`` of ``cat``: the light of the other detected sources inside
    each one's aperture, as a fraction of its own flux.

    Each neighbour (every row with a positive ``flux``, flagged or not: the frame's
    detections reach deeper than any catalogue) is a Moffat star of the frame's FWHM.
    ``neighbours``: more, per source of ``idx``, as (dx px, dy px, flux ratio) arrays: the
    catalogue's stars no detection accounts for (one merged into a calibrator's own
    detection is in its flux, not in the frame's list).
    In a crowded field the aperture sums of calibrators carry their neighbours' light:
    on simulated fields of 65,000-200,000 stars per square degree those with more than
    2 % of it read 0.02-0.27 mag bright and pulled MAGZP 0.015-0.035 mag off the truth.
    """
    from scipy.spatial import cKDTree

    idx = np.asarray(idx, int)
    out = np.zeros(idx.size)
    flux = np.asarray(cat["flux"], float)
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    use = np.isfinite(flux) & (flux > 0) & np.isfinite(x) & np.isfinite(y)
    if not idx.size or use.sum() < 2 or not (radius_px > 0 and fwhm_px > 0):
        return out
    ds, inside = _disc_fraction(fwhm_px, radius_px)
    rows = np.flatnonzero(use)
    tree = cKDTree(np.c_[x[rows], y[rows]])
    for k, i in enumerate(idx):
        near = rows[tree.query_ball_point([x[i], y[i]], float(ds[-1]))]
        near = near[near != i]
        if near.size and flux[i] > 0:
            d = np.hypot(x[near] - x[i], y[near] - y[i])
            out[k] = float((flux[near] * np.interp(d, ds, inside, right=0.0)).sum() / flux[i])
        if neighbours is not None and neighbours[k][0].size:
            dx, dy, ratio = neighbours[k]
            out[k] += float((ratio * np.interp(np.hypot(dx, dy), ds, inside, right=0.0)).sum())
    return out


def _catalogue_neighbours(cat, a, reference, b, band: str, scale: float, reach_px: float):
    """Per calibrator ``a[k]`` (matched to ``reference[b[k]]``): the catalogue's other stars
    within ``reach_px`` that no detection of ``cat`` lies within a pixel of, as (dx, dy,
    flux ratio from their magnitudes in ``band``), positions in px (``scale`` arcsec/px)."""
    from scipy.spatial import cKDTree

    ra, dec = np.asarray(reference["ra"], float), np.asarray(reference["dec"], float)
    mag = np.asarray(reference[band], float)
    ok = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(mag) & (mag < 90)
    cra, cdec = np.asarray(cat["ra"], float), np.asarray(cat["dec"], float)
    ra0, dec0 = float(cra[a][0]), float(cdec[a][0])

    def plane(r, d):  # px in the tangent plane at the first calibrator
        xi, eta = project(r, d, ra0, dec0)
        return np.c_[xi, eta] * (3600.0 / scale)

    ref_xy = plane(ra[ok], dec[ok])
    dok = np.isfinite(cra) & np.isfinite(cdec)
    det_xy = plane(cra[dok], cdec[dok])
    # catalogue stars a detection accounts for (its flux is in the frame's list)
    seen = np.zeros(ok.sum(), bool)
    if det_xy.size:
        dist, _ = cKDTree(det_xy).query(ref_xy)
        seen = dist < 1.0
    rows = np.flatnonzero(ok)
    tree = cKDTree(ref_xy)
    cal_xy = plane(cra[a], cdec[a])
    out = []
    for k in range(len(a)):
        near = np.asarray(tree.query_ball_point(cal_xy[k], reach_px), int)
        near = near[~seen[near] & (rows[near] != b[k])]
        d = ref_xy[near] - cal_xy[k]
        out.append((d[:, 0], d[:, 1], 10 ** (-0.4 * (mag[rows[near]] - mag[b[k]]))))
    return out


def _robust_fit(design, y, w, clip_sigma, max_iter=10):
    """Weighted least squares with clipping of residuals in units of each point's error
    (``w`` = 1/err²) times their robust spread when that exceeds 1: a faint star read
    within its error stays however tightly the bright ones agree (clipping the plain
    residuals at 3 MAD threw out 2-sigma faint stars and left sparse frames below their
    minimum: sweep seed 6, "4 stars left after clipping, need 5")."""
    keep = np.ones(y.size, bool)
    coef = np.zeros(design.shape[1])
    sw_all = np.sqrt(w)
    for _ in range(max_iter):
        if keep.sum() < design.shape[1] + 1:
            break
        sw = sw_all[keep]
        coef, *_ = np.linalg.lstsq(design[keep] * sw[:, None], y[keep] * sw, rcond=None)
        norm = (y - design @ coef) * sw_all
        med = np.median(norm[keep])
        spread = max(float(mad_std(norm[keep])), 1.0)
        new = np.abs(norm - med) <= clip_sigma * spread
        if np.array_equal(new, keep):
            break
        keep = new
    res = y - design @ coef
    return coef, keep, res


def calibrate_zeropoint(cat, reference, *, band: str, shape: tuple[int, int],
                        settings: ZeroPoint) -> ZeroPointResult:
    """Fit the zero point of a frame's source table against a reference catalogue.

    Parameters
    ----------
    cat
        the frame's sources (``ra, dec`` from its solved WCS; ``flux, fluxerr``
        total electrons; ``flags``; ``x, y``)
    reference
        catalogue with ``ra, dec, <band>, <band>_err``
    """
    if reference is None or band not in reference.colnames:
        return ZeroPointResult("failed", band=band, reason=f"no catalogue magnitudes in band {band}")
    idx = usable_stars(cat)
    if idx.size == 0:
        return ZeroPointResult("failed", band=band, reason="no unflagged stars measured")
    a, b = match_sky(np.asarray(cat["ra"])[idx], np.asarray(cat["dec"])[idx],
                     reference["ra"], reference["dec"], settings.match_radius_arcsec)
    a = idx[a]
    refmag = np.asarray(reference[band], float)[b]
    errcol = f"{band}_err"
    referr = np.asarray(reference[errcol], float)[b] if errcol in reference.colnames else \
        np.full(b.size, 0.02)
    flux = np.asarray(cat["flux"], float)[a]
    fluxerr = np.asarray(cat["fluxerr"], float)[a]
    good = np.isfinite(refmag) & np.isfinite(referr) & (referr < settings.max_mag_err)
    good &= refmag < 90  # PhotoPipe's "no value" sentinel
    inst = -2.5 * np.log10(flux)
    insterr = 1.0857 * fluxerr / flux
    good &= insterr < settings.max_mag_err
    nmatch = int(good.sum())
    if nmatch < settings.min_stars:
        return ZeroPointResult("failed", n_matched=nmatch, band=band,
                               reason=f"{nmatch} catalogue stars matched, need "
                                      f"{settings.min_stars}")
    a, b, refmag, referr, inst, insterr = (v[good] for v in (a, b, refmag, referr, inst,
                                                             insterr))
    # crowding: calibrators whose neighbours' light fills their aperture read bright
    use = np.ones(a.size, bool)
    is_clean = np.ones(a.size, bool)
    radius, fwhm, fwhm_as = (float(cat.meta.get(k) or 0.0) for k in ("APRAD", "FWHMPIX", "FWHM"))
    if settings.max_contamination > 0 and radius > 0 and fwhm > 0:
        extra = None
        if fwhm_as > 0:  # the catalogue's stars the frame did not detect apart
            extra = _catalogue_neighbours(cat, a, reference, b, band, fwhm_as / fwhm,
                                          radius + _CONTAM_REACH * fwhm)
        clean = aperture_contamination(cat, a, radius_px=radius, fwhm_px=fwhm,
                                       neighbours=extra) <= settings.max_contamination
        # crowding is a many-star problem: a sparse field keeps all of them (a cut to five
        # left the clipping nothing to work with) ...
        if clean.sum() >= _MIN_CLEAN:
            use &= clean
        # ... but fewer than five calibrators leave nothing to clip a crowded one against
        # (see the end)
        elif nmatch < _FEW_CALIBRATORS:
            if clean.sum() < settings.min_stars:
                return ZeroPointResult(
                    "failed", n_matched=nmatch, band=band,
                    reason=f"{int(clean.sum())} of {nmatch} catalogue stars free of their "
                           f"neighbours' light, need {settings.min_stars}")
            use &= clean
        is_clean = clean
    # the undetected stars' light in an aperture is a larger part of a faint star's flux:
    # on simulated fields of 65,000-200,000 stars per square degree calibrators of S/N
    # 10-100 read 0.04-0.14 mag bright, those above 100 within 0.02 mag
    if settings.bright_snr > 0:
        bright = use & (insterr <= 1.0857 / settings.bright_snr)
        if bright.sum() >= max(settings.min_bright, settings.min_stars):
            use = bright
    a, b, refmag, referr, inst, insterr, is_clean = (
        v[use] for v in (a, b, refmag, referr, inst, insterr, is_clean))
    y = refmag - inst
    w = 1.0 / (referr**2 + insterr**2 + settings.err_floor_mag**2)
    cols = [np.ones(y.size)]
    colour = None
    if settings.color_term and band in COLOURS:
        blue, red = COLOURS[band]
        if blue in reference.colnames and red in reference.colnames:
            colour = np.asarray(reference[blue], float)[b] - np.asarray(reference[red], float)[b]
            colour = np.where(np.isfinite(colour) & (np.abs(colour) < 5), colour, np.nan)
            ok = np.isfinite(colour)
            if ok.sum() >= settings.min_stars + 1:
                y, w, colour, a, is_clean = y[ok], w[ok], colour[ok], a[ok], is_clean[ok]
                cols = [np.ones(y.size), colour]
            else:
                colour = None
    nspatial = {0: 0, 1: 2, 2: 5}[settings.spatial_order]
    if nspatial:
        xs, ys = _norm_xy(np.asarray(cat["x"], float)[a], np.asarray(cat["y"], float)[a], shape)
        cols += _spatial_terms(xs, ys, nspatial)
    design = np.column_stack(cols)
    coef, keep, res = _robust_fit(design, y, w, settings.clip_sigma)
    n = int(keep.sum())
    # fewer than five calibrators kept: they must all be clean, in a field where an
    # aperture seldom holds a catalogue star (three of a 61" field of 200,000 stars per
    # square degree, clean by the catalogue, read 0.1-0.2 mag bright: the stars below its
    # depth); more are clipped against each other
    if settings.min_stars <= n < _FEW_CALIBRATORS:
        if not is_clean[keep].all():
            return ZeroPointResult(
                "failed", n_matched=nmatch, band=band,
                reason=f"{n} stars left, {int((~is_clean[keep]).sum())} of them carrying "
                       f"their neighbours' light; need {_FEW_CALIBRATORS}")
        per_ap = _catalogue_stars_per_aperture(cat, a[keep], reference,
                                               radius * fwhm_as / fwhm if fwhm > 0 else 0.0)
        if per_ap > _FEW_MAX_PER_APERTURE:
            return ZeroPointResult(
                "failed", n_matched=nmatch, band=band,
                reason=f"{n} stars left in a crowded field ({per_ap:.2f} catalogue stars "
                       f"per aperture), need {_FEW_CALIBRATORS}")
    if n < settings.min_stars:
        return ZeroPointResult("failed", n_matched=nmatch, band=band,
                               reason=f"{n} stars left after clipping, need {settings.min_stars}")
    scatter = float(mad_std(res[keep]))
    formal = float(np.sqrt(1.0 / w[keep].sum()))
    err = max(formal, scatter / math.sqrt(n))
    return ZeroPointResult(
        "ok", magzp=float(coef[0]), magzp_err=err, n=n, n_matched=nmatch, scatter=scatter,
        color_coeff=float(coef[1]) if colour is not None else 0.0,
        spatial=tuple(float(c) for c in coef[len(cols) - nspatial:]) if nspatial else (),
        band=band)


@dataclass(frozen=True)
class FluxScaleResult:
    status: str  #: "ok" | "reference" | "failed"
    scale: float = float("nan")  #: multiply the frame by this to match the reference
    err: float = float("nan")
    n: int = 0
    reason: str | None = None


def relative_stars(cat) -> np.ndarray:
    """Indices of the sources a relative flux scale uses: any compact source at S/N >= 5
    (the field's reference frame keeps the same selection, so both sides match)."""
    return usable_stars(cat, min_snr=5.0, stellar_only=False)


def relative_flux_scale(cat, reference, *, settings: ZeroPoint, min_stars: int
                        ) -> FluxScaleResult:
    """Flux scale to the night's reference frame of a field and filter, from common stars.

    ``reference`` has ``ra, dec, flux`` (the reference frame's sources). When both
    tables have ``flux_aper`` (the flux in the aperture of radius ``aperture_fwhm``
    times each frame's FWHM), the scale compares those: the same apertures on both
    sides, so each frame's aperture correction (a few stars' growth curve, uncertain
    by several per cent on real frames) cancels instead of entering the scale. The
    result's ``err`` is the scale's standard error.
    """
    idx = relative_stars(cat)
    if idx.size == 0:
        return FluxScaleResult("failed", reason="no unflagged stars measured")
    a, b = match_sky(np.asarray(cat["ra"])[idx], np.asarray(cat["dec"])[idx],
                     reference["ra"], reference["dec"], settings.match_radius_arcsec)
    a = idx[a]
    col = "flux_aper" if "flux_aper" in cat.colnames and "flux_aper" in reference.colnames \
        else "flux"
    ecol = "fluxerr_aper" if col == "flux_aper" else "fluxerr"
    f = np.asarray(cat[col], float)[a]
    fe = np.asarray(cat[ecol], float)[a]
    fr = np.asarray(reference[col], float)[b]
    ok = np.isfinite(fr) & (fr > 0) & (f > 0)
    if ecol in reference.colnames:
        fre = np.asarray(reference[ecol], float)[b]
    else:
        fre = np.zeros_like(fr)
    ok &= np.isfinite(fre)
    if ok.sum() < min_stars:
        return FluxScaleResult("failed", n=int(ok.sum()),
                               reason=f"{int(ok.sum())} stars in common with the reference "
                                      f"frame, need {min_stars}")
    d = -2.5 * np.log10(fr[ok] / f[ok])  # mag difference: reference − this frame
    e2 = (1.0857 * fe[ok] / f[ok]) ** 2 + (1.0857 * fre[ok] / fr[ok]) ** 2 + \
        settings.err_floor_mag**2
    coef, keep, res = _robust_fit(np.ones((d.size, 1)), d, 1.0 / e2, settings.clip_sigma)
    n = int(keep.sum())
    if n < min_stars:
        return FluxScaleResult("failed", n=n, reason=f"{n} common stars after clipping")
    err_mag = max(float(np.sqrt(1.0 / (1.0 / e2[keep]).sum())),
                  1.4826 * float(np.median(np.abs(res[keep]))) / math.sqrt(n))
    scale = 10 ** (-0.4 * coef[0])
    return FluxScaleResult("ok", scale=float(scale), err=float(scale * err_mag / 1.0857), n=n)


def calibrated_magnitudes(cat, zp: ZeroPointResult, shape) -> None:
    """Fill the table's mag/magerr with calibrated magnitudes (in place, on a table copy)."""
    flux = np.asarray(cat["flux"], float)
    err = np.asarray(cat["fluxerr"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        inst = np.where(flux > 0, -2.5 * np.log10(flux), np.nan)
        magerr = np.where(flux > 0, 1.0857 * err / flux, np.nan)
    zps = zp.zp_at(np.asarray(cat["x"], float), np.asarray(cat["y"], float), shape)
    cat["mag"] = inst + zps
    cat["magerr"] = np.sqrt(magerr**2 + zp.magzp_err**2)
