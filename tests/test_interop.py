"""photowatch's products read right by the field's tools: astropy (CCDData, WCS, Table,
fits verify), SExtractor, SWarp and DS9 region files.

One small simulated night (its own seed) is reduced with its catalogue and finalized
once; a frame that cannot be solved is part of it (issue 17 item 5: its catalogue says
so). SExtractor and SWarp (Debian ``source-extractor``, ``swarp``; ``.ci/run`` installs
them) run on the products with nothing but the products' header keywords; without
them those tests are skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import ascii, fits
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from photowatch.core.config import Settings
from photowatch.core.schema import COLUMNS, KEYWORDS, keywords_markdown
from photowatch.run.batch import reduce_directory
from photowatch.run.finalize import finalize
from photowatch.sim.night import simulate_night
from photowatch.state.store import Store

SEXTRACTOR = shutil.which("source-extractor") or shutil.which("sex")
SWARP = shutil.which("SWarp") or shutil.which("swarp")
ROOT = Path(__file__).resolve().parents[1]

#: keywords of the FITS structure itself (astropy writes them, with its own comments or none)
STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "TFIELDS",
              "EXTNAME", "BSCALE", "BZERO", "END", "COMMENT", "HISTORY", "")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R",), seed=47,
                         n_bias=3, n_dark=2, n_flat=4, n_science=4, nosolve_frame=True)
    out = root / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                               progress=False)
    assert summary.ok, summary.problems
    result = finalize(settings)
    assert result.ok, result.problems
    rows = {r["raw_name"]: r for r in Store(out / "state.sqlite").frames(kind="object")}
    good = [rows[f.raw_name] for f in sim.objects(good_only=True)]
    nosolve = next(rows[f.raw_name] for f in sim.frames if f.expect == "nosolve")
    (coadd,) = Store(out / "state.sqlite").coadds()
    return sim, out, good, nosolve, coadd


def products(out: Path) -> list[Path]:
    return sorted((out / "reduced").rglob("*.fits")) + sorted((out / "coadds").rglob("*.fits"))


# ------------------------------------------------------------------------------ astropy

def test_ccddata_reads_a_product(night):
    _, _, good, _, _ = night
    path = good[0]["product"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ccd = CCDData.read(path, hdu="SCI", hdu_uncertainty="ERR", hdu_mask="MASK")
    assert ccd.unit == "electron"
    assert isinstance(ccd.uncertainty, StdDevUncertainty)
    assert ccd.mask.dtype == bool
    with fits.open(path) as h:
        assert np.array_equal(ccd.mask, h["MASK"].data != 0)
        assert np.array_equal(ccd.uncertainty.array, h["ERR"].data)
        assert ccd.mask.any() and not ccd.mask.all()
    assert ccd.wcs is not None and ccd.wcs.has_celestial


def test_every_product_verifies_and_reads_without_a_warning(night):
    """fits verify('exception'), WCS(header).printwcs() and Table.read of every FITS file
    photowatch published: no fix, no warning."""
    _, out, _, _, _ = night
    files = products(out)
    assert len(files) >= 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in files:
            with fits.open(path) as hdul:
                hdul.verify("exception")
                for hdu in hdul:
                    if hdu.is_image and hdu.header.get("NAXIS") == 2:
                        w = WCS(hdu.header)
                        if hdu.name in ("SCI", "WHT", "EXP", "NCOV") and "CTYPE1" in hdu.header:
                            assert w.has_celestial, (path.name, hdu.name)
                            w.printwcs()
                        assert hdu.header.get("MJDREF", 1) != 0, (path.name, hdu.name)
                        if "A_ORDER" in hdu.header:  # a SIP order comes with its terms
                            assert any(k.startswith("A_") and k != "A_ORDER"
                                       for k in hdu.header), path.name
                    elif isinstance(hdu, fits.BinTableHDU):
                        Table.read(hdu)


def test_every_card_photowatch_writes_has_a_comment(night):
    """Cards not copied from the raw file and not FITS structure carry a comment, and
    every photowatch keyword is in the keyword table."""
    sim, out, good, _, coadd = night
    raw = fits.getheader(sim.raw_dir / good[0]["raw_name"])
    files = [Path(good[0]["product"]), Path(coadd["path"]), Path(coadd["catalog"])]
    missing, unknown = [], set()
    for path in files:
        with fits.open(path) as hdul:
            for hdu in hdul:
                for card in hdu.header.cards:
                    key = card.keyword
                    if key in STRUCTURAL or key.startswith(("NAXIS", "TTYPE", "TFORM")):
                        continue
                    if key in raw and raw.comments[key] == card.comment:
                        continue  # the camera's own card, as it wrote it
                    if not card.comment.strip():
                        missing.append(f"{path.name}[{hdu.name}] {key}")
                    if not key.startswith(("TUNIT", "TCOMM", "CTYPE", "CRPIX", "CRVAL", "CD",
                                           "CUNIT", "A_", "B_", "AP_", "BP_", "WCSAXES",
                                           "LONPOLE", "LATPOLE", "RADESYS", "MASKB")) \
                            and key not in raw:
                        unknown.add(key)
    assert not missing, missing
    assert not unknown - set(KEYWORDS), sorted(unknown - set(KEYWORDS))


def test_the_keyword_table_in_docs_is_current():
    text = (ROOT / "docs" / "keywords.md").read_text()
    assert text == keywords_markdown(), "run: python -m photowatch.core.schema > docs/keywords.md"
    for key in ("GAIN", "GAINRAW", "SATURATE", "SATURRAW", "MAGZP", "XYORIGIN", "DATE-BEG"):
        assert f"`{key}`" in text


# ------------------------------------------------------------------------------ units

def test_gain_and_saturation_in_electrons(night):
    """GAIN = 1 with SCI in electrons; SATURATE is the lowest SCI value a saturated raw
    pixel took, to within a few per cent (no unsaturated star looks saturated)."""
    import json

    from photowatch.core.classify import FrameInfo
    from photowatch.stages.prepare import trim_slices

    sim, _, good, _, _ = night
    lowest = []
    for row in good:
        with fits.open(row["product"]) as h:
            sci, hdr = h["SCI"].data, h["SCI"].header
        assert hdr["GAIN"] == 1.0 and hdr["BUNIT"] == "electron"
        assert hdr["GAINRAW"] > 1 and hdr["SATURRAW"] > 1000
        assert "[adu]" in hdr.comments["SATURRAW"] and "[electron]" in hdr.comments["SATURATE"]
        info = FrameInfo.from_summary(json.loads(row["info_json"]))
        raw = fits.getdata(sim.raw_dir / row["raw_name"]).astype(float)
        rows, cols = trim_slices(info, raw.shape)
        saturated = raw[rows, cols] >= hdr["SATURRAW"]
        if saturated.sum() < 5:
            continue
        values = sci[saturated]
        assert np.all(values >= hdr["SATURATE"]), (values.min(), hdr["SATURATE"])
        lowest.append(values.min() / hdr["SATURATE"])
        # the raw level in electrons, less bias, flat and sky: within 10 % of it
        assert 0.9 < hdr["SATURATE"] / (hdr["SATURRAW"] * hdr["GAINRAW"]) < 1.0
    assert lowest, "no saturated star in the simulated frames"
    assert min(lowest) < 1.05  # SATURATE is not far below where saturation begins


def test_coadd_header_as_swarp_writes_it(night):
    _, _, good, _, coadd = night
    with fits.open(coadd["path"]) as h:
        hdr = h["SCI"].header
        members = Table.read(h["MEMBERS"])
    for key in ("DATE-OBS", "DATE-BEG", "DATE-END", "MJD-OBS", "MJD-MID", "EXPTIME",
                "NCOMBINE", "TELESCOP", "INSTRUME", "FILTER", "OBJECT", "GAIN", "SATURATE",
                "MAGZP", "STACKTYP"):
        assert key in hdr, key
    assert hdr["STACKTYP"] == "FINAL" and hdr["NCOMBINE"] == len(good) == len(members)
    assert hdr["EXPTIME"] == pytest.approx(sum(r["exptime"] for r in good))
    firsts = [fits.getheader(r["product"], "SCI") for r in good]
    assert hdr["MJD-OBS"] == pytest.approx(min(f["MJD-OBS"] for f in firsts), abs=1e-7)
    end = max(f["MJD-OBS"] + f["EXPTIME"] / 86400 for f in firsts)
    assert hdr["MJD-MID"] == pytest.approx((hdr["MJD-OBS"] + end) / 2, abs=1e-7)
    assert hdr["DATE-OBS"] == hdr["DATE-BEG"] < hdr["DATE-END"]
    assert hdr["TELESCOP"] == firsts[0]["TELESCOP"] and hdr["OBJECT"] == firsts[0]["OBJECT"]
    w, f = np.asarray(members["weight"]), np.asarray(members["flxscale"])
    assert hdr["GAIN"] == pytest.approx(w.sum() ** 2 / np.sum(w * w * f))
    assert 1 < hdr["GAIN"] <= len(members) * max(1 / f.min(), 1)
    assert hdr["SATURATE"] == pytest.approx(
        min(fh["SATURATE"] * fh["FLXSCALE"] for fh in firsts), rel=1e-4)


# ------------------------------------------------------------------------------ catalogues

def test_catalogues_share_one_schema_with_units(night):
    _, _, good, _, coadd = night
    frame = Table.read(good[0]["product"], hdu="CAT")
    cat = Table.read(coadd["catalog"], hdu="CAT")
    assert frame.colnames[:len(COLUMNS)] == list(COLUMNS) == cat.colnames[:len(COLUMNS)]
    for t in (frame, cat):
        assert t["ra"].unit == "deg" and t["x"].unit == "pix" and t["mag"].unit == "mag"
        assert t["flux"].unit == "ct" and t["mag_inst"].unit == "mag"
    with fits.open(good[0]["product"]) as h:
        hdr = h["CAT"].header
        assert hdr["XYORIGIN"] == 1
        i = frame.colnames.index("x") + 1
        assert "first pixel centre = 1" in hdr[f"TCOMM{i}"]


def test_positions_are_one_based_as_in_fits(night):
    """The CAT ra/dec come from x, y through the header WCS with origin 1."""
    _, _, good, _, _ = night
    prod = good[0]["product"]
    cat = Table.read(prod, hdu="CAT")
    w = WCS(fits.getheader(prod, "SCI"))
    ra, dec = w.all_pix2world(cat["x"], cat["y"], 1)
    sep = np.hypot((ra - cat["ra"]) * np.cos(np.radians(dec)), dec - cat["dec"]) * 3600
    assert np.max(sep) < 1e-3


def test_a_frame_without_a_solution_says_so_in_its_catalogue(night):
    """Issue 17 item 5: no ra/dec from the header pointing, no instrumental mag as mag."""
    _, out, good, nosolve, _ = night
    assert nosolve["state"] == "rejected"
    with fits.open(nosolve["product"]) as h:
        cat = Table.read(h["CAT"], mask_invalid=False)
        assert h["SCI"].header["ASTSTAT"] == "failed" and "CTYPE1" not in h["SCI"].header
        assert h["SCI"].header["MAGSYS"] == "none"
    assert len(cat) > 10
    assert np.all(np.isnan(cat["ra"])) and np.all(np.isnan(cat["dec"]))
    assert np.all(np.isnan(cat["mag"]))
    ok = cat["flux"] > 0
    assert np.allclose(cat["mag_inst"][ok], -2.5 * np.log10(cat["flux"][ok]))
    reg = Path(nosolve["product"]).with_suffix(".reg").read_text().splitlines()
    assert "image" in reg and not any(line == "icrs" for line in reg)
    # a calibrated frame: mag = MAGZP - 2.5 log10(flux) beside mag_inst
    cal = Table.read(good[0]["product"], hdu="CAT", mask_invalid=False)
    zp = fits.getheader(good[0]["product"], "SCI")["MAGZP"]
    use = cal["flux"] > 0
    assert np.nanmedian(cal["mag"][use] - cal["mag_inst"][use]) == pytest.approx(zp, abs=0.02)


def test_ds9_regions_beside_every_product(night):
    _, out, good, _, coadd = night
    for path in [Path(r["product"]) for r in good] + [Path(coadd["path"])]:
        reg = path.with_suffix(".reg")
        lines = reg.read_text().splitlines()
        assert lines[0] == "# Region file format: DS9 version 4.1"
        assert "icrs" in lines  # absolute solutions: sky coordinates
        cat = Table.read(path.with_name(path.name.replace(".fits", ".cat.fits"))
                         if path.name.startswith("coadd_") else path, hdu="CAT")
        circles = [ln for ln in lines if ln.startswith("circle(")]
        assert len(circles) == len(cat)
        ra, dec = (float(v) for v in circles[0][7:].split(",")[:2])
        assert ra == pytest.approx(cat["ra"][0], abs=1e-6)
        assert dec == pytest.approx(cat["dec"][0], abs=1e-6)


# ------------------------------------------------------------------------------ SExtractor

def run_sextractor(image: str, folder: Path, magzp: float, aper_diam: float) -> Table:
    params = folder / "p.param"
    params.write_text("\n".join(["NUMBER", "XWIN_IMAGE", "YWIN_IMAGE", "FLUX_APER",
                                 "FLUXERR_APER", "MAG_APER", "MAGERR_APER", "MAG_AUTO",
                                 "MAGERR_AUTO", "FLAGS"]) + "\n")
    out = folder / "sex.cat"
    conf = folder / "default.sex"
    conf.write_text(subprocess.run([SEXTRACTOR, "-dd"], capture_output=True, text=True,
                                   check=True).stdout)
    # GAIN and SATURATE come from the image header (GAIN_KEY, SATUR_KEY: the defaults)
    subprocess.run([SEXTRACTOR, image, "-c", str(conf), "-PARAMETERS_NAME", str(params),
                    "-CATALOG_NAME", str(out), "-CATALOG_TYPE", "ASCII_HEAD", "-FILTER", "N",
                    "-DETECT_THRESH", "5", "-MAG_ZEROPOINT", f"{magzp:.5f}",
                    "-PHOT_APERTURES", f"{aper_diam:.4f}", "-VERBOSE_TYPE", "QUIET"],
                   check=True, capture_output=True, cwd=folder)
    return ascii.read(out, format="sextractor")


@pytest.mark.skipif(SEXTRACTOR is None, reason="SExtractor (Debian package source-extractor) "
                    "is not installed")
def test_sextractor_agrees_with_cat(night, tmp_path):
    """SExtractor on SCI with the header keywords alone: same positions (1-based), same
    aperture magnitudes (median offset <= 0.03 mag) and errors (ratio within 10 %)."""
    _, _, good, _, _ = night
    dmag, ratio, dpos, dauto = [], [], [], []
    for row in good:
        path = row["product"]
        hdr = fits.getheader(path, "SCI")
        cat = Table.read(path, hdu="CAT")
        aprad = fits.getheader(path, "CAT")["APRAD"]
        sx = run_sextractor(f"{path}[1]", tmp_path, hdr["MAGZP"], 2 * aprad)
        d, i = cKDTree(np.c_[sx["XWIN_IMAGE"], sx["YWIN_IMAGE"]]).query(np.c_[cat["x"],
                                                                               cat["y"]])
        ok = ((d < 1) & (cat["flags"] == 0) & cat["stellar"] & (cat["snr"] > 30)
              & (sx["FLAGS"][i] == 0))
        m = sx[i[ok]]
        c = cat[ok]
        mag_ap = hdr["MAGZP"] - 2.5 * np.log10(c["flux_aper"])
        err_ap = 2.5 / np.log(10) * c["fluxerr_aper"] / c["flux_aper"]
        dmag += list(m["MAG_APER"] - mag_ap)
        ratio += list(m["MAGERR_APER"] / err_ap)
        dpos += list(np.hypot(m["XWIN_IMAGE"] - c["x"], m["YWIN_IMAGE"] - c["y"]))
        dauto += list(m["MAG_AUTO"] - c["mag"])
    assert len(dmag) > 40
    assert abs(np.median(dmag)) <= 0.03, np.median(dmag)
    assert abs(np.median(ratio) - 1) <= 0.10, np.median(ratio)
    assert np.median(dpos) < 0.05, np.median(dpos)  # 0-based positions would be 1.4 px off
    # MAG_AUTO's Kron aperture misses a few per cent of a star's light; CAT mag is total
    assert 0 < np.median(dauto) < 0.1, np.median(dauto)


# ------------------------------------------------------------------------------ SWarp

@pytest.mark.skipif(SWARP is None, reason="SWarp (Debian package swarp) is not installed")
def test_swarp_stack_aligns_with_the_coadd(night, tmp_path):
    """SWarp stacks two products (SCI, header keywords alone: WCS, GAIN, SATURATE, FLXSCALE)
    onto photowatch's coadd grid; the stars land where photowatch put them (<= 0.05 px)."""
    import sep

    _, _, good, _, coadd = night
    sci = fits.getheader(coadd["path"], "SCI")
    head = fits.Header()
    for key in ("NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1",
                "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CUNIT1", "CUNIT2", "RADESYS"):
        if key in sci:
            head[key] = sci[key]
    (tmp_path / "sw.head").write_text(head.tostring(sep="\n", endcard=True, padding=False))
    conf = tmp_path / "default.swarp"
    conf.write_text(subprocess.run([SWARP, "-dd"], capture_output=True, text=True,
                                   check=True).stdout)
    subprocess.run([SWARP, *(f"{r['product']}[1]" for r in good[:2]), "-c", str(conf),
                    "-IMAGEOUT_NAME", "sw.fits", "-WEIGHTOUT_NAME", "sw.weight.fits",
                    "-COMBINE_TYPE", "WEIGHTED", "-SUBTRACT_BACK", "N", "-VERBOSE_TYPE",
                    "QUIET", "-WRITE_XML", "N"], check=True, capture_output=True, cwd=tmp_path)
    with fits.open(tmp_path / "sw.fits") as h:
        swarp = h[0].data.astype(np.float64)
        assert h[0].header["GAIN"] > 1  # SWarp read the products' GAIN = 1 and combined
    ours = np.nan_to_num(fits.getdata(coadd["path"], "SCI").astype(np.float64))

    def stars(img):
        empty = img == 0  # no data (SWarp: 0, ours: NaN)
        bkg = sep.Background(img, mask=empty)
        img = img - bkg.back()
        obj = sep.extract(img, 20, err=bkg.globalrms, mask=empty)
        x, y, _ = sep.winpos(img, obj["x"], obj["y"], np.full(len(obj), 1.5))
        return np.c_[x, y]

    a, b = stars(ours), stars(swarp)
    d, i = cKDTree(b).query(a)
    ok = d < 1
    assert ok.sum() > 20
    dx, dy = b[i[ok], 0] - a[ok, 0], b[i[ok], 1] - a[ok, 1]
    assert abs(np.median(dx)) <= 0.05 and abs(np.median(dy)) <= 0.05, (np.median(dx),
                                                                        np.median(dy))


def test_a_frame_without_a_zero_point_stays_out_of_a_calibrated_coadd(tmp_path, monkeypatch):
    """Issue 17 item 5: the catalogue is unavailable for one frame of a calibrated night. It
    is registered relatively, gets no zero point, its mag is NaN, and it is not stacked: a
    coadd on a zero point never takes a frame scaled to another reference."""
    from photowatch.run.engine import Engine

    sim = simulate_night(tmp_path / "sim", size=512, binning=4, filters=("SDSS-R",), seed=53,
                         n_bias=3, n_dark=0, n_flat=4, n_science=4)
    objects = sim.objects(good_only=True)
    victim = objects[-1].raw_name
    real = Engine.reference_stars  # the night context's catalogue provider

    def flaky(engine, info, *args, **kwargs):
        if info.raw_name == victim:
            raise OSError("catalogue server down")
        return real(engine, info, *args, **kwargs)

    monkeypatch.setattr(Engine, "reference_stars", flaky)
    out = tmp_path / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                               progress=False)
    assert summary.ok, summary.problems
    store = Store(out / "state.sqlite")
    rows = {r["raw_name"]: r for r in store.frames(kind="object")}
    row = rows[victim]
    with fits.open(row["product"]) as h:
        assert h["SCI"].header["ABSCAL"] is False and "MAGZP" not in h["SCI"].header
        assert "FLXSCALE" not in h["SCI"].header
        cat = Table.read(h["CAT"], mask_invalid=False)
    assert np.all(np.isnan(cat["mag"])) and np.isfinite(cat["mag_inst"]).any()
    (coadd,) = store.coadds()
    assert coadd["magzp"] is not None
    members = " ".join(__import__("json").loads(coadd["members_json"]))
    assert row["name"] not in members
    assert all(rows[f.raw_name]["name"] in members for f in objects[:-1])


def test_a_sip_order_without_terms_is_written_as_plain_tan():
    """astropy writes A_ORDER = 2 and no terms for a SIP whose terms are all zero; the
    product says TAN instead, and keeps real SIP terms."""
    from astropy.wcs import Sip

    from photowatch.core.frame import Frame
    from photowatch.io.products import sci_header
    from photowatch.stages.astrometry import wcs_cards

    def header_for(a):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crval, w.wcs.crpix = [150.0, 2.0], [50.5, 50.5]
        w.wcs.cd = [[-1e-4, 0], [0, 1e-4]]
        w.sip = Sip(a, np.zeros((3, 3)), None, None, w.wcs.crpix)
        frame = Frame(sci=np.zeros((100, 100), np.float32), var=np.ones((100, 100), np.float32),
                      mask=np.zeros((100, 100), np.uint16), header=fits.Header())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sci_header(frame, wcs_cards(w))

    plain = header_for(np.zeros((3, 3)))
    assert plain["CTYPE1"] == "RA---TAN" and "A_ORDER" not in plain
    a = np.zeros((3, 3))
    a[2, 0] = 1e-6
    sip = header_for(a)
    assert sip["CTYPE1"] == "RA---TAN-SIP" and sip["A_2_0"] == pytest.approx(1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for hdr in (plain, sip):
            assert WCS(hdr).has_celestial
