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
