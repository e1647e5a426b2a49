"""Profiles and classification: real RATIR headers, LMI-like headers, edge cases, names."""

from datetime import UTC, datetime

import pytest
from astropy.io import fits
from shared_data import RATIR

from photowatch.core.classify import (
    classify,
    night_label,
    parse_binning,
    parse_section,
    safe_name,
    standard_name,
)
from photowatch.core.errors import BadInput, FrameIgnored, FrameRejected
from photowatch.core.instruments import all_profiles, detect_profile, load_profile

needs_ratir = pytest.mark.skipif(not RATIR.is_dir(), reason="shared RATIR data not present")


def lmi_header(**changes):
    h = fits.Header()
    h["INSTRUME"] = "LMI"
    h["OBSTYPE"] = "OBJECT"
    h["FILTER1"] = "SDSS-R"
    h["FILTER2"] = "OPEN"
    h["EXPTIME"] = 60.0
    h["DATE-OBS"] = "2020-01-29T02:16:05.123"
    h["OBJNAME"] = "NGC 1"
    h["RA"] = "10:00:00.00"
    h["DEC"] = "+02:12:00.0"
    h["CCDSUM"] = "2 2"
    h["DATASEC"] = "[1:512,1:512]"
    h["BIASSEC"] = "[513:544,1:512]"
    h["GAIN"] = 2.89
    h["RDNOISE"] = 6.0
    for k, v in changes.items():
        if v is None:
            del h[k.replace("_", "-")]
        else:
            h[k.replace("_", "-")] = v
    return h


def test_every_profile_loads():
    names = {p.name for p in all_profiles()}
    assert {"lmi", "ratir", "rimas", "generic"} <= names
    for p in all_profiles():
        p.detector_for("C0")


def test_lmi_object():
    p = load_profile("lmi")
    assert detect_profile(lmi_header()) is p or detect_profile(lmi_header()).name == "lmi"
    info = classify(lmi_header(), "lmi.0042.fits", p)
    assert info.kind == "object" and info.filter == "SDSS-R" and info.camera == "C0"
    assert info.exptime_s == 60.0 and info.binning == "2x2" and info.target == "NGC 1"
    assert info.ra_deg == pytest.approx(150.0) and info.dec_deg == pytest.approx(2.2)
    assert info.gain == 2.89 and info.saturation_adu == 65000
    assert info.pixel_scale_arcsec == pytest.approx(0.24)
    assert info.datasec == (0, 512, 0, 512) and info.biassec == (0, 512, 512, 544)
    assert info.std_name == "20200129T021605C0o.fits"
    # 02:16 UT at Happy Jack (UT-7.4 h) is the evening of the 28th
    assert info.night == "2020-01-28"
    assert p.band_for("sdss-r") == "r"


@pytest.mark.parametrize("obstype, kind", [("BIAS", "bias"), ("zero", "bias"), ("DARK", "dark"),
                                           ("SKY FLAT", "flat"), ("Dome Flat", "flat"),
                                           ("twilight flat", "flat"), ("OBJECT", "object"),
                                           ("standard", "object")])
def test_type_values(obstype, kind):
    info = classify(lmi_header(OBSTYPE=obstype), "x.fits", load_profile("lmi"))
    assert info.kind == kind


@pytest.mark.parametrize("obstype", ["FOCUS", "test", "Acquisition"])
def test_ignored_types(obstype):
    with pytest.raises(FrameIgnored, match="not reduced"):
        classify(lmi_header(OBSTYPE=obstype), "x.fits", load_profile("lmi"))


def test_bad_headers():
    p = load_profile("lmi")
    with pytest.raises(BadInput, match="no frame type"):
        classify(lmi_header(OBSTYPE=None), "x.fits", p)
    with pytest.raises(BadInput, match="unparsable date"):
        classify(lmi_header(DATE_OBS="yesterday evening"), "x.fits", p)
    with pytest.raises(BadInput, match="no observation time"):
        classify(lmi_header(DATE_OBS=None), "x.fits", p)
    with pytest.raises(FrameRejected, match="exposure time"):
        classify(lmi_header(EXPTIME=None), "x.fits", p)
    with pytest.raises(FrameRejected, match="0 s"):
        classify(lmi_header(OBSTYPE="DARK", EXPTIME=0.0), "x.fits", p)
    # a bias without EXPTIME is fine
    assert classify(lmi_header(OBSTYPE="BIAS", EXPTIME=None), "x.fits", p).exptime_s == 0


def test_filter_wheels():
    p = load_profile("lmi")
    assert classify(lmi_header(FILTER1="OPEN", FILTER2="V"), "x.fits", p).filter == "V"
    assert classify(lmi_header(FILTER1="SDSS-R", FILTER2="ND1"), "x.fits", p).filter == \
        "SDSS-R-ND1"
    assert classify(lmi_header(OBSTYPE="BIAS"), "x.fits", p).filter is None


def test_date_without_time_and_degrees():
    p = load_profile("generic")
    h = fits.Header()
    h["IMAGETYP"] = "Light"
    h["DATE-OBS"] = "2021-03-04"
    h["UT"] = "05:06:07.5"
    h["EXPTIME"] = 10
    h["RA"] = 12.5
    h["DEC"] = -30.25
    info = classify(h, "img.fits", p)
    assert info.kind == "object" and info.obs_time == datetime(2021, 3, 4, 5, 6, 7, 500000, UTC)
    assert info.ra_deg == 12.5 and info.dec_deg == -30.25


def test_night_label_rolls_at_local_noon():
    lon = -111.42  # UT-7.43 h
    assert night_label(datetime(2020, 1, 29, 2, 0, tzinfo=UTC), lon) == "2020-01-28"
    assert night_label(datetime(2020, 1, 29, 12, 0, tzinfo=UTC), lon) == "2020-01-28"
    assert night_label(datetime(2020, 1, 29, 20, 0, tzinfo=UTC), lon) == "2020-01-29"
    assert night_label(datetime(2020, 1, 29, 20, 0, tzinfo=UTC), 150.0) == "2020-01-29"
    assert night_label(datetime(2020, 1, 29, 1, 0, tzinfo=UTC), 150.0) == "2020-01-28"


def test_helpers():
    assert parse_section("[1:512,3:100]") == (2, 100, 0, 512)
    with pytest.raises(ValueError):
        parse_section("[5:1,1:2]")
    assert parse_binning("2 2") == "2x2" and parse_binning("1x1") == "1x1"
    assert parse_binning(None) == "1x1" and parse_binning(4) == "4x4"
    assert safe_name("NGC 1 / field*2") == "NGC_1_field_2" and safe_name("  ") == "UNKNOWN"
    t = datetime(2020, 1, 29, 2, 16, 5, 900000, UTC)
    assert standard_name(t, "C0", "object") == "20200129T021605C0o.fits"
    assert standard_name(t, "C12", "flat") == "20200129T021605C12f.fits"


@needs_ratir
@pytest.mark.parametrize("name, kind", [("20130716T032429C1b.fits.gz", "bias"),
                                        ("20130716T035610C1d.fits.gz", "dark"),
                                        ("20130716T031339C1f.fits.gz", "flat"),
                                        ("20130716T110452C1o.fits.gz", "object")])
def test_real_ratir_headers(name, kind):
    header = fits.getheader(RATIR / name)
    profile = detect_profile(header)
    assert profile is not None and profile.name == "ratir"
    info = classify(header, name, profile)
    assert info.kind == kind and info.camera == "C1"
    assert info.std_name == name.replace(".gz", "")
    assert info.binning == "2x2" and info.readout == "1MHz"
    assert info.gain == pytest.approx(18.64 / 4)
    assert info.saturation_adu == pytest.approx(16383)
    assert info.pixel_scale_arcsec == pytest.approx(0.32)
    assert info.trimsec == (75, 1000, 15, 1000) and info.biassec is None
    assert info.night == "2013-07-15"  # San Pedro Martir, UT-7.7 h: the evening before
    if kind == "object":
        assert info.target == "2012A-0000-vis8" and info.filter == "i"
        assert info.ra_deg == pytest.approx(313.19708, abs=1e-4)
        assert info.dec_deg == pytest.approx(6.66806, abs=1e-4)
    if kind in ("bias", "dark"):
        assert info.filter is None


def test_ratir_without_suffix_is_bad_input():
    header = fits.Header()
    header["INSTRUME"] = "RATIR"
    header["DATE-OBS"] = "2013-07-16T11:05:00.152"
    header["EXPTIME"] = 10.0
    with pytest.raises(BadInput, match="file-name suffix"):
        classify(header, "something.fits", load_profile("ratir"))


def test_rimas_camera_from_keyword():
    h = fits.Header()
    h["INSTRUME"] = "RIMAS"
    h["OBJTYPE"] = "SCIENCE"
    h["DATE-BEG"] = "2019-05-01T04:00:00"
    h["EXPTIME"] = 30.0
    h["ASICINDX"] = 1
    h["FILTER2"] = "J"
    h["FILTER3"] = "OPEN"
    info = classify(h, "20190501.rimas.0001.01.fits", detect_profile(h))
    assert info.instrument == "rimas" and info.camera == "C1" and info.filter == "J"
