"""Issue 21 (lane live): depth (LIMMAG), forced photometry, targets, light curves, alerts and
the simulator's injections, checked against known truth."""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from astropy.table import Table

from photowatch.core.config import Alerts
from photowatch.core.errors import ConfigError
from photowatch.sim.night import _Psf, render_stars
from photowatch.stages.depth import (
    empty_aperture_noise,
    limiting_flux,
    limiting_magnitude,
    local_background,
)
from photowatch.stages.forced import FLAG_COSMIC, FLAG_NOWCS, FLAG_OFFFRAME, forced_photometry

FWHM = 3.0
R_AP = 2.0 * FWHM
SKY_SIGMA = 10.0
ZP = 25.0


def _apcor(psf) -> float:
    """1 / the fraction of a star's light within R_AP (the aperture correction)."""
    import sep

    img = render_stars((101, 101), psf, np.array([50.0]), np.array([50.0]), np.array([1.0]))
    f, _, _ = sep.sum_circle(img, np.array([50.0]), np.array([50.0]), R_AP, subpix=5)
    return 1.0 / float(f[0])


def _field(seed: int, *, n_side: int = 7, smooth: float = 0.0, offset: float = 0.0):
    """Stars on a grid (60 px apart) with S/N from ~2 to ~60, in Gaussian noise of sigma
    SKY_SIGMA plus their own Poisson noise; ``smooth``: correlate the sky noise (Gaussian
    kernel sigma, px) keeping its per-pixel sigma; ``offset``: a constant left in the sky."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = 60 * n_side + 60
    psf = _Psf(FWHM, beta=3.0)
    g = 60.0 * np.arange(1, n_side + 1)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    sig_ap = SKY_SIGMA * math.sqrt(math.pi) * R_AP
    flux = np.geomspace(1.5, 60.0, x.size) * sig_ap * _apcor(psf)
    rng.shuffle(flux)
    model = render_stars((n, n), psf, x, y, flux)
    sky = rng.normal(0.0, 1.0, (n, n))
    if smooth:
        sky = ndimage.gaussian_filter(sky, smooth)
        sky /= sky.std()
    data = (model + SKY_SIGMA * sky + rng.normal(0, 1, (n, n)) * np.sqrt(model) + offset)
    var = (SKY_SIGMA ** 2 + model).astype(np.float32)
    return data.astype(np.float32), var, x, y, flux, _apcor(psf)


class _PixWCS:
    """A WCS whose 'sky' coordinates are pixel coordinates (ra = x, dec = y)."""

    def all_world2pix(self, ra, dec, origin):
        return np.asarray(ra, float), np.asarray(dec, float)


def _forced(data, var, x, y, apcor, factor, **kw):
    return forced_photometry(data, var, None, _PixWCS(), [(f"s{i}", a, b) for i, (a, b)
                                                          in enumerate(zip(x, y))],
                             r_ap_px=R_AP, apcor=apcor, magzp=ZP, noise_factor=factor, **kw)


# --------------------------------------------------------------------------- depth
def test_limiting_flux_is_the_flux_at_nsigma():
    for noise, r, apcor, n in [(10.0, 6.0, 1.1, 5.0), (3.0, 2.5, 1.0, 3.0), (50, 12, 1.3, 5)]:
        f_ap = limiting_flux(noise, r, apcor, n) / apcor
        sig_ap = noise * math.sqrt(math.pi) * r
        assert f_ap / math.sqrt(sig_ap ** 2 + f_ap) == pytest.approx(n, rel=1e-9)
    # the measured noise factor scales the background part only
    ratio = limiting_flux(10, 6, 1, 5, factor=2.0) / limiting_flux(10, 6, 1, 5)
    assert 1.95 < ratio < 2.0  # the source's own Poisson noise is not scaled
    assert math.isnan(limiting_magnitude(10.0, 6.0, 1.0, None))
    assert limiting_magnitude(10, 6, 1, 25.0) == pytest.approx(
        25.0 - 2.5 * math.log10(limiting_flux(10, 6, 1)))


def test_local_background_removes_what_the_sky_subtraction_left():
    data, var, x, y, flux, apcor = _field(3, offset=4.0)
    bkg, n = local_background(data, None, x, y, R_AP)
    assert (n > 100).all()
    # the stars' own wings in the annulus raise it by far less than the noise of a sum
    assert np.median(bkg) == pytest.approx(4.0, abs=0.3)


@pytest.mark.parametrize("smooth", [0.0, 2.0])
def test_forced_photometry_pulls_and_depth_against_truth(smooth):
    """Flux pulls of unit width (over 8 fields, 392 stars) with the measured noise factor;
    with correlated noise the factor is > 1.3 and without it the pulls are too wide."""
    pulls, pulls_raw, factors, snr_true, det = [], [], [], [], []
    for seed in range(8):
        data, var, x, y, flux, apcor = _field(seed, smooth=smooth, offset=2.0)
        factor, n_used = empty_aperture_noise(data, var, None, np.column_stack([x, y]), R_AP,
                                              FWHM, n=300, seed=seed)
        assert n_used >= 100
        factors.append(factor)
        t = _forced(data, var, x, y, apcor, factor)
        pulls += list((t["flux"] - flux) / t["fluxerr"])
        raw = _forced(data, var, x, y, apcor, 1.0)
        pulls_raw += list((raw["flux"] - flux) / raw["fluxerr"])
        lim = t["limflux"]
        snr_true += list(5.0 * flux / lim)  # 5 at the limit
        det += list(t["detected"])
        # an upper limit is given exactly when not detected, and the source is fainter
        up = ~t["detected"]
        assert np.isnan(t["mag"][up]).all() and np.isfinite(t["uplim"][up]).all()
        true_mag = ZP - 2.5 * np.log10(flux)
        assert (true_mag[up] > t["uplim"][up]).all()
    pulls, pulls_raw = np.array(pulls), np.array(pulls_raw)
    assert abs(np.mean(pulls)) < 0.15
    assert np.std(pulls) == pytest.approx(1.0, abs=0.1)
    if smooth:
        assert np.median(factors) > 1.3
        assert np.std(pulls_raw) > 1.2  # ERR alone misses correlated noise
    else:
        # white noise: only the annulus median's own noise (~1.1)
        assert 1.0 < np.median(factors) < 1.2
    # injection-recovery: the 50 % completeness of forced detection is at LIMMAG
    snr_true, det = np.array(snr_true), np.array(det)
    m = -2.5 * np.log10(snr_true / 5.0)  # magnitude relative to LIMMAG
    centres = np.arange(-0.6, 0.61, 0.1)
    frac = np.array([det[np.abs(m - c) < 0.15].mean() for c in centres])
    m50 = float(np.interp(0.5, frac[::-1], centres[::-1]))
    assert abs(m50) < 0.2


def test_forced_errors_are_the_noise_and_empty_apertures_measure_confusion():
    """Targets at positions with no star in their footprint, on white noise (ERR right per
    pixel) under a sea of stars below the detection limit: the default errors (ERR plus the
    annulus median's noise, BKG_FACTOR) give pulls of unit width, and so does LIMMAG's
    limit; the empty apertures' factor, which the faint stars inflate, would make them
    ~10 % too large (the 2k light curves of issue 21), ERR alone ~13 % too small."""
    from scipy.spatial import cKDTree

    from photowatch.stages.depth import BKG_FACTOR

    pulls, pulls_emp, pulls_err, factors = [], [], [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        n = 600
        psf = _Psf(FWHM, beta=3.0)
        sig_ap = SKY_SIGMA * math.sqrt(math.pi) * R_AP
        # targets on a grid 75 px apart; faint stars (aperture S/N 0.3-1.5: r ~22-23.5
        # under a r ~21 limit), 1 per 150 px^2, anywhere but in a target's footprint
        g = 75.0 * np.arange(1, 8)
        tx, ty = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
        fx, fy = rng.uniform(0, n, (2, n * n // 150))
        d, _ = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([fx, fy]))
        keep = d > 3 * R_AP + FWHM
        fx, fy = fx[keep], fy[keep]
        model = render_stars((n, n), psf, fx, fy, rng.uniform(0.3, 1.5, fx.size) * sig_ap)
        apcor = _apcor(psf)
        tflux = rng.uniform(1.0, 30.0, tx.size) * sig_ap * apcor
        model += render_stars((n, n), psf, tx, ty, tflux)
        data = (model + rng.normal(0, SKY_SIGMA, (n, n))
                + rng.normal(0, 1, (n, n)) * np.sqrt(model)).astype(np.float32)
        var = (SKY_SIGMA ** 2 + model).astype(np.float32)
        # the empty apertures avoid the targets only: the faint stars are not detected
        factor, _ = empty_aperture_noise(data, var, None, np.column_stack([tx, ty]), R_AP,
                                         FWHM, n=300, seed=seed)
        factors.append(factor)
        t = _forced(data, var, tx, ty, apcor, None)
        pulls += list((t["flux"] - tflux) / t["fluxerr"])
        t = _forced(data, var, tx, ty, apcor, factor)
        pulls_emp += list((t["flux"] - tflux) / t["fluxerr"])
        t = _forced(data, var, tx, ty, apcor, 1.0)
        pulls_err += list((t["flux"] - tflux) / t["fluxerr"])
    assert np.median(factors) > 1.25  # confusion, not noise
    assert np.std(pulls) == pytest.approx(1.0, abs=0.08)
    assert np.std(pulls_emp) < 0.93
    assert np.std(pulls_err) > BKG_FACTOR - 0.05
    # the limit at a position is the default error's 5 sigma of a faint source
    t = _forced(data, var, tx, ty, apcor, None)
    assert np.median(t["limflux"] / t["fluxerr"]) == pytest.approx(5.0, rel=0.15)


def test_forced_flux_survives_a_bad_column_and_the_frame_edge():
    """A bad column through a bright star's aperture, or the frame's edge cutting it: the
    masked pixels take their opposite pixel's value, so the flux is the star's (within
    1 %, S/N ~400), where dropping them is off by 9-13 %; the points stay flagged."""
    from photowatch.stages.forced import FLAG_EDGE, FLAG_MASKED

    psf = _Psf(FWHM, beta=3.0)
    apcor = _apcor(psf)
    n = 120
    x = np.array([40.3, 60.6, 3.2])
    y = np.array([50.4, 90.1, 30.7])
    flux = np.full(3, 2.0e5)
    model = render_stars((n, n), psf, x, y, flux)
    var = (SKY_SIGMA ** 2 + model).astype(np.float32)
    rng = np.random.default_rng(5)
    data = (model + rng.normal(0, 1, (n, n)) * np.sqrt(var)).astype(np.float32)
    mask = np.zeros((n, n), np.uint16)
    mask[:, 41] = 1  # BAD: a column 0.7 px from the first star's centre
    mask[88:93, 58:60] = 2  # SATURATED: a small patch in the second's core
    data[mask != 0] = 6.0e4  # whatever a bad pixel holds
    t = forced_photometry(data, var, mask, _PixWCS(), [(f"s{i}", a, b) for i, (a, b) in
                                                       enumerate(zip(x, y))],
                          r_ap_px=R_AP, apcor=apcor, magzp=ZP)
    assert np.all(np.abs(t["flux"] / flux - 1) < 0.01), t["flux"] / flux
    assert t["flags"][0] & FLAG_MASKED and t["flags"][1] & FLAG_MASKED
    assert t["flags"][2] & FLAG_EDGE and not t["flags"][2] & FLAG_MASKED
    # the error counts the copied pixels' noise twice: still a fair pull
    assert np.all(np.abs(t["flux"] - flux) < 4 * t["fluxerr"])


def test_forced_flags_off_frame_and_no_wcs():
    data, var, x, y, flux, apcor = _field(0, n_side=2)
    b = int(np.argmax(flux))
    x, y = x[b:], y[b:]
    t = forced_photometry(data, var, None, _PixWCS(), [("in", x[0], y[0]), ("out", -50, 10)],
                          r_ap_px=R_AP, apcor=apcor, magzp=ZP)
    assert not t["flags"][0] & FLAG_OFFFRAME and t["flags"][1] & FLAG_OFFFRAME
    assert t["detected"][0] and np.isnan(t["flux"][1])
    t = forced_photometry(data, var, None, None, [("a", 1.0, 2.0)], r_ap_px=R_AP)
    assert t["flags"][0] & FLAG_NOWCS and not t["detected"][0]
    # no zero point: fluxes and S/N, no magnitudes
    t = forced_photometry(data, var, None, _PixWCS(), [("in", x[0], y[0])], r_ap_px=R_AP,
                          apcor=apcor)
    assert t["snr"][0] > 0 and np.isnan(t["mag"][0]) and np.isnan(t["limmag"][0])


# --------------------------------------------------------------------------- targets
def test_target_positions_parse_and_fail_clearly(tmp_path):
    from photowatch.core.targets import parse_position, read_targets_file

    t = parse_position("GRB 1=10:00:00,-05:30:00")
    assert (t.name, t.ra, t.dec) == ("GRB 1", 150.0, -5.5)
    assert parse_position("X=150.5,+2.25").ra == 150.5
    for bad in ("nocoords", "A=1", "=1,2", "A=400,0", "A=1,95", "A=x,y"):
        with pytest.raises(ConfigError, match="target"):
            parse_position(bad)
    path = tmp_path / "t.csv"
    path.write_text("Name,RA,Dec\nSN1,10.5,20.25\nV2,01:00:00,+30:00:00\n")
    got = read_targets_file(path)
    assert [(g.name, g.ra, g.dec) for g in got] == [("SN1", 10.5, 20.25), ("V2", 15.0, 30.0)]
    (tmp_path / "bad.csv").write_text("name,x\nA,1\n")
    with pytest.raises(ConfigError, match="columns name, ra, dec"):
        read_targets_file(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="not found"):
        read_targets_file(tmp_path / "missing.csv")


def test_header_target_from_the_profile_keys():
    from astropy.io import fits

    from photowatch.core.instruments import load_profile
    from photowatch.core.targets import header_target

    class Info:
        target = "GRB200129A"

    hdr = fits.Header({"OBJRA": "04:00:02.40", "OBJDEC": "+25:00:36.0"})
    t = header_target(Info, hdr, load_profile("lmi"))
    assert t.name == "GRB200129A" and t.source == "header"
    assert t.ra == pytest.approx(60.01) and t.dec == pytest.approx(25.01)
    assert header_target(Info, fits.Header(), load_profile("lmi")) is None
    assert header_target(Info, hdr, load_profile("generic")) is None  # no keys: none


# --------------------------------------------------------------------------- alerts
def _script(tmp_path, body: str) -> str:
    path = tmp_path / "hook.py"
    path.write_text(body)
    return f"{sys.executable} {path}"


def test_alert_command_gets_one_json_document(tmp_path):
    from photowatch.run.alerts import AlertRunner

    sink = tmp_path / "got.jsonl"
    go = tmp_path / "go"
    # the command writes only once the test says go (or, after 60 s, a line that fails
    # the test): emit() returning before that shows it never waits for the command
    cmd = _script(tmp_path, "import os, sys, time\n"
                            "t = time.time() + 60\n"
                            f"while not os.path.exists({str(go)!r}) and time.time() < t:\n"
                            "    time.sleep(0.02)\n"
                            f"doc = sys.stdin.read() if os.path.exists({str(go)!r}) else 'waited'\n"
                            f"open({str(sink)!r}, 'a').write(doc + '\\n')\n")
    r = AlertRunner(Alerts(command=cmd), out="/data/out")
    assert r.emit("target_detected", {"target": "GRB", "mag": 18.5})
    assert r.emit("frame_rejected", {"frame": "a.fits"})
    assert not sink.exists() and r.sent == 0  # both returned with the command still waiting
    go.touch()
    assert r.drain(timeout=30)
    docs = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [d["event"] for d in docs] == ["target_detected", "frame_rejected"]
    assert docs[0]["target"] == "GRB" and docs[0]["out"] == "/data/out" and "time" in docs[0]
    assert r.sent == 2 and r.failed == 0
    # an event not configured, or no command at all: nothing runs
    assert not AlertRunner(Alerts(command=cmd, events=["target_faded"])).emit("frame_rejected")
    assert not AlertRunner(Alerts()).emit("target_detected")


def test_alert_command_time_limit_failure_and_bounded_queue(tmp_path):
    from photowatch.run.alerts import AlertRunner

    slow = _script(tmp_path, "import time\ntime.sleep(30)\n")
    r = AlertRunner(Alerts(command=slow, timeout_s=0.5, max_queue=2))
    for k in range(5):
        r.emit("daemon_problem", {"k": k})
    # the queue holds 2: older events dropped, never blocking (an emit that waited for
    # each command's time limit would have found the queue empty and dropped none)
    assert r.dropped >= 2
    assert r.drain(timeout=30)
    assert r.failed == 5 - r.dropped and r.sent == 0
    bad = AlertRunner(Alerts(command=_script(tmp_path, "import sys\nsys.exit(3)\n")))
    bad.emit("target_faded", {})
    assert bad.drain(timeout=30) and bad.failed == 1


# --------------------------------------------------------------------------- simulator
def test_injections_are_rendered_with_their_truth(tmp_path):
    from astropy.io import fits

    from photowatch.sim.inject import Afterglow, FakeStars, PeriodicVariable, load_truth
    from photowatch.sim.night import simulate_night

    burst = datetime(2020, 1, 29, 2, 0, tzinfo=UTC)
    ag = Afterglow(burst, mag0=17.0, alpha=1.2, ref_s=600.0)
    var = PeriodicVariable(mean_mag=17.5, amplitude=0.5, period_s=900.0)
    fakes = FakeStars(n=4, mags=(17.0, 18.0), spread_arcsec=40.0)
    night = simulate_night(tmp_path, size=256, binning=4, n_bias=1, n_dark=1, n_flat=3,
                           n_science=3, seed=4, bad_flats=False, injections=[ag, var, fakes])
    truth = load_truth(tmp_path)
    objects = night.objects()
    assert len(truth) == len(objects) * (2 + len(fakes.positions))
    stars = night.stars
    for f in objects:
        rows = truth[truth["frame"] == f.raw_name]
        a = rows[rows["name"] == "afterglow"][0]
        # the exposure-averaged magnitude of a t^-1.2 decline
        t0 = f.obs_time
        ts = [t0 + timedelta(seconds=f.exptime_s * (k + 0.5) / 400) for k in range(400)]
        mean_flux = np.mean([10 ** (-0.4 * ag.mag_at(t)) for t in ts])
        assert a["mag"] == pytest.approx(-2.5 * math.log10(mean_flux), abs=2e-3)
        # the model image holds the injected flux at the injected position
        model = fits.getdata(f.model_path)
        ix, iy = int(round(a["x"])), int(round(a["y"]))
        box = model[iy - 8:iy + 9, ix - 8:ix + 9].sum()
        assert box == pytest.approx(a["flux_e"], rel=0.15)
        # the header's target coordinates are the afterglow's (a trigger's position)
        hdr = fits.getheader(f.path)
        assert hdr["OBJRA"].startswith("04:00") and f.injected
    # quiet spots: no catalogued star within 10" of the afterglow brighter than 22
    d = np.hypot((stars["ra"] - ag.ra) * math.cos(math.radians(ag.dec)),
                 stars["dec"] - ag.dec) * 3600
    assert not ((d < 10) & (stars["r"] < 22)).any()
    assert json.loads((tmp_path / "truth" / "injections.json").read_text())["injections"][
        "afterglow"]["alpha"] == 1.2


# --------------------------------------------------------------------------- a night
@pytest.fixture(scope="module")
def afterglow_night(tmp_path_factory):
    """A small night with an afterglow at the header's target position (fading through
    LIMMAG), a periodic variable and 12 fake stars, reduced with --target and a targets
    file."""
    from photowatch.cli import main
    from photowatch.sim.inject import Afterglow, FakeStars, PeriodicVariable
    from photowatch.sim.night import simulate_night

    root = tmp_path_factory.mktemp("afterglow")
    burst = datetime(2020, 1, 29, 2, 5, tzinfo=UTC)  # the science frames: 02:07 to 02:16
    injections = [Afterglow(burst, mag0=21.3, alpha=1.2, ref_s=600.0),
                  PeriodicVariable(mean_mag=19.0, amplitude=0.5, period_s=1500.0),
                  FakeStars(n=12, mags=(18.5, 22.0), spread_arcsec=80.0, seed=1)]
    night = simulate_night(root / "night", size=512, binning=4, n_bias=3, n_dark=1, n_flat=4,
                           n_science=8, seed=11, bad_flats=False, injections=injections)
    fakes = injections[2].positions
    Table(rows=[(n, ra, dec) for n, ra, dec, _ in fakes], names=["name", "ra", "dec"]).write(
        root / "targets.csv")
    hook = root / "hook.py"
    sink = root / "alerts.jsonl"
    hook.write_text(f"import sys\nopen({str(sink)!r}, 'a').write(sys.stdin.read() + '\\n')\n")
    (root / "config.toml").write_text(
        f'[targets]\nfile = "{root / "targets.csv"}"\n'
        f'[alerts]\ncommand = "{sys.executable} {hook}"\n')
    v = injections[1]
    out = root / "out"
    rc = main(["reduce", str(night.raw_dir), "--out", str(out), "--catalog",
               str(night.catalog_path), "--config", str(root / "config.toml"),
               "--target", f"VAR={v.ra},{v.dec}"])
    assert rc in (0, 3)
    return night, out, root


def _points(night, out):
    """(truth, measured) rows of every frame point of every light curve."""
    from astropy.io import fits

    from photowatch.io.lightcurves import read_lightcurve
    from photowatch.sim.inject import load_truth

    truth = load_truth(night.root)
    rows = []
    for path in sorted((out / "lightcurves").rglob("*.ecsv")):
        lc = read_lightcurve(path)
        name = {"NGC0001": "afterglow", "VAR": "variable"}.get(lc.meta["target"],
                                                                lc.meta["target"])
        for r in lc[lc["kind"] == "frame"]:
            orig = fits.getheader(r["product"])["ORIGFILE"]
            t = truth[(truth["name"] == name) & (truth["frame"] == orig)]
            if len(t):
                rows.append((name, float(t["mag"][0]), float(t["flux_e"][0]), r))
    return rows


def test_light_curves_against_the_injected_truth(afterglow_night):
    night, out, root = afterglow_night
    rows = _points(night, out)
    names = {r[0] for r in rows}
    assert {"afterglow", "variable"} <= names and len(names) >= 10
    mag_pulls = []
    # a faint sharp source whose core the cosmic-ray cleaner took (stages/cosmics.py) is
    # flagged, not trusted: rare, and said in the file (flag 32)
    cleaned = [r for r in rows if r[3]["flags"] & FLAG_COSMIC]
    assert len(cleaned) <= 0.05 * len(rows)
    for _name, mag, _flux_e, r in rows:
        if r["flags"] & FLAG_COSMIC:
            continue
        if r["detected"]:
            assert np.isfinite(r["mag"]) and np.isnan(r["uplim"])
            if mag < r["limmag"] - 0.5:  # clear of the detection threshold's selection
                mag_pulls.append((r["mag"] - mag) / r["magerr"])
        else:
            # a non-detection: an upper limit, and the truth is fainter than it
            assert np.isnan(r["mag"]) and mag > r["uplim"]
        # every point below LIMMAG by 0.75 mag (S/N < 2.5) is an upper limit
        if mag > r["limmag"] + 0.75:
            assert not r["detected"]
    mag_pulls = np.array(mag_pulls)
    assert len(mag_pulls) >= 40
    # one small night: a loose band here; benchmarks/bench_live.py gives the width over seeds
    assert abs(np.mean(mag_pulls)) < 0.4
    assert 0.75 < np.std(mag_pulls) < 1.3
    # the afterglow faded through LIMMAG: detected first, upper limits at the end
    ag = [r for r in rows if r[0] == "afterglow"]
    assert ag[0][3]["detected"] and not ag[-1][3]["detected"]


def test_limmag_everywhere_and_one_point_per_frame(afterglow_night):
    import sqlite3

    from astropy.io import fits

    from photowatch.run.status import status_data

    night, out, root = afterglow_night
    products = sorted((out / "reduced").rglob("*o.fits"))
    assert products
    for p in products:
        h = fits.getheader(p, "SCI")
        if h.get("MAGZP") is not None:
            assert 19.0 < h["LIMMAG"] < 24.0 and h["LIMFLUX"] > 0
    coadd = next((out / "coadds").rglob("coadd_*.fits"))
    lim_c = fits.getheader(coadd)["LIMMAG"]
    lims = [fits.getheader(p, "SCI")["LIMMAG"] for p in products
            if fits.getheader(p, "SCI").get("LIMMAG")]
    assert lim_c > max(lims)  # the coadd is deeper than any of its frames
    status = status_data(out)
    frames = [f for f in status["frames"] if f.get("limmag") is not None]
    assert frames and all(19 < f["limmag"] < 24 for f in frames)
    assert status["coadds"][0]["limmag"] == pytest.approx(lim_c, abs=1e-3)
    # one point per frame and target, plus one per coadd
    con = sqlite3.connect(out / "state.sqlite")
    dup = con.execute("SELECT night, target, key, COUNT(*) FROM forced GROUP BY 1, 2, 3 "
                      "HAVING COUNT(*) > 1").fetchall()
    assert dup == []
    kinds = dict(con.execute("SELECT kind, COUNT(*) FROM forced WHERE target='NGC0001' "
                             "GROUP BY kind").fetchall())
    assert kinds["coadd"] == 1 and kinds["frame"] >= 4
    # alerts: the afterglow detected (once), frames rejected by quality said so too
    docs = [json.loads(x) for x in (root / "alerts.jsonl").read_text().splitlines()]
    detected = [d for d in docs if d["event"] == "target_detected" and d["target"] == "NGC0001"]
    assert len(detected) == 1 and detected[0]["mag"] > 15
    # the report: night.json's light curves and the plot in the page's first screen
    report = next((out / "report").rglob("index.html"))
    page = report.read_text()
    assert "id=\"lightcurves\"" in page and "lightcurves.png" in page and "NGC0001" in page
    facts = json.loads((report.parent / "night.json").read_text())
    assert len(facts["lightcurves"]["NGC0001"]["points"]) == kinds["frame"] + kinds["coadd"]


def test_blind_detection_reaches_limmag_without_false_sources(afterglow_night):
    """The CAT (blind detection) finds the injected sources down to the LIMMAG it states,
    and what it finds beyond the true stars and injections is a handful at most.

    A loose bound on one small night (8 frames, ~100 points); the tight figure over seeds
    and sizes is in benchmarks/README.md, "Depth" (bench_live.py --accuracy)."""
    from astropy.io import fits
    from astropy.table import Table as T
    from astropy.wcs import WCS
    from scipy.spatial import cKDTree

    from photowatch.sim.inject import load_truth

    night, out, root = afterglow_night
    truth = load_truth(night.root)
    stars = night.stars
    dm, found, false, frames = [], [], 0, 0
    for p in sorted((out / "reduced").rglob("*o.fits")):
        sci = fits.getheader(p, "SCI")
        if sci.get("LIMMAG") is None or sci.get("FWHM") is None:
            continue
        cat = T.read(p, hdu="CAT")
        orig = fits.getheader(p)["ORIGFILE"]
        fwhm_px = sci["FWHM"] / sci.get("PIXSCALE", 0.96)
        wcs = WCS(sci)
        t = truth[truth["frame"] == orig]
        ix, iy = wcs.all_world2pix(np.asarray(t["ra"]), np.asarray(t["dec"]), 1)
        sx, sy = wcs.all_world2pix(np.asarray(stars["ra"]), np.asarray(stars["dec"]), 1)
        cxy = np.column_stack([cat["x"], cat["y"]])
        d, _ = cKDTree(cxy).query(np.column_stack([ix, iy]))
        dm += list(np.asarray(t["mag"]) - sci["LIMMAG"])
        found += list(d < fwhm_px)
        # a CAT source with no true star (any magnitude, on or just off the frame) or
        # injection within 1.5 FWHM is a false detection
        d2, _ = cKDTree(np.column_stack([np.r_[sx, ix], np.r_[sy, iy]])).query(cxy)
        false += int((d2 > 1.5 * fwhm_px).sum())
        frames += 1
    dm, found = np.array(dm), np.array(found)
    assert frames >= 4 and len(dm) >= 40
    # bright of the limit: found; within 0.5 mag above it: about half or more (seed 11:
    # 8 of 12; the 3x3-kernel detection at 5 sigma per pixel found none there: it
    # stopped 0.8 mag short of LIMMAG)
    assert found[dm < -1.0].mean() >= 0.95
    near = (dm > -0.5) & (dm < 0.0)
    assert near.sum() >= 8 and found[near].mean() >= 0.4
    assert found[dm > 1.0].mean() <= 0.2 if (dm > 1.0).any() else True
    assert false / frames <= 1.0


def test_rereduction_replaces_the_frames_point(afterglow_night, tmp_path):
    """requeue + reduce again (a re-reduction): the light curve keeps one point per frame."""
    import shutil

    from photowatch.io.lightcurves import read_lightcurve
    from photowatch.state.store import Store

    night, out, root = afterglow_night
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    lc_path = next((copy / "lightcurves").rglob("NGC0001.ecsv"))
    before = read_lightcurve(lc_path)
    store = Store(copy / "state.sqlite")
    row = store.conn.execute("SELECT * FROM frames WHERE state='reduced' AND kind='object' "
                             "ORDER BY obs_time LIMIT 1").fetchone()
    store.conn.execute("UPDATE frames SET stale=1 WHERE id=?", (row["id"],))
    stamp = store.conn.execute("SELECT updated_at FROM forced WHERE key=? AND target='NGC0001'",
                               (row["name"],)).fetchone()[0]
    from photowatch.core.config import load_settings
    from photowatch.run.engine import Engine

    settings = load_settings(root / "config.toml").with_overrides(
        paths={"output_dir": str(copy)})
    engine = Engine(settings, catalog_path=str(night.catalog_path))
    import threading

    engine.run(threading.Event(), until_idle=True, rereduce=True)
    engine.shutdown()
    after = read_lightcurve(lc_path)
    again = store.conn.execute("SELECT updated_at FROM forced WHERE key=? AND "
                               "target='NGC0001'", (row["name"],)).fetchone()[0]
    assert again > stamp  # measured again, in place
    assert len(after) == len(before)
    assert sorted(after["key"]) == sorted(before["key"])


def test_alert_rules_detected_and_faded():
    """target_detected: the night's first detection in a filter; target_faded: fainter than
    the previous detection by fade_sigma, or an upper limit fainter than it."""
    from types import SimpleNamespace

    from photowatch.core.config import Settings
    from photowatch.run.live import _alert_rules

    sent = []
    engine = SimpleNamespace(settings=Settings(), _alert_runner=SimpleNamespace(
        emit=lambda event, facts: sent.append((event, facts))))

    def point(mag=None, err=None, uplim=None):
        return {"filter": "r", "mjd": 1.0, "mag": mag, "magerr": err, "limmag": 21.0,
                "uplim": uplim, "snr": None, "ra": 1.0, "dec": 2.0,
                "detected": int(mag is not None)}

    prev = {"detected": 1, "mag": 18.0, "magerr": 0.05, "key": "f1"}
    cases = [
        (point(18.0, 0.05), {"previous": None, "others_detected": 0}, ["target_detected"]),
        (point(18.1, 0.05), {"previous": prev, "others_detected": 1}, []),  # 1.4 sigma
        (point(18.5, 0.05), {"previous": prev, "others_detected": 1}, ["target_faded"]),
        (point(uplim=19.0), {"previous": prev, "others_detected": 1}, ["target_faded"]),
        (point(uplim=18.1), {"previous": prev, "others_detected": 1}, []),  # not constraining
        (point(uplim=19.0), {"previous": None, "others_detected": 0}, []),
    ]
    for p, seen, expected in cases:
        sent.clear()
        _alert_rules(engine, "2020-01-28", "GRB", p, seen, frame="a.fits")
        assert [e for e, _ in sent] == expected, (p, seen)
    _alert_rules(engine, "2020-01-28", "GRB", point(18.0, 0.05),
                 {"previous": None, "others_detected": 0}, frame="a.fits")
    assert sent[-1][1]["target"] == "GRB" and sent[-1][1]["frame"] == "a.fits"


def test_bad_targets_stop_before_any_work(tmp_path, capsys):
    from photowatch.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    out = tmp_path / "out"
    assert main(["reduce", str(raw), "--out", str(out), "--target", "GRB=400,0"]) == 2
    assert "GRB=400,0" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[targets]\nfile = "{tmp_path / "nope.csv"}"\n')
    assert main(["reduce", str(raw), "--out", str(out), "--config", str(cfg)]) == 2
    assert "nope.csv: not found" in capsys.readouterr().err
    assert not (out / "state.sqlite").exists()
