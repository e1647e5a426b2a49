"""Frame quality: whether a reduced frame may enter its coadd, with the measured reason.

A rejected frame keeps its reduced product; it only stays out of the coadd.
Checks (thresholds in ``[quality]``, PhotoPipe's where it had them):

- astrometry failed (no WCS to stack with);
- clouds: zero point per second more than ``max_zp_drop_mag`` below the
  night's best for the filter (without a catalogue: the relative transparency
  from the flux scale);
- flux scale beyond PhotoPipe's ``min_flux_scale`` limit;
- seeing or focus: median FWHM above ``max_fwhm_arcsec``, or more than
  ``max_fwhm_ratio`` times the median of the night's other frames of the filter;
- trailing: median ellipticity above ``max_ellipticity``;
- sky brighter than ``max_sky_e_per_s``;
- too few stars for the photometric calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from photowatch.core.config import Quality


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None
    checks: tuple = ()  #: (name, value, limit, passed)


def _finite(v) -> bool:
    return v is not None and isinstance(v, int | float) and math.isfinite(v)


def assess(qc: dict, *, best_transparency_mag: float | None, settings: Quality,
           night_fwhm_arcsec: float | None = None) -> Verdict:
    """Judge a frame from its measured quality numbers.

    Parameters
    ----------
    qc
        the frame's measurements: ``aststat``, ``astreason``, ``zp_per_s`` (absolute) or
        ``transparency_mag`` (relative: −2.5 log10 of flux per second relative to the
        field's reference), ``flxscale``, ``fwhm_arcsec``, ``ellipticity``,
        ``sky_e_per_s``, ``phot_n``, ``phot_status``, ``phot_reason``
    best_transparency_mag
        the night's best (largest) zero point per second of the filter, or, in
        relative mode, the best relative transparency (same scale as ``qc``)
    night_fwhm_arcsec
        the median FWHM of the night's other frames of the filter (None: too few)
    """
    checks = []
    reasons = []
    if qc.get("aststat") == "failed":
        reasons.append(f"astrometry failed: {qc.get('astreason') or 'no solution'}")
    trans = qc.get("zp_per_s") if _finite(qc.get("zp_per_s")) else qc.get("transparency_mag")
    if _finite(trans) and _finite(best_transparency_mag):
        drop = best_transparency_mag - trans
        ok = drop <= settings.max_zp_drop_mag
        checks.append(("transparency_drop_mag", round(drop, 3), settings.max_zp_drop_mag, ok))
        if not ok:
            reasons.append(f"clouds: zero point {drop:.2f} mag below the night's best "
                           f"(limit {settings.max_zp_drop_mag:g})")
    if _finite(qc.get("flxscale")):
        inv = 1.0 / qc["flxscale"] if qc["flxscale"] > 0 else 0.0
        ok = inv >= settings.min_flux_scale
        checks.append(("flux_scale", round(inv, 4), settings.min_flux_scale, ok))
        if not ok:
            reasons.append(f"flux scale {inv:.3f} below {settings.min_flux_scale:g}")
    if _finite(qc.get("fwhm_arcsec")):
        ok = qc["fwhm_arcsec"] <= settings.max_fwhm_arcsec
        checks.append(("fwhm_arcsec", round(qc["fwhm_arcsec"], 3), settings.max_fwhm_arcsec, ok))
        if not ok:
            reasons.append(f"seeing/focus: FWHM {qc['fwhm_arcsec']:.2f}\" above "
                           f"{settings.max_fwhm_arcsec:g}\"")
    if _finite(qc.get("fwhm_arcsec")) and _finite(night_fwhm_arcsec) and night_fwhm_arcsec > 0:
        ratio = qc["fwhm_arcsec"] / night_fwhm_arcsec
        ok = ratio <= settings.max_fwhm_ratio
        checks.append(("fwhm_ratio", round(ratio, 3), settings.max_fwhm_ratio, ok))
        if not ok:
            reasons.append(f"out of focus: FWHM {qc['fwhm_arcsec']:.2f}\" is {ratio:.1f} x the "
                           f"night's median {night_fwhm_arcsec:.2f}\" (limit "
                           f"{settings.max_fwhm_ratio:g})")
    if _finite(qc.get("ellipticity")):
        ok = qc["ellipticity"] <= settings.max_ellipticity
        checks.append(("ellipticity", round(qc["ellipticity"], 3), settings.max_ellipticity, ok))
        if not ok:
            reasons.append(f"elongated stars: ellipticity {qc['ellipticity']:.2f} above "
                           f"{settings.max_ellipticity:g} (trailing?)")
    if _finite(qc.get("sky_e_per_s")):
        ok = qc["sky_e_per_s"] <= settings.max_sky_e_per_s
        checks.append(("sky_e_per_s", round(qc["sky_e_per_s"], 2), settings.max_sky_e_per_s, ok))
        if not ok:
            reasons.append(f"sky {qc['sky_e_per_s']:.0f} e-/s/px above "
                           f"{settings.max_sky_e_per_s:g}")
    if qc.get("phot_status") == "failed" and qc.get("aststat") != "failed":
        reasons.append(f"photometric calibration failed: {qc.get('phot_reason')}")
    if reasons:
        return Verdict(False, "; ".join(reasons), tuple(checks))
    return Verdict(True, None, tuple(checks))


# ---------------------------------------------------------------------------- the night

@dataclass(frozen=True)
class Peer:
    """One object frame of the night as the quality judgement sees it (from its qc)."""

    id: int
    filter: str | None
    target: str | None
    camera: str | None
    fwhm_arcsec: float | None = None
    apcor_own: float | None = None
    apcor_own_err: float | None = None
    zp_per_s: float | None = None
    transparency_mag: float | None = None

    @classmethod
    def from_qc(cls, id: int, filter, target, camera, qc: dict) -> Peer:
        return cls(id, filter, target, camera, qc.get("fwhm_arcsec"), qc.get("apcor_own"),
                   qc.get("apcor_own_err"), qc.get("zp_per_s"), qc.get("transparency_mag"))


@dataclass(frozen=True)
class NightQuality:
    best_transparency: float | None  #: the night's best zero point per second (or transparency)
    fwhm: float | None  #: median FWHM of the filter's other frames (None if fewer than 3)


def night_context(peers, *, frame_id: int, filt: str | None, target: str | None, qc: dict,
                  min_frames: int = 3, own_in_peers: bool = True) -> NightQuality:
    """What a frame is judged against: the one night-quality context of the engine (each
    frame as it is reduced) and of finalize (every frame again with the whole night).

    ``peers``: the night's object frames with measurements (:class:`Peer`); the best
    zero point per second is of the filter (relative photometry: of the target and
    filter), this frame's own value included; the FWHM is of the filter's other frames.
    ``own_in_peers`` is only informative (the frame's own old entry, if any, counts for
    the best transparency as its new ``qc`` does)."""
    key = "zp_per_s" if qc.get("zp_per_s") is not None else "transparency_mag"
    same = [p for p in peers if filt is not None and p.filter == filt]
    values = [getattr(p, key) for p in same
              if key == "zp_per_s" or (target is not None and p.target == target)]
    values = [v for v in (*values, qc.get(key)) if v is not None]
    fwhms = [p.fwhm_arcsec for p in same if p.id != frame_id and p.fwhm_arcsec is not None]
    return NightQuality(best_transparency=max(values) if values else None,
                        fwhm=float(np.median(fwhms)) if len(fwhms) >= min_frames else None)


def apcor_peers(peers, *, frame_id: int, filt: str | None, camera: str | None) -> list[tuple]:
    """(apcor_own, apcor_own_err, fwhm_arcsec) of the night's other frames of the filter and
    camera (:func:`photowatch.stages.sources.pool_aperture_correction`)."""
    return [(p.apcor_own, p.apcor_own_err, p.fwhm_arcsec) for p in peers
            if p.id != frame_id and filt is not None and p.filter == filt
            and camera is not None and p.camera == camera]
