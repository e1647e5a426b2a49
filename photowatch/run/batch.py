"""``photowatch reduce``: a night's directory through the daemon's engine, in batch.

Every raw file is ingested (hash, classification), then the engine's workers
run until every frame is terminal: calibration frames first (masters are
built incrementally, as at the telescope), then object frames in
observation-time order. Frames still waiting for masters at the end are
rejected with the reason; a later run with the missing calibrations takes
them up again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from photowatch.core.config import Settings
from photowatch.core.logs import get_logger
from photowatch.io.rawfiles import find_raw_files
from photowatch.run.engine import Engine, OutputError
from photowatch.run.ingest import ingest_file
from photowatch.state.store import startswith

log = get_logger("photowatch.run.batch")

#: prefix of the reason given to frames that waited for masters until the run ended
NO_MASTER = "no usable master by the end of the run: "


@dataclass
class Summary:
    out: Path
    counts: dict
    ok: bool = True
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        order = ["reduced", "used", "rejected", "quarantined", "held", "ignored", "waiting",
                 "received", "processing"]
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        lines = [f"photowatch: {sum(self.counts.values())} frames: {', '.join(parts) or 'none'}",
                 f"products: {self.out / 'reduced'}", f"coadds:   {self.out / 'coadds'}",
                 f"state:    {self.out / 'state.sqlite'}  (photowatch status --out {self.out})"]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def close_waiting(engine: Engine, why: str = NO_MASTER) -> int:
    """Make frames still waiting for masters terminal (rejected, with the reason)."""
    n = 0
    for row in engine.store.frames(state="waiting"):
        reason = why + (row["reason"] or "masters missing")
        if engine.store.transition(row["id"], ["waiting"], "rejected", reason=reason,
                                   message=reason, level="warning", action="rejected"):
            log.warning("frame_rejected", file=row["raw_name"], problem=reason,
                        action="rejected; a later run with its calibrations will retry it")
            n += 1
    return n


def reopen_unmastered(engine: Engine) -> int:
    """Frames rejected by an earlier run for want of masters are queued again."""
    n = 0
    for row in engine.store.frames(state="rejected", reason=startswith(NO_MASTER)):
        if engine.store.transition(row["id"], ["rejected"], "received", reason=None,
                                   message="retried: masters may exist now"):
            n += 1
    return n


def reduce_directory(rawdir: Path, settings: Settings, *, catalog: str | None = None,
                     instrument: str | None = None, workers: int | None = None,
                     progress: bool = True) -> Summary:
    engine = Engine(settings, catalog_path=catalog, instrument=instrument, command="reduce",
                    workers=workers)
    engine.startup()
    try:
        reopen_unmastered(engine)
        files = find_raw_files(Path(rawdir), settings.daemon.patterns, exclude=engine.out)
        log.info("reduce_start", rawdir=str(rawdir), files=len(files), out=str(engine.out),
                 workers=engine.workers)
        from tqdm import tqdm

        for path in tqdm(files, desc="ingest", unit="file", disable=not progress or None,
                         leave=False):
            if engine.store.known_path(str(path.resolve()), path.stat().st_size,
                                       path.stat().st_mtime):
                continue
            ingest_file(engine.store, path, settings, instrument=instrument)
        problems = []
        stop = threading.Event()
        try:
            engine.run(stop, until_idle=True)
        except OutputError as exc:
            problems.append(f"{exc}; frames not reduced stay 'received' (run again when fixed)")
        if not problems:
            close_waiting(engine)
            try:
                engine.update_report(force=True)
            except Exception as exc:  # the report must never fail the reduction
                log.warning("report_failed", problem=str(exc), action="skipped")
        summary = Summary(engine.out, engine.store.counts(), ok=not problems, problems=problems)
        log.info("reduce_done", **summary.counts)
        return summary
    finally:
        engine.shutdown()
