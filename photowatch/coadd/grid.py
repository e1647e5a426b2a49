"""The coadd grid: a TAN projection fixed for a (target, filter) over a night.

:func:`make_grid` builds it from the first good frame; :func:`grown_grid` widens it
when a later frame falls off its edge. Conventions: see :mod:`photowatch.coadd.stack`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from photowatch.core.classify import safe_name
from photowatch.core.schema import header_wcs

if TYPE_CHECKING:
    from astropy.io import fits
    from astropy.wcs import WCS


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
        return cls(wcs=header_wcs(header), shape=(int(header["NAXIS2"]), int(header["NAXIS1"])))

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
    return f"coadd_{safe_name(target)}_{safe_name(filter_name)}.fits"
