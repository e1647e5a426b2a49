"""The quick-look coadd: members, their weights, and the incremental accumulator.

A member enters with weight ``1 / (FLXSCALE**2 * SKYNOISE**2)``; the coadd file is
the accumulator's state (:func:`write_coadd`). Conventions and file layout: see
:mod:`photowatch.coadd.stack`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from photowatch import __version__
from photowatch.coadd.grid import CoaddGrid
from photowatch.coadd.resample import _STRIP_ROWS, Resampled
from photowatch.core.schema import annotate, set_key
from photowatch.io.fits import write_hdul

if TYPE_CHECKING:
    from astropy.table import Table


#: extension names of a coadd file, in order
COADD_EXTENSIONS = ("SCI", "WHT", "EXP", "NCOV", "MEMBERS")


# --------------------------------------------------------------------------- accumulation
@dataclass(frozen=True)
class Member:
    """The scalars a frame entered a coadd with."""

    flxscale: float  #: multiplies the frame's data (to the reference's units)
    skynoise: float  #: sky noise of the frame (electrons per pixel, frame units)
    exptime_s: float  #: exposure time (s)
    weight: float  #: 1 / (flxscale**2 * skynoise**2)
    mjd_obs: float | None = None  #: MJD at the start of the exposure (None: unknown)
    saturate: float | None = None  #: the frame's SATURATE (electrons, frame units)


#: keywords a coadd takes from its first member (SWarp copies them the same way)
IDENTITY_KEYS = ("TELESCOP", "INSTRUME", "FILTER", "OBJECT")


def member_facts(header) -> dict:
    """``mjd_obs`` and ``saturate`` of a reduced frame's header, for :class:`Member`."""
    facts = {"mjd_obs": None, "saturate": None}
    if header is None:
        return facts
    with contextlib.suppress(TypeError, ValueError):
        facts["saturate"] = float(header["SATURATE"]) if "SATURATE" in header else None
    if "MJD-OBS" in header:
        with contextlib.suppress(TypeError, ValueError):
            facts["mjd_obs"] = float(header["MJD-OBS"])
    elif "DATE-OBS" in header:
        from astropy.time import Time

        with contextlib.suppress(TypeError, ValueError):
            facts["mjd_obs"] = float(Time(str(header["DATE-OBS"]).strip(), scale="utc").mjd)
    return facts


def identity(header) -> dict:
    """The :data:`IDENTITY_KEYS` a header has (FILTER from FILTNAME when it has none)."""
    out = {k: header[k] for k in IDENTITY_KEYS if header is not None and k in header
           and isinstance(header[k], str) and header[k].strip()}
    if header is not None and "FILTER" not in out and "FILTNAME" in header:
        out["FILTER"] = header["FILTNAME"]
    return out


def coadd_keywords(members: Mapping[str, Member]) -> dict:
    """The keywords SWarp writes, for a coadd of ``members`` (a weighted mean in the units
    of the photometric reference; see the module docstring).

    ``EXPTIME`` (total), ``NCOMBINE``; the span of the observations (``DATE-OBS`` =
    ``DATE-BEG``, ``DATE-END``, ``MJD-OBS`` = ``MJD-BEG``, ``MJD-MID``, ``MJD-END``); ``GAIN``, the
    effective gain of the weighted mean ``(sum w)**2 / sum(w**2 FLXSCALE)`` (a source of
    S reference electrons has variance S / GAIN); ``SATURATE``, the lowest member
    saturation level in reference units ``min(FLXSCALE * SATURATE)``.
    """
    from astropy.time import Time

    ms = list(members.values())
    keys: dict = {
        "NCOMBINE": (len(ms), "number of frames combined"),
        "EXPTIME": (float(sum(m.exptime_s for m in ms)), "[s] total exposure time of the members"),
    }
    w = np.array([m.weight for m in ms], dtype=float)
    f = np.array([m.flxscale for m in ms], dtype=float)
    denom = float(np.sum(w * w * f))
    if ms and denom > 0:
        keys["GAIN"] = (float(np.sum(w) ** 2 / denom),
                        "[electron/adu] effective gain of the mean")
    sat = np.array([m.saturate * m.flxscale for m in ms if m.saturate is not None], dtype=float)
    if np.isfinite(sat).any():
        keys["SATURATE"] = (round(float(np.nanmin(sat)), 1),
                            "[electron] min of member SATURATE x FLXSCALE")
    beg = np.array([math.nan if m.mjd_obs is None else m.mjd_obs for m in ms], dtype=float)
    end = beg + np.array([m.exptime_s for m in ms], dtype=float) / 86400.0
    if np.isfinite(beg).any():
        t0, t1 = float(np.nanmin(beg)), float(np.nanmax(end))
        iso = [Time(t, format="mjd", scale="utc").isot for t in (t0, t1)]
        keys.update({
            "DATE-OBS": (iso[0], "UTC start of the first exposure"),
            "DATE-BEG": (iso[0], "UTC start of the first exposure"),
            "DATE-END": (iso[1], "UTC end of the last exposure"),
            "MJD-OBS": (round(t0, 8), "[d] MJD at start of the first exposure"),
            "MJD-BEG": (round(t0, 8), "[d] MJD at start of the first exposure"),
            "MJD-MID": (round((t0 + t1) / 2, 8), "[d] MJD halfway between start and end"),
            "MJD-END": (round(t1, 8), "[d] MJD at end of the last exposure"),
        })
    return keys


def member_weight(flxscale: float, skynoise: float) -> float:
    """Scalar weight of a frame: ``1 / (flxscale**2 * skynoise**2)`` (1 / reference e-**2)."""
    return 1.0 / (flxscale * flxscale * skynoise * skynoise)


def _check_scalars(member_id: str, flxscale: float, skynoise: float, exptime_s: float) -> None:
    for name, value in (("flxscale", flxscale), ("skynoise", skynoise)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"coadd member {member_id}: {name} must be finite and > 0, "
                             f"got {value}")
    if not (np.isfinite(exptime_s) and exptime_s >= 0):
        raise ValueError(f"coadd member {member_id}: exptime_s must be finite and >= 0, "
                         f"got {exptime_s}")


#: madvise(MADV_POPULATE_WRITE) (Linux >= 5.14; not in Python's mmap constants)
_MADV_POPULATE_WRITE = 23
_POPULATE = True


class Accumulator:
    """Running sums of a quick-look coadd on a fixed grid.

    Per grid pixel: ``sum_wd`` (float64, sum of w * FLXSCALE * data),
    ``sum_w`` (float64, sum of w), ``exp`` (float64, s) and ``ncov`` (int32,
    frame count), over the good pixels of each member. Adding or removing a
    frame touches only its bounding box, so the cost of frame k does not
    depend on k; :meth:`write` costs one pass over the grid.

    Memory: 28 bytes per grid pixel (a 4600 x 4600 grid: 590 MB), plus 14 for the
    written planes. With ``backing`` (a folder) every plane is a memory map of an
    unlinked file there, and each strip of rows is dropped from the process's
    resident set once updated (:meth:`release`): the page cache keeps the pixels
    and the kernel may write them out, so a daemon holding several 4k coadds stays
    small (issue 23).
    """

    def __init__(self, grid: CoaddGrid, backing: str | Path | None = None, *,
                 map_min_mb: float = 0.0):
        self.grid = grid
        shape = tuple(grid.shape)
        # small sums stay in memory: a mapped strip dropped from the resident set faults
        # back in on the next frame, which triples the cost of an add (issue 23)
        if backing is not None and int(np.prod(shape)) * 28 < map_min_mb * 2**20:
            backing = None
        self.backing = Path(backing) if backing is not None else None
        self.sum_wd = self._plane(shape, np.float64)
        self.sum_w = self._plane(shape, np.float64)
        self.exp = self._plane(shape, np.float64)
        self.ncov = self._plane(shape, np.int32)
        self._members: dict[str, Member] = {}
        #: TELESCOP, INSTRUME, FILTER, OBJECT of the first member (written in the header)
        self.identity: dict[str, str] = {}
        #: the written planes (big-endian float32/int16), kept up to date in the bounding
        #: box of each change, so a frame costs O(its footprint), not O(grid), to publish
        self._images: tuple | None = None

    def _plane(self, shape: tuple, dtype) -> np.ndarray:
        """A zeroed plane: in memory, or a memory map of an unlinked file in ``backing``."""
        if self.backing is None:
            return np.zeros(shape, dtype=dtype)
        import tempfile

        self.backing.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.backing, prefix=".acc-", suffix=".bin",
                                         delete=True) as fh:
            fh.truncate(max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))
            return np.memmap(fh.name, dtype=dtype, mode="r+", shape=shape)

    def release(self, y0: int = 0, y1: int | None = None) -> None:
        """Drop rows ``[y0, y1)`` of memory-mapped planes from the resident set (no-op
        in memory). Their pixels stay in the page cache (or go to the file)."""
        if self.backing is None:
            return
        import mmap

        page = mmap.PAGESIZE
        planes = [self.sum_wd, self.sum_w, self.exp, self.ncov, *(self._images or ())]
        for plane in planes:
            mm = getattr(plane, "_mmap", None)
            if mm is None:
                continue
            row = plane.strides[0]
            stop = plane.shape[0] if y1 is None else y1
            start = (y0 * row) // page * page
            end = min(len(mm), stop * row)
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def populate(self, y0: int, y1: int) -> None:
        """Map rows ``[y0, y1)`` of memory-mapped planes writable in one call before they
        are updated (no-op in memory): page by page, the faults cost a third of an add of
        a 4k frame; without ``MADV_POPULATE_WRITE`` (Linux < 5.14) they fault as before."""
        global _POPULATE
        if self.backing is None or not _POPULATE:
            return
        import mmap

        page = mmap.PAGESIZE
        for plane in (self.sum_wd, self.sum_w, self.exp, self.ncov, *(self._images or ())):
            mm = getattr(plane, "_mmap", None)
            if mm is None:
                continue
            row = plane.strides[0]
            start = (y0 * row) // page * page
            end = min(len(mm), y1 * row)
            if end > start:
                try:
                    mm.madvise(_MADV_POPULATE_WRITE, start, end - start)
                except (OSError, ValueError):
                    _POPULATE = False
                    return

    # ----------------------------------------------------------------- state
    @property
    def members(self) -> dict[str, Member]:
        """member id → the scalars it was added with (a copy)."""
        return dict(self._members)

    @property
    def exptime_s(self) -> float:
        """Total exposure time of the members (s)."""
        return float(sum(m.exptime_s for m in self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member_id: str) -> bool:
        return member_id in self._members

    def grow(self, grid: CoaddGrid, dy: int, dx: int) -> None:
        """Move the sums onto a larger grid from :func:`grown_grid` (old (y, x) → (y+dy, x+dx))."""
        ny, nx = self.grid.shape
        for name in ("sum_wd", "sum_w", "exp", "ncov"):
            old = getattr(self, name)
            new = self._plane(tuple(grid.shape), old.dtype)
            new[dy:dy + ny, dx:dx + nx] = old
            setattr(self, name, new)
        self.grid = grid
        self._images = None
        self.release()

    def _apply(self, res: Resampled, member: Member, sign: int) -> None:
        y0, y1, x0, x1 = res.bbox
        if y0 < 0 or x0 < 0 or y1 > self.grid.shape[0] or x1 > self.grid.shape[1]:
            raise ValueError(f"resampled bbox {res.bbox} lies outside the grid {self.grid.shape}")
        if res.data.shape != (y1 - y0, x1 - x0) or res.good.shape != res.data.shape:
            raise ValueError(f"resampled planes {res.data.shape} do not match bbox {res.bbox}")
        w = member.weight * sign
        wf = w * member.flxscale
        dexp = sign * member.exptime_s
        # row blocks: cache-friendly, bounded temporaries; ufunc ``where`` touches only
        # the good pixels, and the products are the same on add and remove
        for r0 in range(0, y1 - y0, _STRIP_ROWS):
            r1 = min(r0 + _STRIP_ROWS, y1 - y0)
            sl = (slice(y0 + r0, y0 + r1), slice(x0, x1))
            self.populate(y0 + r0, y0 + r1)
            good = res.good[r0:r1]
            term = np.multiply(res.data[r0:r1], wf, dtype=np.float64)
            np.add(self.sum_wd[sl], term, out=self.sum_wd[sl], where=good)
            np.add(self.sum_w[sl], w, out=self.sum_w[sl], where=good)
            np.add(self.exp[sl], dexp, out=self.exp[sl], where=good)
            np.add(self.ncov[sl], sign, out=self.ncov[sl], where=good)
            if sign < 0:
                # where no frame is left the sums are exactly zero (no round-off residue)
                empty = good & (self.ncov[sl] <= 0)
                if empty.any():
                    for plane in (self.sum_wd, self.sum_w, self.exp, self.ncov):
                        plane[sl][empty] = 0
            if self._images is not None:
                self._fill_images(self._images, y0 + r0, y0 + r1, x0, x1)
            self.release(y0 + r0, y0 + r1)

    def _fill_images(self, images, y0: int, y1: int, x0: int, x1: int) -> None:
        sci, wht, exp, ncov = images
        top = np.iinfo(np.int16).max
        with np.errstate(invalid="ignore", divide="ignore"):
            for r0 in range(y0, y1, _STRIP_ROWS):
                sl = (slice(r0, min(r0 + _STRIP_ROWS, y1)), slice(x0, x1))
                sw = self.sum_w[sl]
                q = self.sum_wd[sl] / sw
                q[~(sw > 0)] = np.nan
                sci[sl] = q
                wht[sl] = sw
                exp[sl] = self.exp[sl]
                ncov[sl] = np.minimum(self.ncov[sl], top)

    def add(self, member_id: str, resampled: Resampled, *, flxscale: float, skynoise: float,
            exptime_s: float, header=None) -> Member:
        """Add one resampled frame.

        Parameters
        ----------
        member_id : str
            Unique name of the frame (e.g. its reduced product's name).
        resampled : Resampled
            The frame on this accumulator's grid.
        flxscale : float
            Factor bringing the frame to the coadd's photometric reference.
        skynoise : float
            The frame's sky noise (electrons per pixel, before flxscale).
        exptime_s : float
            Exposure time (s).
        header : astropy.io.fits.Header, optional
            The frame's header: its start time, saturation level and (first member)
            telescope, instrument, filter and object go into the coadd's header.

        Returns
        -------
        Member
            The scalars recorded for the frame.

        Raises
        ------
        ValueError
            The id is already a member, or a scalar is not finite and positive.
        """
        if member_id in self._members:
            raise ValueError(f"coadd member {member_id} is already in the coadd "
                             f"(remove it first to replace it)")
        _check_scalars(member_id, flxscale, skynoise, exptime_s)
        member = Member(float(flxscale), float(skynoise), float(exptime_s),
                        member_weight(flxscale, skynoise), **member_facts(header))
        self._apply(resampled, member, +1)
        self._members[member_id] = member
        if not self.identity and header is not None:
            self.identity = identity(header)
        return member

    def remove(self, member_id: str, resampled: Resampled) -> Member:
        """Subtract a member's contribution, using the scalars it was added with.

        ``resampled`` must be the same resampling that was added (same frame,
        WCS, grid and settings: :func:`resample` is deterministic, so after a
        restart resampling the old product again gives it back); the sums then
        return to their previous values to float64 round-off (exactly zero
        where no frame is left).
        """
        try:
            member = self._members[member_id]
        except KeyError:
            raise ValueError(f"coadd member {member_id} is not in the coadd") from None
        self._apply(resampled, member, -1)
        del self._members[member_id]
        return member

    # ----------------------------------------------------------------- products
    def images(self, byteorder: str = "=") -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
        """``(sci, wht, exp, ncov)`` as written: float32 (int16 NCOV), NaN in SCI where WHT = 0.

        ``byteorder='>'`` gives big-endian arrays, which FITS writes without a copy.
        """
        if byteorder == ">" and self._images is not None:
            return self._images  # kept current by every add and remove (do not modify)
        f4 = np.dtype(np.float32).newbyteorder(byteorder)
        i2 = np.dtype(np.int16).newbyteorder(byteorder)
        shape = tuple(self.grid.shape)
        if byteorder == ">" and self.backing is not None:
            images = (self._plane(shape, f4), self._plane(shape, f4), self._plane(shape, f4),
                      self._plane(shape, i2))
        else:
            images = (np.empty(shape, f4), np.empty(shape, f4), np.empty(shape, f4),
                      np.empty(shape, i2))
        for r0 in range(0, shape[0], _STRIP_ROWS):
            r1 = min(r0 + _STRIP_ROWS, shape[0])
            self._fill_images(images, r0, r1, 0, shape[1])
            self.release(r0, r1)
        if byteorder == ">":
            self._images = images
        return images

    def sci(self) -> np.ndarray:
        """The weighted mean alone (float32, NaN where WHT = 0), e.g. for a preview."""
        out = np.empty(tuple(self.grid.shape), np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for r0 in range(0, out.shape[0], _STRIP_ROWS):
                sl = slice(r0, r0 + _STRIP_ROWS)
                sw = self.sum_w[sl]
                q = self.sum_wd[sl] / sw
                q[~(sw > 0)] = np.nan
                out[sl] = q
        return out

    def members_table(self) -> Table:
        return members_table(self._members)

    def write(self, path: str | Path, *, magzp: float | None, header_extra: Mapping | None = None,
              fsync: bool = True) -> Path:
        """Write the quick-look coadd atomically (``STACKTYP='QUICKLOOK'``).

        Parameters
        ----------
        path : str or Path
            Usually ``OUT/coadds/<night>/coadd_<TARGET>_<FILTER>.fits``.
        magzp : float or None
            Zero point of the photometric reference (mag = MAGZP − 2.5 log10(SCI)).
        header_extra : mapping, optional
            More keywords (``{key: value}`` or ``{key: (value, comment)}``).
        """
        sci, wht, exp, ncov = self.images(byteorder=">")
        try:
            return write_coadd(path, self.grid, sci=sci, wht=wht, exp=exp, ncov=ncov,
                               members=self._members, stacktype="QUICKLOOK", magzp=magzp,
                               header_extra={**self.identity, **(header_extra or {})},
                               fsync=fsync)
        finally:
            self.release()

    @classmethod
    def load(cls, path: str | Path, backing: str | Path | None = None, *,
             map_min_mb: float = 0.0) -> Accumulator:
        """Rebuild an accumulator from a coadd file written by :meth:`write`.

        The sums come back as SCI x WHT, WHT, EXP and NCOV (float32 round-off);
        the members from the MEMBERS table.
        """
        from astropy.io import fits
        from astropy.table import Table

        path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdul:
                names = {h.name for h in hdul}
                missing = [n for n in COADD_EXTENSIONS if n not in names]
                if missing:
                    raise ValueError(f"{path}: not a photowatch coadd (missing extensions "
                                     f"{', '.join(missing)})")
                grid = CoaddGrid.from_header(hdul["SCI"].header)
                sci = np.asarray(hdul["SCI"].data, dtype=np.float64)
                wht = np.asarray(hdul["WHT"].data, dtype=np.float64)
                exp = np.asarray(hdul["EXP"].data, dtype=np.float64)
                ncov = np.asarray(hdul["NCOV"].data, dtype=np.int32)
                table = Table.read(hdul["MEMBERS"])
                primary = hdul[0].header
                ident = {k: primary[k] for k in IDENTITY_KEYS if k in primary}
        acc = cls(grid, backing=backing, map_min_mb=map_min_mb)
        acc.identity = ident
        has = (ncov > 0) & (wht > 0)
        acc.sum_w[...] = np.where(has, wht, 0.0)
        acc.sum_wd[...] = np.where(has, np.nan_to_num(sci) * wht, 0.0)
        acc.exp[...] = np.where(has, exp, 0.0)
        acc.ncov[...] = np.where(has, ncov, 0)
        acc.release()
        for row in table:
            acc._members[str(row["member"]).strip()] = Member(
                float(row["flxscale"]), float(row["skynoise"]), float(row["exptime"]),
                float(row["weight"]), *(_known(row[c]) if c in table.colnames else None
                                        for c in ("mjdobs", "saturate")))
        return acc


def members_table(members: Mapping[str, Member]) -> Table:
    """The MEMBERS table: member, flxscale, skynoise, exptime (s), weight, mjdobs (d),
    saturate (electrons, frame units)."""
    from astropy.table import Table

    ids = list(members)
    return Table(
        {
            "member": np.array(ids, dtype=str) if ids else np.array([], dtype="U1"),
            "flxscale": np.array([members[i].flxscale for i in ids], dtype=float),
            "skynoise": np.array([members[i].skynoise for i in ids], dtype=float),
            "exptime": np.array([members[i].exptime_s for i in ids], dtype=float),
            "weight": np.array([members[i].weight for i in ids], dtype=float),
            "mjdobs": np.array([_nan(members[i].mjd_obs) for i in ids], dtype=float),
            "saturate": np.array([_nan(members[i].saturate) for i in ids], dtype=float),
        },
    )


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _known(value) -> float | None:
    if value is np.ma.masked:  # astropy masks a table's NaN on reading
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fits_array(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as ``dtype`` in either byte order (big-endian arrays are written as they are)."""
    a = np.asarray(a)
    if a.dtype.kind == np.dtype(dtype).kind and a.dtype.itemsize == np.dtype(dtype).itemsize:
        return a
    return a.astype(np.dtype(dtype).newbyteorder(">"))


def write_coadd(path: str | Path, grid: CoaddGrid, *, sci: np.ndarray, wht: np.ndarray,
                exp: np.ndarray, ncov: np.ndarray, members: Mapping[str, Member],
                stacktype: str, magzp: float | None, header_extra: Mapping | None = None,
                fsync: bool = True) -> Path:
    """Write a coadd file (see the module docstring for the layout), atomically."""
    from astropy.io import fits

    keys = {
        "STACKTYP": (stacktype, "QUICKLOOK (running) or FINAL (outlier-rejected)"),
        **coadd_keywords(members),
        "MAGZP": (None if magzp is None else float(magzp), "mag = MAGZP - 2.5 log10(SCI)"),
        "BUNIT": ("electron", "reference electrons per pixel"),
        "PWVERS": (__version__, "photowatch version"),
    }
    primary = fits.Header()
    for key, value in keys.items():
        set_key(primary, key, value)
    for key, value in (header_extra or {}).items():
        set_key(primary, key, value)
    grid_cards = [c for c in grid.to_header().cards if not c.keyword.startswith("NAXIS")]

    def image(data, name, extra=()):
        hdr = fits.Header()
        hdr.extend(grid_cards)
        for key, value in extra:
            set_key(hdr, key, value)
        return fits.ImageHDU(data, header=hdr, name=name)

    sci_keys = [(k, v) for k, v in primary.items()]
    sci_keys.append(("BLANKVAL", ("NaN", "SCI value where WHT = 0 (no data)")))
    hdus = [
        fits.PrimaryHDU(header=primary),
        image(_fits_array(sci, np.float32), "SCI", sci_keys),
        image(_fits_array(wht, np.float32), "WHT",
              [("BUNIT", ("electron-2", "sum of 1/(FLXSCALE*SKYNOISE)**2"))]),
        image(_fits_array(exp, np.float32), "EXP", [("BUNIT", ("s", "exposure map"))]),
        image(_fits_array(ncov, np.int16), "NCOV", [("BUNIT", ("", "frames per pixel"))]),
    ]
    table = fits.table_to_hdu(members_table(members))
    table.name = "MEMBERS"
    for i, name in enumerate(table.columns.names, start=1):
        # electrons as FITS counts (GAIN = 1): astropy reads these without a warning
        unit = {"skynoise": "ct", "exptime": "s", "weight": "ct-2", "mjdobs": "d",
                "saturate": "ct"}.get(name)
        if unit:
            table.header[f"TUNIT{i}"] = (unit, f"unit of column {i}")
    hdus.append(table)

    for hdu in hdus:
        annotate(hdu.header)
    return write_hdul(path, fits.HDUList(hdus), fsync=fsync)
