"""The solving stages of the chain: astrometry (absolute, else relative to the field's
reference frame) and photometric calibration (zero point, else a relative flux scale).

Pure functions of the frame and the :class:`~photowatch.stages.context.NightContext`:
a new field reference, a zero-point reference or a new solution is returned as an
:class:`~photowatch.stages.context.Update` (a claim, when another frame may make
the same one at the same time), never written here.
"""

from __future__ import annotations

import math

import numpy as np

from photowatch.core.frame import Frame
from photowatch.core.schema import set_key
from photowatch.stages import astrometry as astrom  # patched in tests
from photowatch.stages.astrometry import (
    AstrometryResult,
    apply_astrometry,
    check_neighbours,
    initial_wcs,
    radec_for,
    relative_reference,
    wcs_geometry,
)
from photowatch.stages.context import NightContext, Update
from photowatch.stages.matching import angular_distance_deg
from photowatch.stages.zeropoint import (
    calibrate_zeropoint,
    calibrated_magnitudes,
    relative_flux_scale,
    relative_stars,
)


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


# ---------------------------------------------------------------------------- astrometry

def astrometry(ctx: NightContext, frame: Frame, raw_header, src):
    """Solve (absolute, else relative to the field's reference frame).

    ``ctx.quicklook``: (WCS, status) of this frame's quick-look solution
    (finalize's re-reduction). When the new solve fails, the frame starts
    again from it (a warm start), and else keeps it if it still fits the
    stars (:func:`quicklook_fallback`).

    Returns (frame, cat, wcs, qc, reference, initial wcs, updates): the reference
    catalogue is None in relative mode; updates: a new field's reference (a claim) and
    the solution for the field's later frames.
    """

    info, profile, quicklook = ctx.info, ctx.profile, ctx.quicklook
    s = ctx.settings.stages.astrometry
    updates: list[Update] = []
    shape = frame.sci.shape
    wcs0 = initial_wcs(info, profile, shape, header=raw_header)
    qc: dict = {}
    reference = refname = None
    notes = []
    if s.enabled:
        try:
            reference, refname = ctx.reference_stars(info, profile, wcs0, shape) \
                if ctx.reference_stars is not None else (None, None)
        except Exception as exc:  # catalogue down and not cached: register relatively
            notes.append(f"catalogue unavailable ({exc})")
            reference = None
    relative = reference is None
    ra_c, dec_c, half_deg = image_centre(wcs0, shape)
    # the field's earlier solutions near this pointing: the newest is the warm start, all
    # of them the neighbours a new solution is compared with
    field_key = (info.night, info.target, info.camera)
    neighbours = _nearby_solutions(ctx.solutions, ra_c, dec_c, half_deg)
    previous = next((r.wcs for r in reversed(neighbours) if not r.suspect), None)
    result = ref = None
    if not s.enabled:
        result = None
    elif relative:
        ref = ctx.refs.near(info.night, info.target or "", None, "astrom", ra_c, dec_c,
                            half_deg)
        if ref is None:
            # the first frame of this field: its own initial WCS defines the relative frame
            table = relative_reference(src.table, wcs0)
            if len(table) >= s.min_matches:
                table.meta.update({"frame": info.std_name, "ra0": ra_c, "dec0": dec_c})
                # a claim: if another frame founded a field here meanwhile, the engine
                # runs this stage again (and ``near`` then finds the winner)
                updates.append(Update("field", dict(
                    night=info.night, target=info.target or "", filt=None, kind="astrom",
                    table=table, ra=ra_c, dec=dec_c, radius_deg=half_deg), claim=True))
                ref = table
                result = _reference_result(wcs0, len(table))
        if result is None and ref is not None:
            result = astrom.solve_astrometry(src.table, shape=shape, wcs_guess=wcs0, reference=ref,
                                      settings=s, previous=previous)
        refname = f"relative:{ref.meta.get('frame', '?')}" if ref is not None else None
    else:
        result = astrom.solve_astrometry(src.table, shape=shape, wcs_guess=wcs0, reference=reference,
                                  settings=s, previous=previous)
    if (quicklook is not None and s.enabled and (result is None or result.status == "failed")):
        target_ref = reference if not relative else ref
        rescued = quicklook_fallback(src.table, shape, quicklook, target_ref, s,
                                     failed=result.reason if result is not None else "")
        if rescued is not None:
            result = rescued
    if result is None:

        why = "astrometry disabled" if not s.enabled else \
            "too few stars to register the field's first frame"
        result = AstrometryResult(wcs=None, status="failed", method="none", reason=why)
    if result.wcs is not None and result.status in ("ok", "relative"):
        # a solution unlike the field's previous ones is flagged (kept, said in the header)
        result = check_neighbours(result, neighbours, shape=shape,
                                  tolerance_arcsec=s.neighbour_tolerance_arcsec,
                                  pointing_tolerance_arcsec=s.neighbour_pointing_arcsec)
        # every solution votes (a wrong first one is soon outvoted); bounded per field
        ra_s, dec_s, _ = image_centre(result.wcs, shape)
        updates.append(Update("solution", dict(field_key=field_key, ra=ra_s, dec=dec_s,
                                               result=result)))
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
        # what a restarted engine needs to compare later solutions with this one
        "astoffset_east_arcsec": _finite(result.offset_east_arcsec),
        "astoffset_north_arcsec": _finite(result.offset_north_arcsec),
        "astreason": result.reason or ("; ".join(notes) if notes else None),
        "astref": refname,
        "abscal_astrometry": result.status == "ok",
    })
    if relative and result.status != "failed":
        qc["astreason"] = "no reference catalogue: registered to the field's reference frame" \
            + (f"; {result.reason}" if result.suspect else "")
    qc["astsuspect"] = bool(result.suspect)
    return frame, cat, wcs, qc, reference, wcs0, updates


def quicklook_fallback(sources, shape, quicklook, reference, settings, failed: str = ""):
    """A frame whose re-reduction failed to solve, started from its own quick-look solution.

    First a warm start from it (shift search and refit, the usual acceptance
    checks); else the quick-look WCS itself, kept when it still fits: at least
    ``min_matches`` stars within ``match_radius_arcsec`` and an rms within
    ``max_rms_arcsec``. Returns the AstrometryResult (method ``quicklook-warm``
    or ``quicklook-kept``), or None when the quick-look solution no longer fits.
    """
    from dataclasses import replace


    wcs, status = quicklook
    if reference is None or len(reference) == 0:
        return None
    note = f"re-solve failed ({failed})" if failed else "re-solve failed"
    retry = astrom.solve_astrometry(sources, shape=shape, wcs_guess=wcs, reference=reference,
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
                               np.asarray(reference["dec"], float), 0, quiet=True)
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


def solve_from_catalogue(cat, shape, wcs, reference, settings) -> tuple:
    """A product's astrometry solved again from its stored ``CAT`` (no pixel work).

    ``cat``: the product's CAT as in the file (x, y 1-based); ``wcs``: its solution;
    ``reference``: the catalogue stars or the field's relative reference it was solved
    against. The solve starts from ``wcs`` (a warm start, the usual checks; the solution
    does not depend on where it starts). Returns (AstrometryResult, moved): ``moved`` is
    the largest distance (px) between where ``wcs`` and the new solution put the sky
    positions of the CAT's clean sources (flags 0); inf when the new solve fails.
    """
    if reference is None or len(reference) == 0 or cat is None or len(cat) == 0:
        return None, float("inf")
    src = cat.copy()
    src["x"] = np.asarray(src["x"], float) - 1.0
    src["y"] = np.asarray(src["y"], float) - 1.0
    result = astrom.solve_astrometry(src, shape=shape, wcs_guess=wcs, reference=reference,
                                     settings=settings, previous=wcs)
    if result.wcs is None or result.status == "failed":
        return result, float("inf")
    clean = np.asarray(src["flags"]) == 0 if "flags" in src.colnames else np.ones(len(src), bool)
    x, y = np.asarray(src["x"], float)[clean], np.asarray(src["y"], float)[clean]
    if x.size == 0:
        return result, 0.0
    ra, dec = wcs.all_pix2world(x, y, 0)
    nx_, ny_ = result.wcs.all_world2pix(ra, dec, 0)
    moved = np.hypot(nx_ - x, ny_ - y)
    return result, float(np.nanmax(moved)) if np.isfinite(moved).any() else float("inf")


def _nearby_solutions(solutions, ra: float, dec: float, radius_deg: float) -> list:
    """The field's remembered solutions (oldest first) centred within ``radius_deg``
    (``solutions``: the context's snapshot of the field's (ra, dec, result))."""

    return [result for ra_s, dec_s, result in solutions
            if float(angular_distance_deg(ra, dec, ra_s, dec_s)) < radius_deg]


def image_centre(wcs, shape) -> tuple[float, float, float]:
    """Sky position of the image centre and half the image's shorter side (deg): where the
    field references of a frame solved with ``wcs`` are looked up."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    ny, nx = shape
    ra, dec = wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)))
    return float(ra[0]), float(dec[0]), 0.5 * min(nx, ny) * scale


def _reference_result(wcs0, nstar):

    scale, pa, flipped = wcs_geometry(wcs0)
    return AstrometryResult(wcs=wcs0, status="relative", method="reference-frame", rms_arcsec=0.0,
                            nstar=nstar, offset_arcsec=0.0, rotation_deg=pa, scale_arcsec=scale,
                            flipped=flipped,
                            reason="the field's reference frame (initial WCS from the header)")


# ---------------------------------------------------------------------------- photometry

def photometry(ctx: NightContext, frame: Frame, cat, ast_qc, reference, wcs, wcs0):
    """Zero point (catalogue) or relative flux scale; FLXSCALE; calibrated CAT magnitudes.

    Returns (frame, cat, qc, updates): the updates claim the zero-point reference
    (``zpref``) or a new field's flux reference (``fluxref``) when this frame is the first."""

    info, profile, s = ctx.info, ctx.profile, ctx.settings
    updates: list[Update] = []
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

            ref = ctx.refs.get(info.night, target, info.filter, "zpref")
            if ref is None:  # the first calibrated frame: a claim (the first writer wins)
                ref = Table(meta={"zp": zp.magzp, "frame": info.std_name, "exptime": t},
                            names=["ra"])
                updates.append(Update("zpref", dict(night=info.night, target=target,
                                                    filt=info.filter, table=ref), claim=True))
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
        ra0, dec0, half = image_centre(wcs if wcs is not None else wcs0, frame.sci.shape)
        ref = ctx.refs.near(info.night, target, info.filter, "fluxref", ra0, dec0, half)

        usable = cat[relative_stars(cat)]
        calibrated = ctx.refs.get(info.night, target, info.filter, "zpref") is not None
        if ref is None and ast_qc.get("aststat") != "failed" and not calibrated \
                and len(usable) >= s.quality.min_stars:
            table = usable["ra", "dec", "flux", "fluxerr", "flux_aper", "fluxerr_aper"]
            table.meta.update({"frame": info.std_name, "exptime": t, "ra0": ra0, "dec0": dec0})
            updates.append(Update("field", dict(night=info.night, target=target,
                                                filt=info.filter, kind="fluxref", table=table,
                                                ra=ra0, dec=dec0, radius_deg=half), claim=True))
            ref = table
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
    return frame.replace(header=hdr), cat, qc, updates


def _instrumental(cat) -> np.ndarray:
    flux = np.asarray(cat["flux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1)), np.nan)

