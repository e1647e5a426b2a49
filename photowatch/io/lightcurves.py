"""Light-curve files: ``OUT/lightcurves/<night>/<target>.ecsv`` (issue 21).

One row per forced measurement of the target (:mod:`photowatch.stages.forced`): a
reduced frame (``kind = frame``, keyed by the frame's name) or a quick-look coadd
(``kind = coadd``, keyed by ``coadd:<filter>``, its time span in mjd_start..mjd_end).
The file is rewritten whole from the store (the one source of truth) after each
measurement, atomically (temporary file, rename): a reader never sees half a file, and
a re-reduced frame's point replaces the old one.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

#: columns of the file, in order: (name, unit, description)
COLUMNS = (
    ("key", "", "frame name, or coadd:<filter> for the quick-look coadd"),
    ("kind", "", "frame | coadd"),
    ("filter", "", "filter"),
    ("mjd", "d", "mid-exposure MJD (coadd: middle of its span)"),
    ("mjd_start", "d", "start of the exposure (coadd: of the first member)"),
    ("mjd_end", "d", "end of the exposure (coadd: of the last member)"),
    ("exptime", "s", "exposure time (coadd: total)"),
    ("flux", "electron", "aperture-corrected flux at the position (SCI units)"),
    ("fluxerr", "electron", "1-sigma error of flux"),
    ("snr", "", "flux / fluxerr"),
    ("mag", "mag", "calibrated magnitude when detected (S/N >= nsigma), else NaN"),
    ("magerr", "mag", "1-sigma error of mag (zero-point error included)"),
    ("limmag", "mag", "nsigma detection limit at the position (given when calibrated)"),
    ("uplim", "mag", "not detected: the source is fainter than this (max(flux,0) + nsigma err)"),
    ("detected", "", "S/N >= nsigma"),
    ("flags", "", "1 off frame, 2 masked pixel in the aperture, 4 edge, 8 no WCS, "
                  "16 no local background, 32 cosmic-ray-cleaned pixels in the core"),
    ("ra", "deg", "position measured at"),
    ("dec", "deg", "position measured at"),
    ("x", "pix", "0-based pixel x of the position"),
    ("y", "pix", "0-based pixel y of the position"),
    ("product", "", "reduced frame or coadd file"),
)


def safe_name(target: str) -> str:
    """A target's name as a file name (anything but letters, digits, ._+- becomes _)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", target) or "target"


def lightcurve_path(out: str | Path, night: str, target: str) -> Path:
    return Path(out) / "lightcurves" / night / f"{safe_name(target)}.ecsv"


def to_table(points: list[dict], *, target: str = "", night: str = ""):
    """The store's forced rows as an astropy Table with the file's columns and units."""
    from astropy.table import Table

    table = Table()
    for name, unit, desc in COLUMNS:
        values = [p.get(name) for p in points]
        if name in ("key", "kind", "filter", "product"):
            col = np.array(["" if v is None else str(v) for v in values], dtype=str)
        elif name == "detected":
            col = np.array([bool(v) for v in values], dtype=bool)
        elif name == "flags":
            col = np.array([int(v or 0) for v in values], dtype=np.int16)
        else:
            col = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        table[name] = col
        if unit:
            table[name].unit = unit
        table[name].description = desc
    table.meta.update({"target": target, "night": night,
                       "comment": ["photowatch forced photometry (issue 21)"]})
    return table


def write_lightcurve(out: str | Path, night: str, target: str, points: list[dict]) -> Path:
    """Write the target's light curve atomically; returns the path."""
    from photowatch.io.fits import atomic_write

    path = lightcurve_path(out, night, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(points, target=target, night=night)
    if len(table):
        table.meta["ra"] = float(points[-1].get("ra") or np.nan)
        table.meta["dec"] = float(points[-1].get("dec") or np.nan)
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    data = buf.getvalue().encode()
    atomic_write(path, lambda fh: fh.write(data), fsync=False)
    return path


def read_lightcurve(path: str | Path):
    from astropy.table import Table

    return Table.read(path, format="ascii.ecsv")
