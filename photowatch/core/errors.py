"""The error classes of photowatch.

Stages raise; only the engine catches. Each class says what the engine does:

- :class:`BadInput`: the file cannot be used at all (not FITS, truncated, no
  type keyword): the frame is *quarantined* with the reason.
- :class:`FrameRejected`: the file is fine but fails a quality cut: the frame is
  *rejected* with the measured reason.
- :class:`FrameIgnored`: a frame photowatch does not reduce (focus, test):
  *ignored* with the reason.
- :class:`WaitForMasters`: an object frame without usable masters: *waiting*.
- :class:`Held`: a mistake a person can fix (a header its profile cannot
  interpret, :class:`HeaderNotInterpretable`; a profile that is missing):
  *held*, a non-terminal state; a later run with a fixed configuration takes
  the frame up by itself.
- :class:`StageFailed`: a stage could not produce its output, and trying again
  will fail the same way (*deterministic*): the frame is retried until it has
  failed the same way ``daemon.max_tries`` times, then *rejected* with the
  reason and the number of tries.
- :class:`TransientError` (and :class:`OutputError`, a full disk or an output
  folder that turned read-only; an ``OSError`` with such an errno; a SQLite lock
  timeout): the world, not the frame, is at fault. No product, the frame stays
  ``received``, the engine pauses and retries with a growing backoff; the try
  does not count against ``max_tries``.
- :class:`StageDegraded`: a stage carried on with a recorded flag (no WCS, no
  zero point); never raised out of the chain, recorded on the product.

Anything else reaching the engine is a bug: its traceback is recorded and the
daemon keeps running.
"""

from __future__ import annotations

import errno
import sqlite3


class PhotowatchError(Exception):
    """Base class of every error photowatch raises on purpose."""


class ConfigError(PhotowatchError):
    """A configuration file or profile is invalid; the message names the file and key."""


class BadInput(PhotowatchError):
    """The raw file cannot be used (the frame is quarantined)."""


class FrameRejected(PhotowatchError):
    """The frame fails a quality cut (the frame is rejected)."""


class FrameIgnored(PhotowatchError):
    """The frame is of a type photowatch does not reduce."""


class WaitForMasters(PhotowatchError):
    """An object frame has no usable master yet (the frame waits)."""


class StageFailed(PhotowatchError):
    """A stage could not produce its output; the frame is retried later."""


class StageDegraded(PhotowatchError):
    """A stage carried on without its full result (recorded, not fatal)."""


class Held(PhotowatchError):
    """A mistake a person can fix (configuration, profile): the frame is held, not lost."""


class HeaderNotInterpretable(Held):
    """The frame's profile cannot interpret its header (no type, no time, a bad section)."""


class TransientError(StageFailed):
    """A fault of the surroundings (disk full, lock timeout): retried with backoff, uncounted."""


class OutputError(TransientError):
    """Products cannot be written (disk full, not writable): processing pauses."""


#: errno values of an ``OSError`` that says the surroundings, not the frame, are at fault
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                              errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY,
                              errno.ETIMEDOUT, errno.ENFILE, errno.EMFILE, errno.ENOMEM,
                              errno.ESTALE})

#: outcome of each error, as :func:`outcome` returns it
OUTCOMES = ("waiting", "quarantined", "ignored", "rejected", "held", "transient", "retry", "bug")


def is_transient(exc: BaseException) -> bool:
    """True for a fault of the surroundings that may go away by itself (retry with backoff).

    A full disk, a read-only or unwritable output folder, a stale NFS handle, a
    lock timeout (SQLite "database is locked"/"busy", :class:`TimeoutError`)
    and :class:`TransientError` are transient; everything else is not.
    """
    if isinstance(exc, TransientError | TimeoutError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(w in text for w in ("locked", "busy", "disk is full", "disk i/o"))
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    return False


def outcome(exc: BaseException) -> str:
    """What the engine does with a frame whose processing raised ``exc`` (one of OUTCOMES).

    ``waiting``, ``quarantined``, ``ignored``, ``rejected``, ``held``: the frame's state;
    ``transient``: left ``received``, engine paused with backoff, the try not counted;
    ``retry``: left ``received`` until it failed ``max_tries`` times the same way, then
    ``rejected``; ``bug``: anything else (traceback recorded, retried, then quarantined).
    """
    if isinstance(exc, WaitForMasters):
        return "waiting"
    if isinstance(exc, BadInput):
        return "quarantined"
    if isinstance(exc, FrameIgnored):
        return "ignored"
    if isinstance(exc, FrameRejected):
        return "rejected"
    if isinstance(exc, Held | ConfigError):
        return "held"
    if is_transient(exc):
        return "transient"
    if isinstance(exc, StageFailed):
        return "retry"
    return "bug"
