"""Latency of the watch daemon: from a frame's arrival to its product and its coadd update.

Simulates a night (no truth images), starts ``photowatch watch`` as a
subprocess on an empty folder, delivers the calibration frames with
:func:`photowatch.replay.deliver` (hidden temporary name, then rename), waits
until they are used, then delivers the science frames at a fixed cadence.
For each science frame it reports:

- **detect**: the daemon's recorded arrival (``frames.arrived_at``, the time of
  the rename event) minus the rename;
- **product**: its first reduced product in the store (the first ``reduced``
  event; ``finished_at`` moves on a later re-reduction) minus the rename;
- **coadd**: the update of its quick-look coadd (``coadds.updated_at`` when the
  frame is first seen ``added``) minus the rename;

their p50 / p95 / max, and whether the queue stayed bounded (the backlog of
frames received but not finished, sampled every 0.2 s, and the latency of the
last third of the frames against the first third).

Usage::

    .venv/bin/python benchmarks/bench_latency.py                  # 1024 px, 12 frames, 10 s
    .venv/bin/python benchmarks/bench_latency.py --size 4096 --cadence 30
"""

from __future__ import annotations

import argparse
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


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Store:
    """Read-only looks at the daemon's state.sqlite."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(self.path, timeout=60)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


class Sampler(threading.Thread):
    """Every 0.2 s: the backlog, and the first time each frame is seen in its coadd."""

    def __init__(self, store: Store):
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.backlog: list[tuple[float, int]] = []
        self.coadd_at: dict[str, float] = {}

    def run(self):
        while not self.stop.wait(0.2):
            try:
                n = self.store.rows("SELECT COUNT(*) n FROM frames WHERE state IN "
                                    "('received', 'processing')")
                self.backlog.append((time.time(), n[0]["n"] if n else 0))
                for r in self.store.rows(
                        "SELECT f.path, c.updated_at FROM frames f JOIN coadds c ON "
                        "c.night = f.night AND c.target = f.target AND c.filter = f.filter "
                        "WHERE f.coadd = 'added'"):
                    self.coadd_at.setdefault(r["path"], ts(r["updated_at"]))
            except sqlite3.OperationalError:
                continue


def wait_ready(sock: socket.socket, proc: subprocess.Popen, timeout: float) -> None:
    sock.settimeout(1.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) before READY=1")
        try:
            if b"READY=1" in sock.recv(4096):
                return
        except TimeoutError:
            continue
    raise SystemExit("no READY=1 from the daemon")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def stats(values: list[float], digits: int = 2) -> str:
    if not values:
        return "      -        -        -"
    a = np.asarray(values)
    return (f"{np.percentile(a, 50):7.{digits}f}  {np.percentile(a, 95):7.{digits}f}  "
            f"{a.max():7.{digits}f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="frame size (px; 4096 for LMI-like)")
    p.add_argument("--binning", type=int, default=2)
    p.add_argument("--science", type=int, default=12, help="science frames")
    p.add_argument("--cadence", type=float, default=10.0, help="seconds between science frames")
    p.add_argument("--workers", type=int, default=0, help="daemon workers (0 = cores)")
    p.add_argument("--chunked", action="store_true", help="write science frames in chunks")
    p.add_argument("--config", help="daemon config (default: built-in settings)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)

    from photowatch.replay import deliver
    from photowatch.simulate import simulate_night

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("watch", "out"):
        shutil.rmtree(work / sub, ignore_errors=True)
    t0 = time.perf_counter()
    night = simulate_night(work / "sim", size=args.size, binning=args.binning, seed=7,
                           n_science=args.science, write_models=False, write_crmasks=False,
                           overwrite=True)
    print(f"simulated {len(night.frames)} frames of {args.size}x{args.size} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    calibrations = [f.path for f in night.frames if f.kind in ("bias", "dark", "flat")]
    science = [f.path for f in night.frames if f.kind == "object"]
    watch, out = work / "watch", work / "out"
    watch.mkdir()
    config = args.config
    if config is None:
        config = work / "config.toml"
        config.write_text(f"[daemon]\nworkers = {args.workers}\n")

    name = f"photowatch-bench-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "PYTHONUNBUFFERED": "1"}
    log = open(work / "daemon.log", "w")  # noqa: SIM115  (open for the daemon's lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "photowatch", "watch", str(watch), "--out",
                             str(out), "--catalog", str(night.catalog_path), "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    store = Store(out / "state.sqlite")
    try:
        wait_ready(sock, proc, 300)
        sock.close()  # nothing more to read: the daemon drops its notifications
        for src in calibrations:
            deliver(src, watch / src.name)
        wait_for(lambda: len(store.rows(
            "SELECT id FROM frames WHERE kind IN ('bias','dark','flat') AND state IN "
            "('used','rejected','quarantined','ignored')")) == len(calibrations),
            args.timeout, "the calibrations", proc)
        print(f"{len(calibrations)} calibration frames used; science every {args.cadence:g} s",
              flush=True)
        sampler = Sampler(store)
        sampler.start()
        arrivals: dict[str, float] = {}
        start = time.monotonic()
        for i, src in enumerate(science):
            time.sleep(max(0.0, start + i * args.cadence - time.monotonic()))
            dest = watch / src.name
            arrivals[str(dest.resolve())] = deliver(src, dest, chunked=args.chunked)
        wait_for(lambda: len(store.rows(
            "SELECT id FROM frames WHERE kind='object' AND state IN ('reduced','rejected',"
            "'quarantined') AND (coadd IS NULL OR coadd IN ('added','excluded'))"))
            == len(science), args.timeout, "the science frames", proc)
        time.sleep(0.5)
        sampler.stop.set()
        sampler.join()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(300)
        else:
            code = proc.returncode
        log.close()
        sock.close()

    rows = {r["path"]: r for r in store.rows("SELECT * FROM frames WHERE kind='object'")}
    first_done = {}
    for r in store.rows("SELECT f.path, MIN(e.time) t FROM events e JOIN frames f ON "
                        "f.id = e.frame_id WHERE e.state_to IN ('reduced','rejected') "
                        "AND e.state_from = 'processing' GROUP BY f.path"):
        first_done[r["path"]] = ts(r["t"])
    detect, product, coadd = [], [], []
    print(f"\n{'frame':<16} {'state':<9} {'detect s':>8} {'product s':>9} {'coadd s':>8}")
    for path, arrived in arrivals.items():
        r = rows[path]
        d = ts(r["arrived_at"]) - arrived
        pr = first_done[path] - arrived if path in first_done else None
        co = sampler.coadd_at[path] - arrived if path in sampler.coadd_at else None
        detect.append(d)
        if pr is not None and r["state"] == "reduced":
            product.append(pr)
        if co is not None:
            coadd.append(co)
        print(f"{Path(path).name:<16} {r['state']:<9} {d:8.3f} "
              f"{pr if pr is not None else float('nan'):9.2f} "
              f"{co if co is not None else float('nan'):8.2f}")
    backlog = max((n for _, n in sampler.backlog), default=0)
    third = max(1, len(product) // 3)
    early = float(np.median(product[:third])) if product else float("nan")
    late = float(np.median(product[-third:])) if product else float("nan")
    drained = not sampler.backlog or sampler.backlog[-1][1] == 0
    bounded = bool(product) and late <= 1.5 * early + 1.0 and drained
    workers = args.workers or os.cpu_count()
    print(f"\nsize {args.size}x{args.size} (binning {args.binning}), {len(science)} science "
          f"frames every {args.cadence:g} s, {workers} workers on {os.cpu_count()} cores, "
          f"{'chunked' if args.chunked else 'rename'} delivery")
    print(f"{'latency (s)':<22} {'p50':>7}  {'p95':>7}  {'max':>7}")
    print(f"{'arrival -> detected':<22} {stats(detect, 3)}")
    print(f"{'arrival -> product':<22} {stats(product)}")
    print(f"{'arrival -> coadd':<22} {stats(coadd)}")
    print(f"queue: max backlog {backlog} frames; median product latency first third "
          f"{early:.2f} s, last third {late:.2f} s -> {'bounded' if bounded else 'GROWING'}")
    print(f"daemon exit status {code}; work folder {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
