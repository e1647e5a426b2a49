"""Coadd catalogues: detection with the WHT noise map, calibrated magnitudes, band merging."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import Table

from photowatch.coadd.catalogue import catalog_path, coadd_catalog, write_catalog
from photowatch.coadd.stack import CoaddGrid, Member, make_grid, member_weight, write_coadd
from photowatch.core.config import Settings
from photowatch.run import finalize
from photowatch.sim.psf import gaussian_stars
from photowatch.stages.photometry import LOWWEIGHT, effective_gain, merge_bands

RA0, DEC0 = 30.0, -20.0
SCALE = 0.3
SIGMA = 1.5  # px
MAGZP = 27.0
NOISE = 6.0  # e- per pixel where WHT = 1 / NOISE**2


def tan_grid(shape):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    w.wcs.cd = [[-SCALE / 3600, 0], [0, SCALE / 3600]]
    w.wcs.set()
    return make_grid(RA0, DEC0, SCALE, shape, w, 0.0)


def synthetic_coadd(path, *, seed=3, shift_px=(0.0, 0.0), magzp=MAGZP, low_weight_band=True):
    """A coadd file with isolated Gaussian stars on a 40 px lattice, white noise of
    rms 1/sqrt(WHT), one low-weight band of rows, and a two-member MEMBERS table."""
    grid = tan_grid((401, 421))
    ny, nx = grid.shape
    rng = np.random.default_rng(seed)
    g = np.arange(30, 380, 40)
    xs, ys = (m.ravel().astype(float) for m in np.meshgrid(g + 10, g))
    xs += rng.uniform(-0.5, 0.5, xs.size) + shift_px[0]
    ys += rng.uniform(-0.5, 0.5, ys.size) + shift_px[1]
    flux = 10 ** rng.uniform(3.3, 5.5, xs.size)
    wht = np.full(grid.shape, 1 / NOISE**2, np.float32)
    if low_weight_band:
        wht[300:345] *= 0.25  # e.g. covered by fewer frames
    sci = gaussian_stars(grid.shape, xs, ys, flux, sigma_px=SIGMA)
    # white sky noise plus source Poisson noise (effective gain 2 for the two members)
    sci += rng.standard_normal(grid.shape) / np.sqrt(wht)
    sci += rng.standard_normal(grid.shape) * np.sqrt(np.maximum(sci, 0) / 2.0)
    sci = sci.astype(np.float32)
    sci[:, :6] = np.nan  # an uncovered strip
    wht[:, :6] = 0
    members = {"a": Member(1.0, NOISE * math.sqrt(2), 60.0, member_weight(1.0, NOISE * 2**0.5)),
               "b": Member(1.0, NOISE * math.sqrt(2), 60.0, member_weight(1.0, NOISE * 2**0.5))}
    write_coadd(path, grid, sci=sci, wht=wht, exp=np.where(wht > 0, 120.0, 0.0),
                ncov=np.where(wht > 0, 2, 0), members=members, stacktype="FINAL",
                magzp=magzp, fsync=False)
    ra, dec = grid.wcs.all_pix2world(xs, ys, 0)
    return grid, Table({"x": xs, "y": ys, "ra": ra, "dec": dec, "flux": flux})


def match(cat, truth, radius_px=1.5):
    d = np.hypot(cat["x"][:, None] - truth["x"][None, :], cat["y"][:, None] - truth["y"][None, :])
    j = np.argmin(d, axis=1)
    ok = d[np.arange(len(cat)), j] < radius_px
    return np.flatnonzero(ok), j[ok]


@pytest.fixture(scope="module")
def coadd(tmp_path_factory):
    path = tmp_path_factory.mktemp("phot") / "coadd_T1_SDSS-R.fits"
    grid, truth = synthetic_coadd(path)
    return path, grid, truth


def test_catalog_columns_and_calibrated_magnitudes(coadd):
    path, grid, truth = coadd
    cat = coadd_catalog(path, detect_sigma=3.0)
    for name in ("ra", "dec", "mag", "magerr", "flux", "fluxerr", "fwhm", "flags"):
        assert name in cat.colnames
    assert cat.meta["MAGZP"] == MAGZP  # from the file
    i, j = match(cat, truth)
    assert len(i) >= 0.95 * len(truth)  # every star is found
    bright = truth["flux"][j] > 2e4
    ratio = cat["flux"][i] / truth["flux"][j]
    assert np.median(ratio[bright]) == pytest.approx(1.0, abs=0.01)  # aperture correction
    true_mag = MAGZP - 2.5 * np.log10(truth["flux"][j])
    assert np.median((cat["mag"][i] - true_mag)[bright]) == pytest.approx(0.0, abs=0.01)
    # positions: sub-pixel, and ra/dec from the grid WCS
    assert np.max(np.hypot(cat["x"][i] - truth["x"][j], cat["y"][i] - truth["y"][j])) < 0.2
    dra = (cat["ra"][i] - truth["ra"][j]) * 3600 * math.cos(math.radians(DEC0))
    assert np.max(np.abs(dra)) < 0.2 * SCALE
    assert np.median(cat["fwhm"][i][bright]) == pytest.approx(2.3548 * SIGMA, rel=0.1)


def test_magnitude_errors_match_the_scatter(coadd):
    path, grid, truth = coadd
    cat = coadd_catalog(path, detect_sigma=3.0)
    i, j = match(cat, truth)
    clean = (cat["flags"][i] == 0) & np.isfinite(cat["magerr"][i])
    pull = (cat["flux"][i] - truth["flux"][j]) / cat["fluxerr"][i]
    # the aperture correction adds a small common offset; the scatter is what matters
    spread = mad_std(pull[clean])
    assert 0.7 < spread < 1.4
    assert cat.meta["NOISECOR"] == pytest.approx(1.0, abs=0.1)  # white noise here
    assert cat.meta["GAINEFF"] == pytest.approx(2.0)


def test_low_weight_sources_are_flagged(coadd):
    path, grid, truth = coadd
    cat = coadd_catalog(path, detect_sigma=3.0)
    low = (cat["y"] > 302) & (cat["y"] < 343)
    assert low.any()
    assert np.all(cat["flags"][low] & LOWWEIGHT)
    assert not np.any(cat["flags"][(cat["y"] < 280) & (cat["x"] > 20)] & LOWWEIGHT)


def test_magzp_argument_overrides_the_header(coadd):
    path, grid, truth = coadd
    a = coadd_catalog(path, detect_sigma=5.0)
    b = coadd_catalog(path, magzp=MAGZP + 1.0, detect_sigma=5.0)
    assert np.allclose(b["mag"] - a["mag"], 1.0, equal_nan=True)


def test_the_single_frame_source_cap_does_not_apply(coadd):
    """A deep stack holds more sources than one frame: only ``max_sources`` caps it."""
    from photowatch.core.config import Sources

    path, *_ = coadd
    full = coadd_catalog(path, detect_sigma=3.0, settings=Sources(max_sources=10))
    assert len(full) > 10
    capped = coadd_catalog(path, detect_sigma=3.0, max_sources=10)
    assert len(capped) == 10
    assert np.nanmedian(capped["mag"]) < np.nanmedian(full["mag"]) - 1  # the brightest kept


def test_write_catalog_round_trip(coadd, tmp_path):
    path, grid, truth = coadd
    cat = coadd_catalog(path, detect_sigma=5.0)
    out = write_catalog(cat, catalog_path(tmp_path / "coadd_T1_SDSS-R.fits"), fsync=False)
    assert out.name == "coadd_T1_SDSS-R.cat.fits"
    with fits.open(out) as hdul:
        assert hdul[1].name == "CAT"
        assert hdul[0].header["MAGZP"] == MAGZP
        back = Table.read(hdul["CAT"])
    assert len(back) == len(cat)
    assert np.allclose(back["mag"], cat["mag"], equal_nan=True)


def test_merge_bands_matches_by_position(tmp_path):
    r_path, i_path = tmp_path / "coadd_T1_R.fits", tmp_path / "coadd_T1_I.fits"
    synthetic_coadd(r_path, seed=3)
    synthetic_coadd(i_path, seed=3, shift_px=(0.3, -0.2), magzp=26.5)
    r = coadd_catalog(r_path, detect_sigma=5.0)
    i = coadd_catalog(i_path, detect_sigma=5.0)
    i_extra = Table(i[:1], copy=True)
    i_extra["ra"] += 30 / 3600.0  # a source only in I, far from everything
    i_all = Table(np.concatenate([i.as_array(), i_extra.as_array()]))
    merged = merge_bands({"SDSS-R": r, "SDSS-I": i_all}, radius_arcsec=0.5)
    assert {"mag_SDSS_R", "magerr_SDSS_R", "mag_SDSS_I", "magerr_SDSS_I"} <= set(merged.colnames)
    both = merged["nbands"] == 2
    assert both.sum() >= 0.95 * min(len(r), len(i))
    assert len(merged) == both.sum() + (merged["nbands"] == 1).sum()
    # same stars, zero points 0.5 apart
    diff = merged["mag_SDSS_R"][both] - merged["mag_SDSS_I"][both]
    assert np.nanmedian(diff) == pytest.approx(0.5, abs=0.02)
    only_i = np.isnan(merged["mag_SDSS_R"]) & np.isfinite(merged["mag_SDSS_I"])
    assert only_i.sum() >= 1


def test_effective_gain_and_paths():
    members = Table({"weight": [1.0, 1.0, 2.0], "flxscale": [1.0, 1.0, 1.0]})
    assert effective_gain(members) == pytest.approx(16 / 6)
    assert effective_gain(None) == 1.0
    assert catalog_path("/x/coadd_A_R.fits").name == "coadd_A_R.cat.fits"
    assert isinstance(tan_grid((11, 13)), CoaddGrid)


def test_finalize_measures_coadds_with_the_sources_settings(coadd, monkeypatch):
    """finalize's coadd catalogues use [stages.sources] (aperture size, minimum area,
    aperture-correction radius), not built-in defaults: a wider aperture setting
    gives a proportionally wider aperture on the coadd."""
    path, _, _ = coadd
    seen = {}

    class Measured(Exception):
        pass

    def measure_then_stop(p, **kwargs):  # the real measurement; stop before the store
        seen["table"] = coadd_catalog(p, **kwargs)
        raise Measured

    monkeypatch.setattr(finalize, "coadd_catalog", measure_then_stop)
    default = coadd_catalog(path, detect_sigma=5.0)
    for aperture_fwhm in (1.5, 3.0):
        settings = Settings(stages={"sources": {"aperture_fwhm": aperture_fwhm}},
                            coadd={"detect_sigma": 5.0})
        engine = SimpleNamespace(settings=settings)
        with pytest.raises(Measured):
            finalize._catalogues(engine, "2026-01-01", {"T1": {"SDSS-R": (path, None, True)}})
        ratio = seen["table"].meta["APRAD"] / default.meta["APRAD"]
        assert ratio == pytest.approx(aperture_fwhm / 2.0, rel=0.05)
