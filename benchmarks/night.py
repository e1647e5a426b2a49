"""A whole night in real time: replay a simulated night into ``photowatch watch`` and measure.

Simulates a night of LMI-like frames (calibrations, then dithered science frames in two
filters with exposures cycling through ``--exptimes``), starts the daemon on an empty
watched folder, and replays the night into it at the real cadence (from DATE-OBS)
divided by ``--speed`` (the calibrations first, back to back, and processed before the
night starts, as at a telescope), optionally writing each science file in chunks as a
camera does. Reports:

- per science frame, the latency from the file's arrival (its rename, or its last chunk)
  to its reduced product and to its updated quick-look coadd: p50, p95, max;
- the seconds per stage of the chain (medians over the science frames, from the store);
- the daemon's CPU use and peak memory, by component (from the store's meta
  ``memory:watch``, written by the daemon after each frame);
- whether it kept up (the backlog of frames not yet done stays bounded, and the last
  frames wait no longer than the first);
- the budget: a full frame (read, every stage, product write, coadd update) against
  ``astroscrappy.detect_cosmics`` (niter=2) alone on the same frame, in the same run,
  with the daemon's threads per worker.

Usage::

    .venv/bin/python benchmarks/night.py                     # 1024 px, quick
    .venv/bin/python benchmarks/night.py --size 4096         # the real thing (~30 min)

Figures go to benchmarks/README.md (``--markdown`` prints the table rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def rows(db: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=60)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        hwm = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
        return cpu, hwm
    except (OSError, IndexError, ValueError):
        return float("nan"), float("nan")


class Sampler(threading.Thread):
    """Every 0.25 s: the backlog, the first time each frame is seen in its coadd, CPU, RSS."""

    def __init__(self, db: Path, pid: int):
        super().__init__(daemon=True)
        self.db, self.pid = db, pid
        self.stop = threading.Event()
        self.backlog: list[tuple[float, int]] = []
        self.coadd_at: dict[str, float] = {}
        self.cpu_rss: tuple[float, float] = (float("nan"), float("nan"))
        self.rss_now: list[tuple[float, float]] = []  #: (time, VmRSS MB)

    def run(self):
        while not self.stop.wait(0.25):
            n = rows(self.db, "SELECT COUNT(*) n FROM frames WHERE state IN "
                              "('received', 'processing')")
            if n:
                self.backlog.append((time.time(), n[0]["n"]))
            for r in rows(self.db, "SELECT f.path, c.updated_at FROM frames f JOIN coadds c ON "
                                   "c.night=f.night AND c.target=f.target AND c.filter=f.filter "
                                   "WHERE f.coadd='added'"):
                self.coadd_at.setdefault(r["path"], ts(r["updated_at"]))
            self.cpu_rss = proc_stats(self.pid)
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.rss_now.append((time.time(), int(line.split()[1]) / 1024.0))
            except OSError:
                pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def astroscrappy_alone(product: Path, threads: int) -> float:
    """detect_cosmics (niter=2, sepmed) on a reduced frame's SCI with its variance, in a
    child process with the daemon's threads per worker (OpenMP reads them at start)."""
    code = (
        "import time, numpy as np, astroscrappy\n"
        "from photowatch.io.products import read_product\n"
        f"p = read_product({str(product)!r})\n"
        "sci = np.ascontiguousarray(p.sci); var = np.ascontiguousarray(p.err**2)\n"
        "best = 1e9\n"
        "for _ in range(2):\n"
        "    t = time.perf_counter()\n"
        "    astroscrappy.detect_cosmics(sci, invar=var, niter=2, sepmed=True, gain=1.0,\n"
        "                                readnoise=6.0, satlevel=1e30)\n"
        "    best = min(best, time.perf_counter() - t)\n"
        "print(best)\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="frame size (px); 4096 for LMI 2x2")
    p.add_argument("--binning", type=int, default=0, help="binning (0: 2 at 4k, else 4)")
    p.add_argument("--science", type=int, default=6, help="science frames per filter")
    p.add_argument("--exptimes", default="30,60,120,300", help="science exposures cycled (s)")
    p.add_argument("--speed", type=float, default=1.0, help="cadence divided by this")
    p.add_argument("--workers", type=int, default=0, help="daemon workers (0 = config)")
    p.add_argument("--chunked", action="store_true", help="write science frames in chunks")
    p.add_argument("--config", help="daemon config file (default: built-in settings)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--markdown", action="store_true", help="print README table rows")
    args = p.parse_args(argv)

    from photowatch.core.config import load_settings
    from photowatch.run.engine import default_workers, threads_per_worker
    from photowatch.run.replay import deliver, observation_order
    from photowatch.sim.night import simulate_night

    binning = args.binning or (2 if args.size >= 2048 else 4)
    exptimes = tuple(float(x) for x in args.exptimes.split(","))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pw_night_"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("watch", "out"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    night = simulate_night(work / "sim", size=args.size, binning=binning, seed=11,
                           filters=("SDSS-R", "SDSS-I"), n_science=args.science,
                           exptime_s=exptimes, write_models=False, write_crmasks=False,
                           overwrite=True)
    print(f"simulated {len(night.frames)} frames of {args.size}x{args.size} in "
          f"{time.perf_counter() - t0:.0f} s ({work})", flush=True)
    watch, out = work / "watch", work / "out"
    watch.mkdir()
    config = Path(args.config) if args.config else work / "config.toml"
    if not args.config:
        config.write_text("[daemon]\nreport_interval_s = 60.0\n"
                          + (f"workers = {args.workers}\n" if args.workers else ""))
    settings = load_settings(config)
    workers, threads = default_workers(settings), threads_per_worker(settings)

    name = f"photowatch-night-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "PYTHONUNBUFFERED": "1"}
    log = open(work / "daemon.log", "w")  # noqa: SIM115  (open for the daemon's lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "photowatch", "watch", str(watch), "--out",
                             str(out), "--catalog", str(night.catalog_path), "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    db = out / "state.sqlite"
    arrivals: dict[str, float] = {}
    science = {str((watch / f.raw_name).resolve()) for f in night.frames if f.kind == "object"}
    try:
        sock.settimeout(300)
        while b"READY=1" not in sock.recv(4096):
            pass
        sock.close()
        sampler = Sampler(db, proc.pid)
        sampler.start()
        order = observation_order(night.raw_dir)
        start, first = time.monotonic(), None
        calibrations = [raw for raw in order
                        if str((watch / raw.path.name).resolve()) not in science]
        for raw in calibrations:  # taken in the afternoon: delivered back to back, and done
            arrivals[str((watch / raw.path.name).resolve())] = deliver(raw.path,
                                                                       watch / raw.path.name)
        wait_for(lambda: len(rows(db, "SELECT id FROM frames WHERE kind!='object' AND state IN "
                                      "('used','rejected','quarantined','ignored')"))
                 == len(calibrations), args.timeout, "the calibrations", proc)
        print(f"{len(calibrations)} calibration frames done before the night", flush=True)
        night_start = time.time()
        for raw in order:
            path, when = raw.path, raw.obs_time
            if str((watch / path.name).resolve()) not in science:
                continue
            if first is None:
                first, start = when, time.monotonic()
            due = start + (when - first).total_seconds() / args.speed if when else time.monotonic()
            time.sleep(max(0.0, due - time.monotonic()))
            dest = watch / path.name
            chunked = args.chunked and str(dest.resolve()) in science
            arrivals[str(dest.resolve())] = deliver(path, dest, chunked=chunked)
        print(f"replayed {len(order)} frames in {time.monotonic() - start:.0f} s", flush=True)
        wait_for(lambda: len(rows(db, "SELECT id FROM frames WHERE state IN ('used','reduced',"
                                      "'rejected','quarantined','ignored') AND (kind!='object' "
                                      "OR coadd IS NULL OR coadd IN ('added','excluded'))"))
                 == len(order), args.timeout, "every frame", proc)
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        cpu, rss = sampler.cpu_rss
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(600)
        else:
            code = proc.returncode
        log.close()
    wall = time.monotonic() - start

    frames = {r["path"]: r for r in rows(db, "SELECT * FROM frames WHERE kind='object'")}
    first_done = {r["path"]: ts(r["t"]) for r in rows(
        db, "SELECT f.path, MIN(e.time) t FROM events e JOIN frames f ON f.id=e.frame_id "
            "WHERE e.state_from='processing' AND e.state_to IN ('reduced','rejected') "
            "GROUP BY f.path")}
    product, coadd, stages, totals = [], [], {}, []
    for path in sorted(science):
        r = frames.get(path)
        if r is None or path not in first_done:
            continue
        product.append(first_done[path] - arrivals[path])
        if path in sampler.coadd_at:
            coadd.append(sampler.coadd_at[path] - arrivals[path])
        timings = json.loads(r["qc_json"] or "{}").get("timings", {})
        for k, v in timings.items():
            stages.setdefault(k, []).append(v)
        if "total" in timings:
            totals.append(timings["total"])
    third = max(1, len(product) // 3)
    early, late = np.median(product[:third]), np.median(product[-third:])
    backlog = max((n for _, n in sampler.backlog), default=0)
    kept_up = late <= 1.5 * early + 5.0 and (not sampler.backlog or sampler.backlog[-1][1] == 0)
    one = next(iter(r["product"] for r in frames.values() if r["product"]), None)
    cr_alone = astroscrappy_alone(Path(one), threads) if one else float("nan")
    full = float(np.median(totals)) if totals else float("nan")

    print(f"\nnight: {args.size}x{args.size} binning {binning}, {len(science)} science frames "
          f"({', '.join(f'{e:g}' for e in exptimes)} s, 2 filters) + "
          f"{len(order) - len(science)} calibrations, cadence / {args.speed:g}, "
          f"{'chunked' if args.chunked else 'renamed'} delivery; {workers} worker(s) x "
          f"{threads} thread(s) on {os.cpu_count()} cores; daemon exit {code}")
    print(f"{'latency (s)':<24}{'p50':>8}{'p95':>8}{'max':>8}")
    print(f"{'arrival -> product':<24}{pct(product, 50):8.1f}{pct(product, 95):8.1f}"
          f"{max(product, default=float('nan')):8.1f}")
    print(f"{'arrival -> coadd':<24}{pct(coadd, 50):8.1f}{pct(coadd, 95):8.1f}"
          f"{max(coadd, default=float('nan')):8.1f}")
    print("seconds per stage (median over science frames):")
    for k in sorted(stages, key=lambda k: -np.median(stages[k])):
        print(f"  {k:<18}{np.median(stages[k]):8.2f}")
    print(f"full frame (median) {full:.2f} s; astroscrappy niter=2 alone {cr_alone:.2f} s "
          f"({threads} thread(s)); ratio {full / cr_alone:.2f}")
    print(f"daemon CPU {cpu:.0f} s over {wall:.0f} s ({cpu / wall / os.cpu_count():.0%} of the "
          f"cores); peak RSS {rss:.0f} MB")
    memory = {r["key"]: json.loads(r["value"]) for r in rows(
        db, "SELECT key, value FROM meta WHERE key IN ('memory:watch', 'memory_start:watch')")}
    parts = memory.get("memory:watch")
    if parts:
        start_mb = (memory.get("memory_start:watch") or {}).get("rss", float("nan"))
        held = sum(v for k, v in parts.items()
                   if k not in ("rss", "peak_rss", "coadds_mapped"))
        print(f"peak RSS by component (MB): start (imports, profile) {start_mb:.0f}; "
              + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()
                          if k not in ("rss", "peak_rss"))
              + f" (mapped, not resident); frames in flight and the rest "
              f"{rss - start_mb - held:.0f}; peak {rss:.0f}")
    calib_peak = max((r for t, r in sampler.rss_now if t < night_start), default=float("nan"))
    night_peak = max((r for t, r in sampler.rss_now if t >= night_start), default=float("nan"))
    print(f"highest RSS seen (0.25 s samples): calibrations {calib_peak:.0f} MB, "
          f"science night {night_peak:.0f} MB")
    print(f"kept up: {'yes' if kept_up else 'NO'} (max backlog {backlog}; median latency first "
          f"third {early:.1f} s, last third {late:.1f} s)")
    if args.markdown:
        date = datetime.now().date().isoformat()
        print(f"| {date} | {args.size} | {len(science)} | {args.speed:g} | {workers}x{threads} | "
              f"{pct(product, 50):.1f} / {pct(product, 95):.1f} | {pct(coadd, 50):.1f} / "
              f"{pct(coadd, 95):.1f} | {full:.1f} | {cr_alone:.1f} | {full / cr_alone:.2f} | "
              f"{cpu / wall / os.cpu_count():.0%} | {rss:.0f} | {'yes' if kept_up else 'no'} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
