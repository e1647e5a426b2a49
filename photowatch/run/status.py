"""``photowatch status`` and ``photowatch masters``: what an output directory holds, now.

Read-only views of the store: counts per state, the frames waiting and why,
the newest products, the current masters, the coadds, the last errors, and
(``--json``) one entry per frame with its raw file name, type, state, reason
and product path.
"""

from __future__ import annotations

import json
from pathlib import Path

from photowatch.report.facts import status_facts
from photowatch.state.store import Store


def _store(out: Path) -> Store:
    return Store(out / "state.sqlite", command="status")


def status_data(out: Path, night: str | None = None) -> dict:
    """What ``OUT`` holds now (``photowatch status --json``): see
    :func:`photowatch.report.facts.status_facts`."""
    store = _store(out)
    try:
        return status_facts(store, out, night)
    finally:
        store.close()


def status(out: Path, *, as_json: bool = False, night: str | None = None) -> str:
    data = status_data(out, night)
    if as_json:
        return json.dumps(data, indent=1, default=str)
    lines = [f"photowatch output {data['out']}  (nights: {', '.join(data['nights']) or 'none'})"]
    order = ["received", "processing", "waiting", "held", "used", "reduced", "rejected",
             "quarantined", "ignored"]
    lines.append("frames: " + (", ".join(f"{data['counts'][s]} {s}" for s in order
                                         if data["counts"].get(s)) or "none"))
    waiting = [f for f in data["frames"] if f["state"] == "waiting"]
    if waiting:
        lines.append("waiting:")
        lines += [f"  {f['file']}: {f['reason']}" for f in waiting[:20]]
    held = [f for f in data["frames"] if f["state"] == "held"]
    if held:
        lines.append("held (fix the configuration; the next run takes them up by itself):")
        lines += [f"  {f['file']}: {f['reason']}" for f in held[:20]]
    stale = [f for f in data["frames"] if f["stale"]]
    if stale:
        lines.append(f"stale (to re-reduce with better masters): {len(stale)}")
    products = [f for f in data["frames"] if f["product"]][-5:]
    if products:
        lines.append("newest products:")
        lines += [f"  {f['product']}  [{f['state']}{'; ' + f['reason'] if f['reason'] else ''}]"
                  for f in products]
    if data["masters"]:
        lines.append("masters (newest versions):")
        for m in data["masters"]:
            tag = "final" if m["final"] else ("provisional" if m["provisional"] else "current")
            lines.append(f"  {m['night']} {m['kind']:5s} {m['camera']} {m['filter'] or '':8s} "
                         f"v{m['version']} n={m['ninputs']} {tag}  {Path(m['path']).name}")
    if data["coadds"]:
        lines.append("coadds:")
        lines += [f"  {c['path']}  {c['stacktype']} N={c['ncombine']}" for c in data["coadds"]]
    bad = [f for f in data["frames"] if f["state"] in ("quarantined", "rejected", "ignored")]
    if bad:
        lines.append("not reduced or not stacked:")
        lines += [f"  {f['file']}: {f['state']}: {f['reason']}" for f in bad[-20:]]
    if data["errors"]:
        lines.append("last problems:")
        lines += [f"  {e['time']} {e['file'] or ''} {e['event']}: {e['message'] or ''}"
                  f"{' -> ' + e['action'] if e['action'] else ''}" for e in data["errors"][:10]]
    if data["report"]:
        lines.append(f"report: {data['report']}")
    return "\n".join(lines)


#: prefixes of a rejection reason that is a failure, not a judgement of the data
FAILURE_REASONS = ("no usable master",)
FAILURE_MARKS = ("failed the same way",)


def problem_frames(store, night: str | None = None) -> dict[str, list]:
    """Frames that need a person (exit status 3): quarantined, held, and rejected for a
    reason other than quality (a deterministic failure given up, no usable master).

    Frames rejected by a quality cut (a calibration's levels, a cloudy science
    frame) are the data's verdict, not a problem of the run.
    """
    # frames never classified have no night: they belong to every night's account
    out: dict[str, list] = {"quarantined": [], "held": [], "rejected": []}
    for row in store.problem_state_frames(night):
        reason = row["reason"] or ""
        if row["state"] == "rejected" and not (reason.startswith(FAILURE_REASONS)
                                               or any(m in reason for m in FAILURE_MARKS)):
            continue
        out[row["state"]].append(row)
    return out


def problem_summary(store, night: str | None = None, extra: list[str] | None = None
                    ) -> str | None:
    """The one-line summary of :func:`problem_frames` (and ``extra``), or None."""
    probs = problem_frames(store, night)
    parts = [f"{len(v)} {k}" + (" (failed, not by quality)" if k == "rejected" else "")
             for k, v in probs.items() if v]
    parts += extra or []
    if not parts:
        return None
    return "done with problems: " + ", ".join(parts)


def masters_listing(out: Path, *, as_json: bool = False, night: str | None = None) -> str:
    store = _store(out)
    rows = store.masters_of_night(night)
    users: dict[str, list[str]] = {}
    for f in store.object_frames_with_masters():
        for used in json.loads(f["masters_json"]).values():
            users.setdefault(used.get("path", ""), []).append(f["raw_name"])
    items = []
    for m in rows:
        inputs = json.loads(m["inputs_json"] or "[]")
        names = [r["raw_name"] for r in store.frames_by_ids(inputs)]
        items.append(dict(kind=m["kind"], camera=m["camera"], filter=m["filter"] or None,
                          target=m["target"] or None, binning=m["binning"],
                          readout=m["readout"] or None, night=m["night"], version=m["version"],
                          ninputs=m["ninputs"], provisional=bool(m["provisional"]),
                          final=bool(m["final"]), method=m["method"], path=m["path"],
                          inputs=names, used_by=users.get(Path(m["path"]).name, [])))
    if as_json:
        return json.dumps(items, indent=1)
    lines = []
    for it in items:
        tag = "final" if it["final"] else ("provisional" if it["provisional"] else "")
        lines.append(f"{it['night']} {it['kind']:5s} {it['camera']} {it['filter'] or '':8s} "
                     f"{it['binning']} v{it['version']:<3d} n={it['ninputs']:<3d} {tag:11s} "
                     f"used by {len(it['used_by'])} frame(s)  {Path(it['path']).name}")
    return "\n".join(lines) or "no masters"
