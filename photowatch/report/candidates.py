"""The report's candidates: facts from the store, one entry per object or track, and the panel.

:func:`candidate_facts` groups the night's candidate detections (store table
``candidates``) by object: a stationary new source, a varying star, or a
moving track (an asteroid is one entry, with its rate, not one per frame).
Each entry keeps its first and latest detection, the brightest magnitude, the
highest significance and the cutouts of its latest detection (paths relative
to ``OUT/candidates/<night>/``). :func:`candidates_html` is the panel (until
the Jinja2 templates take it over).
"""

from __future__ import annotations

import html
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


def candidates_html(facts: dict, href) -> str:
    """The candidates panel; ``href(path)`` gives a link from the report folder (or None)."""
    if not facts or not facts["objects"]:
        return "<p class='muted'>No candidates (new, varying or moving sources) yet.</p>"
    e = html.escape
    night_dir = facts["table"].rsplit("/", 1)[0] if facts.get("table") else ""

    def img(rel, alt):
        link = href(f"{night_dir}/{rel}") if rel else None
        return (f"<img src='{link}' alt='{e(alt)}' width='96' height='96' "
                "style='image-rendering:pixelated'>" if link else "")

    rows = []
    for o in facts["objects"][:100]:
        what = o["kind"]
        if o["kind"] == "moving" and o["rate_ra_arcsec_min"] is not None:
            rate = math.hypot(o["rate_ra_arcsec_min"], o["rate_dec_arcsec_min"])
            what += f" ({rate:.2f}\"/min)"
        mag = "—" if o["mag_last"] is None else f"{o['mag_last']:.2f} ± {o['magerr_last'] or 0:.2f}"
        if o["kind"] == "varying" and o["delta_mag"] is not None:
            mag += f" (Δ {o['delta_mag']:+.2f})"
        rows.append(
            f"<tr><td>{e(what)}</td><td>{e(o['target'] or '')}</td>"
            f"<td>{e(', '.join(o['filters']))}</td>"
            f"<td class='n'>{o['ra']:.6f}</td><td class='n'>{o['dec']:.6f}</td>"
            f"<td class='n'>{mag}</td><td class='n'>{o['significance']:.1f}</td>"
            f"<td class='n'>{o['detections']}</td><td>{e(o['first_frame'])}</td>"
            f"<td>{img(o['cutout'], 'frame')}{img(o['ref_cutout'], 'reference')}</td></tr>")
    link = href(facts["table"]) if facts.get("table") else None
    table_link = f" · <a href='{link}'>candidates.ecsv</a>" if link else ""
    return (f"<p>{facts['detections']} detections on {facts['frames_with_candidates']} frames: "
            f"{facts['by_kind']['new']} new, {facts['by_kind']['moving']} moving, "
            f"{facts['by_kind']['varying']} varying{table_link}</p>"
            "<div class='scroll'><table><thead><tr><th>kind</th><th>target</th><th>filter</th>"
            "<th class='n'>RA</th><th class='n'>Dec</th><th class='n'>mag (latest)</th>"
            "<th class='n'>σ</th><th class='n'>frames</th><th>first seen</th>"
            "<th>frame · reference</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


__all__ = ["candidate_facts", "candidates_html"]
