"""``photowatch replay``: a night's raw frames, delivered into a watched folder as the camera did.

Observers use it to rehearse a night (and the benchmarks to measure latency):
the files of RAWDIR are copied into WATCHDIR in observation order (DATE-OBS,
else name order) at the observing cadence (the differences of DATE-OBS)
divided by ``speed``. Each file is delivered as a camera or a copy would:

- by default, written under a hidden temporary name (``.NAME.replay.tmp``) and
  renamed into place, so the watcher sees one complete file appear;
- with ``chunked``, written under its final name in several chunks over about
  half a second (open, write, pause, ..., close), so the watcher must wait for
  the close before taking it.

RAWDIR is only read. Sub-folders are kept (``night1/a.fits`` →
``WATCHDIR/night1/a.fits``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from photowatch.core.config import Daemon
from photowatch.core.errors import BadInput
from photowatch.io.fits import read_header
from photowatch.io.rawfiles import find_raw_files

#: a chunked write takes about this long, like a camera writing out its readout (s)
CHUNKED_DURATION_S = 0.5
CHUNKS = 8


@dataclass(frozen=True)
class RawFile:
    path: Path
    rel: Path  #: the path below RAWDIR (kept below WATCHDIR)
    obs_time: datetime | None  #: DATE-OBS (UTC), None when missing or unreadable


def _date_obs(path: Path) -> datetime | None:
    try:
        value = read_header(path).get("DATE-OBS")
    except (BadInput, OSError):
        return None
    if not value:
        return None
    text = str(value).strip().replace("Z", "")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def observation_order(rawdir: Path, patterns: list[str] | None = None) -> list[RawFile]:
    """The raw files below ``rawdir`` sorted by DATE-OBS (files without one by name, last)."""
    rawdir = Path(rawdir)
    files = [RawFile(p, p.relative_to(rawdir), _date_obs(p))
             for p in find_raw_files(rawdir, patterns or Daemon().patterns)]
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(files, key=lambda f: (f.obs_time or far, str(f.rel)))


def deliver(src: Path, dest: Path, *, chunked: bool = False, chunks: int = CHUNKS,
            duration_s: float = CHUNKED_DURATION_S) -> float:
    """Copy ``src`` to ``dest`` as a camera would; returns the arrival time (Unix time).

    The arrival is the instant the complete file is in place: the rename
    (default), or the close after the last chunk (``chunked``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not chunked:
        tmp = dest.with_name(f".{dest.name}.replay.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return time.time()
    data = src.read_bytes()
    step = -(-len(data) // chunks) if data else 1
    with open(dest, "wb") as fh:
        for i in range(0, max(len(data), 1), step):
            fh.write(data[i : i + step])
            fh.flush()
            if i + step < len(data):
                time.sleep(duration_s / chunks)
    return time.time()


def replay(rawdir: str | os.PathLike, watchdir: str | os.PathLike, *, speed: float = 1.0,
           chunked: bool = False, echo: Callable[[str], None] | None = None,
           patterns: list[str] | None = None) -> int:
    """Deliver a night's raw files into ``watchdir`` at its cadence / ``speed``.

    Prints one line per file. Returns 0 when every file was delivered, 1 when
    RAWDIR holds no raw file or a copy failed, 2 for bad arguments.
    """
    echo = echo or (lambda line: print(line, flush=True))
    rawdir, watchdir = Path(rawdir), Path(watchdir)
    if not rawdir.is_dir():
        print(f"photowatch replay: {rawdir}: not a directory", file=sys.stderr)
        return 2
    if not speed > 0:
        print(f"photowatch replay: --speed must be positive (got {speed})", file=sys.stderr)
        return 2
    if watchdir.resolve() == rawdir.resolve() or rawdir.resolve() in watchdir.resolve().parents:
        print(f"photowatch replay: {watchdir} is inside {rawdir}", file=sys.stderr)
        return 2
    files = observation_order(rawdir, patterns)
    if not files:
        print(f"photowatch replay: {rawdir}: no raw FITS files", file=sys.stderr)
        return 1
    watchdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    first = next((f.obs_time for f in files if f.obs_time), None)
    width = len(str(len(files)))
    for n, raw in enumerate(files, 1):
        if raw.obs_time and first:  # on the night's clock, scaled; late files go at once
            due = start + (raw.obs_time - first).total_seconds() / speed
            time.sleep(max(0.0, due - time.monotonic()))
        dest = watchdir / raw.rel
        try:
            deliver(raw.path, dest, chunked=chunked)
        except OSError as exc:
            print(f"photowatch replay: {raw.rel}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        when = raw.obs_time.strftime("%Y-%m-%dT%H:%M:%S") if raw.obs_time else "no DATE-OBS"
        echo(f"{n:>{width}}/{len(files)}  +{time.monotonic() - start:7.1f} s  {raw.rel}  "
             f"({when}, {dest.stat().st_size} bytes{', chunked' if chunked else ''})")
    return 0
