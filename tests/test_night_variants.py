"""Simulated nights the main one does not cover: a flipped, rotated camera, and no catalogue.

One small night (512 px at 0.48"/px, SDSS-R) with the camera mirrored and rotated by
2 degrees and a header pointing up to 60" off is reduced twice: with its reference
catalogue (every frame must solve, to better than 0.05 px against the true WCS on a
grid) and without (every frame registered to the field's first frame, no zero point
invented, the products say so, and the coadd is still built at finalize).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from shared_data import wcs_grid_rms_px

from photowatch.core.config import Settings
from photowatch.io.products import read_product
from photowatch.report.html import write_report
from photowatch.run.batch import reduce_directory
from photowatch.run.finalize import finalize
from photowatch.sim.night import simulate_night
from photowatch.state.store import TERMINAL, Store


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("flipped")
    sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R",), seed=31,
                         n_bias=3, n_dark=0, n_flat=5, n_science=5, rotation_deg=2.0,
                         flip=True, pointing_error_arcsec=60.0)
    return sim, root


def run(sim, out, catalog):
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim.raw_dir, settings, catalog=catalog, progress=False)
    assert summary.ok, summary.problems
    return settings


def test_flipped_rotated_camera_solves_every_frame(flipped):
    sim, root = flipped
    out = root / "with_catalog"
    run(sim, out, str(sim.catalog_path))
    rows = {r["raw_name"]: r for r in Store(out / "state.sqlite").frames()}
    offsets = []
    for f in sim.objects(good_only=True):
        row = rows[f.raw_name]
        assert row["state"] == "reduced", (f.raw_name, row["reason"])
        prod = read_product(row["product"])
        assert prod.header["ASTSTAT"] == "ok"
        solved, truth = WCS(prod.header), f.wcs()
        rms = wcs_grid_rms_px(solved, truth, prod.sci.shape)
        assert rms < 0.05, (f.raw_name, rms)
        assert not prod.header.get("ASTREASN", "").startswith("suspect"), prod.header["ASTREASN"]
        offsets.append(np.hypot(*f.pointing_offset_arcsec))
    assert max(offsets) > 20  # the header pointing really was off


def test_a_solution_unlike_its_neighbours_is_flagged(flipped, monkeypatch):
    """The fourth frame's solution is turned by 3 degrees (9" at the corner): flagged, no other."""
    import dataclasses

    from photowatch.stages import astrometry

    sim, root = flipped
    real, seen = astrometry.solve_astrometry, []  # frames told apart by their header pointing

    def solve(*args, **kwargs):
        res = real(*args, **kwargs)
        key = tuple(np.round(kwargs["wcs_guess"].wcs.crval, 6))
        if key not in seen:
            seen.append(key)
        # (until four frames are known there is no fourth: those solves pass untouched)
        return dataclasses.replace(res, rotation_deg=res.rotation_deg + 3.0) \
            if len(seen) > 3 and key == seen[3] else res

    monkeypatch.setattr(astrometry, "solve_astrometry", solve)
    out = root / "one_turned"
    settings = run(sim, out, str(sim.catalog_path))
    store = Store(out / "state.sqlite")
    flagged = []
    for row in store.frames(kind="object"):
        if row["product"]:
            note = read_product(row["product"]).header.get("ASTREASN", "")
            if note.startswith("suspect"):
                flagged.append((row["raw_name"], note))
    assert len(seen) == 5
    # every frame reduced (the patch raised for none)
    assert all(r["state"] == "reduced" for r in store.frames(kind="object"))
    assert len(flagged) == 1 and "rotation differs" in flagged[0][1], flagged
    assert flagged[0][1].endswith("at the corner)")  # the whole reason, on CONTINUE cards
    # the observer sees it in the night report
    index = write_report(out, store, store.nights()[-1], settings, final=False)
    page = index.read_text()
    assert "Astrometry unlike the field" in page and flagged[0][0] in page
    store.close()


def test_without_a_catalogue_nothing_is_invented_and_the_coadd_is_built(flipped):
    sim, root = flipped
    out = root / "no_catalog"
    settings = run(sim, out, None)
    result = finalize(settings)
    assert result.ok, result.problems
    store = Store(out / "state.sqlite")
    rows = store.frames()
    assert all(r["state"] in TERMINAL for r in rows)
    good = {f.raw_name for f in sim.objects(good_only=True)}
    reduced = [r for r in rows if r["raw_name"] in good]
    assert sum(r["state"] == "reduced" for r in reduced) >= len(good) - 1
    for r in reduced:
        prod = read_product(r["product"])
        h = prod.header
        assert h["ABSCAL"] is False and "MAGZP" not in h
        assert h["ASTSTAT"] in ("relative", "failed")
        # no zero point: mag is NaN, never instrumental; mag_inst is beside it
        assert h["MAGSYS"] == "none"
        assert np.all(np.isnan(np.ma.filled(prod.cat["mag"], np.nan)))
        assert np.isfinite(np.ma.filled(prod.cat["mag_inst"], np.nan)).sum() > 10
    (coadd,) = store.coadds()
    assert coadd["stacktype"] == "FINAL" and coadd["magzp"] is None
    with fits.open(coadd["path"]) as h:
        assert h["SCI"].header["ABSCAL"] is False and "MAGZP" not in h["SCI"].header
        assert h["SCI"].header["NCOMBINE"] >= len(good) - 1
    cat = Table.read(coadd["catalog"], hdu="CAT", mask_invalid=False)
    assert np.all(np.isnan(cat["mag"])) and np.isfinite(cat["mag_inst"]).sum() > 10
