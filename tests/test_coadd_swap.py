"""Swap-out of a re-reduced frame from the quick-look coadd (state/coadds, issue 23).

A member's resampling is kept when it is added (``coadd.swap_cache_mb``), so the
swap-out subtracts exactly what went in instead of reading the old product and
resampling it again. Both ways must give the same coadd (the kept one to float64
round-off of a coadd built without the old version; the re-read one to float32
round-off of the product), also after the grid grew, and a budget too small for a
frame keeps nothing (the product is read, as before).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from test_coadd import FRAMES, Field, frame_wcs

from photowatch.coadd.stack import Accumulator
from photowatch.core.config import load_settings
from photowatch.core.frame import Frame
from photowatch.io.products import write_product
from photowatch.state.coadds import CoaddBook
from photowatch.state.store import Store

NIGHT, TARGET, FILT = "2026-12-06", "FIELD", "SDSS-R"
KEY = (NIGHT, TARGET, FILT)


class _NoRefs:
    def get(self, *args):
        return None


def _book(tmp_path, mb: float) -> CoaddBook:
    settings = load_settings(None).with_overrides(
        coadd={"swap_cache_mb": mb, "quicklook_png": False, "margin_arcsec": 10.0})
    return CoaddBook(store=Store(tmp_path / "state.sqlite"), refs=_NoRefs(),
                     settings=settings.coadd, out=tmp_path, in_background=lambda *a, **k: None)


def _frame(field, k, seed, wcs=None):
    f = field.frames[k]
    noise = np.random.default_rng([seed, k]).normal(0, f["skynoise"], f["clean"].shape)
    sci = (f["model"] + noise).astype(np.float32)
    return Frame(sci, f["var"], f["mask"], fits.Header(), None), wcs or f["wcs"]


def _row(k, version, product=None):
    return {"id": k + 1, "name": f"frame{k}.fits", "raw_name": f"raw{k}.fits",
            "night": NIGHT, "target": TARGET, "filter": FILT, "product": product,
            "product_version": version}


def _add(book, field, k, seed, version, wcs=None, tmp_path=None):
    frame, w = _frame(field, k, seed, wcs)
    f = field.frames[k]
    info = types.SimpleNamespace(night=NIGHT, target=TARGET, filter=FILT,
                                 exptime_s=f["exptime_s"])
    qc = {"skynoise_e": f["skynoise"], "flxscale": f["flxscale"]}
    assert book.add(_row(k, version), info, frame, w, qc, version)
    path = tmp_path / f"frame{k}_v{version}.fits"
    hdr = w.to_header(relax=True)
    write_product(path, frame, primary=fits.Header(), sci_hdr=hdr, fsync=False)
    return str(path)


def _night(tmp_path, field, mb, far_wcs=None):
    """Frames 0-3 added (the 4th far off when ``far_wcs``: the grid grows), then frame 1
    re-reduced: its v1 swapped out, its v2 added."""
    book = _book(tmp_path, mb)
    products = {}
    for k in range(4):
        products[k] = _add(book, field, k, seed=1, version=1, tmp_path=tmp_path,
                           wcs=far_wcs if k == 3 else None)
    kept = len(book._added)
    if mb:  # the kept resampling is used: the old product is not even read
        Path(products[1]).unlink()
    book.remove_old(_row(1, 1, products[1]))
    _add(book, field, 1, seed=2, version=2, tmp_path=tmp_path)
    return book._accs[KEY], kept


@pytest.fixture(scope="module")
def field():
    return Field()


@pytest.mark.parametrize("far", [False, True], ids=["same grid", "grid grown"])
def test_kept_and_reread_swap_outs_give_the_same_coadd(field, tmp_path, far):
    dx, dy, rot, sgn = FRAMES[3][:4]
    far_wcs = frame_wcs(dx + 60.0, dy - 45.0, rot, sgn) if far else None
    kept, n_kept = _night(tmp_path / "kept", field, 64.0, far_wcs)
    reread, n_reread = _night(tmp_path / "reread", field, 0.0, far_wcs)
    assert n_kept == 4 and n_reread == 0
    # the reference: the same coadd built without frame 1's first version
    ref = Accumulator(kept.grid)
    book = _book(tmp_path / "ref", 64.0)
    book._accs[KEY] = ref
    for k, seed in ((0, 1), (2, 1), (3, 1), (1, 2)):
        frame, w = _frame(field, k, seed, far_wcs if k == 3 else None)
        f = field.frames[k]
        ref.add(f"frame{k}.fits:v{1 if seed == 1 else 2}",
                book._resample(frame.sci, None, frame.mask, w, ref.grid),
                flxscale=f["flxscale"], skynoise=f["skynoise"], exptime_s=f["exptime_s"])
    if far:
        assert tuple(kept.grid.shape) != tuple(field.grid.shape)  # the grid did grow
    assert kept.grid.same_as(reread.grid) and kept.grid.same_as(ref.grid)
    assert set(kept.members) == set(reread.members) == set(ref.members)
    scale = np.abs(ref.sum_wd).max()
    # kept: exactly what went in comes out (float64 round-off of the sums)
    assert np.allclose(kept.sum_wd, ref.sum_wd, rtol=0, atol=1e-12 * scale)
    assert np.allclose(kept.sum_w, ref.sum_w, rtol=1e-12, atol=0)
    assert np.array_equal(kept.ncov, ref.ncov) and np.array_equal(kept.exp, ref.exp)
    # re-read: the product's float32 pixels and header WCS give the same resampling
    assert np.allclose(reread.sum_wd, ref.sum_wd, rtol=0, atol=1e-6 * scale)
    assert np.array_equal(reread.ncov, ref.ncov)


def test_a_frame_over_a_quarter_of_the_budget_is_not_kept(field, tmp_path):
    book = _book(tmp_path, 0.8)  # 0.2 MB per frame at most; one frame's is ~0.27 MB
    _add(book, field, 0, seed=1, version=1, tmp_path=tmp_path)
    assert not book._added and book._added_bytes == 0
    book = _book(tmp_path / "b", 1.1)  # room for 4 frames of 5: the oldest goes
    for k in range(5):
        _add(book, field, k, seed=1, version=1, tmp_path=tmp_path / "b")
    assert 0 < book._added_bytes <= 1.1 * 2**20
    assert [m for (_, m) in book._added] == [f"frame{k}.fits:v1" for k in range(1, 5)]
