"""The science of coadd catalogues: noise model, effective gain, merge across filters.

Pure functions on arrays and tables; the reading and writing of coadd files is
:mod:`photowatch.coadd.catalogue`, whose
:func:`~photowatch.coadd.catalogue.coadd_catalog` reads a coadd (``SCI``, ``WHT``,
``NCOV``, ``MEMBERS``; see :mod:`photowatch.coadd.stack`), builds its noise map and
runs the same source extraction as the reduced frames (:func:`photowatch.stages.sources.extract_sources`:
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
the file (:func:`photowatch.coadd.catalogue.write_catalog`) has them 1-based, as FITS,
SExtractor and DS9 count. ``ra, dec`` degrees (ICRS); fluxes in reference electrons;
``fwhm`` in pixels; ``mag`` NaN without a zero point, ``mag_inst`` always.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
from astropy.stats import mad_std

from photowatch.core.schema import COLUMNS

#: flag bit added to the :class:`photowatch.stages.sources.SourceFlag` bits: the source's
#: centre has less than half the coadd's typical weight (fewer frames, or worse ones)
LOWWEIGHT = 256
#: flag bit: the source's centre has less exposure than its surroundings (its core was
#: masked, e.g. saturated, in some frames): its coadd flux is not trustworthy
PARTIAL = 512
#: columns of a coadd catalogue, in order: those of every photowatch catalogue
CATALOG_COLUMNS = tuple(COLUMNS)
_BLOCK = 4


def _robust_std(values: np.ndarray) -> float:
    """The MAD-based standard deviation after one 5-sigma clip (sources are a small
    minority)."""
    v = values[np.isfinite(values)]
    if v.size < 10:
        return float("nan")
    med = np.median(v)
    v = v[np.abs(v - med) < 5 * mad_std(v)]
    return float(mad_std(v))


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


__all__ = ["merge_bands", "noise_model", "effective_gain", "band_key", "LOWWEIGHT", "PARTIAL",
           "CATALOG_COLUMNS"]
