"""Per-frame cost in CPU seconds: the chain + coadd update against astroscrappy alone.

On a loaded machine the daemon benchmark's wall-clock ratio (``night.py``) mostly
measures the other processes (at load 10 on 2 cores, two runs of the same code gave
1.42 and 1.58). This one counts CPU instead: a simulated 1k night (LMI-like, two
filters, 30/60 s, as ``night.py --size 1024``) is ingested into an engine with one
worker; its calibrations are reduced, then its object frames are processed by
``Engine.step()`` in this thread with the engine's stage clocks switched from
``time.perf_counter`` to ``time.thread_time``, so every per-stage figure and the
per-frame total (read, every stage, product write, store, coadd update; re-reductions
include the coadd swap-out) are the CPU time of the thread that reduced the frame.
PNG previews (a background thread) and the report are not in the total, as in the
daemon's. ``astroscrappy.detect_cosmics`` (niter=2, sepmed, one OpenMP thread) on the
first product is timed the same way (best of 3). The ratio is median total / that.

Usage::

    .venv/bin/python benchmarks/bench_frame_cpu.py                 # 1024 px
    .venv/bin/python benchmarks/bench_frame_cpu.py --profile out.prof   # + cProfile (CPU)

``--keep DIR`` keeps (and reuses) the simulated night. Compare two versions of the
code by running this with ``PYTHONPATH`` pointing at each checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the daemon's 2 workers x 1 thread

import numpy as np  # noqa: E402


def cpu_clocks(*modules) -> None:
    """Make ``time.perf_counter`` in these modules the calling thread's CPU clock."""
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                     if not k.startswith("_")})
    clock.perf_counter = time.thread_time
    for module in modules:
        module.time = clock


def simulated_night(sim: Path, size: int, science: int) -> Path:
    """The benchmark night (seed 11, two filters, 30 and 60 s) in ``sim``, simulated once;
    returns the file naming its catalogue (kept, so a second run reuses the night)."""
    done = sim / "catalog.path"
    if not done.exists():
        from photowatch.sim.night import simulate_night

        night = simulate_night(sim, size=size, binning=2 if size >= 2048 else 4,
                               seed=11, filters=("SDSS-R", "SDSS-I"), n_science=science,
                               exptime_s=(30.0, 60.0), write_models=False,
                               write_crmasks=False, overwrite=True)
        done.write_text(str(night.catalog_path))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--science", type=int, default=6, help="science frames per filter")
    p.add_argument("--keep", metavar="DIR", help="work (and keep the simulated night) in DIR")
    p.add_argument("--profile", metavar="FILE", help="write a cProfile (CPU clock) of the frames")
    args = p.parse_args(argv)

    import photowatch.run.engine as engine_mod
    import photowatch.run.science as science_mod
    import photowatch.stages.chain as chain_mod
    from photowatch.core.config import load_settings
    from photowatch.run.batch import find_raw_files
    from photowatch.run.engine import Engine
    from photowatch.run.ingest import ingest_file
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pw_framecpu_"))
    sim = work / "sim"
    done = simulated_night(sim, args.size, args.science)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    settings = load_settings(None)
    cpu_clocks(engine_mod, science_mod, chain_mod)
    engine = Engine(settings, out, catalog_path=done.read_text(), command="reduce", workers=1)
    engine.startup()
    try:
        for path in find_raw_files(sim / "raw", settings.daemon.patterns, exclude=out):
            ingest_file(engine.store, path, settings)
        conn = engine.store.conn
        while conn.execute("SELECT COUNT(*) FROM frames WHERE kind!='object' AND state IN "
                           "('received', 'processing')").fetchone()[0]:
            engine.step()
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
        c0, w0, steps = time.thread_time(), time.perf_counter(), 0
        while engine.step():
            steps += 1
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        engine.drain_background()
        rows = conn.execute("SELECT product, qc_json FROM frames WHERE kind='object'").fetchall()
    finally:
        engine.shutdown()
    totals, stages = [], {}
    for row in rows:
        timings = json.loads(row["qc_json"] or "{}").get("timings", {})
        for k, v in timings.items():
            stages.setdefault(k, []).append(v)
        if "total" in timings:
            totals.append(timings["total"])
    product = next(r["product"] for r in rows if r["product"])
    cr = astroscrappy_cpu(product)
    full = float(np.median(totals))
    load = os.getloadavg()
    print(f"{len(totals)} object frames, {steps} reductions (re-reductions included) in "
          f"{cpu:.1f} s CPU / {wall:.1f} s wall; load average {load[0]:.1f} {load[1]:.1f}")
    print("CPU seconds per stage (median over frames):")
    for k in sorted(stages, key=lambda k: -np.median(stages[k])):
        print(f"  {k:<18}{np.median(stages[k]):8.3f}")
    print(f"full frame (median) {full:.3f} s CPU; astroscrappy niter=2 alone {cr:.3f} s CPU; "
          f"ratio {full / cr:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def astroscrappy_cpu(product: str) -> float:
    import astroscrappy

    from photowatch.io.products import read_product

    prod = read_product(product)
    sci = np.ascontiguousarray(prod.sci)
    var = np.ascontiguousarray(prod.err.astype(np.float32) ** 2)
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        astroscrappy.detect_cosmics(sci, invar=var, niter=2, sepmed=True, gain=1.0,
                                    readnoise=6.0, satlevel=1e30)
        best = min(best, time.thread_time() - t)
    return best


if __name__ == "__main__":
    sys.exit(main())
