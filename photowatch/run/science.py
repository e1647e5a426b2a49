"""One object frame through the whole chain, with the night's state as explicit inputs.

:func:`reduce_object` selects the masters (or raises WaitForMasters), runs the
pure chain of :mod:`photowatch.stages.chain`, feeds the master-sky accumulator,
extracts sources, solves the astrometry against the reference catalogue (or,
without one, registers the frame to its field's reference frame), calibrates
the photometry (zero point, or a relative flux scale) and judges the frame's
quality. It computes; it does not write: :func:`write_outputs` writes the
product, its quick-look PNG and, if asked, the intermediates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.calib.select import Candidate
from photowatch.core.classify import FrameInfo
from photowatch.core.frame import Frame
from photowatch.core.instruments import Profile
from photowatch.io.products import (
    primary_header,
    sci_header,
    set_key,
    write_product,
    write_regions,
)
from photowatch.stages.chain import back, front, pattern_for_sky, profile_header_items
from photowatch.stages.quality import assess


@dataclass
class ScienceResult:
    frame: Frame  #: final frame (WCS and every keyword in its header)
    cat: object  #: astropy Table of sources (CAT)
    wcs: object | None  #: the solution used for stacking (absolute or relative), or None
    qc: dict
    accepted: bool
    reason: str | None
    masters_used: dict
    provisional: bool
    intermediates: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def _round(v, nd: int) -> float | None:
    return round(float(v), nd) if v is not None and np.isfinite(v) else None


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def reduce_object(engine, row, info: FrameInfo, raw, header, profile: Profile, blog,
                  ) -> ScienceResult:
    """Run the chain on one object frame (see the module docstring); writes nothing."""
    s = engine.settings
    timer = _Timer()
    with timer("masters"):
        masters = engine.book.masters_for(info, profile)
        images = {k: img for k, (c, img) in masters.items()}
        bpm = engine.book.bpm(images.get("dark"), images.get("flat"))
    keep = s.stages.write_intermediates  # else each step's planes are let go once used
    with timer("prepare+flatten"):
        fr = front(raw, header, info, masters=images, bpm=bpm, settings=s)
    f = fr["f"] if keep else fr.pop("f")
    if not keep:
        fr = {}
    pattern = sky = None
    if s.stages.mastersky.enabled:
        with timer("mastersky"):
            pattern = pattern_for_sky(f, s)
            sky = engine.skies.add_and_get(row["name"], info, pattern,
                                           (info.ra_deg or math.nan, info.dec_deg or math.nan))
        if sky is not None:
            engine.skies.save_used(row["name"], info, sky)
            key = engine.skies.key(info)
            engine.book.mark_stale(Candidate(
                kind="sky", camera=key.camera, filter=key.filter, binning=key.binning,
                readout=key.readout, night=key.night, version=sky.version,
                ninputs=sky.version, final=False, path=sky.label, target=key.target))
    sky_used = (sky.label, sky.version) if sky is not None else None
    sky_pre_e = pattern.level if sky is not None and pattern is not None else None
    if pattern is not None and not keep:  # back() needs only its level and source mask
        pattern = dataclasses.replace(pattern, data=None, var=None, valid=None)
    frame_in = [f]
    del f
    b = back(frame_in, settings=s, sky=sky, pattern=pattern)
    sky = pattern = None
    timer.times.update(b.seconds)
    z = b.frames["z"] if keep else b.frames.pop("z")
    if not keep:
        b.frames.clear()

    from photowatch.stages.sources import extract_sources

    with timer("sources"):
        src = extract_sources(z, settings=s.stages.sources,
                              pixel_scale_arcsec=info.pixel_scale_arcsec)
        own_apcor = (src.aperture_correction, src.aperture_correction_err, src.n_apcor)
        src = night_aperture_correction(engine, info, row["id"], src)
    with timer("astrometry"):
        frame, cat, wcs, ast_qc, reference, wcs0 = astrometry(
            engine, info, profile, z, header, src,
            quicklook=getattr(engine, "quicklook_solutions", {}).get(row["id"]))
    with timer("zeropoint"):
        frame, cat, phot_qc = photometry(engine, info, profile, frame, cat, ast_qc, reference,
                                         wcs, wcs0)

    sky_e = b.sky.level_e
    qc = {
        "time": info.obs_time.isoformat(),
        "filter": info.filter,
        "target": info.target,
        "exptime": info.exptime_s,
        "fwhm_arcsec": _finite(src.fwhm_arcsec),
        "apcor_own": _finite(own_apcor[0]), "apcor_own_err": _finite(own_apcor[1]),
        "apcor_own_n": own_apcor[2], "apcor": _finite(src.aperture_correction),
        "apcor_err": _finite(src.aperture_correction_err), "apcor_n": src.n_apcor,
        "apcor_src": src.meta.get("APCORSRC"),
        "ellipticity": _finite(src.ellipticity),
        "nsources": len(cat),
        "sky_e": _finite(sky_e),
        "sky_e_per_s": _finite(sky_e / info.exptime_s) if info.exptime_s else None,
        "skynoise_e": _finite(b.sky.noise_e),
        "sky_pre_e": _finite(sky_pre_e) if sky_pre_e is not None else None,
        "ncr": b.cosmics.npix,
        "airmass": info.airmass,
        **ast_qc,
        **phot_qc,
    }
    from photowatch.run.live import depth_facts  # issue 21: LIMMAG

    qc.update(depth_facts(frame, src, qc, engine.settings.targets.nsigma))
    best = best_transparency(engine, info, qc)
    verdict = assess(qc, best_transparency_mag=best, settings=s.quality,
                     night_fwhm_arcsec=night_fwhm(engine, info, row["id"]))
    qc["accepted"] = verdict.accepted
    qc["checks"] = [list(c) for c in verdict.checks]

    provisional = any(img.provisional for img in images.values())
    masters_used = {k: {"master_id": c.master_id, "path": Path(c.path).name, "key": c.key,
                        "night": c.night, "version": c.version, "ninputs": c.ninputs,
                        "final": c.final, "provisional": c.provisional(s.calibration.min_inputs)}
                    for k, (c, _) in masters.items()}
    if sky_used is not None:
        key = engine.skies.key(info)
        masters_used["sky"] = {"path": sky_used[0], "key": key.text, "night": key.night,
                               "version": sky_used[1], "ninputs": sky_used[1], "final": False,
                               "provisional": False, "master_id": None}
    hdr = frame.header.copy()
    for k, v in profile_header_items(info, profile).items():
        set_key(hdr, k, v)
    set_key(hdr, "FWHM", (_round(src.fwhm_arcsec, 4), "[arcsec] median stellar FWHM"))
    set_key(hdr, "ELLIP", (_round(src.ellipticity, 4), "median stellar ellipticity 1-b/a"))
    set_key(hdr, "NSOURCES", (len(cat), "sources in CAT"))
    set_key(hdr, "APCOR", (_round(src.aperture_correction, 5), "aperture correction (flux/aper)"))
    set_key(hdr, "APCORERR", (_round(src.aperture_correction_err, 5),
                              "aperture correction standard error"))
    set_key(hdr, "APCORN", (src.n_apcor, "stars of the aperture correction"))
    set_key(hdr, "LIMMAG", (_round(qc.get("limmag"), 3) if qc.get("limmag") is not None
                            else None, "[mag] 5-sigma point-source limit (CAT aperture)"))
    set_key(hdr, "LIMFLUX", (_round(qc.get("limflux_e"), 2),
                             "[electron] 5-sigma point-source flux (CAT aperture)"))
    set_key(hdr, "PWVERS", (__version__, "photowatch version"))
    set_key(hdr, "PROVISNL", (provisional, "reduced with a provisional master"))
    set_key(hdr, "QCSTATUS", ("accepted" if verdict.accepted else "rejected",
                              "frame quality: coadd use"))
    set_key(hdr, "QCREASON", (verdict.reason or "", "why the frame is not stacked"))
    frame = frame.replace(header=hdr)
    return ScienceResult(
        frame=frame, cat=cat, wcs=wcs, qc=qc, accepted=verdict.accepted,
        reason=verdict.reason, masters_used=masters_used, provisional=provisional,
        intermediates={**fr, **b.frames}, timings=timer.times)


# ---------------------------------------------------------------------------- astrometry

def _reference_stars(engine, info: FrameInfo, profile: Profile, wcs0, shape):
    """Catalogue stars around the frame (cached per field), or None; and the catalogue's name."""
    provider = engine.catalog
    if provider is None:
        return None, None
    from photowatch.io.catalogs import field_cone

    ra, dec, radius = field_cone(wcs0, shape, margin=engine.settings.catalog.radius_margin,
                                 extra_arcsec=engine.settings.stages.astrometry
                                 .max_pointing_error_arcsec)
    band = profile.band_for(info.filter)
    key = (info.night, info.target, round(ra, 3), round(dec, 3), band)
    cached = engine._catalog_cache.get(key)
    if cached is None:
        bands = [band] if band else []
        table = provider.query(ra, dec, radius, bands=bands)
        if band and band in table.colnames and "mag" not in table.colnames:
            table["mag"] = table[band]
        cached = table
        engine._catalog_cache[key] = cached
    return cached, getattr(provider, "name", "catalogue")


def astrometry(engine, info: FrameInfo, profile: Profile, frame: Frame, raw_header, src,
               quicklook=None):
    """Solve (absolute, else relative to the field's reference frame).

    ``quicklook``: (WCS, status) of this frame's quick-look solution
    (finalize's re-reduction). When the new solve fails, the frame starts
    again from it (a warm start), and else keeps it if it still fits the
    stars (:func:`quicklook_fallback`).

    Returns (frame, cat, wcs, qc, reference, initial wcs): the reference
    catalogue is None in relative mode.
    """
    from photowatch.stages.astrometry import (
        apply_astrometry,
        check_neighbours,
        initial_wcs,
        radec_for,
        relative_reference,
        solve_astrometry,
    )

    s = engine.settings.stages.astrometry
    shape = frame.sci.shape
    wcs0 = initial_wcs(info, profile, shape, header=raw_header)
    qc: dict = {}
    reference = refname = None
    notes = []
    if s.enabled:
        try:
            reference, refname = _reference_stars(engine, info, profile, wcs0, shape)
        except Exception as exc:  # catalogue down and not cached: register relatively
            notes.append(f"catalogue unavailable ({exc})")
            reference = None
    relative = reference is None
    ra_c, dec_c, half_deg = _centre(wcs0, shape)
    # the field's earlier solutions near this pointing: the newest is the warm start, all
    # of them the neighbours a new solution is compared with
    field_key = (info.night, info.target, info.camera)
    neighbours = _nearby_solutions(engine, field_key, ra_c, dec_c, half_deg)
    previous = next((r.wcs for r in reversed(neighbours) if not r.suspect), None)
    result = ref = None
    if not s.enabled:
        result = None
    elif relative:
        ref = engine.refs.near(info.night, info.target or "", None, "astrom", ra_c, dec_c,
                               half_deg)
        if ref is None:
            # the first frame of this field: its own initial WCS defines the relative frame
            table = relative_reference(src.table, wcs0)
            if len(table) >= s.min_matches:
                table.meta.update({"frame": info.std_name, "ra0": ra_c, "dec0": dec_c})
                ref, founded = engine.refs.claim_field(info.night, info.target or "", None,
                                                       "astrom", table, ra_c, dec_c, half_deg)
                if founded:
                    result = _reference_result(wcs0, len(table))
        if result is None and ref is not None:
            result = solve_astrometry(src.table, shape=shape, wcs_guess=wcs0, reference=ref,
                                      settings=s, previous=previous)
        refname = f"relative:{ref.meta.get('frame', '?')}" if ref is not None else None
    else:
        result = solve_astrometry(src.table, shape=shape, wcs_guess=wcs0, reference=reference,
                                  settings=s, previous=previous)
    if (quicklook is not None and s.enabled and (result is None or result.status == "failed")):
        target_ref = reference if not relative else ref
        rescued = quicklook_fallback(src.table, shape, quicklook, target_ref, s,
                                     failed=result.reason if result is not None else "")
        if rescued is not None:
            result = rescued
    if result is None:
        from photowatch.stages.astrometry import AstrometryResult

        why = "astrometry disabled" if not s.enabled else \
            "too few stars to register the field's first frame"
        result = AstrometryResult(wcs=None, status="failed", method="none", reason=why)
    if result.wcs is not None and result.status in ("ok", "relative"):
        # a solution unlike the field's previous ones is flagged (kept, said in the header)
        result = check_neighbours(result, neighbours, shape=shape,
                                  tolerance_arcsec=s.neighbour_tolerance_arcsec,
                                  pointing_tolerance_arcsec=s.neighbour_pointing_arcsec)
        # every solution votes (a wrong first one is soon outvoted); bounded per field
        ra_s, dec_s, _ = _centre(result.wcs, shape)
        engine._field_solutions.setdefault(field_key, deque(maxlen=16)).append(
            (ra_s, dec_s, result))
    frame = apply_astrometry(frame, result, reference_name=refname or "none")
    wcs = result.wcs if result.status in ("ok", "relative") else None
    # no solution: ra/dec NaN, never positions from the header pointing
    cat = radec_for(src.table, wcs)
    qc.update({
        "aststat": result.status,
        "astmethod": result.method,
        "astrms_arcsec": _finite(result.rms_arcsec),
        "astnstar": int(result.nstar or 0),
        "astoffset_arcsec": _finite(result.offset_arcsec),
        "astreason": result.reason or ("; ".join(notes) if notes else None),
        "astref": refname,
        "abscal_astrometry": result.status == "ok",
    })
    if relative and result.status != "failed":
        qc["astreason"] = "no reference catalogue: registered to the field's reference frame" \
            + (f"; {result.reason}" if result.suspect else "")
    qc["astsuspect"] = bool(result.suspect)
    return frame, cat, wcs, qc, reference, wcs0


def quicklook_fallback(sources, shape, quicklook, reference, settings, failed: str = ""):
    """A frame whose re-reduction failed to solve, started from its own quick-look solution.

    First a warm start from it (shift search and refit, the usual acceptance
    checks); else the quick-look WCS itself, kept when it still fits: at least
    ``min_matches`` stars within ``match_radius_arcsec`` and an rms within
    ``max_rms_arcsec``. Returns the AstrometryResult (method ``quicklook-warm``
    or ``quicklook-kept``), or None when the quick-look solution no longer fits.
    """
    from dataclasses import replace

    from photowatch.stages.astrometry import AstrometryResult, solve_astrometry, wcs_geometry

    wcs, status = quicklook
    if reference is None or len(reference) == 0:
        return None
    note = f"re-solve failed ({failed})" if failed else "re-solve failed"
    retry = solve_astrometry(sources, shape=shape, wcs_guess=wcs, reference=reference,
                             settings=settings, previous=wcs)
    if retry.status != "failed" and retry.wcs is not None:
        return replace(retry, method="quicklook-warm",
                       reason=f"started again from its quick-look solution: {note}")
    # the quick-look WCS as it is: does it still put the reference stars on the sources?
    x = np.asarray(sources["x"], float)
    y = np.asarray(sources["y"], float)
    if x.size == 0:
        return None
    rx, ry = wcs.all_world2pix(np.asarray(reference["ra"], float),
                               np.asarray(reference["dec"], float), 0)
    ny, nx = shape
    on = np.isfinite(rx) & np.isfinite(ry) & (rx > -1) & (rx < nx) & (ry > -1) & (ry < ny)
    if on.sum() < settings.min_matches:
        return None
    from scipy.spatial import cKDTree

    scale, pa, flipped = wcs_geometry(wcs)
    radius_px = settings.match_radius_arcsec / scale
    dist, idx = cKDTree(np.column_stack([x, y])).query(np.column_stack([rx[on], ry[on]]),
                                                        distance_upper_bound=radius_px)
    hit = np.isfinite(dist)
    n = int(hit.sum())
    if n < settings.min_matches:
        return None
    rms = float(np.sqrt(np.mean(dist[hit] ** 2))) * scale
    if not rms <= settings.max_rms_arcsec:
        return None
    return AstrometryResult(
        wcs=wcs, status=status, method="quicklook-kept", rms_arcsec=rms, nstar=n,
        offset_arcsec=0.0, rotation_deg=pa, scale_arcsec=scale, flipped=flipped,
        sip_degree=int(getattr(wcs.sip, "a_order", 0) if wcs.sip is not None else 0),
        reason=f"quick-look solution kept ({n} stars, rms {rms:.2f} arcsec): {note}")


def _nearby_solutions(engine, field_key, ra: float, dec: float, radius_deg: float) -> list:
    """The field's remembered solutions (oldest first) centred within ``radius_deg``."""
    from photowatch.io.catalogs import angular_distance_deg

    # a snapshot: another worker may append to the deque meanwhile (tuple() copies it in
    # one step under the GIL; iterating the deque itself would raise on a concurrent append)
    return [result for ra_s, dec_s, result in tuple(engine._field_solutions.get(field_key, ()))
            if float(angular_distance_deg(ra, dec, ra_s, dec_s)) < radius_deg]


def _centre(wcs, shape) -> tuple[float, float, float]:
    """Sky position of the image centre and half the image's shorter side (deg)."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    ny, nx = shape
    ra, dec = wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)))
    return float(ra[0]), float(dec[0]), 0.5 * min(nx, ny) * scale


def _reference_result(wcs0, nstar):
    from photowatch.stages.astrometry import AstrometryResult, wcs_geometry

    scale, pa, flipped = wcs_geometry(wcs0)
    return AstrometryResult(wcs=wcs0, status="relative", method="reference-frame", rms_arcsec=0.0,
                            nstar=nstar, offset_arcsec=0.0, rotation_deg=pa, scale_arcsec=scale,
                            flipped=flipped,
                            reason="the field's reference frame (initial WCS from the header)")


# ---------------------------------------------------------------------------- photometry

def photometry(engine, info: FrameInfo, profile: Profile, frame: Frame, cat, ast_qc, reference,
               wcs, wcs0):
    """Zero point (catalogue) or relative flux scale; FLXSCALE; calibrated CAT magnitudes."""
    from photowatch.stages.zeropoint import (
        calibrate_zeropoint,
        calibrated_magnitudes,
        relative_flux_scale,
    )

    s = engine.settings
    zs = s.stages.zeropoint
    band = profile.band_for(info.filter)
    hdr = frame.header.copy()
    qc: dict = {}
    cat = cat.copy()
    target = info.target or ""
    t = info.exptime_s or 1.0
    absolute = (zs.enabled and reference is not None and band is not None
                and band in reference.colnames and ast_qc.get("aststat") == "ok")
    if absolute:
        zp = calibrate_zeropoint(cat, reference, band=band, shape=frame.sci.shape, settings=zs)
        qc.update(phot_status=zp.status, phot_reason=zp.reason, zp_n=zp.n,
                  zp=_finite(zp.magzp), zp_err=_finite(zp.magzp_err),
                  zp_scatter=_finite(zp.scatter), band=band)
        if zp.status == "ok":
            calibrated_magnitudes(cat, zp, frame.sci.shape)
            qc["zp_spatial"] = [float(c) for c in zp.spatial] or None  # forced photometry
            zp_s = zp.magzp - 2.5 * math.log10(t)
            qc["zp_per_s"] = zp_s
            from astropy.table import Table

            ref = engine.refs.set_if_absent(info.night, target, info.filter, "zpref",
                                            Table(meta={"zp": zp.magzp, "frame": info.std_name,
                                                        "exptime": t}, names=["ra"]))
            zp_ref = float(ref.meta["zp"])
            flx = 10 ** (-0.4 * (zp.magzp - zp_ref))
            qc.update(flxscale=flx, zp_ref=zp_ref, abscal=True)
            set_key(hdr, "MAGZP", (round(zp.magzp, 5), "mag = MAGZP - 2.5 log10(counts in SCI)"))
            set_key(hdr, "MAGZPERR", (round(zp.magzp_err, 5), "zero-point uncertainty (mag)"))
            set_key(hdr, "MAGZPN", (zp.n, "stars used for the zero point"))
            set_key(hdr, "MAGZPSEC", (round(zp_s, 5), "zero point for 1 s"))
            set_key(hdr, "MAGZPBND", (band, "catalogue band"))
            set_key(hdr, "FLXSCALE", (flx, "multiply SCI by this to reach FLXREF"))
            set_key(hdr, "FLXREF", (round(zp_ref, 5), "photometric reference zero point"))
        set_key(hdr, "ZPSTAT", (zp.status, zp.reason or "zero point vs catalogue"))
        set_key(hdr, "ABSCAL", (zp.status == "ok", "absolutely calibrated photometry"))
    else:
        why = ("no reference catalogue" if reference is None else
               f"catalogue has no band for filter {info.filter}" if band is None or
               band not in reference.colnames else "astrometry not absolute")
        qc.update(abscal=False, phot_note=f"not absolutely calibrated: {why}")
        ra0, dec0, half = _centre(wcs if wcs is not None else wcs0, frame.sci.shape)
        ref = engine.refs.near(info.night, target, info.filter, "fluxref", ra0, dec0, half)
        from photowatch.stages.zeropoint import relative_stars

        usable = cat[relative_stars(cat)]
        calibrated = engine.refs.get(info.night, target, info.filter, "zpref") is not None
        if ref is None and ast_qc.get("aststat") != "failed" and not calibrated \
                and len(usable) >= s.quality.min_stars:
            table = usable["ra", "dec", "flux", "fluxerr", "flux_aper", "fluxerr_aper"]
            table.meta.update({"frame": info.std_name, "exptime": t, "ra0": ra0, "dec0": dec0})
            ref, _ = engine.refs.claim_field(info.night, target, info.filter, "fluxref", table,
                                             ra0, dec0, half)
        if calibrated and ast_qc.get("aststat") != "failed":
            # the coadd of this target and filter is on a zero point: a frame scaled to
            # another reference would mix calibrated and uncalibrated photometry in it
            qc.update(phot_status="failed", phot_reason="no zero point, and the coadd of "
                      "this target and filter is calibrated")
        elif ref is not None and ref.meta.get("frame") == info.std_name:
            qc.update(phot_status="reference", flxscale=1.0, zp_n=len(ref))
        elif ref is not None and ast_qc.get("aststat") != "failed":
            fs = relative_flux_scale(cat, ref, settings=zs, min_stars=s.quality.min_stars)
            qc.update(phot_status=fs.status, phot_reason=fs.reason, zp_n=fs.n)
            if fs.status == "ok":
                qc["flxscale"] = fs.scale
                qc["flxscale_err"] = fs.err
        else:
            qc.update(phot_status="failed", phot_reason=(
                "astrometry failed" if ast_qc.get("aststat") == "failed" else
                "no reference frame for the relative flux scale"))
        if qc.get("flxscale"):
            t_ref = float(ref.meta.get("exptime", t)) if ref is not None else t
            qc["transparency_mag"] = 2.5 * math.log10((1.0 / qc["flxscale"]) * (t_ref / t))
            set_key(hdr, "FLXSCALE", (qc["flxscale"], "multiply SCI by this to reach FLXREF"))
            set_key(hdr, "FLXSCERR", (qc.get("flxscale_err", 0.0), "FLXSCALE standard error"))
            set_key(hdr, "FLXREF", (ref.meta.get("frame", ""), "photometric reference frame"))
        set_key(hdr, "ZPSTAT", (qc.get("phot_status"), "relative flux scale (no MAGZP)"))
        set_key(hdr, "ABSCAL", (False, "not absolutely calibrated (no catalogue)"))
    # CAT mag is calibrated or NaN, never instrumental: mag_inst is always beside it
    cat["mag_inst"] = _instrumental(cat)
    if not (qc.get("abscal") and qc.get("phot_status") == "ok"):
        cat["mag"] = np.full(len(cat), np.nan)
        set_key(hdr, "MAGSYS", ("none", "CAT mag NaN: no zero point; see mag_inst"))
    else:
        set_key(hdr, "MAGSYS", ("calibrated", f"CAT mag = MAGZP - 2.5 log10(flux), {band}"))
    return frame.replace(header=hdr), cat, qc


def _instrumental(cat) -> np.ndarray:
    flux = np.asarray(cat["flux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1)), np.nan)


def night_aperture_correction(engine, info: FrameInfo, frame_id: int, src):
    """A frame whose own aperture correction is not a precise growth curve borrows from
    the night: the weighted mean of its own and the night's other frames' own estimates
    at similar seeing, same camera and filter (:func:`photowatch.stages.sources.pool_aperture_correction`)."""
    from photowatch.stages.sources import pool_aperture_correction

    if src.meta.get("APCORSRC") == "growth" or not np.isfinite(src.fwhm_arcsec):
        return src
    rows = engine.store.conn.execute(
        "SELECT json_extract(qc_json, '$.apcor_own'), json_extract(qc_json, '$.apcor_own_err'),"
        " json_extract(qc_json, '$.fwhm_arcsec') FROM frames WHERE night=? AND filter=? AND "
        "camera=? AND kind='object' AND id != ? AND qc_json IS NOT NULL",
        (info.night, info.filter, info.camera, frame_id)).fetchall()
    pooled = pool_aperture_correction(
        (src.aperture_correction, src.aperture_correction_err, src.fwhm_arcsec),
        [tuple(r) for r in rows])
    if pooled is None:
        return src
    apcor, err, nframes = pooled
    return src.with_aperture_correction(apcor, err, src.n_apcor,
                                        f"night:{nframes}")


def night_fwhm(engine, info: FrameInfo, frame_id: int, min_frames: int = 3) -> float | None:
    """Median FWHM of the night's other measured frames of the filter (None if fewer than 3)."""
    rows = engine.store.conn.execute(
        "SELECT json_extract(qc_json, '$.fwhm_arcsec') FROM frames WHERE night=? AND filter=? "
        "AND kind='object' AND id != ? AND qc_json IS NOT NULL", (info.night, info.filter,
                                                                  frame_id)).fetchall()
    values = [r[0] for r in rows if r[0] is not None]
    return float(np.median(values)) if len(values) >= min_frames else None


def best_transparency(engine, info: FrameInfo, qc: dict) -> float | None:
    """The night's best zero point per second of the filter (relative: of the field and filter)."""
    key = "zp_per_s" if qc.get("zp_per_s") is not None else "transparency_mag"
    where = "night=? AND filter=? AND kind='object' AND qc_json IS NOT NULL"
    args: tuple = (info.night, info.filter)
    if key == "transparency_mag":
        where += " AND target=?"
        args += (info.target,)
    row = engine.store.conn.execute(
        f"SELECT MAX(json_extract(qc_json, '$.{key}')) FROM frames WHERE {where}", args
    ).fetchone()
    values = [v for v in (row[0] if row else None, qc.get(key)) if v is not None]
    return max(values) if values else None


# ---------------------------------------------------------------------------- outputs

def product_path(out: Path, info: FrameInfo, name: str) -> Path:
    return out / "reduced" / info.night / name


def write_outputs(engine, row, info: FrameInfo, raw_header, result: ScienceResult) -> dict:
    """Write the product (atomically), its PNG and the intermediates; returns paths."""
    out = engine.out
    name = row["name"]
    path = product_path(out, info, name)
    frame = result.frame
    from astropy.wcs import WCS  # noqa: F401  (the header carries the WCS already)

    wcs_header = _wcs_header(frame.header)
    extra = {k: (frame.header[k], frame.header.comments[k]) for k in frame.header
             if k in _PRODUCT_KEYS}
    prim = primary_header(raw_header, {**extra, **profile_header_items(info, engine.profile(
        info.instrument))})
    shdr = sci_header(frame, wcs_header, extra)
    write_product(path, frame, primary=prim, sci_hdr=shdr, cat=result.cat)
    paths = {"product": str(path), "regions": str(write_regions(
        path.with_suffix(".reg"), result.cat, trusted=frame.header.get("ASTSTAT") == "ok"))}
    s = engine.settings.stages
    if s.quicklook_png:
        from photowatch.io.previews import save_png

        png = path.with_suffix(".png")
        engine.in_background(save_png, frame.sci, png, mask=frame.mask, max_size=800)
        paths["quicklook"] = str(png)
    if s.write_intermediates:
        from astropy.io import fits

        from photowatch.io.fits import write_hdul

        folder = path.parent / "intermediate"
        for prefix, key in (("p", "p"), ("fp", "f"), ("sfp", "s"), ("zsfp", "z")):
            inter = result.intermediates.get(key)
            if inter is None:
                continue
            hdus = fits.HDUList([fits.PrimaryHDU(inter.sci.astype(np.float32)),
                                 fits.ImageHDU(inter.err, name="ERR"),
                                 fits.ImageHDU(inter.mask, name="MASK")])
            write_hdul(folder / f"{prefix}{name}", hdus, fsync=False)
    return paths


_PRODUCT_KEYS = set()


def _wcs_header(header):
    from astropy.io import fits

    from photowatch.io.products import WCS_PREFIXES

    out = fits.Header()
    for card in header.cards:
        if card.keyword.startswith(WCS_PREFIXES):
            out.append(card)
    return out


def _init_keys():
    from photowatch.io.products import PHOTOWATCH_KEYS

    _PRODUCT_KEYS.update(PHOTOWATCH_KEYS)
    _PRODUCT_KEYS.update({"OVERSCAN", "SATFRAC", "MAGZPBND", "MAGSYS", "SKYPRE", "QCSTATUS",
                          "QCREASON"})


_init_keys()
