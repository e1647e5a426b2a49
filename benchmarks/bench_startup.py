"""Benchmark: start-up of ``photowatch reduce`` / ``watch`` (imports, settings, profiles, store).

Each repeat is a fresh interpreter that imports what ``reduce`` and ``watch`` import,
loads the settings and every instrument profile, opens the engine (store, recovery)
and stops there: the time before the first frame can be looked at. Reported per
step as wall time from the process's start (the parent's ``time.monotonic()`` just
before it starts the child; the clock is system-wide) and the CPU time the process used (wall time on a loaded machine mostly measures the
other processes; CPU time does not). Then ``reduce`` on an empty folder, end to end.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import os, sys, time, json
T0 = float(sys.argv[2])
def since_start():  # CLOCK_MONOTONIC is system-wide: the parent's time just before the start
    return time.monotonic() - T0
def cpu():
    t = os.times(); return t.user + t.system
out = {}
import photowatch.run.batch, photowatch.run.watch, photowatch.cli  # noqa: F401
out["imports"] = (since_start(), cpu())
from photowatch.core.config import load_settings
from photowatch.core.instruments import available_profiles, load_profile
settings = load_settings(None).with_overrides(paths={"output_dir": sys.argv[1]})
for name in available_profiles():
    load_profile(name)
out["settings + profiles"] = (since_start(), cpu())
from photowatch.run.engine import Engine
engine = Engine(settings, command="reduce")
engine.startup()
engine.shutdown()
out["engine ready (store, recovery)"] = (since_start(), cpu())
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    runs: dict[str, list] = {}
    whole, whole_cpu = [], []
    with tempfile.TemporaryDirectory(prefix="pw_startup_") as tmp:
        empty = Path(tmp) / "raw"
        empty.mkdir()
        for i in range(args.repeat):
            out = Path(tmp) / f"out{i}"
            res = subprocess.run([sys.executable, "-c", _CHILD, str(out), repr(time.monotonic())],
                                 capture_output=True, text=True, cwd=tmp, check=True)
            for step, (wall, cpu) in json.loads(res.stdout.strip().splitlines()[-1]).items():
                runs.setdefault(step, []).append((wall, cpu))
            t = time.perf_counter()
            before = os.times()
            subprocess.run([sys.executable, "-m", "photowatch", "reduce", str(empty), "--out",
                            str(Path(tmp) / f"reduce{i}")], capture_output=True, check=True,
                           cwd=tmp)
            after = os.times()
            whole.append(time.perf_counter() - t)
            whole_cpu.append(after.children_user + after.children_system
                             - before.children_user - before.children_system)
    load = os.getloadavg()[0]
    print(f"start-up, median of {args.repeat} (load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"{'step (cumulative)':<34}{'wall s':>8}{'CPU s':>8}")
    for step, vals in runs.items():
        print(f"{step:<34}{statistics.median(v[0] for v in vals):8.2f}"
              f"{statistics.median(v[1] for v in vals):8.2f}")
    print(f"{'reduce on an empty folder':<34}{statistics.median(whole):8.2f}"
          f"{statistics.median(whole_cpu):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
