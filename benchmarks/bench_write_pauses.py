"""How long does a raw file stay unchanged while it is still being written?

``daemon.incomplete_timeout_s`` is the longest a *growing FITS file* may stay
unchanged (same size and mtime) before the watcher gives up waiting and
quarantines it as truncated. This script measures that quiet time for the ways a
frame reaches the watched folder here: ``cp`` of a whole file, and a camera-like
writer (header first, then the data in chunks with pauses: ``replay.deliver``
with ``--chunked``, or a header-then-readout writer that pauses for the readout).
A poller thread stats the file every ``--poll-ms`` and records the longest
interval between two observed changes.

Run: ``.venv/bin/python benchmarks/bench_write_pauses.py --size 4096 --readout-s 20``

What it cannot measure on this machine, and the default must still cover:
an NFS client caches file attributes for up to ``acregmax`` (60 s by default,
nfs(5)), so a poller on NFS may see an unchanged size for up to a minute while
the file grows on the server; and a slow single-amplifier readout of a 4k x 4k
CCD at 100 kHz takes ~170 s, during which a camera that writes its header at
shutter close writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def watch_quiet(path: Path, stop: threading.Event, poll_s: float) -> dict:
    """Poll ``path``; the longest time (s) between two observed (size, mtime) changes."""
    result = {"longest_quiet_s": 0.0, "changes": 0}
    last, since = None, None
    while not stop.is_set():
        try:
            st = os.stat(path)
            key = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        now = time.monotonic()
        if key is not None and key != last:
            if since is not None:
                result["longest_quiet_s"] = max(result["longest_quiet_s"], now - since)
            result["changes"] += 1
            last, since = key, now
        time.sleep(poll_s)
    return result


def measure(name: str, write, dest: Path, poll_s: float) -> None:
    stop = threading.Event()
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(watch_quiet(dest, stop, poll_s)))
    thread.start()
    t0 = time.monotonic()
    write()
    total = time.monotonic() - t0
    time.sleep(5 * poll_s)
    stop.set()
    thread.join()
    print(f"{name:28s} write {total:7.2f} s   longest quiet while growing "
          f"{out['longest_quiet_s']:6.2f} s   ({out['changes']} changes seen)")
    dest.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="frame side in pixels (16-bit)")
    ap.add_argument("--readout-s", type=float, default=20.0,
                    help="pause between header and data of the header-first writer")
    ap.add_argument("--poll-ms", type=float, default=10.0)
    args = ap.parse_args()
    from astropy.io import fits

    from photowatch.run.replay import deliver

    poll_s = args.poll_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src.fits"
        data = np.random.default_rng(1).integers(0, 60000, (args.size, args.size),
                                                 dtype=np.uint16)
        fits.PrimaryHDU(data).writeto(src)
        print(f"frame: {args.size}x{args.size} 16-bit, {src.stat().st_size / 1e6:.1f} MB; "
              f"poll every {args.poll_ms:.0f} ms")
        dest = tmp / "dest.fits"
        measure("cp", lambda: subprocess.run(["cp", str(src), str(dest)], check=True), dest,
                poll_s)
        measure("shutil.copyfile", lambda: shutil.copyfile(src, dest), dest, poll_s)
        measure("replay --chunked (4 in 2 s)",
                lambda: deliver(src, dest, chunked=True, chunks=4, duration_s=2.0), dest,
                poll_s)
        raw = src.read_bytes()

        def header_then_readout():
            with open(dest, "wb") as fh:
                fh.write(raw[:2880])
                fh.flush()
                time.sleep(args.readout_s)
                fh.write(raw[2880:])

        measure(f"header, {args.readout_s:.0f} s readout, data", header_then_readout, dest,
                poll_s)


if __name__ == "__main__":
    main()
