"""The report's candidates: facts from the store, one entry per object or track, and the panel.

:func:`candidate_facts` groups the night's candidate detections (store table
``candidates``) by object: a stationary new source, a varying star, or a
moving track (an asteroid is one entry, with its rate, not one per frame).
Each entry keeps its first and latest detection, the brightest magnitude, the
highest significance and the cutouts of its latest detection (paths relative
to ``OUT/candidates/<night>/``). The panel is ``report/templates/candidates.html.j2``.
"""

from __future__ import annotations

import math


def _f(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def candidate_facts(store, night: str) -> dict:
    rows = store.candidates(night)
    groups: dict = {}
    for r in rows:
        key = ("obj", r["object_id"]) if r["kind"] == "new" and r["object_id"] is not None \
            else ("var", round(r["ra"], 4), round(r["dec"], 4)) if r["kind"] == "varying" \
            else ("det", r["id"])
        groups.setdefault(key, []).append(r)
    objects = []
    for members in groups.values():
        members.sort(key=lambda r: (r["obs_mjd"] or 0, r["id"]))
        first, last = members[0], members[-1]
        moving = bool(last["moving"])
        kind = "moving" if moving else last["kind"]
        mags = [r["mag"] for r in members if r["mag"] is not None]
        objects.append({
            "kind": kind, "target": last["target"], "filters": sorted({r["filter"]
                                                                        for r in members}),
            "detections": len(members), "first_frame": first["frame"],
            "first_mjd": _f(first["obs_mjd"]), "last_frame": last["frame"],
            "last_mjd": _f(last["obs_mjd"]), "ra": _f(last["ra"]), "dec": _f(last["dec"]),
            "mag_last": _f(last["mag"]), "magerr_last": _f(last["magerr"]),
            "mag_brightest": min(mags) if mags else None,
            "ref_mag": _f(last["ref_mag"]), "delta_mag": _f(last["delta_mag"]),
            "significance": max((r["significance"] or 0) for r in members),
            "rate_ra_arcsec_min": _f(last["rate_ra"]) if moving else None,
            "rate_dec_arcsec_min": _f(last["rate_dec"]) if moving else None,
            "cutout": last["cutout"], "ref_cutout": last["ref_cutout"],
        })
    order = {"new": 0, "moving": 1, "varying": 2}
    objects.sort(key=lambda o: (order.get(o["kind"], 3), -(o["last_mjd"] or 0)))
    frames = {r["frame_id"] for r in rows}
    return {"detections": len(rows), "objects": objects, "frames_with_candidates": len(frames),
            "by_kind": {k: sum(o["kind"] == k for o in objects) for k in order},
            "table": f"../../candidates/{night}/candidates.ecsv" if rows else None}


__all__ = ["candidate_facts"]
