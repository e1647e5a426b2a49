"""Catalogues of coadds with calibrated magnitudes, and their merge across filters.

:func:`coadd_catalog` reads a coadd (``SCI``, ``WHT``, ``NCOV``, ``MEMBERS``;
see :mod:`photowatch.coadd.stack`), builds its noise map and runs the same source
extraction as the reduced frames (:func:`photowatch.stages.sources.extract_sources`:
sep detection, windowed centroids, FWHM, aperture photometry with an aperture
correction from bright isolated stars). Magnitudes are calibrated with the
coadd's zero point: ``mag = MAGZP - 2.5 log10(flux)``.

Noise model of a coadd pixel (reference electrons):

- sky: ``var = s**2 / WHT`` where ``s`` is the coadd's own measured noise
  (robust rms of ``SCI * sqrt(WHT)``; 1 in theory, less after resampling,
  which correlates neighbouring pixels);
- source: Poisson noise with the coadd's effective gain
  ``(sum w)**2 / sum(w**2 * FLXSCALE)`` over the members (1 for one frame at
  FLXSCALE 1);
- aperture errors are multiplied by the measured noise-correlation factor
  ``NOISECOR`` (rms of 4x4 block sums over 4 times the pixel rms), because
  resampling moves noise between neighbouring pixels.

Conventions: the catalogue has the columns of every photowatch catalogue
(:data:`photowatch.core.schema.COLUMNS`). In memory ``x, y`` are 0-based grid pixels;
the file (:func:`write_catalog`) has them 1-based, as FITS, SExtractor and DS9
count. ``ra, dec`` degrees (ICRS); fluxes in reference electrons; ``fwhm`` in
pixels; ``mag`` NaN without a zero point, ``mag_inst`` always.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from photowatch.core.frame import Frame, Mask
from photowatch.core.schema import COLUMNS
from photowatch.io.fits import write_hdul

#: flag bit added to the :class:`photowatch.stages.sources.SourceFlag` bits: the source's
#: centre has less than half the coadd's typical weight (fewer frames, or worse ones)
LOWWEIGHT = 256
#: flag bit: the source's centre has less exposure than its surroundings (its core was
#: masked, e.g. saturated, in some frames): its coadd flux is not trustworthy
PARTIAL = 512
#: columns of a coadd catalogue, in order: those of every photowatch catalogue
CATALOG_COLUMNS = tuple(COLUMNS)
_BLOCK = 4


def catalog_path(coadd_path: str | Path) -> Path:
    """``coadd_<TARGET>_<FILTER>.fits`` → ``coadd_<TARGET>_<FILTER>.cat.fits``."""
    p = Path(coadd_path)
    name = p.name[:-5] if p.name.endswith(".fits") else p.name
    return p.with_name(name + ".cat.fits")


def _robust_std(values: np.ndarray) -> float:
    """1.4826 MAD after one 5-sigma clip (sources are a small minority)."""
    v = values[np.isfinite(values)]
    if v.size < 10:
        return float("nan")
    med = np.median(v)
    s = 1.4826 * np.median(np.abs(v - med))
    v = v[np.abs(v - med) < 5 * s]
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


def noise_model(sci: np.ndarray, wht: np.ndarray) -> tuple[float, float]:
    """The coadd's pixel noise scale ``s`` (var = s**2 / WHT) and correlation factor.

    Returns
    -------
    s : float
        Robust rms of ``SCI * sqrt(WHT)`` over the covered pixels.
    noise_cor : float
        rms of 4x4 block sums of ``SCI * sqrt(WHT)`` (blocks fully covered,
        without sources) divided by ``4 s``: 1 for independent pixels, more
        when resampling has correlated neighbours. Never below 1.
    """
    valid = np.isfinite(sci) & (wht > 0)
    z = np.where(valid, sci * np.sqrt(np.where(valid, wht, 0)), np.nan)
    step = max(1, int(math.sqrt(valid.sum() / 2e6)))  # ~2 million samples are plenty
    s = _robust_std(z[::step, ::step])
    if not np.isfinite(s) or s <= 0:
        return float("nan"), 1.0
    ny, nx = (n // _BLOCK * _BLOCK for n in z.shape)
    blocks = z[:ny, :nx].reshape(ny // _BLOCK, _BLOCK, nx // _BLOCK, _BLOCK)
    quiet = np.all(np.abs(blocks) < 4 * s, axis=(1, 3))  # fully covered, no source pixel
    sums = blocks.sum(axis=(1, 3))[quiet]
    if sums.size < 50:
        return s, 1.0
    # the 4-sigma cut trims the block sums' tails a little; the MAD is robust to it
    cor = _robust_std(sums) / (_BLOCK * s)
    return s, float(max(cor, 1.0)) if np.isfinite(cor) else 1.0


def effective_gain(members) -> float:
    """``(sum w)**2 / sum(w**2 * flxscale)`` from a MEMBERS table (1.0 without one)."""
    if members is None or len(members) == 0:
        return 1.0
    w = np.asarray(members["weight"], dtype=float)
    f = np.asarray(members["flxscale"], dtype=float)
    denom = float(np.sum(w * w * f))
    return float(np.sum(w) ** 2 / denom) if denom > 0 else 1.0


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
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    from photowatch.core.config import Sources
    from photowatch.stages.sources import extract_sources

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
    if n:
        med_wht = float(np.median(wht[valid]))
        ix = np.clip(np.rint(src["x"]).astype(int), 0, sci.shape[1] - 1)
        iy = np.clip(np.rint(src["y"]).astype(int), 0, sci.shape[0] - 1)
        flags = flags | np.where(wht[iy, ix] < 0.5 * med_wht, LOWWEIGHT, 0).astype(np.int16)
        if exp is not None:
            from scipy import ndimage

            # the core (3x3) lost on average a tenth of the exposure of its surroundings:
            # masked (saturated) in some frames. A single cleaned cosmic-ray pixel does not
            # count; an edge of a frame's footprint does, rightly.
            core = ndimage.uniform_filter(exp, size=3)
            around = ndimage.maximum_filter(exp, size=9)
            short = core[iy, ix] < 0.9 * around[iy, ix]
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
    med_noise = s / math.sqrt(float(np.median(wht[valid])))
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


def _scale_arcsec(wcs) -> float:
    return float(math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def write_catalog(table, path: str | Path, *, fsync: bool = True) -> Path:
    """Write a catalogue atomically: primary header (the table's meta) + ``CAT`` table in
    the schema of :mod:`photowatch.core.schema` (x, y 1-based); a DS9 region file beside it
    (``.reg``; sky circles when the coadd is absolutely calibrated)."""
    from astropy.io import fits

    from photowatch.core.schema import annotate, catalog_hdu
    from photowatch.io.products import set_key, write_regions

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


def band_key(filter_name: str) -> str:
    """A filter name usable in a column name: ``SDSS-R`` → ``SDSS_R``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", filter_name).strip("_") or "X"


def merge_bands(tables: Mapping[str, object], *, radius_arcsec: float = 1.0):
    """Merge per-filter catalogues of one target into one table matched by position.

    Parameters
    ----------
    tables : mapping of filter name → Table
        Catalogues from :func:`coadd_catalog` (columns ``ra, dec, mag, magerr,
        flags``), in the order the bands should appear.
    radius_arcsec : float
        Match radius (arcsec). Each source matches at most one source of the
        merged list (the nearest; the others become new rows).

    Returns
    -------
    astropy.table.Table
        ``ra, dec`` (deg; the position in the first band that detected the
        source), ``nbands`` and per band ``mag_<F>, magerr_<F>, flags_<F>``
        (``<F>`` from :func:`band_key`; NaN and -1 where not detected).
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    ra = np.zeros(0)
    dec = np.zeros(0)
    per_band: dict[str, np.ndarray] = {}  # band -> row index in its table, per merged row
    for band, table in tables.items():
        t_ra = np.asarray(table["ra"], dtype=float)
        t_dec = np.asarray(table["dec"], dtype=float)
        index = np.full(ra.size, -1, dtype=int)
        new = np.ones(t_ra.size, dtype=bool)
        if ra.size and t_ra.size:
            merged = SkyCoord(ra * u.deg, dec * u.deg)
            idx, sep2d, _ = SkyCoord(t_ra * u.deg, t_dec * u.deg).match_to_catalog_sky(merged)
            dist = sep2d.arcsec
            order = np.argsort(dist)  # nearest first: each merged row takes one source
            for j in order:
                if dist[j] > radius_arcsec:
                    break
                if index[idx[j]] < 0:
                    index[idx[j]] = j
                    new[j] = False
        added = np.flatnonzero(new)
        ra = np.concatenate([ra, t_ra[added]])
        dec = np.concatenate([dec, t_dec[added]])
        for other in per_band:
            per_band[other] = np.concatenate([per_band[other], np.full(added.size, -1)])
        per_band[band] = np.concatenate([index, added])
    out = Table()
    out["ra"] = ra
    out["dec"] = dec
    out["ra"].unit = "deg"
    out["dec"].unit = "deg"
    out["nbands"] = np.sum([idx >= 0 for idx in per_band.values()], axis=0).astype(np.int16) \
        if per_band else np.zeros(0, np.int16)
    for band, idx in per_band.items():
        table = tables[band]
        key = band_key(band)
        has = idx >= 0
        safe = np.where(has, idx, 0)
        for col, fill, dtype in (("mag", np.nan, float), ("magerr", np.nan, float),
                                 ("flags", -1, np.int16)):
            if col in table.colnames and len(table):
                values = np.asarray(table[col])[safe]
                out[f"{col}_{key}"] = np.where(has, values, fill).astype(dtype)
            else:
                out[f"{col}_{key}"] = np.full(ra.size, fill, dtype=dtype)
        out[f"mag_{key}"].unit = "mag"
        out[f"magerr_{key}"].unit = "mag"
    out.meta["BANDS"] = ",".join(band_key(b) for b in tables)
    out.meta["MATCHRAD"] = float(radius_arcsec)
    return out


__all__ = ["coadd_catalog", "write_catalog", "merge_bands", "catalog_path", "noise_model",
           "effective_gain", "band_key", "LOWWEIGHT", "PARTIAL", "CATALOG_COLUMNS"]
