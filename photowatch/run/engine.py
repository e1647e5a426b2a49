"""The engine: takes frames from the store, runs the stages, records every outcome.

Workers (threads, ``daemon.workers``, default the number of cores) each
compare-and-set a ``received`` frame to ``processing`` and handle it:

- calibration frame → :class:`~photowatch.state.masters.MasterBook` (cuts,
  incremental master, new version) → ``used`` or ``rejected``;
- object frame → :meth:`Engine.night_context` (masters selected, or ``waiting``;
  master-sky view, field references, earlier solutions, catalogue, quality peers)
  → the declared chain of :mod:`photowatch.stages.chain`, whose updates to the
  night (sky contribution, new references, solutions, stale marks) the engine
  applies (:meth:`Engine.apply_update`) → product written atomically →
  ``reduced`` → coadd updated.

Bad input and failures never stop the engine: each ends as one store event and
one log line naming the file, the problem and what was done
(:func:`photowatch.core.errors.outcome` decides which). A transient fault (an output
that cannot be written: disk full, read-only, permissions; a lock timeout)
leaves the frame ``received`` (nothing is marked done that is not), does not
count as a try, and pauses the engine with a growing backoff
(``daemon.retry_backoff_s`` doubling up to ``daemon.retry_backoff_max_s``);
work resumes by itself when the fault is gone. A deterministic
:class:`~photowatch.core.errors.StageFailed` is retried until the frame has failed
the same way ``daemon.max_tries`` times, then it is ``rejected`` with the reason
and the number of tries. A frame its profile cannot interpret, or whose profile
is missing, is ``held`` (see :mod:`photowatch.state.store`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from photowatch.calib.select import Candidate
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings, default_workers, threads_per_worker
from photowatch.core.errors import (
    FrameIgnored,
    OutputError,
    is_transient,
    outcome,
)
from photowatch.core.instruments import Profile, load_profile
from photowatch.core.logs import get_logger
from photowatch.core.schema import header_wcs
from photowatch.io.catalogs import field_cone, open_catalog
from photowatch.io.fits import fixed_card_settings, read_raw, remove_stale_temporaries
from photowatch.report.html import write_report
from photowatch.run import science  # science.reduce_object is patched in tests
from photowatch.run.requeue import retake_held
from photowatch.stages.astrometry import AstrometryResult, wcs_geometry
from photowatch.stages.context import NightContext
from photowatch.stages.quality import Peer
from photowatch.state.coadds import CoaddBook
from photowatch.state.masters import MasterBook
from photowatch.state.refs import FieldRefs
from photowatch.state.skies import SkyBook
from photowatch.state.store import Store

log = get_logger("photowatch.run.engine")


__all__ = ["Engine", "OutputError", "default_workers", "limit_threads", "threads_per_worker"]

#: prefix of the reason of a frame rejected after ``max_tries`` deterministic failures
GAVE_UP = "failed the same way"


def limit_threads(n: int) -> None:
    """One level of parallelism: numeric libraries get ``n`` threads per worker.

    Must run before numpy/astroscrappy start their thread pools (the CLI calls
    it first thing).
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


@dataclass
class Timing:
    stages: dict
    total_s: float


class Engine:
    """Runs frames of one output directory through masters, stages, products and coadds.

    Parameters
    ----------
    settings
        validated settings (paths.output_dir is the output directory unless ``out`` is given)
    catalog_path
        a local reference catalogue file (``--catalog``), overriding ``[catalog] path``
    instrument
        a profile name (``--instrument``), overriding ``[instrument] name``
    """

    def __init__(self, settings: Settings, out: str | Path | None = None, *,
                 catalog_path: str | None = None, instrument: str | None = None,
                 command: str = "photowatch", workers: int | None = None):
        self.settings = settings
        self.out = Path(out or settings.paths.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.out / "state.sqlite", command=command)
        self.command = command
        self.instrument = instrument
        self.workers = workers or default_workers(settings)
        self.book = MasterBook(self.store, self.out, settings, self.profile)
        self.skies = SkyBook(self.book, settings)

        self.refs = FieldRefs(self.out)
        # the catalogue of an output directory is remembered, so finalize (and a restarted
        # daemon) calibrate the night the way it was started
        self.catalog_path = catalog_path or settings.catalog.path or \
            self.store.get_meta("catalog_path")
        if catalog_path:
            self.store.set_meta("catalog_path", str(Path(catalog_path).resolve()))
        self._catalog = None
        self._catalog_cache: dict = {}
        # (night, target, camera) -> the last solutions (ra, dec, AstrometryResult); a field
        # not seen by this process is rebuilt from the store (:meth:`field_solutions`)
        self._field_solutions: dict = {}
        self._solutions_guard = threading.Lock()
        #: frame id -> its quick-look solution (WCS, status), set by finalize before it
        #: re-reduces the night (the warm start of a re-solve that fails)
        self.quicklook_solutions: dict = {}
        self._coadds = None
        self._wake = threading.Condition()
        self._busy = 0
        self._busy_guard = threading.Lock()
        self._inflight: set[int] = set()
        self.paused: str | None = None
        #: seconds the workers wait before the next try while paused (doubles per failure)
        self.backoff_s = settings.daemon.retry_backoff_s
        #: monotonic time of the last try made while paused (the daemon's watchdog reads it)
        self.last_retry = time.monotonic()
        self.progress: Callable[[dict], None] | None = None
        self.processed = 0
        self.last_progress = time.time()
        self._background = None
        self._pending_background: list = []
        from photowatch.state.lightcurves import LightCurveBook

        #: issue 21: targets, forced-photometry points, light-curve files
        self.lightcurves = LightCurveBook(store=self.store, out=self.out, settings=settings,
                                          in_background=self.in_background)

    # ------------------------------------------------------------------ helpers
    def profile(self, name: str) -> Profile:
        return load_profile(name, self.settings.instrument.profile_dir or None)

    @property
    def catalog(self):
        """The reference catalogue provider, or None (relative calibration only)."""
        if self._catalog is None:

            self._catalog = open_catalog(self.settings.catalog, path_override=self.catalog_path,
                                         cache_dir=self.out / "catalogs") or False
        return self._catalog or None

    @property
    def coadds(self):
        if self._coadds is None:

            self._coadds = CoaddBook(store=self.store, refs=self.refs,
                                     settings=self.settings.coadd, out=self.out,
                                     in_background=self.in_background,
                                     threads=threads_per_worker(self.settings),
                                     lightcurves=self.lightcurves)
        return self._coadds

    def in_background(self, fn, *args, **kwargs) -> None:
        """Run a best-effort side task (PNG previews) on the background thread.

        It overlaps the next stages; a failure is logged, never raised: a preview
        must not cost a product. :meth:`drain_background` waits for them.
        """
        import concurrent.futures

        if self._background is None:
            self._background = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="background")

        def task():
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                log.warning("background_task_failed", task=getattr(fn, "__name__", "?"),
                            problem=str(exc),
                            action="skipped (a side product: preview, light-curve file)")

        self._pending_background.append(self._background.submit(task))
        self._pending_background = [f for f in self._pending_background if not f.done()]

    def drain_background(self) -> None:
        """Wait for the side tasks submitted so far."""
        import concurrent.futures

        pending, self._pending_background = self._pending_background, []
        concurrent.futures.wait(pending)

    def notify(self) -> None:
        """Wake idle workers (new frames were ingested)."""
        with self._wake:
            self._wake.notify_all()

    def startup(self) -> None:
        """Recover frames left ``processing`` by a dead process; drop stale temporaries."""
        with contextlib.suppress(Exception):
            self.store.set_meta(f"memory_start:{self.command}", _rss_mb())
        self.store.register_process("starting")
        recovered = self.store.recover(max_tries=self.settings.daemon.max_tries)
        if recovered:
            log.warning("recovered_frames", count=len(recovered),
                        action="taken up again after a crash")
        # the whole output tree: a list of folders missed lightcurves/ and candidates/,
        # which issue 21 added later (a kill -9 mid-write left a temporary there)
        remove_stale_temporaries(self.out)
        self.retake_held()
        # a coadd addition cut short: the coadd file says whether the frame got in
        self.store.resume_coadd_additions()

    def retake_held(self) -> int:
        """Held frames tried again with the configuration as it is now (requeue.retake_held)."""

        try:
            n = retake_held(self.store, self.settings, self.instrument)
        except Exception as exc:  # never stop a start for it: they stay held
            log.warning("held_retake_failed", problem=str(exc), action="frames stay held")
            return 0
        if n:
            log.info("held_frames_taken_up", count=n, action="the configuration interprets "
                     "them now")
            self.notify()
        return n

    def shutdown(self) -> None:
        self.drain_background()
        runner = getattr(self, "_alert_runner", None)
        if runner is not None:  # queued alerts get a bounded time to go out
            runner.drain(timeout=min(self.settings.alerts.timeout_s, 10.0))
        with contextlib.suppress(Exception):  # the store may be gone at exit: nothing to do
            self.store.unregister_process()

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event, *, until_idle: bool, rereduce: bool | None = None,
            nights: list[str] | None = None) -> None:
        """Run workers until ``stop`` is set (daemon) or no work is left (``until_idle``).

        ``rereduce``: also re-reduce stale frames when idle (default: the
        ``calibration.rereduce`` policy is ``idle``).
        """
        if rereduce is None:
            rereduce = self.settings.calibration.rereduce == "idle"
        errors: list[BaseException] = []
        idle_workers = set()

        def worker(index: int):
            try:
                while not stop.is_set():
                    if self.paused:
                        if until_idle:
                            return
                        with self._busy_guard:
                            resume = self.paused and time.monotonic() >= self._resume_at
                            if resume:  # one worker tries; the others wait for its verdict
                                self._resume_at = time.monotonic() + self.backoff_s
                                self._trying = True
                        if not resume or not self._try_while_paused(rereduce, nights):
                            stop.wait(min(0.5, self.backoff_s))
                        continue
                    try:
                        did = self.step(rereduce=rereduce, nights=nights)
                    except Exception as exc:  # the store itself failed (disk full, locked)
                        if not is_transient(exc):
                            raise
                        self._pause(f"state store: {type(exc).__name__}: {exc}")
                        continue
                    if did:
                        idle_workers.discard(index)
                        continue
                    idle_workers.add(index)
                    if until_idle and len(idle_workers) == self.workers and self._idle():
                        stop.set()
                        self.notify()
                        return
                    with self._wake:
                        self._wake.wait(0.5)
            except BaseException as exc:  # a bug in the engine itself: stop, report
                errors.append(exc)
                stop.set()
                self.notify()

        threads = [threading.Thread(target=worker, args=(i,), name=f"worker-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        self.drain_background()
        if errors:
            raise errors[0]
        if self.paused and until_idle:
            raise OutputError(self.paused)

    _resume_at = 0.0
    _trying = False
    _pauses = 0  #: transient faults so far (a try that adds none got through)

    def _pause(self, problem: str, blog=None) -> None:
        """Pause every worker (a transient fault), with the doubling backoff; ``blog``:
        the frame's logger when a frame was left ``received`` by it."""
        wait = self.backoff_s
        (blog or log).error("not_done", problem=problem, transient=True,
                            action=("left received; " if blog is not None else "")
                            + f"processing paused, retried in {wait:.1f} s")
        if self.paused is None:  # issue 21: one alert when a pause starts
            from photowatch.run.alerts import alert

            alert(self, "daemon_problem", {"problem": problem, "action": "processing paused"})
        self.last_retry = time.monotonic()
        with self._busy_guard:
            self._resume_at = time.monotonic() + wait
            self.backoff_s = min(wait * 2, self.settings.daemon.retry_backoff_max_s)
            self._pauses += 1
        self.paused = problem

    def _release_orphans(self) -> None:
        """Frames this process holds ``processing`` that no worker handles (their outcome
        could not be recorded: the store was full) go back to ``received``."""
        with self._busy_guard:
            inflight = set(self._inflight)
        rows = self.store.processing_here()
        for row in rows:
            if row["id"] not in inflight:
                self.store.transition(row["id"], ["processing"], "received", level="warning",
                                      message="released after a transient fault",
                                      action="retried", tries=0)

    def _try_while_paused(self, rereduce, nights) -> bool:
        """One try while paused; a success (or no work) resumes every worker."""
        self.last_retry = time.monotonic()
        paused_before = self.paused
        pauses = self._pauses  # the pause stays on (the daemon's status, the watchdog) ...
        try:
            self._release_orphans()
            did = self.step(rereduce=rereduce, nights=nights)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._pause(f"state store: {type(exc).__name__}: {exc}")
            return False
        finally:
            self._trying = False
        if self._pauses == pauses:  # ... until a try gets through
            self.paused = None
            self.backoff_s = self.settings.daemon.retry_backoff_s
            log.info("resumed", problem=paused_before, action="processing resumed")
            return did
        return False

    def _idle(self) -> bool:
        with self._busy_guard:
            if self._busy:
                return False
        return self.store.pending() == 0

    def step(self, *, rereduce: bool = True, nights: list[str] | None = None) -> bool:
        """Do one unit of work; False when there was none."""
        row = self.store.claim_next(nights=nights)
        if row is None and self._coadd_pending(nights):
            return True
        if row is None and rereduce:
            row = self.store.claim_stale(nights=nights)
        if row is None:
            return False
        with self._busy_guard:
            self._busy += 1
            self._inflight.add(row["id"])
        try:
            self.handle(row)
        finally:
            with self._busy_guard:
                self._busy -= 1
                self._inflight.discard(row["id"])
            self.processed += 1
            self.last_progress = time.time()
        return True

    # ------------------------------------------------------------------ one frame
    def handle(self, row) -> None:
        """Process one claimed frame; every outcome is recorded, nothing escapes but bugs."""
        fid, name = row["id"], row["raw_name"]
        blog = log.bind(file=name, frame_id=fid)
        rereduce = row["product"] is not None and row["kind"] == "object"
        if row["tries"] > 1:
            blog.info("retry", tries=row["tries"])
        try:
            info = FrameInfo.from_summary(json.loads(row["info_json"]))
            info = self.book.detector_numbers(info)  # measured gain/read noise (generic)
            profile = self.profile(info.instrument)
            t_read = time.perf_counter()
            raw, header = read_raw(row["path"])
            t_read = time.perf_counter() - t_read
            if info.is_calibration:
                self._calibration(row, info, raw, profile, blog)
            else:
                self._science(row, info, raw, header, profile, blog, rereduce=rereduce,
                              read_s=t_read)
        except Exception as exc:
            self._outcome(row, exc, blog)

    def _outcome(self, row, exc: BaseException, blog) -> None:
        """Record what happened to a frame whose processing raised ``exc`` (errors.outcome)."""
        fid = row["id"]
        what = outcome(exc)
        if what == "waiting":
            self.store.transition(fid, ["processing"], "waiting", reason=str(exc),
                                  message=str(exc), action="waits for masters")
            blog.info("waiting", problem=str(exc), action="waits for masters")
        elif what in ("quarantined", "ignored", "rejected"):
            self._finish_bad(fid, what, str(exc), blog)
        elif what == "held":
            reason = str(exc)
            self.store.transition(fid, ["processing"], "held", reason=reason, message=reason,
                                  level="warning", error_class="held",
                                  action="held until the configuration is fixed")
            blog.warning("frame_held", problem=str(exc),
                         action="held; a run with a fixed configuration takes it up")
        elif what == "transient":
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                problem = (f"cannot write products: {exc.strerror or exc} "
                           f"({exc.filename or self.out})")
            else:
                problem = str(exc)
            self._retry_later(fid, problem, blog, pause=True, exc=exc)
        elif what == "retry":
            self._retry_later(fid, str(exc), blog, pause=False)
        else:  # a bug: record the traceback, keep running
            tb = "".join(traceback.format_exception(exc))
            tries = (self.store.frame(fid) or {"tries": 99})["tries"]
            final = tries >= self.settings.daemon.max_tries
            state = "quarantined" if final else "received"
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self.store.transition(fid, ["processing"], state, reason=reason if final else None,
                                  message=tb[-4000:], error_class="bug", level="error",
                                  action="quarantined" if final else "retried")
            blog.error("internal_error", problem=reason, action=state,
                       exc_info=(type(exc), exc, exc.__traceback__))
            from photowatch.run.alerts import alert

            alert(self, "daemon_problem", {"problem": reason, "frame": row["raw_name"],
                                           "action": state})

    def _finish_bad(self, fid: int, state: str, reason: str, blog) -> None:
        self.store.transition(fid, ["processing"], state, reason=reason, message=reason,
                              level="warning", action=state)
        blog.warning("frame_" + state, problem=reason, action=state)
        if state == "rejected":
            self._alert_rejected(fid, reason)

    def _alert_rejected(self, fid: int, reason: str) -> None:
        from photowatch.run.alerts import alert

        row = self.store.frame(fid)
        alert(self, "frame_rejected", {"night": row["night"] if row else None,
                                       "frame": row["raw_name"] if row else None,
                                       "reason": reason})

    def _retry_later(self, fid: int, problem: str, blog, pause: bool,
                     exc: BaseException | None = None) -> None:
        """Leave a frame ``received`` for another try; or reject it after max_tries.

        ``pause``: a transient fault (disk full, read-only output, a lock
        timeout): the try is not counted, the engine pauses with a growing
        backoff. Otherwise a deterministic failure: after failing the same way
        ``daemon.max_tries`` times the frame is ``rejected`` with the reason and
        the number of tries (it would loop forever otherwise).
        """
        if pause:
            self.store.uncount_try(fid)  # the try does not count
            wait = self.backoff_s
            # error_class says what failed: 'output' (products cannot be written) or
            # 'transient' (a lock timeout...); the action says it is transient
            cls = "output" if problem.startswith("cannot write") or "(fault injection)" in \
                problem or isinstance(exc, OSError | OutputError) else "transient"
            self.store.transition(fid, ["processing"], "received", message=problem,
                                  level="error", error_class=cls,
                                  action=f"transient: will retry in {wait:.1f} s")
            self._pause(problem, blog)
            return
        row = self.store.frame(fid)
        tries = row["tries"] if row is not None else 1
        last = self.store.last_stage_error(fid)
        if last is not None and last["message"] != problem and tries > 1:
            tries = 1  # it failed differently before: count again from this failure
            self.store.reset_tries(fid, tries=1)
        max_tries = self.settings.daemon.max_tries
        if tries >= max_tries:
            reason = f"{problem} ({GAVE_UP} {tries} times; not retried)"
            self.store.transition(fid, ["processing"], "rejected", reason=reason,
                                  message=problem, level="error", error_class="stage",
                                  action=f"rejected after {tries} tries")
            blog.error("frame_rejected", problem=problem, tries=tries,
                       action=f"rejected after {tries} tries (deterministic failure)")
            self._alert_rejected(fid, reason)
            return
        self.store.transition(fid, ["processing"], "received", message=problem, level="error",
                              error_class="stage",
                              action=f"will retry (try {tries} of {max_tries})")
        blog.error("not_done", problem=problem, tries=tries,
                   action=f"left received; try {tries} of {max_tries}")

    # ------------------------------------------------------------------ calibration
    def _calibration(self, row, info: FrameInfo, raw, profile: Profile, blog) -> None:
        if not profile.uses(info.kind):
            raise FrameIgnored(f"{info.kind} frames are not used for instrument {profile.name}")
        outcome = self.book.add_frame(row["id"], info, raw, profile)
        if outcome.state == "rejected":
            self.store.transition(row["id"], ["processing"], "rejected", reason=outcome.reason,
                                  qc_json=outcome.levels, message=outcome.reason,
                                  level="warning", action="rejected")
            blog.warning("calibration_rejected", problem=outcome.reason, action="rejected")
            return
        cand = outcome.candidate
        if cand is not None:
            self.book.mark_stale(cand)
        woken = self.store.wake_waiting(camera=info.camera, binning=info.binning)
        if woken:
            self.notify()

    # ------------------------------------------------------------------ science
    def _science(self, row, info: FrameInfo, raw, header, profile: Profile, blog, *,
                 rereduce: bool, read_s: float = 0.0) -> None:
        """Compute, swap the old version out of its coadd, write, record, add to the coadd.

        The order makes every crash point safe: until the store says
        ``reduced``, a restart redoes the frame; the coadd file names the
        member versions it holds, so nothing is added twice.
        """
        with fixed_card_settings():  # ~20 ms CPU per 1k frame of header-card look-ups
            self._science_frame(row, info, raw, header, profile, blog, rereduce=rereduce,
                                read_s=read_s)

    def _science_frame(self, row, info: FrameInfo, raw, header, profile: Profile, blog, *,
                       rereduce: bool, read_s: float = 0.0) -> None:
        t0 = time.perf_counter()
        timings: dict = {}
        t_ctx = time.perf_counter()
        ctx = self.night_context(row, info, profile)
        timings["masters"] = time.perf_counter() - t_ctx
        result = science.reduce_object(ctx, raw, header, apply=self.apply_update, timings=timings)
        if rereduce:
            t1 = time.perf_counter()
            self.coadds.remove_old(row)
            result.timings["swapout"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        paths = science.write_outputs(self, row, info, header, result)
        result.timings["write"] = time.perf_counter() - t1
        version = row["product_version"] + 1
        stackable = result.accepted and result.wcs is not None and self.settings.coadd.enabled
        coadd = "pending" if stackable else ("excluded" if not result.accepted else None)
        state = "reduced" if result.accepted else "rejected"
        result.qc["timings"] = {k: round(v, 4) for k, v in result.timings.items()}
        self.store.transition(
            row["id"], ["processing"], state, product=paths["product"],
            product_version=version, quicklook=paths.get("quicklook"),
            masters_json=result.masters_used, qc_json=result.qc, accepted=int(result.accepted),
            reason=result.reason, coadd=coadd, stale=0, stale_reason=None,
            provisional=int(result.provisional),
            message=("re-reduced" if rereduce else "reduced") + (
                f"; not stacked: {result.reason}" if result.reason else ""),
            level="info" if result.accepted else "warning",
            action="stacked" if stackable else "kept out of the coadd")
        from photowatch.run import live  # issue 21: forced photometry at the targets

        t3 = time.perf_counter()
        try:
            live.measure_frame(self, {**dict(row), "product": paths["product"]}, info, header,
                               profile, result, alerts=not rereduce)
        except OSError:
            raise
        except Exception as exc:  # a light-curve point is a side product: keep the frame
            blog.error("forced_photometry_failed", problem=str(exc),
                       action="no light-curve point for this frame", exc_info=True)
        result.timings["forced"] = time.perf_counter() - t3
        if not result.accepted and not rereduce:
            from photowatch.run.alerts import alert

            alert(self, "frame_rejected", {"night": info.night, "frame": info.raw_name,
                                           "reason": result.reason, "filter": info.filter})
        if result.accepted:
            self._changes(row, info, profile, result, blog)
        if stackable:
            t2 = time.perf_counter()
            try:
                self.coadds.add(row, info, result.frame, result.wcs, result.qc, version)
            except OSError:
                raise  # the frame is reduced; its coadd update stays pending and is retried
            except Exception as exc:  # the product is good: keep it, say the coadd failed
                self.store.update_frame(row["id"], coadd="excluded")
                self.store.event("coadd_failed", frame_id=row["id"], file=info.raw_name,
                                 level="error", message=f"{type(exc).__name__}: {exc}",
                                 action="left out of the quick-look coadd")
                blog.error("coadd_failed", problem=str(exc), action="left out of the coadd",
                           exc_info=True)
            result.timings["coadd"] = time.perf_counter() - t2
        if rereduce:
            self.coadds.flush()
        total = time.perf_counter() - t0 + read_s
        qc = result.qc
        # the whole frame's cost, coadd update included (for the night's report and benchmarks)
        qc["timings"].update({"read": round(read_s, 4), "total": round(total, 4),
                              "coadd": round(result.timings.get("coadd", 0.0), 4),
                              "changes": round(result.timings.get("changes", 0.0), 4),
                              "forced": round(result.timings.get("forced", 0.0), 4)})
        self.store.update_frame(row["id"], qc_json=qc)
        blog.info("frame_reduced" if result.accepted else "frame_not_stacked",
                  name=row["name"], filter=info.filter, seconds=round(total, 2),
                  fwhm=qc.get("fwhm_arcsec"), zp=qc.get("zp"), sky=qc.get("sky_e"),
                  astrometry=qc.get("aststat"), reason=result.reason,
                  provisional=result.provisional or None)
        if self.progress:
            self.progress({"frame": info.raw_name, "seconds": total, "timings": result.timings})
        self._record_memory()
        self.maybe_update_report()

    def _changes(self, row, info: FrameInfo, profile: Profile, result, blog) -> None:
        """New, varying and moving sources of the frame (lane changes): a view of the
        product, so a failure is logged and the frame stays reduced."""
        from photowatch.run.changes import check_frame

        t = time.perf_counter()
        try:
            rows = check_frame(self, row, info, profile, result)
        except Exception as exc:
            blog.warning("changes_failed", problem=f"{type(exc).__name__}: {exc}",
                         action="no candidates for this frame", exc_info=True)
            rows = []
        result.timings["changes"] = time.perf_counter() - t
        if rows:
            blog.info("candidates", new=sum(r["kind"] == "new" for r in rows),
                      varying=sum(r["kind"] == "varying" for r in rows))
    # ------------------------------------------------------------------ the night context
    def night_context(self, row, info: FrameInfo, profile: Profile):
        """The immutable view of the night one object frame is reduced with: its masters
        (WaitForMasters if one is missing), the master-sky view, field references, the
        field's earlier solutions, the catalogue, the night's quality peers, settings."""

        masters = self.book.masters_for(info, profile)
        images = {k: img for k, (c, img) in masters.items()}
        bpm = self.book.bpm(images.get("dark"), images.get("flat"))
        peers = tuple(Peer.from_qc(r["id"], r["filter"], r["target"], r["camera"], r)
                      for r in self.store.night_quality(info.night, info.filter))
        return NightContext(
            settings=self.settings, info=info, profile=profile, frame_id=row["id"],
            member=row["name"], masters=images, bpm=bpm, sky_view=self.skies.view,
            refs=self.refs, solutions=self.field_solutions((info.night, info.target,
                                                            info.camera)),
            reference_stars=self.reference_stars, quicklook=self.quicklook_solutions.get(
                row["id"]), peers=peers,
            master_records={k: c for k, (c, img) in masters.items()},
            sky_key=self.skies.key(info))

    def apply_update(self, update) -> bool:
        """Apply what a frame changes in the night (:class:`photowatch.stages.context.Update`);
        False when a claim was won by another frame meanwhile (the stage runs again)."""
        a = update.args
        if update.kind == "sky":
            self.skies.add(a["member"], a["info"], a["pattern"], a["pointing"])
        elif update.kind == "sky_used":

            sky = a["sky"]
            self.skies.save_used(a["member"], a["info"], sky)
            key = self.skies.key(a["info"])
            self.book.mark_stale(Candidate(
                kind="sky", camera=key.camera, filter=key.filter, binning=key.binning,
                readout=key.readout, night=key.night, version=sky.version,
                ninputs=sky.version, final=False, path=sky.label, target=key.target))
        elif update.kind == "solution":
            from collections import deque

            with self._solutions_guard:
                self._field_solutions.setdefault(a["field_key"], deque(maxlen=16)).append(
                    (a["ra"], a["dec"], a["result"]))
        elif update.kind == "field":  # atomic: two workers never found two fields
            _, won = self.refs.claim_field(a["night"], a["target"], a["filt"], a["kind"],
                                           a["table"], a["ra"], a["dec"], a["radius_deg"])
            return won
        elif update.kind == "zpref":  # the first writer wins
            ref = self.refs.set_if_absent(a["night"], a["target"], a["filt"], "zpref",
                                          a["table"])
            return ref is a["table"] or dict(ref.meta) == dict(a["table"].meta)
        else:
            raise ValueError(f"unknown night update {update.kind!r}")
        return True

    def reference_stars(self, info: FrameInfo, profile: Profile, wcs0, shape):
        """Catalogue stars around the frame (cached per field), or None; and the catalogue's
        name (the context's catalogue provider)."""
        provider = self.catalog
        if provider is None:
            return None, None

        ra, dec, radius = field_cone(wcs0, shape, margin=self.settings.catalog.radius_margin,
                                     extra_arcsec=self.settings.stages.astrometry
                                     .max_pointing_error_arcsec)
        band = profile.band_for(info.filter)
        key = (info.night, info.target, round(ra, 3), round(dec, 3), band)
        cached = self._catalog_cache.get(key)
        if cached is None:
            bands = [band] if band else []
            table = provider.query(ra, dec, radius, bands=bands)
            if band and band in table.colnames and "mag" not in table.colnames:
                table["mag"] = table[band]
            cached = table
            self._catalog_cache[key] = cached
        return cached, getattr(provider, "name", "catalogue")

    def field_solutions(self, field_key: tuple) -> tuple:
        """The field's remembered solutions, (ra, dec, AstrometryResult) oldest first, as a
        snapshot. A field this process has not seen yet (a restart, finalize) is rebuilt
        from the store: the newest solved frames' product WCS and their recorded qc."""
        from collections import deque

        with self._solutions_guard:
            known = self._field_solutions.get(field_key)
            if known is not None:
                return tuple(known)
        rebuilt = deque(self._rebuild_solutions(field_key), maxlen=16)
        with self._solutions_guard:
            known = self._field_solutions.setdefault(field_key, rebuilt)
            return tuple(known)

    def _rebuild_solutions(self, field_key: tuple) -> list:
        night, target, camera = field_key
        out = []
        for rec in self.store.field_solutions(night, target, camera):
            try:
                sol = solution_from_product(rec["product"], rec["qc"])
            except Exception as exc:  # an unreadable product: the field forgets that one
                log.debug("solution_not_rebuilt", file=rec["product"], problem=str(exc))
                continue
            if sol is not None:
                out.append(sol)
        return out

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> dict:
        """MB held by each long-lived part of this process, and its resident set now / peak.

        ``coadds_mapped`` are quick-look sums memory-mapped from files (``coadd.mmap``):
        their pages are dropped from the resident set once updated. What the peak holds
        beyond the parts, the imports and the start is the frames in flight."""
        import numpy as np

        def mb(arrays) -> float:
            return round(sum(a.nbytes for a in arrays if a is not None) / 2**20, 1)

        masters = list(self.book._images.values())
        skies = list(self.skies._cache.values())
        accs = list(self.coadds._accs.values())
        planes = [p for a in accs for p in (a.sum_wd, a.sum_w, a.exp, a.ncov,
                                            *(a._images or ()))]
        out = {"masters": mb([x for m in masters for x in (m.data, m.var)]),
               "bpm": mb(self.book._bpms.values()),
               "master_sky_sums": mb([x for a in skies for x in (a.sum, a.sumvar, a.count)]),
               "master_states": mb([x for _, acc, _ in list(self.book._states.values())
                                    if acc is not None
                                    for x in (acc.sum, acc.sumvar, acc.count,
                                              *(y for f in acc.pending for y in f))]),
               "coadds_in_memory": mb(p for p in planes if not isinstance(p, np.memmap)),
               "coadds_mapped": mb(p for p in planes if isinstance(p, np.memmap))}
        out.update(_rss_mb())
        return out

    def _record_memory(self) -> None:
        try:
            self.store.set_meta(f"memory:{self.command}", self.memory_report())
        except Exception as exc:  # a figure for benchmarks: never fail a frame for it
            log.debug("memory_report_failed", problem=str(exc))

    # ------------------------------------------------------------------ report
    def maybe_update_report(self) -> None:
        """Refresh the night report at most every ``daemon.report_interval_s`` seconds."""
        interval = self.settings.daemon.report_interval_s
        if not interval:
            return
        now = time.time()
        if now - getattr(self, "_last_report", 0.0) < interval:
            return
        self._last_report = now
        try:
            self.update_report()
        except Exception as exc:  # the report is a view: never fail a frame for it
            log.warning("report_failed", problem=str(exc), action="skipped")

    def update_report(self, force: bool = False, night: str | None = None) -> None:

        nights = [night] if night else self.store.nights()[-1:]
        for n in nights:
            write_report(self.out, self.store, n, self.settings, final=False)

    def _coadd_pending(self, nights) -> bool:
        return self.coadds.process_pending(nights)


def solution_from_product(product: str, qc: dict):
    """(ra, dec, AstrometryResult) of a reduced frame, from its product's WCS and its qc
    (what :func:`photowatch.stages.astrometry.check_neighbours` compares); None when the
    qc predates the recorded offsets."""
    import math

    from astropy.io import fits


    east, north = qc.get("astoffset_east_arcsec"), qc.get("astoffset_north_arcsec")
    if east is None or north is None:
        return None
    header = fits.getheader(product, "SCI")
    wcs = header_wcs(header)
    if not wcs.has_celestial:
        return None
    ny, nx = int(header["NAXIS2"]), int(header["NAXIS1"])
    ra, dec = wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
    scale, pa, flipped = wcs_geometry(wcs)
    nan = math.nan
    result = AstrometryResult(
        wcs=wcs, status=qc.get("aststat"), method=qc.get("astmethod") or "",
        rms_arcsec=qc.get("astrms_arcsec") or nan, nstar=int(qc.get("astnstar") or 0),
        offset_arcsec=qc.get("astoffset_arcsec") or nan, offset_east_arcsec=east,
        offset_north_arcsec=north, rotation_deg=pa, scale_arcsec=scale, flipped=flipped,
        reason=qc.get("astreason") or "", suspect=bool(qc.get("astsuspect")))
    return float(ra[0]), float(dec[0]), result


def _rss_mb() -> dict:
    """This process's resident set now and at its peak (MB), from /proc (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "peak_rss"] = round(
                    int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return out
