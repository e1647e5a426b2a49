"""The watcher daemon: filesystem events → complete, stable files → store → engine.

``photowatch watch RAWDIR`` runs one process with four threads:

- the **observer** (watchdog: inotify, or polling when ``daemon.polling``, for
  NFS) reports what changes below RAWDIR;
- the **watcher** (:class:`Watcher`) turns events and directory scans into
  complete files and hands each to :func:`~photowatch.run.ingest.ingest_file`;
- the **engine** (:meth:`Engine.run <photowatch.run.engine.Engine.run>`) reduces
  what the store holds;
- the **main** thread handles signals, systemd notifications, the store
  heartbeat, and stopping (:class:`Daemon`).

When is a file taken? A file matching ``daemon.patterns`` (hidden names,
``*.tmp`` and ``*.part`` are ignored until renamed) is *ready* after a
close-after-write or a rename into place, or, for copies over NFS and the
polling observer, when its size and mtime have not changed for
``daemon.settle_s``. A ready file is ingested once
:func:`~photowatch.io.fits.fits_incomplete_reason` finds it complete; a file
that stays incomplete (unchanged) for ``daemon.incomplete_timeout_s`` is
ingested anyway, and ingest quarantines it with the reason. A file whose
first card is not ``SIMPLE  =  T`` can never become FITS: it is ingested (and
quarantined as "not FITS") at once, without waiting for the timeout; only a
FITS file that is still growing waits.

Nothing falls between the cracks: the observer starts before the startup
scan; every ``daemon.rescan_interval_s`` (and after an observer overflow or
failure) a rescan takes any file the store does not know. A file seen twice
is recorded once (``Store.known_path``, and the content hash in ingest).

Stopping (SIGTERM, SIGINT): no new frames are taken, the frames in progress
finish (or, after ``daemon.stop_timeout_s``, are abandoned: the next start
takes them up again), the process exits 0. SIGKILL at any instant is safe: the
store is transactional and products are written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from photowatch.core.config import Daemon as DaemonSettings
from photowatch.core.config import Settings
from photowatch.core.logs import get_logger
from photowatch.io.fits import NOT_FITS, fits_incomplete_reason
from photowatch.io.rawfiles import find_raw_files, is_raw_file
from photowatch.run import sdnotify
from photowatch.run.engine import Engine
from photowatch.run.ingest import ingest_file

log = get_logger("photowatch.run.watch")

#: how often the watcher looks at files it is waiting for (s)
TICK_S = 0.1
#: how often the main thread sends STATUS= and heartbeats the store (s)
STATUS_INTERVAL_S = 5.0


def iso_utc(timestamp: float) -> str:
    """A Unix time as the store writes times (ISO 8601, UTC, milliseconds)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@dataclass
class Pending:
    """A candidate file not yet ingested, and what the watcher knows of it."""

    path: Path
    size: int
    mtime: float
    changed: float  #: monotonic time of the last change seen (size, mtime)
    arrived: float  #: wall time of the last change, or of the close/rename event
    closed: bool = False  #: a close-after-write or rename came after the last change
    incomplete: tuple[int, float] | None = None  #: (size, mtime) found incomplete
    reason: str | None = None


class _Events:
    """watchdog handler: puts (kind, path, wall time) on the watcher's queue."""

    def __init__(self, sink: queue.SimpleQueue):
        self.sink = sink

    def dispatch(self, event) -> None:
        now = time.time()
        kind = event.event_type
        if kind == "moved":
            if event.src_path:
                self.sink.put(("gone", os.fsdecode(event.src_path), event.is_directory, now))
            if event.dest_path:
                self.sink.put(("moved", os.fsdecode(event.dest_path), event.is_directory, now))
        else:
            self.sink.put((kind, os.fsdecode(event.src_path), event.is_directory, now))


class _OverflowAlarm(logging.Handler):
    """Catches watchdog's warnings (inotify queue overflow, unreadable share): rescan."""

    def __init__(self, flag: threading.Event):
        super().__init__(logging.WARNING)
        self.flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        self.flag.set()


class Watcher:
    """Turns filesystem events and scans of ``rawdir`` into complete files.

    Parameters
    ----------
    rawdir
        the watched directory (recursive)
    settings
        the ``[daemon]`` section
    on_file
        called as ``on_file(path, arrived_at)`` for each file to ingest, in the
        watcher thread; ``arrived_at`` is the ISO time of its close/rename (or
        last change)
    known
        ``known(path, size, mtime)``: True for a file already taken (the store's
        ``known_path``); such files are skipped
    exclude
        a folder below ``rawdir`` never taken (the output directory)
    """

    def __init__(self, rawdir: str | os.PathLike, settings: DaemonSettings,
                 on_file: Callable[[Path, str], None], *,
                 known: Callable[[str, int, float], bool] | None = None,
                 exclude: str | os.PathLike | None = None,
                 on_rescan: Callable[[], None] | None = None):
        self.rawdir = Path(rawdir).resolve()
        self.settings = settings
        self.on_file = on_file
        self.known = known or (lambda path, size, mtime: False)
        self.on_rescan = on_rescan
        self.exclude = Path(exclude).resolve() if exclude else None
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[Path, Pending] = {}
        self.observer = None
        self.rescan_requested = threading.Event()
        self.scanned = threading.Event()
        self.scan_progress = (0, 0)
        self.taken = 0
        self.last_tick = time.monotonic()
        self.error: BaseException | None = None
        self._alarm = _OverflowAlarm(self.rescan_requested)
        self._observer_checked = 0.0
        self.polling = settings.polling

    # ------------------------------------------------------------------ observer
    @property
    def observer_kind(self) -> str:
        return "polling" if self.polling else "inotify"

    def start_observer(self) -> None:
        """Start watching (before the startup scan, so nothing falls between)."""
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )
        from watchdog.observers.polling import PollingObserver

        events = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
                  FileDeletedEvent, DirCreatedEvent, DirMovedEvent]
        logging.getLogger("watchdog").addHandler(self._alarm)

        def start(obs):
            obs.schedule(_Events(self.events), str(self.rawdir), recursive=True,
                         event_filter=events)
            obs.daemon = True
            obs.start()

        observer = None
        if not self.settings.polling:
            from watchdog.observers.inotify import InotifyObserver

            try:
                # full events: a file renamed in from outside RAWDIR is a move, not a creation
                observer = InotifyObserver(generate_full_events=True)
                start(observer)
            except OSError as exc:  # e.g. fs.inotify.max_user_watches reached
                log.warning("inotify_unavailable", rawdir=str(self.rawdir),
                            problem=exc.strerror or str(exc),
                            action="polling instead (raise fs.inotify.max_user_watches)")
                if observer is not None:
                    with contextlib.suppress(Exception):  # releases its inotify descriptor
                        observer.stop()
                observer = None
        if observer is None:
            observer = PollingObserver(timeout=self.settings.poll_interval_s)
            start(observer)
        self.polling = isinstance(observer, PollingObserver)
        self.observer = observer

    def stop_observer(self, timeout: float = 5.0) -> None:
        observer, self.observer = self.observer, None
        logging.getLogger("watchdog").removeHandler(self._alarm)
        if observer is not None:
            with contextlib.suppress(Exception):  # stopping a dead observer: nothing to do
                observer.stop()
                observer.join(timeout)

    def _check_observer(self) -> None:
        """Restart an observer that died (RAWDIR removed and re-created, share lost)."""
        now = time.monotonic()
        if now - self._observer_checked < 1.0:
            return
        self._observer_checked = now
        observer = self.observer
        alive = (observer is not None and observer.is_alive() and bool(observer.emitters)
                 and all(emitter.is_alive() for emitter in observer.emitters))
        if alive:
            return
        self.stop_observer(timeout=1.0)
        try:
            self.start_observer()
        except OSError as exc:
            log.error("watch_failed", rawdir=str(self.rawdir), problem=exc.strerror or str(exc),
                      action="retried; periodic rescans go on")
            self._observer_checked = now + self.settings.rescan_interval_s
            return
        log.warning("observer_restarted", rawdir=str(self.rawdir), action="rescanned")
        self.rescan_requested.set()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """The watcher thread: startup scan, then events, settling and rescans until ``stop``.

        The observer (started before, by :meth:`start_observer`) is stopped on return.
        """
        try:
            self.scan(stop, startup=True)
            self.scanned.set()
            next_rescan = time.monotonic() + self.settings.rescan_interval_s
            while not stop.is_set():
                self.last_tick = time.monotonic()
                self._drain(TICK_S if self.pending else 0.5)
                self._settle(stop)
                now = time.monotonic()
                if self.rescan_requested.is_set() or now >= next_rescan:
                    self.rescan_requested.clear()
                    self.scan(stop)
                    if self.on_rescan is not None:
                        try:  # held frames a fixed configuration can now read
                            self.on_rescan()
                        except Exception as exc:
                            log.error("rescan_hook_failed", problem=str(exc),
                                      action="retried at the next rescan")
                    next_rescan = time.monotonic() + self.settings.rescan_interval_s
                if not stop.is_set():
                    self._check_observer()
        except BaseException as exc:  # a bug: the daemon sees it, logs it, exits non-zero
            self.error = exc
            raise
        finally:
            self.scanned.set()
            self.stop_observer()

    def _drain(self, timeout: float) -> None:
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._on_event(*item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, kind: str, spath: str, is_dir: bool, when: float) -> None:
        path = Path(spath)
        if is_dir:
            if kind in ("created", "moved"):
                self._scan_folder(path)
            return
        if kind in ("deleted", "gone"):
            self.pending.pop(path, None)
            return
        if not is_raw_file(path, self.rawdir, self.settings.patterns, self.exclude):
            return
        item = self._track(path)
        if item is not None and kind in ("closed", "moved"):
            item.closed = True
            item.arrived = when

    def _track(self, path: Path, *, scanned: bool = False) -> Pending | None:
        """Start or refresh waiting for a file; None when gone or already taken."""
        try:
            st = path.stat()
        except OSError:
            self.pending.pop(path, None)
            return None
        item = self.pending.get(path)
        now, wall = time.monotonic(), time.time()
        if item is None:
            if self.known(str(path), st.st_size, st.st_mtime):
                return None
            # a file found by a scan has not changed since its mtime
            age = max(0.0, wall - st.st_mtime) if scanned else 0.0
            item = Pending(path, st.st_size, st.st_mtime, changed=now - age,
                           arrived=st.st_mtime if scanned else wall)
            self.pending[path] = item
        elif (st.st_size, st.st_mtime) != (item.size, item.mtime):
            item.size, item.mtime = st.st_size, st.st_mtime
            item.changed, item.arrived, item.closed = now, wall, False
        return item

    def _settle(self, stop: threading.Event, paths: list[Path] | None = None) -> None:
        """Ingest every pending file that is ready and complete (or incomplete too long)."""
        cfg = self.settings
        for path in list(self.pending) if paths is None else paths:
            if stop.is_set():
                return
            item = self._track(path) if path in self.pending else None
            if item is None:
                continue
            now = time.monotonic()
            quiet_s = now - item.changed
            if not (item.closed or quiet_s >= cfg.settle_s):
                continue
            timed_out = quiet_s >= cfg.incomplete_timeout_s
            if item.incomplete == (item.size, item.mtime):
                if timed_out:
                    self._take(item, why=f"still incomplete after {quiet_s:.0f} s: "
                                         f"{item.reason}")
                continue
            reason = fits_incomplete_reason(path)
            if reason is not None and reason.startswith(NOT_FITS):
                self._take(item, why=reason, at_once=True)
                continue
            if reason is None or timed_out:
                self._take(item, why=reason and f"still incomplete after {quiet_s:.0f} s: "
                                                 f"{reason}")
                continue
            if item.incomplete is None:
                log.debug("file_incomplete", file=path.name, problem=reason,
                          action="waits for the rest")
            item.incomplete, item.reason = (item.size, item.mtime), reason

    def _take(self, item: Pending, why: str | None = None, at_once: bool = False) -> None:
        self.pending.pop(item.path, None)
        if why:
            log.warning("file_not_fits" if at_once else "file_incomplete", file=item.path.name,
                        problem=why, action="ingested at once (quarantined)" if at_once else
                        "ingested anyway (quarantined)")
        try:
            self.on_file(item.path, iso_utc(item.arrived))
        except FileNotFoundError:
            log.info("file_gone", file=item.path.name, action="skipped")
            return
        except Exception as exc:  # keep watching; the next rescan retries this file
            log.error("ingest_failed", file=item.path.name, problem=f"{type(exc).__name__}: "
                      f"{exc}", action="retried at the next rescan", exc_info=True)
            return
        self.taken += 1

    # ------------------------------------------------------------------ scans
    def scan(self, stop: threading.Event | None = None, *, startup: bool = False) -> int:
        """Take any file below RAWDIR the store does not know; returns the files found.

        The startup scan ingests settled, complete files as it goes; files still
        being written join the pending list.
        """
        found = self._scan_folder(self.rawdir, stop=stop, startup=startup)
        if startup or found:
            log.info("startup_scan" if startup else "rescan", rawdir=str(self.rawdir),
                     new_files=found)
        return found

    def _scan_folder(self, folder: Path, *, stop: threading.Event | None = None,
                     startup: bool = False) -> int:
        try:
            files = find_raw_files(folder, self.settings.patterns, exclude=self.exclude)
        except OSError as exc:
            log.error("scan_failed", rawdir=str(folder), problem=exc.strerror or str(exc),
                      action="retried at the next rescan")
            return 0
        new = 0
        self.scan_progress = (0, len(files))
        for i, path in enumerate(files):
            if stop is not None and stop.is_set():
                break
            self.scan_progress = (i + 1, len(files))
            if path in self.pending or not is_raw_file(path, self.rawdir, self.settings.patterns,
                                                        self.exclude):
                continue
            if self._track(path, scanned=True) is None:
                continue
            new += 1
            if startup and stop is not None:
                self._settle(stop, [path])
        return new


# ============================================================================== the daemon
class Daemon:
    """The watch daemon: an engine, a watcher, signals and systemd notifications."""

    def __init__(self, rawdir: Path, settings: Settings, *, catalog: str | None = None,
                 instrument: str | None = None, workers: int | None = None):
        self.settings = settings
        self.instrument = instrument
        self.engine = Engine(settings, catalog_path=catalog, instrument=instrument,
                             command="watch", workers=workers)
        self.watcher = Watcher(rawdir, settings.daemon, self._ingest, known=self._known,
                               exclude=self.engine.out, on_rescan=self.engine.retake_held)
        self.stop_intake = threading.Event()
        self.stop_engine = threading.Event()
        self.stopping = threading.Event()
        self.signals = 0
        self.engine_error: BaseException | None = None
        self._engine_thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._last_status = 0.0
        self._last_ping = 0.0
        self._paused: str | None = None
        self._hung_logged = False

    # ------------------------------------------------------------------ callbacks
    def _known(self, path: str, size: int, mtime: float) -> bool:
        return self.engine.store.known_path(path, size, mtime)

    def _ingest(self, path: Path, arrived_at: str) -> None:
        st = path.stat()
        if self.engine.store.known_path(str(path), st.st_size, st.st_mtime):
            return
        ingest_file(self.engine.store, path, self.settings, instrument=self.instrument,
                    arrived_at=arrived_at)
        self.engine.notify()

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1
        self.stopping.set()

    # ------------------------------------------------------------------ threads
    def _run_engine(self) -> None:
        try:
            self.engine.run(self.stop_engine, until_idle=False)
        except BaseException as exc:  # an engine bug: the main thread logs it and exits 1
            self.engine_error = exc

    def start(self) -> None:
        self.engine.startup()
        # masters may have appeared while we were down (or a crash fell between a
        # calibration frame and the wake-up it owed): waiting frames try again
        woken = self.engine.store.wake_waiting()
        if woken:
            log.info("waiting_frames_retried", count=woken)
        self._engine_thread = threading.Thread(target=self._run_engine, name="engine",
                                               daemon=True)
        self._engine_thread.start()
        self.watcher.start_observer()
        self._watch_thread = threading.Thread(target=self.watcher.run, args=(self.stop_intake,),
                                              name="watcher", daemon=True)
        self._watch_thread.start()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or an internal failure (exit 1)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.start()
        self._wait_for_startup_scan()
        if not self.stopping.is_set():
            sdnotify.notify("READY=1", sdnotify.status_line(self.status_text()))
            log.info("watching", rawdir=str(self.watcher.rawdir), out=str(self.engine.out),
                     observer=self.watcher.observer_kind, workers=self.engine.workers,
                     frames=sum(self.engine.store.counts().values()))
        failure = None
        while not self.stopping.wait(1.0):
            failure = self._failure()
            if failure:
                break
            self._tick()
        return self.stop(failure)

    def _wait_for_startup_scan(self) -> None:
        while not self.watcher.scanned.wait(1.0) and not self.stopping.is_set():
            done, total = self.watcher.scan_progress
            sdnotify.notify("EXTEND_TIMEOUT_USEC=30000000",
                            sdnotify.status_line(f"startup scan: {done} of {total} files"))
            self.engine.store.heartbeat("startup scan")

    def _failure(self) -> str | None:
        if self._engine_thread is not None and not self._engine_thread.is_alive():
            err = self.engine_error
            return f"engine stopped: {type(err).__name__}: {err}" if err else "engine stopped"
        if self._watch_thread is not None and not self._watch_thread.is_alive():
            err = self.watcher.error
            return f"watcher stopped: {type(err).__name__}: {err}" if err else "watcher stopped"
        return None

    def _tick(self) -> None:
        paused = self.engine.paused
        if paused and not self._paused:
            log.error("output_blocked", problem=paused,
                      action="processing paused, frames stay received; retried with backoff "
                      f"(next in {self.engine.backoff_s:.0f} s)")
        elif self._paused and not paused:
            log.info("output_unblocked", action="processing resumed")
        self._paused = paused
        now = time.monotonic()
        interval = sdnotify.watchdog_interval_s()
        if interval and now - self._last_ping >= min(interval / 4, 5.0):
            problem = self.hung(interval / 2)
            if problem is None:
                sdnotify.notify("WATCHDOG=1")
                self._last_ping = now
                self._hung_logged = False
            elif not self._hung_logged:
                log.error("daemon_hung", problem=problem,
                          action="watchdog pings stopped: systemd restarts the service")
                self._hung_logged = True
        if now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            text = self.status_text()
            sdnotify.notify(sdnotify.status_line(text))
            with contextlib.suppress(Exception):  # a busy store delays a heartbeat, no more
                self.engine.store.heartbeat(text[:200])

    def hung(self, limit_s: float) -> str | None:
        """Why the daemon is stuck (no watchdog ping), or None while it makes progress.

        Idle, or finishing frames, is progress. A worker on one frame for longer
        than ``limit_s`` (the oldest frame this process holds ``processing``;
        ``engine.last_progress`` alone would miss one stuck worker among busy
        ones), or a watcher thread that stopped looping, is not.
        """
        if time.monotonic() - self.watcher.last_tick > limit_s:
            return f"the watcher thread has not looped for {limit_s:.0f} s"
        if self.engine.paused:
            # output blocked (disk full, read-only): a restart would not free the disk, so
            # the daemon stays up and retries; it is alive while those tries keep coming
            late = time.monotonic() - self.engine.last_retry
            allowed = limit_s + self.engine.backoff_s + 5.0
            if late > allowed:
                return (f"paused ({self.engine.paused}) and no retry for {late:.0f} s "
                        f"(limit {allowed:.0f} s)")
            return None
        if not self.engine._busy:
            return None
        row = next(iter(self.engine.store.processing_here()), None)
        if row is None or not row["started_at"]:
            return None
        since = time.time() - datetime.fromisoformat(row["started_at"]).timestamp()
        if since > limit_s:
            return (f"a worker has been on {row['raw_name']} for {since:.0f} s "
                    f"(limit {limit_s:.0f} s)")
        return None

    def status_text(self) -> str:
        counts = self.engine.store.counts()
        bad = sum(counts.get(s, 0) for s in ("rejected", "quarantined", "ignored"))
        text = (f"{counts.get('received', 0)} queued, {counts.get('processing', 0)} processing, "
                f"{counts.get('waiting', 0)} waiting for masters, {counts.get('held', 0)} held; "
                f"{counts.get('reduced', 0)} "
                f"reduced, {counts.get('used', 0)} calibrations used, {bad} rejected or "
                f"quarantined; {self.engine.processed} processed since start, "
                f"{len(self.watcher.pending)} files settling")
        if self.engine.paused:
            text += f"; PAUSED: {self.engine.paused}"
        return text

    # ------------------------------------------------------------------ stopping
    def stop(self, failure: str | None = None) -> int:
        """Stop intake, let the frames in progress finish (bounded), shut down."""
        sdnotify.notify("STOPPING=1", sdnotify.status_line(failure or "stopping"))
        if failure:
            log.error("daemon_failed", problem=failure, action="stopping (exit status 1)")
        else:
            log.info("stopping", action="no new frames; finishing the frames in progress")
        deadline = time.monotonic() + self.settings.daemon.stop_timeout_s
        self.stop_intake.set()
        if self._watch_thread is not None:
            self._watch_thread.join(max(0.1, min(10.0, deadline - time.monotonic())))
        self.watcher.stop_observer()
        self.stop_engine.set()
        self.engine.notify()
        thread = self._engine_thread
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            if self.signals > 1:  # a second signal: do not wait
                break
        abandoned = thread is not None and thread.is_alive()
        if abandoned:
            held = self.engine.store.processing_here()
            if held:
                log.warning("frames_abandoned", files=[r["raw_name"] for r in held],
                            action="left processing; taken up again at the next start")
        self.engine.shutdown()
        log.info("stopped", processed=self.engine.processed)
        code = 1 if failure else 0
        if abandoned:  # worker threads still run: leave without waiting for them
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def run_daemon(rawdir: str | os.PathLike, settings: Settings, *, catalog: str | None = None,
               instrument: str | None = None, workers: int | None = None) -> int:
    """Watch ``rawdir`` and reduce every frame that lands in it, until SIGTERM/SIGINT.

    Returns the exit status: 0 after a clean stop, 1 after an internal failure
    (the engine or the watcher thread died; systemd restarts the service).
    """
    daemon = Daemon(Path(rawdir), settings, catalog=catalog, instrument=instrument,
                    workers=workers)
    return daemon.run()
