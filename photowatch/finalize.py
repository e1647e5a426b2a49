"""``photowatch finalize``: the night's final, consistent products (run at dawn).

Steps, each idempotent (a second run only confirms; a run killed at any point
completes when run again; the store arbitrates with a daemon still running):

1. frames of the night still queued are processed;
2. final masters: each master rebuilt from all its accepted frames with a
   sigma-clipped median, in chunks of rows (bias, then dark, then flat); the
   master skies are written as final masters;
3. frames still waiting for masters get a last chance, else are rejected with the reason;
4. every frame reduced with a provisional or superseded master is re-reduced;
5. frame quality is judged again with the whole night known (the night's best
   zero point may have come late);
6. final coadds with per-pixel outlier rejection, and their catalogues;
7. the night report.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from photowatch.config import Settings
from photowatch.engine import Engine, OutputError
from photowatch.logs import get_logger
from photowatch.quality import assess

log = get_logger("photowatch.finalize")


@dataclass
class FinalizeResult:
    night: str | None
    ok: bool = True
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: str | None = None

    def text(self) -> str:
        if self.night is None:
            return "photowatch finalize: nothing to finalize (no frames in the store)"
        lines = [f"photowatch finalize {self.night}: {'done' if self.ok else 'INCOMPLETE'} in "
                 f"{self.seconds:.1f} s"]
        lines += [f"  {d}" for d in self.done]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False)


def finalize(settings: Settings, *, night: str | None = None, catalog: str | None = None,
             workers: int | None = None) -> FinalizeResult:
    t0 = time.perf_counter()
    engine = Engine(settings, catalog_path=catalog, command="finalize", workers=workers)
    engine.startup()
    try:
        nights = engine.store.nights()
        night = night or (nights[-1] if nights else None)
        result = FinalizeResult(night)
        if night is None:
            return result
        log.info("finalize_start", night=night, out=str(engine.out))
        try:
            _run(engine, night, result)
        except OutputError as exc:
            result.ok = False
            result.problems.append(f"{exc}; run finalize again when fixed")
        result.seconds = time.perf_counter() - t0
        log.info("finalize_done", night=night, ok=result.ok, seconds=round(result.seconds, 1))
        return result
    finally:
        engine.shutdown()


def _drain(engine: Engine, night: str, *, rereduce: bool) -> None:
    stop = threading.Event()
    engine.run(stop, until_idle=True, rereduce=rereduce, nights=[night])


def _run(engine: Engine, night: str, result: FinalizeResult) -> None:
    store = engine.store
    bar = _progress(f"finalize {night}", total=7)

    # 1. whatever is still queued
    _drain(engine, night, rereduce=False)
    bar.update()

    # 2. final masters and skies
    made = engine.book.final_masters(night, progress=lambda msg: bar.set_postfix_str(msg))
    made += engine.skies.finalize(night)
    for cand in made:
        engine.book.mark_stale(cand)
    finals = [m for m in store.latest_masters(night) if m["final"]]
    result.done.append(f"masters: {len(made)} rebuilt now, {len(finals)} final")
    _write_bpms(engine, night)
    bar.update()

    # 3. frames waiting for masters: a last chance, then rejected with the reason
    if store.wake_waiting("night=?", (night,)):
        _drain(engine, night, rereduce=False)
    from photowatch.batch import close_waiting

    n_closed = close_waiting(engine, why="no usable master by the end of the night: ")
    if n_closed:
        result.done.append(f"{n_closed} frame(s) rejected: no usable master by the end of night")
    bar.update()

    # 4. re-reduce what used provisional or superseded masters
    n_stale = len(store.frames("night=? AND stale=1", (night,)))
    _drain(engine, night, rereduce=True)
    left = len(store.frames("night=? AND stale=1", (night,)))
    result.done.append(f"re-reduced {n_stale - left} frame(s) with better masters")
    if left:
        result.ok = False
        result.problems.append(f"{left} stale frame(s) could not be re-reduced")
    bar.update()

    from photowatch.calib.defects import mark_night_defects

    result.done += mark_night_defects(engine, night)  # COSMIC in most frames: defects

    # 5. quality with the whole night known
    changed = reassess(engine, night)
    if changed:
        result.done.append(f"quality re-judged with the whole night: {changed} frame(s) changed")
    bar.update()

    # 6. final coadds and catalogues
    coadds = final_coadds(engine, night, progress=lambda msg: bar.set_postfix_str(msg))
    result.done += coadds
    bar.update()

    # 7. the report
    from photowatch.report import write_report

    report = write_report(engine.out, store, night, engine.settings, final=True)
    result.report = str(report)
    bar.update()
    bar.close()
    counts = store.counts(night)
    result.done.insert(0, "frames: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    not_terminal = counts.get("received", 0) + counts.get("processing", 0)
    if not_terminal:
        result.ok = False
        result.problems.append(f"{not_terminal} frame(s) not terminal (another process has them?)")


def _write_bpms(engine: Engine, night: str) -> None:
    """Write each camera's bad-pixel mask from its final dark and flat (for people and DS9)."""
    from photowatch.classify import FrameInfo

    seen = set()
    for row in engine.store.frames("night=? AND kind='object' AND info_json IS NOT NULL",
                                   (night,)):
        info = FrameInfo.from_summary(json.loads(row["info_json"]))
        key = (info.camera, info.binning, info.readout)
        if key in seen:
            continue
        seen.add(key)
        dark = engine.book.select("dark", info)
        flat = engine.book.select("flat", info)
        engine.book.write_bpm(night, info.camera, info.binning, info.readout,
                              engine.book.load(dark) if dark else None,
                              engine.book.load(flat) if flat else None)


def reassess(engine: Engine, night: str) -> int:
    """Judge every reduced object frame again against the whole night; returns changes."""
    store = engine.store
    changed = 0
    rows = store.frames("night=? AND kind='object' AND product IS NOT NULL AND "
                        "state IN ('reduced', 'rejected')", (night,))
    for row in rows:
        qc = json.loads(row["qc_json"] or "{}")
        key = "zp_per_s" if qc.get("zp_per_s") is not None else "transparency_mag"
        peers = [json.loads(r["qc_json"] or "{}").get(key) for r in rows
                 if r["filter"] == row["filter"] and (key == "zp_per_s" or
                                                      r["target"] == row["target"])]
        peers = [p for p in peers if p is not None]
        fwhms = [json.loads(r["qc_json"] or "{}").get("fwhm_arcsec") for r in rows
                 if r["filter"] == row["filter"] and r["id"] != row["id"]]
        fwhms = [f for f in fwhms if f is not None]
        verdict = assess(qc, best_transparency_mag=max(peers) if peers else None,
                         settings=engine.settings.quality,
                         night_fwhm_arcsec=float(np.median(fwhms)) if len(fwhms) >= 3 else None)
        accepted = int(verdict.accepted)
        if accepted == (row["accepted"] or 0) and (verdict.reason or None) == row["reason"]:
            continue
        new_state = "reduced" if verdict.accepted else "rejected"
        qc["accepted"] = verdict.accepted
        coadd = row["coadd"] if verdict.accepted else "excluded"
        if verdict.accepted and row["coadd"] in (None, "excluded"):
            coadd = "pending"
        store.transition(row["id"], [row["state"]], new_state, accepted=accepted,
                         reason=verdict.reason, qc_json=qc, coadd=coadd,
                         message=f"re-judged with the whole night: {verdict.reason or 'accepted'}",
                         level="info" if verdict.accepted else "warning",
                         action="stacked" if verdict.accepted else "kept out of the coadd")
        changed += 1
    return changed


def final_coadds(engine: Engine, night: str, progress=None) -> list[str]:
    """Final outlier-rejected coadd and catalogue of every (target, filter) of the night."""
    from photowatch.coadd import FinalMember, final_coadd

    store = engine.store
    settings = engine.settings.coadd
    done = []
    if not settings.enabled:
        return done
    rows = store.frames("night=? AND kind='object' AND state='reduced' AND accepted=1 AND "
                        "product IS NOT NULL", (night,))
    groups: dict[tuple, list] = {}
    for row in rows:
        qc = json.loads(row["qc_json"] or "{}")
        if qc.get("aststat") == "failed" or not qc.get("flxscale") or not qc.get("skynoise_e"):
            continue
        groups.setdefault((row["target"], row["filter"]), []).append((row, qc))
    catalogs: dict[str, dict] = {}
    for (target, filt), members in sorted(groups.items()):
        specs = [FinalMember(member_id=f"{r['name']}:v{r['product_version']}", path=r["product"],
                             flxscale=float(qc["flxscale"]), skynoise=float(qc["skynoise_e"]),
                             exptime_s=float(r["exptime"] or 0)) for r, qc in members]
        ids = sorted(m.member_id for m in specs)
        path = engine.coadds.path(night, target, filt)
        row = store.coadd(night, target, filt)
        magzp = engine.coadds._magzp((night, target, filt))
        up_to_date = (row is not None and row["stacktype"] == "FINAL" and not row["outdated"]
                      and json.loads(row["members_json"] or "[]") == ids and path.exists())
        if not up_to_date:
            grid = _covering_grid(engine, night, target, filt, row, members)
            if progress:
                progress(f"coadd {target} {filt} ({len(specs)} frames)")
            with engine.coadds.lock((night, target, filt)):
                final_coadd(specs, grid, path, clip_sigma=settings.clip_sigma,
                            chunk_rows=settings.chunk_rows, magzp=magzp,
                            header_extra={"TARGET": target, "FILTNAME": filt, "NIGHT": night,
                                          "ABSCAL": magzp is not None},
                            step_px=settings.mapping_step_px,
                            interpolation=settings.interpolation,
                            amp_frac=settings.clip_amp_frac, grow_px=settings.clip_grow_px)
                engine.coadds._accs.pop((night, target, filt), None)
            png = None
            if settings.quicklook_png:
                from astropy.io import fits

                from photowatch.quicklook import save_png

                png = path.with_suffix(".png")
                save_png(fits.getdata(path, "SCI"), png, max_size=1024)
            store.upsert_coadd(night=night, target=target, filter=filt, path=str(path),
                               stacktype="FINAL", ncombine=len(specs),
                               exptime=sum(m.exptime_s for m in specs), magzp=magzp,
                               grid=grid.to_dict(), members=ids,
                               quicklook=str(png) if png else None)
            done.append(f"final coadd {path.name}: {len(specs)} frames")
        catalogs.setdefault(target, {})[filt] = (path, magzp, not up_to_date)
    done += _catalogues(engine, night, catalogs)
    return done


def _covering_grid(engine: Engine, night: str, target: str, filt: str, row, members):
    """The night's grid of a coadd, grown if needed to cover every member frame."""
    from astropy.io import fits

    from photowatch.coadd import CoaddGrid
    from photowatch.coaddbook import _wcs

    grid = None
    if row is not None and row["grid_json"]:
        grid = CoaddGrid.from_json(row["grid_json"])
    for member, _ in members:
        header = fits.getheader(member["product"], "SCI")
        wcs, shape = _wcs(header), (header["NAXIS2"], header["NAXIS1"])
        if grid is None:
            grid = engine.coadds.grid(night, target, filt, wcs, shape)
            continue
        grown = engine.coadds.covering(grid, wcs, shape, member["raw_name"])
        if grown is not None:
            grid = grown[0]
    return grid


def _catalogues(engine: Engine, night: str, catalogs: dict) -> list[str]:
    from photowatch.photometry import catalog_path, coadd_catalog, merge_bands, write_catalog

    done = []
    for target, per_filter in catalogs.items():
        fresh = any(changed or not catalog_path(path).exists()
                    for path, _, changed in per_filter.values())
        if not fresh:
            continue
        tables = {}
        for filt, (path, magzp, _) in per_filter.items():
            cat_path = catalog_path(path)
            table = coadd_catalog(path, magzp=magzp,
                                  detect_sigma=engine.settings.coadd.detect_sigma,
                                  max_sources=engine.settings.coadd.max_sources)
            if magzp is not None:
                _calibrate_catalogue(engine, night, target, filt, path, table)
            tables[filt] = (table, cat_path)
        merged = merge_bands({f: t for f, (t, _) in tables.items()},
                             radius_arcsec=engine.settings.coadd.merge_radius_arcsec) \
            if len(tables) > 1 else None
        for filt, (table, cat_path) in tables.items():
            if merged is not None:
                table = _with_bands(table, merged, engine.settings.coadd.merge_radius_arcsec)
            write_catalog(table, cat_path)
            row = engine.store.coadd(night, target, filt)
            with engine.store.transaction() as conn:
                conn.execute("UPDATE coadds SET catalog=? WHERE id=?", (str(cat_path), row["id"]))
            done.append(f"catalogue {cat_path.name}: {len(table)} sources")
    return done


def _calibrate_catalogue(engine: Engine, night: str, target: str, filt: str, path, table):
    """Calibrate a coadd catalogue against the reference catalogue, as PhotoPipe does.

    The coadd's pixels are on its photometric reference (MAGZP of the file); its
    catalogue's aperture-corrected fluxes carry the coadd's own aperture correction, whose
    PSF is a blend of the night's seeings. Fitting the catalogue's magnitudes to the
    reference catalogue (the frames' method) removes that dependence. The file's MAGZP
    is kept as MAGZPREF in the catalogue header.
    """
    from astropy.io import fits

    from photowatch.catalogs import field_cone
    from photowatch.classify import FrameInfo
    from photowatch.coaddbook import _wcs
    from photowatch.stages.zeropoint import calibrate_zeropoint

    provider = engine.catalog
    rows = engine.store.frames("night=? AND target=? AND filter=? AND kind='object'",
                               (night, target, filt))
    if provider is None or not rows:
        return
    info = FrameInfo.from_summary(json.loads(rows[0]["info_json"]))
    band = engine.profile(info.instrument).band_for(filt)
    if band is None:
        return
    header = fits.getheader(path, "SCI")
    shape = (header["NAXIS2"], header["NAXIS1"])
    try:
        ra, dec, radius = field_cone(_wcs(header), shape)
        reference = provider.query(ra, dec, radius, bands=[band])
    except Exception as exc:  # the catalogue is down: keep the reference zero point
        log.warning("coadd_catalogue_not_calibrated", coadd=Path(path).name, problem=str(exc),
                    action="magnitudes from the coadd's reference zero point")
        return
    zp = calibrate_zeropoint(table, reference, band=band, shape=shape,
                             settings=engine.settings.stages.zeropoint)
    if zp.status != "ok":
        log.warning("coadd_catalogue_not_calibrated", coadd=Path(path).name, problem=zp.reason,
                    action="magnitudes from the coadd's reference zero point")
        return
    flux = np.asarray(table["flux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["mag"] = np.where(flux > 0, zp.magzp - 2.5 * np.log10(flux), np.nan)
    table["magerr"] = np.hypot(np.asarray(table["magerr"], float), zp.magzp_err)
    table.meta.update({"MAGZPREF": table.meta.get("MAGZP"), "MAGZP": zp.magzp,
                       "MAGZPERR": zp.magzp_err, "MAGZPN": zp.n, "ZPMETHOD": "catalogue"})


def _with_bands(table, merged, radius: float = 1.0):
    """Add the per-band columns of the merged catalogue to one filter's catalogue (by position)."""
    import numpy as np

    from photowatch.stages.zeropoint import match_sky

    a, b = match_sky(table["ra"], table["dec"], merged["ra"], merged["dec"], radius)
    out = table.copy()
    for col in merged.colnames:
        if col.startswith(("mag_", "magerr_")):
            values = np.full(len(out), np.nan)
            values[a] = np.asarray(merged[col], float)[b]
            out[col] = values
    return out


def rebuild_masters(settings: Settings, night: str | None = None) -> str:
    """``photowatch masters rebuild``: the final masters of a night, now."""
    engine = Engine(settings, command="masters-rebuild")
    engine.startup()
    try:
        night = night or (engine.store.nights() or [None])[-1]
        if night is None:
            return "no frames in the store"
        made = engine.book.final_masters(night)
        for cand in made:
            engine.book.mark_stale(cand)
        return "\n".join(f"final {Path(c.path).name} ({c.ninputs} inputs)" for c in made) or \
            f"masters of {night} are already final"
    finally:
        engine.shutdown()
