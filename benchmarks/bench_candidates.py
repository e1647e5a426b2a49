"""False candidates per frame and the per-frame cost of the changes check, at 4k.

For each seed, simulates a night with NOTHING injected (``--inject``: an
asteroid and a fading new source as well), reduces it with its reference
catalogue (``photowatch.run.batch.reduce_directory``, the daemon's code path)
and reads the store: every candidate of a night with nothing injected is a
false one. Reports, per seed and in total: science frames compared, false
candidates (new / varying), false candidates per frame, and the seconds the
check added per frame (``qc_json.timings.changes``: reference, comparison,
store, linking, table; the cutouts are drawn on the background thread).
With ``--inject``: the frame where the new source first became a candidate
against the first frame where the truth puts it above the 5 sigma limit, and
how many tracks and objects the asteroid's detections fell into.

``--reanalyse DIR ...`` runs only the comparison again
(``stages.changes.find_candidates``) on the products of nights kept with ``--keep``,
against their catalogue or (``--truth-reference``) the simulator's whole star list to
r = 23.5 with catalogue-like errors: a reference deeper than the frames.

Usage::

    .venv/bin/python benchmarks/bench_candidates.py                        # 4096 px, seeds 1 2 3
    .venv/bin/python benchmarks/bench_candidates.py --size 1024 --seeds 1  # quick
    .venv/bin/python benchmarks/bench_candidates.py --catalog-limit 23.5   # reference deeper than the frames
    .venv/bin/python benchmarks/bench_candidates.py --reanalyse /tmp/bench_candidates_4_* [--truth-reference]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def injections(night_date: str = "2020-01-29"):
    from photowatch.sim.movers import Asteroid, NewSource

    t0 = datetime.fromisoformat(night_date).replace(tzinfo=UTC) + timedelta(hours=2)
    return [Asteroid(60.0 + 40 / 3600, 25.0 - 50 / 3600, t0 + timedelta(minutes=20), 0.4, 0.2),
            NewSource(60.0 - 60 / 3600, 25.0 + 45 / 3600, t0 + timedelta(minutes=5),
                      mags={"r": 20.0}, alpha=1.2)]


def run_seed(work: Path, args, seed: int) -> dict:
    from photowatch.core.config import Settings
    from photowatch.run.batch import reduce_directory
    from photowatch.sim.night import simulate_night

    t0 = time.perf_counter()
    binning = 2 if args.size >= 2048 else 4
    sim = simulate_night(work / "sim", size=args.size, binning=binning, seed=seed,
                         filters=("SDSS-R",), n_science=args.science, n_bias=3, n_dark=2,
                         n_flat=4, exptime_s=args.exptime, write_models=False,
                         write_crmasks=False, catalog_mag_limit=args.catalog_limit,
                         injections=injections() if args.inject else (), overwrite=True)
    t_sim = time.perf_counter() - t0
    out = work / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    t0 = time.perf_counter()
    summary = reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                               progress=False)
    t_red = time.perf_counter() - t0
    db = sqlite3.connect(out / "state.sqlite")
    db.row_factory = sqlite3.Row
    frames = db.execute("SELECT name, raw_name, qc_json FROM frames WHERE kind='object' AND "
                        "state='reduced'").fetchall()
    cands = db.execute("SELECT * FROM candidates").fetchall()
    cost = [json.loads(f["qc_json"])["timings"].get("changes") for f in frames]
    cost = [c for c in cost if c is not None]
    compared = sum(1 for f in frames if "candidates" in json.loads(f["qc_json"]))
    res = {"seed": seed, "frames": len(frames), "compared": compared,
           "new": sum(c["kind"] == "new" for c in cands),
           "varying": sum(c["kind"] == "varying" for c in cands),
           "changes_s_median": float(np.median(cost)) if cost else None,
           "changes_s_max": float(np.max(cost)) if cost else None,
           "simulate_s": round(t_sim, 1), "reduce_s": round(t_red, 1), "ok": summary.ok}
    if args.inject:
        by_raw = {f.raw_name: f for f in sim.frames}
        names = {f["name"]: f["raw_name"] for f in frames}
        truth_new = [c for c in cands if c["kind"] == "new"]
        res["injected"] = []
        for obj in ("asteroid", "transient"):
            hits = []
            for c in truth_new:
                inj = [d for d in by_raw[names[c["frame"]]].injected or [] if d["name"] == obj]
                if inj and np.hypot(c["x"] - inj[0]["x"], c["y"] - inj[0]["y"]) < 2.0:
                    hits.append(c)
            per_frame = []
            for f in sorted(frames, key=lambda f: f["name"]):
                inj = [d for d in by_raw[f["raw_name"]].injected or [] if d["name"] == obj]
                if inj:
                    hit = [c for c in hits if c["frame"] == f["name"]]
                    per_frame.append({"frame": f["raw_name"], "true_mag": round(inj[0]["mag"], 2),
                                      "candidate": bool(hit),
                                      "snr": round(hit[0]["snr"], 1) if hit else None})
            res["injected"].append({"name": obj, "detections": len(hits),
                                    "objects": len({h["object_id"] for h in hits}),
                                    "moving": sum(h["moving"] for h in hits),
                                    "frames": per_frame})
        res["false_new"] = res["new"] - sum(i["detections"] for i in res["injected"])
    else:
        res["false_new"] = res["new"]
    res["false_per_frame"] = (res["false_new"] + res["varying"]) / max(compared, 1)
    return res


def reanalyse(dirs, truth_reference: bool) -> None:
    """The comparison alone, again, on kept nights (false candidates and its seconds)."""
    from astropy.table import Table

    from photowatch.io.products import read_product
    from photowatch.sim.night import SimNight, catalog_error
    from photowatch.stages.changes import find_candidates

    total, frames, seconds = 0, 0, []
    for d in dirs:
        root = Path(d)
        sim = SimNight.load(root / "sim")
        if truth_reference:
            st = sim.stars
            err = catalog_error(np.asarray(st["r"]))
            rng = np.random.default_rng(0)
            ref = Table({"ra": st["ra"], "dec": st["dec"],
                         "mag": np.asarray(st["r"]) + rng.normal(0, 1, len(st)) * err,
                         "magerr": err})
        else:
            cat = Table.read(sim.catalog_path)
            ref = Table({"ra": cat["ra"], "dec": cat["dec"], "mag": cat["r"],
                         "magerr": cat["r_err"]})
        scale = sim.params["pixel_scale_arcsec"]
        db = sqlite3.connect(root / "out" / "state.sqlite")
        db.row_factory = sqlite3.Row
        for f in db.execute("SELECT * FROM frames WHERE kind='object' AND state='reduced'"):
            p = read_product(f["product"])
            c = p.cat
            c["x"] -= 1  # 1-based on disk
            c["y"] -= 1
            qc = json.loads(f["qc_json"])
            t0 = time.perf_counter()
            r = find_candidates(c, ref, mask=p.mask, fwhm_px=qc["fwhm_arcsec"] / scale,
                                pixel_scale_arcsec=scale)
            seconds.append(time.perf_counter() - t0)
            frames += 1
            total += len(r.table)
            print(json.dumps({"night": root.name, "frame": f["raw_name"], "sources": len(c),
                              "candidates": list(r.table["kind"]), "turned_away": r.rejected}),
                  flush=True)
    print(f"reanalysed {frames} frames: {total} false candidates, {total / max(frames, 1):.2f} "
          f"per frame; comparison {np.median(seconds):.3f} s per frame (median)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--science", type=int, default=4)
    p.add_argument("--exptime", type=float, default=60.0)
    p.add_argument("--catalog-limit", type=float, default=21.0)
    p.add_argument("--inject", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reanalyse", nargs="+", metavar="DIR")
    p.add_argument("--truth-reference", action="store_true")
    args = p.parse_args(argv)
    if args.reanalyse:
        reanalyse(args.reanalyse, args.truth_reference)
        return 0
    results = []
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix=f"bench_candidates_{seed}_"))
        try:
            r = run_seed(work, args, seed)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(r), flush=True)
        results.append(r)
    frames = sum(r["compared"] for r in results)
    false = sum(r["false_new"] + r["varying"] for r in results)
    cost = [r["changes_s_median"] for r in results if r["changes_s_median"] is not None]
    print(f"| {datetime.now():%Y-%m-%d} | {args.size} | {args.exptime:g} s | "
          f"{args.catalog_limit:g} | {' '.join(map(str, args.seeds))} | {frames} | "
          f"{sum(r['false_new'] for r in results)} / {sum(r['varying'] for r in results)} | "
          f"{false / max(frames, 1):.2f} | {np.median(cost) if cost else float('nan'):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
