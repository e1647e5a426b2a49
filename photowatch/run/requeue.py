"""Every frame has a way back: ``photowatch requeue`` and the automatic retake of held frames.

A frame that was quarantined, rejected or held goes back to ``received`` with
an event that says why. Its store row (and content hash) is kept, so the
duplicate rule cannot block it; a frame with no classification (quarantined or
held at ingest) is read again from its raw file, as new: complete-file check,
hash, header, profile. The next reduction replaces the products of the earlier
attempt atomically (``fitsio.atomic_write``; the old version leaves its coadd
first), and a running daemon takes ``received`` frames within a second.

Held frames (a header their profile could not interpret, a missing profile)
are tried again by themselves at every start of ``reduce``, ``watch`` and
``finalize`` and at every daemon rescan: after the configuration is fixed,
they are taken up without a command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from photowatch.core.config import Settings
from photowatch.core.instruments import _load_all
from photowatch.core.logs import get_logger
from photowatch.io.fits import fits_incomplete_reason, sha256_file
from photowatch.run.ingest import interpret
from photowatch.state.store import REQUEUABLE, Store

log = get_logger("photowatch.run.requeue")


@dataclass
class Requeued:
    """What :func:`requeue` did (or would do, with ``dry_run``)."""

    taken: list[tuple[str, str, str]] = field(default_factory=list)  #: (file, from, to)
    refused: list[tuple[str, str]] = field(default_factory=list)  #: (file, why)

    def text(self, dry_run: bool = False) -> str:
        verb = "would requeue" if dry_run else "requeued"
        lines = [f"photowatch requeue: {verb} {len(self.taken)} frame(s)"
                 + (f", {len(self.refused)} not" if self.refused else "")]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.taken]
        lines += [f"  {name}: not requeued: {why}" for name, why in self.refused]
        return "\n".join(lines)


def select_frames(store: Store, *, states: list[str] | None = None, night: str | None = None,
                  files: list[str] | None = None) -> list:
    """Frames in ``states`` (default: quarantined, rejected, held), of a night, by file."""
    states = states or ["quarantined", "rejected", "held"]
    rows = store.frames(state=list(states), **({"night": night} if night else {}))
    if files:
        wanted = {str(Path(f).resolve()) for f in files} | {Path(f).name for f in files}
        rows = [r for r in rows if r["path"] in wanted or r["raw_name"] in wanted
                or (r["name"] or "") in wanted]
    return rows


def _reread(store: Store, row, settings: Settings, instrument: str | None
            ) -> tuple[str, str | None]:
    """Read a frame's raw file again (check, hash, header, profile); its new (state, reason)."""
    path = Path(row["path"])
    if not path.exists():
        return row["state"], f"raw file {path} is gone"
    reason = fits_incomplete_reason(path)
    if reason:
        return "quarantined", reason
    sha, size = sha256_file(path)
    info, header, state, why = interpret(path, settings, instrument)
    clash = store.replace_identity(row["id"], sha256=sha, size=size,
                                   mtime=path.stat().st_mtime, info=info, header=header)
    if clash:
        return row["state"], clash
    return state, why


def requeue_frame(store: Store, row, settings: Settings, reason: str, *,
                  instrument: str | None = None, dry_run: bool = False,
                  from_states=REQUEUABLE) -> tuple[str, str | None]:
    """Put one frame back; returns (new state, why it is not received, or None).

    A classified frame (rejected, or quarantined/held by the engine) goes back to
    ``received``. One without a classification is read again first: it may come back
    ``held`` or ``quarantined`` if what was wrong still is.
    """
    needs_reread = row["info_json"] is None or row["state"] == "held"
    if dry_run:
        return "received", None
    state, why = "received", None
    if needs_reread:
        state, why = _reread(store, row, settings, instrument)
        if state == row["state"] and why is not None and state != "received":
            # still wrong the same way: say why, keep the state (the event records the try)
            store.event("requeue_refused", frame_id=row["id"], file=row["raw_name"],
                        level="warning", message=f"{reason}: still {state}: {why}",
                        action=f"left {state}")
            return state, why
    ok = store.requeue(row["id"], reason, to_state=state, from_states=from_states,
                       **({"reason": why} if why else {}))
    if not ok:
        return row["state"], f"its state changed meanwhile (now {store.frame(row['id'])['state']})"
    log.info("frame_requeued", file=row["raw_name"], problem=row["reason"], reason=reason,
             action=f"{row['state']} -> {state}" + (f" ({why})" if why else ""))
    return state, why


def requeue(store: Store, settings: Settings, *, reason: str, states: list[str] | None = None,
            night: str | None = None, files: list[str] | None = None,
            instrument: str | None = None, dry_run: bool = False) -> Requeued:
    """``photowatch requeue``: the selected frames back to ``received`` (see module doc)."""
    done = Requeued()
    rows = select_frames(store, states=states, night=night, files=files)
    if files:
        found = {r["raw_name"] for r in rows} | {r["path"] for r in rows}
        for f in files:
            if Path(f).name not in found and str(Path(f).resolve()) not in found:
                done.refused.append((Path(f).name, "no frame of that file in the selected "
                                                   "states"))
    for row in rows:
        state, why = requeue_frame(store, row, settings, reason, instrument=instrument,
                                   dry_run=dry_run)
        if state == row["state"] and why:
            done.refused.append((row["raw_name"], why))
        else:
            done.taken.append((row["raw_name"], row["state"], state))
    return done


def retake_held(store: Store, settings: Settings, instrument: str | None = None) -> int:
    """Held frames read again with the configuration as it is now; returns how many left
    ``held`` (taken up: received, or another final verdict)."""
    rows = store.frames(state="held")
    if not rows:
        return 0

    _load_all.cache_clear()  # a profile fixed on disk is read again
    n = 0
    for row in rows:
        info = json.loads(row["info_json"]) if row["info_json"] else None
        state, why = _reread(store, row, settings, instrument)
        if state == "held":
            if why and why != row["reason"]:
                store.update_frame(row["id"], reason=why)
            continue
        if store.requeue(row["id"], "the configuration now interprets its header"
                         if info is None else "held frame taken up again",
                         to_state=state, from_states=["held"],
                         **({"reason": why} if why else {})):
            n += 1
            log.info("held_frame_taken_up", file=row["raw_name"], problem=row["reason"],
                     action=f"held -> {state}")
    return n
