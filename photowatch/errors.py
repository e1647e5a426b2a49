"""The error classes of photowatch.

Stages raise; only the engine catches. Each class says what the engine does:

- :class:`BadInput`: the file cannot be used at all (not FITS, truncated, no
  type keyword): the frame is *quarantined* with the reason.
- :class:`FrameRejected`: the file is fine but fails a quality cut: the frame is
  *rejected* with the measured reason.
- :class:`FrameIgnored`: a frame photowatch does not reduce (focus, test):
  *ignored* with the reason.
- :class:`WaitForMasters`: an object frame without usable masters: *waiting*.
- :class:`StageFailed`: a stage could not produce its output (a transient
  fault such as a full disk): no product, the frame is retried.
- :class:`StageDegraded`: a stage carried on with a recorded flag (no WCS, no
  zero point); never raised out of the chain, recorded on the product.

Anything else reaching the engine is a bug: its traceback is recorded and the
daemon keeps running.
"""

from __future__ import annotations


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
