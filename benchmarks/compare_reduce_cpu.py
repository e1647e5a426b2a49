"""CPU of ``photowatch reduce`` on one simulated night, for several checkouts side by side.

On the shared machine wall times measure the other processes; a reduce's own CPU
(user + system of the process and its children, from ``wait4``) does not, so running
the checkouts at the same time on the same raw night gives a fair ratio. Each checkout
is a folder holding a ``photowatch`` package (``git archive <commit> photowatch | tar -x
-C DIR``); each reduce runs with ``PYTHONPATH=DIR``, the built-in default settings (no
config.toml in the working folder) and ``OMP_NUM_THREADS=1``. Prints, per checkout,
user / system CPU, peak RSS and the median stage times from its store (wall clock:
useful side by side only).

Usage::

    .venv/bin/python benchmarks/compare_reduce_cpu.py --size 4096 --science 3 \\
        --work /tmp/cmp OLD_DIR NEW_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frame_cpu import simulated_night  # noqa: E402  (the same night)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkouts", nargs="+", metavar="DIR")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--science", type=int, default=3, help="science frames per filter")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", required=True, help="folder for the night (kept, reused)")
    args = p.parse_args(argv)

    work = Path(args.work).resolve()
    sim = work / "sim"
    done = simulated_night(sim, args.size, args.science)
    procs = []
    for k, checkout in enumerate(args.checkouts):
        out = work / f"out{k}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve()), "OMP_NUM_THREADS": "1"}
        env.pop("PHOTOWATCH_CONFIG", None)
        cmd = [sys.executable, "-m", "photowatch", "reduce", str(sim / "raw"), "--out", str(out),
               "--catalog", done.read_text(), "--workers", str(args.workers)]
        with open(work / f"log{k}.txt", "w") as log:  # the child keeps its own descriptor
            procs.append((checkout, out, subprocess.Popen(cmd, cwd=work, env=env, stdout=log,
                                                          stderr=subprocess.STDOUT)))
    for checkout, out, proc in procs:
        _, status, ru = os.wait4(proc.pid, 0)
        print(f"{checkout}: exit {os.waitstatus_to_exitcode(status)}; CPU user "
              f"{ru.ru_utime:.1f} s, system {ru.ru_stime:.1f} s, total "
              f"{ru.ru_utime + ru.ru_stime:.1f} s; peak RSS {ru.ru_maxrss / 1024:.0f} MB")
        stages: dict[str, list[float]] = {}
        conn = sqlite3.connect(out / "state.sqlite")
        for (qc,) in conn.execute("SELECT qc_json FROM frames WHERE kind='object'"):
            for name, v in json.loads(qc or "{}").get("timings", {}).items():
                stages.setdefault(name, []).append(v)
        conn.close()
        print("  median stage wall (s): " + ", ".join(
            f"{n} {np.median(v):.2f}" for n, v in sorted(stages.items(),
                                                       key=lambda kv: -np.median(kv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
