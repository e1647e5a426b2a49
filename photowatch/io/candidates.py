"""Candidate files: ``OUT/candidates/<night>/candidates.ecsv`` and PNG cutouts, written atomically.

The table holds one row per detection (the store's ``candidates`` rows: frame,
time, position, magnitude, significance, kind new / varying, the stationary
object or moving track it belongs to). Cutouts are square PNGs centred on the
candidate, of the frame (``cutouts/<frame>_<id>.png``) and of the reference
(``cutouts/<frame>_<id>_ref.png``): the reference catalogue's stars it was
compared with, drawn as discs (area by flux) on the frame's pixels. Row 0 is at the bottom (as the
quick-look PNGs).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from photowatch.io.fits import write_bytes

#: columns of candidates.ecsv, in order (a subset of the store's candidates table)
TABLE_COLUMNS = ("id", "frame", "filter", "target", "obs_mjd", "ra", "dec", "x", "y", "mag",
                 "magerr", "snr", "significance", "kind", "ref_mag", "delta_mag", "limmag",
                 "object_id", "moving", "rate_ra", "rate_dec", "cutout", "ref_cutout")


def candidates_dir(out: str | Path, night: str) -> Path:
    return Path(out) / "candidates" / night


def write_table(out: str | Path, night: str, rows: list) -> Path:
    """All the night's candidates (store rows or dicts) as ECSV, atomically."""
    from astropy.table import Table

    data = {c: [(dict(r).get(c)) for r in rows] for c in TABLE_COLUMNS}
    table = Table()
    for c in TABLE_COLUMNS:
        values = data[c]
        if c in ("frame", "filter", "target", "kind", "cutout", "ref_cutout"):
            table[c] = np.array(["" if v is None else str(v) for v in values], dtype=str) \
                if values else np.array([], dtype="U1")
        elif c in ("id", "object_id", "moving"):
            table[c] = np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)
        else:
            table[c] = np.array([np.nan if v is None else float(v) for v in values], float)
    table.meta["comment"] = ["photowatch candidates: new, varying and moving sources",
                             "kind new|varying; moving=1: on a linked track (object_id is "
                             "the track); rates arcsec/min (east, north)"]
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    return write_bytes(candidates_dir(out, night) / "candidates.ecsv", buf.getvalue().encode(),
                       fsync=False)


def write_reference(path: str | Path, table) -> Path:
    """A frozen reference (the night's first coadd's sources), ECSV, atomically."""
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    return write_bytes(path, buf.getvalue().encode(), fsync=False)


def cutout(image: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """A ``size`` x ``size`` float32 stamp centred on (x, y) (0-based); NaN off the image."""
    half = size // 2
    cx, cy = int(round(x)), int(round(y))
    out = np.full((size, size), np.nan, np.float32)
    ny, nx = image.shape
    x0, y0 = cx - half, cy - half
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, nx), min(y0 + size, ny)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya:yb, xa:xb]
    return out


def _stamp_png(stamp: np.ndarray, mask: np.ndarray | None, path: Path, zoom: int = 3) -> Path:
    from photowatch.io.previews import preview

    rgb = preview(stamp, mask=mask, max_size=max(stamp.shape))
    rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    # a cross-hair gap around the centre, so the eye finds the candidate
    c = rgb.shape[0] // 2
    for d in range(3 * zoom, 6 * zoom):
        for yy, xx in ((c, c + d), (c, c - d), (c + d, c), (c - d, c)):
            rgb[yy, xx] = (255, 64, 64)
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb, format="png", origin="lower", pil_kwargs={"compress_level": 1})
    return write_bytes(path, buf.getvalue(), fsync=False)


def save_cutout(image: np.ndarray, mask: np.ndarray | None, x: float, y: float, size: int,
                path: str | Path) -> Path:
    """PNG cutout of ``image`` around (x, y), masked pixels in the no-data colour."""
    stamp = cutout(image, x, y, size)
    m = cutout(mask.astype(np.float32), x, y, size) if mask is not None else None
    m = None if m is None else ~(np.nan_to_num(m, nan=8.0) == 0)
    return _stamp_png(stamp, m, Path(path))


def save_star_chart(x: np.ndarray, y: np.ndarray, flux: np.ndarray, size: int,
                    path: str | Path, zoom: int = 3) -> Path:
    """PNG of reference stars (pixel offsets from the centre) as discs: the reference when
    no image of it exists yet."""
    n = size * zoom
    rgb = np.zeros((n, n, 3), np.uint8)
    rgb[:] = (20, 20, 20)
    yy, xx = np.mgrid[0:n, 0:n]
    fmax = float(np.max(flux)) if len(flux) else 1.0
    for dx, dy, f in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)):
        cx, cy = (dx + size // 2 + 0.5) * zoom, (dy + size // 2 + 0.5) * zoom
        r = max(1.5, 1.2 * zoom * math.sqrt(max(f, 0) / fmax) * 3)
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (235, 235, 235)
    c = n // 2
    for d in range(3 * zoom, 6 * zoom):
        for a, b in ((c, c + d), (c, c - d), (c + d, c), (c - d, c)):
            rgb[a, b] = (255, 64, 64)
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb, format="png", origin="lower", pil_kwargs={"compress_level": 1})
    return write_bytes(Path(path), buf.getvalue(), fsync=False)


__all__ = ["candidates_dir", "write_table", "write_reference", "cutout", "save_cutout", "save_star_chart",
           "TABLE_COLUMNS"]
