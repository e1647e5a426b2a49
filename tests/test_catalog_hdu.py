"""core.schema.catalog_hdu: the same bytes as the Table conversion it replaced."""

import io

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from photowatch.core.schema import (
    COLUMNS,
    XY_ORIGIN,
    _extra_unit,
    annotate,
    catalog_hdu,
    file_table,
    fit_comment,
    set_key,
)


def _reference_hdu(table, name="CAT"):
    """The former catalog_hdu: an astropy Table converted, then its header set card by card."""
    out = file_table(table)
    meta = dict(out.meta)
    out.meta.clear()
    hdu = fits.BinTableHDU(out, name=name)
    for i, colname in enumerate(out.colnames, 1):
        unit, desc = COLUMNS[colname][1:] if colname in COLUMNS else _extra_unit(colname)
        if unit:
            hdu.header[f"TUNIT{i}"] = unit
        if desc:
            hdu.header[f"TCOMM{i}"] = (desc, fit_comment(desc, f"description of column {i}"))
            hdu.header.comments[f"TTYPE{i}"] = desc[:45]
        hdu.header.comments[f"TFORM{i}"] = "data format of column " + str(i)
        if unit:
            hdu.header.comments[f"TUNIT{i}"] = "unit of column " + str(i)
    set_key(hdu.header, "XYORIGIN", XY_ORIGIN)
    for key, value in meta.items():
        if isinstance(value, bool | int | float | str | np.generic) and len(key) <= 8:
            set_key(hdu.header, key.upper(), value)
    annotate(hdu.header)
    return hdu


def _bytes(hdu) -> bytes:
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf, output_verify="silentfix")
    return buf.getvalue()


def _table(n: int, seed: int) -> Table:
    rng = np.random.default_rng(seed)
    t = Table()
    for name, (dtype, _, _) in COLUMNS.items():
        if name in ("id", "mag_inst"):
            continue
        kind = np.dtype(dtype).kind
        t[name] = (rng.random(n) > 0.5 if kind == "b" else
                   rng.integers(0, 2000, n).astype(dtype) if kind == "i" else
                   (rng.normal(100, 50, n)).astype(dtype))
    t["flux"][: n // 3] *= -1  # mag_inst derived: NaN for these
    t.meta.update({"NSOURCES": n, "APRAD": 5.4551, "APCORSRC": "psf", "FWHM": np.float32(1.3),
                   "ELLIP": float("nan"), "STELLAR": np.bool_(True), "WITHCOM": (3, "a comment"),
                   "REASON": "a reason longer than a card holds " * 4, "toolongkey": 1})
    return t


@pytest.mark.parametrize("n,seed", [(0, 1), (3, 2), (400, 3)])
def test_same_bytes_as_the_table_conversion(n, seed):
    t = _table(n, seed)
    assert _bytes(catalog_hdu(t)) == _bytes(_reference_hdu(t))


def test_extra_columns_and_a_keyword_given_twice():
    t = _table(50, 4)
    t["mag_SDSS-R"] = t["flux"]
    t["flags_SDSS-R"] = t["flags"]
    t["nbands"] = np.ones(50, np.int16)
    t["label"] = np.array(["ab"] * 50)
    t.meta["nsources"] = 7  # NSOURCES again, in lower case: the later value wins
    t.meta["XYORIGIN"] = 1
    new, old = catalog_hdu(t, "COADDCAT"), _reference_hdu(t, "COADDCAT")
    assert _bytes(new) == _bytes(old)
    assert new.header["NSOURCES"] == 7 and new.header["TUNIT22"] == "mag"
    back = Table.read(io.BytesIO(_bytes(new)), hdu=1)
    np.testing.assert_array_equal(back["x"], np.asarray(t["x"]) + XY_ORIGIN)
