"""Logging: structlog on top of the standard library.

On a terminal, readable console lines; otherwise (systemd's journal, a pipe)
one JSON object per line. Python warnings, astropy's included, are captured
into the same stream. Events about a frame carry its raw file name
(``log.bind(file=...)``).
"""

from __future__ import annotations

import logging
import sys
import warnings

import structlog

_configured = False


def setup_logging(level: str = "info", fmt: str = "auto", file: str = "",
                  stream=None) -> None:
    """Configure structlog and the standard library once per process."""
    global _configured
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                else structlog.processors.JSONRenderer(sort_keys=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(stream)]
    if file:
        handlers.append(logging.FileHandler(file))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    for noisy in ("watchdog", "matplotlib", "PIL", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    # Known-benign warnings are silenced here, once, for the whole process: the local
    # catch_warnings() blocks around FITS I/O are not thread-safe (one worker's exit can
    # restore filters while another is inside its block), so they alone let these leak.
    for message in (r".*did not parse as fits unit", r"Card is too long, comment will be truncated"):
        warnings.filterwarnings("ignore", message=message)
    _configured = True


def get_logger(name: str = "photowatch", **bind):
    """A bound structlog logger (usable before :func:`setup_logging`, e.g. in tests)."""
    return structlog.get_logger(name).bind(**bind) if bind else structlog.get_logger(name)
