"""The simulator's truth must be true: headers, WCS, fluxes, flats, cosmic rays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from photowatch.core.classify import classify
from photowatch.core.errors import FrameIgnored
from photowatch.core.instruments import load_profile
from photowatch.sim.night import (
    GAIN,
    SimNight,
    _Psf,
    catalog_error,
    format_dec,
    format_ra,
    parse_sexagesimal,
    render_stars,
    simulate_night,
)

N = 512


@pytest.fixture(scope="module")
def sim_extras(tmp_path_factory) -> SimNight:
    out = tmp_path_factory.mktemp("sim_extras")
    return simulate_night(out, size=256, binning=4, n_bias=1, n_dark=1, n_flat=4, n_science=3,
                          seed=5, cloud_frame=True, defocus_frame=True, nosolve_frame=True,
                          ignored_frame=True, satellite_flat=True, flip=True,
                          rotation_deg=30.0)


def _raw(frame) -> np.ndarray:
    return fits.getdata(frame.path).astype(np.float32)


def _flattened_e(night: SimNight, frame) -> np.ndarray:
    """(raw - overscan - bias) * gain - dark * t, divided by the true flat (e-)."""
    raw = _raw(frame)
    n = frame.shape[1]
    over = np.median(raw[:, n:], axis=1)
    e = (raw[:, :n] - over[:, None]) * GAIN - night.true_bias_e()
    e -= night.true_dark_e_per_s() * frame.exptime_s
    return e / night.true_flat(frame.filter)


# --- determinism and the files ----------------------------------------------------------------
def test_same_seed_same_bytes(tmp_path):
    kw = dict(size=64, binning=4, n_bias=1, n_dark=1, n_flat=3, n_science=1, seed=7)
    a = simulate_night(tmp_path / "a", **kw)
    b = simulate_night(tmp_path / "b", **kw)
    c = simulate_night(tmp_path / "c", **{**kw, "seed": 8})
    names = [p.relative_to(a.root) for p in sorted(a.root.rglob("*")) if p.is_file()]
    assert len(names) == len(a.frames) + 9  # + catalog, night.json, bias, dark, flat, ...
    for name in names:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    assert a.frames[-1].path.read_bytes() != c.frames[-1].path.read_bytes()


def test_refuses_to_mix_with_an_existing_night(tmp_path):
    kw = dict(size=32, binning=4, n_bias=1, n_dark=0, n_flat=0, n_science=0, catalog=False)
    simulate_night(tmp_path, **kw)
    with pytest.raises(FileExistsError):
        simulate_night(tmp_path, **kw)
    assert len(simulate_night(tmp_path, overwrite=True, **kw).frames) == 1


def test_load_round_trip(sim_small):
    loaded = SimNight.load(sim_small.root)
    assert loaded.frames == sim_small.frames
    assert loaded.params == sim_small.params
    assert loaded.catalog_path == sim_small.catalog_path


def test_sequence(sim_small, sim_two_filters):
    kinds = [f.kind for f in sim_small.frames]
    assert kinds == ["bias"] * 5 + ["dark"] * 3 + ["flat"] * 6 + ["object"] * 6
    assert [f.path.name for f in sim_small.frames[:2]] == ["lmi.0001.fits", "lmi.0002.fits"]
    times = [f.obs_time for f in sim_small.frames]
    assert times == sorted(times)
    for a, b in zip(sim_small.frames, sim_small.frames[1:]):
        assert (b.obs_time - a.obs_time).total_seconds() >= a.exptime_s + 15
    objs = sim_two_filters.objects()
    assert [f.filter for f in objs] == ["SDSS-R", "SDSS-I"] * 4
    assert [f.band for f in objs[:2]] == ["r", "i"]
    assert len(sim_two_filters.of_kind("flat", "SDSS-I")) == 6


def test_raw_format(sim_small):
    frame = sim_small.objects()[0]
    with fits.open(frame.path) as hdul:
        assert len(hdul) == 1
        hdr = hdul[0].header
        assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
        assert hdul[0].data.dtype == np.uint16
        assert hdul[0].data.shape == (N, N + 32)
    assert hdr["DATASEC"] == "[1:512,1:512]" and hdr["BIASSEC"] == "[513:544,1:512]"
    assert hdr["CCDSUM"] == "4 4" and hdr["OBJNAME"] == "NGC0001"
    assert len(hdr["DATE-OBS"]) == 23 and hdr["DATE-OBS"].startswith("2020-01-29T02:")
    assert not any(k.startswith(("CTYPE", "CRVAL", "CD1_")) for k in hdr)


# --- headers classify with the LMI profile -------------------------------------------------------
def test_headers_classify(sim_small):
    profile = load_profile("lmi")
    for frame in sim_small.frames:
        hdr = fits.getheader(frame.path)
        info = classify(hdr, frame.path.name, profile)
        assert info.kind == frame.kind
        assert info.filter == frame.filter
        assert info.exptime_s == frame.exptime_s
        assert info.obs_time == frame.obs_time
        assert info.target == frame.target
        assert info.binning == "4x4" and info.camera == "C0" and info.instrument == "lmi"
        assert info.gain == GAIN and info.saturation_adu == 65000.0
        assert info.datasec == (0, N, 0, N) and info.biassec == (0, N, N, N + 32)
        assert info.pixel_scale_arcsec == pytest.approx(0.48)
        assert info.night == "2020-01-28"
        if frame.kind == "object":
            assert profile.band_for(info.filter) == frame.band == "r"
            # the header pointing is off the true centre by the recorded offset
            cosd = math.cos(math.radians(frame.dec_deg))
            east = (info.ra_deg - frame.ra_deg) * cosd * 3600
            north = (info.dec_deg - frame.dec_deg) * 3600
            assert (east, north) == pytest.approx(frame.pointing_offset_arcsec, abs=0.05)
            assert math.hypot(east, north) <= 60.2
            assert info.airmass == pytest.approx(frame.airmass, abs=1e-4)


def test_extra_frames(sim_extras):
    profile = load_profile("lmi")
    expects = [(f.kind, f.expect) for f in sim_extras.frames if f.expect]
    assert expects == [("flat", "faint"), ("flat", "satellite"), ("flat", "saturated"),
                       ("ignored", "ignored"), ("object", "cloud"), ("object", "focus"),
                       ("object", "nosolve")]
    assert len(sim_extras.objects(good_only=True)) == 3
    ignored = sim_extras.of_kind("ignored")[0]
    assert fits.getheader(ignored.path)["OBSTYPE"] == "FOCUS"
    assert ignored.crmask_path is None and ignored.model_path is None
    # the satellite: a line of pixels ~15 % above the flat sky
    sat = next(f for f in sim_extras.of_kind("flat") if f.expect == "satellite")
    ratio = _flattened_e(sim_extras, sat) / sat.sky_e_per_px
    assert (ratio > 1.08).sum() > 200
    plain = sim_extras.of_kind("flat")[1]
    assert plain.expect is None
    assert ((_flattened_e(sim_extras, plain) / plain.sky_e_per_px) > 1.08).sum() < 20
    with pytest.raises(FrameIgnored):
        classify(fits.getheader(ignored.path), ignored.path.name, profile)
    by = {f.expect: f for f in sim_extras.objects()}
    good = sim_extras.objects(good_only=True)[0]
    assert by["cloud"].transparency == 0.25
    assert by["cloud"].zp_true == pytest.approx(
        good.zp_true + 2.5 * math.log10(0.25 / good.transparency), abs=0.01)
    assert 2.7 <= by["focus"].fwhm_arcsec <= 4.5
    # the trailed frame: the brightest star is a line of ~40 px
    model = fits.getdata(by["nosolve"].model_path)
    labels, _ = ndimage.label(model > 0.3 * model.max())
    yy, xx = np.nonzero(labels == labels.flat[np.argmax(model)])
    minor, major = np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([xx, yy]))) * 12)
    assert 30 < major < 50 and minor < 6


# --- world coordinates ----------------------------------------------------------------------------
def test_sexagesimal_round_trip():
    assert format_ra(359.99999999) == "00:00:00.00"
    assert format_dec(-0.5) == "-00:30:00.0"
    assert parse_sexagesimal(format_ra(123.4567), True) == pytest.approx(123.4567, abs=1e-5)
    assert parse_sexagesimal(format_dec(-12.3456), False) == pytest.approx(-12.3456, abs=3e-5)


def test_true_wcs_geometry(sim_small, sim_extras):
    frame = sim_small.objects()[0]
    wcs = frame.wcs()
    assert wcs.sip is not None and wcs.pixel_shape == (N, N)
    centre = wcs.all_pix2world([[(N - 1) / 2, (N - 1) / 2]], 0)[0]
    assert centre == pytest.approx([frame.ra_deg, frame.dec_deg], abs=1e-9)
    # scale 0.48"/px; north is up, east left (x increases to the west)
    ra0, dec0 = wcs.all_pix2world([[100, 100]], 0)[0]
    ra1, dec1 = wcs.all_pix2world([[101, 100]], 0)[0]
    assert (ra1 - ra0) < 0
    assert math.hypot((ra1 - ra0) * math.cos(math.radians(dec0)), dec1 - dec0) * 3600 == \
        pytest.approx(0.48, rel=2e-3)
    # SIP: about 1e-3 of the radius at the corner
    corner = np.array([[0.0, 0.0]])
    lin = wcs.wcs_world2pix(wcs.all_pix2world(corner, 0), 0)
    shift = np.hypot(*(lin - corner)[0])
    assert shift == pytest.approx(1e-3 * math.hypot(N / 2, N / 2), rel=0.1)
    # the inverse SIP agrees with the iterative inverse
    sky = wcs.all_pix2world([[3.0, 507.0]], 0)
    assert wcs.all_world2pix(sky, 0)[0] == pytest.approx([3.0, 507.0], abs=1e-6)
    # flipped, rotated night: x increases to the east, +y 30 deg east of north
    w2 = sim_extras.objects()[0].wcs()
    a = w2.all_pix2world([[128, 128], [129, 128], [128, 129]], 0)
    assert a[1, 0] > a[0, 0]
    pa = math.degrees(math.atan2((a[2, 0] - a[0, 0]) * math.cos(math.radians(a[0, 1])),
                                 a[2, 1] - a[0, 1]))
    assert pa == pytest.approx(30.0, abs=0.1)


def test_bright_catalogue_stars_are_local_maxima(sim_small):
    cat = Table.read(sim_small.catalog_path)
    for frame in sim_small.objects()[:3]:
        raw = _raw(frame)[:, :N]
        flat_e = _flattened_e(sim_small, frame) - frame.sky_e_per_px
        x, y = frame.wcs().all_world2pix(cat["ra"], cat["dec"], 0)
        sel = (cat["r"] > 15.0) & (cat["r"] < 19.0) & (x > 6) & (x < N - 7) & (y > 6) & \
            (y < N - 7)
        assert sel.sum() >= 20
        offsets, peaks = [], []
        sigma = frame.fwhm_arcsec / 0.48 / 2.355
        for xs, ys in zip(x[sel], y[sel]):
            i, j = round(xs), round(ys)
            box = raw[j - 2:j + 3, i - 2:i + 3]
            pj, pi = np.unravel_index(np.argmax(box), box.shape)
            pj, pi = pj + j - 2, pi + i - 2
            # the brightest pixel near the star is a local maximum next to the true position
            peaks.append(abs(pi - xs) < 1 and abs(pj - ys) < 1
                         and raw[pj, pi] >= raw[pj - 1:pj + 2, pi - 1:pi + 2].max())
            # windowed centroid (Gaussian window that follows the estimate)
            img = flat_e[j - 5:j + 6, i - 5:i + 6]
            yy, xx = np.mgrid[j - 5:j + 6, i - 5:i + 6]
            cx, cy = xs, ys
            for _ in range(10):
                w = img * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
                cx += 2 * (w * (xx - cx)).sum() / w.sum()
                cy += 2 * (w * (yy - cy)).sum() / w.sum()
            offsets.append(math.hypot(cx - xs, cy - ys))
        assert np.mean(peaks) >= 0.95
        assert np.median(offsets) < 0.05


# --- stars and photometry ------------------------------------------------------------------------
def test_star_counts(sim_small):
    for frame in sim_small.objects():
        stars = sim_small.frame_stars(frame)
        assert (stars["r"] < 20).sum() >= 60
        assert (stars["r"] < 13.5).sum() >= 1  # one that saturates


def test_stamps_sum_exactly_and_centre_right():
    psf = _Psf(2.5)
    assert psf.radius >= 5 * 2.5
    img = render_stars((80, 80), psf, np.array([40.3, 10.0]), np.array([39.8, -30.0]),
                       np.array([1e5, 1e5]))
    assert img.sum(dtype=np.float64) == pytest.approx(1e5, rel=1e-5)
    yy, xx = np.indices(img.shape)
    assert (img * xx).sum() / img.sum() == pytest.approx(40.3, abs=2e-3)
    assert (img * yy).sum() / img.sum() == pytest.approx(39.8, abs=2e-3)


def test_isolated_star_flux_matches_zero_point(sim_small, sim_two_filters):
    ratios = []
    for night in (sim_small, sim_two_filters):
        for frame in night.objects():
            flat_e = _flattened_e(night, frame)
            flat = night.true_flat(frame.filter)
            sky = frame.sky_e_per_px * (1 + night.true_sky_pattern(frame.filter))
            model = fits.getdata(frame.model_path)
            crmask = fits.getdata(frame.crmask_path)
            raw = _raw(frame)[:, :N]
            stars = night.frame_stars(frame)
            h = math.ceil(5 * frame.fwhm_arcsec / 0.48)  # the stamp radius: all the flux
            bad = night.params["bad_column"]
            mag = stars[frame.band]
            for s in stars[(mag > 14.0) & (mag < 16.5)]:
                x, y = round(s["x"]), round(s["y"])
                if not (h <= x < N - h and h <= y < N - h) or abs(x - bad) <= h:
                    continue
                box = np.s_[y - h:y + h + 1, x - h:x + h + 1]
                if crmask[box].any() or raw[box].max() >= 60000:
                    continue
                in_box = model[box].sum(dtype=np.float64)
                assert in_box >= s["flux_e"] * (1 - 1e-5)
                neighbours = in_box - s["flux_e"]
                if neighbours > 0.02 * s["flux_e"]:  # not isolated
                    continue
                noise = math.sqrt(s["flux_e"] + ((sky[box] + 36) / flat[box]).sum())
                if noise > 0.0025 * s["flux_e"]:  # 1 % is 4 sigma or more
                    continue
                measured = (flat_e[box] - sky[box]).sum(dtype=np.float64)
                ratios.append((measured - neighbours) / s["flux_e"])
    assert len(ratios) >= 3
    assert np.all(np.abs(np.array(ratios) - 1) < 0.01), ratios
    assert np.median(ratios) == pytest.approx(1.0, abs=0.002)


def test_saturated_stars_bleed_along_columns(sim_small):
    frame = sim_small.objects()[0]
    raw = _raw(frame)[:, :N]
    stars = sim_small.frame_stars(frame)
    s = stars[np.argmin(stars["r"])]
    x, y = round(s["x"]), round(s["y"])
    labels, _ = ndimage.label(raw >= 65535)
    assert labels[y, x]
    rows, cols = np.nonzero(labels == labels[y, x])
    assert np.ptp(rows) > 2 * np.ptp(cols)


# --- calibration truth ---------------------------------------------------------------------------
def test_flat_levels(sim_small, sim_two_filters):
    for night in (sim_small, sim_two_filters):
        for filt in night.params["filters"]:
            flats = night.of_kind("flat", filt)
            medians = [float(np.median(_raw(f)[:, :N])) for f in flats]
            assert [f.expect for f in flats] == ["faint", None, None, None, None, "saturated"]
            assert medians[0] < 0.2 * 65000
            assert medians[-1] == 65535
            assert all(0.25 * 65000 < m < 0.75 * 65000 for m in medians[1:-1])
            for f, m in zip(flats[:-1], medians[:-1]):
                assert m == pytest.approx(f.flat_level_adu, rel=0.01)


def test_true_flat_matches_the_flats(sim_small):
    truth = sim_small.true_flat("SDSS-R")
    assert truth.mean(dtype=np.float64) == pytest.approx(1.0, abs=1e-6)
    assert sim_small.params["flat_median"]["SDSS-R"] == pytest.approx(np.median(truth))
    assert np.median(truth[:, sim_small.params["bad_column"]]) == pytest.approx(0.2, abs=0.02)
    flat = sim_small.of_kind("flat")[3]
    ratio = _flattened_e(sim_small, flat) / flat.sky_e_per_px
    assert np.median(ratio) == pytest.approx(1.0, abs=2e-3)
    # what is left is Poisson noise, not structure
    expected = math.sqrt(flat.sky_e_per_px) / flat.sky_e_per_px
    core = ratio[12:-12, 12:-12]
    assert np.std(core) == pytest.approx(expected, rel=0.15)
    assert np.std(core.reshape(61, 8, 61, 8).mean(axis=(1, 3))) < 2 * expected / 8


def test_bias_and_overscan(sim_small):
    biases = sim_small.of_kind("bias")
    stack = []
    levels = []
    for b in biases:
        raw = _raw(b)
        over = np.median(raw[:, N:], axis=1)
        levels.append(over)
        stack.append(raw[:, :N] - over[:, None])
    levels = np.array(levels)
    assert np.all(np.abs(levels - 1000) < 10)
    assert np.ptp(levels[0]) > 2  # a row pattern
    assert np.abs(levels[0] - levels[-1]).max() > 0.5  # that drifts
    resid = np.mean(stack, axis=0) - sim_small.true_bias_e() / GAIN
    assert abs(resid.mean()) < 0.2
    assert np.std(resid) == pytest.approx(6.0 / GAIN / math.sqrt(len(biases)), rel=0.2)


def test_darks_show_hot_pixels(sim_small):
    dark = sim_small.true_dark_e_per_s()
    hot = dark > 5
    frame = sim_small.of_kind("dark")[0]
    raw = _raw(frame)[:, :N]
    e = (raw - np.median(raw[:, :N], axis=1)[:, None]) * GAIN
    assert 0.0003 < (dark > 0.4).mean() < 0.002
    assert np.median(e[hot] / (dark[hot] * frame.exptime_s)) == pytest.approx(1.0, abs=0.05)


def test_cosmic_ray_truth(sim_small):
    for frame in sim_small.objects():
        mask = fits.getdata(frame.crmask_path).astype(bool)
        assert mask.shape == (N, N) and mask.any()
        model = fits.getdata(frame.model_path)
        e = _flattened_e(sim_small, frame) - frame.sky_e_per_px - model
        sigma = math.sqrt(frame.sky_e_per_px)
        on_cr = e[mask & (model < sigma)]
        assert np.median(on_cr) > 5 * sigma


def test_catalogue(sim_small):
    cat = Table.read(sim_small.catalog_path)
    assert {"ra", "dec", "g", "g_err", "r", "r_err", "i", "i_err", "z", "z_err"} <= \
        set(cat.colnames)
    assert cat["r"].max() < 21.3
    assert catalog_error(19.0) == pytest.approx(0.023, abs=0.003)
    assert catalog_error(21.0) == pytest.approx(0.05)
    stars = sim_small.stars
    true = stars[stars["r"] < 21]
    assert len(true) == len(cat)
    pull = (cat["r"] - true["r"]) / cat["r_err"]
    assert np.std(pull) == pytest.approx(1.0, abs=0.1)
    assert np.all((true["g"] - true["r"] >= 0.2) & (true["g"] - true["r"] <= 1.2))


def test_options_for_what_real_frames_have(tmp_path):
    """Issue 17: PSFs varying over the field and from frame to frame, and thin clouds
    varying within minutes; the defaults leave a night unchanged."""
    from photowatch.sim.night import simulate_night

    kw = dict(size=256, binning=4, filters=("SDSS-R",), seed=3, n_bias=1, n_dark=0, n_flat=1,
              n_science=4, exptime_s=20.0, bad_flats=False, catalog=False, write_crmasks=False,
              star_density=20000.0)
    base = simulate_night(tmp_path / "base", **kw)
    night = simulate_night(tmp_path / "real", psf_variation=0.5, psf_beta_range=(2.2, 4.5),
                           cloud_variation_mag=0.3, cloud_period_s=(100.0, 150.0), **kw)
    # the draws of the defaults are untouched: same pointings, seeing, base transparency
    for a, b in zip(base.objects(), night.objects()):
        assert a.ra_deg == b.ra_deg and a.fwhm_arcsec == b.fwhm_arcsec
        assert b.transparency <= a.transparency
        assert a.psf_beta is None and 2.2 <= b.psf_beta <= 4.5
    dims = [2.5 * np.log10(a.transparency / b.transparency)
            for a, b in zip(base.objects(), night.objects())]
    assert max(dims) - min(dims) > 0.05  # minutes apart, clouds of a 100-150 s period
    betas = [f.psf_beta for f in night.objects()]
    assert max(betas) - min(betas) > 0.1
    # a corner star is broader than a central one
    from photowatch.sim.night import _render_varying

    img = _render_varying((201, 201), 3.0, 3.0, 0.5, np.array([100.0, 5.0]),
                          np.array([100.0, 5.0]), np.array([1e4, 1e4]))
    assert img[100, 100] > 1.3 * img[5, 5]
