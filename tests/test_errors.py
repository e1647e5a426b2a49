"""The error taxonomy: each error class says what the engine does with the frame."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from photowatch.core.errors import (
    OUTCOMES,
    BadInput,
    ConfigError,
    FrameIgnored,
    FrameRejected,
    HeaderNotInterpretable,
    Held,
    OutputError,
    StageDegraded,
    StageFailed,
    TransientError,
    WaitForMasters,
    is_transient,
    outcome,
)


@pytest.mark.parametrize(("exc", "expected"), [
    (WaitForMasters("no flat"), "waiting"),
    (BadInput("not FITS"), "quarantined"),
    (FrameIgnored("focus frame"), "ignored"),
    (FrameRejected("clouds"), "rejected"),
    (HeaderNotInterpretable("no frame type"), "held"),
    (Held("profile missing"), "held"),
    (ConfigError("profile x: bad key"), "held"),
    (StageFailed("astrometry: no stars"), "retry"),
    (TransientError("lock timeout"), "transient"),
    (OutputError("disk full"), "transient"),
    (OSError(errno.ENOSPC, "No space left on device"), "transient"),
    (OSError(errno.EROFS, "Read-only file system"), "transient"),
    (OSError(errno.EACCES, "Permission denied"), "transient"),
    (PermissionError(errno.EACCES, "Permission denied"), "transient"),
    (TimeoutError("lock"), "transient"),
    (sqlite3.OperationalError("database is locked"), "transient"),
    (sqlite3.OperationalError("database or disk is full"), "transient"),
    (FileNotFoundError(errno.ENOENT, "No such file"), "bug"),
    (sqlite3.OperationalError("no such column: x"), "bug"),
    (ValueError("a bug"), "bug"),
    (StageDegraded("no zero point"), "bug"),  # never raised out of the chain
])
def test_outcome_of_each_error(exc, expected):
    assert outcome(exc) == expected
    assert expected in OUTCOMES


def test_transient_is_about_the_surroundings_not_the_frame():
    assert is_transient(OSError(errno.ENOSPC, "full"))
    assert is_transient(OutputError("x")) and isinstance(OutputError("x"), StageFailed)
    assert not is_transient(StageFailed("deterministic"))
    assert not is_transient(BadInput("truncated"))
    assert not is_transient(OSError(errno.ENOENT, "gone"))
    # a subclass keeps its parent's outcome: held is a mistake a person can fix
    assert issubclass(HeaderNotInterpretable, Held)
    assert not issubclass(Held, BadInput)
