"""Benchmark: where ``photowatch finalize`` spends its time, phase by phase (wall and CPU).

Finalizes a reduced output directory *in this process* with timers around finalize's
steps (``photowatch.run.finalize``'s functions), then again (nothing left to do), and
prints each phase's wall time and CPU time (``time.process_time``: all threads). CPU
seconds compare two versions of the code fairly on a busy machine, where wall times do
not; to compare with an older commit, run this script with ``PYTHONPATH`` pointing at an
export of it (``git archive <commit> photowatch | tar -x -C /tmp/old``) on a fresh copy of
the same reduced night.

    .venv/bin/python benchmarks/bench_finalize_phases.py --size 2048 [--science 30]
        [--keep DIR] [--tolerance 0.1]
    .venv/bin/python benchmarks/bench_finalize_phases.py --out DIR/out   # reduced already

finalize overlaps some steps: the kept frames' astrometry checks (``_astrometry_moved``)
run in a background thread during the final masters, and the kept products' CALFINAL
marks during the final coadd; a phase's CPU seconds count every thread of the process
while it runs, so they include that background work.

A night is simulated and reduced (``photowatch reduce``, as in bench_finalize.py) unless
``--out`` names an output directory that ``reduce`` has filled; finalize changes it.
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: finalize's steps and the parts of them worth a figure of their own
PHASES = ("_drain", "snapshot", "keep_unchanged", "_astrometry_moved", "_write_bpms",
          "mark_night_defects",
          "reassess", "final_coadds", "_covering_grid", "final_coadd", "save_png",
          "coadd_depth", "_catalogues", "coadd_catalog", "_calibrate_catalogue", "compare",
          "write_report")


def timed_finalize(out: str, tolerance: float) -> tuple[str, float, float, dict]:
    from photowatch.core.config import Settings
    from photowatch.run import finalize as fin

    times: dict[str, list[float]] = {}

    def wrap(name):
        fn = getattr(fin, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = times.setdefault(name, [0.0, 0.0])
                acc[0] += time.perf_counter() - t
                acc[1] += time.process_time() - c
        setattr(fin, name, timed)
        return fn

    originals = {name: wrap(name) for name in PHASES if hasattr(fin, name)}
    settings = Settings().with_overrides(paths={"output_dir": out},
                                         calibration={"final_tolerance": tolerance})
    try:
        t, c = time.perf_counter(), time.process_time()
        result = fin.finalize(settings)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        for name, fn in originals.items():
            setattr(fin, name, fn)
    return result.text(), wall, cpu, times


def report(title: str, text: str, wall: float, cpu: float, times: dict) -> None:
    print(f"## {title}: {wall:.1f} s wall, {cpu:.1f} s CPU\n{text}")
    accounted = 0.0
    for name, (w, c) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        if name in ("final_coadds", "_catalogues"):
            print(f"  {name:22s} wall {w:7.1f} s  CPU {c:7.1f} s   (contains the next lines)")
            continue
        if name not in ("final_coadd", "coadd_catalog", "_covering_grid", "save_png",
                        "coadd_depth", "_calibrate_catalogue"):
            accounted += c
        print(f"  {name:22s} wall {w:7.1f} s  CPU {c:7.1f} s")
    outer = sum(times.get(n, (0, 0))[1] for n in ("final_coadds",))
    print(f"  {'final masters, other':22s} CPU {cpu - accounted - outer:7.1f} s (the rest)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--science", type=int, default=30)
    p.add_argument("--keep", metavar="DIR")
    p.add_argument("--out", metavar="DIR", help="an output directory reduce has filled")
    p.add_argument("--tolerance", type=float, default=0.1)
    args = p.parse_args()

    work = None
    if args.out:
        out = args.out
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_finalize import run

        from photowatch.sim.night import simulate_night

        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pw_phases_"))
        shutil.rmtree(work / "out", ignore_errors=True)
        night = simulate_night(work / "sim", size=args.size,
                               binning=2 if args.size >= 2048 else 4, filters=("SDSS-R",),
                               n_science=args.science, exptime_s=120.0, write_models=False,
                               write_crmasks=False, overwrite=True)
        out = str(work / "out")
        wall, rss, _ = run(["reduce", str(night.raw_dir), "--out", out, "--catalog",
                            str(night.catalog_path)])
        print(f"reduce: {wall:.0f} s, peak RSS {rss:.0f} MB", flush=True)
    report("finalize", *timed_finalize(out, args.tolerance))
    print(f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    report("finalize again", *timed_finalize(out, args.tolerance))
    if work is not None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
