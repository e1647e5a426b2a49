"""Reference catalogues: local files, the per-field cache of online providers (offline)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from photowatch.core.config import Catalog
from photowatch.core.errors import ConfigError, StageFailed
from photowatch.io import catalogs
from photowatch.io.catalogs import (
    CatalogUnavailable,
    LocalCatalog,
    OnlineCatalog,
    angular_distance_deg,
    at_epoch,
    cone_cut,
    field_cone,
    open_catalog,
    quantized_cone,
)


def _stars(n=500, ra0=150.0, dec0=40.0, half=0.3, seed=0):
    rng = np.random.default_rng(seed)
    ra = ra0 + rng.uniform(-half, half, n) / np.cos(np.radians(dec0))
    dec = dec0 + rng.uniform(-half, half, n)
    return ra, dec, rng.uniform(12, 20, n)


@pytest.mark.parametrize("fmt", ["ecsv", "csv", "fits"])
def test_local_catalog_formats_columns_and_cone(tmp_path, fmt):
    ra, dec, r = _stars()
    t = Table({"RA_deg": ra, "DEC_deg": dec, "rmag": r, "e_rmag": np.full(len(r), 0.02),
               "gmag": r + 0.5})
    path = tmp_path / f"cat.{fmt}"
    t.write(path, format={"ecsv": "ascii.ecsv", "csv": "ascii.csv", "fits": "fits"}[fmt])
    settings = Catalog(path=str(path), ra_column="ra_deg", dec_column="DEC_deg",
                       mag_column="{band}mag", err_column="e_{band}mag")
    provider = open_catalog(settings)
    assert isinstance(provider, LocalCatalog) and provider.name == f"local:cat.{fmt}"
    out = provider.query(150.0, 40.0, 0.1, bands=["r", "g"])
    d = angular_distance_deg(ra, dec, 150.0, 40.0)
    assert len(out) == (d <= 0.1).sum() > 10
    assert {"ra", "dec", "r", "r_err", "g", "g_err"} <= set(out.colnames)
    assert np.all(np.isnan(out["g_err"]))  # no e_gmag column
    assert np.allclose(out["r_err"], 0.02)
    assert out.meta["provider"] == provider.name and out.meta["bands"] == ["r", "g"]
    box = provider.query(150.0, 40.0, 0.1, box=True)
    assert len(box) > len(out)
    with pytest.raises(ConfigError, match="band 'z'"):
        provider.query(150.0, 40.0, 0.1, bands=["z"])


def test_local_catalog_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="catalog.path"):
        open_catalog(Catalog(path=str(tmp_path / "missing.ecsv")))
    path = tmp_path / "c.ecsv"
    Table({"alpha": [1.0], "delta": [2.0]}).write(path)
    with pytest.raises(ConfigError, match="catalog.ra_column"):
        LocalCatalog(path).query(1.0, 2.0, 1.0)


def test_open_catalog_choices(tmp_path):
    path = tmp_path / "c.ecsv"
    Table({"ra": [1.0], "dec": [2.0]}).write(path)
    assert open_catalog(Catalog(provider="none")) is None
    assert open_catalog(Catalog(provider="local")) is None  # no file: relative mode
    assert isinstance(open_catalog(Catalog(provider="none"), path_override=path), LocalCatalog)
    online = open_catalog(Catalog(provider="gaia"), cache_dir=tmp_path)
    assert isinstance(online, OnlineCatalog) and online.cache_dir == tmp_path / "gaia"
    phot = catalogs.open_photometry_catalog(Catalog(photometry_provider="panstarrs"))
    assert isinstance(phot, OnlineCatalog) and phot.provider == "panstarrs"


def test_cone_and_box_cut_across_ra_zero():
    t = Table({"ra": [359.95, 0.05, 180.0], "dec": [0.0, 0.0, 0.0]})
    assert len(cone_cut(t, 0.0, 0.0, 0.1)) == 2
    assert len(cone_cut(t, 0.0, 0.0, 0.1, box=True)) == 2


def test_field_cone_covers_the_image():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.crpix = [50.5, 50.5]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) / 3600
    ra, dec, r = field_cone(w, (100, 100), margin=1.0, extra_arcsec=60.0)
    assert ra == pytest.approx(10.0) and dec == pytest.approx(20.0)
    assert r * 3600 == pytest.approx(50 * np.sqrt(2) + 60.0, rel=1e-3)


def test_quantized_cone_covers_the_request_and_is_shared_by_dithers():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ra, dec = rng.uniform(0, 360), rng.uniform(-85, 85)
        r = rng.uniform(0.02, 0.5)
        qra, qdec, qr = quantized_cone(ra, dec, r)
        assert angular_distance_deg(ra, dec, qra, qdec) + r <= qr
    a = quantized_cone(150.0, 40.0, 0.1)
    b = quantized_cone(150.0 + 20 / 3600, 40.0 - 10 / 3600, 0.1)  # a dither
    assert a == b


def _fake_vizier(calls, rows=400, fail=False):
    def query(catalog, ra, dec, radius, *, columns, timeout_s, row_limit):
        calls.append((catalog, ra, dec, radius))
        if fail:
            raise ConnectionError("network is unreachable")
        rng = np.random.default_rng(len(calls))
        r = radius * np.sqrt(rng.uniform(0, 1, rows))
        th = rng.uniform(0, 2 * np.pi, rows)
        # the first two requested columns are RA and Dec, the rest magnitudes and errors
        t = Table({columns[0]: ra + r * np.cos(th) / np.cos(np.radians(dec)),
                   columns[1]: dec + r * np.sin(th)})
        for col in columns[2:]:
            t[col] = np.full(rows, 0.003) if col.startswith("e_") else rng.uniform(10, 20, rows)
        if "pmDE" in columns:
            t["pmRA"] = np.zeros(rows)
            t["pmDE"] = np.full(rows, 100.0)
        if "Gmag" not in columns:
            return t
        t["Gmag"] = np.ma.masked_array(t["Gmag"], mask=np.arange(rows) == 0)
        return t

    return query


def test_online_provider_caches_per_field_and_survives_the_network(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(catalogs, "vizier_query", _fake_vizier(calls))
    gaia = OnlineCatalog("gaia", cache_dir=tmp_path, timeout_s=5)
    t1 = gaia.query(150.0, 40.0, 0.1, bands=["G"])
    assert len(calls) == 1 and calls[0][0] == "I/355/gaiadr3"
    assert {"ra", "dec", "G", "G_err", "BP", "RP", "pmra", "pmdec"} <= set(t1.colnames)
    assert np.isnan(t1["G"]).sum() <= 1  # a masked magnitude becomes NaN
    assert t1.meta["epoch"] == 2016.0 and t1.meta["provider"].startswith("gaia")
    assert np.all(angular_distance_deg(t1["ra"], t1["dec"], 150.0, 40.0) <= 0.1)
    files = list((tmp_path / "gaia").glob("*.ecsv"))
    assert len(files) == 1
    # a dithered frame of the same field: no new query
    gaia.query(150.0 + 15 / 3600, 40.0 + 10 / 3600, 0.1)
    assert len(calls) == 1
    # a new process with no network uses the disk cache
    monkeypatch.setattr(catalogs, "vizier_query", _fake_vizier(calls, fail=True))
    again = OnlineCatalog("gaia", cache_dir=tmp_path)
    t2 = again.query(150.0, 40.0, 0.1, bands=["G"])
    assert len(t2) == len(t1)
    # a field never seen, and no network: a clear error naming the cache
    with pytest.raises(CatalogUnavailable, match="network is unreachable.*no cached result"):
        again.query(210.0, -10.0, 0.1)
    assert issubclass(CatalogUnavailable, StageFailed)
    with pytest.raises(ConfigError, match="no band 'r'"):
        again.query(150.0, 40.0, 0.1, bands=["r"])


def test_online_provider_without_cache_dir_remembers_in_memory(monkeypatch):
    calls: list = []
    monkeypatch.setattr(catalogs, "vizier_query", _fake_vizier(calls))
    ps1 = OnlineCatalog("panstarrs")
    ps1.query(10.0, -5.0, 0.05)
    ps1.query(10.0, -5.0, 0.05)
    assert len(calls) == 1


def test_missing_astroquery_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_astroquery(name, *args, **kwargs):
        if name.startswith("astroquery"):
            raise ImportError("No module named 'astroquery'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_astroquery)
    with pytest.raises(CatalogUnavailable, match=r"photowatch\[online\]"):
        OnlineCatalog("2mass").query(10.0, 10.0, 0.05)


def test_at_epoch_applies_proper_motion():
    t = Table({"ra": [10.0], "dec": [60.0], "pmra": [1000.0], "pmdec": [-2000.0]})
    t.meta["epoch"] = 2016.0
    moved = at_epoch(t, 2026.0)
    assert (moved["dec"][0] - 60.0) * 3.6e6 == pytest.approx(-20000.0)
    assert (moved["ra"][0] - 10.0) * 3.6e6 * np.cos(np.radians(60.0)) == \
        pytest.approx(10000.0, rel=1e-3)
    assert moved.meta["epoch"] == 2026.0
    plain = Table({"ra": [1.0], "dec": [2.0]})
    assert at_epoch(plain, 2026.0) is plain
