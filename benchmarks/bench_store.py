"""The state store's bookkeeping cost per frame: record it, take it, set its QC, finish it.

    .venv/bin/python benchmarks/bench_store.py [--frames N] [--repeat R]

Each frame is what the engine does to the store for one object frame: ``add_frame``,
``transition`` received → processing, ``update_frame`` (QC), ``transition`` →
reduced with its product; every call is its own ``BEGIN IMMEDIATE`` transaction with
its event row. Prints the median over ``--repeat`` runs, in ms per frame.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from photowatch.state.store import Store


def run(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.sqlite")
        t0 = time.perf_counter()
        for i in range(n):
            info = {"std_name": f"f{i}.fits", "kind": "object", "camera": "C0",
                    "filter": "SDSS-R", "night": "2020-01-28", "binning": "2x2",
                    "obs_time": f"2020-01-29T02:{i // 60 % 60:02d}:{i % 60:02d}"}
            fid, _ = store.add_frame(path=f"/raw/{i}.fits", sha256=f"h{i}", size=1,
                                     mtime=1.0, info=info)
            store.transition(fid, ["received"], "processing")
            store.update_frame(fid, qc_json={"fwhm_arcsec": 1.0 + i % 7})
            store.transition(fid, ["processing"], "reduced", product=f"/p/{i}.fits")
        dt = time.perf_counter() - t0
        store.close()
    return 1000 * dt / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ms = statistics.median(run(args.frames) for _ in range(args.repeat))
    print(f"{args.frames} frames: {ms:.2f} ms per frame (median of {args.repeat})")


if __name__ == "__main__":
    main()
