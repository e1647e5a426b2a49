"""The reduced-frame product: a multi-extension FITS file that astropy and DS9 read.

``OUT/reduced/<night>/<standardised name>``::

    PRIMARY  no data; the original raw header (minus sections that no longer
             apply) plus photowatch's keywords
    SCI      float32, electrons (BUNIT, GAIN = 1, SATURATE in electrons), sky
             subtracted; the solved WCS (TAN-SIP) and the keywords below
    ERR      float32, 1-sigma uncertainty, electrons (UTYPE StdDevUncertainty)
    MASK     uint16, bits 1 bad, 2 saturated, 4 cosmic ray, 8 no data, 16 low flat
    CAT      sources in the schema of :mod:`photowatch.core.schema` (x, y 1-based as in
             FITS, SExtractor and DS9; ra, dec, flux, fluxerr, mag, magerr,
             mag_inst, fwhm, ellipticity, flags ...)

and beside it ``<name>.reg``, a DS9 region file of the catalogue.

Keywords: see :data:`photowatch.core.schema.KEYWORDS` (every card has a comment).
astropy reads the product as ``CCDData.read(path, hdu='SCI', hdu_uncertainty='ERR',
hdu_mask='MASK')``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.core.frame import Frame
from photowatch.core.schema import (  # noqa: F401  (set_key, strip_wcs: re-exported)
    WCS_PREFIXES,
    annotate,
    catalog_hdu,
    comment_for,
    set_key,
    strip_wcs,
)
from photowatch.io.fits import write_bytes, write_hdul
from photowatch.stages.astrometry import add_mjd_obs

#: raw keywords that no longer describe the reduced image
RAW_ONLY_KEYS = ("DATASEC", "BIASSEC", "TRIMSEC", "CCDSEC", "DETSEC", "BSCALE", "BZERO",
                 "BLANK", "BIASSEC1", "BIASSEC2", "AMPSEC", "CHECKSUM", "DATASUM")
#: keywords copied from the raw header into every extension header (short headers)
ESSENTIAL_KEYS = ("INSTRUME", "TELESCOP", "OBSERVAT", "OBJECT", "OBJNAME", "TARGNAME", "FILTER",
                  "FILTER1", "FILTER2", "EXPTIME", "DATE-OBS", "MJD-OBS", "AIRMASS", "CCDSUM",
                  "BINNING", "OBSTYPE", "RA", "DEC", "EQUINOX", "RADESYS")

MASK_DOC = {
    "MASKB1": "bad pixel (hot, dead, bad column)",
    "MASKB2": "saturated or bleed trail",
    "MASKB4": "cosmic ray (data replaced)",
    "MASKB8": "no data",
    "MASKB16": "low flat",
}


def primary_header(raw_header, extra: dict | None = None):
    """The product's primary header: the raw header minus raw-only keywords, plus ``extra``."""
    from astropy.io import fits

    hdr = fits.Header()
    skip = set(RAW_ONLY_KEYS) | {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND",
                                 "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "END"}
    for card in raw_header.cards:
        if card.keyword in skip or card.keyword.startswith(WCS_PREFIXES):
            continue
        try:
            hdr.append(card, end=True)
        except Exception:  # a malformed raw card: not worth failing the product for
            continue
    for key, value in (extra or {}).items():
        set_key(hdr, key, value)
    add_mjd_obs(hdr)
    return hdr


def sci_header(frame: Frame, wcs_header=None, extra: dict | None = None):
    """The SCI extension header: essentials, WCS, photowatch keywords."""
    from astropy.io import fits

    hdr = fits.Header()
    for key in ESSENTIAL_KEYS:
        if key in frame.header:
            set_key(hdr, key, (frame.header[key], frame.header.comments[key]))
    for key in frame.header:
        if key in PHOTOWATCH_KEYS:
            set_key(hdr, key, (frame.header[key], frame.header.comments[key]))
    if wcs_header is not None:
        strip_wcs(hdr)
        for card in wcs_header.cards:
            hdr.append(card, end=True)
    set_key(hdr, "BUNIT", "electron")
    for key, value in (extra or {}).items():
        set_key(hdr, key, value)
    add_mjd_obs(hdr)
    _fix_sip(hdr)
    return hdr


def _fix_sip(hdr) -> None:
    """A SIP order without coefficients (all zero: astropy writes none) is a plain TAN."""
    coeffs = [k for k in hdr if k[:2] in ("A_", "B_") and k not in ("A_ORDER", "B_ORDER")
              and not k.startswith(("A_DMAX", "B_DMAX"))]
    if coeffs or "A_ORDER" not in hdr:
        return
    for key in list(hdr):
        if key.startswith(("A_", "B_", "AP_", "BP_")):
            hdr.remove(key, ignore_missing=True, remove_all=True)
    for key in ("CTYPE1", "CTYPE2"):
        if key in hdr and str(hdr[key]).endswith("-SIP"):
            hdr[key] = str(hdr[key])[:-4]


#: keywords photowatch writes (copied into the SCI header from the frame header)
PHOTOWATCH_KEYS = (
    "ORIGFILE", "PWVERS", "PWNAME", "CAMERA", "FILTNAME", "TARGET", "NIGHT", "GAIN", "RDNOISE",
    "SATURATE", "PIXSCALE", "MBIAS", "MDARK", "MFLAT", "MSKY", "MBIASV", "MDARKV", "MFLATV",
    "MSKYV", "PROVISNL", "SKYLEVEL", "SKYNOISE", "SKYSUB", "NCRPIX", "CRCLEAN", "FWHM", "ELLIP",
    "NSOURCES", "ASTRMS", "ASTNSTAR", "ASTREF", "WCSSOLVE", "ASTOFFS", "ASTSTAT", "ASTREASN",
    "MAGZP", "MAGZPERR", "MAGZPN", "MAGZPSEC", "ZPSTAT", "FLXSCALE", "FLXREF", "QCSTATUS",
    "QCREASON", "ABSCAL", "SATLEVEL", "APCOR", "APCORERR", "APCORN", "GAINRAW", "SATURRAW",
    "MAGSYS", "MBIASN", "MDARKN", "MFLATN", "GAINSRC", "RDNSRC", "FLXSCERR", "LIMMAG", "LIMFLUX",
)


@dataclass
class Product:
    """A reduced product read back from disk."""

    path: Path
    sci: np.ndarray
    err: np.ndarray
    mask: np.ndarray
    header: object  #: SCI header (with the WCS)
    primary: object
    cat: object | None  #: astropy Table or None, as in the file (x, y 1-based)

    @property
    def var(self) -> np.ndarray:
        return self.err.astype(np.float32) ** 2


def write_product(path: str | Path, frame: Frame, *, primary, sci_hdr, cat=None,
                  fsync: bool = True) -> Path:
    """Write SCI/ERR/MASK(/CAT) atomically; every photowatch card with its comment."""
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(header=primary)]
    hdus.append(fits.ImageHDU(np.asarray(frame.sci, dtype=np.float32), header=sci_hdr,
                              name="SCI"))
    err_hdr = fits.Header()
    set_key(err_hdr, "BUNIT", "electron")
    set_key(err_hdr, "UTYPE", "StdDevUncertainty")  # what astropy's CCDData reads
    set_key(err_hdr, "ORIGFILE", sci_hdr.get("ORIGFILE"))
    hdus.append(fits.ImageHDU(frame.err, header=err_hdr, name="ERR"))
    mask_hdr = fits.Header()
    for key, text in MASK_DOC.items():
        mask_hdr[key] = (text, comment_for(key))
    hdus.append(fits.ImageHDU(np.asarray(frame.mask, dtype=np.uint16), header=mask_hdr,
                              name="MASK"))
    if cat is not None:
        hdus.append(catalog_hdu(cat, "CAT"))
    for hdu in hdus:
        annotate(hdu.header)
    return write_hdul(path, fits.HDUList(hdus), fsync=fsync)


def table_hdu(table, name: str):
    """A catalogue HDU in the schema of :mod:`photowatch.core.schema` (kept for callers)."""
    return catalog_hdu(table, name)


def write_regions(path: str | Path, cat, *, trusted: bool, radius_px: float | None = None,
                  pixel_scale_arcsec: float | None = None, fsync: bool = False) -> Path:
    """A DS9 region file of an in-memory catalogue (0-based x, y), atomically.

    Sky circles (ICRS) when ``trusted`` (an absolute astrometric solution) and
    ra/dec are known; otherwise image circles, 1-based as DS9 counts. Green:
    unflagged stellar sources; cyan: unflagged extended ones; red: flagged.
    """
    meta = getattr(cat, "meta", {}) or {}
    r_px = float(radius_px or meta.get("APRAD") or 5.0)
    n = len(cat) if cat is not None else 0
    ra = np.asarray(cat["ra"], float) if n and "ra" in cat.colnames else np.full(n, np.nan)
    dec = np.asarray(cat["dec"], float) if n and "dec" in cat.colnames else np.full(n, np.nan)
    sky = trusted and n > 0 and bool(np.all(np.isfinite(ra) & np.isfinite(dec)))
    if sky and pixel_scale_arcsec is None:
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        if n >= 2:  # the scale from the catalogue itself: two distant sources
            i, j = int(np.argmin(x + y)), int(np.argmax(x + y))
            dpix = float(np.hypot(x[i] - x[j], y[i] - y[j]))
            dsky = float(np.hypot((ra[i] - ra[j]) * np.cos(np.radians(dec[i])),
                                  dec[i] - dec[j])) * 3600
            pixel_scale_arcsec = dsky / dpix if dpix > 0 else None
        sky = pixel_scale_arcsec is not None and np.isfinite(pixel_scale_arcsec)
    lines = ["# Region file format: DS9 version 4.1",
             f"# photowatch {__version__}: {n} sources; "
             + ("sky positions (ICRS)" if sky else "image pixels, 1-based (FITS, DS9)"),
             'global color=green width=1 font="helvetica 9 normal roman" select=1',
             "icrs" if sky else "image"]
    flags = np.asarray(cat["flags"]) if n and "flags" in cat.colnames else np.zeros(n, int)
    stellar = np.asarray(cat["stellar"], bool) if n and "stellar" in cat.colnames \
        else np.ones(n, bool)
    ids = np.asarray(cat["id"]) if n and "id" in cat.colnames else np.arange(1, n + 1)
    for k in range(n):
        colour = "red" if flags[k] else ("green" if stellar[k] else "cyan")
        if sky:
            shape = f'circle({ra[k]:.7f},{dec[k]:+.7f},{r_px * pixel_scale_arcsec:.3f}")'
        else:
            shape = (f"circle({float(cat['x'][k]) + 1:.3f},{float(cat['y'][k]) + 1:.3f},"
                     f"{r_px:.3f})")
        lines.append(f"{shape} # color={colour} text={{{int(ids[k])}}}")
    return write_bytes(path, ("\n".join(lines) + "\n").encode(), fsync=fsync)


def read_product(path: str | Path, memmap: bool = False) -> Product:
    """Read a reduced product (SCI, ERR, MASK, CAT)."""
    from astropy.io import fits
    from astropy.table import Table

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=memmap) as hdul:
            names = [h.name for h in hdul]
            # as in the file: x, y 1-based (FITS convention, XYORIGIN = 1)
            cat = Table.read(hdul["CAT"]) if "CAT" in names else None
            return Product(
                path=path,
                sci=np.asarray(hdul["SCI"].data, dtype=np.float32),
                err=np.asarray(hdul["ERR"].data, dtype=np.float32),
                mask=np.asarray(hdul["MASK"].data, dtype=np.uint16),
                header=hdul["SCI"].header.copy(),
                primary=hdul[0].header.copy(),
                cat=cat,
            )


def read_planes_for_stacking(path: str | Path) -> tuple[np.ndarray, np.ndarray, object]:
    """(SCI, MASK, SCI header) of a product, as :func:`read_product` gives them, without
    reading ERR and CAT (a coadd swap-out resamples the data and the mask only)."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(Path(path), memmap=False) as hdul:
            return (np.asarray(hdul["SCI"].data, dtype=np.float32),
                    np.asarray(hdul["MASK"].data, dtype=np.uint16),
                    hdul["SCI"].header.copy())


def unusable(mask: np.ndarray) -> np.ndarray:
    """Boolean: pixels that must not be stacked (any mask bit, cleaned cosmic rays included)."""
    return mask != 0


__all__ = ["Product", "read_product", "write_product", "write_regions", "primary_header",
           "sci_header", "set_key", "strip_wcs", "unusable", "__version__"]
