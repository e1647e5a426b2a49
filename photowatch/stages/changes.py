"""Changes: a frame's calibrated sources against the field's reference; moving sources linked.

:func:`find_candidates` compares the calibrated source table (CAT) of one
reduced frame with the field's reference (the reference catalogue's stars,
``ra, dec, mag, magerr``; see :func:`reference_limit` for how deep it is
trusted) and returns the candidates:

- **new**: no reference star within the match radius, significant in the
  frame (S/N >= ``min_snr``, i.e. above the frame's 5 sigma limit) and
  brighter than the reference's limit by ``new_margin_mag`` plus
  ``new_sigma`` of its own error (a source the reference could not have
  seen is not "missing" from it);
- **varying**: matched, and ``|mag - ref_mag| / sqrt(magerr^2 + ref_err^2 +
  floor^2)`` >= ``vary_sigma``, with a star-like shape (not more elongated than
  the frame's stars by ``vary_max_extra_ellipticity``), an uncrowded aperture,
  and, for a brightening, beyond the light of one star at the reference's limit
  hidden in the aperture (the reference cannot know of it).

Artefacts are filtered first, from the MASK plane and the source flags: a
bad or no-data pixel (bits 1, 8, 16) in the core, a cosmic-ray-cleaned pixel
(bit 4) in the core, a saturated pixel or bleed (bit 2) within
``saturation_radius_fwhm``, the frame edge within ``edge_fwhm``; and shape:
sharper than a star (hot pixel, cosmic residual), much wider than the PSF, or
elongated.

:func:`link_tracks` then takes all the night's "new" detections of one field
(time, ra, dec) and links those consistent with one constant-rate motion into
a moving track (an asteroid: one track, not a candidate per frame); the rest
are grouped by position into stationary objects.

Pure functions: no files, no store. Conventions: pixels 0-based, mags AB as in
CAT; rates in arcsec per minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from photowatch.core.config import Changes
from photowatch.core.frame import Mask

#: source flags (photowatch.stages.sources.SourceFlag) that make a detection an artefact:
#: SATURATED 1, MASKED 2, COSMIC 4, EDGE 8, CENTROID 32, BADFLUX 64, SHARP 128
ARTEFACT_FLAGS = 1 | 2 | 4 | 8 | 32 | 64 | 128


#: the thresholds (``[changes]``): :class:`photowatch.core.config.Changes`
ChangeSettings = Changes
_DEFAULTS = Changes()


@dataclass
class Candidates:
    """What :func:`find_candidates` found, and what it turned away (counts by reason)."""

    table: object  #: astropy Table, one row per candidate
    rejected: dict = field(default_factory=dict)
    reference_limit: float = math.nan
    limmag: float = math.nan


def reference_limit(mags: np.ndarray, bin_mag: float = 0.25) -> float:
    """The magnitude to which a reference catalogue is complete: the faint edge of the
    busiest bin of its magnitude histogram (counts rise with magnitude until the
    catalogue runs out, so the turnover marks its depth)."""
    m = np.asarray(mags, float)
    m = m[np.isfinite(m)]
    if m.size < 10:
        return float(np.max(m)) if m.size else math.nan
    edges = np.arange(math.floor(m.min()), m.max() + bin_mag + 1e-9, bin_mag)
    counts, edges = np.histogram(m, bins=edges)
    return float(min(edges[int(np.argmax(counts)) + 1], m.max()))


def frame_limit(cat, snr: float = 5.0) -> float:
    """The frame's point-source ``snr``-sigma limit from its own catalogue: the relation of
    magnitude with log S/N of its faint unflagged sources, evaluated at ``snr``.

    A stand-in until LIMMAG (lane live) is in every product's header; NaN without a
    calibrated catalogue."""
    mag = np.asarray(cat["mag"], float)
    s = np.asarray(cat["snr"], float) if "snr" in cat.colnames else \
        1.0857 / np.asarray(cat["magerr"], float)
    flags = np.asarray(cat["flags"], int) if "flags" in cat.colnames else np.zeros(len(mag), int)
    ok = np.isfinite(mag) & np.isfinite(s) & (s > 3) & (s < 50) & (flags == 0)
    if ok.sum() < 10:
        return math.nan
    x, y = np.log10(s[ok]), mag[ok]
    a, b = np.polyfit(x, y, 1)
    return float(a * math.log10(snr) + b)


def _mask_max(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float, bits: int):
    """For each position: does a pixel within ``radius`` carry one of ``bits``?"""
    ny, nx = mask.shape
    r = int(math.ceil(radius))
    hit = np.zeros(x.size, bool)
    # window by window: the candidates are few, the frame is 16 Mpx at 4k
    for i, (cx, cy) in enumerate(zip(np.rint(x).astype(int), np.rint(y).astype(int))):
        x0, x1 = max(cx - r, 0), min(cx + r + 1, nx)
        y0, y1 = max(cy - r, 0), min(cy + r + 1, ny)
        if x0 >= x1 or y0 >= y1:
            hit[i] = True
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius
        hit[i] = bool(((mask[y0:y1, x0:x1] & bits) != 0)[disk].any())
    return hit


def artefacts(cat, mask: np.ndarray | None, fwhm_px: float,
              settings: ChangeSettings = _DEFAULTS) -> dict[str, np.ndarray]:
    """Per source, why it is an artefact (boolean arrays by reason; none set: a real source)."""
    n = len(cat)
    x = np.asarray(cat["x"], float)
    y = np.asarray(cat["y"], float)
    flags = np.asarray(cat["flags"], int) if "flags" in cat.colnames else np.zeros(n, int)
    fwhm = np.asarray(cat["fwhm"], float) if "fwhm" in cat.colnames else np.full(n, fwhm_px)
    ell = np.asarray(cat["ellipticity"], float) if "ellipticity" in cat.colnames \
        else np.zeros(n)
    out = {"flagged": (flags & ARTEFACT_FLAGS) != 0}
    if np.isfinite(fwhm_px) and fwhm_px > 0:
        out["shape"] = ~((fwhm >= settings.min_fwhm_ratio * fwhm_px)
                         & (fwhm <= settings.max_fwhm_ratio * fwhm_px)
                         & (ell <= settings.max_ellipticity))
    else:
        fwhm_px = 3.0
    if mask is not None:
        ny, nx = mask.shape
        edge = settings.edge_fwhm * fwhm_px
        out["edge"] = (x < edge) | (y < edge) | (x > nx - 1 - edge) | (y > ny - 1 - edge)
        core = max(2.0, fwhm_px)
        out["mask_core"] = _mask_max(mask, x, y, core,
                                     int(Mask.BAD | Mask.COSMIC | Mask.LOWFLAT))
        out["nodata"] = _mask_max(mask, x, y, edge, int(Mask.NODATA))
        out["saturation"] = _mask_max(mask, x, y, settings.saturation_radius_fwhm * fwhm_px,
                                      int(Mask.SATURATED))
    return out


def find_candidates(cat, reference, *, mask: np.ndarray | None, fwhm_px: float,
                    pixel_scale_arcsec: float, ref_limit: float | None = None,
                    limmag: float | None = None, covered: np.ndarray | None = None,
                    settings: ChangeSettings = _DEFAULTS) -> Candidates:
    """New and varying sources of one calibrated frame (see the module docstring).

    ``cat``: the frame's CAT (x, y, ra, dec, mag, magerr, snr, fwhm, ellipticity, flags);
    ``reference``: ra, dec, mag, magerr of the field's reference stars in the frame's band;
    ``ref_limit``: the reference's depth (default :func:`reference_limit` of its mags);
    ``limmag``: the frame's 5 sigma limit (LIMMAG; default :func:`frame_limit`);
    ``covered``: per source, is it where the reference reaches its full depth (a coadd's
    footprint; None: everywhere, as a catalogue).
    """
    from astropy.table import Table
    from scipy.spatial import cKDTree

    columns = ["x", "y", "ra", "dec", "mag", "magerr", "snr", "ref_mag", "ref_magerr",
               "ref_sep_arcsec", "delta_mag", "significance", "kind"]
    empty = Table(names=columns, dtype=["f8"] * 12 + ["U8"])
    rejected: dict[str, int] = {}
    mag = np.asarray(cat["mag"], float) if len(cat) else np.zeros(0)
    ok = np.isfinite(mag) & np.isfinite(np.asarray(cat["ra"], float) if len(cat) else mag)
    if not ok.any() or reference is None:
        return Candidates(empty, {"uncalibrated": int((~ok).sum())})
    if ref_limit is None or not np.isfinite(ref_limit):
        ref_limit = reference_limit(np.asarray(reference["mag"], float))
    if limmag is None or not np.isfinite(limmag):
        limmag = frame_limit(cat)

    # match on the tangent plane around the frame's sources (arcsec)
    ra = np.asarray(cat["ra"], float)
    dec = np.asarray(cat["dec"], float)
    ra0, dec0 = float(np.nanmedian(ra[ok])), float(np.nanmedian(dec[ok]))
    cosd = math.cos(math.radians(dec0))

    def plane(r, d):
        return np.column_stack([((np.asarray(r) - ra0 + 180) % 360 - 180) * cosd * 3600,
                                (np.asarray(d) - dec0) * 3600])

    rmag = np.asarray(reference["mag"], float)
    rerr = np.asarray(reference["magerr"], float) if "magerr" in reference.colnames \
        else np.zeros(rmag.size)
    rerr = np.where(np.isfinite(rerr), rerr, 0.0)
    radius = max(settings.match_radius_arcsec,
                 settings.match_radius_fwhm * fwhm_px * pixel_scale_arcsec
                 if np.isfinite(fwhm_px) else 0.0)
    rxy = plane(reference["ra"], reference["dec"])
    tree = cKDTree(rxy)
    xy = plane(np.where(ok, ra, ra0), np.where(ok, dec, dec0))
    dist, idx = tree.query(xy, distance_upper_bound=radius)
    matched = np.isfinite(dist) & ok
    snr = np.asarray(cat["snr"], float) if "snr" in cat.colnames else \
        1.0857 / np.asarray(cat["magerr"], float)
    err = np.asarray(cat["magerr"], float)
    ell_all = np.asarray(cat["ellipticity"], float) if "ellipticity" in cat.colnames \
        else np.zeros(len(cat))
    flags = np.asarray(cat["flags"], int) if "flags" in cat.colnames else np.zeros(len(cat), int)
    j = np.where(matched, idx, 0)
    # each reference star belongs to its nearest frame source within the blend radius; a
    # source is compared with the summed flux of its stars (the frame may not resolve a
    # pair the catalogue does)
    fwhm_as = fwhm_px * pixel_scale_arcsec if np.isfinite(fwhm_px) else radius
    rflux = np.where(np.isfinite(rmag), 10 ** (-0.4 * np.where(np.isfinite(rmag), rmag, 99)),
                     0.0)
    blend_r = max(radius, settings.blend_radius_fwhm * fwhm_as)
    okidx = np.flatnonzero(ok)
    owner_d, owner = cKDTree(xy[okidx]).query(rxy, distance_upper_bound=blend_r)
    owned = np.isfinite(owner_d)
    owner = okidx[np.where(owned, owner, 0)]
    fsum = np.bincount(owner[owned], weights=rflux[owned], minlength=len(cat))
    vsum = np.bincount(owner[owned], weights=(rflux * rerr)[owned] ** 2, minlength=len(cat))
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_m = np.where(matched & (fsum > 0), -2.5 * np.log10(np.where(fsum > 0, fsum, 1)),
                         np.nan)
        ref_e = np.where(matched & (fsum > 0), np.sqrt(vsum) / np.where(fsum > 0, fsum, 1),
                         np.nan)
    delta = mag - ref_m
    # a star just below the reference's limit, unresolved in the aperture, is invisible to
    # the reference and brightens the source: a brightening counts beyond that much light
    f_meas = 10 ** (-0.4 * np.where(np.isfinite(mag), mag, 99.0))
    f_hidden = 10 ** (-0.4 * ref_limit) if np.isfinite(ref_limit) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        m_adj = np.where(delta < 0, -2.5 * np.log10(np.maximum(f_meas - f_hidden, 1e-30)), mag)
        d_adj = np.where(delta < 0, np.minimum(m_adj - ref_m, 0.0), delta)
        vary_sig = np.abs(d_adj) / np.sqrt(err ** 2 + ref_e ** 2 + settings.vary_floor_mag ** 2)

    # the photometric tests first (cheap, vectorised); the artefact, shape and crowding cuts
    # only for the few sources that pass them
    new = ok & ~matched & (snr >= settings.min_snr)
    # found by the sources' PSF-matched pass only (SourceFlag.FAINT, 1024): below ~11
    # sigma a source unmatched to a reference complete to r_lim is as often two or three
    # stars just below r_lim unresolved together (4k sims: 1.5 per frame) as anything new
    faint = (flags & 1024) != 0
    rejected["faint_pass"] = int((new & faint).sum())
    new &= ~faint
    if np.isfinite(limmag):
        new &= mag <= limmag + settings.new_margin_mag  # ~5 sigma; LIMMAG is one figure per frame
    deep_enough = mag + settings.new_sigma * err <= ref_limit - settings.new_margin_mag
    rejected["fainter_than_reference"] = int((new & ~deep_enough).sum())
    new &= deep_enough
    if covered is not None:
        rejected["outside_reference"] = int((new & ~covered).sum())
        new &= np.asarray(covered, bool)
    varying = matched & np.isfinite(ref_m) & (vary_sig >= settings.vary_sigma)
    rows = np.flatnonzero(new | varying)
    bad = artefacts(cat[rows] if rows.size else cat[:0], mask, fwhm_px, settings)
    artefact = np.zeros(len(cat), bool)
    for why, hit in bad.items():
        rejected[why] = int((hit & ~artefact[rows]).sum())
        artefact[rows[hit]] = True
    # a varying source must own its aperture: no second reference star of note of its own
    # (a blend the frame did not resolve), none of another source's within the aperture
    # (radius crowd_radius_fwhm, farther for brighter stars: their wings), and a stellar
    # shape (an unresolved neighbour stretches the image and brightens it); a new source
    # close to a brighter star may be a piece of it (deblending, wings)
    primary = np.where(matched, rflux[j], 0.0)
    crowded = matched & (fsum > (1.0 + settings.max_blend_fraction) * primary)
    close = np.zeros(len(cat), bool)
    crowd_r = settings.crowd_radius_fwhm * fwhm_as
    new_r = settings.new_crowd_radius_fwhm * fwhm_as
    mine = np.full(rmag.size, -1)
    mine[owned] = owner[owned]
    for i in rows[~artefact[rows]]:
        near = np.asarray(tree.query_ball_point(xy[i], crowd_r * 4.0), int)
        near = near[mine[near] != i]
        if near.size == 0:
            continue
        dm = mag[i] - rmag[near]
        d = np.hypot(*(rxy[near] - xy[i]).T)
        reach = 10 ** (0.067 * np.clip(dm, 0, 20))
        crowded[i] |= bool(np.any((dm > -settings.crowd_dmag) & (d < crowd_r * reach)))
        close[i] = bool(np.any((dm > 0) & (d < new_r * reach)))
    bright = matched & (flags == 0) & (snr >= 20)
    ell_med = float(np.nanmedian(ell_all[bright])) if bright.sum() >= 5 else 0.1
    elongated = ell_all > ell_med + settings.vary_max_extra_ellipticity
    varying &= ~artefact
    new &= ~artefact
    # sep split it from a neighbour: its flux depends on the deblending (BLENDED, 16)
    crowded |= (flags & 16) != 0
    rejected["crowded"] = int((varying & crowded).sum())
    rejected["elongated"] = int((varying & ~crowded & elongated).sum())
    rejected["near_brighter"] = int((new & close).sum())
    varying &= ~crowded & ~elongated
    new &= ~close
    kind = np.where(new, "new", np.where(varying, "varying", ""))
    keep = kind != ""
    sig = np.where(new, snr, vary_sig)
    t = Table({
        "x": np.asarray(cat["x"], float)[keep], "y": np.asarray(cat["y"], float)[keep],
        "ra": ra[keep], "dec": dec[keep], "mag": mag[keep], "magerr": err[keep],
        "snr": snr[keep], "ref_mag": ref_m[keep], "ref_magerr": ref_e[keep],
        "ref_sep_arcsec": np.where(matched, dist, np.nan)[keep], "delta_mag": delta[keep],
        "significance": sig[keep], "kind": kind[keep].astype("U8"),
    })
    return Candidates(t, rejected, float(ref_limit), float(limmag))


# ---------------------------------------------------------------------------- linking

@dataclass(frozen=True)
class Track:
    """Detections (indices into the input) on one constant-rate path."""

    members: tuple[int, ...]
    moving: bool
    rate_ra_arcsec_min: float  #: east, on the sky (RA * cos dec)
    rate_dec_arcsec_min: float
    rms_arcsec: float

    @property
    def rate_arcsec_min(self) -> float:
        return math.hypot(self.rate_ra_arcsec_min, self.rate_dec_arcsec_min)


def _fit(t, xy):
    """Least-squares constant-rate path; returns (position at t, rate, residual norms)."""
    tm = t.mean()
    a = np.column_stack([np.ones_like(t), t - tm])
    coef, *_ = np.linalg.lstsq(a, xy, rcond=None)
    res = np.hypot(*(xy - a @ coef).T)
    return coef, res


def link_tracks(t_min: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                settings: ChangeSettings = _DEFAULTS) -> list[Track]:
    """Group detections (times in minutes, positions in degrees) into moving tracks and
    stationary objects; every detection belongs to exactly one returned group.

    Moving tracks first: each pair of detections at different times and a rate below
    ``max_rate_arcsec_min`` predicts where the others should be; the hypothesis with most
    detections within ``link_tolerance_arcsec`` (at most one per time) is refitted and kept
    if it has ``min_track_points`` detections and moved at least ``min_motion_arcsec``.
    Seed pairs must be ``min_motion_arcsec`` apart, so a static object never seeds one.
    What is left is grouped by position (friends of friends within the larger of
    ``link_tolerance_arcsec`` and ``match_radius_arcsec``) into stationary objects.
    """
    t = np.asarray(t_min, float)
    n = t.size
    if n == 0:
        return []
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    cosd = math.cos(math.radians(dec0))
    xy = np.column_stack([((ra - ra0 + 180) % 360 - 180) * cosd * 3600, (dec - dec0) * 3600])
    tol = settings.link_tolerance_arcsec
    free = np.ones(n, bool)
    groups: list[Track] = []
    times = np.unique(t)
    while free.sum() >= settings.min_track_points and times.size >= settings.min_track_points:
        idx = np.flatnonzero(free)
        best: tuple[int, float, np.ndarray] | None = None
        for a_pos, i in enumerate(idx):
            for k in idx[a_pos + 1:]:
                dt = t[k] - t[i]
                if dt == 0:
                    continue
                rate = (xy[k] - xy[i]) / dt
                # a seed pair has moved (a static object's detections never seed a track)
                if math.hypot(*(xy[k] - xy[i])) < settings.min_motion_arcsec \
                        or math.hypot(*rate) > settings.max_rate_arcsec_min:
                    continue
                pred = xy[i] + np.outer(t[idx] - t[i], rate)
                d = np.hypot(*(xy[idx] - pred).T)
                near = d <= tol
                # at most one detection per time: the nearest
                chosen = []
                for tt in np.unique(t[idx][near]):
                    cand = np.flatnonzero(near & (t[idx] == tt))
                    chosen.append(idx[cand[np.argmin(d[cand])]])
                chosen_arr = np.array(sorted(chosen), int)
                score = (chosen_arr.size, -float(np.sum(d[np.isin(idx, chosen_arr)])))
                if best is None or score > (best[0], best[1]):
                    best = (score[0], score[1], chosen_arr)
        if best is None or best[0] < settings.min_track_points:
            break
        members = best[2]
        coef, res = _fit(t[members], xy[members])
        # refit may pull in or push out a point: keep those within tolerance of the fit
        span = t[members].max() - t[members].min()
        motion = math.hypot(*coef[1]) * span
        if motion < settings.min_motion_arcsec or res.max() > tol:
            break  # the best hypothesis is static (or poor): leave the rest to grouping
        groups.append(Track(tuple(int(m) for m in members), True, float(coef[1][0]),
                            float(coef[1][1]), float(np.sqrt(np.mean(res ** 2)))))
        free[members] = False
    # stationary: friends-of-friends within the tolerance (or 1 arcsec, the larger)
    radius = max(tol, settings.match_radius_arcsec)
    left = np.flatnonzero(free)
    label = -np.ones(n, int)
    for i in left:
        if label[i] >= 0:
            continue
        label[i] = i
        stack = [i]
        while stack:
            j = stack.pop()
            d = np.hypot(*(xy[left] - xy[j]).T)
            for k in left[(d <= radius) & (label[left] < 0)]:
                label[k] = i
                stack.append(k)
    for root in np.unique(label[left]):
        members = np.flatnonzero(label == root)
        pos = xy[members]
        rms = float(np.sqrt(np.mean(np.sum((pos - pos.mean(0)) ** 2, axis=1))))
        groups.append(Track(tuple(int(m) for m in members), False, 0.0, 0.0, rms))
    return groups


def track_position(track: Track, t_min: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                   at_min: float) -> tuple[float, float]:
    """Where a track is (ra, dec in degrees) at time ``at_min`` (its fit, extrapolated)."""
    m = np.asarray(track.members)
    ra_m, dec_m = np.asarray(ra, float)[m], np.asarray(dec, float)[m]
    r0, d0 = float(ra_m.mean()), float(dec_m.mean())
    cosd = math.cos(math.radians(d0))
    xy = np.column_stack([((ra_m - r0 + 180) % 360 - 180) * cosd * 3600, (dec_m - d0) * 3600])
    tt = np.asarray(t_min, float)[m]
    coef, _ = _fit(tt, xy)
    p = coef[0] + coef[1] * (at_min - tt.mean())
    return (r0 + p[0] / 3600 / cosd) % 360.0, d0 + p[1] / 3600


__all__ = ["ChangeSettings", "Candidates", "Track", "find_candidates", "link_tracks",
           "reference_limit", "frame_limit", "artefacts", "track_position"]
