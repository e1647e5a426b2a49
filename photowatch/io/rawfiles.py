"""Which files in a raw folder are raw frames: the one rule for ``reduce``, ``watch``
and ``replay``.

A raw frame is a file below RAWDIR whose name matches one of the patterns of
``[daemon] patterns`` (case-insensitive), unless a component of its path below
RAWDIR is hidden (starts with ``.``), its name ends in a temporary suffix (a
writer has not put it in place yet), or it lies below ``exclude`` (the output
folder, when it is inside RAWDIR).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

#: names a writer uses before the file is in place: never taken, even if they match a pattern
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", ".swp", "~")


def is_raw_file(path: Path, rawdir: Path, patterns: list[str],
                exclude: Path | None = None) -> bool:
    """True for a raw file name below ``rawdir`` (``path`` and ``rawdir`` on the same
    footing: both resolved, or both as found; ``exclude`` resolved)."""
    try:
        rel = path.relative_to(rawdir)
    except ValueError:
        return False
    if not rel.parts or any(part.startswith(".") for part in rel.parts):
        return False
    name = path.name.lower()
    if name.endswith(TEMPORARY_SUFFIXES):
        return False
    if exclude is not None:
        real = path.resolve()
        if real == exclude or exclude in real.parents:
            return False
    return any(fnmatch.fnmatch(name, pattern.lower()) for pattern in patterns)


def find_raw_files(rawdir: Path, patterns: list[str], exclude: Path | None = None) -> list[Path]:
    """The raw files below ``rawdir`` (:func:`is_raw_file`), sorted, as found below it."""
    rawdir = Path(rawdir)
    exclude = exclude.resolve() if exclude else None
    return [path for path in sorted(rawdir.rglob("*"))
            if path.is_file() and is_raw_file(path, rawdir, patterns, exclude)]
