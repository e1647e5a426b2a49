"""Catalogues of coadd files: read a coadd, detect and measure its sources, write them.

:func:`coadd_catalog` reads a coadd (``SCI``, ``WHT``, ``NCOV``, ``MEMBERS``; see
:mod:`photowatch.coadd.stack`) and measures it with the frames' source extraction
and the noise model of :mod:`photowatch.stages.photometry` (which documents the
science); :func:`write_catalog` writes the ``.cat.fits`` and its DS9 region file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photowatch.core.config import Sources
from photowatch.core.frame import Frame, Mask
from photowatch.core.schema import annotate, catalog_hdu, set_key
from photowatch.io.fits import write_hdul
from photowatch.io.products import write_regions
from photowatch.stages.photometry import (
    CATALOG_COLUMNS,
    LOWWEIGHT,
    PARTIAL,
    effective_gain,
    noise_model,
)
from photowatch.stages.sources import extract_sources


def catalog_path(coadd_path: str | Path) -> Path:
    """``coadd_<TARGET>_<FILTER>.fits`` → ``coadd_<TARGET>_<FILTER>.cat.fits``."""
    p = Path(coadd_path)
    name = p.name[:-5] if p.name.endswith(".fits") else p.name
    return p.with_name(name + ".cat.fits")


def coadd_catalog(coadd_path: str | Path, *, magzp: float | None = None,
                  detect_sigma: float = 3.0, max_sources: int = 200_000, settings=None):
    """Detect and measure the sources of a coadd; calibrated magnitudes.

    Parameters
    ----------
    coadd_path : str or Path
        A coadd written by :mod:`photowatch.coadd.stack` (quick-look or final).
    magzp : float or None
        Zero point (mag = MAGZP − 2.5 log10(flux in SCI units)); None takes
        the file's MAGZP. Without either, ``mag`` is NaN.
    detect_sigma : float
        Detection threshold in units of the per-pixel noise.
    max_sources : int
        At most this many sources (the brightest): the single-frame cap of
        ``settings`` is far too low for a deep stack.
    settings : photowatch.core.config.Sources, optional
        Extraction settings (minimum area, aperture size, aperture-correction
        radius); ``detect_sigma`` and ``max_sources`` replace its own.

    Returns
    -------
    astropy.table.Table
        Columns :data:`CATALOG_COLUMNS`: ``ra, dec`` (deg), ``mag, magerr``
        (calibrated), ``flux, fluxerr`` (aperture-corrected, reference
        electrons), ``fwhm`` (px), ``flags`` (:class:`photowatch.stages.sources.SourceFlag`
        bits plus :data:`LOWWEIGHT` and :data:`PARTIAL`), ``x, y`` (0-based grid pixels), ``snr``,
        ``ellipticity``, ``stellar``, ``mag_inst`` ... (the frames' schema). ``meta``: MAGZP, APRAD, APCOR, APCORERR,
        APCORN, FWHMPIX, FWHM (arcsec), NSOURCES, SKYNOISE (pixel rms at the
        median weight), NOISECOR, GAINEFF, STACKTYP, NCOMBINE, COADD.

    Raises
    ------
    ValueError
        The file has no SCI or WHT extension, or no covered pixel.
    """
    path = Path(coadd_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as hdul:
            names = {h.name for h in hdul}
            if not {"SCI", "WHT"} <= names:
                raise ValueError(f"{path}: not a coadd (needs SCI and WHT extensions)")
            sci = np.asarray(hdul["SCI"].data, dtype=np.float32)
            wht = np.asarray(hdul["WHT"].data, dtype=np.float32)
            header = hdul["SCI"].header.copy()
            exp = np.asarray(hdul["EXP"].data, dtype=np.float32) if "EXP" in names else None
            primary = hdul[0].header.copy()
            members = Table.read(hdul["MEMBERS"]) if "MEMBERS" in names else None
            wcs = WCS(header, naxis=2)
    if magzp is None:
        magzp = header.get("MAGZP", primary.get("MAGZP"))
    valid = np.isfinite(sci) & (wht > 0)
    if not valid.any():
        raise ValueError(f"{path}: no covered pixel (WHT is 0 everywhere)")
    s, noise_cor = noise_model(sci, wht)
    if not np.isfinite(s):
        raise ValueError(f"{path}: cannot measure the sky noise ({int(valid.sum())} covered "
                         f"pixels)")
    gain = effective_gain(members)
    data = np.where(valid, sci, np.float32(0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(valid, s * s / wht + np.maximum(data, 0) / gain, 0).astype(np.float32)
    var[~valid] = np.float32(np.median(var[valid]))
    mask = np.where(valid, 0, int(Mask.NODATA)).astype(np.uint16)
    if settings is None:
        settings = Sources()
    settings = settings.model_copy(update={"detect_sigma": float(detect_sigma),
                                           "max_sources": int(max_sources)})
    sources = extract_sources(Frame(sci=data, var=var, mask=mask, header=header),
                              settings=settings, pixel_scale_arcsec=_scale_arcsec(wcs))
    src = sources.table
    n = len(src)
    ra, dec = (wcs.all_pix2world(np.asarray(src["x"]), np.asarray(src["y"]), 0)
               if n else (np.zeros(0), np.zeros(0)))
    flux = np.asarray(src["flux"], dtype=float)
    fluxerr = np.asarray(src["fluxerr"], dtype=float) * noise_cor
    zp = float(magzp) if magzp is not None else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        good_flux = flux > 0
        mag = np.where(good_flux, zp - 2.5 * np.log10(np.where(good_flux, flux, 1)), np.nan)
        magerr = np.where(good_flux, 2.5 / math.log(10) * fluxerr / flux, np.nan)
        snr = np.where(fluxerr > 0, flux / fluxerr, 0)
    flags = np.asarray(src["flags"], dtype=np.int16)
    med_wht = float(np.median(wht[valid]))
    if n:
        ix = np.clip(np.rint(src["x"]).astype(int), 0, sci.shape[1] - 1)
        iy = np.clip(np.rint(src["y"]).astype(int), 0, sci.shape[0] - 1)
        flags = flags | np.where(wht[iy, ix] < 0.5 * med_wht, LOWWEIGHT, 0).astype(np.int16)
        if exp is not None:
            # the core (3x3) lost on average a tenth of the exposure of its surroundings:
            # masked (saturated) in some frames. A single cleaned cosmic-ray pixel does not
            # count; an edge of a frame's footprint does, rightly.
            short = _short_exposure(exp, iy, ix)
            flags = flags | np.where(short, PARTIAL, 0).astype(np.int16)
    # the frames' catalogue schema (photowatch.core.schema.COLUMNS), in the coadd's units
    table = src.copy()
    table["ra"] = np.asarray(ra, dtype=float)
    table["dec"] = np.asarray(dec, dtype=float)
    table["fluxerr"] = fluxerr
    table["fluxerr_aper"] = np.asarray(src["fluxerr_aper"], dtype=float) * noise_cor
    table["mag"] = mag
    table["magerr"] = magerr
    with np.errstate(divide="ignore", invalid="ignore"):
        table["mag_inst"] = np.where(good_flux, -2.5 * np.log10(np.where(good_flux, flux, 1)),
                                     np.nan)
    table["snr"] = np.asarray(snr, dtype=np.float32)
    table["flags"] = flags
    table = table[[c for c in CATALOG_COLUMNS if c in table.colnames]]
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("mag", "mag"), ("magerr", "mag"),
                       ("mag_inst", "mag"), ("fwhm", "pix"), ("x", "pix"), ("y", "pix")):
        table[name].unit = unit
    meta = {k: v for k, v in sources.meta.items()}
    med_noise = s / math.sqrt(med_wht)
    meta.update({"SKYNOISE": med_noise, "NOISECOR": noise_cor, "GAINEFF": gain,
                 "STACKTYP": primary.get("STACKTYP", header.get("STACKTYP", "")),
                 "NCOMBINE": primary.get("NCOMBINE", header.get("NCOMBINE", 0)),
                 "COADD": path.name})
    if "ABSCAL" in primary:
        meta["ABSCAL"] = bool(primary["ABSCAL"])
    if np.isfinite(zp):
        meta["MAGZP"] = zp
    table.meta.update(meta)
    return table


def _short_exposure(exp: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """At pixels ``(iy, ix)``: is the 3x3 mean of ``exp`` below 0.9 x its 9x9 maximum?

    ``ndimage.uniform_filter(exp, 3)`` and ``maximum_filter(exp, 9)`` (edges
    mirrored, their 'reflect' mode) evaluated at the given pixels only: the whole-image
    filters cost ~2 s at 4k for the ~10^4 sources of a coadd. The mean is summed
    directly rather than as ndimage's running sum, so it may differ in the last bit.
    """
    from scipy import ndimage

    if min(exp.shape) < 9:  # the mirrored window could need more than one reflection
        core = ndimage.uniform_filter(exp, size=3)[iy, ix]
        around = ndimage.maximum_filter(exp, size=9)[iy, ix]
        return core < 0.9 * around

    def mirrored(i, n):
        i = np.where(i < 0, -i - 1, i)
        return np.where(i >= n, 2 * n - i - 1, i)

    off = np.arange(-4, 5)
    rows = mirrored(np.asarray(iy)[:, None] + off, exp.shape[0])
    cols = mirrored(np.asarray(ix)[:, None] + off, exp.shape[1])
    win = exp[rows[:, :, None], cols[:, None, :]]  # (sources, 9, 9)
    core = (win[:, 3:6, 3:6].astype(np.float64).sum(axis=(1, 2)) / 9.0).astype(exp.dtype)
    return core < 0.9 * win.max(axis=(1, 2))


def _scale_arcsec(wcs) -> float:
    return float(math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def write_catalog(table, path: str | Path, *, fsync: bool = True) -> Path:
    """Write a catalogue atomically: primary header (the table's meta) + ``CAT`` table in
    the schema of :mod:`photowatch.core.schema` (x, y 1-based); a DS9 region file beside it
    (``.reg``; sky circles when the coadd is absolutely calibrated)."""
    primary = fits.Header()
    for key, value in table.meta.items():
        if isinstance(value, bool | int | float | str | np.generic) and len(key) <= 8:
            set_key(primary, key, value)
    annotate(primary)
    cat = catalog_hdu(table, "CAT")
    path = write_hdul(path, fits.HDUList([fits.PrimaryHDU(header=primary), cat]), fsync=fsync)
    name = path.name[:-len(".cat.fits")] if path.name.endswith(".cat.fits") else path.stem
    write_regions(path.with_name(name + ".reg"), table,
                  trusted=bool(table.meta.get("ABSCAL", "MAGZP" in table.meta)))
    return path


__all__ = ["catalog_path", "coadd_catalog", "write_catalog"]
