"""astrometry: detected sources + reference stars → a TAN-SIP WCS (PhotoPipe's ``a`` step).

Solve, then apply:

- :func:`initial_wcs` builds the first guess from the header pointing and the
  instrument profile (scale, rotation, parity, optical centre, RATIR aperture
  offsets).
- :func:`solve_astrometry` matches the frame's sources with reference stars
  and fits a TAN-SIP WCS; it returns a frozen :class:`AstrometryResult` and
  never a WCS it could not verify (``min_matches`` stars, rms at most
  ``max_rms_arcsec``, more matches than chance).
- :func:`apply_astrometry` writes a result into a new frame's header;
  :func:`radec_for` fills the ``ra``/``dec`` columns of a source table.
- :func:`check_neighbours` flags a solution that disagrees with the other
  solutions of its field.

Matching (see :mod:`photowatch.stages.matching`), in order:

1. **warm** (``previous`` given, the last solution of the same field): the
   reference stars are predicted in pixels with ``previous``, a shift is
   searched (its peak must beat chance), the bright pairs at that shift get an
   affine fit whose matches, match fraction, rms and geometry are checked, and
   only then are all stars paired and fitted; otherwise the pattern runs.
2. **pattern**: triangle hashing of well-measured stars (no saturated, blended
   or trailed ones): the brightest, then the brightest per cell of a grid over
   the frame, against the catalogue to the same depth; robust to a pointing
   error up to ``max_pointing_error_arcsec``, any rotation, either parity and
   a pixel scale known to ``scale_tolerance``.
3. **solve-field** (astrometry.net, when ``settings.solve_field`` and the
   program is on PATH): run on an xylist of the sources with a time limit; its
   WCS is then refined and verified against the reference like the others.

Relative mode: with no reference catalogue the engine passes, as
``reference``, the first good frame's sources with ``ra``/``dec`` computed
with *its* WCS and ``reference.meta['relative'] = True`` (see
:func:`relative_reference`). Solutions against such a reference get
``status='relative'``: they align frames with each other, not with the sky.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photowatch.core.classify import FrameInfo
from photowatch.core.config import Astrometry
from photowatch.core.errors import StageDegraded
from photowatch.core.frame import Frame
from photowatch.core.instruments import Profile
from photowatch.core.schema import set_key, strip_wcs
from photowatch.stages.matching import (
    ARCSEC_PER_DEG,
    Refined,
    brightness_order,
    chance_needed,
    deproject,
    find_similarity,
    fit_affine,
    match_nearest,
    poisson_needed,
    project,
    refine,
    shift_search,
    spread_order,
)
from photowatch.stages.sources import SourceFlag

log = logging.getLogger(__name__)

#: source flags that spoil a centroid for fitting (saturated stars still help the pattern).
#: MASKED is not one: sep.winpos ignores masked pixels, and with a bad-pixel mask about
#: half the stars have one somewhere in their photometric aperture.
_BAD_FOR_FIT = int(SourceFlag.SATURATED | SourceFlag.BLENDED | SourceFlag.CENTROID
                   | SourceFlag.BADFLUX | SourceFlag.SHARP | SourceFlag.FAINT)
#: hot pixels (SHARP) would match each other at zero shift between frames of one camera;
#: saturated and blended stars stay out of the pattern too (their brightness order and
#: centroids are unreliable) unless a frame has too few other stars; FAINT (the sources'
#: PSF-matched pass, S/N < ~11) stays out of both: the stars astrometry used before it
_BAD_FOR_PATTERN = int(SourceFlag.CENTROID | SourceFlag.BADFLUX | SourceFlag.SHARP
                       | SourceFlag.FAINT)
#: fewest clean (fit-quality) stars for a pattern of clean stars only
_MIN_CLEAN_PATTERN = 8
#: a solution of fewer pairs is refused when their rms exceeds both this (arcsec) ...
_FEW_PAIRS = 10
_FEW_PAIRS_RMS_FLOOR = 0.1
#: ... and this many times their positional errors
_FEW_PAIRS_RMS_FACTOR = 5.0
#: chance that a random star list passes the pattern stage (shared by its passes)
_FALSE_ALARM = 1e-3
#: centroid uncertainty floor (pixels): pixelisation and PSF asymmetries of bright stars
_CENTROID_FLOOR_PX = 0.02
#: sources at least this elongated (1 - b/a; sources.py's limit for stars) are not fitted:
#: the centroid of a trail is uncertain along it (a trailed frame gave 0.4" rms and a WCS
#: 0.7 px off)
_MAX_FIT_ELLIPTICITY = 0.5


@dataclass(frozen=True, eq=False)
class AstrometryResult:
    """The outcome of :func:`solve_astrometry`.

    Attributes
    ----------
    wcs : astropy.wcs.WCS or None
        TAN-SIP solution (0-based pixels of the reduced frame); None when failed.
    status : str
        ``ok`` (against a sky catalogue), ``relative`` (against another
        frame's sources) or ``failed``.
    method : str
        ``warm``, ``pattern``, ``solve-field``, or ``none``.
    rms_arcsec : float
        rms of the radial residuals of the matched stars (arcsec).
    nstar : int
        Matched stars kept in the fit.
    offset_arcsec : float
        Distance of the solved image centre from the guessed one (arcsec).
    offset_east_arcsec, offset_north_arcsec : float
        The same offset along east and north (solved minus guessed).
    rotation_deg : float
        Position angle of the image +y axis, degrees east of north.
    scale_arcsec : float
        Pixel scale at CRPIX (arcsec per pixel).
    flipped : bool
        True when the image x axis increases eastwards (mirror parity).
    sip_degree : int
        Polynomial degree fitted (1: TAN only).
    reason : str
        Why the solve failed, or why a solution is suspect.
    suspect : bool
        Set by :func:`check_neighbours` when the solution disagrees with its
        field's other solutions.
    matches : astropy Table or None
        The pairs kept: ``src_index`` (row of the source table), ``ref_index``
        (row of the reference table), ``x``, ``y`` (0-based), ``ra``, ``dec``
        (reference), ``dx_arcsec``, ``dy_arcsec`` (residual east, north).
    """

    wcs: object | None
    status: str
    method: str
    rms_arcsec: float = float("nan")
    nstar: int = 0
    offset_arcsec: float = float("nan")
    offset_east_arcsec: float = float("nan")
    offset_north_arcsec: float = float("nan")
    rotation_deg: float = float("nan")
    scale_arcsec: float = float("nan")
    flipped: bool = False
    sip_degree: int = 0
    reason: str = ""
    suspect: bool = False
    matches: object | None = None

    @property
    def ok(self) -> bool:
        """True when there is a usable (absolute or relative) WCS."""
        return self.wcs is not None and self.status in ("ok", "relative")


# ---------------------------------------------------------------------------
# the initial guess


def _trim_origin(info: FrameInfo) -> tuple[int, int]:
    sec = info.trimsec or info.datasec
    if sec is None:
        return 0, 0
    return sec[2], sec[0]  # x0, y0


def _aperture_offset_arcmin(profile: Profile, header) -> tuple[float, float]:
    key = profile.wcs.aperture_keyword
    if not key or header is None or key not in header:
        return 0.0, 0.0
    name = str(header[key]).strip()
    if name.lower().endswith("center"):
        name = name[: -len("center")]
    offsets = profile.wcs.aperture_offsets_arcmin
    found = offsets.get(name)
    if found is None:
        lower = {k.lower(): v for k, v in offsets.items()}
        found = lower.get(name.lower())
    if found is None:
        return 0.0, 0.0
    return float(found[0]), float(found[1])


def _header_float(header, key: str) -> float | None:
    try:
        value = float(header[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def initial_wcs(info: FrameInfo, profile: Profile, shape: tuple[int, int], header=None):
    """The first-guess TAN WCS of a reduced frame, from its header pointing and profile.

    Parameters
    ----------
    info : FrameInfo
        The classified raw frame: pointing ``ra_deg``/``dec_deg`` (deg),
        ``pixel_scale_arcsec`` (binned), ``camera``, ``binning``,
        ``trimsec``/``datasec`` (the reduced image is ``raw[trimsec or datasec]``).
    profile : Profile
        Gives the camera's ``rotation_deg`` (position angle of +y, east of
        north), ``flip`` (x increases eastwards) and ``optical_center`` (1-based
        unbinned raw pixel; empty: the centre of the data section, else of the
        raw image), and the aperture offsets (``wcs.aperture_keyword``,
        ``wcs.aperture_offsets_arcmin``).
    shape : (ny, nx)
        Shape of the reduced image.
    header : astropy Header, optional
        The raw header: for the aperture keyword and the raw size (NAXIS1/2,
        to place the raw centre). Without it the aperture offset is 0 and the
        optical centre defaults to the reduced image's centre.

    Returns
    -------
    astropy.wcs.WCS
        TAN, CRPIX (1-based, reduced-image pixels) at the optical centre, CRVAL
        the field centre: the pointing minus the aperture offset (east, north,
        applied on the tangent plane; PhotoPipe subtracts the east offset from
        RA without the cos(dec) factor). If the profile's ``wcs`` section
        defines ``offset_keywords`` (pairs of header keywords, east then north,
        degrees on the sky, summed; e.g. RATIR's applied aperture offset
        ``STRAPRAO``/``STRAPDEO`` and dither ``STRRQRAO``/``STRRQDEO``) they are
        added. (The profile model has no such field yet; see the report.)

    Raises
    ------
    StageDegraded
        The header has no pointing.
    """
    from astropy.wcs import WCS

    if info.ra_deg is None or info.dec_deg is None:
        raise StageDegraded(f"{info.raw_name}: no telescope pointing in the header; "
                            "no initial WCS")
    det = profile.detector_for(info.camera)
    bx, by = info.binxy
    ny, nx = shape
    x0, y0 = _trim_origin(info)
    if det.optical_center:
        cx = (det.optical_center[0] - 0.5) / bx + 0.5
        cy = (det.optical_center[1] - 0.5) / by + 0.5
    elif info.datasec is not None:  # the centre of the imaging area (no overscan)
        dy0, dy1, dx0, dx1 = info.datasec
        cx, cy = (dx0 + dx1 + 1) / 2.0, (dy0 + dy1 + 1) / 2.0
    elif header is not None and "NAXIS1" in header and "NAXIS2" in header:
        cx = (int(header["NAXIS1"]) + 1) / 2.0
        cy = (int(header["NAXIS2"]) + 1) / 2.0
    else:
        cx, cy = (nx + 1) / 2.0 + x0, (ny + 1) / 2.0 + y0
    crpix = (cx - x0, cy - y0)

    east, north = _aperture_offset_arcmin(profile, header)
    d_east, d_north = -east / 60.0, -north / 60.0
    keys = list(getattr(profile.wcs, "offset_keywords", None) or ())
    for i, key in enumerate(keys[: len(keys) // 2 * 2]):  # (east, north) pairs, summed
        value = _header_float(header, key) if header is not None else None
        if value is not None:
            if i % 2 == 0:
                d_east += value
            else:
                d_north += value
    ra_c, dec_c = deproject(d_east, d_north, info.ra_deg, info.dec_deg)

    s = info.pixel_scale_arcsec / ARCSEC_PER_DEG
    th = math.radians(det.rotation_deg)
    sx = 1.0 if det.flip else -1.0
    cd = np.array([[sx * s * math.cos(th), s * math.sin(th)],
                   [-sx * s * math.sin(th), s * math.cos(th)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = list(crpix)
    w.wcs.crval = [float(ra_c), float(dec_c)]
    w.wcs.cd = cd
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w


# ---------------------------------------------------------------------------
# geometry of a WCS


def wcs_geometry(wcs) -> tuple[float, float, bool]:
    """(scale arcsec/px, position angle of +y deg E of N, flipped) of a WCS at CRPIX."""
    cd = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.pixel_scale_matrix
    cd = np.asarray(cd, dtype=np.float64)
    det = float(np.linalg.det(cd))
    scale = math.sqrt(abs(det)) * ARCSEC_PER_DEG
    pa = math.degrees(math.atan2(cd[0, 1], cd[1, 1]))
    return scale, pa, det > 0


def _centre_sky(wcs, shape) -> tuple[float, float]:
    ny, nx = shape
    ra, dec = wcs.all_pix2world([(nx - 1) / 2.0], [(ny - 1) / 2.0], 0)
    return float(ra[0]), float(dec[0])


# ---------------------------------------------------------------------------
# the solve


def _column(table, name, default=None):
    if name in table.colnames:
        return np.ma.filled(np.ma.asarray(table[name]).astype(np.float64), np.nan)
    return default


def _position_sigma_px(table) -> np.ndarray:
    """Centroid uncertainty (pixels) per source: sigma_psf / snr, with a floor."""
    n = len(table)
    snr = _column(table, "snr")
    fwhm = _column(table, "fwhm")
    if snr is None:
        return np.full(n, 0.1)
    if fwhm is not None and np.isfinite(fwhm).any():
        width = float(np.nanmedian(fwhm)) / 2.3548
    else:
        width = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(snr > 0, width / snr, np.inf)
    return np.hypot(np.nan_to_num(sig, nan=np.inf, posinf=1e3), _CENTROID_FLOOR_PX)


def _brightness_rank(table) -> np.ndarray:
    return brightness_order(table)


@dataclass(frozen=True)
class _Problem:
    """Everything the matchers share for one solve."""

    x: np.ndarray  #: usable image stars (0-based), bright first
    y: np.ndarray
    src_index: np.ndarray  #: their rows in the source table
    fit_ok: np.ndarray  #: bool, centroid good enough to fit
    saturated: np.ndarray  #: bool, flagged saturated
    relative: bool  #: the reference is another frame's unsaturated sources
    sigma_arcsec: np.ndarray
    ref_ra: np.ndarray  #: reference stars in the search cone, bright first
    ref_dec: np.ndarray
    ref_index: np.ndarray
    ref_sigma_arcsec: np.ndarray
    centre: tuple[float, float]  #: guessed sky position of the image centre
    scale: float  #: guessed pixel scale, arcsec/px
    search_radius: float  #: arcsec
    field_radius: float  #: arcsec, half-diagonal of the image
    shape: tuple[int, int]
    crpix: tuple[float, float]


def _setup(sources, shape, wcs_guess, reference, settings: Astrometry) -> _Problem | str:
    ny, nx = shape
    if len(sources) == 0:
        return "no sources detected"
    x = _column(sources, "x")
    y = _column(sources, "y")
    flags = np.asarray(sources["flags"]).astype(np.int64) if "flags" in sources.colnames \
        else np.zeros(len(sources), dtype=np.int64)
    flux = _column(sources, "flux", np.ones(len(sources)))
    good = np.isfinite(x) & np.isfinite(y) & ((flags & _BAD_FOR_PATTERN) == 0)
    ell = _column(sources, "ellipticity")
    trailed = np.zeros(len(sources), bool) if ell is None else ell >= _MAX_FIT_ELLIPTICITY
    order = np.argsort(-np.where(np.isfinite(flux), flux, -np.inf), kind="stable")
    order = order[good[order]]
    scale, _, _ = wcs_geometry(wcs_guess)
    sigma_px = _position_sigma_px(sources)
    centre = _centre_sky(wcs_guess, shape)
    field_radius = 0.5 * math.hypot(nx, ny) * scale
    search = field_radius * (1 + settings.scale_tolerance) + settings.max_pointing_error_arcsec

    ref_ra = _column(reference, "ra")
    ref_dec = _column(reference, "dec")
    if ref_ra is None or ref_dec is None:
        return "the reference has no ra/dec columns"
    xi, eta = project(ref_ra, ref_dec, *centre)
    r = np.hypot(xi, eta) * ARCSEC_PER_DEG
    inside = np.isfinite(r) & (r <= search)
    rank = _brightness_rank(reference)
    rank = rank[inside[rank]]
    ref_sigma = np.zeros(len(reference))
    if "snr" in reference.colnames:  # a relative reference: another frame's sources
        ref_sigma = _position_sigma_px(reference) * scale
    crpix = tuple(float(c) for c in wcs_guess.wcs.crpix)
    return _Problem(
        x=x[order], y=y[order], src_index=order,
        fit_ok=((flags[order] & _BAD_FOR_FIT) == 0) & ~trailed[order],
        saturated=(flags[order] & int(SourceFlag.SATURATED)) != 0,
        relative=bool(reference.meta.get("relative")),
        sigma_arcsec=sigma_px[order] * scale, ref_ra=ref_ra[rank], ref_dec=ref_dec[rank],
        ref_index=rank, ref_sigma_arcsec=ref_sigma[rank], centre=centre, scale=scale,
        search_radius=search, field_radius=field_radius, shape=(ny, nx), crpix=crpix)


def _refine(prob: _Problem, predict, settings: Astrometry, start_radius: float,
            crpix=None) -> Refined:
    fit = prob.fit_ok
    return refine(prob.x[fit], prob.y[fit], prob.ref_ra, prob.ref_dec, predict=predict,
                  crpix=crpix or prob.crpix, crval=prob.centre, degree=settings.sip_degree,
                  start_radius=start_radius, match_radius=settings.match_radius_arcsec,
                  clip_sigma=settings.clip_sigma, scale_px=0.5 * max(prob.shape),
                  shape=prob.shape, pair_sigma=(prob.sigma_arcsec[fit], prob.ref_sigma_arcsec))


def _accept(prob: _Problem, ref: Refined, settings: Astrometry) -> str:
    """Why a refined solution is not acceptable ('' when it is)."""
    if ref.solution is None:
        return ref.reason or "no solution"
    n = len(ref.img_index)
    if n < settings.min_matches:
        return f"only {n} stars matched, need {settings.min_matches}"
    if not (ref.rms_arcsec <= settings.max_rms_arcsec):
        return (f"rms {ref.rms_arcsec:.3f} arcsec of {n} matched stars exceeds "
                f"{settings.max_rms_arcsec} arcsec")
    # a few pairs far beyond their errors are blends or wrong pairs, not a solution: on a
    # crowded 61" field 5 and 8 pairs at 0.34" and 0.19" (20 times their errors) put the
    # frame 0.8-2.3 px off; many pairs average such residuals out
    if n < _FEW_PAIRS and ref.rms_arcsec > _FEW_PAIRS_RMS_FLOOR:
        sig = np.sqrt(prob.sigma_arcsec[prob.fit_ok][ref.img_index] ** 2
                      + prob.ref_sigma_arcsec[ref.ref_index] ** 2)
        expected = float(np.sqrt(np.mean(sig**2))) if sig.size else 0.0
        if ref.rms_arcsec > _FEW_PAIRS_RMS_FACTOR * expected:
            return (f"rms {ref.rms_arcsec:.3f} arcsec of {n} matched stars is "
                    f"{ref.rms_arcsec / max(expected, 1e-9):.0f} times their errors "
                    f"(blended or wrong pairs)")
    # chance: the fitted image stars against the reference stars around the solved field,
    # within the radius the fit's precision allows (a deep catalogue has a star within the
    # matching radius of many image stars; it rarely has one within 3 rms)
    sol = ref.solution
    ra_c, dec_c = sol.pix2world([prob.shape[1] / 2.0 - 0.5], [prob.shape[0] / 2.0 - 0.5])
    xi, eta = project(prob.ref_ra, prob.ref_dec, float(ra_c[0]), float(dec_c[0]))
    near = int((np.hypot(xi, eta) * ARCSEC_PER_DEG <= prob.field_radius).sum())
    r_acc = min(settings.match_radius_arcsec, max(3.0 * ref.rms_arcsec, 0.25))
    n_acc = int((np.hypot(*ref.residuals.T) <= r_acc).sum())
    nimg = int(prob.fit_ok.sum())
    expected, needed = chance_needed(nimg, near, math.pi * prob.field_radius**2, r_acc, 10,
                                     fixed=0)
    if n_acc < needed:
        return (f"{n_acc} stars matched within {r_acc:.2f} arcsec is no more than chance "
                f"({expected:.1f} expected, need {needed})")
    scale, _, _ = wcs_geometry(ref.solution.to_wcs())
    if abs(scale / prob.scale - 1) > settings.scale_tolerance * 1.5 + 0.01:
        return f"fitted scale {scale:.4f} arcsec/px is off the expected {prob.scale:.4f}"
    return ""


def _pattern_lists(prob: _Problem, ref_std: np.ndarray, ratio: float, n_img: int, mode: str,
                   ref_factor: float = 1.0):
    """Image and reference star lists for one pattern pass, and the verification list.

    The image list holds well-measured stars (no saturated or blended ones unless the
    frame has fewer than :data:`_MIN_CLEAN_PATTERN` others): the brightest ``n_img``
    (``mode='bright'``) or the brightest of each cell of a grid over the frame
    (``mode='grid'``). The reference list covers the search area to the same depth: its
    brightest stars are skipped as many as the image's saturated stars account for, and
    it holds ``ratio`` (search area / image area) times ``ref_factor`` as many stars
    (``ref_factor`` > 1: a deeper reference for few-star frames whose brightest stars the
    catalogue orders differently). The verification
    list is the reference down to 1.5 times the depth the image list reaches.
    """
    ny, nx = prob.shape
    cand = np.flatnonzero(prob.fit_ok)
    if len(cand) < _MIN_CLEAN_PATTERN:
        cand = np.arange(len(prob.x))
        nsat = 0
    else:
        # a catalogue holds the stars the image saturates; a relative reference (another
        # frame's well-measured sources) does not
        nsat = 0 if prob.relative else int(prob.saturated.sum())
    nref = len(ref_std)
    skip = int(round(nsat * ratio))
    if nref - skip < max(3, n_img):
        skip = max(0, nref - max(3, int(round(n_img * ratio))))
    if mode == "grid":
        order = spread_order(np.column_stack([prob.x[cand], prob.y[cand]]), n_img,
                             lo=(-0.5, -0.5), hi=(nx - 0.5, ny - 0.5))
        sel = cand[order[:n_img]]
    else:
        sel = cand[:n_img]
    if len(sel) == 0:
        return sel, np.zeros((0, 2)), np.zeros((0, 2))
    depth = int(sel.max()) + 1  # rank (in brightness) the image selection reaches
    n_deep = int(min(nref, skip + max(len(sel), round(1.5 * depth * ratio * ref_factor))))
    if mode == "grid":
        pool = ref_std[skip:n_deep]
        cell = math.sqrt(nx * ny / max(len(sel), 1)) * prob.scale
        span = np.ptp(pool, axis=0) if len(pool) else np.zeros(2)
        ncells = max(int(round(float(span[0] * span[1]) / cell**2)), len(sel))
        order = spread_order(pool, ncells)
        ref_sel = pool[order[:int(min(len(pool), max(len(sel), round(len(sel) * ratio))))]]
    else:
        n_ref = int(min(nref - skip, max(len(sel), round(len(sel) * ratio * ref_factor))))
        ref_sel = ref_std[skip:skip + n_ref]
    return sel, ref_sel, ref_std[:n_deep]


def _pattern(prob: _Problem, settings: Astrometry) -> tuple[Refined | None, str]:
    ny, nx = prob.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    image_area = nx * ny * prob.scale**2
    nref = len(prob.ref_ra)
    xi, eta = project(prob.ref_ra, prob.ref_dec, *prob.centre)
    ref_std = np.column_stack([xi, eta]) * ARCSEC_PER_DEG
    # the reference covers the search cone (a catalogue) or less (a relative reference: one
    # frame's footprint): densities are matched over the area it really covers
    search_area = math.pi * prob.search_radius**2
    if nref >= 3:
        span = np.ptp(ref_std, axis=0)
        search_area = min(search_area, max(float(span[0] * span[1]), image_area))
    ratio = search_area / image_area
    radius = max(3 * settings.match_radius_arcsec, 0.01 * prob.field_radius)
    tight = max(settings.match_radius_arcsec, 0.003 * prob.field_radius)
    reasons = []
    tried = set()
    passes = (("bright", 1, 5, 1.0), ("grid", 1, 5, 1.0), ("bright", 2, 6, 1.0),
              ("grid", 2, 6, 1.0), ("bright", 1, 8, 2.0))
    for mode, factor, k, ref_factor in passes:
        n_img = settings.max_stars * factor
        # match the surface densities of the two lists
        n_img = int(min(n_img, len(prob.x), max(10, round(nref / ratio))))
        if mode == "grid" and int(prob.fit_ok.sum()) < 2 * n_img:
            continue  # few stars: the grid would pick about the brightest again
        if ref_factor > 1 and n_img > 30:
            continue  # the deeper reference is for few-star frames (its cost grows fast)
        sel, ref_sel, verify = _pattern_lists(prob, ref_std, ratio, n_img, mode, ref_factor)
        if len(sel) < 3 or len(ref_sel) < 3:
            reasons.append(f"too few stars for a pattern ({len(prob.x)} image, "
                           f"{nref} reference)")
            continue
        key = (tuple(sel), len(ref_sel), k)
        if key in tried:  # a sparse field: the grid pass picks the same stars
            continue
        tried.add(key)
        img = np.column_stack([prob.x[sel] - cx, prob.y[sel] - cy])
        match, why = find_similarity(
            img, ref_sel, verify_xy=verify, scale=prob.scale,
            scale_tolerance=settings.scale_tolerance,
            max_offset=settings.max_pointing_error_arcsec * 1.2 + 0.05 * prob.field_radius,
            radius=radius, search_area=search_area, min_matches=settings.min_matches, k=k,
            extent=(nx / 2.0, ny / 2.0), tight_radius=tight,
            false_alarm=_FALSE_ALARM / len(passes))
        if match is None:
            reasons.append(why)
            continue
        sim = match.transform

        def predict(x, y, sim=sim):
            w = sim.apply(np.column_stack([x - cx, y - cy])) / ARCSEC_PER_DEG
            return deproject(w[:, 0], w[:, 1], *prob.centre)

        start = min(radius, max(tight, 3 * match.rms))
        ref = _refine(prob, predict, settings, start)
        why = _accept(prob, ref, settings)
        if not why:
            return ref, ""
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def _warm(prob: _Problem, previous, settings: Astrometry) -> tuple[Refined | None, str]:
    """Warm start from the field's previous solution, verified before it is trusted.

    The previous solution predicts where the reference stars fall; the shift of this
    frame (dither and pointing error, which scatter from frame to frame) is found by a
    coarse search, a histogram of the offsets of the brightest well-measured image stars
    from the reference stars to the same depth, whose peak must beat chance. The pairs at
    that shift then get an affine fit; the warm start goes on only if the match fraction
    of those bright stars, their number against chance and their rms pass. Only then is
    the full list refined, from a radius the affine rms allows, and checked like any
    other solution. Any failure returns None and a reason: the cold path then runs.
    """
    ny, nx = prob.shape
    scale = prob.scale
    max_shift = settings.max_pointing_error_arcsec / scale
    cand = np.flatnonzero(prob.fit_ok)
    n_img = int(min(len(cand), 2 * settings.max_stars))
    if n_img < 3:
        return None, f"warm start: {n_img} well-measured stars"
    sel = cand[:n_img]
    img = np.column_stack([prob.x[sel], prob.y[sel]])
    # quiet: a catalogue star far outside the frame may lie where a SIP's inverse
    # diverges (finalize stopped on one); those land outside and are not used
    rx, ry = previous.all_world2pix(prob.ref_ra, prob.ref_dec, 0, quiet=True)
    on = (np.isfinite(rx) & np.isfinite(ry) & (rx > -max_shift) & (rx < nx + max_shift)
          & (ry > -max_shift) & (ry < ny + max_shift))
    idx_on = np.flatnonzero(on)  # bright first, like the reference
    ratio_on = (nx + 2 * max_shift) * (ny + 2 * max_shift) / (nx * ny)
    depth = int(sel.max()) + 1
    nsat = 0 if prob.relative else int(prob.saturated[:depth].sum())
    n_ref = int(min(len(idx_on), round((depth + nsat) * ratio_on * 1.5)))
    ref_idx = idx_on[:n_ref]
    ref_pix = np.column_stack([rx[ref_idx], ry[ref_idx]])
    bin_px = max(settings.match_radius_arcsec / scale, 2.0)
    shift, votes = shift_search(img, ref_pix, max_shift=max_shift, bin_size=bin_px)
    # chance: every image-reference pair within max_shift is one offset; the peak collects
    # those within a bin, out of (2 max_shift / bin)^2 places it could have been
    cells = (2 * max_shift / bin_px) ** 2
    expected = len(img) * len(ref_pix) * (2 * bin_px) ** 2 / (ratio_on * nx * ny)
    needed = max(settings.min_matches, poisson_needed(expected, int(cells)))
    if votes < needed:
        return None, (f"warm start: no common shift ({votes} pairs at the best shift, "
                      f"need {needed})")
    # pairs at that shift, an affine fit, and the checks
    radius_px = bin_px
    ii = jj = np.zeros(0, dtype=np.intp)
    aff = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    for r_px in (radius_px, radius_px, 0.5 * radius_px):
        moved = img @ aff[:, :2].T + aff[:, 2]
        ii, jj, _ = match_nearest(moved, ref_pix, r_px)
        if len(ii) < 3:
            break
        aff, _ = fit_affine(img[ii], ref_pix[jj])
    if len(ii) < 3:
        return None, f"warm start: {len(ii)} stars paired at the best shift"
    moved = img @ aff[:, :2].T + aff[:, 2]
    ii, jj, d = match_nearest(moved, ref_pix, 0.5 * radius_px)
    rms = float(np.sqrt(np.mean(d**2))) * scale if len(d) else float("nan")
    inside = (moved[:, 0] > -0.5) & (moved[:, 0] < nx - 0.5) & (moved[:, 1] > -0.5) & (
        moved[:, 1] < ny - 0.5)
    on_frame = (ref_pix[:, 0] > -0.5) & (ref_pix[:, 0] < nx - 0.5) & (ref_pix[:, 1] > -0.5) & (
        ref_pix[:, 1] < ny - 0.5)
    exp_t, need_t = chance_needed(int(inside.sum()), int(on_frame.sum()), nx * ny * 1.0,
                                  0.5 * radius_px, int(cells), fixed=0)
    need_t = max(need_t, settings.min_matches)
    frac = len(ii) / max(min(int(inside.sum()), int(on_frame.sum())), 1)
    lin = aff[:, :2] - np.eye(2)
    corner = float(np.abs(lin).max()) * 0.5 * math.hypot(nx, ny) * scale
    problems = []
    if len(ii) < need_t:
        problems.append(f"{len(ii)} bright stars matched, need {need_t} ({exp_t:.1f} by chance)")
    if frac < 0.3:
        problems.append(f"only {100 * frac:.0f} % of the bright stars matched")
    if not rms <= settings.max_rms_arcsec * 2:
        problems.append(f"bright-star rms {rms:.2f} arcsec")
    if corner > max(settings.neighbour_tolerance_arcsec, 2 * settings.match_radius_arcsec):
        problems.append(f"the frame is rotated or scaled by {corner:.1f} arcsec at the corner "
                        "from the previous solution")
    if problems:
        return None, "warm start: " + ", ".join(problems)

    def predict(x, y):
        xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)]) @ aff[:, :2].T
        return previous.all_pix2world(xy[:, 0] + aff[0, 2], xy[:, 1] + aff[1, 2], 0)

    crpix = tuple(float(c) for c in previous.wcs.crpix)
    start = max(settings.match_radius_arcsec, min(3 * rms + 0.5, radius_px * scale))
    ref = _refine(prob, predict, settings, start, crpix=crpix)
    why = _accept(prob, ref, settings)
    return (ref, "") if not why else (None, f"warm start: {why}")


def _result(prob: _Problem, ref: Refined, *, status: str, method: str) -> AstrometryResult:
    from astropy.table import Table

    wcs = ref.solution.to_wcs()
    wcs.pixel_shape = (prob.shape[1], prob.shape[0])
    ra_c, dec_c = _centre_sky(wcs, prob.shape)
    e, n = project(ra_c, dec_c, *prob.centre)
    e, n = float(e) * ARCSEC_PER_DEG, float(n) * ARCSEC_PER_DEG
    scale, pa, flipped = wcs_geometry(wcs)
    fit = np.flatnonzero(prob.fit_ok)
    src = prob.src_index[fit[ref.img_index]]
    refi = prob.ref_index[ref.ref_index]
    matches = Table({
        "src_index": src, "ref_index": refi,
        "x": prob.x[fit[ref.img_index]], "y": prob.y[fit[ref.img_index]],
        "ra": prob.ref_ra[ref.ref_index], "dec": prob.ref_dec[ref.ref_index],
        "dx_arcsec": -ref.residuals[:, 0], "dy_arcsec": -ref.residuals[:, 1],
    })
    log.debug("astrometry %s/%s: %d stars, rms %.3f arcsec, offset %.1f arcsec", method, status,
              len(src), ref.rms_arcsec, math.hypot(e, n))
    return AstrometryResult(
        wcs=wcs, status=status, method=method, rms_arcsec=float(ref.rms_arcsec),
        nstar=int(len(src)), offset_arcsec=float(math.hypot(e, n)), offset_east_arcsec=e,
        offset_north_arcsec=n, rotation_deg=pa, scale_arcsec=scale, flipped=flipped,
        sip_degree=ref.degree, matches=matches)


def solve_astrometry(sources, *, shape: tuple[int, int], wcs_guess, reference,
                     settings: Astrometry, previous=None) -> AstrometryResult:
    """Match a frame's sources with reference stars and fit a TAN-SIP WCS.

    Parameters
    ----------
    sources : astropy Table
        The frame's sources (:func:`photowatch.stages.sources.extract_sources`):
        ``x, y`` (0-based), ``flux``; ``flags``, ``snr``, ``fwhm`` when present
        (flags exclude stars, snr and fwhm weight them).
    shape : (ny, nx)
        Image shape.
    wcs_guess : astropy WCS
        The first guess (:func:`initial_wcs`): its centre, scale and CRPIX are
        used; its rotation and parity are not trusted.
    reference : astropy Table or None
        Reference stars: ``ra, dec`` (deg) and optionally ``mag`` (or a band
        listed in ``meta['bands']``) or ``flux`` for brightness order.
        ``meta['relative'] = True`` marks a relative reference (another
        frame's sources, :func:`relative_reference`); its solutions get
        ``status='relative'``.
    settings : Astrometry
        ``max_pointing_error_arcsec``, ``scale_tolerance``, ``max_stars``
        (stars per pattern), ``min_matches``, ``match_radius_arcsec``,
        ``sip_degree``, ``clip_sigma``, ``max_rms_arcsec``, ``solve_field``,
        ``solve_field_timeout_s``.
    previous : astropy WCS, optional
        The last solution of the same field, for a warm start.

    Returns
    -------
    AstrometryResult
        ``status='failed'`` with a ``reason`` when no solution passes the
        checks; the WCS is then None.

    Notes
    -----
    A solution is accepted only with at least ``min_matches`` stars, an rms
    of at most ``max_rms_arcsec``, more matches than chance allows (Poisson,
    from the reference density) and a pixel scale within the tolerance.
    ``solve-field`` is the only subprocess a stage runs; it is used only when
    the other matchers fail.
    """
    if reference is None or len(reference) == 0:
        why = "no reference catalogue"
        if settings.solve_field:
            res = _solve_field_only(sources, shape, wcs_guess, settings)
            if res is not None:
                return res
            why += "; solve-field unavailable or failed"
        return AstrometryResult(None, "failed", "none", reason=why)
    status = "relative" if reference.meta.get("relative") else "ok"
    prob = _setup(sources, shape, wcs_guess, reference, settings)
    if isinstance(prob, str):
        return AstrometryResult(None, "failed", "none", reason=prob)
    reasons = []
    if previous is not None:
        ref, why = _warm(prob, previous, settings)
        if ref is not None:
            return _result(prob, ref, status=status, method="warm")
        reasons.append(why)
    ref, why = _pattern(prob, settings)
    if ref is not None:
        return _result(prob, ref, status=status, method="pattern")
    reasons.append(why)
    if settings.solve_field and shutil.which("solve-field"):
        sf_wcs, sf_why = run_solve_field(prob.x, prob.y, shape=shape, scale=prob.scale,
                                         centre=prob.centre, radius_arcsec=prob.search_radius,
                                         settings=settings)
        if sf_wcs is not None:

            def predict(x, y):
                return sf_wcs.all_pix2world(x, y, 0)

            ref = _refine(prob, predict, settings, 3 * settings.match_radius_arcsec)
            why = _accept(prob, ref, settings)
            if not why:
                return _result(prob, ref, status=status, method="solve-field")
            reasons.append(f"solve-field: {why}")
        else:
            reasons.append(f"solve-field: {sf_why}")
    return AstrometryResult(None, "failed", "none", reason="; ".join(r for r in reasons if r))


# ---------------------------------------------------------------------------
# astrometry.net fallback


def run_solve_field(x, y, *, shape, scale: float, centre: tuple[float, float],
                    radius_arcsec: float, settings: Astrometry,
                    workdir: str | os.PathLike | None = None):
    """Run astrometry.net's ``solve-field`` on an xylist; returns (WCS or None, reason).

    ``x``, ``y`` are 0-based and brightest first; the xylist holds 1-based
    FITS positions. The run is limited to ``settings.solve_field_timeout_s``
    (CPU limit and wall-clock timeout). The returned WCS uses 0-based pixels
    like every astropy WCS.
    """
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    exe = shutil.which("solve-field")
    if exe is None:
        return None, "solve-field is not on PATH"
    ny, nx = shape
    n = min(len(x), 500)
    with tempfile.TemporaryDirectory(prefix="pw-solve-", dir=workdir) as tmp:
        tmpdir = Path(tmp)
        xyl = tmpdir / "sources.xyls"
        table = Table({"X": np.asarray(x[:n], dtype=np.float64) + 1.0,
                       "Y": np.asarray(y[:n], dtype=np.float64) + 1.0,
                       "FLUX": np.arange(n, 0, -1, dtype=np.float64)})
        table.write(xyl, format="fits", overwrite=True)
        out = tmpdir / "solution.wcs"
        tol = settings.scale_tolerance
        limit = settings.solve_field_timeout_s
        cmd = [exe, str(xyl), "--overwrite", "--no-plots", "--no-remove-lines",
               "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
               "--width", str(nx), "--height", str(ny),
               "--scale-units", "arcsecperpix", "--scale-low", f"{scale * (1 - tol):.5f}",
               "--scale-high", f"{scale * (1 + tol):.5f}",
               "--ra", f"{centre[0]:.6f}", "--dec", f"{centre[1]:.6f}",
               "--radius", f"{radius_arcsec / ARCSEC_PER_DEG:.4f}",
               "--cpulimit", str(int(math.ceil(limit))), "--dir", str(tmpdir),
               "--wcs", str(out), "--new-fits", "none", "--tweak-order", "2"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + 10,
                                  cwd=tmpdir)
        except subprocess.TimeoutExpired:
            return None, f"solve-field timed out after {limit:.0f} s"
        except OSError as exc:
            return None, f"solve-field could not run: {exc}"
        if not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            return None, f"solve-field found no solution (exit {proc.returncode}) {tail[0]}"
        with warnings.catch_warnings():  # a header-only file: "more axes than the image"
            warnings.simplefilter("ignore")
            header = fits.getheader(out)
            wcs = WCS(header, relax=True)
        if not wcs.has_celestial:
            return None, "solve-field wrote no celestial WCS"
        return wcs.celestial, ""


def _solve_field_only(sources, shape, wcs_guess, settings) -> AstrometryResult | None:
    """solve-field with no reference catalogue: its own verification is all there is."""
    if not shutil.which("solve-field") or len(sources) < 4:
        return None
    flux = _column(sources, "flux", np.ones(len(sources)))
    order = np.argsort(-np.where(np.isfinite(flux), flux, -np.inf))
    x = _column(sources, "x")[order]
    y = _column(sources, "y")[order]
    scale, _, _ = wcs_geometry(wcs_guess)
    centre = _centre_sky(wcs_guess, shape)
    ny, nx = shape
    radius = 0.5 * math.hypot(nx, ny) * scale + settings.max_pointing_error_arcsec
    wcs, why = run_solve_field(x, y, shape=shape, scale=scale, centre=centre,
                               radius_arcsec=radius, settings=settings)
    if wcs is None:
        return None
    ra_c, dec_c = _centre_sky(wcs, shape)
    e, n = project(ra_c, dec_c, *centre)
    e, n = float(e) * ARCSEC_PER_DEG, float(n) * ARCSEC_PER_DEG
    s, pa, flipped = wcs_geometry(wcs)
    return AstrometryResult(wcs=wcs, status="ok", method="solve-field", nstar=0,
                            offset_arcsec=math.hypot(e, n), offset_east_arcsec=e,
                            offset_north_arcsec=n, rotation_deg=pa, scale_arcsec=s,
                            flipped=flipped, sip_degree=0,
                            reason="verified by astrometry.net only (no reference catalogue)")


# ---------------------------------------------------------------------------
# apply


def radec_for(sources, wcs):
    """A copy of a source table with ``ra``/``dec`` (deg) computed from ``wcs``.

    ``x``/``y`` are 0-based. With ``wcs=None`` the columns are NaN.
    """
    out = sources.copy()
    n = len(out)
    if wcs is None or n == 0:
        out["ra"] = np.full(n, np.nan)
        out["dec"] = np.full(n, np.nan)
    else:
        ra, dec = wcs.all_pix2world(np.asarray(out["x"], float), np.asarray(out["y"], float), 0)
        out["ra"] = ra
        out["dec"] = dec
    out["ra"].unit = "deg"
    out["dec"].unit = "deg"
    return out


def relative_reference(sources, wcs):
    """A relative reference from a frame's sources and WCS (for later frames of its field).

    Keeps sources usable for fitting, computes ``ra``/``dec`` with ``wcs``,
    sorts bright first and sets ``meta['relative'] = True``.
    """
    table = radec_for(sources, wcs)
    if "flags" in table.colnames:
        table = table[(np.asarray(table["flags"]) & _BAD_FOR_FIT) == 0]
    if "flux" in table.colnames:
        table = table[np.argsort(-np.nan_to_num(np.asarray(table["flux"], float),
                                                nan=-np.inf), kind="stable")]
    table.meta["relative"] = True
    return table


def wcs_cards(wcs):
    """FITS cards of a WCS with a CD matrix (as PhotoPipe, SCAMP and SWarp write it).

    astropy writes PCi_j and CDELTi; the CD form is what older tools expect.
    """
    hdr = wcs.to_header(relax=True)
    for key in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREFI", "MJDREFF", "WCSNAME", "MJDREF"):
        hdr.remove(key, ignore_missing=True)
    cd = np.asarray(wcs.pixel_scale_matrix)
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        hdr.remove(key, ignore_missing=True)
    for i in range(2):
        for j in range(2):
            hdr.insert("CRVAL1", (f"CD{i + 1}_{j + 1}", float(cd[i, j]),
                                  "[deg/px] linear transformation matrix"))
    return hdr


def add_mjd_obs(header) -> None:
    """MJD-OBS from DATE-OBS when missing, as WCS readers (astropy, DS9) otherwise add it
    themselves with a warning on every read."""
    if "MJD-OBS" in header or "DATE-OBS" not in header:
        return
    from astropy.time import Time

    try:
        mjd = Time(str(header["DATE-OBS"]).strip(), scale="utc").mjd
    except ValueError:
        return
    header.set("MJD-OBS", round(float(mjd), 8), "[d] MJD of DATE-OBS", after="DATE-OBS")


def apply_astrometry(frame: Frame, result: AstrometryResult, *, reference_name: str) -> Frame:
    """A new frame whose header holds the solution (or the failure) of ``result``.

    Writes the TAN-SIP WCS (``CTYPE1 = 'RA---TAN-SIP'``; any older WCS removed)
    and ASTRMS (arcsec), ASTNSTAR, ASTREF (``reference_name``), WCSSOLVE (the
    method), ASTOFFS (arcsec), ASTSTAT (ok/relative/failed) and ASTREASN. A
    failed result leaves no WCS in the header.
    """
    header = frame.header.copy()
    strip_wcs(header)
    for key in ("ASTRMS", "ASTNSTAR", "ASTOFFS", "ASTREASN"):
        header.remove(key, ignore_missing=True)
    if result.wcs is not None and result.status != "failed":
        header.update(wcs_cards(result.wcs))
        add_mjd_obs(header)
        set_key(header, "ASTRMS", float(result.rms_arcsec), "[arcsec] astrometric rms")
        set_key(header, "ASTNSTAR", int(result.nstar), "stars in the astrometric fit")
        set_key(header, "ASTOFFS", float(result.offset_arcsec),
                "[arcsec] solved centre - header pointing")
    set_key(header, "ASTREF", reference_name, "astrometric reference")
    set_key(header, "WCSSOLVE", result.method, "astrometric method")
    set_key(header, "ASTSTAT", result.status, "astrometry: ok, relative or failed")
    reason = ("suspect: " if result.suspect and not result.reason.startswith("suspect") else "") \
        + result.reason
    if reason:
        set_key(header, "ASTREASN", reason, "astrometry note")
    return frame.replace(header=header)


# ---------------------------------------------------------------------------
# consistency within a field


def check_neighbours(result: AstrometryResult, previous_results, *, shape: tuple[int, int],
                     tolerance_arcsec: float,
                     pointing_tolerance_arcsec: float | None = None) -> AstrometryResult:
    """Flag a solution that disagrees with the other solutions of its field.

    Compares with the median of ``previous_results`` (usable solutions of the
    same field and camera): the pointing error (solved minus header centre,
    east and north), the rotation and the scale, each expressed as a
    displacement at the image corner (arcsec), and the parity. A difference
    above ``tolerance_arcsec`` returns a copy with ``suspect=True`` and the
    reason; otherwise ``result`` itself. The header pointing must follow the
    dithers for the pointing comparison to be meaningful; it has its own
    tolerance, ``pointing_tolerance_arcsec`` (default ``tolerance_arcsec``),
    since a telescope's pointing error scatters from one frame to the next
    while rotation, scale and parity do not.
    """
    prev = [r for r in previous_results if r is not None and r.ok]
    if not result.ok or not prev:
        return result
    ny, nx = shape
    corner = 0.5 * math.hypot(nx, ny) * result.scale_arcsec
    east = float(np.median([r.offset_east_arcsec for r in prev]))
    north = float(np.median([r.offset_north_arcsec for r in prev]))
    drot = np.array([((result.rotation_deg - r.rotation_deg + 180) % 360) - 180 for r in prev])
    rot = float(np.median(drot))
    scale = float(np.median([r.scale_arcsec for r in prev]))
    flips = [r.flipped for r in prev]
    problems = []
    d_point = math.hypot(result.offset_east_arcsec - east, result.offset_north_arcsec - north)
    if d_point > (tolerance_arcsec if pointing_tolerance_arcsec is None
                  else pointing_tolerance_arcsec):
        problems.append(f"pointing differs by {d_point:.1f} arcsec")
    d_rot = abs(math.radians(rot)) * corner
    if d_rot > tolerance_arcsec:
        problems.append(f"rotation differs by {rot:.3f} deg ({d_rot:.1f} arcsec at the corner)")
    d_scale = abs(result.scale_arcsec / scale - 1) * corner if scale > 0 else 0.0
    if d_scale > tolerance_arcsec:
        problems.append(f"scale differs by {100 * (result.scale_arcsec / scale - 1):.2f} % "
                        f"({d_scale:.1f} arcsec at the corner)")
    if sum(flips) * 2 > len(flips) and not result.flipped or \
            sum(flips) * 2 < len(flips) and result.flipped:
        problems.append("parity differs")
    if not problems:
        return result
    why = (f"suspect: disagrees with {len(prev)} solutions of the field: "
           + ", ".join(problems))
    return dataclasses.replace(result, suspect=True,
                               reason=(result.reason + "; " if result.reason else "") + why)


__all__ = ["AstrometryResult", "apply_astrometry", "check_neighbours", "initial_wcs",
           "radec_for", "relative_reference", "run_solve_field", "solve_astrometry",
           "wcs_cards", "wcs_geometry"]
