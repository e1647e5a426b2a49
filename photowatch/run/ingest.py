"""Ingest: a complete raw file → a frame row in the store (hash, header summary, classification).

Used by the watcher and by ``reduce``. A file is identified by its content
hash: the same bytes under a second name are recorded as a duplicate, not
reduced again. Bad input never raises: it becomes a ``quarantined`` or
``ignored`` frame with the reason, and one log line that names the file; a
header its profile cannot interpret makes a ``held`` frame (a person can fix
the profile; :mod:`photowatch.run.requeue` takes held frames up again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from photowatch.core.classify import FrameInfo, classify, weighs_level
from photowatch.core.config import Settings
from photowatch.core.errors import (
    BadInput,
    ConfigError,
    FrameIgnored,
    FrameRejected,
    HeaderNotInterpretable,
)
from photowatch.core.instruments import Profile, detect_profile, load_profile
from photowatch.core.logs import get_logger
from photowatch.io.fits import fits_incomplete_reason, raw_level, read_header, sha256_file
from photowatch.state.masters import GAIN_WAIT
from photowatch.state.store import Store, startswith

log = get_logger("photowatch.run.ingest")

#: header keywords kept in the store's summary of a frame
SUMMARY_KEYS = ("INSTRUME", "TELESCOP", "OBSTYPE", "IMAGETYP", "OBJTYPE", "FILTER", "FILTER1",
                "FILTER2", "EXPTIME", "DATE-OBS", "OBJECT", "OBJNAME", "RA", "DEC", "CCDSUM",
                "BINNING", "AIRMASS", "SOFTGAIN", "RDOUTM", "STRRQAP")


@dataclass(frozen=True)
class Ingested:
    frame_id: int
    new: bool
    state: str
    reason: str | None


def choose_profile(header, settings: Settings, instrument: str | None = None) -> Profile:
    """The profile for a header: the one named (config or ``--instrument``), else detected.

    Raises FrameIgnored when a named profile does not match the header's
    instrument; with ``auto``, an unmatched instrument falls back to ``generic``.
    """
    name = instrument or settings.instrument.name
    profile_dir = settings.instrument.profile_dir or None
    if name and name != "auto":
        profile = load_profile(name, profile_dir)
        value = header.get(profile.detect_keyword)
        if (profile.detect_values and value is not None and str(value).strip().lower()
                not in {v.lower() for v in profile.detect_values}):
            raise FrameIgnored(f"{profile.detect_keyword}={value!r} is not instrument "
                               f"{profile.name}")
        return profile
    profile = detect_profile(header, profile_dir)
    return profile or load_profile("generic", profile_dir)


def header_summary(header) -> dict:
    out = {}
    for key in SUMMARY_KEYS:
        if key in header:
            value = header[key]
            out[key] = value if isinstance(value, int | float | bool) else str(value)
    return out


def ingest_file(store: Store, path: str | os.PathLike, settings: Settings, *,
                instrument: str | None = None, arrived_at: str | None = None,
                check_complete: bool = True) -> Ingested:
    """Record one raw file in the store (never raises for bad input)."""
    path = Path(path).resolve()
    spath = str(path)
    try:
        st = path.stat()
    except OSError as exc:
        log.error("unreadable_file", file=path.name, error=exc.strerror, action="skipped")
        raise
    reason = fits_incomplete_reason(path) if check_complete else None
    try:
        sha, size = sha256_file(path)
    except OSError as exc:
        reason = f"cannot read: {exc.strerror}"
        sha, size = f"unreadable:{spath}:{st.st_mtime}", st.st_size
    if reason:
        # the partial content's hash plus the path: two empty files are two frames
        return _record(store, spath, f"bad:{sha}:{spath}", size, st.st_mtime, arrived_at,
                       None, None, "quarantined", reason)
    row = store.frame_by_hash(sha)
    if row is not None:  # a duplicate: record the path, do not read again
        frame_id, _ = store.add_frame(path=spath, sha256=sha, size=size, mtime=st.st_mtime)
        return Ingested(frame_id, False, row["state"], row["reason"])
    info, header, state, reason = interpret_info(path, settings, instrument)
    result = _record(store, spath, sha, size, st.st_mtime, arrived_at,
                     info.summary() if info else None, header, state, reason)
    if info is not None and info.assumptions:
        report_assumptions(store, info, result.frame_id)
    if (info is not None and info.kind in ("bias", "flat") and result.new
            and "measure" in (info.gain_source, info.read_noise_source)):
        # frames waiting for the night's gain measurement may have what they need now

        store.wake_waiting(night=info.night, camera=info.camera, reason=startswith(GAIN_WAIT))
    return result


def interpret_info(path: Path, settings: Settings, instrument: str | None = None
                   ) -> tuple[FrameInfo | None, dict | None, str, str | None]:
    """Header → (FrameInfo, header summary, state, reason); never raises for bad input.

    A header that cannot be read is ``quarantined``; one its profile cannot
    interpret (no type, no time, a bad section; an unknown instrument with the
    generic profile), or a profile that cannot be loaded, is ``held``: a
    person can fix the configuration, and a later run takes it up.
    """
    info = header = None
    state, reason = "received", None
    try:
        hdr = read_header(path)
    except BadInput as exc:
        return None, None, "quarantined", str(exc)
    header = header_summary(hdr)
    try:
        profile = choose_profile(hdr, settings, instrument)
        try:
            when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            info = classify(hdr, path.name, profile, settings.site.longitude_deg,
                            settings.site.night_start_hour, file_time=when)
            if weighs_level(info):  # a type from a name: weighed against the pixel level
                info = classify(hdr, path.name, profile, settings.site.longitude_deg,
                                settings.site.night_start_hour, file_time=when,
                                level_adu=raw_level(path))
        except BadInput as exc:
            if profile.name == "generic" and hdr.get("INSTRUME") is not None:
                raise HeaderNotInterpretable(
                    f"unknown instrument INSTRUME={hdr.get('INSTRUME')!r} (no profile matches; "
                    f"generic profile: {exc})") from None
            raise HeaderNotInterpretable(f"profile {profile.name} cannot interpret the "
                                         f"header: {exc}") from None
    except HeaderNotInterpretable as exc:
        state, reason = "held", str(exc)
    except BadInput as exc:
        state, reason = "quarantined", str(exc)
    except FrameIgnored as exc:
        state, reason = "ignored", str(exc)
    except FrameRejected as exc:
        state, reason = "rejected", str(exc)
    except ConfigError as exc:
        state, reason = "held", f"configuration: {exc}"
    return info, header, state, reason


def interpret(path: Path, settings: Settings, instrument: str | None = None
              ) -> tuple[dict | None, dict | None, str, str | None]:
    """Header → (info summary, header summary, state, reason); see :func:`interpret_info`."""
    info, header, state, reason = interpret_info(path, settings, instrument)
    return (info.summary() if info else None), header, state, reason


def report_assumptions(store: Store, info, frame_id: int | None = None) -> int:
    """One warning per keyword and night for what the profile assumed (store event + log).

    The first frame of a night that needs an assumption about a keyword says so,
    naming the keyword, its value and the assumption; later frames with the
    same keyword that night are silent (their FrameInfo still lists it).
    Returns the number of new warnings.
    """
    n = 0
    for keyword, value, assumption in info.assumptions:
        key = f"assumption|{info.instrument}|{info.night}|{keyword}"
        if store.get_meta(key) is not None:
            continue
        store.set_meta(key, {"value": value, "assumption": assumption, "file": info.raw_name})
        message = f"{keyword}={value!r}: {assumption}" if value else f"{keyword}: {assumption}"
        store.event("header_assumption", frame_id=frame_id, file=info.raw_name,
                    level="warning", message=message,
                    action=f"assumed for night {info.night}")
        log.warning("header_assumption", file=info.raw_name, night=info.night,
                    keyword=keyword, value=value, assumption=assumption,
                    action="assumed for every frame of the night that needs it")
        n += 1
    return n


def _record(store, spath, sha, size, mtime, arrived_at, info, header, state, reason):
    frame_id, new = store.add_frame(path=spath, sha256=sha, size=size, mtime=mtime,
                                    arrived_at=arrived_at, info=info, header=header,
                                    state=state, reason=reason)
    name = Path(spath).name
    if state == "received":
        log.info("frame_received", file=name, kind=(info or {}).get("kind"),
                 filter=(info or {}).get("filter"), name=(info or {}).get("std_name"))
    else:
        action = {"quarantined": "quarantined", "ignored": "ignored, not reduced",
                  "rejected": "rejected, not reduced",
                  "held": "held until the configuration is fixed (taken up by itself then)",
                  }[state]
        log.warning("bad_input", file=name, problem=reason, action=action)
    return Ingested(frame_id, new, state, reason)
