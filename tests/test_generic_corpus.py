"""The generic profile on real headers of 16 instrument groups (shared/data/headers).

Every frame classifies with the right type, filter and exposure; the assumptions it
makes name their keyword; ``photowatch inspect`` runs on every folder, and the profile
it writes classifies the folder's frames the same way without a single assumption.
The corpus is read in place (never written); tests skip where it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photowatch.cli import main
from photowatch.core.classify import classify, parse_section
from photowatch.core.config import Settings
from photowatch.core.errors import FrameIgnored
from photowatch.core.instruments import load_profile, load_profile_file
from photowatch.run.inspect import inspect_dir, read_any_header, write_profile

CORPUS = Path(os.environ.get("PHOTOWATCH_HEADER_CORPUS", "/work/shared/data/headers"))
if not CORPUS.is_dir():
    CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "headers"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="header corpus not present")
FOLDERS = sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.is_dir() else []

U = "unknown"
#: file → (type, filter, exposure s); "ignored" for guide/trailed/experimental frames
EXPECTED = {
    "APT_ZWO_ASI294MCPro.hdr": ("object", U, 240.0),
    "DWARFII.hdr": ("object", U, 15.0),
    "NINA_ZWO_ASI294MCPro.hdr": ("object", U, 30.0),
    "SGP_ZWO_ASI294MCPro.hdr": ("object", "HaOIII", 30.0),
    "Seestar_S50_stack.hdr": ("object", "IRCUT", 10.0),
    "SharpCap_ZWO_ASI290MMMini.hdr": ("object", U, 2.0),
    "fitsheader-megaprime.hdr": ("object", "i.MP9702", 615.037),
    "fitsheader-decam-0160496.hdr": ("bias", None, 0.0),
    "fitsheader-decam-raw_dec050441_25.hdr": ("object", "g", 30.0),
    "fitsheader-decam.hdr": ("object", "z", 200.0),
    "celestron_nightscape_10100_astro_fx_v106.fit": ("object", U, 60.0),
    "aspen_trimmed.fit": ("flat", "R", 1.0),
    "biastest1.fit": ("bias", None, 0.0),
    "darktest1.fit": ("dark", None, 30.0),
    "flattest.fit": ("bias", None, 0.0),  # IMAGETYP='BIAS', 0 s: the file name lies
    "maximdl_5_21_header.fit": ("object", "R", 90.0),
    "maximdl_5_23_header.fit": ("object", "B", 90.0),
    "maximdl_6_16_header.fit": ("object", "B", 90.0),
    "maximdl_6_18_header.fit": ("object", "r", 90.0),
    "sip-wcs.fit": ("object", "B", 120.0),
    "uint16.fit": ("object", "R", 90.0),
    "M51.hdr": ("object", U, 600.0),
    "coj1m011-fl08-20151216-0048-x00.fits.fz": ("ignored", None, None),
    "coj1m011-fl08-20151216-0049-b00.fits.fz": ("bias", None, 0.0),
    "coj1m011-fl08-20151216-0083-d00.fits.fz": ("dark", None, 900.0),
    "cpt1m012-fl10-20151216-0044-f00.fits.fz": ("flat", "Y", 2.212),
    "cpt1m012-fl10-20151216-0073-e00.fits.fz": ("object", "ip", 15.0),
    "cpt1m012-fl10-20151216-0075-s00.fits.fz": ("object", "I", 60.0),
    "coj1m011-kb05-20150219-0125-e90.fits.fz": ("object", "V", 10.0),
    "sqa0m801-kb35-20151216-0966-g00.fits": ("ignored", None, None),
    "tfn0m414-kb29-20151216-0380-t00.fits.fz": ("ignored", None, None),
    "WMD-ea03-20190709-00000685-E00.hdr": ("object", "w", 3.0),
    "a8280271.fits": ("object", "48", 150.04),
    "neon-on-dome-10-sec-high-res-though-scope.fit": ("object", U, 10.0),
    "sbig-snap_example_M42.hdr": ("object", "Astrodon Tru-balance E-series NIR blocked L", 1.0),
    "fitsheader-sdss-fpC-006377-g4-0399.hdr": ("object", "g", 53.907456),
    "fitsheader-hsc-HSCA04090107.hdr": ("object", "HSC-r", 150.0),
    "fitsheader-hsc.hdr": ("object", "HSC-i", 30.0),
    "fitsheader-suprimecam-CORR40535770.hdr": ("object", "r", 200.0),
    "MaximDL_iTelescope_T33_Apogee_calibrated.hdr": ("object", "SII", 300.0),
}


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix not in (".yaml",
                                                                                   ".md"))


@needs_corpus
def test_every_corpus_frame_classifies_right():
    generic = load_profile("generic")
    files = corpus_files()
    assert {f.name for f in files} == set(EXPECTED), "corpus changed: update the table"
    for path in files:
        kind, filt, exptime = EXPECTED[path.name]
        header = read_any_header(path)
        if kind == "ignored":
            with pytest.raises(FrameIgnored):
                classify(header, path.name, generic)
            continue
        info = classify(header, path.name, generic)
        assert (info.kind, info.filter) == (kind, filt), path.name
        assert info.exptime_s == pytest.approx(exptime), path.name
        for keyword, _value, assumption in info.assumptions:
            assert keyword and assumption, (path.name, keyword)


@needs_corpus
def test_corpus_oddities_read_right():
    def info(folder, name):
        path = CORPUS / folder / name
        return classify(read_any_header(path), name, load_profile("generic"))

    lco = info("LCO_1m_Sinistro", "coj1m011-fl08-20151216-0049-b00.fits.fz")
    assert lco.gain == pytest.approx(2.0175) and lco.gain_source == "header"  # string list
    assert lco.binning == "2x2" and lco.datasec is None  # 4k unbinned DATASEC fits nothing
    assert {a[0] for a in lco.assumptions} >= {"DATASEC", "BIASSEC"}
    saao = info("SAAO_1.0m_STE3", "a8280271.fits")  # blanks inside the brackets
    assert saao.trimsec == (0, 520, 16, 528) and saao.biassec == (0, 520, 3, 13)
    assert saao.ra_deg == pytest.approx(331.0333, abs=1e-3)  # ' 22:04:08'
    assert saao.obs_time.isoformat().startswith("2013-07-13T00:57:33")  # date + UT
    sdss = info("SDSS_2.5m_imaging", "fitsheader-sdss-fpC-006377-g4-0399.hdr")
    assert sdss.obs_time.isoformat().startswith("2006-09-20T06:00:49")  # TAI - 33 s
    kpno = info("KPNO_legacy_1987_IRAF", "M51.hdr")
    assert kpno.obs_time.isoformat().startswith("1987-04-05T09:27:27")  # dd/mm/yy
    dwarf = info("Amateur_CMOS_ZWO_etc", "DWARFII.hdr")
    assert dwarf.binning == "2x2" and dwarf.ra_deg is None and dwarf.gain_source == "measure"
    assert ("GAIN", "110") in {a[:2] for a in dwarf.assumptions}
    apt = info("Amateur_CMOS_ZWO_etc", "APT_ZWO_ASI294MCPro.hdr")
    assert apt.gain == pytest.approx(1.00224, abs=1e-4)  # EGAIN, not the GAIN=120 setting
    hsc = info("Subaru_HSC", "fitsheader-hsc-HSCA04090107.hdr")
    assert 3.1 < hsc.gain < 3.5 and hsc.gain_source == "header"  # GAIN=0.0 → T_GAIN1..4
    mega = info("CFHT_MegaPrime", "fitsheader-megaprime.hdr")
    assert mega.biassec is None and mega.datasec == (0, 4612, 32, 2080)
    decam = info("CTIO_4m_DECam", "fitsheader-decam.hdr")
    assert decam.gain == pytest.approx((4.59347726229 + 4.4014084507) / 2)
    maxim = info("Feder_Observatory_MaxImDL", "maximdl_5_21_header.fit")
    assert maxim.ra_deg == pytest.approx(135.5917, abs=1e-3)  # OBJCTRA '09 02 22'


@needs_corpus
@pytest.mark.parametrize("folder", FOLDERS)
def test_inspect_writes_a_profile_that_needs_no_assumptions(folder, tmp_path, capsys):
    rawdir = CORPUS / folder
    assert main(["inspect", str(rawdir), "--json", "--write-profile",
                 str(tmp_path / "mine.toml")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == sum(1 for f in corpus_files() if f.parent.name == folder)
    profile = load_profile_file(tmp_path / "mine.toml")
    assert profile.name != "generic"
    again = inspect_dir(rawdir, Settings(), profile=profile)
    for before, after in zip(rows, again):
        assert after.state == before["state"], after.file
        if after.state != "ok":
            continue
        assert after.assumptions == [], (after.file, after.assumptions)
        for key in ("kind", "filter", "exptime_s", "binning", "obs_time"):
            assert after.info[key] == before["info"][key], (after.file, key)


def test_inspect_profile_states_a_missing_filter_and_gain(tmp_path):
    h = fits.Header()
    h["INSTRUME"] = "NoName CCD"
    h["DATE-OBS"] = "2024-05-01T03:00:00"
    h["EXPTIME"] = 30.0
    h["IMAGETYP"] = "LIGHT"
    h["GAIN"] = 120
    fits.PrimaryHDU(header=h).writeto(tmp_path / "a.fits")
    h["EXPTIME"] = 0.0
    h["IMAGETYP"] = "DARK"
    h["OBJECT"] = "bias"
    fits.PrimaryHDU(header=h).writeto(tmp_path / "b.fits")
    rows = inspect_dir(tmp_path, Settings())
    assert [r.info["kind"] for r in rows] == ["object", "bias"]
    assert "zero-second" in rows[1].info["type_reason"]
    path = write_profile(rows, tmp_path / "p.toml")
    text = path.read_text()
    assert "measure_gain = true" in text and 'filter_default = "unknown"' in text
    again = inspect_dir(tmp_path, Settings(), profile=load_profile_file(path))
    assert all(r.assumptions == [] for r in again)


def test_generic_quarantines_nothing_it_can_read(tmp_path):
    """Only pixels that cannot be read quarantine a frame: a header without a date, type,
    exposure, filter or gain is classified with assumptions, each warned once per night."""
    from datetime import UTC, datetime

    from photowatch.run.ingest import ingest_file
    from photowatch.state.store import Store

    store = Store(tmp_path / "s.sqlite")
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        h = fits.Header()
        h["INSTRUME"] = "Mystery"
        h["DATE-OBS"] = "the first night"
        h["OBJECT"] = "M 42"
        fits.PrimaryHDU(np.full((8, 8), i, np.uint16), h).writeto(raw / f"m{i}.fits")
    (raw / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    settings = Settings()
    for path in sorted(raw.iterdir()):
        ingest_file(store, path, settings)
    rows = {r["raw_name"]: r for r in store.frames()}
    assert rows["broken.fits"]["state"] == "quarantined"
    for i in range(3):
        row = rows[f"m{i}.fits"]
        assert row["state"] == "received", row["reason"]
        info = json.loads(row["info_json"])
        assert info["kind"] == "object" and info["filter"] == "unknown"
        assert info["exptime_s"] == 1.0 and info["gain_source"] == "measure"
        mtime = datetime.fromtimestamp((raw / f"m{i}.fits").stat().st_mtime, UTC)
        assert abs((datetime.fromisoformat(info["obs_time"]) - mtime).total_seconds()) < 1
    warned = [e["message"] for e in store.events(level="problems", limit=100)
              if e["event"] == "header_assumption"]
    assert len(warned) == len({w.split(":")[0].split("=")[0] for w in warned}) >= 5, warned
    assert any(w.startswith("DATE-OBS='the first night'") for w in warned), warned


@pytest.mark.parametrize("text, binning, ccdsec, expect, note", [
    ("[  17: 528,   1: 520]", "1x1", None, (0, 520, 16, 528), None),  # blanks (SAAO)
    ("[528:17,520:1]", "1x1", None, (0, 520, 16, 528), None),  # reversed ranges
    ("17:528,1:520", "1x1", None, (0, 520, 16, 528), None),  # no brackets
    ("[1:2048,1:2048]", "4x4", None, (0, 512, 0, 512), "converted"),  # unbinned full chip
    ("[201:2248,121:2168]", "4x4", "[201:2248,121:2168]", (0, 512, 0, 512), "converted"),
    ("[1:4094,1:4096]", "1x1", None, None, "does not fit"),  # LCO Sinistro
    ("UNKNOWN", "1x1", None, None, "placeholder"),
    ("[0:0,0:0]", "1x1", None, None, "placeholder"),
    ("[1:0,1:0]", "1x1", None, None, "placeholder"),
    ("garbage", "1x1", None, None, "not a FITS section"),
])
def test_section_variants(text, binning, ccdsec, expect, note):
    h = fits.Header()
    h["IMAGETYP"] = "LIGHT"
    h["DATE-OBS"] = "2024-01-01T00:00:00"
    h["EXPTIME"] = 5.0
    h["NAXIS1"], h["NAXIS2"] = 544, 520
    h["CCDSUM"] = binning.replace("x", " ")
    if ccdsec:
        h["CCDSEC"] = ccdsec
    h["DATASEC"] = text
    info = classify(h, "x.fits", load_profile("generic"))
    assert info.datasec == expect
    notes = [a[2] for a in info.assumptions if a[0] == "DATASEC"]
    assert (not notes) if note is None else (note in notes[0]), notes
    with pytest.raises(ValueError):  # the strict parser of named profiles is unchanged
        parse_section("[528:17,520:1]")


@needs_corpus
def test_compressed_pixels_are_read(tmp_path):
    """fpack float32 with an empty primary and a (1, ny, nx) array; gzip named .fits."""
    import gzip

    from photowatch.io.fits import fits_incomplete_reason, read_header, read_raw

    path = CORPUS / "LCO_1m_Sinistro" / "coj1m011-fl08-20151216-0049-b00.fits.fz"
    data, header = read_raw(path)
    assert data.shape == (1024, 1040) and data.dtype == np.float32
    assert header["OBSTYPE"] == "BIAS" and read_header(path)["OBSTYPE"] == "BIAS"
    assert np.isfinite(data).all() and 100 < np.median(data) < 5000
    plain = CORPUS / "Feder_Observatory_MaxImDL" / "uint16.fit"
    named = tmp_path / "gzipped.fits"
    named.write_bytes(gzip.compress(plain.read_bytes()))
    assert fits_incomplete_reason(named) is None
    assert np.array_equal(read_raw(named)[0], read_raw(plain)[0])


@pytest.mark.parametrize("level, kind", [(30000, "flat"), (900, "object")])
def test_object_named_like_a_flat_is_weighed_against_its_level(tmp_path, level, kind):
    from photowatch.run.ingest import ingest_file
    from photowatch.state.store import Store

    h = fits.Header()
    h["OBSTYPE"] = "OBJECT"
    h["OBJECT"] = "sky flat"
    h["DATE-OBS"] = "2024-01-01T01:00:00"
    h["EXPTIME"] = 3.0
    h["SATURATE"] = 65000
    fits.PrimaryHDU(np.full((64, 64), level, np.uint16), h).writeto(tmp_path / "f.fits")
    store = Store(tmp_path / "s.sqlite")
    ingest_file(store, tmp_path / "f.fits", Settings())
    info = json.loads(store.frames()[0]["info_json"])
    assert info["kind"] == kind
    assert f"{level} ADU" in info["type_reason"]
