"""The end-of-night coadd: outlier-rejected, computed in blocks of output rows.

Conventions and file layout: see :mod:`photowatch.coadd.stack`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from photowatch.coadd.accumulate import (
    Member,
    _check_scalars,
    identity,
    member_facts,
    member_weight,
    write_coadd,
)
from photowatch.coadd.grid import CoaddGrid
from photowatch.coadd.resample import (
    _check_interpolation,
    _Mapping,
    _native_float,
    _Source,
    frame_bbox,
)
from photowatch.core.errors import StageDegraded
from photowatch.core.schema import header_wcs

if TYPE_CHECKING:

    pass

#: values per row block of the final rejection (bounds its temporaries: ~8 MB each; at 4k
#: with 30 members, blocks of twice as many rows cost ~40 % more CPU per pixel: fewer of
#: the temporaries stay in the CPU caches)
_BLOCK_ELEMENTS = 1 << 21


#: grid rows resampled at a time within a chunk (temporaries of ~1 MB per float64 plane)
_SAMPLE_ROWS = 32

#: (path, mtime_ns, size) -> (WCS, shape) of reduced products (see :func:`member_wcs`)
_WCS_CACHE: dict = {}
_WCS_CACHE_MAX = 512


def member_wcs(path: str | Path, header=None):
    """(WCS, (ny, nx)) of a reduced product's SCI plane, built once per file version.

    finalize asks for every member's WCS twice (the covering grid, then the coadd);
    a WCS with SIP costs ~30 ms to build. Keyed on the file's path, modification time
    and size, so a product rewritten since is read again. ``header``: the SCI header
    when the caller has it open already.
    """
    from astropy.io import fits

    st = Path(path).stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    hit = _WCS_CACHE.get(key)
    if hit is None:
        if header is None:
            header = fits.getheader(path, "SCI")
        hit = (header_wcs(header), (int(header["NAXIS2"]), int(header["NAXIS1"])))
        if len(_WCS_CACHE) >= _WCS_CACHE_MAX:
            _WCS_CACHE.clear()
        _WCS_CACHE[key] = hit
    return hit


# --------------------------------------------------------------------------- final coadd
@dataclass(frozen=True)
class FinalMember:
    """One input of :func:`final_coadd`: a reduced product and its stacking scalars."""

    member_id: str
    path: str | Path  #: reduced product (SCI, ERR, MASK; WCS in the SCI header)
    flxscale: float
    skynoise: float  #: electrons per pixel, frame units
    exptime_s: float


@dataclass
class _OpenMember:
    spec: FinalMember
    sci: object  #: FITS sections (read by row range)
    err: object
    mask: object
    shape: tuple[int, int]
    mapping: _Mapping
    member: Member = field(init=False)

    def __post_init__(self):
        self.member = Member(float(self.spec.flxscale), float(self.spec.skynoise),
                             float(self.spec.exptime_s),
                             member_weight(self.spec.flxscale, self.spec.skynoise))


def _resample_rows(om: _OpenMember, data: np.ndarray, var: np.ndarray, good: np.ndarray, *,
                   r0: int, r1: int, order: int) -> bool:
    """Resample a member onto grid rows ``r0 .. r1 - 1`` into full-width row planes
    (left untouched where the member does not reach), reading only the input rows it
    needs, scaled by its flxscale (data) and its square (variance). Returns False when
    the member does not cover these rows."""
    y0, y1, x0, x1 = om.mapping.bbox
    a, b = max(r0, y0), min(r1, y1)
    if b <= a:
        return False
    # a few rows at a time: the mapping's and the sampling's float64 temporaries stay in
    # the CPU caches (passes over the whole chunk were bound by memory bandwidth)
    blocks = [(s0, min(s0 + _SAMPLE_ROWS, b)) for s0 in range(a, b, _SAMPLE_ROWS)]
    maps = [om.mapping.rows(s0, s1) for s0, s1 in blocks]
    # bilinear reads rows floor(y)..floor(y)+1; the cubic prefilter is global, so give it
    # enough rows that the slice edges do not matter (its influence falls by 0.27 per row)
    pad = 1 if order == 1 else 16
    ny = om.shape[0]
    lo = int(np.clip(math.floor(min(m[0].min() for m in maps)) - pad, 0, ny))
    hi = int(np.clip(math.ceil(max(m[0].max() for m in maps)) + pad + 1, 0, ny))
    if hi <= lo:
        return False
    err = _native_float(om.err[lo:hi, :])
    source = _Source(om.sci[lo:hi, :], err * err, om.mask[lo:hi, :], order, row0=lo)
    # onto the photometric reference here, while the rows are in cache (and in this thread)
    scale = np.float32(om.member.flxscale)
    scale2 = scale * scale
    for (s0, s1), (yin, xin, jac) in zip(blocks, maps):
        sl = (slice(s0 - r0, s1 - r0), slice(x0, x1))
        if order == 1:  # numpy writes into the planes' row views directly
            source.sample(yin, xin, jac, data[sl], var[sl], good[sl])
        else:
            d = np.empty(yin.shape, dtype=np.float32)  # map_coordinates: contiguous outputs
            v = np.empty(yin.shape, dtype=np.float32)
            g = np.empty(yin.shape, dtype=bool)
            source.sample(yin, xin, jac, d, v, g)
            data[sl], var[sl], good[sl] = d, v, g
        data[sl] *= scale
        var[sl] *= scale2
    return True


def _median0(vals: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median over axis 0 of the good values, and their count (0 where there are none)."""
    n = good.sum(axis=0)
    ordered = np.sort(np.where(good, vals, np.inf), axis=0)
    i_lo = np.maximum((n - 1) // 2, 0)[None]
    i_hi = np.minimum(n // 2, vals.shape[0] - 1)[None]
    with np.errstate(invalid="ignore"):
        med = 0.5 * (np.take_along_axis(ordered, i_lo, 0)[0]
                     + np.take_along_axis(ordered, i_hi, 0)[0])
    return np.where(n > 0, med, 0).astype(vals.dtype), n


def _within(vals, centre, var, extra2, clip_sigma, amp_frac):
    """``|vals - centre| <= clip_sigma * sqrt(var + extra2 + (amp_frac * centre)**2)``.

    Compared squared, in place, to keep the passes over the stack few.
    """
    d = vals - centre
    d *= d
    lim = var + (extra2 + (amp_frac * amp_frac) * (centre * centre))
    lim *= clip_sigma * clip_sigma
    return d <= lim


def _clip_stack(vals: np.ndarray, var: np.ndarray, good: np.ndarray, weights: np.ndarray,
                clip_sigma: float, amp_frac: float, max_iter: int = 2) -> np.ndarray:
    """Outlier rejection over axis 0; returns the boolean array of the values kept.

    Pass 1 compares every value with the per-pixel median, in units of its own
    expected noise (plus the median's noise, and ``amp_frac`` times the level:
    a tolerance for seeing differences in star cores). With exactly two values
    the median cannot tell which one is wrong: when they disagree, the higher
    one (cosmic rays and trails are positive) is rejected. Later passes
    (``max_iter - 1`` of them) compare with the weighted mean of the values
    kept so far.
    """
    centre, n_good = _median0(vals, good)
    gvar = np.where(good, var, 0)
    nn = np.maximum(n_good, 1)
    centre_var = (np.pi / 2.0) * gvar.sum(axis=0) / (nn * nn)
    keep = _within(vals, centre, var, centre_var, clip_sigma, amp_frac)
    keep &= good
    two = n_good == 2
    if two.any():
        # only the pixels with exactly two values
        iy, ix = np.nonzero(two)
        v2, g2 = vals[:, iy, ix], good[:, iy, ix]
        hi = np.max(np.where(g2, v2, -np.inf), axis=0)
        lo = np.min(np.where(g2, v2, np.inf), axis=0)
        with np.errstate(invalid="ignore"):
            disagree = (hi - lo) > clip_sigma * np.sqrt(gvar[:, iy, ix].sum(axis=0)
                                                        + (amp_frac * lo) ** 2)
        keep[:, iy, ix] = g2 & ~(disagree & (v2 >= hi))
    w = (weights / weights.max()).astype(vals.dtype).reshape((-1,) + (1,) * (vals.ndim - 1))
    for _ in range(max_iter - 1):
        wk = np.where(keep, w, vals.dtype.type(0))
        sw = wk.sum(axis=0)
        wv = wk * vals
        mean_num = wv.sum(axis=0)
        wk *= wk
        wk *= var
        noise_num = wk.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            has = sw > 0
            mean = np.where(has, mean_num / sw, centre)
            noise2 = np.where(has, noise_num / (sw * sw), 0)
        new = _within(vals, mean, var, noise2, clip_sigma, amp_frac)
        new &= good
        if two.any():
            new[:, two] = keep[:, two]  # pairs are decided once
        none_left = ~new.any(axis=0) & keep.any(axis=0)  # never reject everything
        if none_left.any():
            new[:, none_left] = keep[:, none_left]
        if np.array_equal(new, keep):
            break
        keep = new
    return keep


def final_coadd(members: Sequence[FinalMember], grid: CoaddGrid, out_path: str | Path, *,
                clip_sigma: float, chunk_rows: int, magzp: float | None,
                header_extra: Mapping | None = None, step_px: int = 64,
                interpolation: str = "bilinear", amp_frac: float = 0.3, grow_px: int = 1,
                workers: int = 2, max_stack_mb: float = 1024.0, fsync: bool = True) -> Path:
    """Outlier-rejected weighted-mean coadd of reduced products, in chunks of output rows.

    Parameters
    ----------
    members : sequence of FinalMember
        Reduced products (SCI, ERR, MASK; WCS from the SCI header) and their
        flxscale, skynoise (electrons) and exposure time (s).
    grid : CoaddGrid
        The output grid (the night's grid of this target and filter).
    out_path : str or Path
        Output file (same layout as the quick-look coadd, ``STACKTYP='FINAL'``).
    clip_sigma : float
        Rejection threshold, in units of each value's expected noise.
    chunk_rows : int
        Output rows per chunk (at most; see ``max_stack_mb``). Peak memory is
        about ``len(members) * (chunk_rows + 2 * grow_px) * nx * 9`` bytes (the
        stacked data, variance and good flags of one chunk), plus the output
        planes (14 bytes per grid pixel), plus per thread a few 16 MB
        temporaries and one member's input rows.
    magzp : float or None
        Zero point of the photometric reference, written as MAGZP.
    header_extra : mapping, optional
        More keywords for the primary and SCI headers.
    step_px, interpolation, workers
        As in :func:`resample` (``workers`` threads over members).
    amp_frac : float
        Tolerance for seeing differences: ``amp_frac`` times the pixel's level
        is added in quadrature to the noise before comparing.
    grow_px : int
        Values next to a rejected value of the same frame (within ``grow_px``)
        are also rejected when they deviate by more than ``clip_sigma / 2``
        (the faint wings of trails and cosmic rays).
    max_stack_mb : float
        Cap on the stacked planes of one chunk (MB): fewer rows per chunk when
        there are many members.
    fsync : bool
        fsync the output (atomic either way).

    Returns
    -------
    Path
        The written file.

    Notes
    -----
    Inputs are read row range by row range (FITS sections, no memory map), so
    only the rows a chunk needs are in memory. The
    rejection compares with the per-pixel median first (robust with 3 or
    more frames); with exactly 2 frames at a pixel the higher of two
    discordant values is rejected. A pixel's value is kept only if it is
    good in its frame (no mask bit in the interpolation window).
    """
    from astropy.io import fits

    order = _check_interpolation(interpolation)
    if not members:
        raise ValueError("final_coadd: no members")
    ids = [m.member_id for m in members]
    if len(set(ids)) != len(ids):
        raise ValueError("final_coadd: member ids must be unique")
    for m in members:
        _check_scalars(m.member_id, m.flxscale, m.skynoise, m.exptime_s)
    ny_g, nx_g = grid.shape
    sci_out = np.full(grid.shape, np.nan, dtype=np.float32)
    wht_out = np.zeros(grid.shape, dtype=np.float32)
    exp_out = np.zeros(grid.shape, dtype=np.float32)
    ncov_out = np.zeros(grid.shape, dtype=np.int16)
    used: dict[str, Member] = {}
    ident: dict = {}

    with contextlib.ExitStack() as stack:
        opened: list[_OpenMember] = []
        for spec in members:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # no memmap: sections read only the rows asked for (a memmap would
                # leave every page read resident, and cannot scale the uint16 MASK)
                hdul = stack.enter_context(fits.open(spec.path, memmap=False))
                hdr = hdul["SCI"].header
            wcs, shape = member_wcs(spec.path, hdr)
            bbox = frame_bbox(wcs, shape, grid)
            if bbox[1] <= bbox[0]:
                continue
            om = _OpenMember(spec=spec, sci=hdul["SCI"].section, err=hdul["ERR"].section,
                             mask=hdul["MASK"].section, shape=shape,
                             mapping=_Mapping(wcs, grid, bbox, step_px))
            om.member = dataclasses.replace(om.member, **member_facts(hdr))
            ident = ident or identity(hdr)
            opened.append(om)
            used[spec.member_id] = om.member
        if not opened:
            raise StageDegraded(f"final_coadd: none of the {len(members)} members overlaps "
                                f"the grid")
        weights = np.array([om.member.weight for om in opened])
        exps = np.array([om.member.exptime_s for om in opened])
        halo = max(int(grow_px), 0)
        per_row = len(opened) * nx_g * 9  # bytes of the stacked planes per grid row
        chunk_rows = max(1, min(int(chunk_rows), int(max_stack_mb * 2**20 // per_row) - 2 * halo))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=max(workers, 1)))
        for c0 in range(0, ny_g, chunk_rows):
            c1 = min(c0 + chunk_rows, ny_g)
            r0, r1 = max(c0 - halo, 0), min(c1 + halo, ny_g)
            # only members covering these rows
            active = [i for i, om in enumerate(opened)
                      if om.mapping.bbox[0] < r1 and om.mapping.bbox[1] > r0]
            if not active:
                continue
            n_rows = r1 - r0
            vals = np.zeros((len(active), n_rows, nx_g), dtype=np.float32)
            var = np.zeros_like(vals)
            good = np.zeros(vals.shape, dtype=bool)
            covered = list(pool.map(
                functools.partial(_resample_rows, r0=r0, r1=r1, order=order),
                [opened[i] for i in active], vals, var, good))
            keep_idx = [i for i, c in zip(active, covered) if c]
            if not keep_idx:
                continue
            if len(keep_idx) < len(active):
                sel = np.flatnonzero(covered)
                vals, var, good = vals[sel], var[sel], good[sel]
            # the rejection runs on blocks of rows (bounded temporaries, one per thread)
            height = max(4, _BLOCK_ELEMENTS // (len(keep_idx) * nx_g))
            combine = functools.partial(
                _combine_block, height=height, halo=halo, vals=vals, var=var, good=good,
                weights=weights[keep_idx], exps=exps[keep_idx], rows=(c0 - r0, c1 - r0),
                clip=(clip_sigma, amp_frac),
                out=(sci_out[c0:c1], wht_out[c0:c1], exp_out[c0:c1], ncov_out[c0:c1]))
            list(pool.map(combine, range(0, c1 - c0, height)))
    return write_coadd(out_path, grid, sci=sci_out, wht=wht_out, exp=exp_out, ncov=ncov_out,
                       members=used, stacktype="FINAL", magzp=magzp,
                       header_extra={**ident, **(header_extra or {})}, fsync=fsync)


def _combine_block(b0: int, *, height: int, halo: int, vals, var, good, weights, exps, rows,
                   clip, out) -> None:
    """Reject and combine the rows ``b0 .. b0 + height - 1`` of a chunk's stack into ``out``.

    ``vals, var, good`` are the chunk's (members, rows, nx) stacks, whose rows
    include the chunk's halo; ``rows`` is the range of the chunk's own rows in
    them (``b0`` counts from its start); ``out`` holds the chunk's SCI, WHT, EXP
    and NCOV rows. Up to ``halo`` neighbouring rows are rejected too (for the
    growth) but not written. Row blocks keep each member's slab contiguous.
    """
    lo_own, hi_own = rows
    a = lo_own + b0
    b = min(a + height, hi_own)
    h0, h1 = max(a - halo, 0), min(b + halo, vals.shape[1])
    g = good[:, h0:h1]
    if not g.any():
        return
    v, s2 = vals[:, h0:h1], var[:, h0:h1]
    clip_sigma, amp_frac = clip
    keep = _clip_stack(v, s2, g, weights, clip_sigma, amp_frac)
    if halo:
        keep = _grow_rejection(keep, g, v, s2, weights, clip_sigma, amp_frac, halo)
    keep, v = keep[:, a - h0: b - h0], v[:, a - h0: b - h0]
    wmax = float(weights.max())
    wk = np.where(keep, (weights / wmax).astype(np.float32).reshape(-1, 1, 1), np.float32(0))
    sw = wk.sum(axis=0)
    wk *= v
    swd = wk.sum(axis=0)
    sci_o, wht_o, exp_o, ncov_o = out
    o = slice(a - lo_own, b - lo_own)
    with np.errstate(invalid="ignore", divide="ignore"):
        sci_o[o] = np.where(sw > 0, swd / sw, np.nan)
    wht_o[o] = sw * wmax
    ncov = keep.sum(axis=0, dtype=np.int16)
    ncov_o[o] = ncov
    if np.all(exps == exps[0]):  # one exposure time (the usual night): EXP = t x NCOV
        np.multiply(ncov, np.float32(exps[0]), out=exp_o[o], casting="unsafe")
    else:  # no float copy of the whole stack (a tensordot would make one)
        acc = exp_o[o]
        acc[...] = 0
        for t, k in zip(exps, keep):
            np.add(acc, np.float32(t), out=acc, where=k)


def _dilate(mask: np.ndarray, grow_px: int) -> np.ndarray:
    """Boolean dilation by a (2g+1) square along the last two axes."""
    out = mask.copy()
    for axis in (-2, -1):
        src = out.copy()
        n = src.shape[axis]
        for off in range(1, grow_px + 1):
            if off >= n:
                break
            lo = [slice(None)] * src.ndim
            hi = [slice(None)] * src.ndim
            lo[axis], hi[axis] = slice(0, n - off), slice(off, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _grow_rejection(keep, good, vals, var, weights, clip_sigma, amp_frac, grow_px):
    """Reject, next to each rejected value, neighbours deviating by > clip_sigma / 2.

    Evaluated only at the pixels that have such a neighbour (a few per cent).
    """
    rejected = good & ~keep
    if not rejected.any():
        return keep
    candidates = _dilate(rejected, grow_px)
    candidates &= keep
    pix = candidates.any(axis=0)
    if not pix.any():
        return keep
    k, v, s2, c = keep[:, pix], vals[:, pix], var[:, pix], candidates[:, pix]
    w = (weights / weights.max()).astype(vals.dtype).reshape(-1, 1)
    wk = np.where(k, w, vals.dtype.type(0))
    sw = wk.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, (wk * v).sum(axis=0) / sw, 0)
    drop = c & ~_within(v, mean, s2, 0, clip_sigma / 2.0, amp_frac)
    new = k & ~drop
    lost = ~new.any(axis=0) & k.any(axis=0)  # never remove the last value of a pixel
    new[:, lost] = k[:, lost]
    keep = keep.copy()
    keep[:, pix] = new
    return keep


def final_members(rows: Iterable[Mapping]) -> list[FinalMember]:
    """FinalMember objects from mappings with keys member_id, path, flxscale, skynoise,
    exptime_s (e.g. store rows)."""
    return [FinalMember(member_id=str(r["member_id"]), path=r["path"],
                        flxscale=float(r["flxscale"]), skynoise=float(r["skynoise"]),
                        exptime_s=float(r["exptime_s"])) for r in rows]
