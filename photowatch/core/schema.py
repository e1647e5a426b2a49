"""What photowatch writes into its files: one table of header keywords, one catalogue schema.

Every header card photowatch writes carries a comment. Stages give their own
comment where it says something specific (a zero point's failure reason);
:func:`annotate` gives every other card of :data:`KEYWORDS` the table's
comment, ``[unit] meaning``, just before a file is written. The table is
rendered into ``docs/keywords.md`` (:func:`keywords_markdown`; a test keeps the
two equal).

Catalogues (a reduced frame's ``CAT`` extension and a coadd's
``coadd_<TARGET>_<FILTER>.cat.fits``) share the columns of :data:`COLUMNS`, with
units and a description (``TCOMMn``) each. Pixel positions in files follow the
FITS convention, as SExtractor and DS9 do: the centre of the first pixel is
``(1, 1)`` (``XYORIGIN = 1`` in the table header). In memory, photowatch's code
works 0-based (numpy); :func:`catalog_hdu` converts at the edge.

Electrons have no unit in the FITS standard, so a table read by astropy would
warn on ``TUNIT = 'electron'``. Fluxes are therefore written as ``ct``
(counts, a FITS unit); the images say ``GAIN = 1``, so a count is one electron
(the column descriptions say so too). Image ``BUNIT`` stays ``electron``, which
astropy's ``CCDData`` reads as ``u.electron``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

#: pixel-coordinate origin of x, y in every catalogue file (FITS, SExtractor, DS9)
XY_ORIGIN = 1


@dataclass(frozen=True)
class Keyword:
    name: str
    comment: str  #: short meaning (the card comment, after the unit)
    unit: str = ""  #: unit in brackets at the start of the comment
    where: str = "frame"  #: frame (PRIMARY and SCI of a reduced frame), ERR, MASK, CAT, coadd, coadd cat

    @property
    def card_comment(self) -> str:
        return f"[{self.unit}] {self.comment}" if self.unit else self.comment


_F, _C, _FC = "frame", "coadd", "frame, coadd"
_CAT, _CCAT = "frame CAT", "coadd cat"
KEYWORDS: dict[str, Keyword] = {k.name: k for k in (
    # identity
    Keyword("ORIGFILE", "raw file name", "", "frame, ERR"),
    Keyword("PWNAME", "standardised name", "", _F),
    Keyword("PWVERS", "photowatch version", "", _FC),
    Keyword("INSTPROF", "photowatch instrument profile", "", _F),
    Keyword("CAMERA", "camera", "", _F),
    Keyword("FILTNAME", "filter (photowatch's name)", "", _FC),
    Keyword("TARGET", "target", "", _FC),
    Keyword("NIGHT", "night label (local date at start of night)", "", _FC),
    Keyword("PIXSCALE", "nominal pixel scale", "arcsec/pix", _F),
    Keyword("MJD-OBS", "MJD at start of (first) exposure", "d", _FC),
    # units of the image
    Keyword("BUNIT", "unit of the data", "", "frame, ERR, coadd"),
    Keyword("GAIN", "SCI is in electrons: 1 count = 1/GAIN e-", "electron/adu", _FC),
    Keyword("GAINRAW", "detector gain applied to the raw ADU", "electron/adu", _F),
    Keyword("RDNOISE", "read noise", "electron", _F),
    Keyword("SATURATE", "SCI values above this may be saturated", "electron", _FC),
    Keyword("SATURRAW", "raw saturation level", "adu", _F),
    Keyword("GAINSRC", "gain from: header, profile or measured", "", _F),
    Keyword("RDNSRC", "read noise from: header, profile or measured", "", _F),
    Keyword("SATFRAC", "fraction of saturated pixels", "", _F),
    Keyword("OVERSCAN", "median overscan level subtracted", "adu", _F),
    Keyword("UTYPE", "ERR is a 1-sigma standard deviation", "", "ERR"),
    # calibration
    Keyword("MBIAS", "master bias used", "", _F),
    Keyword("MBIASV", "master bias version", "", _F),
    Keyword("MBIASN", "night of the master bias", "", _F),
    Keyword("MDARK", "master dark used", "", _F),
    Keyword("MDARKV", "master dark version", "", _F),
    Keyword("MDARKN", "night of the master dark", "", _F),
    Keyword("MFLAT", "master flat used", "", _F),
    Keyword("MFLATV", "master flat version", "", _F),
    Keyword("MFLATN", "night of the master flat", "", _F),
    Keyword("MSKY", "master sky used", "", _F),
    Keyword("MSKYV", "frames in the master sky", "", _F),
    Keyword("PROVISNL", "reduced with a provisional master", "", _F),
    Keyword("CALFINAL", "equivalent to the night's final masters (kept at finalize)", "", _F),
    Keyword("CALDEV", "change the final masters would make", "sky sigma", _F),
    Keyword("SKYPRE", "sky level removed with the master sky", "electron", _F),
    Keyword("SKYLEVEL", "median sky level subtracted", "electron", _F),
    Keyword("SKYNOISE", "robust rms of sky pixels", "electron", "frame, coadd cat"),
    Keyword("SKYSUB", "background method", "", _F),
    Keyword("NCRPIX", "pixels cleaned as cosmic rays (MASK bit 4)", "", _F),
    Keyword("CRCLEAN", "cosmic-ray cleaning and its settings", "", _F),
    # image quality and sources
    Keyword("FWHM", "median stellar FWHM", "arcsec", "frame, CAT, coadd cat"),
    Keyword("FWHMPIX", "median stellar FWHM", "pix", "CAT, coadd cat"),
    Keyword("ELLIP", "median stellar ellipticity 1-b/a", "", "frame, CAT, coadd cat"),
    Keyword("NSOURCES", "sources in the catalogue", "", "frame, CAT, coadd cat"),
    Keyword("NSTELLAR", "sources classified stellar", "", "CAT, coadd cat"),
    Keyword("APRAD", "photometric aperture radius", "pix", "CAT, coadd cat"),
    Keyword("APCOR", "aperture correction (flux/aper)", "", "frame, CAT, coadd cat"),
    Keyword("APCORERR", "aperture correction uncertainty", "", "frame, CAT, coadd cat"),
    Keyword("APCORN", "stars in the aperture correction", "", "frame, CAT, coadd cat"),
    Keyword("APCORSRC", "aperture correction from: growth, model or night:N", "", "CAT, coadd cat"),
    Keyword("XYORIGIN", "x, y of the first pixel centre (FITS: 1)", "pix", "CAT, coadd cat"),
    # astrometry
    Keyword("ASTRMS", "astrometric rms", "arcsec", _F),
    Keyword("ASTNSTAR", "stars in the astrometric fit", "", _F),
    Keyword("ASTOFFS", "solved centre - header pointing", "arcsec", _F),
    Keyword("ASTREF", "astrometric reference", "", _F),
    Keyword("WCSSOLVE", "astrometric method", "", _F),
    Keyword("ASTSTAT", "astrometry: ok, relative or failed", "", "frame, CAT"),
    Keyword("ASTREASN", "astrometry note", "", _F),
    # photometry
    Keyword("MAGZP", "mag = MAGZP - 2.5 log10(counts in SCI)", "mag", "frame, coadd, CATs"),
    Keyword("MAGZPERR", "zero-point uncertainty", "mag", "frame, coadd cat"),
    Keyword("MAGZPN", "stars used for the zero point", "", "frame, coadd cat"),
    Keyword("MAGZPSEC", "zero point for 1 s", "mag", _F),
    Keyword("MAGZPBND", "catalogue band of the zero point", "", _F),
    Keyword("MAGZPREF", "MAGZP of the coadd image (reference)", "mag", _CCAT),
    Keyword("LIMMAG", "5-sigma point-source limit (CAT aperture, APCOR, MAGZP)", "mag", _FC),
    Keyword("LIMFLUX", "5-sigma point-source flux (CAT aperture, APCOR)", "electron", _F),
    Keyword("ZPMETHOD", "how the catalogue was calibrated", "", _CCAT),
    Keyword("ZPSTAT", "zero point status", "", _F),
    Keyword("ABSCAL", "absolutely calibrated photometry", "", "frame, coadd, CAT"),
    Keyword("MAGSYS", "CAT mag: calibrated, or NaN (see mag_inst)", "", "frame, CAT"),
    Keyword("FLXSCALE", "multiply SCI by this to reach FLXREF", "", _F),
    Keyword("FLXSCERR", "FLXSCALE standard error", "", _F),
    Keyword("FLXREF", "photometric reference (zero point or frame)", "", _F),
    # quality
    Keyword("QCSTATUS", "frame quality: accepted or rejected", "", _F),
    Keyword("QCREASON", "why the frame is not stacked", "", _F),
    Keyword("SATLEVEL", "saturation level", "electron", _F),
    # mask bits
    Keyword("MASKB1", "MASK bit 1", "", "MASK"),
    Keyword("MASKB2", "MASK bit 2", "", "MASK"),
    Keyword("MASKB4", "MASK bit 4", "", "MASK"),
    Keyword("MASKB8", "MASK bit 8", "", "MASK"),
    Keyword("MASKB16", "MASK bit 16", "", "MASK"),
    # coadds (SWarp's keywords where SWarp has one)
    Keyword("STACKTYP", "QUICKLOOK (running) or FINAL (outlier-rejected)", "", "coadd, coadd cat"),
    Keyword("FINALSTAT", "COMPLETE, or INCOMPLETE: quick-look frames lost", "", _C),
    Keyword("FINALRSN", "frames lost in the FINAL coadd, and why", "", _C),
    Keyword("NCOMBINE", "number of frames combined", "", "coadd, coadd cat"),
    Keyword("EXPTIME", "total exposure time of the members", "s", _C),
    Keyword("DATE-OBS", "UTC start of the first exposure", "", _C),
    Keyword("DATE-BEG", "UTC start of the first exposure", "", _C),
    Keyword("DATE-END", "UTC end of the last exposure", "", _C),
    Keyword("MJD-BEG", "MJD at start of the first exposure", "d", _C),
    Keyword("MJD-MID", "MJD halfway between start and end", "d", _C),
    Keyword("MJD-END", "MJD at end of the last exposure", "d", _C),
    Keyword("TELESCOP", "telescope", "", _C),
    Keyword("INSTRUME", "instrument", "", _C),
    Keyword("FILTER", "filter", "", _C),
    Keyword("OBJECT", "object", "", _C),
    Keyword("BLANKVAL", "SCI value where WHT = 0 (no data)", "", _C),
    Keyword("NOISECOR", "aperture noise / independent-pixel noise", "", _CCAT),
    Keyword("GAINEFF", "effective gain of the weighted mean", "electron/adu", _CCAT),
    Keyword("COADD", "the coadd this catalogue measures", "", _CCAT),
    Keyword("BANDS", "filters merged into the mag_<F> columns", "", _CCAT),
    Keyword("MATCHRAD", "match radius of the band merge", "arcsec", _CCAT),
)}

#: provenance of a reduced frame: one card per step of the science chain, in order,
#: 'name version settings-digest' (:mod:`photowatch.stages.chain`)
STEP_CARDS = 12
KEYWORDS.update({f"PWSTEP{i:02d}": Keyword(
    f"PWSTEP{i:02d}", f"chain step {i}: name version settings-digest", "", _F)
    for i in range(1, STEP_CARDS + 1)})


def comment_for(key: str) -> str:
    """The table's comment for ``key`` ("" for a keyword not in the table)."""
    kw = KEYWORDS.get(key)
    return kw.card_comment if kw else ""


def fit_comment(value, comment: str) -> str:
    """``comment`` cut to what fits on the card beside ``value`` (astropy would cut it too,
    with a warning each time the card is written; a long string's CONTINUE cards keep it)."""
    if not comment:
        return comment
    if isinstance(value, str):
        quoted = len(value.replace("'", "''")) + 2
        if quoted > 68:
            return comment
        width = max(20, quoted, 10)
    elif isinstance(value, bool | np.bool_):
        width = 20
    else:
        width = max(20, len(str(value)))
    room = 80 - 10 - width - 3
    return comment if len(comment) <= room else comment[:max(room, 0)].rstrip()


#: WCS keywords (removed before a new solution is written)
WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CD1_", "CD2_", "CDELT", "CROTA", "PC1_", "PC2_",
                "CUNIT", "A_", "B_", "AP_", "BP_", "PV1_", "PV2_", "LONPOLE", "LATPOLE",
                "WCSAXES", "A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER", "RADESYS", "EQUINOX",
                "MJDREF", "WCSNAME")


def header_wcs(header):
    """The celestial 2-axis WCS of an image header, astropy's FITS-fixing chatter silenced
    (reduced products and coadds carry SIP and DATE cards it comments on)."""
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header, naxis=2)


def strip_wcs(header) -> None:
    """Remove every WCS keyword from a header, in place."""
    for key in list(header.keys()):
        if key.startswith(WCS_PREFIXES):
            header.remove(key, ignore_missing=True, remove_all=True)


def _key_value(key: str, value, comment: str = "") -> tuple | None:
    """(value, comment) as a header card holds them, or None for None and non-finite
    floats (FITS has no NaN): numpy scalars as Python ones, strings cut at 1000
    characters, the comment from :data:`KEYWORDS` when none is given, fitted to the card."""
    if isinstance(value, tuple):
        value, comment = value
    comment = comment or comment_for(key)
    if value is None:
        return None
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and len(value) > 1000:
        value = value[:997] + "..."
    return value, fit_comment(value, comment)


def set_key(header, key: str, value, comment: str = "") -> None:
    """Set a header keyword, skipping None and non-finite floats (FITS has no NaN)."""
    normal = _key_value(key, value, comment)
    if normal is None:
        return
    value, comment = normal
    # longer strings than a card holds go on CONTINUE cards (the FITS long-string
    # convention, read by astropy, DS9 and CFITSIO): a reason is never cut mid-sentence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header[key] = (value, comment) if comment else value


def annotate(header) -> None:
    """Give every card of :data:`KEYWORDS` with an empty comment the table's comment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a long value leaves room for part of the comment
        for card in header.cards:
            if not card.comment and card.keyword in KEYWORDS:
                header.comments[card.keyword] = fit_comment(card.value,
                                                            comment_for(card.keyword))


def keywords_markdown() -> str:
    """The keyword table as Markdown (``docs/keywords.md``)."""
    lines = ["# photowatch's FITS keywords", "",
             "Generated from `photowatch/core/schema.py` (`python -m photowatch.core.schema > "
             "docs/keywords.md`); a test keeps the two equal. Units in brackets also open each "
             "card's comment.", "",
             "| keyword | meaning | unit | written in |", "|---|---|---|---|"]
    for kw in KEYWORDS.values():
        lines.append(f"| `{kw.name}` | {kw.comment} | {kw.unit} | {kw.where} |")
    lines += ["", "## Catalogue columns", "",
              "Reduced frames' `CAT` and coadd catalogues share these columns "
              f"(`x`, `y` {XY_ORIGIN}-based, FITS convention).", "",
              "| column | unit | meaning |", "|---|---|---|"]
    for name, (_, unit, desc) in COLUMNS.items():
        lines.append(f"| `{name}` | {unit} | {desc} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- catalogues

#: FITS unit of electrons in tables (see the module docstring)
ELECTRON = "ct"
#: catalogue columns, in order: name → (dtype, FITS unit, description)
COLUMNS: dict[str, tuple[str, str, str]] = {
    "id": ("i4", "", "source number"),
    "x": ("f8", "pix", "column of the windowed centroid; first pixel centre = 1"),
    "y": ("f8", "pix", "row of the windowed centroid; first pixel centre = 1"),
    "ra": ("f8", "deg", "right ascension (ICRS); NaN without a solution"),
    "dec": ("f8", "deg", "declination (ICRS); NaN without a solution"),
    "flux": ("f8", ELECTRON, "aperture-corrected flux, electrons (GAIN = 1)"),
    "fluxerr": ("f8", ELECTRON, "1-sigma error of flux, electrons"),
    "flux_aper": ("f8", ELECTRON, "flux in the APRAD aperture, electrons"),
    "fluxerr_aper": ("f8", ELECTRON, "1-sigma error of flux_aper, electrons"),
    "mag": ("f8", "mag", "MAGZP - 2.5 log10(flux); NaN without a zero point"),
    "magerr": ("f8", "mag", "1-sigma error of mag (of mag_inst without MAGZP)"),
    "mag_inst": ("f8", "mag", "instrumental magnitude -2.5 log10(flux)"),
    "snr": ("f4", "", "flux / fluxerr"),
    "fwhm": ("f4", "pix", "full width at half maximum"),
    "ellipticity": ("f4", "", "1 - b/a"),
    "theta": ("f4", "deg", "position angle of the major axis, from +x towards +y"),
    "peak": ("f4", ELECTRON, "peak pixel value, electrons"),
    "npix": ("i4", "", "pixels of the detected object"),
    "flags": ("i2", "", "photowatch flags (sources.SourceFlag; 1024: faint, PSF-matched pass "
                        "only; coadds 256, 512)"),
    "sepflags": ("i2", "", "sep extraction flags"),
    "stellar": ("?", "", "classified as a point source"),
}


def _column_values(table, name: str, dtype: str, n: int):
    if name in table.colnames:
        return np.asarray(table[name]).astype(dtype)
    if name == "id":
        return np.arange(1, n + 1, dtype=dtype)
    if name == "mag_inst" and "flux" in table.colnames:
        flux = np.asarray(table["flux"], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1)), np.nan)
    fill = {"f": np.nan, "i": 0, "b": False}[np.dtype(dtype).kind]
    return np.full(n, fill, dtype=dtype)


def file_table(table):
    """An in-memory catalogue (0-based x, y) in the file schema: every column of
    :data:`COLUMNS` in order (missing ones filled: NaN, 0, or derived such as
    ``mag_inst``), then any further columns; x, y 1-based; the table's meta kept."""
    from astropy.table import Table

    n = len(table)
    out = Table(meta=dict(table.meta))
    for name, (dtype, _, _) in COLUMNS.items():
        out[name] = _column_values(table, name, dtype, n)
    out["x"] = out["x"] + (XY_ORIGIN - 0)
    out["y"] = out["y"] + (XY_ORIGIN - 0)
    for name in table.colnames:
        if name not in out.colnames:
            col = table[name]
            out[name] = np.asarray(col)
    return out


def _extra_unit(name: str) -> tuple[str, str]:
    if name.startswith("magerr_"):
        return "mag", f"1-sigma error of mag_{name[7:]}"
    if name.startswith("mag_"):
        return "mag", f"calibrated magnitude in band {name[4:]} (merged catalogue)"
    if name.startswith("flags_"):
        return "", f"flags in band {name[6:]} (-1: not detected)"
    if name == "nbands":
        return "", "bands in which the source was detected"
    return "", ""


def _card(key: str, value, comment: str = ""):
    """The card :func:`set_key` would set (None where it sets nothing)."""
    from astropy.io import fits

    normal = _key_value(key, value, comment)
    if normal is None:
        return None
    value, comment = normal
    return fits.Card(key, value, comment) if comment else fits.Card(key, value)


def catalog_hdu(table, name: str = "CAT"):
    """A binary-table HDU in the catalogue schema, from an in-memory (0-based) table.

    Units on every column (FITS-standard, so astropy reads them without a
    warning), a ``TCOMMn`` description, ``XYORIGIN``, and the table's meta as
    header keywords with the comments of :data:`KEYWORDS`.

    Built from a structured array and one list of cards: the same bytes as an
    astropy ``Table`` converted and its header set card by card (tested), at ~60 % of
    the CPU (~4 ms less per 1k frame's catalogue).
    """
    from astropy.io import fits

    n = len(table)
    arrays = {c: _column_values(table, c, dtype, n) for c, (dtype, _, _) in COLUMNS.items()}
    arrays["x"] = arrays["x"] + (XY_ORIGIN - 0)
    arrays["y"] = arrays["y"] + (XY_ORIGIN - 0)
    for c in table.colnames:
        if c not in arrays:
            arrays[c] = np.asarray(table[c])
    rec = np.empty(n, dtype=[(c, a.dtype, a.shape[1:]) for c, a in arrays.items()])
    for c, a in arrays.items():
        rec[c] = a
    hdu = fits.BinTableHDU(rec, name=name)
    # astropy's order for cards set one by one: TTYPEn/TFORMn (given comments in place),
    # EXTNAME, then TUNITn and TCOMMn per column, then the keywords
    comments, tail = {}, []
    for i, c in enumerate(arrays, 1):
        unit, desc = COLUMNS[c][1:] if c in COLUMNS else _extra_unit(c)
        if unit:
            tail.append((f"TUNIT{i}", unit, "unit of column " + str(i)))
        if desc:
            tail.append((f"TCOMM{i}", desc, fit_comment(desc, f"description of column {i}")))
            comments[f"TTYPE{i}"] = desc[:45]
        comments[f"TFORM{i}"] = "data format of column " + str(i)
    keywords = [("XYORIGIN", XY_ORIGIN)] + [
        (k.upper(), v) for k, v in table.meta.items()
        if isinstance(v, bool | int | float | str | np.generic) and len(k) <= 8]
    again = []  # a keyword given twice: set_key replaces the first card
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long values leave room for part of the comment
        cards = [fits.Card(c.keyword, c.value, comments[c.keyword]) if c.keyword in comments
                 else c for c in hdu.header.cards]
        cards += [fits.Card(*t) for t in tail]
        seen = {c.keyword for c in cards}
        for key, value in keywords:
            if key in seen:
                again.append((key, value))
                continue
            card = _card(key, value)
            if card is not None:
                cards.append(card)
                seen.add(key)
        hdu.header = fits.Header(cards)
    for key, value in again:
        set_key(hdu.header, key, value)
    annotate(hdu.header)
    return hdu


if __name__ == "__main__":  # python -m photowatch.core.schema > docs/keywords.md
    print(keywords_markdown(), end="")
