"""The watcher in-process: which names it takes, and when a file is complete and stable.

A recording callback stands in for ingest; every test checks that a file is
handed over exactly once and only when it is a complete FITS file (or, after
``incomplete_timeout_s``, as it is).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from photowatch.core.config import Daemon as DaemonSettings
from photowatch.io.fits import fits_incomplete_reason
from photowatch.io.rawfiles import find_raw_files, is_raw_file
from photowatch.run.watch import Watcher

PATTERNS = DaemonSettings().patterns


def fits_bytes(seed: int, n: int = 64) -> bytes:
    """A small complete FITS file (distinct content per seed)."""
    import io

    from astropy.io import fits

    data = np.random.default_rng(seed).integers(0, 60000, (n, n), dtype=np.uint16)
    buf = io.BytesIO()
    fits.PrimaryHDU(data.astype(np.int32)).writeto(buf)
    return buf.getvalue()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Recorder:
    def __init__(self):
        self.calls: list[tuple[Path, str, str | None]] = []
        self.lock = threading.Lock()

    def __call__(self, path: Path, arrived_at: str) -> None:
        with self.lock:
            self.calls.append((path, arrived_at, fits_incomplete_reason(path)))

    def names(self) -> list[str]:
        with self.lock:
            return [p.name for p, _, _ in self.calls]


@pytest.fixture
def watching(tmp_path):
    """Start a watcher on tmp_path/raw; yields (rawdir, recorder, watcher); stops it after."""
    started = []

    def start(*, polling: bool = False, known=None, observer: bool = True, **overrides):
        raw = tmp_path / "raw"
        raw.mkdir(exist_ok=True)
        values = dict(settle_s=0.3, rescan_interval_s=60.0, incomplete_timeout_s=60.0,
                      polling=polling, poll_interval_s=0.2)
        values.update(overrides)
        settings = DaemonSettings(**values)
        rec = Recorder()
        watcher = Watcher(raw, settings, rec, known=known, exclude=tmp_path / "raw" / "out")
        stop = threading.Event()
        if observer:
            watcher.start_observer()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        started.append((watcher, stop, thread))
        wait_for(watcher.scanned.is_set, what="the startup scan")
        return watcher.rawdir, rec, watcher

    yield start
    for watcher, stop, thread in started:
        stop.set()
        watcher.stop_observer()
        thread.join(10)


# ------------------------------------------------------------------------------ names
NAMES = [
    ("a.fits", True), ("night/a.fits", True), ("A.FITS", True), ("a.fit", True),
    ("a.fts", True), ("a.fits.fz", True), ("a.fits.gz", True), ("a.fz", True),
    (".a.fits", False), (".x.fits.tmp", False), ("a.fits.tmp", False), ("a.fits.part", False),
    ("a.part", False), (".hidden/a.fits", False), ("a.txt", False), ("a.fits~", False),
    ("out/reduced/x.fits", False),
]


@pytest.mark.parametrize(("rel", "taken"), NAMES)
def test_candidate_names(tmp_path, rel, taken):
    raw = tmp_path.resolve()
    assert is_raw_file(raw / rel, raw, PATTERNS, exclude=raw / "out") is taken


def test_reduce_and_watch_take_the_same_files(tmp_path):
    """One raw-file rule: the folder scan of ``reduce``/``replay`` (find_raw_files) takes
    exactly the names the watcher takes, whether RAWDIR is given resolved or not."""
    raw = tmp_path / "raw"
    for rel, _ in NAMES:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"x")
    expected = sorted(raw / rel for rel, taken in NAMES if taken)
    assert find_raw_files(raw, PATTERNS, exclude=raw / "out") == expected
    relative = Path(os.path.relpath(raw))
    assert find_raw_files(relative, PATTERNS, exclude=raw / "out") == \
        sorted(relative / rel for rel, taken in NAMES if taken)


def test_outside_rawdir_is_not_a_candidate(tmp_path):
    assert not is_raw_file(tmp_path / "elsewhere.fits", tmp_path / "raw", PATTERNS)


# ------------------------------------------------------------------------------ arrivals
def _arrivals(raw: Path, tmp_path: Path, rec: Recorder) -> dict[str, bytes]:
    """Four ways a file lands; returns name → content. Checks the chunked one is not early."""
    contents = {f"{kind}.fits": fits_bytes(i) for i, kind in
                enumerate(["chunked", "renamed", "copied", "tempname"])}
    # written in chunks over ~2 s, the file closed and reopened between chunks
    data = contents["chunked.fits"]
    step = len(data) // 5 + 1
    for i in range(0, len(data), step):
        with open(raw / "chunked.fits", "ab") as fh:
            fh.write(data[i : i + step])
        time.sleep(0.4)
        assert "chunked.fits" not in rec.names() or i + step >= len(data)
    # renamed into place from outside the watched folder (same file system)
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    (staging / "renamed.fits").write_bytes(contents["renamed.fits"])
    os.rename(staging / "renamed.fits", raw / "renamed.fits")
    # copied in
    (staging / "copied.fits").write_bytes(contents["copied.fits"])
    shutil.copy(staging / "copied.fits", raw / "copied.fits")
    # written under a hidden temporary name, then renamed
    (raw / ".tempname.fits.tmp").write_bytes(contents["tempname.fits"])
    time.sleep(0.5)
    os.replace(raw / ".tempname.fits.tmp", raw / "tempname.fits")
    # never taken: a temporary that stays, a name that does not match
    (raw / "upload.fits.part").write_bytes(fits_bytes(9))
    (raw / "notes.txt").write_text("x")
    return contents


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_each_arrival_taken_once_when_complete(watching, tmp_path, polling):
    raw, rec, _ = watching(polling=polling)
    contents = _arrivals(raw, tmp_path, rec)
    wait_for(lambda: len(rec.calls) >= len(contents), what="every file")
    time.sleep(1.0)  # give a second hand-over the chance to happen (it must not)
    assert sorted(rec.names()) == sorted(contents)
    for path, arrived, reason in rec.calls:
        assert reason is None, f"{path.name} handed over incomplete: {reason}"
        assert path.read_bytes() == contents[path.name]
        assert arrived.endswith("+00:00")


def test_startup_scan(tmp_path, watching):
    raw = tmp_path / "raw"
    (raw / "night1").mkdir(parents=True)
    (raw / "old.fits").write_bytes(fits_bytes(1))
    (raw / "night1" / "nested.fits").write_bytes(fits_bytes(2))
    (raw / "known.fits").write_bytes(fits_bytes(3))
    (raw / ".hidden.fits").write_bytes(fits_bytes(4))
    an_hour_ago = time.time() - 3600
    for path in raw.rglob("*.fits"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    (raw / "fresh.fits").write_bytes(fits_bytes(5))  # may still be written: settles first
    known = str((raw / "known.fits").resolve())
    _, rec, watcher = watching(known=lambda path, size, mtime: path == known)
    # the startup scan takes settled files first, during the scan
    assert sorted(rec.names()[:2]) == ["nested.fits", "old.fits"]
    wait_for(lambda: len(rec.calls) == 3, what="the fresh file")
    assert sorted(rec.names()) == ["fresh.fits", "nested.fits", "old.fits"]
    assert not watcher.pending


def test_incomplete_file_waits_then_is_taken_as_it_is(watching):
    raw, rec, _ = watching(incomplete_timeout_s=2.0)
    data = fits_bytes(5)
    t0 = time.monotonic()
    (raw / "truncated.fits").write_bytes(data[: len(data) // 2])
    (raw / "empty.fits").write_bytes(b"")
    (raw / "text.fits").write_text("not a FITS file\n")
    wait_for(lambda: len(rec.calls) >= 3, what="the incomplete files")
    assert time.monotonic() - t0 >= 2.0
    reasons = {path.name: reason for path, _, reason in rec.calls}
    assert set(reasons) == {"truncated.fits", "empty.fits", "text.fits"}
    assert all(reasons.values())


def test_incomplete_file_completed_before_the_timeout_is_taken_complete(watching):
    raw, rec, _ = watching(incomplete_timeout_s=30.0)
    data = fits_bytes(6)
    (raw / "slow.fits").write_bytes(data[:2880])
    time.sleep(1.0)
    assert rec.calls == []
    with open(raw / "slow.fits", "ab") as fh:
        fh.write(data[2880:])
    wait_for(lambda: rec.calls, what="the completed file")
    assert rec.calls[0][2] is None


def test_rescan_finds_files_whose_events_were_lost(watching):
    # no observer at all: only the periodic rescan can find the file
    raw, rec, _ = watching(observer=False, rescan_interval_s=0.5)
    (raw / "late.fits").write_bytes(fits_bytes(7))
    wait_for(lambda: rec.calls, timeout=30, what="the rescan")
    assert rec.names() == ["late.fits"]


def test_files_in_a_new_subfolder(watching, tmp_path):
    raw, rec, _ = watching()
    staging = tmp_path / "night2"
    staging.mkdir()
    (staging / "a.fits").write_bytes(fits_bytes(10))
    (staging / "b.fits").write_bytes(fits_bytes(11))
    os.rename(staging, raw / "night2")  # a whole night's folder moved in
    (raw / "night3").mkdir()
    (raw / "night3" / "c.fits").write_bytes(fits_bytes(12))
    wait_for(lambda: len(rec.calls) >= 3, what="files in new folders")
    time.sleep(0.5)
    assert sorted(rec.names()) == ["a.fits", "b.fits", "c.fits"]


def test_callback_failure_is_retried_at_the_next_rescan(watching):
    failures = []

    raw, rec, watcher = watching(rescan_interval_s=0.5)

    def flaky(path, arrived):
        if not failures:
            failures.append(path)
            raise RuntimeError("database is locked")
        rec(path, arrived)

    watcher.on_file = flaky
    (raw / "retry.fits").write_bytes(fits_bytes(13))
    wait_for(lambda: rec.calls, what="the retry")
    assert failures and rec.names() == ["retry.fits"]


def test_inotify_failure_falls_back_to_polling(watching, monkeypatch):
    import errno

    from watchdog.observers import inotify

    def refuse(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(inotify.InotifyObserver, "schedule", refuse)
    raw, rec, watcher = watching()
    assert watcher.observer_kind == "polling"
    (raw / "polled.fits").write_bytes(fits_bytes(14))
    wait_for(lambda: rec.calls, what="the polled file")
    assert rec.names() == ["polled.fits"]


def test_observer_overflow_triggers_a_rescan(watching, monkeypatch):
    """Events lost (inotify queue overflow): watchdog's warning makes the watcher rescan."""
    import logging

    from photowatch.run import watch

    raw, rec, _ = watching()  # periodic rescans only every 60 s
    monkeypatch.setattr(watch._Events, "dispatch", lambda self, event: None)  # events lost
    (raw / "lost.fits").write_bytes(fits_bytes(15))
    time.sleep(0.5)
    assert rec.calls == []
    logging.getLogger("watchdog.observers.inotify_c").warning(
        "Inotify queue overflowed; filesystem events were lost")
    wait_for(lambda: rec.calls, what="the rescan after the overflow")
    assert rec.names() == ["lost.fits"]


def test_a_file_that_can_never_be_fits_is_taken_at_once(watching):
    """A 23-byte text file named .fits, a JPEG, SIMPLE = F: quarantined as "not FITS" at once
    (not after the incomplete timeout); a FITS still growing keeps waiting."""
    raw, rec, _ = watching(incomplete_timeout_s=60.0)
    t0 = time.monotonic()
    (raw / "text.fits").write_text("just 23 bytes of text\n")
    (raw / "photo.fits").write_bytes(b"\xff\xd8\xff\xe0" + bytes(3000))
    (raw / "false.fits").write_bytes(b"SIMPLE  =                    F" + b" " * 2849)
    data = fits_bytes(8)
    (raw / "growing.fits").write_bytes(data[:2880 + 100])
    wait_for(lambda: len(rec.calls) >= 3, timeout=30, what="the files that are not FITS")
    assert time.monotonic() - t0 < 30  # the 60 s timeout was not waited for
    reasons = {path.name: reason for path, _, reason in rec.calls}
    assert set(reasons) == {"text.fits", "photo.fits", "false.fits"}
    assert all("not FITS" in r for r in reasons.values()), reasons
    assert "starts with 'just 23 bytes of tex'" in reasons["text.fits"]
    time.sleep(1.0)
    assert "growing.fits" not in {p.name for p, _, _ in rec.calls}  # still waits
    # the same verdict from the completeness check ingest uses
    assert fits_incomplete_reason(raw / "text.fits").startswith("not FITS")
    assert "truncated" in fits_incomplete_reason(raw / "growing.fits")
