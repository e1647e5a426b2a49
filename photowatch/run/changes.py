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

With a reference catalogue, absolutely calibrated frames are compared (CAT
magnitudes, an absolute WCS). Without one, the reference is the night's first
quick-look coadd of the target and filter: the catalogue of the coadd once it
holds ``[changes] reference_frames`` frames, extracted once and frozen in
``OUT/candidates/<night>/reference_<target>_<filter>.ecsv``; frames are then
compared in the coadd's units (reference electrons: ``-2.5 log10(flux x
FLXSCALE)``), and frames reduced before it existed are not compared.
"""

from __future__ import annotations

import io
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

    band = profile.band_for(info.filter)
    if engine.catalog is None or band is None:
        return None
    if hasattr(engine, "reference_stars"):  # the night context's cached cone
        stars, _ = engine.reference_stars(info, profile, wcs, shape)
    else:
        from photowatch.run.science import _reference_stars

        stars, _ = _reference_stars(engine, info, profile, wcs, shape)
    if stars is None or band not in stars.colnames:
        return None
    err = stars[f"{band}_err"] if f"{band}_err" in stars.colnames else np.zeros(len(stars))
    mag = np.asarray(stars[band], float)
    keep = np.isfinite(mag)
    return Table({"ra": np.asarray(stars["ra"], float)[keep],
                  "dec": np.asarray(stars["dec"], float)[keep], "mag": mag[keep],
                  "magerr": np.asarray(err, float)[keep]})


_COADD_REFS: dict = {}  #: path -> frozen coadd reference (read once per process)


def coadd_reference(engine, info):
    """The night's first coadd of the target and filter as a reference (ra, dec, mag, magerr
    in reference electrons, mag = -2.5 log10(flux)), frozen on first use; or None."""
    from astropy.table import Table

    from photowatch.io.candidates import candidates_dir, write_reference
    from photowatch.io.fits import write_bytes

    slug = "".join(c if c.isalnum() or c in "-." else "_"
                   for c in f"{info.target or 'field'}_{info.filter or 'none'}")
    path = candidates_dir(engine.out, info.night) / f"reference_{slug}.ecsv"
    cached = _COADD_REFS.get(str(path))
    if cached is not None:
        return cached
    from astropy.io import fits
    from astropy.wcs import WCS

    if path.is_file():
        table = Table.read(path, format="ascii.ecsv")
    else:
        row = engine.store.coadd(info.night, info.target or "", info.filter or "")
        if row is None or (row["ncombine"] or 0) < engine.settings.changes.reference_frames \
                or not row["path"]:
            return None
        from photowatch.coadd.catalogue import coadd_catalog

        cat = coadd_catalog(row["path"], magzp=0.0, settings=engine.settings.stages.sources,
                            detect_sigma=engine.settings.coadd.detect_sigma,
                            max_sources=engine.settings.coadd.max_sources)
        ok = np.isfinite(np.asarray(cat["mag"], float))
        table = Table({"ra": np.asarray(cat["ra"], float)[ok],
                       "dec": np.asarray(cat["dec"], float)[ok],
                       "mag": np.asarray(cat["mag"], float)[ok],
                       "magerr": np.asarray(cat["magerr"], float)[ok]})
        table.meta.update({"coadd": str(row["path"]), "ncombine": int(row["ncombine"]),
                           "units": "mag = -2.5 log10(flux in reference electrons)"})
        with fits.open(row["path"]) as hdul:
            ncov = np.asarray(hdul["NCOV"].data) if "NCOV" in hdul else \
                (np.asarray(hdul["WHT"].data) > 0).astype(np.int16) * int(row["ncombine"])
            whdr = hdul["SCI"].header
            full = ncov >= int(row["ncombine"])
        table.meta["wcs"] = WCS(whdr, naxis=2).to_header().tostring(sep="\n")
        buf = io.BytesIO()
        np.save(buf, np.packbits(full, axis=None))
        write_bytes(path.with_suffix(".cover.npy"), buf.getvalue(), fsync=False)
        table.meta["cover_shape"] = list(full.shape)
        write_reference(path, table)
        log.info("%s: the night's first coadd (%d frames) is the changes reference of %s %s "
                 "(%d sources)", row["path"], row["ncombine"], info.target, info.filter,
                 len(table))
    cover_path = path.with_suffix(".cover.npy")
    if "cover" not in table.meta and cover_path.is_file():
        shape = tuple(table.meta["cover_shape"])
        bits = np.unpackbits(np.load(cover_path))[:shape[0] * shape[1]]
        table.meta["cover"] = (WCS(fits.Header.fromstring(table.meta["wcs"], sep="\n")),
                               bits.reshape(shape).astype(bool))
    _COADD_REFS[str(path)] = table
    return table


def covered_by(reference, ra, dec) -> np.ndarray | None:
    """Per position: inside the part of a coadd reference that all its frames cover."""
    cover = reference.meta.get("cover") if reference is not None else None
    if cover is None:
        return None
    wcs, full = cover
    x, y = wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    ix, iy = np.rint(np.nan_to_num(x, nan=-1)).astype(int), \
        np.rint(np.nan_to_num(y, nan=-1)).astype(int)
    inside = (ix >= 0) & (iy >= 0) & (ix < full.shape[1]) & (iy < full.shape[0])
    out = np.zeros(ix.size, bool)
    out[inside] = full[iy[inside], ix[inside]]
    return out


def _relative_cat(cat, flxscale: float):
    """The CAT in the coadd's units: mag = -2.5 log10(flux x FLXSCALE)."""
    out = cat.copy()
    flux = np.asarray(cat["flux"], float) * flxscale
    err = np.asarray(cat["fluxerr"], float) * flxscale
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mag"] = np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1)), np.nan)
        out["magerr"] = np.where(flux > 0, 1.0857 * err / np.where(flux > 0, flux, 1), np.nan)
    return out


def check_frame(engine, row, info, profile, result) -> list[dict]:
    """Find, record and link the candidates of a reduced frame; the new rows (for alerts)."""
    from photowatch.io.candidates import candidates_dir
    from photowatch.stages.changes import find_candidates

    s = engine.settings.changes
    qc = result.qc
    if not s.enabled or result.wcs is None:
        return []
    shape = result.frame.sci.shape
    cat = result.cat
    limmag = result.frame.header.get("LIMMAG", qc.get("limmag"))
    if qc.get("abscal") and qc.get("phot_status") == "ok" and qc.get("aststat") == "ok":
        reference = reference_for(engine, info, profile, result.wcs, shape)
    elif engine.catalog is None and qc.get("flxscale") and qc.get("aststat") in ("ok", "relative"):
        reference = coadd_reference(engine, info)
        cat = _relative_cat(cat, float(qc["flxscale"]))
        limmag = None  # LIMMAG is calibrated; the relative limit comes from the CAT itself
    else:
        return []
    if reference is None or len(reference) == 0:
        return []
    covered = covered_by(reference, cat["ra"], cat["dec"])
    scale = info.pixel_scale_arcsec or 1.0
    fwhm_px = (qc.get("fwhm_arcsec") or math.nan) / scale
    found = find_candidates(cat, reference, mask=result.frame.mask, fwhm_px=fwhm_px,
                            pixel_scale_arcsec=scale,
                            limmag=float(limmag) if limmag is not None else None,
                            covered=covered, settings=s)
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
    had = engine.store.frame_has_candidates(row["id"])
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
    # the night's table changes only with this frame's candidates (none before, none now:
    # the table on disk is still the store's; ~6 ms of ECSV per 1k frame saved)
    if rows or had or not (candidates_dir(engine.out, info.night) / "candidates.ecsv").exists():
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
        sx, sy = wcs.all_world2pix(np.asarray(reference["ra"]), np.asarray(reference["dec"]), 0,
                                   quiet=True)
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
