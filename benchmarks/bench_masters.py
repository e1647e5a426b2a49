"""Benchmark: the cost of adding the k-th calibration frame to a master, and the final rebuild.

Simulates N bias frames (default 20) of 4096x4096 and adds them one at a time
through the engine's MasterBook (prepare, quality cuts, running clipped mean,
state save, new master version written), timing each add and the peak memory;
then times the end-of-night rebuild (chunked sigma-clipped median).

    .venv/bin/python benchmarks/bench_masters.py [--size 4096] [--n 20]

Prints a table; figures go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--kind", choices=["bias", "flat"], default="bias")
    parser.add_argument("--keep", help="keep the work folder here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from photowatch.core.classify import FrameInfo
    from photowatch.core.config import Settings
    from photowatch.io.fits import read_raw
    from photowatch.run.engine import Engine
    from photowatch.run.ingest import ingest_file
    from photowatch.sim.night import simulate_night

    work = Path(args.keep or tempfile.mkdtemp(prefix="pw-bench-masters-"))
    t0 = time.perf_counter()
    n_flat = args.n + 2 if args.kind == "flat" else 0
    night = simulate_night(work / "sim", size=args.size, binning=1 if args.size > 2048 else 2,
                           n_bias=args.n if args.kind == "bias" else 5, n_dark=0,
                           n_flat=n_flat, n_science=0, catalog=False, write_models=False,
                           write_crmasks=False, overwrite=True)
    print(f"# simulated {len(night.frames)} frames of {args.size}x{args.size} in "
          f"{time.perf_counter() - t0:.0f} s ({work})", file=sys.stderr)
    settings = Settings().with_overrides(paths={"output_dir": str(work / "out")})
    engine = Engine(settings, workers=1, command="bench")
    engine.startup()
    rows = []
    for f in night.frames:
        ingest_file(engine.store, f.path, settings)
    frames = engine.store.frames(order="obs_time, id")
    print(f"{'k':>3} {'kind':>5} {'read s':>7} {'add s':>7} {'state':>8} {'peak RSS MB':>12}")
    k = 0
    for row in frames:
        info = FrameInfo.from_summary(json.loads(row["info_json"]))
        if args.kind == "flat" and info.kind == "bias":
            # biases for the flats' master bias: not timed
            raw, _ = read_raw(row["path"])
            engine.book.add_frame(row["id"], info, raw, engine.profile("lmi"))
            continue
        t1 = time.perf_counter()
        raw, _ = read_raw(row["path"])
        t2 = time.perf_counter()
        outcome = engine.book.add_frame(row["id"], info, raw, engine.profile("lmi"))
        t3 = time.perf_counter()
        k += 1
        rows.append((k, t2 - t1, t3 - t2))
        print(f"{k:3d} {info.kind:>5} {t2 - t1:7.2f} {t3 - t2:7.2f} {outcome.state:>8} "
              f"{rss_mb():12.0f}", flush=True)
    t4 = time.perf_counter()
    made = engine.book.final_masters(night.frames[0].obs_time and
                                     engine.store.nights()[0])
    t5 = time.perf_counter()
    print(f"final rebuild ({', '.join(c.kind for c in made)}): {t5 - t4:.1f} s, "
          f"peak RSS {rss_mb():.0f} MB")
    adds = [r[2] for r in rows]
    if len(adds) > 4:
        first, last = sum(adds[1:4]) / 3, sum(adds[-3:]) / 3
        print(f"add cost, frames 2-4: {first:.2f} s; last 3: {last:.2f} s "
              f"(ratio {last / first:.2f})")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
