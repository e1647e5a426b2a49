"""Benchmark: ``photowatch reprocess`` of simulated nights, in-process and on a LocalCluster.

Run::

    .venv/bin/python benchmarks/reprocess.py [--nights 6] [--size 1024] [--science 6]
        [--schedulers none,local:1,local:2] [--stress 2000] [--markdown] [--work DIR]

Simulates ``--nights`` nights of one field (calibrations and ``--science`` object
frames each, one folder per night), then reprocesses the archive once per
scheduler into a fresh output folder and prints the throughput (frames per
second of wall time, nights per hour) and the coordinator's own cost: the
seconds it spent publishing results (renames + one transaction per night), as
frames per second. ``--stress N`` then measures the single writer alone: the
rows of one reprocessed output, copied N/frames times with new hashes, are added
night by night into a fresh store (``Store.import_rows``), the ceiling of results
per second the coordinator sustains whatever the number of workers.
Needs the ``cluster`` extra for the ``local`` schedulers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path


def simulate(work: Path, nights: int, size: int, science: int) -> tuple[Path, str]:
    from photowatch.sim.night import simulate_night

    archive = work / "archive"
    if archive.is_dir() and len(list(archive.iterdir())) == nights:
        return archive, str(work / "sim" / "catalog.ecsv")
    shutil.rmtree(work, ignore_errors=True)
    archive.mkdir(parents=True)
    day0 = date(2020, 1, 29)
    catalog = None
    for i in range(nights):
        day = (day0 + timedelta(days=i)).isoformat()
        sim = simulate_night(work / "sim" / day, size=size, binning=2, seed=3, night_date=day,
                             n_bias=3, n_dark=2, n_flat=4, n_science=science,
                             write_models=False, write_crmasks=False)
        shutil.move(sim.raw_dir, archive / day)
        if catalog is None:
            catalog = work / "sim" / "catalog.ecsv"
            shutil.copy(sim.catalog_path, catalog)
    return archive, str(catalog)


def run(archive: Path, catalog: str, out: Path, scheduler: str) -> dict:
    from photowatch.core.config import Settings
    from photowatch.run.reprocess import reprocess

    shutil.rmtree(out, ignore_errors=True)
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    t0 = time.perf_counter()
    summary = reprocess(archive, settings, catalog=catalog, scheduler=scheduler, progress=False)
    wall = time.perf_counter() - t0
    assert summary.ok, summary.problems
    return {"scheduler": scheduler, "nights": len(summary.nights), "frames": summary.frames,
            "wall_s": wall, "frames_per_s": summary.frames / wall,
            "nights_per_h": len(summary.nights) / wall * 3600,
            "publish_s": summary.publish_seconds,
            "coordinator_frames_per_s": summary.frames / max(summary.publish_seconds, 1e-9)}


def stress(out: Path, n_frames: int) -> dict:
    """The store alone: nights of copied rows (new hashes) added one transaction each."""
    from photowatch.state.store import Store

    rows = Store(out / "state.sqlite", command="bench").export_rows()
    per_night = len(rows["frames"])
    copies = max(1, n_frames // per_night)
    tmp = Path(tempfile.mkdtemp(prefix="pw-stress-"))
    try:
        store = Store(tmp / "state.sqlite", command="bench")
        t0 = time.perf_counter()
        for k in range(copies):
            night = f"copy{k}"
            copy = {t: [dict(r) for r in rs] for t, rs in rows.items()}
            for f in copy["frames"]:
                f["sha256"] = f"{f['sha256']}:{k}"
                f["name"] = f"{k}:{f['name']}"
            for f in copy["files"]:
                f["path"] = f"{f['path']}:{k}"
            for c in copy["coadds"]:
                c["night"] = f"{c['night']}:{k}"
            for m in copy["masters"]:
                m["night"] = f"{m['night']}:{k}"
            store.import_rows(copy, night=night)
        seconds = time.perf_counter() - t0
        nrows = sum(len(v) for v in rows.values()) * copies
        return {"frames": per_night * copies, "rows": nrows, "seconds": seconds,
                "frames_per_s": per_night * copies / seconds, "rows_per_s": nrows / seconds,
                "db_mb": sum(os.path.getsize(p) for p in tmp.glob("state.sqlite*")) / 1e6}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nights", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--science", type=int, default=6)
    ap.add_argument("--schedulers", default="none,local:1,local:2")
    ap.add_argument("--stress", type=int, default=2000, help="frames for the writer alone (0: skip)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the archive and outputs "
                    "(default: a temporary one, removed)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pw-reprocess-"))
    try:
        archive, catalog = simulate(work, args.nights, args.size, args.science)
        results = []
        for sched in args.schedulers.split(","):
            r = run(archive, catalog, work / f"out-{sched.replace(':', '')}", sched)
            results.append(r)
            print(f"{sched:9s} {r['nights']} nights {r['frames']} frames: {r['wall_s']:.1f} s, "
                  f"{r['frames_per_s']:.2f} frames/s, {r['nights_per_h']:.0f} nights/h; "
                  f"coordinator {r['publish_s']:.2f} s = {r['coordinator_frames_per_s']:.0f} "
                  "frames/s", flush=True)
        st = None
        if args.stress:
            st = stress(work / f"out-{args.schedulers.split(',')[0].replace(':', '')}",
                        args.stress)
            print(f"single writer alone: {st['frames']} frames ({st['rows']} rows) in "
                  f"{st['seconds']:.2f} s = {st['frames_per_s']:.0f} frames/s, "
                  f"{st['rows_per_s']:.0f} rows/s; store {st['db_mb']:.1f} MB")
        if args.markdown:
            print("\n| date | nights x frames | size | scheduler | wall (s) | frames/s | "
                  "nights/h | coordinator (s) | coordinator frames/s |\n|---|---|---|---|---|"
                  "---|---|---|---|")
            for r in results:
                print(f"| {date.today()} | {r['nights']} x {r['frames'] // r['nights']} | "
                      f"{args.size} | {r['scheduler']} | {r['wall_s']:.1f} | "
                      f"{r['frames_per_s']:.2f} | {r['nights_per_h']:.0f} | "
                      f"{r['publish_s']:.2f} | {r['coordinator_frames_per_s']:.0f} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
