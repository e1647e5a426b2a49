"""The reduced-frame product: a multi-extension FITS file that astropy and DS9 read.

``OUT/reduced/<night>/<standardised name>``::

    PRIMARY  no data; the original raw header (minus sections that no longer
             apply) plus photowatch's keywords
    SCI      float32, electrons, sky subtracted; the solved WCS (TAN-SIP) and
             the keywords below
    ERR      float32, 1-sigma uncertainty, electrons
    MASK     uint16, bits 1 bad, 2 saturated, 4 cosmic ray, 8 no data, 16 low flat
    CAT      sources (x, y 0-based; ra, dec, flux, fluxerr, mag, magerr, fwhm,
             ellipticity, flags ...)

Keywords: ORIGFILE, BUNIT, PWVERS, MBIAS/MDARK/MFLAT/MSKY (master files used),
PROVISNL, SKYLEVEL, SKYNOISE, FWHM, ELLIP, ASTRMS, ASTNSTAR, ASTREF, WCSSOLVE,
MAGZP, MAGZPERR, MAGZPN, FLXSCALE, QCSTATUS, QCREASON ...
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.fitsio import write_hdul
from photowatch.frame import Frame

#: raw keywords that no longer describe the reduced image
RAW_ONLY_KEYS = ("DATASEC", "BIASSEC", "TRIMSEC", "CCDSEC", "DETSEC", "BSCALE", "BZERO",
                 "BLANK", "BIASSEC1", "BIASSEC2", "AMPSEC", "CHECKSUM", "DATASUM")
#: keywords copied from the raw header into every extension header (short headers)
ESSENTIAL_KEYS = ("INSTRUME", "TELESCOP", "OBSERVAT", "OBJECT", "OBJNAME", "TARGNAME", "FILTER",
                  "FILTER1", "FILTER2", "EXPTIME", "DATE-OBS", "MJD-OBS", "AIRMASS", "CCDSUM",
                  "BINNING", "OBSTYPE", "RA", "DEC", "EQUINOX", "RADESYS")
#: WCS keywords (removed before a new solution is written)
WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CD1_", "CD2_", "CDELT", "CROTA", "PC1_", "PC2_",
                "CUNIT", "A_", "B_", "AP_", "BP_", "PV1_", "PV2_", "LONPOLE", "LATPOLE",
                "WCSAXES", "A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER", "RADESYS", "EQUINOX",
                "MJDREF", "WCSNAME")

MASK_DOC = {
    "MASKB1": "bad pixel (hot, dead, bad column)",
    "MASKB2": "saturated or bleed trail",
    "MASKB4": "cosmic ray (data replaced)",
    "MASKB8": "no data",
    "MASKB16": "low flat",
}


def strip_wcs(header) -> None:
    """Remove every WCS keyword from a header, in place."""
    for key in list(header.keys()):
        if key.startswith(WCS_PREFIXES):
            header.remove(key, ignore_missing=True, remove_all=True)


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
    return hdr


def set_key(header, key: str, value, comment: str = "") -> None:
    """Set a header keyword, skipping None and non-finite floats (FITS has no NaN)."""
    if isinstance(value, tuple):
        value, comment = value
    if value is None:
        return
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and len(value) > 1000:
        value = value[:997] + "..."
    # longer strings than a card holds go on CONTINUE cards (the FITS long-string
    # convention, read by astropy, DS9 and CFITSIO): a reason is never cut mid-sentence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header[key] = (value, comment) if comment else value


def sci_header(frame: Frame, wcs_header=None, extra: dict | None = None):
    """The SCI extension header: essentials, WCS, photowatch keywords."""
    from astropy.io import fits

    hdr = fits.Header()
    for key in ESSENTIAL_KEYS:
        if key in frame.header:
            set_key(hdr, key, frame.header[key])
    for key in frame.header:
        if key in PHOTOWATCH_KEYS:
            set_key(hdr, key, frame.header[key])
    if wcs_header is not None:
        strip_wcs(hdr)
        for card in wcs_header.cards:
            hdr.append(card, end=True)
    set_key(hdr, "BUNIT", "electron")
    for key, value in (extra or {}).items():
        set_key(hdr, key, value)
    return hdr


#: keywords photowatch writes (copied into the SCI header from the frame header)
PHOTOWATCH_KEYS = (
    "ORIGFILE", "PWVERS", "PWNAME", "CAMERA", "FILTNAME", "TARGET", "NIGHT", "GAIN", "RDNOISE",
    "SATURATE", "PIXSCALE", "MBIAS", "MDARK", "MFLAT", "MSKY", "MBIASV", "MDARKV", "MFLATV",
    "MSKYV", "PROVISNL", "SKYLEVEL", "SKYNOISE", "SKYSUB", "NCRPIX", "CRCLEAN", "FWHM", "ELLIP",
    "NSOURCES", "ASTRMS", "ASTNSTAR", "ASTREF", "WCSSOLVE", "ASTOFFS", "ASTSTAT", "ASTREASN",
    "MAGZP", "MAGZPERR", "MAGZPN", "MAGZPSEC", "ZPSTAT", "FLXSCALE", "FLXREF", "QCSTATUS",
    "QCREASON", "ABSCAL", "SATLEVEL", "APCOR", "APCORERR", "APCORN", "FLXSCERR",
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
    cat: object | None  #: astropy Table or None

    @property
    def var(self) -> np.ndarray:
        return self.err.astype(np.float32) ** 2


def write_product(path: str | Path, frame: Frame, *, primary, sci_hdr, cat=None,
                  fsync: bool = True) -> Path:
    """Write SCI/ERR/MASK(/CAT) atomically."""
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(header=primary)]
    hdus.append(fits.ImageHDU(np.asarray(frame.sci, dtype=np.float32), header=sci_hdr,
                              name="SCI"))
    err_hdr = fits.Header()
    set_key(err_hdr, "BUNIT", "electron")
    set_key(err_hdr, "ORIGFILE", sci_hdr.get("ORIGFILE"))
    hdus.append(fits.ImageHDU(frame.err, header=err_hdr, name="ERR"))
    mask_hdr = fits.Header()
    for key, text in MASK_DOC.items():
        mask_hdr[key] = text
    hdus.append(fits.ImageHDU(np.asarray(frame.mask, dtype=np.uint16), header=mask_hdr,
                              name="MASK"))
    if cat is not None:
        hdus.append(table_hdu(cat, "CAT"))
    return write_hdul(path, fits.HDUList(hdus), fsync=fsync)


def table_hdu(table, name: str):
    """A binary-table HDU; units FITS does not know (``electron``) are kept as TUNITn text."""
    from astropy.io import fits

    plain = table.copy(copy_data=False)
    units = {}
    for col in plain.columns.values():
        if col.unit is not None:
            units[col.name] = col.unit.to_string()
            col.unit = None
    hdu = fits.BinTableHDU(plain, name=name)
    for i, colname in enumerate(plain.colnames, 1):
        if colname in units:
            hdu.header[f"TUNIT{i}"] = units[colname]
    return hdu


def read_product(path: str | Path, memmap: bool = False) -> Product:
    """Read a reduced product (SCI, ERR, MASK, CAT)."""
    from astropy.io import fits
    from astropy.table import Table

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=memmap) as hdul:
            names = [h.name for h in hdul]
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


def unusable(mask: np.ndarray) -> np.ndarray:
    """Boolean: pixels that must not be stacked (any mask bit, cleaned cosmic rays included)."""
    return mask != 0


__all__ = ["Product", "read_product", "write_product", "primary_header", "sci_header",
           "set_key", "strip_wcs", "unusable", "__version__"]
