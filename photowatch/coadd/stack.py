"""Coadds: the output grid, fast flux-conserving resampling, incremental and final stacks.

The flow for one (target, filter) over a night::

    first good frame ──► make_grid (fixed for the night, stored as JSON / header)
    every frame      ──► resample onto the grid ──► Accumulator.add ──► write
                         (quick-look coadd: the file is the state; cost constant in k)
    end of night     ──► final_coadd (outlier-rejected, in chunks of output rows)

Conventions
-----------
- Pixels are 0-based in code (``array[y, x]``, the centre of the first pixel
  is (0, 0)); FITS headers (CRPIX) are 1-based.
- A bounding box ``(y0, y1, x0, x1)`` is a half-open slice of grid pixels:
  ``grid_array[y0:y1, x0:x1]``.
- Data are in electrons per pixel of the image they live on; resampling
  multiplies by the pixel-area ratio so fluxes (sums over pixels) are kept.
- A member's weight is a scalar, ``w = 1 / (FLXSCALE**2 * SKYNOISE**2)``, and
  its data enter the stack multiplied by FLXSCALE, so a coadd's SCI is a
  weighted mean in the units of the photometric reference, and its MAGZP is
  the reference zero point.

Coadd file (``coadd_<TARGET>_<FILTER>.fits``)::

    PRIMARY   no data; the keywords SWarp writes (:func:`coadd_keywords`: EXPTIME
              total, NCOMBINE, DATE-OBS/DATE-BEG/DATE-END, MJD-OBS/MJD-MID/MJD-END,
              effective GAIN, SATURATE), TELESCOP/INSTRUME/FILTER/OBJECT of the
              first member, STACKTYP, MAGZP (+ header_extra); all also in SCI
    SCI       float32, weighted mean (reference electrons per grid pixel);
              NaN where no frame contributes (WHT = 0); the grid WCS
    WHT       float32, sum of the weights of the frames used at each pixel
    EXP       float32, exposure map (s): sum of the exposure times used
    NCOV      int16, number of frames used at each pixel
    MEMBERS   table: member, flxscale, skynoise, exptime, weight, mjdobs, saturate

NCOV is an addition to the product contract (SCI, WHT, EXP): the per-pixel
frame count is part of the accumulator's state, and the file is that state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from photowatch.core.errors import StageDegraded
from photowatch.io.fits import write_hdul

if TYPE_CHECKING:
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    from photowatch.core.frame import Frame

#: extension names of a coadd file, in order
COADD_EXTENSIONS = ("SCI", "WHT", "EXP", "NCOV", "MEMBERS")
#: tolerance of the iterative SIP inversion (input pixels)
_WORLD2PIX_TOL = 1e-7
#: output rows per strip in :func:`resample` (bounds temporary memory)
_STRIP_ROWS = 256
#: values per row block of the final rejection (bounds its temporaries: ~16 MB each)
_BLOCK_ELEMENTS = 1 << 22
#: orders of :func:`scipy.ndimage.map_coordinates` for each interpolation
_ORDERS = {"bilinear": 1, "cubic": 3}


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True, eq=False)
class CoaddGrid:
    """The output pixel grid of a coadd: a north-up, east-left TAN WCS and a shape.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        Celestial TAN WCS (CD matrix ``[[-s, 0], [0, s]]`` in degrees),
        0-based in code, CRPIX 1-based in its header.
    shape : tuple of int
        ``(ny, nx)`` in pixels.
    """

    wcs: WCS
    shape: tuple[int, int]

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel side (arcsec)."""
        return float(math.sqrt(abs(np.linalg.det(self.wcs.pixel_scale_matrix))) * 3600.0)

    def to_header(self) -> fits.Header:
        """The grid as FITS cards: NAXIS1/NAXIS2 and the TAN WCS."""
        from astropy.io import fits

        hdr = fits.Header()
        hdr["NAXIS"] = 2
        hdr["NAXIS1"] = int(self.shape[1])
        hdr["NAXIS2"] = int(self.shape[0])
        wcs_hdr = self.wcs.to_header(relax=False)
        # no time reference (astropy writes MJDREF = 0, a date in 1858); the CD form, as
        # SWarp and SCAMP write it
        for key in ("MJDREF", "MJDREFI", "MJDREFF", "DATEREF", "PC1_1", "PC1_2", "PC2_1",
                    "PC2_2", "CDELT1", "CDELT2"):
            wcs_hdr.remove(key, ignore_missing=True)
        cd = np.asarray(self.wcs.pixel_scale_matrix)
        for i in range(2):
            for j in range(2):
                wcs_hdr.insert("CUNIT1", (f"CD{i + 1}_{j + 1}", float(cd[i, j]),
                                          "[deg/pix] linear transformation matrix"))
        hdr.extend(wcs_hdr.cards)
        return hdr

    @classmethod
    def from_header(cls, header) -> CoaddGrid:
        """Rebuild a grid from :meth:`to_header` cards or any coadd image header."""
        from astropy.wcs import WCS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header, naxis=2)
        return cls(wcs=wcs, shape=(int(header["NAXIS2"]), int(header["NAXIS1"])))

    def to_dict(self) -> dict:
        """A JSON-able description (CRVAL deg, CRPIX 1-based, CD deg/px, shape ny, nx)."""
        w = self.wcs.wcs
        return {
            "ctype": list(w.ctype),
            "crval": [float(v) for v in w.crval],
            "crpix": [float(v) for v in w.crpix],
            "cd": [[float(v) for v in row] for row in self.wcs.pixel_scale_matrix],
            "radesys": w.radesys or "ICRS",
            "shape": [int(self.shape[0]), int(self.shape[1])],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CoaddGrid:
        """Inverse of :meth:`to_dict`."""
        return cls(wcs=_tan_wcs(data["crval"], data["crpix"], data["cd"],
                                ctype=data.get("ctype"), radesys=data.get("radesys", "ICRS")),
                   shape=(int(data["shape"][0]), int(data["shape"][1])))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> CoaddGrid:
        return cls.from_dict(json.loads(text))

    def same_as(self, other: CoaddGrid, tol_px: float = 1e-6) -> bool:
        """True when both grids have the same shape and pixel-to-sky mapping."""
        if tuple(self.shape) != tuple(other.shape):
            return False
        a, b = self.to_dict(), other.to_dict()
        return (a["ctype"] == b["ctype"]
                and np.allclose(a["crpix"], b["crpix"], atol=tol_px, rtol=0)
                and np.allclose(a["crval"], b["crval"], rtol=0, atol=1e-10)
                and np.allclose(a["cd"], b["cd"], rtol=1e-10, atol=0))


def grown_grid(grid: CoaddGrid, frame_wcs: WCS, frame_shape: tuple[int, int],
               margin_arcsec: float, max_side: int) -> tuple[CoaddGrid, int, int] | None:
    """A larger grid that also covers a frame, or None when the grid already covers it.

    The grid keeps its tangent point and pixel scale and only gains whole pixels on its
    sides, so every existing pixel keeps its sky position: pixel (y, x) of the old grid
    is pixel (y + dy, x + dx) of the new one. Returns (new grid, dy, dx); raises
    ValueError when the result would exceed ``max_side`` pixels (a frame of another
    field).
    """
    ex, ey = _frame_edges(tuple(frame_shape))
    ra, dec = frame_wcs.all_pix2world(ex, ey, 0)
    gx, gy = grid.wcs.all_world2pix(ra, dec, 0)
    ny, nx = grid.shape
    if gx.min() >= -0.5 and gy.min() >= -0.5 and gx.max() <= nx - 0.5 and gy.max() <= ny - 0.5:
        return None
    margin = margin_arcsec / grid.pixel_scale_arcsec
    dx = max(0, math.ceil(-gx.min() + margin)) if gx.min() < -0.5 else 0
    dy = max(0, math.ceil(-gy.min() + margin)) if gy.min() < -0.5 else 0
    new_nx = max(nx + dx, math.ceil(gx.max() + dx + margin) + 1 if gx.max() > nx - 0.5 else 0)
    new_ny = max(ny + dy, math.ceil(gy.max() + dy + margin) + 1 if gy.max() > ny - 0.5 else 0)
    if max(new_nx, new_ny) > max_side:
        raise ValueError(f"covering the frame would make the coadd {new_ny}x{new_nx} pixels "
                         f"(limit {max_side}): another field")
    w = grid.wcs.wcs
    wcs = _tan_wcs(w.crval, (w.crpix[0] + dx, w.crpix[1] + dy), grid.wcs.pixel_scale_matrix,
                   ctype=list(w.ctype), radesys=w.radesys or "ICRS")
    return CoaddGrid(wcs=wcs, shape=(new_ny, new_nx)), dy, dx


def _tan_wcs(crval, crpix, cd, *, ctype=None, radesys="ICRS") -> WCS:
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = list(ctype or ["RA---TAN", "DEC--TAN"])
    wcs.wcs.crval = [float(crval[0]), float(crval[1])]
    wcs.wcs.crpix = [float(crpix[0]), float(crpix[1])]
    wcs.wcs.cd = np.asarray(cd, dtype=float)
    wcs.wcs.radesys = radesys
    wcs.wcs.set()
    return wcs


def _frame_edges(shape: tuple[int, int], step: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Points along the outer edges of an image (0-based pixel coordinates x, y)."""
    ny, nx = shape
    xs = np.append(np.arange(-0.5, nx - 0.5, step), nx - 0.5)
    ys = np.append(np.arange(-0.5, ny - 0.5, step), ny - 0.5)
    x = np.concatenate([xs, xs, np.full(ys.size, -0.5), np.full(ys.size, nx - 0.5)])
    y = np.concatenate([np.full(xs.size, -0.5), np.full(xs.size, ny - 0.5), ys, ys])
    return x, y


def make_grid(ra_deg: float, dec_deg: float, pixel_scale_arcsec: float | None,
              frame_shape: tuple[int, int], frame_wcs: WCS, margin_arcsec: float) -> CoaddGrid:
    """The coadd grid of a (target, filter), chosen from its first good frame.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Target position (deg, ICRS); the grid's tangent point and centre pixel.
    pixel_scale_arcsec : float or None
        Output pixel side (arcsec); None or 0 takes the frame's own mean scale.
    frame_shape : (int, int)
        Shape of the frame ``(ny, nx)`` (pixels).
    frame_wcs : astropy.wcs.WCS
        The frame's solved WCS (TAN-SIP allowed).
    margin_arcsec : float
        Extra room on each side of the frame's footprint for the dithers of
        later frames (arcsec).

    Returns
    -------
    CoaddGrid
        North up, east left, odd sizes with the target at the centre pixel;
        large enough for the footprint (measured in all directions from the
        target) plus ``margin_arcsec`` on each side.
    """
    from astropy.wcs.utils import proj_plane_pixel_area

    if not pixel_scale_arcsec:
        pixel_scale_arcsec = math.sqrt(proj_plane_pixel_area(frame_wcs.celestial)) * 3600.0
    if not (pixel_scale_arcsec > 0 and np.isfinite(pixel_scale_arcsec)):
        raise ValueError(f"make_grid: pixel scale must be > 0 arcsec, got {pixel_scale_arcsec}")
    scale = pixel_scale_arcsec / 3600.0
    probe = _tan_wcs((ra_deg, dec_deg), (0.0, 0.0), [[-scale, 0.0], [0.0, scale]])
    ex, ey = _frame_edges(tuple(frame_shape))
    ra, dec = frame_wcs.all_pix2world(ex, ey, 0)
    gx, gy = probe.all_world2pix(ra, dec, 0)
    # probe's CRPIX is (0, 0) 1-based, i.e. the target is at 0-based (-1, -1)
    margin_px = margin_arcsec / pixel_scale_arcsec
    half_x = float(np.max(np.abs(gx + 1.0))) + margin_px
    half_y = float(np.max(np.abs(gy + 1.0))) + margin_px
    nx = 2 * math.ceil(half_x) + 1
    ny = 2 * math.ceil(half_y) + 1
    wcs = _tan_wcs((ra_deg, dec_deg), ((nx + 1) / 2.0, (ny + 1) / 2.0),
                   [[-scale, 0.0], [0.0, scale]])
    return CoaddGrid(wcs=wcs, shape=(ny, nx))


def coadd_filename(target: str, filter_name: str) -> str:
    """``coadd_<TARGET>_<FILTER>.fits`` with both names made safe for file systems."""
    from photowatch.core.classify import safe_name

    return f"coadd_{safe_name(target)}_{safe_name(filter_name)}.fits"


# --------------------------------------------------------------------------- mapping
def _nodes(lo: int, hi: int, step: int) -> np.ndarray:
    """Evenly spaced coarse nodes covering output pixels ``lo .. hi - 1`` (spacing <= step)."""
    last = max(hi - 1, lo + 1)
    n = max(2, math.ceil((last - lo) / step) + 1)
    return np.linspace(lo, last, n)


class _Mapping:
    """Grid pixel → input pixel mapping and pixel-area ratio over a bounding box.

    The exact mapping (grid TAN → sky → input TAN-SIP, inverted iteratively)
    is evaluated only at coarse nodes every ``step_px`` output pixels; a
    tensor-product cubic spline (not-a-knot) through the nodes gives every
    output pixel. The Jacobian determinant (input pixel area per output
    pixel) comes from the spline's derivatives at the nodes and is
    interpolated the same way. Only node-level coefficients are kept (kB); a
    row strip expands along x the few y coefficients it needs, then evaluates
    a 4-tap B-spline along y, without BLAS (threaded BLAS on small products
    is slow on a busy machine).
    """

    def __init__(self, wcs_in: WCS, grid: CoaddGrid, bbox: tuple[int, int, int, int],
                 step_px: int):
        from scipy.interpolate import make_interp_spline

        y0, y1, x0, x1 = bbox
        self.bbox = bbox
        yn = _nodes(y0, y1, step_px)
        xn = _nodes(x0, x1, step_px)
        gx, gy = np.meshgrid(xn, yn)
        ra, dec = grid.wcs.all_pix2world(gx, gy, 0)
        xi, yi = _world2pix(wcs_in, ra, dec)
        if not (np.all(np.isfinite(xi)) and np.all(np.isfinite(yi))):
            raise StageDegraded(f"the frame's WCS cannot be inverted over its footprint on the "
                                f"grid ({np.count_nonzero(~np.isfinite(xi))} of {xi.size} "
                                f"mapping nodes failed)")
        ky, kx = min(3, yn.size - 1), min(3, xn.size - 1)
        nodes = np.stack([yi, xi])  # (2, ny_nodes, nx_nodes)
        d_dx = make_interp_spline(xn, nodes, k=kx, axis=2).derivative()(xn)
        d_dy = make_interp_spline(yn, nodes, k=ky, axis=1).derivative()(yn)
        jac = np.abs(d_dx[1] * d_dy[0] - d_dy[1] * d_dx[0])
        # the tensor-product spline, kept at node level: solved along y, then the y
        # coefficients interpolated along x (a B-spline in x per y coefficient)
        self._ky = ky
        self._across = []
        for plane in (yi, xi, jac):
            along_y = make_interp_spline(yn, plane, k=ky, axis=0)  # c: (n_ycoef, nx_nodes)
            self._ty = along_y.t
            self._across.append(make_interp_spline(xn, along_y.c, k=kx, axis=1))
        self._xs = np.arange(x0, x1, dtype=float)
        self.node_x, self.node_y = xi, yi

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Input y, input x and area ratio for grid rows ``r0 .. r1 - 1`` (absolute).

        Three C-contiguous float64 arrays of shape ``(r1 - r0, x1 - x0)``. Only
        the few y coefficients these rows need are expanded along x.
        """
        from scipy.interpolate import BSpline

        k, t = self._ky, self._ty
        n_coef = t.size - k - 1

        def interval(y: float) -> int:
            return int(np.clip(np.searchsorted(t, y, side="right") - 1, k, n_coef - 1))

        j0, j1 = interval(r0) - k, interval(r1 - 1) + 1
        ys = np.arange(r0, r1, dtype=float)
        out = []
        for across in self._across:
            sub = BSpline(across.t, across.c[:, j0:j1], across.k)(self._xs)  # (nx, j1 - j0)
            strip = BSpline(t[j0:j1 + k + 1], np.ascontiguousarray(sub.T), k)
            out.append(strip(ys))
        return out[0], out[1], out[2]


def _world2pix(wcs_in: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``wcs_in.world_to_pixel`` with SIP, to a tight tolerance (0-based x, y)."""
    try:
        x, y = wcs_in.all_world2pix(ra, dec, 0, tolerance=_WORLD2PIX_TOL, maxiter=50,
                                    quiet=True)
    except Exception:  # e.g. NoConvergence raised despite quiet on divergent points
        x, y = wcs_in.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def frame_bbox(wcs_in: WCS, frame_shape: tuple[int, int],
               grid: CoaddGrid) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` on the grid of a frame's footprint (may be empty)."""
    ex, ey = _frame_edges(tuple(frame_shape))
    ra, dec = wcs_in.all_pix2world(ex, ey, 0)
    gx, gy = grid.wcs.all_world2pix(ra, dec, 0)
    ny, nx = grid.shape
    if not (np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))):
        return (0, 0, 0, 0)
    y0 = int(np.clip(math.floor(gy.min()), 0, ny))
    y1 = int(np.clip(math.ceil(gy.max()) + 1, 0, ny))
    x0 = int(np.clip(math.floor(gx.min()), 0, nx))
    x1 = int(np.clip(math.ceil(gx.max()) + 1, 0, nx))
    if y1 <= y0 or x1 <= x0:
        return (0, 0, 0, 0)
    return (y0, y1, x0, x1)


# --------------------------------------------------------------------------- resampling
@dataclass(frozen=True, eq=False)
class Resampled:
    """A frame resampled onto a coadd grid, within its bounding box.

    Attributes
    ----------
    bbox : (int, int, int, int)
        ``(y0, y1, x0, x1)``, half-open grid pixel ranges.
    data : numpy.ndarray
        float32, electrons per grid pixel (flux conserved); 0 where not good.
    var : numpy.ndarray or None
        float32, variance of each output pixel (electrons squared); 0 where not
        good; None when not asked for.
    good : numpy.ndarray
        bool, True where the pixel is covered by the frame and its
        interpolation footprint touches no masked input pixel.
    """

    bbox: tuple[int, int, int, int]
    data: np.ndarray
    var: np.ndarray | None
    good: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.bbox
        return slice(y0, y1), slice(x0, x1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.bbox[1] - self.bbox[0], self.bbox[3] - self.bbox[2])


#: border (input pixels) of the padded footprint map; outside the image counts as masked
_PAD = 2


def _bad_footprint(bad: np.ndarray, order: int) -> np.ndarray:
    """Padded map: ``out[i + _PAD, j + _PAD]`` is True when the interpolation window
    anchored at floor index (i, j) touches a masked pixel or leaves the image.

    Bilinear reads pixels ``i..i+1``; cubic ``i-1..i+2`` (per axis).
    """
    lo, hi = (0, 1) if order == 1 else (-1, 2)
    out = np.pad(bad, _PAD, mode="constant", constant_values=True)
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for off in range(lo, hi + 1):
            if off == 0:
                continue
            s_sl = [slice(None)] * 2
            d_sl = [slice(None)] * 2
            if off > 0:
                s_sl[axis], d_sl[axis] = slice(off, n), slice(0, n - off)
            else:
                s_sl[axis], d_sl[axis] = slice(0, n + off), slice(-off, n)
            out[tuple(d_sl)] |= src[tuple(s_sl)]
    return out


def _native_float(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f" or not a.dtype.isnative:
        a = a.astype(np.float32)
    return a


class _Source:
    """The input planes of one frame (or of a row range of it) ready for interpolation.

    ``row0`` is the frame row of the first row given (reads of a row range).
    """

    def __init__(self, sci, var, mask, order: int, row0: int = 0):
        sci = _native_float(sci)
        bad = np.asarray(mask) != 0
        nonfinite = ~np.isfinite(sci)
        if var is not None:
            var = _native_float(var)
            nonfinite |= ~np.isfinite(var)
        if nonfinite.any():
            bad = bad | nonfinite
        if order > 1:
            # the spline prefilter is global: masked and NaN values are replaced first
            from scipy import ndimage

            sci = ndimage.spline_filter(np.where(bad, np.float32(0), sci), order=order,
                                        output=np.float32, mode="mirror")
            if var is not None:
                var = ndimage.spline_filter(np.where(bad, np.float32(0), var), order=order,
                                            output=np.float32, mode="mirror")
        self.sci, self.var, self.order, self.row0 = sci, var, order, row0
        self.footprint = _bad_footprint(bad, order)

    def sample(self, yin: np.ndarray, xin: np.ndarray, jac: np.ndarray, data_out: np.ndarray,
               var_out: np.ndarray | None, good_out: np.ndarray) -> None:
        """Interpolate at frame coordinates ``yin, xin`` (absolute rows) into the outputs.

        ``jac`` is the pixel-area ratio; the three inputs may be overwritten.
        """
        from scipy import ndimage

        order = self.order
        coords = np.empty((2,) + yin.shape)
        np.subtract(yin, self.row0, out=coords[0])
        coords[1] = xin
        # the boundary mode only matters outside the image, where pixels are not good
        # anyway; cubic uses the prefilter's own mode
        mode = "constant" if order == 1 else "mirror"
        ndimage.map_coordinates(self.sci, coords, output=data_out, order=order, mode=mode,
                                cval=0.0, prefilter=False)
        if var_out is not None:
            ndimage.map_coordinates(self.var, coords, output=var_out, order=order, mode=mode,
                                    cval=0.0, prefilter=False)
        # floor indices into the padded footprint map (non-negative after the shift, so a
        # cast truncates like floor); out-of-image windows land on the masked border
        fny, fnx = self.footprint.shape
        yp, xp = coords[0], coords[1]
        yp += _PAD
        xp += _PAD
        np.clip(yp, 0, fny - 1, out=yp)
        np.clip(xp, 0, fnx - 1, out=xp)
        iy = yp.astype(np.intp)
        ix = xp.astype(np.intp)
        jac32 = jac.astype(np.float32)
        data_out *= jac32
        if var_out is not None:
            jac32 *= jac32
            if order == 1:
                # sum of squared bilinear weights: the variance of the interpolated value
                # for a locally constant input variance
                ty = (yp - iy).astype(np.float32)
                tx = (xp - ix).astype(np.float32)
                jac32 *= 1 - 2 * ty * (1 - ty)
                jac32 *= 1 - 2 * tx * (1 - tx)
            var_out *= jac32
        iy *= fnx
        iy += ix
        bad = self.footprint.ravel().take(iy)
        np.logical_not(bad, out=good_out)
        np.copyto(data_out, 0, where=bad)
        if var_out is not None:
            np.copyto(var_out, 0, where=bad)


def _check_interpolation(interpolation: str) -> int:
    try:
        return _ORDERS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_ORDERS)}, "
                         f"got {interpolation!r}") from None


def resample(sci: np.ndarray, var: np.ndarray | None, mask: np.ndarray, wcs_in: WCS,
             grid: CoaddGrid, *, step_px: int = 64, interpolation: str = "bilinear",
             workers: int = 2) -> Resampled:
    """Resample one frame onto a coadd grid, conserving flux.

    Surface brightness is interpolated at the input position of every output
    pixel centre and multiplied by the pixel-area ratio (input pixels per
    output pixel, from the local Jacobian of the mapping). The mapping uses
    the frame's full WCS (TAN-SIP included) evaluated exactly on a coarse grid
    every ``step_px`` output pixels and interpolated by a cubic spline (the
    mapping is smooth; the error is far below 1e-3 px for step 64).

    Parameters
    ----------
    sci : numpy.ndarray
        Frame data (electrons per input pixel), 2-D.
    var : numpy.ndarray or None
        Its variance (electrons squared); None skips the variance (the
        quick-look stack does not use it), and ``Resampled.var`` is None.
    mask : numpy.ndarray
        Mask bits; any non-zero bit makes a pixel unusable. Non-finite SCI or
        VAR values are treated as masked too.
    wcs_in : astropy.wcs.WCS
        The frame's WCS (0-based in code; SIP applied).
    grid : CoaddGrid
        The output grid.
    step_px : int
        Spacing of the exact mapping nodes (output pixels).
    interpolation : {'bilinear', 'cubic'}
        Kernel for data and variance.
    workers : int
        Threads over row strips (``map_coordinates`` releases the GIL).

    Returns
    -------
    Resampled
        The frame's bounding box on the grid, data, variance and ``good``.
        Variance: bilinear propagates the squared interpolation weights
        (exact for locally constant input variance; neighbouring output
        pixels are correlated); cubic interpolates the variance as it is.

    Raises
    ------
    StageDegraded
        The frame's footprint does not overlap the grid.

    Notes
    -----
    A pixel is ``good`` only if every input pixel of its interpolation window
    (2x2 bilinear, 4x4 cubic) is unmasked: masked pixels never contaminate.
    With 'cubic' the spline prefilter is global, so masked pixels are set to 0
    first and their ringing (factor 0.27 per pixel) can reach a few pixels
    beyond the window.
    """
    order = _check_interpolation(interpolation)
    sci = np.asarray(sci)
    if (sci.ndim != 2 or np.shape(mask) != sci.shape
            or (var is not None and np.shape(var) != sci.shape)):
        raise ValueError(f"resample: sci, var and mask must be 2-D of one shape, got "
                         f"{sci.shape}, {np.shape(var)}, {np.shape(mask)}")
    bbox = frame_bbox(wcs_in, sci.shape, grid)
    if bbox[1] <= bbox[0]:
        raise StageDegraded(f"frame footprint ({sci.shape[1]}x{sci.shape[0]} px) does not "
                            f"overlap the coadd grid ({grid.shape[1]}x{grid.shape[0]} px)")
    mapping = _Mapping(wcs_in, grid, bbox, step_px)
    source = _Source(sci, var, mask, order)
    y0, y1, x0, x1 = bbox
    data = np.empty((y1 - y0, x1 - x0), dtype=np.float32)
    varo = None if var is None else np.empty_like(data)
    good = np.empty(data.shape, dtype=bool)

    def strip(r0: int) -> None:
        r1 = min(r0 + _STRIP_ROWS, y1)
        sl = slice(r0 - y0, r1 - y0)
        source.sample(*mapping.rows(r0, r1), data[sl], None if varo is None else varo[sl],
                      good[sl])

    starts = range(y0, y1, _STRIP_ROWS)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(strip, starts))
    else:
        for r0 in starts:
            strip(r0)
    return Resampled(bbox=bbox, data=data, var=varo, good=good)


def resample_frame(frame: Frame, grid: CoaddGrid, **kwargs) -> Resampled:
    """:func:`resample` of a :class:`~photowatch.core.frame.Frame` with the WCS of its header."""
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = WCS(frame.header, naxis=2)
    return resample(frame.sci, frame.var, frame.mask, wcs, grid, **kwargs)


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

    def __init__(self, grid: CoaddGrid, backing: str | Path | None = None):
        self.grid = grid
        self.backing = Path(backing) if backing is not None else None
        shape = tuple(grid.shape)
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
    def load(cls, path: str | Path, backing: str | Path | None = None) -> Accumulator:
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
        acc = cls(grid, backing=backing)
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

    from photowatch import __version__
    from photowatch.io.products import set_key

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
    from photowatch.core.schema import annotate

    for hdu in hdus:
        annotate(hdu.header)
    return write_hdul(path, fits.HDUList(hdus), fsync=fsync)


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
    needs. Returns False when the member does not cover these rows."""
    y0, y1, x0, x1 = om.mapping.bbox
    a, b = max(r0, y0), min(r1, y1)
    if b <= a:
        return False
    yin, xin, jac = om.mapping.rows(a, b)
    # bilinear reads rows floor(y)..floor(y)+1; the cubic prefilter is global, so give it
    # enough rows that the slice edges do not matter (its influence falls by 0.27 per row)
    pad = 1 if order == 1 else 16
    ny = om.shape[0]
    lo = int(np.clip(math.floor(yin.min()) - pad, 0, ny))
    hi = int(np.clip(math.ceil(yin.max()) + pad + 1, 0, ny))
    if hi <= lo:
        return False
    err = _native_float(om.err[lo:hi, :])
    source = _Source(om.sci[lo:hi, :], err * err, om.mask[lo:hi, :], order, row0=lo)
    shape = (b - a, x1 - x0)
    d = np.empty(shape, dtype=np.float32)
    v = np.empty(shape, dtype=np.float32)
    g = np.empty(shape, dtype=bool)
    source.sample(yin, xin, jac, d, v, g)
    sl = (slice(a - r0, b - r0), slice(x0, x1))
    data[sl], var[sl], good[sl] = d, v, g
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
    from astropy.wcs import WCS

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
                wcs = WCS(hdr, naxis=2)
            shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
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
        scales = np.array([om.member.flxscale for om in opened], dtype=np.float32)
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
            sc = scales[keep_idx].reshape(-1, 1, 1)
            vals *= sc
            var *= sc * sc
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
    exp_o[o] = np.tensordot(exps, keep, axes=1)
    ncov_o[o] = keep.sum(axis=0)


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


__all__ = ["CoaddGrid", "make_grid", "grown_grid", "coadd_filename", "frame_bbox", "Resampled", "resample",
           "resample_frame", "Member", "member_weight", "Accumulator", "members_table",
           "write_coadd", "FinalMember", "final_members", "final_coadd", "COADD_EXTENSIONS"]
