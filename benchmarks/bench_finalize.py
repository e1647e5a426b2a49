"""Benchmark: ``photowatch finalize`` on a night of N 4096x4096 science frames.

Simulates a night (calibrations and N science frames, by default 30 in one filter),
reduces it with ``photowatch reduce`` (timed), then runs ``photowatch finalize`` in a
child process and reports its wall time and peak memory (the child's maximum resident
set, from ``resource.getrusage`` in the child), and what it did. A second finalize
shows the idempotent run's cost.

    .venv/bin/python benchmarks/bench_finalize.py [--size 4096] [--science 30] [--keep DIR]
        [--tolerance 0.1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WRAP = ("import resource, sys\n"
         "from photowatch.cli import main\n"
         "code = main(sys.argv[1:])\n"
         "print(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}',"
         " file=sys.stderr)\n"
         "raise SystemExit(code)\n")


def run(argv: list[str]) -> tuple[float, float, str]:
    """Run a photowatch command in a child: (wall seconds, its peak RSS in MB, stdout)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAP, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"photowatch {' '.join(argv)} failed ({out.returncode}):\n"
                         f"{out.stdout}\n{out.stderr[-3000:]}")
    peak = [ln for ln in out.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    return wall, int(peak[-1].split()[1]) / 1024.0, out.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--science", type=int, default=30)
    p.add_argument("--keep", metavar="DIR")
    p.add_argument("--tolerance", type=float, default=None,
                   help="calibration.final_tolerance for finalize (default: the default "
                        "config's, 0.1)")
    args = p.parse_args()

    from photowatch.sim.night import simulate_night

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pw_finalize_"))
    shutil.rmtree(work / "out", ignore_errors=True)
    t = time.perf_counter()
    night = simulate_night(work / "sim", size=args.size, binning=2 if args.size >= 2048 else 4,
                           filters=("SDSS-R",), n_science=args.science, exptime_s=120.0,
                           write_models=False, write_crmasks=False, overwrite=True)
    print(f"simulated {len(night.frames)} frames ({args.science} science) of "
          f"{args.size}x{args.size} in {time.perf_counter() - t:.0f} s", flush=True)
    out = str(work / "out")
    wall, rss, _ = run(["reduce", str(night.raw_dir), "--out", out, "--catalog",
                        str(night.catalog_path)])
    print(f"reduce: {wall:.0f} s, peak RSS {rss:.0f} MB", flush=True)
    config = []
    if args.tolerance is not None:
        (work / "finalize.toml").write_text(
            f"[calibration]\nfinal_tolerance = {args.tolerance}\n")
        config = ["--config", str(work / "finalize.toml")]
    wall, rss, text = run(["finalize", "--out", out, *config])
    print(f"finalize: {wall:.0f} s, peak RSS {rss:.0f} MB\n{text}", flush=True)
    wall2, _, text2 = run(["finalize", "--out", out, *config])
    print(f"finalize again (nothing to do): {wall2:.1f} s\n{text2}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
