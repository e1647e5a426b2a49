"""The alert hook (issue 21): ``[alerts] command`` run on events, never blocking the engine.

Events: ``target_detected``, ``target_faded`` (run/live.py), ``new_candidate`` (the
changes lane calls :func:`alert`), ``frame_rejected`` and ``daemon_problem``
(run/engine.py). Each event is one JSON document on the command's stdin::

    {"event": "target_detected", "time": "2026-...Z", "out": "/data/out", ...facts}

The command runs through ``/bin/sh`` on one background thread, one event at a time,
killed after ``[alerts] timeout_s``. Events wait in a bounded queue (``max_queue``);
when it is full the oldest is dropped with a warning, so a hung or slow command costs
alerts, never frames. A failing command gives one log line (exit status, the end of
its stderr).
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
import time
from datetime import UTC, datetime

from photowatch.core.logs import get_logger

log = get_logger("photowatch.alerts")


class AlertRunner:
    """A bounded queue of events and the thread that runs the command on them."""

    def __init__(self, settings, out: str = ""):
        self.settings = settings
        self.out = str(out)
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = 0
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.command.strip())

    def emit(self, event: str, facts: dict | None = None) -> bool:
        """Queue one event (returns at once); False when not sent (no command, event off)."""
        if not self.enabled or event not in self.settings.events:
            return False
        doc = {"event": event, "time": datetime.now(UTC).isoformat(timespec="seconds"),
               "out": self.out, **(facts or {})}
        with self._cond:
            while len(self._queue) >= self.settings.max_queue:
                old = self._queue.popleft()
                self.dropped += 1
                log.warning("alert_dropped", alert=old.get("event"),
                            problem=f"{self.settings.max_queue} alerts waiting",
                            action="oldest alert dropped")
            self._queue.append(doc)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="alerts", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    # idle a minute: the thread ends (emit starts another)
                    if not self._cond.wait(timeout=60.0) and not self._queue:
                        self._thread = None
                        return
                doc = self._queue.popleft()
                self._running += 1
            try:
                self._run(doc)
            except Exception as exc:  # the thread must outlive any one alert
                self.failed += 1
                log.warning("alert_failed", alert=doc.get("event"), problem=str(exc),
                            action="the alert is lost")
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _run(self, doc: dict) -> None:
        data = json.dumps(doc, default=str).encode()
        try:
            proc = subprocess.run(self.settings.command, shell=True, input=data,
                                  capture_output=True, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            self.failed += 1
            log.warning("alert_failed", alert=doc["event"],
                        problem=f"command did not finish within {self.settings.timeout_s:g} s",
                        action="killed; the alert is lost")
            return
        except OSError as exc:
            self.failed += 1
            log.warning("alert_failed", alert=doc["event"], problem=str(exc),
                        action="the alert is lost")
            return
        if proc.returncode != 0:
            self.failed += 1
            tail = proc.stderr.decode(errors="replace").strip()[-300:]
            log.warning("alert_failed", alert=doc["event"],
                        problem=f"command exited with status {proc.returncode}: {tail}",
                        action="the alert is lost")
            return
        self.sent += 1
        log.info("alert_sent", alert=doc["event"])

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was handled (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True


def runner(engine) -> AlertRunner:
    """The engine's alert runner (made on first use)."""
    r = getattr(engine, "_alert_runner", None)
    if r is None:
        r = AlertRunner(engine.settings.alerts, str(engine.out))
        engine._alert_runner = r
    return r


def alert(engine, event: str, facts: dict | None = None) -> None:
    """Send ``event`` with ``facts`` to the configured command; never raises, never blocks."""
    try:
        runner(engine).emit(event, facts)
    except Exception as exc:  # an alert must never cost a frame
        log.warning("alert_failed", alert=event, problem=str(exc), action="the alert is lost")
