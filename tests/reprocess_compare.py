"""Compare two output folders of the same nights: pixels, catalogues and store rows.

Used by the reprocess tests (``reduce`` + ``finalize`` on one machine against
``reprocess``). Times, ids, owners and the output folder's own path are left out;
every other value must agree (pixels within floating-point tolerance).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from astropy.io import fits

#: columns that differ between two runs of the same work
VOLATILE = {"id", "arrived_at", "received_at", "started_at", "finished_at", "updated_at",
            "created_at", "time", "seen_at", "owner", "heartbeat"}
#: header cards that hold a time of writing
VOLATILE_CARDS = {"DATE", "CHECKSUM", "DATASUM", "PWDATE", "PROCTIME"}


def _norm(value, out: str):
    if isinstance(value, str):
        value = value.replace(out, "OUT")
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, dict | list):
            return _strip_ids(parsed)
        return value
    return value


def _strip_ids(obj):
    if isinstance(obj, dict):
        return {k: _strip_ids(v) for k, v in obj.items()
                if k not in ("master_id", "frame_id", "seconds", "timings")}
    if isinstance(obj, list):
        return [_strip_ids(v) for v in obj]
    return obj


def store_rows(out: Path) -> dict:
    """The store's rows keyed by their natural keys, with ids mapped to names."""
    out = Path(out).resolve()
    conn = sqlite3.connect(out / "state.sqlite")
    conn.row_factory = sqlite3.Row
    names = {r["id"]: r["name"] or r["raw_name"] for r in conn.execute("SELECT * FROM frames")}

    def clean(row) -> dict:
        return {k: _norm(row[k], str(out)) for k in row.keys() if k not in VOLATILE}  # noqa: SIM118 (a Row iterates values)

    rows = {"frames": {}, "masters": {}, "coadds": {}, "files": {}, "events": [], "meta": {}}
    for r in conn.execute("SELECT * FROM frames"):
        rows["frames"][r["name"] or r["raw_name"]] = clean(r)
    for r in conn.execute("SELECT * FROM masters"):
        d = clean(r)
        d["inputs_json"] = sorted(names[i] for i in json.loads(r["inputs_json"] or "[]"))
        rows["masters"][(r["kind"], r["camera"], r["filter"], r["binning"], r["readout"],
                         r["target"], r["night"], r["version"])] = d
    for r in conn.execute("SELECT * FROM coadds"):
        rows["coadds"][(r["night"], r["target"], r["filter"])] = clean(r)
    for r in conn.execute("SELECT * FROM files"):
        d = clean(r)
        d["frame_id"] = names[r["frame_id"]]
        rows["files"][r["path"]] = d
    for r in conn.execute("SELECT * FROM events"):
        d = clean(r)
        d["frame_id"] = names.get(r["frame_id"])
        rows["events"].append(json.dumps(d, sort_keys=True, default=str))
    rows["events"].sort()
    for r in conn.execute("SELECT * FROM meta"):
        if not r["key"].startswith("memory"):
            rows["meta"][r["key"]] = _norm(r["value"], str(out))
    conn.close()
    return rows


def products(out: Path) -> list[str]:
    """Relative paths of the FITS products (hidden state folders left out)."""
    out = Path(out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.fits")
                  if not any(part.startswith(".") for part in p.relative_to(out).parts))


def compare_fits(a: Path, b: Path, rtol: float = 1e-6, atol: float = 1e-9) -> list[str]:
    """Differences between two FITS files (empty: the same within float tolerance)."""
    diffs = []
    with fits.open(a) as ha, fits.open(b) as hb:
        if len(ha) != len(hb):
            return [f"{a.name}: {len(ha)} vs {len(hb)} HDUs"]
        for i, (x, y) in enumerate(zip(ha, hb)):
            for key in set(x.header) | set(y.header):
                if key in VOLATILE_CARDS or key in ("COMMENT", "HISTORY", ""):
                    continue
                vx, vy = x.header.get(key), y.header.get(key)
                if isinstance(vx, float) and isinstance(vy, float):
                    if not np.isclose(vx, vy, rtol=rtol, atol=atol, equal_nan=True):
                        diffs.append(f"{a.name}[{i}] {key}: {vx} vs {vy}")
                elif vx != vy:
                    diffs.append(f"{a.name}[{i}] {key}: {vx!r} vs {vy!r}")
            if x.data is None or y.data is None:
                if (x.data is None) != (y.data is None):
                    diffs.append(f"{a.name}[{i}]: data in one only")
                continue
            if isinstance(x, fits.BinTableHDU):
                if x.columns.names != y.columns.names or len(x.data) != len(y.data):
                    diffs.append(f"{a.name}[{i}]: table shape or columns differ")
                    continue
                for col in x.columns.names:
                    cx, cy = np.asarray(x.data[col]), np.asarray(y.data[col])
                    if cx.dtype.kind in "fc":
                        ok = np.allclose(cx, cy, rtol=rtol, atol=atol, equal_nan=True)
                    else:
                        ok = np.array_equal(cx, cy)
                    if not ok:
                        diffs.append(f"{a.name}[{i}] column {col} differs")
            else:
                dx, dy = np.asarray(x.data), np.asarray(y.data)
                if dx.shape != dy.shape or not np.allclose(dx, dy, rtol=rtol, atol=atol,
                                                           equal_nan=True):
                    diffs.append(f"{a.name}[{i}]: pixels differ")
    return diffs


def compare_outputs(ref: Path, other: Path) -> list[str]:
    """Every difference between two output folders (products and store rows)."""
    diffs = []
    pa, pb = products(ref), products(other)
    if pa != pb:
        diffs.append(f"products differ: only in ref {sorted(set(pa) - set(pb))}, "
                     f"only in other {sorted(set(pb) - set(pa))}")
    for rel in sorted(set(pa) & set(pb)):
        diffs += compare_fits(Path(ref) / rel, Path(other) / rel)
    ra, rb = store_rows(ref), store_rows(other)
    for table in ra:
        if ra[table] == rb[table]:
            continue
        if isinstance(ra[table], dict):
            for key in sorted(set(ra[table]) | set(rb[table]), key=str):
                x, y = ra[table].get(key), rb[table].get(key)
                if x != y:
                    if x is None or y is None:
                        diffs.append(f"{table} {key}: in one store only")
                        continue
                    cols = [c for c in set(x) | set(y) if x.get(c) != y.get(c)] \
                        if isinstance(x, dict) else ["value"]
                    diffs.append(f"{table} {key}: {cols}: "
                                 + "; ".join(f"{x.get(c) if isinstance(x, dict) else x!r} vs "
                                             f"{y.get(c) if isinstance(y, dict) else y!r}"
                                             for c in cols)[:300])
        else:
            only_a = sorted(set(ra[table]) - set(rb[table]))
            only_b = sorted(set(rb[table]) - set(ra[table]))
            diffs.append(f"{table}: {len(ra[table])} vs {len(rb[table])} rows; only in ref "
                         f"{only_a[:3]}, only in other {only_b[:3]}")
    return diffs
