"""FITS at the edges: complete-file checks, raw reads, atomic product writes.

Raw files are only ever opened read-only. Products are written to a temporary
name in their final folder, flushed, fsynced and renamed into place, so a
reader (or a restart after kill -9) sees either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gzip
import hashlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from photowatch.errors import BadInput

BLOCK = 2880
_CARD_RE = re.compile(rb"^([A-Z0-9_-]{1,8})\s*=\s*([^/]*)")

#: environment hook for fault-injection tests: a glob of paths whose writes fail
#: with "No space left on device" (simulates a full disk without root or tmpfs)
FAULT_ENV = "PHOTOWATCH_FAULT_WRITE"
#: environment hook: a file whose lines are ``GLOB [ERRNO]`` (``ENOSPC`` default,
#: ``EROFS``, ``EACCES``...): while it exists, writes to matching paths fail so; delete
#: it and the fault is gone (a disk that fills, then has space again, in a live daemon)
FAULT_FILE_ENV = "PHOTOWATCH_FAULT_FILE"
#: in-process faults (tests): (glob, errno) pairs, see :func:`inject_fault`
_FAULTS: list[tuple[str, int]] = []


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, int]:
    """Content hash (hex) and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _open_stream(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _header_values(block_data: bytes) -> dict[str, str]:
    values = {}
    for i in range(0, len(block_data), 80):
        card = block_data[i : i + 80]
        m = _CARD_RE.match(card)
        if m:
            values[m.group(1).decode()] = m.group(2).strip().decode(errors="replace")
    return values


#: start of the reason :func:`not_fits_reason` gives (the watcher quarantines it at once)
NOT_FITS = "not FITS"
_SIMPLE = b"SIMPLE  =                    T"


def not_fits_reason(path: str | os.PathLike) -> str | None:
    """Why a file can never become FITS, or None (it is, or may still become, FITS).

    Decided from the bytes already there: a FITS file's first card is
    ``SIMPLE  =                    T``. A file shorter than that card whose
    bytes agree with it so far may still be growing (None); one whose first
    bytes differ never will be (a text file named ``.fits``, a JPEG, a
    ``SIMPLE = F`` file). ``.gz`` files are checked after decompression.
    """
    path = Path(path)
    try:
        with _open_stream(path) as fh:
            head = fh.read(80)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None  # a gzip stream still being written: the completeness check decides
    if not head:
        return None
    if not _SIMPLE.startswith(head[: len(_SIMPLE)]) and not head.startswith(b"SIMPLE  ="):
        shown = head[:20].decode("ascii", errors="replace").splitlines()[0] if \
            head[:20].strip() else repr(head[:20])
        return f"{NOT_FITS}: the first card is not SIMPLE = T (starts with {shown!r})"
    if len(head) >= 30 and head.startswith(b"SIMPLE  ="):
        value = head[9:80].split(b"/")[0].strip()
        if value and value != b"T":
            return (f"{NOT_FITS}: the first card is SIMPLE = {value.decode(errors='replace')}, "
                    "not T")
    return None


def fits_incomplete_reason(path: str | os.PathLike) -> str | None:
    """Why a file is not a complete FITS file, or None when it is.

    Checks the FITS structure without decoding data: the file starts with
    SIMPLE, every header ends with END, every HDU's data is present, and
    (uncompressed files) the size is a multiple of 2880 bytes. A gzip file is
    decompressed as a stream, which also checks its CRC.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if size == 0:
        return "empty file (0 bytes)"
    not_fits = not_fits_reason(path)
    if not_fits:
        return not_fits
    gz = path.name.endswith(".gz")
    if not gz and size % BLOCK:
        return f"size {size} is not a multiple of 2880 bytes (truncated?)"
    try:
        with _open_stream(path) as fh:
            first = True
            nhdu = 0
            while True:
                header = b""
                while True:
                    block = fh.read(BLOCK)
                    if not block:
                        if first:
                            return "empty file"
                        if header:
                            return f"HDU {nhdu}: header without END (truncated)"
                        return None if nhdu else "no HDU"
                    if len(block) < BLOCK:
                        return f"HDU {nhdu}: partial 2880-byte block (truncated)"
                    if first and not block.startswith(b"SIMPLE  ="):
                        return f"{NOT_FITS}: the first card is not SIMPLE = T"
                    first = False
                    header += block
                    if any(header[i : i + 80].startswith(b"END     ") or
                           header[i : i + 80].rstrip() == b"END"
                           for i in range(len(header) - BLOCK, len(header), 80)):
                        break
                    if len(header) > BLOCK * 10000:
                        return f"HDU {nhdu}: header without END"
                values = _header_values(header)
                try:
                    bitpix = abs(int(values.get("BITPIX", "8")))
                    naxis = int(values.get("NAXIS", "0"))
                    count = 1 if naxis else 0
                    for ax in range(1, naxis + 1):
                        count *= int(values.get(f"NAXIS{ax}", "0"))
                    gcount = int(values.get("GCOUNT", "1"))
                    pcount = int(values.get("PCOUNT", "0"))
                except ValueError:
                    return f"HDU {nhdu}: unreadable BITPIX/NAXIS"
                nbytes = bitpix // 8 * gcount * (pcount + count)
                padded = -(-nbytes // BLOCK) * BLOCK
                remaining = padded
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 22))
                    if not chunk:
                        return (f"HDU {nhdu}: data truncated ({padded - remaining} of "
                                f"{padded} bytes)")
                    remaining -= len(chunk)
                nhdu += 1
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return f"unreadable: {exc}"


def read_raw(path: str | os.PathLike) -> tuple[np.ndarray, object]:
    """Read a raw frame read-only: (2-D data as float32 ADU, merged header).

    The image is the first HDU with 2-D data (a tile-compressed .fz image
    included); the header is that HDU's header with the primary header's
    cards it lacks.

    Raises
    ------
    BadInput
        not FITS, truncated, or no 2-D image
    """
    from astropy.io import fits

    path = Path(path)
    reason = fits_incomplete_reason(path)
    if reason:
        raise BadInput(reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, mode="readonly", memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.is_image and hdu.header.get("NAXIS", 0) == 2 and hdu.data is not None:
                        data = np.asarray(hdu.data, dtype=np.float32)
                        header = hdu.header.copy()
                        if hdu is not hdul[0]:
                            for card in hdul[0].header.cards:
                                if card.keyword not in header and card.keyword not in (
                                    "SIMPLE", "EXTEND", "NEXTEND", "", "COMMENT", "HISTORY"
                                ):
                                    header.append(card)
                            header.remove("XTENSION", ignore_missing=True)
                            header.remove("PCOUNT", ignore_missing=True)
                            header.remove("GCOUNT", ignore_missing=True)
                            header.remove("EXTNAME", ignore_missing=True)
                        return data, header
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"unreadable FITS: {exc}") from None
    raise BadInput("no 2-D image data in any HDU")


def read_header(path: str | os.PathLike):
    """The header of the raw image (as :func:`read_raw`), without reading data."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=True) as hdul:
                primary = hdul[0].header
                if primary.get("NAXIS", 0) >= 2:
                    return primary.copy()
                for hdu in hdul[1:]:
                    if hdu.header.get("NAXIS", 0) == 2 or hdu.header.get("ZNAXIS", 0) == 2:
                        header = hdu.header.copy()
                        for card in primary.cards:
                            if card.keyword not in header and card.keyword not in (
                                "SIMPLE", "EXTEND", "NEXTEND", "", "COMMENT", "HISTORY"
                            ):
                                header.append(card)
                        return header
                return primary.copy()
    except Exception as exc:
        raise BadInput(f"unreadable FITS header: {exc}") from None


@contextlib.contextmanager
def inject_fault(pattern: str, err: int = errno.ENOSPC):
    """Within the block, atomic writes to paths matching ``pattern`` fail with ``err``.

    ``errno.ENOSPC`` simulates a full disk, ``errno.EROFS`` an output folder
    that turned read-only; the write fails before anything is renamed into place.
    """
    item = (pattern, err)
    _FAULTS.append(item)
    try:
        yield
    finally:
        _FAULTS.remove(item)


def _faults() -> list[tuple[str, int]]:
    faults = list(_FAULTS)
    pattern = os.environ.get(FAULT_ENV)
    if pattern:
        faults.append((pattern, errno.ENOSPC))
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if fault_file:
        try:
            text = Path(fault_file).read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            parts = line.split()
            if parts:
                code = getattr(errno, parts[1], errno.ENOSPC) if len(parts) > 1 else \
                    errno.ENOSPC
                faults.append((parts[0], code))
    return faults


def _fault_for(path: Path) -> None:
    for pattern, code in _faults():
        if fnmatch.fnmatch(str(path), pattern):
            raise OSError(code, f"{os.strerror(code)} (fault injection)", str(path))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 fsync: bool = True) -> Path:
    """Write a file atomically: ``write(fh)`` into a temporary file, then rename.

    The temporary file is in the same folder (same file system), so the rename
    is atomic; on any error it is removed and the previous file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _fault_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = _disk_full(exc, path.parent)
        if full is not None:
            raise full from exc
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _disk_full(exc: BaseException, folder: Path) -> OSError | None:
    """A write that failed because the disk is full, as ``OSError(ENOSPC)``; else None.

    Writers do not always say so: numpy's ``tofile`` raises ``OSError: N requested
    and M written`` without an errno, and astropy then masks it with an
    AttributeError from its own free-space check. A short write anywhere in the
    exception's chain, or a folder with (almost) no free space left, is a full disk.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return None  # it says what it is (ENOSPC, EROFS...)
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    short = any(isinstance(e, OSError) and _SHORT_WRITE.search(str(e)) for e in chain)
    try:
        free = os.statvfs(folder)
        nearly_full = free.f_bavail * free.f_frsize < (1 << 20)
    except OSError:
        nearly_full = False
    if short or (nearly_full and isinstance(exc, Exception)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + (f" ({chain[-1]})" if short
                                                                   else ""), str(folder))
    return None


def write_hdul(path: str | os.PathLike, hdul, fsync: bool = True) -> Path:
    """Write an astropy HDUList atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long cards, reserved keywords: nothing to act on
        return atomic_write(path, lambda fh: hdul.writeto(fh, output_verify="silentfix"),
                            fsync=fsync)


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def save_npz(path: str | os.PathLike, fsync: bool = True, **arrays) -> Path:
    """Write arrays atomically as an uncompressed .npz (accumulator state)."""
    return atomic_write(path, lambda fh: np.savez(fh, **arrays), fsync=fsync)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries left by a killed writer (``.name.XXXX.tmp``); returns the count."""
    count = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            count += 1
    return count
