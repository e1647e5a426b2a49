"""The facts of a night, read from the store: one mapping that IS ``night.json``.

:func:`collect_facts` builds what the report shows (every frame with its state,
QC numbers and latency; masters; coadds; the last problems; counts; versions and
settings); :func:`status_facts` is what ``photowatch status --json`` prints, and
the report's frame entries start from it. Both only read the store, through its
named queries (``# ---- report lane`` in :mod:`photowatch.state.store`); this
module imports nothing from ``run/``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.report.candidates import candidate_facts
from photowatch.report.latest import latest_frame_facts
from photowatch.report.lightcurve import lightcurve_facts
from photowatch.report.times import parse_time
from photowatch.state.store import TERMINAL

#: numbers of ``frames.qc_json`` copied into night.json
QC_KEYS = ("exptime", "fwhm_arcsec", "ellipticity", "nsources", "sky_e", "sky_e_per_s",
           "skynoise_e", "ncr", "airmass", "aststat", "astrms_arcsec", "astnstar", "astreason",
           "astsuspect", "zp", "zp_err", "zp_n", "zp_per_s", "flxscale", "transparency_mag", "phot_status",
           "phot_reason", "accepted")


# ---------------------------------------------------------------------------- status

def status_entry(r) -> dict:
    """One frame as ``photowatch status --json`` lists it."""
    qc = json.loads(r["qc_json"] or "{}")
    return {
        "file": r["raw_name"], "path": r["path"], "name": r["name"], "type": r["kind"],
        "filter": r["filter"], "target": r["target"], "night": r["night"],
        "obs_time": r["obs_time"], "state": r["state"], "reason": r["reason"],
        "product": r["product"], "stale": bool(r["stale"]),
        "provisional": bool(r["provisional"]), "coadd": r["coadd"],
        "fwhm_arcsec": qc.get("fwhm_arcsec"), "zp": qc.get("zp"),
        "astrometry": qc.get("aststat"),
        "limmag": qc.get("limmag"),  # issue 21: 5-sigma depth (LIMMAG)
    }


def status_facts(store, out: Path, night: str | None = None) -> dict:
    """What an output directory holds now (``photowatch status --json``), from an open store."""
    entries = [status_entry(r) for r in store.frames_of_night(night)]
    counts = store.counts(night)
    duplicates = [dict(path=r["path"], of=r["frame_id"]) for r in store.duplicate_files()]
    masters = [dict(kind=m["kind"], camera=m["camera"], filter=m["filter"] or None,
                    binning=m["binning"], night=m["night"], version=m["version"],
                    ninputs=m["ninputs"], provisional=bool(m["provisional"]),
                    final=bool(m["final"]), path=m["path"])
               for m in store.latest_masters(night)]
    coadds = [dict(night=c["night"], target=c["target"], filter=c["filter"], path=c["path"],
                   stacktype=c["stacktype"], ncombine=c["ncombine"], exptime=c["exptime"],
                   magzp=c["magzp"],
                   limmag=store.coadd_limmag(c["night"], c["target"], c["filter"]))
              for c in store.coadds(night)]
    errors = [dict(time=e["time"], file=e["file"], event=e["event"], message=e["message"],
                   action=e["action"]) for e in store.events(level="problems", limit=20)]
    processes = [dict(r) for r in store.processes()]
    nights = store.nights()
    report_night = night or (nights[-1] if nights else None)
    report = out / "report" / report_night / "index.html" if report_night else None
    return {
        "out": str(out), "schema": store.schema_version, "nights": nights, "counts": counts,
        "total": sum(counts.values()), "frames": entries, "duplicates": duplicates,
        "masters": masters, "coadds": coadds, "errors": errors, "processes": processes,
        "report": str(report) if report and report.exists() else None,
    }


# ---------------------------------------------------------------------------- helpers

def num(value):
    """A JSON-safe number: None for missing or non-finite values."""
    if value is None or isinstance(value, bool | str):
        return value
    try:
        value = float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def seconds_between(start: str | None, end: str | None) -> float | None:
    a, b = parse_time(start), parse_time(end)
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


def arrived_as_a_batch(frames: list[dict]) -> bool:
    """True when most frames arrived in far less time than they took to observe."""
    pairs = [(parse_time(f.get("arrived_at")), parse_time(f.get("obs_time"))) for f in frames]
    pairs = [(a, o) for a, o in pairs if a is not None and o is not None]
    if len(pairs) < 3:
        return False
    arrived = sorted(a for a, _ in pairs)
    observed = sorted(o for _, o in pairs)
    obs_span = (observed[-1] - observed[0]).total_seconds()
    arr_span = (arrived[-1] - arrived[0]).total_seconds()
    return obs_span > 600 and arr_span < 0.1 * obs_span


# ---------------------------------------------------------------------------- facts

def _frame_entry(row, base: dict | None, done: dict[int, str]) -> dict:
    qc = json.loads(row["qc_json"] or "{}")
    entry = dict(base) if base else status_entry(row)
    # the store row is the newer read: its state wins if the frame moved in between
    entry.update(state=row["state"], reason=row["reason"], product=row["product"])
    done_at = done.get(row["id"]) or (row["finished_at"] if row["state"] in TERMINAL else None)
    entry.update({
        "id": row["id"], "quicklook": row["quicklook"], "instrument": row["instrument"],
        "camera": row["camera"], "binning": row["binning"], "exptime": num(row["exptime"]),
        "tries": row["tries"], "arrived_at": row["arrived_at"],
        "received_at": row["received_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "done_at": done_at,
        "latency_s": seconds_between(row["arrived_at"], done_at),
        "stale_reason": row["stale_reason"],
    })
    for key in QC_KEYS:
        if key in qc:
            entry[key] = num(qc[key])
    entry["checks"] = qc.get("checks")
    entry["timings"] = {k: num(v) for k, v in (qc.get("timings") or {}).items()}
    masters = json.loads(row["masters_json"] or "{}")
    entry["masters"] = {k: {"path": m.get("path"), "version": m.get("version"),
                            "night": m.get("night"), "master_id": m.get("master_id")}
                        for k, m in masters.items()}
    return entry


def _masters(store, night: str, frames: list[dict]) -> list[dict]:
    """Newest version of each master key of the night, plus older masters used tonight."""
    versions: dict[tuple, list] = {}
    for m in store.masters_of_night(night):
        key = (m["kind"], m["camera"], m["filter"], m["binning"], m["readout"], m["target"])
        versions.setdefault(key, []).append(m)
    used_ids = {u.get("master_id") for f in frames for u in (f.get("masters") or {}).values()}
    items = []
    for m in store.latest_masters(night):
        key = (m["kind"], m["camera"], m["filter"], m["binning"], m["readout"], m["target"])
        allv = versions.get(key, [m])
        items.append(_master_entry(m, len(allv), used_ids, this_night=True))
    items += [_master_entry(m, None, used_ids, this_night=False)
              for m in store.masters_from_other_nights(night, used_ids)]
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
            "ncombine": c["ncombine"], "exptime": num(c["exptime"]), "magzp": num(c["magzp"]),
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
    rows = store.night_problem_events(night, orphans, (times[0], times[-1]) if times else None,
                                      limit)
    return [{"time": e["time"], "file": e["file"], "level": e["level"], "event": e["event"],
             "stage": e["stage"], "error_class": e["error_class"], "message": e["message"],
             "action": e["action"], "state_to": e["state_to"]} for e in rows]


def collect_facts(out: Path, store, night: str, settings, *, final: bool) -> dict:
    """Every fact of the report (the content of ``night.json``), read from the store.

    Frames that could not be classified have no night; they are listed with the
    night whose frames were ingested next to them (nearest frame id).
    """
    base = status_facts(store, store.path.parent, night)
    rows = list(store.frames_of_night(night)) + store.unclassified_frames_of_night(night)
    by_key: dict[tuple, list] = {}
    for e in base["frames"]:
        by_key.setdefault((e["path"], e["name"]), []).append(e)
    done = store.first_terminal_times([r["id"] for r in rows])
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
        "telescope": store.night_header_value(night, "TELESCOP") if frames else None,
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
        # the first screen (issue 21, lane changes): the latest frame and the candidates
        "latest": latest_frame_facts(store, night),
        "candidates": candidate_facts(store, night),
        "settings_source": getattr(settings, "source", None),
        "settings": settings.model_dump(mode="json"),
    }
