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
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from photowatch.core.classify import _lenient_section
from photowatch.core.errors import BadInput

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


def _is_gzip(path: Path) -> bool:
    """gzip by its magic bytes (gzip files named .fits exist), not by the name."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return path.name.endswith(".gz")


def _open_stream(path: Path):
    if _is_gzip(path):
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


def fits_incomplete_reason(path: str | os.PathLike,
                           content: bytes | None = None) -> str | None:
    """Why a file is not a complete FITS file, or None when it is.

    Checks the FITS structure without decoding data: the file starts with
    SIMPLE, every header ends with END, every HDU's data is present, and
    (uncompressed files) the size is a multiple of 2880 bytes. A gzip file is
    decompressed as a stream, which also checks its CRC; ``content``, when
    given, is the file's whole decompressed content, read already.
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
    gz = _is_gzip(path)
    if not gz and size % BLOCK:
        return f"size {size} is not a multiple of 2880 bytes (truncated?)"
    try:
        with (io.BytesIO(content) if content is not None else _open_stream(path)) as fh:
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


_SKIP_CARDS = ("SIMPLE", "EXTEND", "NEXTEND", "", "COMMENT", "HISTORY")
#: per-amplifier keywords that do not describe an assembled frame
_AMP_CARDS = ("DATASEC", "BIASSEC", "TRIMSEC", "DETSEC", "CCDSEC", "XTENSION", "PCOUNT",
              "GCOUNT", "EXTNAME", "EXTVER", "INHERIT", "BZERO", "BSCALE")


def _is_2d(header) -> bool:
    """An image whose axes beyond the first two are of length 1 ((1, ny, nx) included)."""
    naxis = int(header.get("ZNAXIS", header.get("NAXIS", 0)) or 0)
    if naxis < 2:
        return False
    pre = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
    return all(int(header.get(f"{pre}{i}", 1)) == 1 for i in range(3, naxis + 1)) and all(
        int(header.get(f"{pre}{i}", 0)) > 1 for i in (1, 2))


def _merged(header, primary):
    header = header.copy()
    for card in primary.cards:
        if card.keyword not in header and card.keyword not in _SKIP_CARDS:
            header.append(card)
    for key in ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME"):
        header.remove(key, ignore_missing=True)
    return header


def _section_of(text, what: str):
    m = None
    with contextlib.suppress(ValueError):
        m = _lenient_section(text)
    if m is None:
        raise BadInput(f"amplifier {what} {text!r} is not a usable section")
    return m


def _reversed(text) -> tuple[bool, bool]:
    """Whether a section's x / y ranges run backwards (a flipped amplifier)."""
    nums = [int(n) for n in re.findall(r"\d+", str(text))]
    return (len(nums) == 4 and nums[0] > nums[1]), (len(nums) == 4 and nums[2] > nums[3])


def _amp_number(header, primary, keys) -> float | None:
    for key in keys:
        for hdr in (header, primary):
            value = hdr.get(key)
            try:
                out = float(value)
            except (TypeError, ValueError):
                continue
            if np.isfinite(out) and out > 0:
                return out
    return None


def _amp_layout(headers, primary) -> dict:
    """Where each amplifier goes in the assembled frame (binned pixels), from DETSEC/DATASEC."""
    amps = []
    for hdr in headers:
        shape = (int(hdr.get("ZNAXIS2", hdr.get("NAXIS2"))), int(hdr.get("ZNAXIS1",
                                                                        hdr.get("NAXIS1"))))
        dsec = _section_of(hdr.get("DATASEC") or f"[1:{shape[1]},1:{shape[0]}]", "DATASEC")
        det = _section_of(hdr.get("DETSEC"), "DETSEC")
        bsec = None
        if hdr.get("BIASSEC"):
            try:
                bsec = _section_of(hdr.get("BIASSEC"), "BIASSEC")
            except BadInput:
                bsec = None
        flipx, flipy = _reversed(hdr.get("DETSEC"))
        dflipx, dflipy = _reversed(hdr.get("DATASEC") or "")
        gain = _amp_number(hdr, primary, ("GAIN", "EGAIN"))
        if gain is not None and not 0.05 <= gain <= 30:
            gain = None
        amps.append({"dsec": dsec, "det": det, "bsec": bsec, "flipx": flipx != dflipx,
                     "flipy": flipy != dflipy, "gain": gain,
                     "rn": _amp_number(hdr, primary, ("RDNOISE", "READNOIS")),
                     "sat": _amp_number(hdr, primary, ("SATURATE",))})
    bx = max(1, round((amps[0]["det"][3] - amps[0]["det"][2]) /
                      (amps[0]["dsec"][3] - amps[0]["dsec"][2])))
    by = max(1, round((amps[0]["det"][1] - amps[0]["det"][0]) /
                      (amps[0]["dsec"][1] - amps[0]["dsec"][0])))
    y0 = min(a["det"][0] for a in amps)
    x0 = min(a["det"][2] for a in amps)
    for a in amps:
        d = a["det"]
        a["out"] = ((d[0] - y0) // by, (d[0] - y0) // by + a["dsec"][1] - a["dsec"][0],
                    (d[2] - x0) // bx, (d[2] - x0) // bx + a["dsec"][3] - a["dsec"][2])
    ny = max(a["out"][1] for a in amps)
    nx = max(a["out"][3] for a in amps)
    return {"amps": amps, "shape": (ny, nx), "binning": (bx, by)}


def _assembled_header(headers, primary, layout):
    """The header of an assembled multi-amplifier frame (in electrons when every gain is known)."""
    header = _merged(headers[0], primary)
    for key in _AMP_CARDS:
        header.remove(key, ignore_missing=True)
    ny, nx = layout["shape"]
    header["NAXIS"] = 2
    header["NAXIS1"] = nx
    header["NAXIS2"] = ny
    for key in ("ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZNAXIS3", "NAXIS3"):
        header.remove(key, ignore_missing=True)
    amps = layout["amps"]
    header["PWNAMPS"] = (len(amps), "amplifiers assembled by DETSEC/DATASEC")
    if all(a["gain"] for a in amps):
        header["GAIN"] = (1.0, "[e-/adu] amplifiers' gains applied at assembly")
        header.remove("EGAIN", ignore_missing=True)
        if all(a["rn"] for a in amps):
            header["RDNOISE"] = (float(np.mean([a["rn"] for a in amps])),
                                 "[e-] mean of the amplifiers")
        if all(a["sat"] for a in amps):
            header["SATURATE"] = (float(min(a["sat"] * a["gain"] for a in amps)),
                                  "[e-] lowest amplifier saturation")
    else:
        header.remove("GAIN", ignore_missing=True)
    bx, by = layout["binning"]
    if "CCDSUM" not in header:
        header["CCDSUM"] = f"{bx} {by}"
    return header


def assemble_amplifiers(datas, layout) -> np.ndarray:
    """One frame from per-amplifier arrays: overscan (per-row median) and gain per amplifier,
    then each data section placed at its DETSEC (flipped where DETSEC runs backwards)."""
    out = np.full(layout["shape"], np.nan, np.float32)
    for data, a in zip(datas, layout["amps"]):
        data = np.asarray(data, np.float32)
        y0, y1, x0, x1 = a["dsec"]
        part = data[y0:y1, x0:x1]
        if a["bsec"] is not None:
            b = a["bsec"]
            strip = data[y0:y1, b[2]:b[3]]
            if strip.size:
                part = part - np.median(strip, axis=1)[:, None]
        if a["gain"]:
            part = part * np.float32(a["gain"])
        if a["flipx"]:
            part = part[:, ::-1]
        if a["flipy"]:
            part = part[::-1, :]
        o = a["out"]
        out[o[0]:o[1], o[2]:o[3]] = part
    return out


#: per-amplifier keywords of a single-HDU multi-amplifier frame: (data, overscan) prefixes
_INLINE_AMP_KEYS = (("DATASEC", "BIASSEC"), ("DSEC", "BSEC"))


def _inline_amps(header) -> list[dict] | None:
    """The amplifiers of a single image read out by several amplifiers (DECam DATASECA/B,
    BIASSECA/B, GAINA/B; MegaPrime DSECA/B, BSECA/B), when each has a data section, an
    overscan section and a usable gain; else None."""
    ny, nx = int(header.get("NAXIS2", 0) or 0), int(header.get("NAXIS1", 0) or 0)
    for dkey, bkey in _INLINE_AMP_KEYS:
        amps = []
        for s in "ABCDEFGH":
            if header.get(dkey + s) is None:
                continue
            try:
                dsec = _lenient_section(header.get(dkey + s))
                bsec = _lenient_section(header.get(bkey + s))
            except ValueError:
                return None
            gain = _amp_number(header, header, ("GAIN" + s,))
            if dsec is None or bsec is None or gain is None or not 0.05 <= gain <= 30:
                return None
            if max(dsec[1], bsec[1]) > ny or max(dsec[3], bsec[3]) > nx:
                return None
            amps.append({"dsec": dsec, "bsec": bsec, "gain": gain,
                         "rn": _amp_number(header, header, ("RDNOISE" + s,)),
                         "sat": _amp_number(header, header, ("SATURAT" + s, "SATURATE"))})
        if len(amps) >= 2:
            return amps
    return None


def _inline_box(amps) -> tuple[int, int, int, int]:
    return (min(a["dsec"][0] for a in amps), max(a["dsec"][1] for a in amps),
            min(a["dsec"][2] for a in amps), max(a["dsec"][3] for a in amps))


def _inline_header(header, amps):
    """The header of a multi-amplifier image once each amplifier is in electrons."""
    header = header.copy()
    y0, y1, x0, x1 = _inline_box(amps)
    header["NAXIS1"], header["NAXIS2"] = x1 - x0, y1 - y0
    for key in ("DATASEC", "BIASSEC", "TRIMSEC", "EGAIN"):
        header.remove(key, ignore_missing=True)
    header["GAIN"] = (1.0, "[e-/adu] amplifiers' overscan and gains applied")
    if all(a["rn"] for a in amps):
        header["RDNOISE"] = (float(np.mean([a["rn"] for a in amps])), "[e-] amplifiers' mean")
    if all(a["sat"] for a in amps):
        header["SATURATE"] = (float(min(a["sat"] * a["gain"] for a in amps)),
                              "[e-] lowest amplifier saturation")
    header["PWNAMPS"] = (len(amps), "amplifiers: overscan and gain applied per amplifier")
    return header


def _inline_assemble(data: np.ndarray, amps) -> np.ndarray:
    y0, y1, x0, x1 = _inline_box(amps)
    out = np.full((y1 - y0, x1 - x0), np.nan, np.float32)
    for a in amps:
        d, b = a["dsec"], a["bsec"]
        part = data[d[0]:d[1], d[2]:d[3]].astype(np.float32)
        strip = data[d[0]:d[1], b[2]:b[3]]
        if strip.size:
            part = part - np.median(strip, axis=1)[:, None].astype(np.float32)
        out[d[0] - y0:d[1] - y0, d[2] - x0:d[3] - x0] = part * np.float32(a["gain"])
    return out


def _amp_hdus(hdul) -> list:
    """The per-amplifier image HDUs of a multi-extension frame (each with a DETSEC), or []."""
    images = [h for h in hdul[1:] if h.is_image and _is_2d(h.header)]
    if len(images) > 1 and all(h.header.get("DETSEC") for h in images):
        return images
    return []


def _decompressed(path: Path) -> bytes | None:
    """A gzip file's whole decompressed content (its CRC checked), read once for both the
    completeness check and the FITS reader; None when not gzip or not readable as gzip
    (the completeness check then says why)."""
    if not _is_gzip(path):
        return None
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def read_raw(path: str | os.PathLike) -> tuple[np.ndarray, object]:
    """Read a raw frame read-only: (2-D data as float32 ADU, merged header).

    The image is the first HDU with 2-D data (a tile-compressed .fz image
    included, degenerate (1, ny, nx) arrays squeezed); the header is that HDU's
    header with the primary header's cards it lacks. A multi-extension frame
    with one HDU per amplifier (each with DETSEC) is assembled into one frame:
    each amplifier's overscan and gain are applied first, so the assembled
    frame is in electrons with GAIN = 1 (when every amplifier has a gain).

    Raises
    ------
    BadInput
        not FITS, truncated, or no 2-D image
    """
    from astropy.io import fits

    path = Path(path)
    content = _decompressed(path)
    reason = fits_incomplete_reason(path, content)
    if reason:
        raise BadInput(reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(content) if content is not None else path,
                           mode="readonly", memmap=False) as hdul:
                amps = _amp_hdus(hdul)
                if amps:
                    headers = [h.header for h in amps]
                    layout = _amp_layout(headers, hdul[0].header)
                    data = assemble_amplifiers([h.data for h in amps], layout)
                    return data, _assembled_header(headers, hdul[0].header, layout)
                for hdu in hdul:
                    if hdu.is_image and _is_2d(hdu.header) and hdu.data is not None:
                        arr = np.asarray(hdu.data)
                        arr = arr.reshape(arr.shape[-2:])
                        data = np.asarray(arr, dtype=np.float32)
                        header = hdu.header  # the file's own: nothing else holds it
                        if hdu is not hdul[0]:
                            header = _merged(header, hdul[0].header)
                        inline = _inline_amps(header)
                        if inline:
                            return _inline_assemble(data, inline), _inline_header(header, inline)
                        return data, header
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"unreadable FITS: {exc}") from None
    raise BadInput("no 2-D image data in any HDU")


def raw_level(path: str | os.PathLike) -> float | None:
    """Median raw level (ADU) of a frame, on a subsample; None when it cannot be read."""
    try:
        data, _ = read_raw(path)
    except BadInput:
        return None
    sub = data[:: max(1, data.shape[0] // 256), :: max(1, data.shape[1] // 256)]
    sub = sub[np.isfinite(sub)]
    return float(np.median(sub)) if sub.size else None


def read_header(path: str | os.PathLike):
    """The header of the raw image (as :func:`read_raw`), without reading data."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=True) as hdul:
                primary = hdul[0].header
                if _is_2d(primary):
                    inline = _inline_amps(primary)
                    return _inline_header(primary, inline) if inline else primary
                amps = _amp_hdus(hdul)
                if amps:
                    headers = [h.header for h in amps]
                    return _assembled_header(headers, primary, _amp_layout(headers, primary))
                for hdu in hdul[1:]:
                    if _is_2d(hdu.header):
                        header = _merged(hdu.header, primary)
                        inline = _inline_amps(header)
                        return _inline_header(header, inline) if inline else header
                for hdu in hdul[1:]:  # no 2-D image: the first image extension's header
                    if hdu.is_image:
                        return _merged(hdu.header, primary)
                return primary.copy()
    except BadInput:
        raise
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


# ---------------------------------------------------------------- astropy's card settings
class _CardConf:
    """The two ``astropy.io.fits.conf`` items ``astropy.io.fits.card`` reads, as plain
    attributes with the values they had when made."""

    __slots__ = ("enable_record_valued_keyword_cards", "strip_header_whitespace")

    def __init__(self, conf) -> None:
        self.enable_record_valued_keyword_cards = conf.enable_record_valued_keyword_cards
        self.strip_header_whitespace = conf.strip_header_whitespace


_card_conf_lock = threading.Lock()
_card_conf_users = 0
_card_conf_saved = None


@contextlib.contextmanager
def fixed_card_settings():
    """Within this block astropy's cards read their two settings as plain values.

    ``astropy.io.fits.card`` looks ``conf.strip_header_whitespace`` (and, for each new
    card, ``conf.enable_record_valued_keyword_cards``) up on every card value, comment
    and creation; each look-up goes through astropy's configuration system (~2.7 us).
    A 1k science frame's headers, catalogue and quick-look coadd make ~7000 of them:
    ~20 ms CPU per frame (bench_frame_cpu, 2026-12-06). The values are read once when
    the first of nested or concurrent blocks starts, and the configuration object is
    back when the last ends (``conf.set_temp`` inside such a block is not seen by cards).
    """
    global _card_conf_users, _card_conf_saved
    from astropy.io.fits import card

    with _card_conf_lock:
        if _card_conf_users == 0:
            _card_conf_saved = card.conf
            card.conf = _CardConf(_card_conf_saved)
        _card_conf_users += 1
    try:
        yield
    finally:
        with _card_conf_lock:
            _card_conf_users -= 1
            if _card_conf_users == 0:
                card.conf = _card_conf_saved
                _card_conf_saved = None
