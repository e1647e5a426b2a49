"""``photowatch reprocess``: an archive of nights, each night a task, on Dask distributed.

The graph, per night: classify (the coordinator reads each header once to
split the archive by the night rule and to see which calibrations each night
has), then one task runs the night's chain exactly as one machine does --
``reduce`` (masters from every calibration of the night, then the frames) and
``finalize`` (final masters, frames re-reduced with them, final coadds,
catalogues, the report) -- in a private scratch folder. Nights run in
parallel; a night without its own calibrations of some kind borrows the
nearest night's final masters (the calibration library) and is submitted only
once that night is published.

One writer. A task writes nothing the coordinator reads: it returns the
night's rows (frames, files, masters, coadds, events, meta of its scratch
store) and leaves its files in its scratch folder. The coordinating process
is the only writer of ``OUT/state.sqlite``: it moves the night's files into
``OUT`` (one atomic rename each; text files that name the scratch folder are
rewritten atomically) and then adds the rows in one transaction. A night is
added once: if its frames are already in the store, a second result (a task
rerun after its worker was lost, a second ``reprocess``) is dropped. A lost
worker's task is rerun by Dask in a new scratch folder; folders of lost tries
are removed at the end.

Why a night, not a frame, is the unit today: a frame's final product depends
on the night's quick-look pass, not only on the final masters (the final
master sky is built from the patterns of the first, provisional reductions;
field and zero-point references are claimed by each field's first frame;
re-reductions read the warm starts and quality peers the frames before them
left), so frames are not independent without changing their results
(docs/reprocess.md). ``reduce`` + ``finalize`` per
night is the one-machine result by construction (same code, one worker
thread per night, so the order of frames is the observation order).

A worker process must compute a night as fast as this process does: Dask's
nanny starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which switches off
glibc's adaptive mmap threshold, so every array above 128 KiB is a fresh
``mmap`` whose pages fault in again (measured: 9x the page faults, +46 % CPU
for a night, the "local:1 is 50 % slower than in-process" of the first
benchmark). Each task puts the allocator back (:func:`tune_worker_process`),
and ``local[:N]`` starts its workers without the variable and with
cores / N threads for the numeric libraries.

``--scheduler none`` (the default without dask installed) runs the same
tasks one after another in this process. ``local[:N]`` starts a
``LocalCluster`` of N worker processes (default: the cores), ``tcp://HOST:PORT``
joins a running scheduler (dask-jobqueue on Slurm or PBS: docs/reprocess.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from photowatch.core.config import Settings
from photowatch.core.logs import get_logger

log = get_logger("photowatch.run.reprocess")

#: the scratch folders of the night tasks, below OUT (same file system: renames are atomic)
SCRATCH = ".reprocess"
#: the Dask event topic the night tasks report progress on
TOPIC = "photowatch-reprocess"
#: what a reprocess sets whatever the configuration says (see :func:`reduce_night`); the
#: one-machine equivalent of a reprocess is ``reduce`` + ``finalize`` with these settings
ARCHIVE_CALIBRATION = {"final_tolerance": 0.0, "rereduce": "finalize"}
#: files whose text may name the scratch folder (rewritten when published)
TEXT_SUFFIXES = {".html", ".json", ".ecsv", ".reg", ".csv", ".txt", ".js", ".log"}


def have_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def default_scheduler() -> str:
    return "local" if have_dask() else "none"


# ---------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class NightPlan:
    night: str
    files: tuple[str, ...]
    #: nights whose final masters this night borrows (published before it is submitted)
    lenders: tuple[str, ...] = ()
    #: calibration keys the night lacks, for the log: "flat C0 2x2 SDSS-R"
    missing: tuple[str, ...] = ()


def parse_nights(text: str | None) -> tuple[str | None, str | None]:
    """``--nights FIRST..LAST`` (either side may be empty) → (first, last); ValueError."""
    if not text:
        return None, None
    first, sep, last = text.partition("..")
    if not sep:
        first = last = text
    for value in (first, last):
        if value:
            date.fromisoformat(value)  # ValueError for a bad date
    return first or None, last or None


def plan_archive(archive: Path, settings: Settings, *, instrument: str | None = None,
                 nights: tuple[str | None, str | None] = (None, None)) -> list[NightPlan]:
    """The archive's raw files split into nights by the night rule, in time order.

    A file whose header cannot be read goes with the night of its folder's
    other files (its task records it quarantined or held, as ``reduce`` does).
    """
    from photowatch.core.instruments import load_profile
    from photowatch.io.rawfiles import find_raw_files
    from photowatch.run.ingest import interpret_info

    files = find_raw_files(Path(archive), settings.daemon.patterns)
    label: dict[Path, str | None] = {}
    infos = {}
    for path in files:
        info, _, _, _ = interpret_info(path, settings, instrument)
        label[path] = info.night if info is not None else None
        if info is not None:
            infos[path] = info
    by_folder: dict[Path, Counter] = {}
    for path, night in label.items():
        if night:
            by_folder.setdefault(path.parent, Counter())[night] += 1
    groups: dict[str, list[str]] = {}
    for path, night in label.items():
        if night is None:
            near = by_folder.get(path.parent)
            night = near.most_common(1)[0][0] if near else None
        if night is None:
            log.warning("reprocess_unplaced", file=path.name, problem="no night (header "
                        "unreadable, and no other file in its folder has one)",
                        action="skipped")
            continue
        groups.setdefault(night, []).append(str(path.resolve()))
    first, last = nights
    selected = sorted(n for n in groups if (not first or n >= first) and (not last or n <= last))

    # the calibration library: what each night has, what its objects need
    have: dict[str, set] = {n: set() for n in groups}
    need: dict[str, set] = {n: set() for n in groups}
    for info in infos.values():
        night = info.night
        if info.kind in ("bias", "dark", "flat"):
            have[night].add(_cal_key(info.kind, info))
        elif info.kind == "object":
            try:
                profile = load_profile(info.instrument, settings.instrument.profile_dir or None)
            except Exception:
                profile = None
            for kind in ("bias", "dark", "flat"):
                if profile is None or profile.uses(kind):
                    need[night].add(_cal_key(kind, info))
    plans = []
    for night in selected:
        lenders, missing = set(), []
        for key in sorted(need[night] - have[night]):
            lender = _nearest(night, [n for n in groups if n != night and key in have[n]])
            missing.append(" ".join(k for k in key if k))
            if lender:
                lenders.add(lender)
        plans.append(NightPlan(night, tuple(sorted(groups[night])), tuple(sorted(lenders)),
                               tuple(missing)))
    return plans


def _cal_key(kind: str, info) -> tuple:
    return (kind, info.camera, info.binning, info.filter if kind == "flat" else "")


def _nearest(night: str, candidates: list[str]) -> str | None:
    """The night nearest in time (the earlier one on a tie)."""
    if not candidates:
        return None
    d = date.fromisoformat(night)
    return min(candidates, key=lambda n: (abs((date.fromisoformat(n) - d).days), n > night))


# ---------------------------------------------------------------------------- one night

@dataclass
class NightResult:
    night: str
    scratch: str
    rows: dict
    ok: bool
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""


def reduce_night(plan: NightPlan, settings: Settings, out: str, *, catalog: str | None = None,
                 instrument: str | None = None, library: list[dict] | None = None,
                 report=None) -> NightResult:
    """One night's task: ``reduce`` then ``finalize`` in a scratch folder; returns its rows.

    ``library``: master rows of other nights (paths in OUT) the night may select.
    ``report(night, attempt, frames_terminal, frames_total)`` is called as frames end.
    Writes only in its own scratch folder (a new one per try).
    """
    from photowatch.run.batch import reduce_directory
    from photowatch.run.finalize import finalize
    from photowatch.state.store import TERMINAL, Store

    t0 = time.perf_counter()
    attempt = uuid.uuid4().hex[:8]
    scratch = Path(out) / SCRATCH / f"{plan.night}.{attempt}"
    scratch.mkdir(parents=True)
    # every frame ends reduced with the night's final masters: an archive has no hurry,
    # so finalize keeps no frame for being close enough (calibration.final_tolerance),
    # and nobody looks at the night before finalize, so stale frames are re-reduced by
    # finalize only, not also when the engine is idle in between (rereduce "finalize":
    # the idle pass is work finalize redoes with the final masters anyway)
    local = settings.with_overrides(paths={"output_dir": str(scratch)}, daemon={"workers": 1},
                                    calibration=ARCHIVE_CALIBRATION)
    store = Store(scratch / "state.sqlite", command="reprocess-night")
    if library:
        store.seed_masters(library)
    stop = threading.Event()

    def poll():
        last = -1
        while not stop.wait(0.5):
            try:
                counts = store.counts()
            except Exception:
                continue
            done = sum(counts.get(s, 0) for s in TERMINAL)
            if done != last and report:
                report(plan.night, attempt, done, len(plan.files))
                last = done

    poller = threading.Thread(target=poll, daemon=True, name="reprocess-progress")
    poller.start()
    problems, lines = [], []
    try:
        summary = reduce_directory(scratch, local, catalog=catalog, instrument=instrument,
                                   workers=1, progress=False,
                                   files=[Path(f) for f in plan.files])
        problems += summary.problems
        ok = summary.ok
        if ok:
            fin = finalize(local, night=plan.night, catalog=catalog, workers=1)
            ok = fin.ok
            problems += fin.problems
            lines += fin.done
    finally:
        stop.set()
        poller.join()
    rows = store.export_rows()
    store.close()
    if report:
        counts = Counter(f["state"] for f in rows["frames"])
        report(plan.night, attempt, sum(counts.get(s, 0) for s in TERMINAL), len(plan.files))
    return NightResult(plan.night, str(scratch), rows, ok, problems, lines,
                       time.perf_counter() - t0, worker=os.uname().nodename + f":{os.getpid()}")


def _dask_report(night: str, attempt: str, done: int, total: int) -> None:
    """Progress from a Dask worker: an event on the scheduler (the coordinator subscribes)."""
    try:
        from distributed import get_worker

        get_worker().log_event(TOPIC, {"night": night, "attempt": attempt, "done": done,
                                       "total": total})
    except Exception:  # no worker (in-process) or scheduler gone: progress is best effort
        pass


#: glibc's mallopt parameters, and the values its adaptive mmap threshold settles at on
#: 64-bit (DEFAULT_MMAP_THRESHOLD_MAX; the trim threshold follows at twice it)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX = 32 << 20


def tune_worker_process() -> bool:
    """Give a Dask worker process the allocator behaviour of a plain Python process.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` (``distributed.nanny.pre-spawn-environ``)
    before it starts a worker. Setting any malloc threshold switches off glibc's
    adaptive mmap threshold, so every allocation above 128 KiB -- every image-sized
    numpy array -- is a new ``mmap`` released with ``munmap`` and faulted in page by
    page next time. A night in such a worker took 9x the page faults and 1.5x the
    CPU of the same night in-process. Here the thresholds are set to where the
    adaptive ones settle (arrays up to 32 MiB reuse the heap). True when changed;
    nothing happens off glibc or when the variable is not set.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_MAX))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to undo
        return False


def _worker_settings(settings: Settings) -> Settings:
    """The night's settings on a worker: resampling threads as the worker's numeric
    libraries have (``OMP_NUM_THREADS`` of its process), unless configured."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if settings.daemon.threads_per_worker or not omp.isdigit() or int(omp) < 1:
        return settings
    return settings.with_overrides(daemon={"threads_per_worker": int(omp)})


def dask_reduce_night(plan, settings, out, catalog, instrument, library):
    """:func:`reduce_night` on a Dask worker: logs as configured (stderr, the log file),
    progress as Dask events, the allocator of a plain process (:func:`tune_worker_process`)."""
    from photowatch.core.logs import setup_logging

    tune_worker_process()
    settings = _worker_settings(settings)
    setup_logging(settings.logging.level, settings.logging.format, settings.logging.file)
    return reduce_night(plan, settings, out, catalog=catalog, instrument=instrument,
                        library=library, report=_dask_report)


# ---------------------------------------------------------------------------- one writer

def publish(out: Path, store, result: NightResult) -> dict:
    """Move a night's files into OUT and add its rows to the store (the coordinator only).

    Files first (each an atomic rename; a text file naming the scratch folder is
    rewritten into a temporary and renamed), then the rows in one transaction: a
    crash in between leaves files the next reprocess replaces, never rows without
    files. A night already in the store is dropped whole (its scratch removed).
    """
    from photowatch.io.fits import atomic_write

    scratch = Path(result.scratch)
    sfrom, sto = str(scratch), str(Path(out).resolve())
    if any(store.has_frame_hash(f["sha256"]) for f in result.rows["frames"]):
        log.warning("reprocess_duplicate_result", night=result.night,
                    action="dropped: the night is already in the store")
        shutil.rmtree(scratch, ignore_errors=True)
        return {"frames": 0, "files": 0, "duplicate": True}
    moved = 0
    for src in sorted(scratch.rglob("*")):
        rel = src.relative_to(scratch)
        if src.is_dir() or rel.parts[0].startswith("state.sqlite"):
            continue
        dest = Path(out) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix.lower() in TEXT_SUFFIXES:
            text = src.read_bytes()
            if sfrom.encode() in text:
                data = text.replace(sfrom.encode(), sto.encode())
                atomic_write(dest, lambda fh, data=data: fh.write(data))
                src.unlink()
                moved += 1
                continue
        os.replace(src, dest)
        moved += 1
    counts = store.import_rows(result.rows, night=result.night,
                               rewrite=lambda v: v.replace(sfrom, sto) if sfrom in v else v)
    shutil.rmtree(scratch, ignore_errors=True)
    return {**counts, "files": moved, "duplicate": False}


# ---------------------------------------------------------------------------- the run

@dataclass
class ReprocessSummary:
    out: Path
    nights: list[str]
    counts: dict
    seconds: float
    publish_seconds: float
    frames: int
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    dashboard: str | None = None
    scheduler: str = "none"
    #: scratch folders of tries that never returned (a lost worker; Dask ran the night again)
    lost_tries: list[str] = field(default_factory=list)
    #: nights already in the output folder, not reprocessed
    skipped: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def coordinator_frames_per_s(self) -> float:
        """Frames the coordinator records per second of its own work (the single writer)."""
        return self.frames / self.publish_seconds if self.publish_seconds else float("inf")

    def text(self) -> str:
        order = ["reduced", "used", "rejected", "quarantined", "held", "ignored", "waiting",
                 "received", "processing"]
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        lines = [f"photowatch reprocess: {len(self.nights)} night(s), {self.frames} frames "
                 f"in {self.seconds:.1f} s ({self.frames_per_s:.2f} frames/s, scheduler "
                 f"{self.scheduler}): {', '.join(parts) or 'none'}",
                 f"coordinator: {self.publish_seconds:.2f} s recording results "
                 f"({self.coordinator_frames_per_s:.0f} frames/s)",
                 f"state:    {self.out / 'state.sqlite'}  (photowatch status --out {self.out})"]
        if self.skipped:
            lines.append(f"skipped (already in {self.out}): {', '.join(self.skipped)}")
        if self.lost_tries:
            lines.append(f"lost tries (run again by Dask, recorded once): "
                         f"{', '.join(self.lost_tries)}")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


class _Bar:
    """Frames terminal out of the archive's total; a rerun try replaces its night's count."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="reprocess", unit="frame",
                        disable=None if enabled else True)
        self.latest: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()

    def update(self, night: str, attempt: str, done: int, total: int | None = None) -> None:
        with self.lock:
            self.latest[night] = (attempt, done)
            self.bar.n = sum(d for _, d in self.latest.values())
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _client(scheduler: str):
    """(client, cluster or None) for ``local[:N]`` or ``tcp://HOST:PORT``."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local"):
        import dask

        n = int(scheduler.split(":", 1)[1]) if ":" in scheduler else (os.cpu_count() or 1)
        threads = str(max(1, (os.cpu_count() or 1) // n))
        env = {v: threads for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                    "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
        # the cores shared out between the workers, and no MALLOC_TRIM_THRESHOLD_ (see
        # tune_worker_process); the nanny copies pre-spawn variables into this process too
        saved = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_":
                              None}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", env=env)
        if saved is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = saved
        return Client(cluster), cluster
    return Client(scheduler), None


def reprocess(archive: str | Path, settings: Settings, *, catalog: str | None = None,
              instrument: str | None = None, nights: str | None = None,
              scheduler: str | None = None, client=None, progress: bool = True,
              on_progress=None) -> ReprocessSummary:
    """Reprocess the archive's nights into ``settings.paths.output_dir`` (see the module doc).

    ``client``: a ``distributed.Client`` to use (tests, notebooks); else one is made
    from ``scheduler``. ``on_progress(night, attempt, done, total)`` sees every report.
    """
    from photowatch.state.store import Store

    t0 = time.perf_counter()
    scheduler = scheduler or default_scheduler()
    out = Path(settings.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_archive(Path(archive), settings, instrument=instrument,
                         nights=parse_nights(nights))
    store = Store(out / "state.sqlite", command="reprocess")
    recorded = set(store.nights())
    skipped = [p.night for p in plans if p.night in recorded]
    plans = [p for p in plans if p.night not in recorded]
    for night in skipped:
        log.info("reprocess_night_skipped", night=night, reason="already in the output folder",
                 action="skipped (use another --out to reprocess it)")
    if catalog:
        store.set_meta("catalog_path", str(Path(catalog).resolve()))
    total = sum(len(p.files) for p in plans)
    bar = _Bar(total, progress)
    for p in plans:
        if p.missing:
            log.info("reprocess_borrows", night=p.night, missing=list(p.missing),
                     lenders=list(p.lenders) or None,
                     action="waits for the lenders' final masters" if p.lenders else
                     "no night has them: frames will be rejected for want of masters")
    summary = ReprocessSummary(out, [p.night for p in plans], {}, 0.0, 0.0, total,
                               scheduler=scheduler if client is None else "client",
                               skipped=skipped)
    publish_s = 0.0
    done: set[str] = set()
    pending = {p.night: p for p in plans}

    def library_for(plan: NightPlan) -> list[dict]:
        rows = []
        for lender in plan.lenders:
            rows += [dict(r) for r in store.latest_masters(lender) if r["final"]]
        return rows

    def ready() -> list[NightPlan]:
        return [p for p in pending.values()
                if all(n in done or n not in {q.night for q in plans} for n in p.lenders)]

    def record(result: NightResult) -> None:
        nonlocal publish_s
        t = time.perf_counter()
        counts = publish(out, store, result)
        publish_s += time.perf_counter() - t
        done.add(result.night)
        bar.update(result.night, "final", sum(1 for _ in result.rows["frames"]))
        if not result.ok:
            summary.ok = False
        summary.problems += [f"{result.night}: {p}" for p in result.problems]
        log.info("reprocess_night_done", night=result.night, seconds=round(result.seconds, 1),
                 worker=result.worker, frames=counts.get("frames"),
                 duplicate=counts.get("duplicate"))

    def report(night, attempt, n, tot):
        bar.update(night, attempt, n, tot)
        if on_progress:
            on_progress(night, attempt, n, tot)

    try:
        if scheduler == "none" and client is None:
            while pending:
                batch = ready() or list(pending.values())  # a cycle cannot happen; be safe
                plan = batch[0]
                pending.pop(plan.night)
                record(reduce_night(plan, settings, str(out), catalog=catalog,
                                    instrument=instrument, library=library_for(plan),
                                    report=report))
        else:
            _run_dask(client, scheduler, plans, pending, ready, record, report, library_for,
                      settings, out, catalog, instrument, summary)
    finally:
        bar.close()
        if (out / SCRATCH).is_dir():  # the folders of tries whose worker was lost
            summary.lost_tries = sorted(p.name for p in (out / SCRATCH).iterdir())
            for name in summary.lost_tries:
                log.warning("reprocess_lost_try", scratch=name, problem="its worker was lost",
                            action="removed; the night was run again and recorded once")
        shutil.rmtree(out / SCRATCH, ignore_errors=True)
    summary.counts = store.counts()
    summary.seconds = time.perf_counter() - t0
    summary.publish_seconds = publish_s
    not_terminal = sum(summary.counts.get(s, 0) for s in ("received", "processing", "waiting"))
    if not_terminal:
        summary.ok = False
        summary.problems.append(f"{not_terminal} frame(s) not terminal")
    return summary


def _run_dask(client, scheduler, plans, pending, ready, record, report, library_for,
              settings, out, catalog, instrument, summary) -> None:
    from distributed import as_completed

    own = None
    if client is None:
        client, own = _client(scheduler)
    summary.dashboard = client.dashboard_link
    print(f"photowatch reprocess: Dask dashboard {client.dashboard_link}", flush=True)

    def on_event(event):
        _, msg = event
        report(msg["night"], msg["attempt"], msg["done"], msg["total"])

    client.subscribe_topic(TOPIC, on_event)
    try:
        futures = {}
        queue = as_completed()

        def submit():
            # the biggest nights first (longest processing time first): with more
            # nights than workers, the last worker is not left alone with a long night
            for plan in sorted(ready(), key=lambda p: -len(p.files)):
                pending.pop(plan.night)
                fut = client.submit(dask_reduce_night, plan, settings, str(out), catalog,
                                    instrument, library_for(plan), pure=False,
                                    priority=len(plan.files),
                                    key=f"night-{plan.night}-{uuid.uuid4().hex[:6]}")
                futures[fut.key] = plan.night
                queue.add(fut)

        submit()
        for fut in queue:
            night = futures[fut.key]
            try:
                result = fut.result()
            except Exception as exc:  # the task failed, or its workers kept dying
                summary.ok = False
                summary.problems.append(f"{night}: {type(exc).__name__}: {exc}")
                log.error("reprocess_night_failed", night=night, problem=str(exc),
                          action="not recorded; run reprocess again for it")
            else:
                record(result)
            fut.release()
            if pending:
                submit()
                if not queue.count() and pending:  # lenders failed: run the rest anyway
                    for night in list(pending):
                        summary.problems.append(f"{night}: its lenders failed; run without "
                                                "their masters")
                    ready_all = list(pending.values())
                    for plan in ready_all:
                        pending.pop(plan.night)
                        fut2 = client.submit(dask_reduce_night, plan, settings, str(out),
                                             catalog, instrument, [], pure=False)
                        futures[fut2.key] = plan.night
                        queue.add(fut2)
    finally:
        client.unsubscribe_topic(TOPIC)
        if own is not None:
            client.close()
            own.close()
