"""What the observer came for, live (issue 21), as each frame lands.

- :func:`depth_facts`: a frame's 5-sigma limit (LIMMAG, :mod:`photowatch.stages.depth`),
  called by :func:`photowatch.run.science.reduce_object`.
- :func:`measure_frame`: forced photometry (:mod:`photowatch.stages.forced`) at every
  target of a reduced frame (:class:`photowatch.state.lightcurves.LightCurveBook`: the
  targets, the store's points, the light-curve files), and the alert rules
  (target_detected, target_faded). The coadds' points and depth: the book, called by
  :class:`photowatch.state.coadds.CoaddBook`.
"""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np

from photowatch.core.frame import UNUSABLE
from photowatch.core.logs import get_logger

log = get_logger("photowatch.live")


def _fin(v):
    return float(v) if v is not None and np.isfinite(v) else None


# ---------------------------------------------------------------------------- depth

def depth_facts(frame, src, qc: dict, nsigma: float = 5.0) -> dict:
    """qc entries of a frame's depth: ``limmag`` (None without a zero point),
    ``limflux_e`` (nsigma flux, e-), ``pixnoise_e`` (median per-pixel ERR of usable
    pixels), ``apnoise_factor`` (measured over ERR-predicted noise of empty apertures, the
    number used in ``apnoise_n``) and ``aprad_px`` (CAT's aperture radius).

    LIMMAG is the limit of forced photometry at a known position: ERR's noise in CAT's
    aperture plus the local background's (``BKG_FACTOR``), the noise a measurement there
    has. ``apnoise_factor`` is larger: on a frame (not resampled, ERR right per pixel)
    what empty apertures add beyond ``BKG_FACTOR`` is light of the stars below the
    detection limit that random positions catch (on the simulator: 1.3 where positions
    with no star in the footprint give 1.11); it is kept as the frame's confusion figure
    and scales the coadds' noise (their resampling correlates it)."""
    from photowatch.stages.depth import (
        BKG_FACTOR,
        empty_aperture_noise,
        limiting_flux,
        pixel_noise,
    )

    mask, bits = frame.mask, int(UNUSABLE)  # the MASK bits are read where needed only
    noise = pixel_noise(frame.var, mask, bits=bits)
    r_ap = float(src.aperture_radius_px)
    apcor = float(src.aperture_correction)
    factor, n_empty = 1.0, 0
    if np.isfinite(r_ap) and r_ap > 0:
        tab = src.table
        xy = np.column_stack([np.asarray(tab["x"], float), np.asarray(tab["y"], float)]) \
            if len(tab) else np.zeros((0, 2))
        fwhm = src.fwhm_px if np.isfinite(src.fwhm_px) else r_ap / 2
        factor, n_empty = empty_aperture_noise(frame.sci, frame.var, mask, xy, r_ap, fwhm,
                                               bits=bits)
    flux = limiting_flux(noise, r_ap, apcor, nsigma, BKG_FACTOR)
    zp = qc.get("zp") if qc.get("abscal") and qc.get("phot_status") == "ok" else None
    limmag = zp - 2.5 * math.log10(flux) if zp is not None and np.isfinite(flux) else None
    return {"limmag": _fin(limmag), "limflux_e": _fin(flux), "pixnoise_e": _fin(noise),
            "apnoise_factor": _fin(factor), "apnoise_n": int(n_empty), "aprad_px": _fin(r_ap)}


# ---------------------------------------------------------------------------- frames

def _mjd(t) -> float:
    return t.timestamp() / 86400.0 + 40587.0


def measure_frame(engine, row, info, header, profile, result, *, alerts: bool = True) -> int:
    """Forced photometry at every target on a reduced frame; returns the points recorded."""
    if result.wcs is None:
        return 0
    book = engine.lightcurves
    targets = book.for_frame(info, header, profile)
    if not targets:
        return 0
    from photowatch.stages.forced import FLAG_OFFFRAME, forced_photometry
    from photowatch.stages.zeropoint import ZeroPointResult
    from photowatch.state.lightcurves import point_from_row

    qc = result.qc
    frame = result.frame
    zp = qc.get("zp") if qc.get("abscal") and qc.get("phot_status") == "ok" else None
    magzp = None
    if zp is not None:
        zpr = ZeroPointResult("ok", magzp=zp, spatial=tuple(qc.get("zp_spatial") or ()))
        shape = frame.sci.shape
        magzp = (lambda x, y: zpr.zp_at(x, y, shape)) if zpr.spatial else zp
    table = forced_photometry(frame.sci, frame.var, frame.mask, result.wcs,
                              [(t.name, t.ra, t.dec) for t in targets],
                              r_ap_px=qc.get("aprad_px") or float("nan"),
                              apcor=qc.get("apcor") or 1.0, magzp=magzp,
                              magzp_err=qc.get("zp_err") or 0.0,
                              nsigma=engine.settings.targets.nsigma)
    t0 = info.obs_time
    t1 = t0 + timedelta(seconds=info.exptime_s or 0.0)
    mid = t0 + (t1 - t0) / 2
    n = 0
    for t, r in zip(targets, table):
        if r["flags"] & FLAG_OFFFRAME:
            continue
        point = point_from_row(r, kind="frame", frame_id=row["id"], filter=info.filter,
                               mjd=_mjd(mid), mjd_start=_mjd(t0), mjd_end=_mjd(t1),
                               exptime=info.exptime_s, source=t.source,
                               product=row["product"])
        seen = book.record(info.night, t.name, row["name"], point)
        n += 1
        log.debug("forced_photometry", file=info.raw_name, target=t.name,
                  filter=info.filter, mag=point["mag"], limmag=point["limmag"],
                  snr=point["snr"])
        if alerts:
            _alert_rules(engine, info.night, t.name, point, seen, frame=info.raw_name)
    return n


def _alert_rules(engine, night, target, point, seen, frame) -> None:
    """target_detected: the night's first detection in the filter (frames may finish out
    of order: no other point of the filter detected); target_faded: fainter than the
    previous frame's detection by fade_sigma (combined error), or an upper limit fainter
    than it by fade_sigma of its error."""
    from photowatch.run.alerts import alert

    facts = {"night": night, "target": target, "frame": frame, "filter": point["filter"],
             "mjd": point["mjd"], "mag": point["mag"], "magerr": point["magerr"],
             "limmag": point["limmag"], "uplim": point["uplim"], "snr": point["snr"],
             "ra": point["ra"],
             "dec": point["dec"]}
    prev = seen["previous"]
    if point["detected"] and not seen["others_detected"]:
        alert(engine, "target_detected", facts)
    if prev is None or not prev["detected"] or prev["mag"] is None:
        return
    k = engine.settings.targets.fade_sigma
    if point["detected"] and point["mag"] is not None:
        err = math.hypot(point["magerr"] or 0.0, prev["magerr"] or 0.0)
        if point["mag"] - prev["mag"] > k * err:
            alert(engine, "target_faded", {**facts, "previous_mag": prev["mag"],
                                           "previous_frame": prev["key"]})
    elif point["uplim"] is not None and point["uplim"] > prev["mag"] + k * (prev["magerr"] or 0):
        alert(engine, "target_faded", {**facts, "previous_mag": prev["mag"],
                                       "previous_frame": prev["key"]})

