"""The night report: a static page an observer reads at 5 am, and the same facts as JSON.

``OUT/report/<night>/``::

    index.html   one self-contained page (inline CSS, a few lines of inline JS to
                 sort tables, PNG plots and thumbnails; no external assets), opens
                 from the file system without a server
    night.json   the same facts for machines: every frame of the night with its state
    img/         conditions and latency plots, master and coadd thumbnails and previews,
                 and ``cache.json`` (what each image was made from)

The report is a view of the store: it reads, never writes, the store. It is
refreshed during the night (``final=False``, a QUICK-LOOK page that reloads
itself) and written once more by ``finalize`` (``final=True``). A refresh when
nothing changed reads the store and writes the two text files only: each
image is remade only when what it shows changed (the source FITS/PNG's mtime
and size for thumbnails, a hash of the plotted values for plots).

Notes
-----
Frames that could not be classified have no night; they are listed in the
report of the night whose frames were ingested next to them (nearest frame id).
Links are relative to the report folder and are written only for files that
exist, so the page works when ``OUT`` is copied elsewhere as a whole.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import json
import math
import os
import sys
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

from photowatch import __version__
from photowatch.io.fits import write_bytes
from photowatch.report.lightcurve import lightcurve_facts, plot_lightcurves
from photowatch.run.status import status_data
from photowatch.state.store import TERMINAL

#: order of states in tables (the flow of a frame)
STATE_ORDER = ("received", "processing", "waiting", "held", "used", "reduced", "rejected",
               "quarantined", "ignored")
KIND_ORDER = ("bias", "dark", "flat", "object")
#: states listed under "Problems"
PROBLEM_STATES = ("rejected", "quarantined", "held", "ignored", "waiting")
#: numbers of ``frames.qc_json`` copied into night.json
QC_KEYS = ("exptime", "fwhm_arcsec", "ellipticity", "nsources", "sky_e", "sky_e_per_s",
           "skynoise_e", "ncr", "airmass", "aststat", "astrms_arcsec", "astnstar", "astreason",
           "astsuspect", "zp", "zp_err", "zp_n", "zp_per_s", "flxscale", "transparency_mag", "phot_status",
           "phot_reason", "accepted")
THUMB_PX = 240  #: longest side of a thumbnail
PREVIEW_PX = 1024  #: longest side of a preview made from a FITS file
ASINH_A = 0.15  #: softening of the asinh stretch (smaller: brighter faint parts)
PLOT_STYLE = 2  #: bump to remake every plot after a change of style

# page and plot colours (dark, readable at night)
BG, PANEL, BORDER = "#0f1216", "#171b22", "#2b313c"
TEXT, MUTED = "#e4e8ee", "#98a2b3"
GOOD, WARN, BAD, LINK = "#5cd18f", "#f3b74f", "#ff6b6b", "#82bdff"
NODATA_RGB = (28, 33, 42)
FILTER_COLOURS = {"u": "#b59cff", "b": "#6aa8ff", "g": "#59d98c", "v": "#9be15d",
                  "r": "#ff7b5c", "i": "#ffc857", "z": "#f07de8", "y": "#e8b4ff",
                  "j": "#4fd6e8", "h": "#3fc8b0", "k": "#c6e35a"}
SPARE_COLOURS = ("#8fb3ff", "#ffa3c4", "#a0e7c8", "#ffd08a", "#c9a6ff", "#7fe0ff")

#: one report writer at a time in a process (the engine's workers may all ask for one)
_WRITE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------- entry point

def write_report(out: Path, store, night: str, settings, *, final: bool) -> Path:
    """Write ``OUT/report/<night>/index.html``, ``night.json`` and ``img/`` (atomically).

    Parameters
    ----------
    out
        the output directory (``OUT``)
    store
        the :class:`~photowatch.state.store.Store` of ``OUT`` (only read)
    night
        the night label, ``YYYY-MM-DD``
    settings
        the :class:`~photowatch.core.config.Settings` in use (shown in the report)
    final
        True for the end-of-night report written by ``finalize``; False for the
        QUICK-LOOK page refreshed during the night

    Returns
    -------
    Path
        the ``index.html`` written
    """
    with _WRITE_LOCK:
        return _write_report(Path(out), store, night, settings, final=final)


def _write_report(out: Path, store, night: str, settings, *, final: bool) -> Path:
    folder = out / "report" / night
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    facts = collect_facts(out, store, night, settings, final=final)
    cache = _ImageCache(img)
    images = {
        "masters": [_master_images(m, folder, cache) for m in facts["masters"]],
        "coadds": [_coadd_images(c, folder, cache) for c in facts["coadds"]],
        "conditions": _conditions_plot(facts["frames"], img, cache),
        "latency": _latency_plot(facts["frames"], img, cache),
        "lightcurves": _lightcurve_plot(facts.get("lightcurves") or {}, img, cache),
    }
    cache.save()
    page = render_html(facts, images, folder, settings)
    write_bytes(folder / "night.json",
                json.dumps(facts, indent=1, default=str, allow_nan=False).encode(), fsync=False)
    return write_bytes(folder / "index.html", page.encode(), fsync=False)


# ---------------------------------------------------------------------------- facts

def _num(value):
    """A JSON-safe number: None for missing or non-finite values."""
    if value is None or isinstance(value, bool | str):
        return value
    try:
        value = float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _seconds(start: str | None, end: str | None) -> float | None:
    a, b = _parse_time(start), _parse_time(end)
    if a is None or b is None:
        return None
    return round((b - a).total_seconds(), 3)


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of photowatch, its numerical dependencies and Python (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"photowatch": __version__}
    for name in ("numpy", "scipy", "astropy", "astroscrappy", "sep", "matplotlib"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = sys.version.split()[0]
    return versions


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"n": 0, "median": None, "p95": None, "max": None}
    return {"n": int(v.size), "median": round(float(np.median(v)), 3),
            "p95": round(float(np.percentile(v, 95)), 3), "max": round(float(v.max()), 3)}


def _orphan_rows(store, night: str) -> list:
    """Frames without a night (unclassifiable) that belong with this night's ingest."""
    orphans = []
    for row in store.frames("night IS NULL"):
        near = store.conn.execute(
            "SELECT night FROM frames WHERE night IS NOT NULL ORDER BY ABS(id - ?), id LIMIT 1",
            (row["id"],)).fetchone()
        if near is not None and near["night"] == night:
            orphans.append(row)
    return orphans


def _first_done(store, ids: list[int]) -> dict[int, str]:
    """Time of each frame's first terminal state (its first product), from the events."""
    done: dict[int, str] = {}
    marks = ",".join("?" * len(TERMINAL))
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        rows = store.conn.execute(
            f"SELECT frame_id, MIN(time) t FROM events WHERE state_to IN ({marks}) AND "
            f"frame_id IN ({','.join('?' * len(chunk))}) GROUP BY frame_id",
            (*TERMINAL, *chunk)).fetchall()
        done.update({r["frame_id"]: r["t"] for r in rows})
    return done


def _frame_entry(row, base: dict | None, done: dict[int, str]) -> dict:
    qc = json.loads(row["qc_json"] or "{}")
    entry = dict(base) if base else {
        "file": row["raw_name"], "path": row["path"], "name": row["name"], "type": row["kind"],
        "filter": row["filter"], "target": row["target"], "night": row["night"],
        "obs_time": row["obs_time"], "state": row["state"], "reason": row["reason"],
        "product": row["product"], "stale": bool(row["stale"]),
        "provisional": bool(row["provisional"]), "coadd": row["coadd"],
        "fwhm_arcsec": qc.get("fwhm_arcsec"), "zp": qc.get("zp"), "astrometry": qc.get("aststat")}
    # the store row is the newer read: its state wins if the frame moved in between
    entry.update(state=row["state"], reason=row["reason"], product=row["product"])
    done_at = done.get(row["id"]) or (row["finished_at"] if row["state"] in TERMINAL else None)
    entry.update({
        "id": row["id"], "quicklook": row["quicklook"], "instrument": row["instrument"],
        "camera": row["camera"], "binning": row["binning"], "exptime": _num(row["exptime"]),
        "tries": row["tries"], "arrived_at": row["arrived_at"],
        "received_at": row["received_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "done_at": done_at,
        "latency_s": _seconds(row["arrived_at"], done_at),
        "stale_reason": row["stale_reason"],
    })
    for key in QC_KEYS:
        if key in qc:
            entry[key] = _num(qc[key])
    entry["checks"] = qc.get("checks")
    entry["timings"] = {k: _num(v) for k, v in (qc.get("timings") or {}).items()}
    masters = json.loads(row["masters_json"] or "{}")
    entry["masters"] = {k: {"path": m.get("path"), "version": m.get("version"),
                            "night": m.get("night"), "master_id": m.get("master_id")}
                        for k, m in masters.items()}
    return entry


def _masters(store, night: str, frames: list[dict]) -> list[dict]:
    """Newest version of each master key of the night, plus older masters used tonight."""
    versions: dict[tuple, list] = {}
    for m in store.masters("night=?", (night,)):
        key = (m["kind"], m["camera"], m["filter"], m["binning"], m["readout"], m["target"])
        versions.setdefault(key, []).append(m)
    used_ids = {u.get("master_id") for f in frames for u in (f.get("masters") or {}).values()}
    items = []
    for m in store.latest_masters(night):
        key = (m["kind"], m["camera"], m["filter"], m["binning"], m["readout"], m["target"])
        allv = versions.get(key, [m])
        items.append(_master_entry(m, len(allv), used_ids, this_night=True))
    others = [i for i in used_ids if i is not None]
    if others:
        rows = store.masters(f"night != ? AND id IN ({','.join('?' * len(others))})",
                             (night, *others))
        items += [_master_entry(m, None, used_ids, this_night=False) for m in rows]
    return items


def _master_entry(m, nversions: int | None, used_ids: set, *, this_night: bool) -> dict:
    return {
        "id": m["id"], "kind": m["kind"], "camera": m["camera"], "filter": m["filter"] or None,
        "binning": m["binning"], "readout": m["readout"] or None, "target": m["target"] or None,
        "night": m["night"], "version": m["version"], "nversions": nversions,
        "ninputs": m["ninputs"], "inputs": json.loads(m["inputs_json"] or "[]"),
        "provisional": bool(m["provisional"]), "final": bool(m["final"]),
        "method": m["method"], "obs_time": m["obs_time"], "created_at": m["created_at"],
        "path": m["path"], "exists": Path(m["path"]).is_file(), "this_night": this_night,
        "used_tonight": m["id"] in used_ids,
    }


def _coadds(store, night: str) -> list[dict]:
    items = []
    for c in store.coadds(night):
        members = json.loads(c["members_json"] or "[]")
        items.append({
            "target": c["target"], "filter": c["filter"], "stacktype": c["stacktype"],
            "ncombine": c["ncombine"], "exptime": _num(c["exptime"]), "magzp": _num(c["magzp"]),
            "path": c["path"], "quicklook": c["quicklook"], "catalog": c["catalog"],
            "outdated": bool(c["outdated"]), "updated_at": c["updated_at"], "members": members,
            **_final_comparison(c),
        })
    return items


def _final_comparison(c) -> dict:
    """A FINAL coadd against the quick-look one (finalize's stats): FINALSTAT, what was lost."""
    stats = json.loads(c["stats_json"] or "{}")
    if c["stacktype"] != "FINAL" or "finalstat" not in stats:
        return {}
    return {"finalstat": stats.get("finalstat"), "finalreason": stats.get("finalreason"),
            "lost": stats.get("lost") or [], "quicklook_stack": stats.get("quicklook"),
            "final_stack": stats.get("final")}


def _errors(store, night: str, frames: list[dict], limit: int = 25) -> list[dict]:
    """The night's last warning/error events (of its frames, or of no frame during it)."""
    times = sorted(t for f in frames for t in (f["received_at"], f["finished_at"]) if t)
    orphans = [f["id"] for f in frames if f["night"] is None]
    where, args = ["f.night = ?"], [night]
    if orphans:
        where.append(f"e.frame_id IN ({','.join('?' * len(orphans))})")
        args += orphans
    if times:
        where.append("(e.frame_id IS NULL AND e.time BETWEEN ? AND ?)")
        args += [times[0], times[-1]]
    rows = store.conn.execute(
        "SELECT e.* FROM events e LEFT JOIN frames f ON f.id = e.frame_id "
        f"WHERE e.level IN ('warning', 'error') AND ({' OR '.join(where)}) "
        "ORDER BY e.id DESC LIMIT ?", (*args, limit)).fetchall()
    return [{"time": e["time"], "file": e["file"], "level": e["level"], "event": e["event"],
             "stage": e["stage"], "error_class": e["error_class"], "message": e["message"],
             "action": e["action"], "state_to": e["state_to"]} for e in rows]


def _header_value(store, night: str, key: str) -> str | None:
    row = store.conn.execute(
        f"SELECT json_extract(header_json, '$.{key}') v FROM frames WHERE night=? AND "
        f"json_extract(header_json, '$.{key}') IS NOT NULL LIMIT 1", (night,)).fetchone()
    return str(row["v"]) if row else None


def collect_facts(out: Path, store, night: str, settings, *, final: bool) -> dict:
    """Every fact of the report (the content of ``night.json``), read from the store."""
    base = status_data(store.path.parent, night)
    rows = list(store.frames("night=?", (night,))) + _orphan_rows(store, night)
    by_key: dict[tuple, list] = {}
    for e in base["frames"]:
        by_key.setdefault((e["path"], e["name"]), []).append(e)
    done = _first_done(store, [r["id"] for r in rows])
    frames = []
    for row in rows:
        match = by_key.get((row["path"], row["name"]))
        frames.append(_frame_entry(row, match.pop(0) if match else None, done))

    by_state: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    for f in frames:
        by_state[f["state"]] = by_state.get(f["state"], 0) + 1
        kind = f["type"] or "unclassified"
        by_type.setdefault(kind, {})
        by_type[kind][f["state"]] = by_type[kind].get(f["state"], 0) + 1
    counts = {
        "total": len(frames), "by_state": by_state, "by_type": by_type,
        "pending": sum(by_state.get(s, 0) for s in ("received", "processing")),
        "waiting": by_state.get("waiting", 0),
        "stale": sum(1 for f in frames if f.get("stale")),
        "duplicates": len(base.get("duplicates") or []),
    }
    latency = {
        "science": _stats([f["latency_s"] for f in frames
                           if f["type"] == "object" and f["state"] in ("reduced", "rejected")
                           and f["product"]]),
        "calibration": _stats([f["latency_s"] for f in frames if f["state"] == "used"]),
    }
    latency["all"] = _stats([f["latency_s"] for f in frames
                             if f["state"] in ("used", "reduced") or
                             (f["state"] == "rejected" and f["product"])])
    stage_s: dict[str, list] = {}
    for f in frames:
        for k, v in (f.get("timings") or {}).items():
            stage_s.setdefault(k, []).append(v)
    obs = sorted(f["obs_time"] for f in frames if f["obs_time"])
    instruments = sorted({(f["instrument"] or "").upper() for f in frames if f["instrument"]})
    return {
        "night": night, "final": bool(final),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "out": str(out), "instrument": ", ".join(instruments) or None,
        "telescope": _header_value(store, night, "TELESCOP") if frames else None,
        "first_obs": obs[0] if obs else None, "last_obs": obs[-1] if obs else None,
        "counts": counts, "latency_s": latency,
        "stage_seconds": {k: _stats(v) for k, v in sorted(stage_s.items())},
        "frames": frames, "masters": _masters(store, night, frames),
        "coadds": _coadds(store, night), "errors": _errors(store, night, frames),
        "lightcurves": lightcurve_facts(store, night),  # issue 21 (report/lightcurve.py)
        "duplicates": base.get("duplicates") or [],
        "finalize": store.get_meta(f"finalize:{night}") if final else None,
        "processes": [{k: p[k] for k in ("command", "started_at", "status")}
                      for p in base.get("processes") or []],
        "versions": software_versions(),
        "settings_source": getattr(settings, "source", None),
        "settings": settings.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------- images

class _ImageCache:
    """``img/cache.json``: what each image was made from, to remake only what changed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "cache.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.changed = False
        self.made: list[str] = []

    def fresh(self, name: str, stamp) -> bool:
        return self.data.get(name) == stamp and (self.folder / name).is_file()

    def record(self, name: str, stamp) -> None:
        self.data[name] = stamp
        self.changed = True
        self.made.append(name)

    def save(self) -> None:
        if self.changed:
            write_bytes(self.path, json.dumps(self.data, indent=0).encode(), fsync=False)


def _file_stamp(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [str(path), st.st_mtime_ns, st.st_size]


def _slug(*parts) -> str:
    text = "_".join(str(p) for p in parts if p)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _block_mean(data: np.ndarray, max_px: int) -> np.ndarray:
    """Average ``f x f`` blocks so the longest side is at most ``max_px`` (NaN ignored)."""
    f = max(1, math.ceil(max(data.shape) / max_px))
    if f == 1:
        return data
    ny, nx = (data.shape[0] // f) * f, (data.shape[1] // f) * f
    blocks = data[:ny, :nx].reshape(ny // f, f, nx // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3))


def _read_sci(path: Path) -> np.ndarray:
    """The SCI image of a FITS file (else its first image), NaN where WHT is zero."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            if "SCI" in names:
                data = hdul["SCI"].data
            else:
                data = next((h.data for h in hdul if getattr(h, "is_image", False)
                             and h.data is not None and h.data.ndim == 2), None)
            if data is None:
                raise ValueError(f"{path.name}: no 2-d image (SCI) to show")
            data = np.array(data, dtype=np.float32)
            if "WHT" in names and hdul["WHT"].data is not None:
                wht = hdul["WHT"].data
                if wht.shape == data.shape:
                    data[~(wht > 0)] = np.nan
    return data


def _stretch(data: np.ndarray, limits: tuple[float, float]):
    """Display limits then asinh, as an 8-bit palette image (FITS row 0 at the bottom).

    Indices 0-254 are a grey ramp, 255 is the no-data colour (NaN pixels); a
    palette PNG encodes about three times faster than RGB.
    """
    from PIL import Image

    lo, hi = limits
    with np.errstate(invalid="ignore"):
        v = np.clip((data - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    v = np.arcsinh(v / ASINH_A) / np.arcsinh(1.0 / ASINH_A)
    index = np.nan_to_num(v * 254.0, nan=0.0).astype(np.uint8)
    index[~np.isfinite(data)] = 255
    im = Image.fromarray(np.ascontiguousarray(index[::-1]), mode="P")
    ramp = np.linspace(0, 255, 255).astype(np.uint8)
    im.putpalette([*np.repeat(ramp, 3).tolist(), *NODATA_RGB])
    return im


def display_limits(data: np.ndarray) -> tuple[float, float]:
    """Display range: zscale, with the floor raised to sky - 2 sigma and the top to sky + 10 sigma.

    The sky then shows dark grey rather than mid grey, and faint stars stay visible
    after the asinh stretch; sigma is the MAD of the finite pixels.
    """
    from astropy.visualization import ZScaleInterval

    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = ZScaleInterval().get_limits(finite)
    med = float(np.median(finite))
    sigma = 1.4826 * float(np.median(np.abs(finite - med)))
    lo, hi = max(float(lo), med - 2 * sigma), max(float(hi), med + 10 * sigma)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    return lo, (hi if hi > lo else lo + 1.0)


def fits_previews(path: Path, sizes: tuple[int, ...]) -> list[bytes]:
    """PNG bytes of a FITS image's SCI at each longest side in ``sizes`` (see display_limits).

    The image is block-averaged to at most ``max(sizes)``; smaller sizes are
    resampled from that (Lanczos), so a thumbnail fills its box.
    """
    from PIL import Image

    data = _block_mean(_read_sci(path), max(sizes))
    full = _stretch(data, display_limits(data))
    pngs = []
    for px in sizes:
        im = full
        if max(full.size) > px:  # resample in RGB (a palette image would be resized nearest)
            im = full.convert("RGB")
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=3)
        pngs.append(buf.getvalue())
    return pngs


def png_thumbnail(path: Path, max_px: int = THUMB_PX) -> bytes:
    """A smaller copy of a PNG image."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _master_images(m: dict, folder: Path, cache: _ImageCache) -> dict:
    """Thumbnail and preview of one master (remade when its FITS file changed)."""
    if not m["this_night"]:
        return {}
    base = "master_" + _slug(m["kind"], m["camera"], m["filter"], m["target"], m["binning"],
                              m["readout"])
    return _fits_images(Path(m["path"]), base, folder, cache)


def _fits_images(src: Path, base: str, folder: Path, cache: _ImageCache) -> dict:
    """Thumbnail and preview PNGs of a FITS file's image, remade only when the file changed."""
    stamp = _file_stamp(src)
    if stamp is None:
        return {}
    names = (f"{base}_thumb.png", f"{base}.png")
    if not all(cache.fresh(n, stamp) for n in names):
        try:
            thumb, preview = fits_previews(src, (THUMB_PX, PREVIEW_PX))
        except Exception as exc:  # a thumbnail must never cost the report
            return {"error": f"{src.name}: {exc}"}
        write_bytes(folder / "img" / names[0], thumb, fsync=False)
        write_bytes(folder / "img" / names[1], preview, fsync=False)
        for n in names:
            cache.record(n, stamp)
    return {"thumb": folder / "img" / names[0], "full": folder / "img" / names[1]}


def _coadd_images(c: dict, folder: Path, cache: _ImageCache) -> dict:
    """Thumbnail of a coadd: from its quick-look PNG if it exists, else from the FITS SCI."""
    base = "coadd_" + _slug(c["target"], c["filter"])
    ql = Path(c["quicklook"]) if c["quicklook"] else None
    if ql is not None and ql.is_file():
        stamp = _file_stamp(ql)
        name = f"{base}_thumb.png"
        if not cache.fresh(name, stamp):
            try:
                write_bytes(folder / "img" / name, png_thumbnail(ql), fsync=False)
            except Exception as exc:  # a thumbnail must never cost the report
                return {"error": f"{ql.name}: {exc}"}
            cache.record(name, stamp)
        return {"thumb": folder / "img" / name, "full": ql}
    return _fits_images(Path(c["path"]), base, folder, cache)


# ---------------------------------------------------------------------------- plots

def filter_colours(filters) -> dict[str, str]:
    """One colour per filter, by band letter when it is a known one (stable across nights)."""
    colours, spare = {}, 0
    for f in sorted({f for f in filters if f}):
        band = f.split("-")[-1].split("_")[-1].strip().lower()[:1] or "?"
        if f.lower().endswith("prime") or f.endswith("'"):
            band = f.strip("'").split("-")[-1][:1].lower()
        colour = FILTER_COLOURS.get(band)
        if colour is None or colour in colours.values():
            colour = SPARE_COLOURS[spare % len(SPARE_COLOURS)]
            spare += 1
        colours[f] = colour
    return colours


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, facecolor=BG)
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax, ylabel: str, span_s: float) -> None:
    import matplotlib.dates as mdates

    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(BORDER)
    ax.tick_params(colors=MUTED, labelsize=9)
    ax.set_ylabel(ylabel, color=TEXT, fontsize=10)
    ax.grid(True, color=BORDER, linewidth=0.7)
    ax.set_axisbelow(True)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span_s < 600 else "%H:%M"))


def _span_s(times) -> float:
    ts = [t for t in (_parse_time(x) for x in times) if t is not None]
    return (max(ts) - min(ts)).total_seconds() if ts else 0.0


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    write_bytes(path, buf.getvalue(), fsync=False)


def _plot_key(data) -> str:
    text = json.dumps([PLOT_STYLE, data], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _conditions_series(frames: list[dict]) -> tuple[list[dict], str, str]:
    """Per-frame points of the conditions plot, and which photometric quantity is shown."""
    science = [f for f in frames if f["type"] == "object" and f["obs_time"] and any(
        f.get(k) is not None for k in ("fwhm_arcsec", "sky_e_per_s", "zp_per_s",
                                       "transparency_mag", "ellipticity"))]
    has_zp = any(f.get("zp_per_s") is not None for f in science)
    phot_key = "zp_per_s" if has_zp else "transparency_mag"
    phot_label = "ZP for 1 s (mag)" if has_zp else "transparency (mag)"
    points = [{"t": f["obs_time"], "filter": f["filter"] or "?",
               "ok": f["state"] == "reduced", "phot": f.get(phot_key),
               "fwhm": f.get("fwhm_arcsec"), "sky": f.get("sky_e_per_s"),
               "ell": f.get("ellipticity")} for f in science]
    return points, phot_key, phot_label


def _lightcurve_plot(lightcurves: dict, img: Path, cache: _ImageCache) -> Path | None:
    """The targets' light curves (report/lightcurve.py), remade when a point changed."""
    if not lightcurves:
        return None
    name = "lightcurves.png"
    if cache.fresh(name, _plot_key(lightcurves)):
        return img / name
    path = plot_lightcurves(lightcurves, img / name)
    if path is not None:
        cache.record(name, _plot_key(lightcurves))
    return path


def _conditions_plot(frames: list[dict], img: Path, cache: _ImageCache) -> Path | None:
    """ZP (or transparency), FWHM, sky and ellipticity through the night, one colour per filter."""
    points, _, phot_label = _conditions_series(frames)
    if not points:
        return None
    name = "conditions.png"
    key = _plot_key([points, phot_label])
    if cache.fresh(name, key):
        return img / name
    from matplotlib.lines import Line2D

    colours = filter_colours(p["filter"] for p in points)
    fig = _figure(12.0, 6.4)
    axes = fig.subplots(2, 2, sharex=True)
    panels = (("phot", phot_label), ("fwhm", "FWHM (arcsec)"), ("sky", "sky (e⁻/s)"),
              ("ell", "ellipticity"))
    span = _span_s(p["t"] for p in points)
    for ax, (field, label) in zip(axes.flat, panels):
        _style_axes(ax, label, span)
        for filt, colour in colours.items():
            sel = [p for p in points if p["filter"] == filt and p[field] is not None]
            if not sel:
                continue
            t = [_parse_time(p["t"]) for p in sel]
            v = [p[field] for p in sel]
            ax.plot(t, v, "-", color=colour, alpha=0.35, linewidth=1.0)
            ok = [(ti, vi) for ti, vi, p in zip(t, v, sel) if p["ok"]]
            bad = [(ti, vi) for ti, vi, p in zip(t, v, sel) if not p["ok"]]
            if ok:
                ax.plot(*zip(*ok), "o", color=colour, markersize=5)
            if bad:
                ax.plot(*zip(*bad), "o", markerfacecolor="none", markeredgecolor=colour,
                        markersize=6, markeredgewidth=1.4)
    for ax in axes[1]:
        ax.set_xlabel("UTC", color=MUTED, fontsize=9)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f)
               for f, c in colours.items()]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                          markeredgecolor=MUTED, label="not stacked"))
    legend = fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False,
                        fontsize=10)
    for text in legend.get_texts():
        text.set_color(TEXT)
    fig.subplots_adjust(left=0.07, right=0.985, top=0.92, bottom=0.08, hspace=0.12, wspace=0.18)
    _save_figure(fig, img / name)
    cache.record(name, key)
    return img / name


def _latency_plot(frames: list[dict], img: Path, cache: _ImageCache) -> Path | None:
    """Seconds from each frame's arrival to its product, against observation time.

    At the telescope a frame arrives one exposure time after its start, so this
    reads as "through the night"; in a batch run every frame arrives at once and
    the observation time is the only useful axis.
    """
    points = [{"t": f["obs_time"], "s": f["latency_s"], "sci": f["type"] == "object"}
              for f in frames if f["latency_s"] is not None and f["obs_time"]
              and f["state"] in ("used", "reduced", "rejected")]
    if not points:
        return None
    name = "latency.png"
    key = _plot_key(points)
    if cache.fresh(name, key):
        return img / name
    fig = _figure(6.4, 2.6)
    ax = fig.subplots()
    _style_axes(ax, "seconds", _span_s(p["t"] for p in points))
    for sci, colour, label in ((False, MUTED, "calibration"), (True, LINK, "science")):
        sel = [p for p in points if p["sci"] == sci]
        if sel:
            ax.plot([_parse_time(p["t"]) for p in sel], [p["s"] for p in sel], "o",
                    color=colour, markersize=4, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("observed (UTC)", color=MUTED, fontsize=9)
    legend = ax.legend(frameon=False, fontsize=9, loc="upper left")
    for text in legend.get_texts():
        text.set_color(TEXT)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.95, bottom=0.2)
    _save_figure(fig, img / name)
    cache.record(name, key)
    return img / name


# ---------------------------------------------------------------------------- HTML

CSS = f"""
:root {{ color-scheme: dark; }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; background: {BG}; color: {TEXT};
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }}
main {{ max-width: 1500px; margin: 0 auto; padding: 0 20px 40px; }}
a {{ color: {LINK}; text-decoration: none; }} a:hover {{ text-decoration: underline; }}
header {{ background: {PANEL}; border-bottom: 1px solid {BORDER}; padding: 14px 20px 10px; }}
header .in {{ max-width: 1500px; margin: 0 auto; }}
h1 {{ font-size: 26px; margin: 0; font-weight: 650; letter-spacing: .2px; }}
h1 .night {{ color: #fff; }} h1 .inst {{ color: {MUTED}; font-weight: 500; }}
h2 {{ font-size: 19px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid {BORDER}; }}
h3 {{ font-size: 15px; margin: 16px 0 6px; color: {MUTED}; font-weight: 600; }}
.badge {{ display: inline-block; padding: 2px 10px; border-radius: 4px; font-size: 14px;
  font-weight: 700; letter-spacing: 1px; vertical-align: 4px; margin-left: 10px; }}
.badge.ql {{ background: {WARN}; color: #1a1200; }} .badge.final {{ background: {GOOD}; color: #00170a; }}
.meta {{ color: {MUTED}; margin-top: 4px; font-size: 14px; }} .meta b {{ color: {TEXT}; font-weight: 600; }}
nav {{ margin-top: 8px; font-size: 14px; }} nav a {{ margin-right: 14px; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(155px, 1fr)); gap: 10px;
  margin-top: 16px; }}
.card {{ background: {PANEL}; border: 1px solid {BORDER}; border-radius: 6px; padding: 10px 14px; }}
.card .k {{ color: {MUTED}; font-size: 13px; text-transform: uppercase; letter-spacing: .5px; }}
.card .v {{ font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }}
.card .s {{ color: {MUTED}; font-size: 13px; }}
.card.bad {{ border-color: {BAD}; }} .card.bad .v, .card.bad .v a {{ color: {BAD}; }}
.card.warn {{ border-color: {WARN}; }} .card.warn .v {{ color: {WARN}; }}
.card.good .v {{ color: {GOOD}; }}
table {{ border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 4px 9px; border-bottom: 1px solid {BORDER}; text-align: left; vertical-align: top;
  white-space: nowrap; }}
th {{ color: {MUTED}; font-weight: 600; background: {PANEL}; white-space: nowrap; }}
table.sortable th {{ cursor: pointer; }} table.sortable th:hover {{ color: {TEXT}; }}
td.n, th.n {{ text-align: right; }} td.dim {{ color: {MUTED}; }}
td.reason {{ max-width: 380px; min-width: 200px; white-space: normal; color: #ffd0c8; }}
td.reason details {{ padding: 2px 6px; margin: 4px 0 0; max-width: 560px; }}
td.reason pre {{ white-space: pre-wrap; font-size: 11.5px; }}
tr.rejected td {{ background: rgba(255,107,107,.13); }}
tr.rejected td:first-child {{ box-shadow: inset 3px 0 {BAD}; }}
tr.quarantined td {{ background: rgba(243,183,79,.15); }}
tr.quarantined td:first-child {{ box-shadow: inset 3px 0 {WARN}; }}
tr.ignored td {{ color: {MUTED}; font-style: italic; }}
tr.waiting td, tr.received td, tr.processing td {{ background: rgba(130,189,255,.10); }}
.st {{ font-weight: 600; }} .st.reduced, .st.used {{ color: {GOOD}; }}
.st.rejected {{ color: {BAD}; }} .st.quarantined, .st.held {{ color: {WARN}; }}
.st.waiting, .st.received, .st.processing {{ color: {LINK}; }}
.tag {{ font-size: 11px; color: {MUTED}; border: 1px solid {BORDER}; border-radius: 3px;
  padding: 0 4px; margin-left: 4px; white-space: nowrap; }}
.scroll {{ overflow-x: auto; }}
.ok {{ color: {GOOD}; }} .warn {{ color: {WARN}; }} .bad {{ color: {BAD}; }} .muted {{ color: {MUTED}; }}
.plot {{ max-width: 100%; border: 1px solid {BORDER}; border-radius: 6px; display: block; }}
.row {{ display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 14px; }}
figure {{ margin: 0; background: {PANEL}; border: 1px solid {BORDER}; border-radius: 6px;
  padding: 8px; width: {THUMB_PX + 18}px; }}
figure img {{ display: block; width: auto; height: auto; max-width: {THUMB_PX}px;
  max-height: {THUMB_PX}px; margin: 0 auto; }}
figcaption {{ font-size: 13px; margin-top: 6px; }} figcaption .muted {{ font-size: 12px; }}
ul.problems {{ margin: 6px 0; padding-left: 20px; }} ul.problems li {{ margin: 2px 0; }}
details {{ background: {PANEL}; border: 1px solid {BORDER}; border-radius: 6px; padding: 8px 12px;
  margin: 8px 0; }}
summary {{ cursor: pointer; color: {TEXT}; font-weight: 600; }}
pre {{ font-size: 12.5px; color: #cfd6e2; overflow-x: auto; margin: 8px 0 0; }}
.allgood {{ color: {GOOD}; font-weight: 600; }}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.title = 'click to sort';
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var dir = th.dataset.dir === 'asc' ? -1 : 1;
      th.dataset.dir = dir > 0 ? 'asc' : 'desc';
      function key(r) {
        var c = r.cells[col], v = c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim();
        if (v === '') { return null; }
        return isNaN(Number(v)) ? v.toLowerCase() : Number(v);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x > y ? 1 : x < y ? -1 : 0) * dir;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value) -> str:
    return "" if value is None else html.escape(str(value))


def _fmt(value, digits: int = 2) -> str:
    if value is None or isinstance(value, str):
        return _e(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def _hms(iso: str | None) -> str:
    t = _parse_time(iso)
    return t.astimezone(UTC).strftime("%H:%M:%S") if t else ""


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Links:
    """Relative links from the report folder, only to files that exist."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()

    def href(self, path) -> str | None:
        if not path:
            return None
        p = Path(path)
        if not p.is_absolute():
            p = self.folder / p
        if not p.is_file():
            return None
        return quote(os.path.relpath(p.resolve(), self.folder).replace(os.sep, "/"))

    def a(self, path, text: str, title: str | None = None) -> str:
        href = self.href(path)
        if href is None:
            return f'<span class="muted" title="file not found">{_e(text)}</span>' if path else ""
        t = f' title="{_e(title)}"' if title else ""
        return f'<a href="{href}"{t}>{_e(text)}</a>'


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def _cards(facts: dict) -> str:
    frames, counts = facts["frames"], facts["counts"]
    sci = [f for f in frames if f["type"] == "object"]
    reduced = [f for f in sci if f["state"] == "reduced"]
    not_stacked = [f for f in sci if f["state"] == "rejected"]
    quarantined = [f for f in frames if f["state"] in ("quarantined", "held")]
    incomplete = [c for c in facts["coadds"] if c.get("finalstat") == "INCOMPLETE"]
    cal_used = sum(1 for f in frames if f["type"] in ("bias", "dark", "flat") and
                   f["state"] == "used")
    cal_rej = sum(1 for f in frames if f["type"] in ("bias", "dark", "flat") and
                  f["state"] == "rejected")
    cards = []

    def card(key, value, sub="", cls=""):
        cards.append(f'<div class="card {cls}"><div class="k">{key}</div>'
                     f'<div class="v">{value}</div><div class="s">{sub}</div></div>')

    card("Science frames", f"{len(reduced)} <span class='muted' style='font-size:16px'>stacked"
         "</span>", f"{len(not_stacked)} not stacked · {len(sci)} taken",
         "warn" if not_stacked else ("good" if reduced else ""))
    fwhm = [f.get("fwhm_arcsec") for f in reduced]
    med = _median(fwhm)
    last = next((f.get("fwhm_arcsec") for f in reversed(sci) if f.get("fwhm_arcsec")), None)
    card("Seeing (FWHM)", f"{med:.2f}″" if med else "–",
         f"last {last:.2f}″ · best {min(x for x in fwhm if x):.2f}″" if med and last else
         "median of stacked frames")
    by_filter = sorted({f["filter"] for f in sci if f.get("zp") is not None})
    if by_filter:
        zps = " · ".join(f"{b} {_median(f.get('zp') for f in sci if f['filter'] == b):.2f}"
                         for b in by_filter)
        card("Zero point (median)", zps.split(" · ")[0].split(" ", 1)[1],
             _e(zps) if len(by_filter) > 1 else _e(by_filter[0]) + " MAGZP")
    else:
        card("Zero point", "–", "no absolute calibration" if sci else "no science frames")
    lat = facts["latency_s"]["all"]
    card("Arrival → product", _duration(lat["median"]),
         f"median · p95 {_duration(lat['p95'])} · max {_duration(lat['max'])}")
    pend = counts["pending"] + counts["waiting"]
    card("Queue", str(pend),
         f"{counts['pending']} to do · {counts['waiting']} waiting for masters"
         + (f" · {counts['stale']} stale" if counts["stale"] else ""),
         "warn" if pend else "good")
    card("Calibrations", str(cal_used), f"used in masters · {cal_rej} rejected",
         "warn" if cal_rej else "")
    card("Coadds", str(len(facts["coadds"])),
         f"{sum(c['ncombine'] or 0 for c in facts['coadds'])} frames, "
         f"{sum(c['exptime'] or 0 for c in facts['coadds']) / 60:.0f} min total")
    nerr = sum(1 for e in facts["errors"] if e["level"] == "error")
    nwarn = sum(1 for e in _other_events(facts) if e["level"] == "warning")
    nbad = len(quarantined) + nerr + len(incomplete)
    card("Needs attention", f'<a href="#problems">{nbad}</a>' if nbad else "0",
         f"{len(quarantined)} quarantined or held · {nerr} errors · {nwarn} other warnings"
         + (f" · {len(incomplete)} incomplete final coadd(s)" if incomplete else ""),
         "bad" if nbad else ("warn" if nwarn else "good"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _state_table(facts: dict) -> str:
    by_type = facts["counts"]["by_type"]
    states = [s for s in STATE_ORDER if facts["counts"]["by_state"].get(s)]
    kinds = [k for k in KIND_ORDER if k in by_type] + sorted(k for k in by_type
                                                            if k not in KIND_ORDER)
    head = "".join(f'<th class="n">{s}</th>' for s in states)
    rows = []
    for k in kinds:
        cells = "".join(
            f'<td class="n"><span class="st {s}">{by_type[k].get(s)}</span></td>'
            if by_type[k].get(s) else '<td class="n dim">·</td>' for s in states)
        rows.append(f"<tr><td>{_e(k)}</td>{cells}<td class='n'>{sum(by_type[k].values())}</td></tr>")
    total = "".join(f'<td class="n"><b>{facts["counts"]["by_state"].get(s, 0)}</b></td>'
                    for s in states)
    rows.append(f"<tr><td><b>all</b></td>{total}<td class='n'><b>{facts['counts']['total']}"
                "</b></td></tr>")
    return (f"<table><thead><tr><th>type</th>{head}<th class='n'>total</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _filter_table(facts: dict) -> str:
    sci = [f for f in facts["frames"] if f["type"] == "object"]
    if not sci:
        return ""
    colours = filter_colours(f["filter"] for f in sci)
    rows = []
    for filt in colours:
        fs = [f for f in sci if f["filter"] == filt]
        ok = [f for f in fs if f["state"] == "reduced"]
        use = ok or fs
        rows.append(
            f"<tr><td>{_dot(colours[filt])}{_e(filt)}</td>"
            f"<td class='n'>{len(fs)}</td><td class='n'>{len(ok)}</td>"
            f"<td class='n'>{len(fs) - len(ok)}</td>"
            f"<td class='n'>{_fmt(_median(f.get('fwhm_arcsec') for f in use))}</td>"
            f"<td class='n'>{_fmt(_median(f.get('zp') for f in use), 3)}</td>"
            f"<td class='n'>{_fmt(_median(f.get('zp_per_s') for f in use), 3)}</td>"
            f"<td class='n'>{_fmt(_median(f.get('sky_e_per_s') for f in use), 1)}</td>"
            f"<td class='n'>{_fmt(_median(f.get('ellipticity') for f in use))}</td>"
            f"<td class='n'>{sum(f.get('exptime') or 0 for f in ok) / 60:.1f}</td></tr>")
    return ("<div class='scroll'><table><thead><tr><th>filter</th><th class='n'>frames</th>"
            "<th class='n'>stacked</th>"
            "<th class='n'>not stacked</th><th class='n'>FWHM (″)</th><th class='n'>MAGZP</th>"
            "<th class='n'>ZP 1 s</th><th class='n'>sky (e⁻/s)</th><th class='n'>ellipticity</th>"
            "<th class='n'>stacked exp. (min)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>"
            "<p class='muted' style='font-size:13px;margin:4px 0'>medians of stacked frames "
            "(of all frames of the filter when none was stacked)</p>")


def _message(text: str | None, limit: int = 240) -> str:
    """One readable line of a message; a traceback or a long text is folded below it."""
    if not text:
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if text.lstrip().startswith("Traceback"):
        head = lines[-1]  # the exception line
    else:
        head = lines[0]
    short = head if len(head) <= limit else head[: limit - 1] + "…"
    if short == text.strip():
        return _e(short)
    return (f"{_e(short)}<details><summary class='muted' style='font-weight:400'>full text"
            f"</summary><pre>{_e(text.strip())}</pre></details>")


def _other_events(facts: dict) -> list[dict]:
    """Warning/error events that are not a frame's state change (those are listed by frame)."""
    return [e for e in facts["errors"] if e["level"] == "error" or not e["state_to"]]


def _problems(facts: dict) -> str:
    bad = [f for f in facts["frames"] if f["state"] in PROBLEM_STATES]
    suspect = [f for f in facts["frames"] if f["state"] == "reduced" and f.get("astsuspect")]
    parts = []
    incomplete = [c for c in facts["coadds"] if c.get("finalstat") == "INCOMPLETE"]
    if (not bad and not suspect and not _other_events(facts) and not facts["duplicates"]
            and not incomplete and not (facts.get("finalize") or {}).get("worse")):
        return "<p class='allgood'>✓ No rejected, quarantined or ignored frames and no errors.</p>"
    if incomplete:
        items = []
        for c in incomplete:
            q, f = c.get("quicklook_stack") or {}, c.get("final_stack") or {}
            items.append(f"<li><span class='st rejected'>INCOMPLETE</span> <b>coadd "
                         f"{_e(c['target'])} {_e(c['filter'])}</b> <span class='muted'>"
                         f"{q.get('ncombine', '?')} quick-look → {f.get('ncombine', '?')} final "
                         f"frames</span> — {_e(c.get('finalreason') or '')}</li>")
        parts.append("<h3>Final coadds with fewer frames than the quick-look ones</h3>"
                     "<ul class='problems'>" + "".join(items) + "</ul>")
    worse = (facts.get("finalize") or {}).get("worse_why") or {}
    if worse:
        items = [f"<li><b>{_e(name)}</b> — {_e(why)}</li>" for name, why in worse.items()]
        parts.append("<h3>Frames worse after finalize's re-reduction than in the quick-look "
                     "pass</h3><ul class='problems'>" + "".join(items) + "</ul>")
    order = {s: i for i, s in enumerate(("quarantined", "held", "waiting", "rejected",
                                         "ignored"))}
    if bad:
        items = []
        for f in sorted(bad, key=lambda f: (order.get(f["state"], 9), f["obs_time"] or "")):
            what = f"{f['type'] or 'unclassified'}{' ' + f['filter'] if f['filter'] else ''}"
            items.append(f"<li><span class='st {f['state']}'>{f['state']}</span> "
                         f"<b>{_e(f['file'])}</b> <span class='muted'>{_e(what)} "
                         f"{_hms(f['obs_time'])}</span> — {_e(f['reason'] or 'no reason recorded')}"
                         "</li>")
        parts.append("<h3>Frames not reduced or not stacked</h3><ul class='problems'>"
                     + "".join(items) + "</ul>")
    if suspect:
        items = [f"<li><b>{_e(f['file'])}</b> <span class='muted'>{_e(f['filter'] or '')} "
                 f"{_hms(f['obs_time'])}</span> — {_e(f.get('astreason') or 'suspect')}</li>"
                 for f in suspect]
        parts.append("<h3>Astrometry unlike the field's other frames (check them)</h3>"
                     "<ul class='problems'>" + "".join(items) + "</ul>")
    if facts["duplicates"]:
        items = [f"<li>{_e(Path(d['path']).name)} <span class='muted'>same content as frame "
                 f"{_e(d['of'])}; not reduced again</span></li>" for d in facts["duplicates"][:20]]
        parts.append("<h3>Duplicate files</h3><ul class='problems'>" + "".join(items) + "</ul>")
    events = _other_events(facts)
    if events:
        rows = []
        for e in events[:15]:
            cls = "bad" if e["level"] == "error" else "warn"
            rows.append(
                f"<tr><td>{_e(e['time'][:19].replace('T', ' '))}</td>"
                f"<td class='{cls}'>{_e(e['level'])}</td><td>{_e(e['file'])}</td>"
                f"<td>{_e(e['event'])}{' / ' + _e(e['stage']) if e['stage'] else ''}"
                f"{' <span class=muted>' + _e(e['error_class']) + '</span>' if e['error_class'] else ''}"
                f"</td><td class='reason'>{_message(e['message'])}</td>"
                f"<td>{_e(e['action'])}</td></tr>")
        parts.append("<h3>Last errors and warnings</h3><div class='scroll'><table><thead><tr>"
                     "<th>time (UTC)</th><th>level</th><th>file</th><th>event</th>"
                     "<th>message</th><th>action</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table></div>")
    return "".join(parts)


def _dot(colour: str | None) -> str:
    return f"<span style='color:{colour}'>●</span> " if colour else ""


def _frame_table(facts: dict, links: _Links) -> str:
    colours = filter_colours(f["filter"] for f in facts["frames"] if f["type"] == "object")
    rows = []
    for f in facts["frames"]:
        tags = ""
        if f.get("provisional"):
            tags += "<span class='tag' title='reduced with a provisional master'>prov</span>"
        if f.get("stale"):
            tags += f"<span class='tag' title='{_e(f.get('stale_reason'))}'>stale</span>"
        if f.get("coadd") == "added":
            tags += "<span class='tag' title='in the coadd'>stacked</span>"

        def num(key, digits=2, f=f):
            v = f.get(key)
            return f"<td class='n' data-v='{'' if v is None else v}'>{_fmt(v, digits)}</td>"

        product = links.a(f["product"], "FITS", Path(f["product"]).name if f["product"] else None)
        ql = links.a(f["quicklook"], "PNG")
        state_cls = f["state"] if f["state"] in STATE_ORDER else ""
        rows.append(
            f"<tr class='{state_cls}'><td data-v='{_e(f['obs_time'])}' "
            f"title='{_e(f['obs_time'])}'>{_hms(f['obs_time'])}</td>"
            f"<td title='{_e(f['name'])}'>{_e(f['file'])}</td><td>{_e(f['type'])}</td>"
            f"<td>{_dot(colours.get(f['filter']))}{_e(f['filter'])}</td><td>{_e(f['target'])}</td>"
            f"{num('exptime', 1)}<td><span class='st {state_cls}'>{_e(f['state'])}</span>"
            f"{tags}</td><td class='reason'>{_message(f['reason'])}</td>"
            f"{num('fwhm_arcsec')}{num('zp', 3)}{num('sky_e_per_s', 1)}{num('ellipticity')}"
            f"{num('astrms_arcsec', 3)}"
            f"<td class='n' data-v='{'' if f['latency_s'] is None else f['latency_s']}'>"
            f"{_duration(f['latency_s']) if f['latency_s'] is not None else ''}</td>"
            f"<td>{product} {ql}</td></tr>")
    head = ("<th>UTC</th><th>raw file</th><th>type</th><th>filter</th><th>target</th>"
            "<th class='n'>exp (s)</th><th>state</th><th>reason</th><th class='n'>FWHM (″)</th>"
            "<th class='n'>ZP</th><th class='n'>sky (e⁻/s)</th><th class='n'>ellip.</th>"
            "<th class='n'>ast. rms (″)</th><th class='n'>latency</th><th>product</th>")
    return (f"<div class='scroll'><table class='sortable' id='frames-table'><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            "<p class='muted' style='font-size:13px;margin:4px 0'>Click a column heading to "
            "sort. Rejected rows are red, quarantined amber; <i>prov</i>: reduced with a "
            "provisional master, <i>stale</i>: will be re-reduced with a better master.</p>")


def _thumb(images: dict, links: _Links, caption: str, fits_path) -> str:
    if images.get("thumb") and Path(images["thumb"]).is_file():
        img = f"<img src='{links.href(images['thumb'])}' alt='{_e(caption)}'>"
        full = links.href(images.get("full"))
        if full:
            img = f"<a href='{full}' title='full-size PNG'>{img}</a>"
    else:
        img = f"<div class='muted' style='height:60px'>{_e(images.get('error') or 'no image')}</div>"
    fits_link = links.a(fits_path, "FITS")
    png_link = links.a(images.get("full"), "PNG")
    return (f"<figure>{img}<figcaption>{caption}<br><span class='muted'>{png_link} "
            f"{fits_link}</span></figcaption></figure>")


def _coadd_section(facts: dict, images: list[dict], links: _Links) -> str:
    if not facts["coadds"]:
        return "<p class='muted'>No coadds yet.</p>"
    rows, thumbs = [], []
    for c, im in zip(facts["coadds"], images):
        tag = ("<span class='tag'>outdated</span>" if c["outdated"] else "")
        if c.get("finalstat") == "INCOMPLETE":
            tag += "<span class='tag'>INCOMPLETE</span>"
        rows.append(
            f"<tr><td>{_e(c['target'])}</td><td>{_e(c['filter'])}</td>"
            f"<td>{_e(c['stacktype'])}{tag}</td><td class='n'>{c['ncombine']}</td>"
            f"<td class='n'>{_fmt(c['exptime'], 0)}</td><td class='n'>{_fmt(c['magzp'], 3)}</td>"
            f"<td>{_hms(c['updated_at'])}</td><td>{links.a(c['path'], 'FITS')} "
            f"{links.a(c['quicklook'] or im.get('full'), 'PNG')} "
            f"{links.a(c['catalog'], 'catalogue')}</td></tr>")
        cap = (f"<b>{_e(c['target'])}</b> {_e(c['filter'])} · {c['ncombine']} × · "
               f"{_fmt((c['exptime'] or 0) / 60, 1)} min")
        thumbs.append(_thumb(im, links, cap, c["path"]))
    return ("<div class='scroll'><table><thead><tr><th>target</th><th>filter</th><th>type</th>"
            "<th class='n'>N frames</th><th class='n'>total exp. (s)</th><th class='n'>MAGZP</th>"
            "<th>updated (UTC)</th><th>files</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div><div class='thumbs' style='margin-top:12px'>"
            + "".join(thumbs) + "</div>")


def _master_section(facts: dict, images: list[dict], links: _Links) -> str:
    if not facts["masters"]:
        return "<p class='muted'>No masters for this night.</p>"
    rows, thumbs = [], []
    for m, im in zip(facts["masters"], images):
        status = ("<span class='ok'>final</span>" if m["final"] else
                  "<span class='warn'>provisional</span>" if m["provisional"] else "current")
        if not m["this_night"]:
            status += f" <span class='tag'>from {_e(m['night'])}</span>"
        what = " ".join(x for x in (m["kind"], m["camera"], m["filter"], m["target"]) if x)
        rows.append(
            f"<tr><td>{_e(m['kind'])}</td><td>{_e(m['camera'])}</td><td>{_e(m['filter'])}</td>"
            f"<td>{_e(m['binning'])}</td><td class='n'>v{m['version']}"
            f"{'' if m['nversions'] is None else ' of ' + str(m['nversions'])}</td>"
            f"<td class='n'>{m['ninputs']}</td><td>{status}</td><td>{_hms(m['created_at'])}</td>"
            f"<td class='muted'>{_e(m['method'])}</td>"
            f"<td>{links.a(m['path'], Path(m['path']).name)}</td></tr>")
        if m["this_night"]:
            cap = (f"<b>{_e(what)}</b> v{m['version']} · {m['ninputs']} inputs"
                   f"{' · provisional' if m['provisional'] else ''}")
            thumbs.append(_thumb(im, links, cap, m["path"]))
    return ("<div class='scroll'><table><thead><tr><th>kind</th><th>camera</th><th>filter</th>"
            "<th>binning</th><th class='n'>version</th><th class='n'>inputs</th><th>status</th>"
            "<th>made (UTC)</th><th>method</th><th>file</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div><div class='thumbs' style='margin-top:12px'>"
            + "".join(thumbs) + "</div>")


def _arrived_as_a_batch(frames: list[dict]) -> bool:
    """True when most frames arrived in far less time than they took to observe."""
    pairs = [(_parse_time(f.get("arrived_at")), _parse_time(f.get("obs_time"))) for f in frames]
    pairs = [(a, o) for a, o in pairs if a is not None and o is not None]
    if len(pairs) < 3:
        return False
    arrived = sorted(a for a, _ in pairs)
    observed = sorted(o for _, o in pairs)
    obs_span = (observed[-1] - observed[0]).total_seconds()
    arr_span = (arrived[-1] - arrived[0]).total_seconds()
    return obs_span > 600 and arr_span < 0.1 * obs_span


def _latency_section(facts: dict, plot: Path | None, links: _Links) -> str:
    rows = "".join(
        f"<tr><td>{label}</td><td class='n'>{s['n']}</td><td class='n'>{_duration(s['median'])}"
        f"</td><td class='n'>{_duration(s['p95'])}</td><td class='n'>{_duration(s['max'])}</td>"
        "</tr>" for label, s in (("science frames", facts["latency_s"]["science"]),
                                 ("calibration frames", facts["latency_s"]["calibration"]),
                                 ("all", facts["latency_s"]["all"])))
    stages = "".join(
        f"<tr><td>{_e(k)}</td><td class='n'>{_fmt(s['median'], 2)}</td>"
        f"<td class='n'>{_fmt(s['max'], 2)}</td></tr>" for k, s in sorted(
            facts["stage_seconds"].items(), key=lambda kv: -(kv[1]["median"] or 0)))
    left = ("<div><table><thead><tr><th>from arrival to product</th><th class='n'>N</th>"
            "<th class='n'>median</th><th class='n'>p95</th><th class='n'>max</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    if _arrived_as_a_batch(facts["frames"]):
        left += ("<p class='muted'>These frames arrived together (a batch <code>photowatch "
                 "reduce</code>, or a backlog after a restart), so the times above include "
                 "waiting in the queue; the seconds per stage are the cost of a frame.</p>")
    if stages:
        left += ("<h3>Seconds per stage (science frames)</h3><table><thead><tr><th>stage</th>"
                 "<th class='n'>median</th><th class='n'>max</th></tr></thead>"
                 f"<tbody>{stages}</tbody></table>")
    left += "</div>"
    right = (f"<div><img class='plot' src='{links.href(plot)}' alt='latency through the night' "
             "width='640' height='260'></div>" if plot and links.href(plot) else "")
    return f"<div class='row'>{left}{right}</div>"


def settings_toml(data: dict, prefix: str = "") -> str:
    """A settings mapping as TOML (scalars first, then one table per section).

    Values that are not set (None) appear as comments, so the text loads with
    :mod:`tomllib` into the settings minus those keys.
    """
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is None:
            lines.append(f"# {key} = (not set)")
        else:
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    text = (f"[{prefix}]\n" if prefix and lines else "") + "\n".join(lines)
    for key, value in tables:
        sub = settings_toml(value, f"{prefix}.{key}" if prefix else key)
        text += ("\n\n" if text else "") + sub
    return text


def _config_section(facts: dict) -> str:
    versions = " · ".join(f"{k} {_e(v)}" for k, v in facts["versions"].items())
    toml = settings_toml(facts["settings"])
    procs = "".join(f"<li>{_e(p['command'])} since {_e(p['started_at'])} — {_e(p['status'])}</li>"
                    for p in facts["processes"])
    return (f"<p>{versions}</p>"
            f"<details><summary>Settings ({_e(facts['settings_source'])})</summary>"
            f"<pre>{_e(toml)}</pre></details>"
            + (f"<details><summary>Running photowatch processes</summary><ul>{procs}</ul>"
               "</details>" if procs else "")
            + f"<p class='muted'>Output directory: {_e(facts['out'])}</p>")


def _lightcurve_section(facts: dict, plot, links) -> str:
    lcs = facts.get("lightcurves") or {}
    if not lcs:
        return ("<p class='muted'>No targets: add them with --target NAME=RA,DEC, "
                "[targets] file, or the header's target coordinates.</p>")
    files = " · ".join(links.a(t["file"], _e(name)) for name, t in lcs.items())
    img = (f"<img class='plot' src='{links.href(plot)}' alt='light curves: mag against "
           "time per filter; arrows: upper limits; bars: coadds'>"
           if plot and links.href(plot) else "")
    return f"<p>Light-curve files (ECSV): {files}</p>{img}"


def render_html(facts: dict, images: dict, folder: Path, settings) -> str:
    """The page, as one string (see :func:`write_report`)."""
    links = _Links(folder)
    final = facts["final"]
    counts = facts["counts"]
    title = f"{facts['night']} {facts['instrument'] or ''}".strip()
    badge = ("<span class='badge final'>FINAL</span>" if final else
             "<span class='badge ql'>QUICK-LOOK</span>")
    refresh = ""
    interval = getattr(getattr(settings, "daemon", None), "report_interval_s", 0) or 0
    if not final and interval:
        refresh = f"<meta http-equiv='refresh' content='{max(30, int(interval))}'>"
    state_line = ", ".join(f"<span class='st {s}'>{counts['by_state'][s]} {s}</span>"
                           for s in STATE_ORDER if counts["by_state"].get(s))
    span = ""
    if facts["first_obs"]:
        span = f" · observed <b>{_hms(facts['first_obs'])}–{_hms(facts['last_obs'])}</b> UTC"
    inst = " ".join(x for x in (facts.get("telescope"), facts["instrument"]) if x)
    generated = facts["generated"].replace("T", " ").replace("+00:00", " UTC")
    nav = " ".join(f"<a href='#{a}'>{t}</a>" for a, t in (
        ("problems", "Problems"), ("conditions", "Conditions"), ("coadds", "Coadds"),
        ("frames", "Frames"), ("masters", "Masters"), ("latency", "Latency"),
        ("config", "Configuration")))
    cond_plot = images.get("conditions")
    cond = (f"<img class='plot' src='{links.href(cond_plot)}' width='1200' height='640' "
            "alt='zero point, FWHM, sky and ellipticity through the night, per filter'>"
            if cond_plot and links.href(cond_plot) else
            "<p class='muted'>No science frames measured yet.</p>")
    note = ("Quick-look: masters and coadds may still change; this page reloads itself."
            if not final else "Final: masters, re-reductions and coadds of the whole night.")
    body = f"""
<header><div class="in">
<h1><span class="night">Night {_e(facts['night'])}</span>
<span class="inst">{_e(inst)}</span>{badge}</h1>
<div class="meta">generated <b>{_e(generated)}</b>{span} ·
<b>{counts['total']}</b> frames: {state_line or 'none'}</div>
<div class="meta">{_e(note)}</div>
<nav>{nav}</nav>
</div></header>
<main>
{_cards(facts)}
<h2 id="problems">Problems</h2>
{_problems(facts)}
<h2 id="conditions">Conditions through the night</h2>
{_filter_table(facts)}
<div style="margin-top:10px">{cond}</div>
<h2 id="lightcurves">Light curves</h2>
{_lightcurve_section(facts, images.get('lightcurves'), links)}
<h2 id="coadds">Coadds</h2>
{_coadd_section(facts, images.get('coadds', []), links)}
<h2 id="frames">Frames</h2>
<div class="row"><div>{_state_table(facts)}</div></div>
<div style="margin-top:12px">{_frame_table(facts, links)}</div>
<h2 id="masters">Calibration masters</h2>
{_master_section(facts, images.get('masters', []), links)}
<h2 id="latency">Latency</h2>
{_latency_section(facts, images.get('latency'), links)}
<h2 id="config">Configuration and software</h2>
{_config_section(facts)}
<p class="muted" style="margin-top:24px;font-size:13px">Machine-readable:
<a href="night.json">night.json</a> · photowatch {_e(facts['versions']['photowatch'])}</p>
</main>"""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>{refresh}"
            f"<title>{_e(title)} — photowatch {'final' if final else 'quick-look'} report</title>"
            f"<style>{CSS}</style></head><body>{body}\n<script>{SORT_JS}</script>\n"
            "</body></html>\n")


__all__ = ["write_report", "collect_facts", "render_html", "fits_previews", "png_thumbnail",
           "filter_colours", "settings_toml", "software_versions"]
