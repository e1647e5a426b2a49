"""Changes for one reduced frame: candidates found, recorded, linked, written.

:func:`check_frame` runs after the frame's product is written. It takes the
field's reference stars (the reference catalogue, the same cached cone the
astrometry used), runs :func:`photowatch.stages.changes.find_candidates` on
the frame's calibrated CAT and MASK, records the candidates in the store
(replacing those of an earlier reduction of the frame), links the night's new
detections of the field into moving tracks and stationary objects
(:func:`photowatch.stages.changes.link_tracks`), rewrites
``OUT/candidates/<night>/candidates.ecsv`` and draws the cutouts on the
background thread.

Only absolutely calibrated frames are compared (a CAT with magnitudes and an
absolute WCS); without a reference catalogue nothing is compared yet (the
night's first coadd as the reference is not built: see docs/architecture.md).
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta

import numpy as np

log = logging.getLogger(__name__)

_MJD_UNIX = 40587.0  #: MJD of 1970-01-01


def mid_mjd(info) -> float | None:
    if info.obs_time is None:
        return None
    mid = info.obs_time + timedelta(seconds=(info.exptime_s or 0.0) / 2)
    return mid.timestamp() / 86400.0 + _MJD_UNIX


def reference_for(engine, info, profile, wcs, shape):
    """The field's reference stars (ra, dec, mag, magerr) in the frame's band, or None."""
    from astropy.table import Table

    from photowatch.run.science import _reference_stars

    band = profile.band_for(info.filter)
    if engine.catalog is None or band is None:
        return None
    stars, _ = _reference_stars(engine, info, profile, wcs, shape)
    if stars is None or band not in stars.colnames:
        return None
    err = stars[f"{band}_err"] if f"{band}_err" in stars.colnames else np.zeros(len(stars))
    mag = np.asarray(stars[band], float)
    keep = np.isfinite(mag)
    return Table({"ra": np.asarray(stars["ra"], float)[keep],
                  "dec": np.asarray(stars["dec"], float)[keep], "mag": mag[keep],
                  "magerr": np.asarray(err, float)[keep]})


def check_frame(engine, row, info, profile, result) -> list[dict]:
    """Find, record and link the candidates of a reduced frame; the new rows (for alerts)."""
    from photowatch.io.candidates import candidates_dir
    from photowatch.stages.changes import find_candidates

    s = engine.settings.changes
    qc = result.qc
    if not s.enabled or result.wcs is None or not qc.get("abscal") \
            or qc.get("phot_status") != "ok" or qc.get("aststat") != "ok":
        return []
    shape = result.frame.sci.shape
    reference = reference_for(engine, info, profile, result.wcs, shape)
    if reference is None or len(reference) == 0:
        return []
    scale = info.pixel_scale_arcsec or 1.0
    fwhm_px = (qc.get("fwhm_arcsec") or math.nan) / scale
    hdr = result.frame.header
    limmag = hdr.get("LIMMAG", qc.get("limmag"))
    found = find_candidates(result.cat, reference, mask=result.frame.mask, fwhm_px=fwhm_px,
                            pixel_scale_arcsec=scale,
                            limmag=float(limmag) if limmag is not None else None, settings=s)
    table = found.table
    if len(table) > s.max_per_frame:
        table = table[np.argsort(-np.asarray(table["significance"]))[:s.max_per_frame]]
    mjd = mid_mjd(info)
    rows = [{"night": info.night, "target": info.target or "", "filter": info.filter or "",
             "frame": row["name"], "obs_mjd": mjd,
             **{c: (float(t[c]) if c != "kind" else str(t[c]))
                for c in ("ra", "dec", "x", "y", "mag", "magerr", "snr", "significance", "kind",
                          "ref_mag", "delta_mag")},
             "limmag": found.limmag if np.isfinite(found.limmag) else None}
            for t in table]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and not np.isfinite(v):
                r[k] = None
    ids = engine.store.replace_candidates(row["id"], rows)
    for r, i in zip(rows, ids):
        r["id"] = i
    link_field(engine.store, info.night, info.target or "", s)
    _alert_new(engine, info, rows)
    qc["candidates"] = {"new": sum(r["kind"] == "new" for r in rows),
                        "varying": sum(r["kind"] == "varying" for r in rows),
                        "limmag_used": found.limmag if np.isfinite(found.limmag) else None,
                        "reference_limit": found.reference_limit
                        if np.isfinite(found.reference_limit) else None,
                        "turned_away": found.rejected}
    if rows or (candidates_dir(engine.out, info.night) / "cutouts").is_dir():
        engine.in_background(draw_cutouts, engine.out, engine.store, info, row, rows,
                             result.frame.sci, result.frame.mask, result.wcs, reference,
                             s.cutout_px)
    write_night_table(engine.out, engine.store, info.night)
    return rows


def _alert_new(engine, info, rows: list[dict]) -> None:
    """``new_candidate`` alerts (lane live's hook, when present): a new object's first
    detection, and a varying star; an object seen before (or a track growing) is not news."""
    if not rows:
        return
    try:
        from photowatch.run.alerts import alert
    except ImportError:  # the alert hook is lane live's; without it, nothing to send
        return
    linked = {r["id"]: r for r in engine.store.candidates(info.night, info.target or "")}
    per_object: dict = {}
    for r in linked.values():
        per_object[r["object_id"]] = per_object.get(r["object_id"], 0) + 1
    for r in rows:
        row = linked.get(r["id"])
        if row is None or (r["kind"] == "new" and per_object.get(row["object_id"], 0) > 1):
            continue
        alert(engine, "new_candidate", {
            "night": info.night, "frame": r["frame"], "ra": r["ra"], "dec": r["dec"],
            "mag": r["mag"], "magerr": r["magerr"], "significance": r["significance"],
            "kind": r["kind"], "cutouts": [str(engine.out / "candidates" / info.night /
                                               "cutouts" / f"{r['frame'].rsplit('.', 1)[0]}_"
                                               f"{r['id']}{suffix}.png")
                                           for suffix in ("", "_ref")]})


def link_field(store, night: str, target: str, settings) -> None:
    """Re-link the night's new detections of a field (a few per frame: cheap) and store the
    groups: a moving track's detections share its object id and carry its rate."""
    from photowatch.stages.changes import link_tracks

    rows = store.candidates(night, target, kind="new")
    if not rows:
        return
    t = np.array([(r["obs_mjd"] or 0.0) * 1440.0 for r in rows])
    groups = link_tracks(t - t.min(), [r["ra"] for r in rows], [r["dec"] for r in rows],
                         settings)
    links = []
    for g in groups:
        ids = [rows[m]["id"] for m in g.members]
        oid = min(ids)
        for i in ids:
            links.append((i, oid, g.moving, g.rate_ra_arcsec_min if g.moving else None,
                          g.rate_dec_arcsec_min if g.moving else None))
    store.set_candidate_links(links)


def write_night_table(out, store, night: str) -> None:
    from photowatch.io.candidates import write_table

    write_table(out, night, store.candidates(night))


def draw_cutouts(out, store, info, row, rows, sci, mask, wcs, reference, size: int) -> None:
    """PNG cutouts around each candidate (background thread): the frame, and the reference
    it was compared with (the catalogue's stars drawn as discs on the frame's pixels).
    The frame's cutouts of an earlier reduction go first."""
    from photowatch.io.candidates import candidates_dir, save_cutout, save_star_chart

    folder = candidates_dir(out, info.night) / "cutouts"
    stem = row["name"].rsplit(".", 1)[0]
    for old in folder.glob(f"{stem}_*.png") if folder.is_dir() else ():
        old.unlink(missing_ok=True)
    if rows:
        sx, sy = wcs.all_world2pix(np.asarray(reference["ra"]), np.asarray(reference["dec"]), 0)
        flux = 10 ** (-0.4 * np.asarray(reference["mag"]))
    for r in rows:
        path = folder / f"{stem}_{r['id']}.png"
        save_cutout(sci, mask, r["x"], r["y"], size, path)
        ref_path = folder / f"{stem}_{r['id']}_ref.png"
        near = (np.abs(sx - r["x"]) < size / 2 + 1) & (np.abs(sy - r["y"]) < size / 2 + 1)
        save_star_chart(sx[near] - round(r["x"]), sy[near] - round(r["y"]), flux[near], size,
                        ref_path)
        store.set_candidate_cutouts(r["id"], str(path.relative_to(folder.parent)),
                                    str(ref_path.relative_to(folder.parent)))
    write_night_table(out, store, info.night)


__all__ = ["check_frame", "link_field", "write_night_table", "draw_cutouts", "mid_mjd"]
