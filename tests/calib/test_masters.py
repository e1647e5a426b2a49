"""Masters from simulated and real calibration frames, against truth and PhotoPipe's cuts."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from shared_data import RATIR

from photowatch.calib.combine import robust_level
from photowatch.core.config import Settings
from photowatch.run.engine import Engine
from photowatch.run.ingest import ingest_file
from photowatch.sim.night import simulate_night


def run_engine(raw_files, out, **overrides):
    settings = Settings().with_overrides(paths={"output_dir": str(out)}, **overrides)
    engine = Engine(settings, workers=2)
    engine.startup()
    for path in raw_files:
        ingest_file(engine.store, path, settings)
    engine.run(threading.Event(), until_idle=True)
    return engine


@pytest.fixture(scope="module")
def calib_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    night = simulate_night(root / "sim", size=256, binning=4, filters=("SDSS-R",), seed=11,
                           n_bias=8, n_dark=5, n_flat=9, n_science=0, satellite_flat=True,
                           catalog=False)
    files = [f.path for f in night.frames if f.kind in ("bias", "dark", "flat")]
    engine = run_engine(files, root / "out")
    return night, engine


def master(engine, kind):
    rows = [m for m in engine.store.latest_masters() if m["kind"] == kind]
    assert len(rows) == 1, rows
    with fits.open(rows[0]["path"]) as h:
        return rows[0], h["SCI"].data.astype(float), h["ERR"].data.astype(float), h[0].header


def good_pixels(night, shape):
    bad = np.zeros(shape, bool)
    bad[:, night.params["bad_column"]] = True
    dark = night.true_dark_e_per_s()
    bad |= dark > 5 * np.median(dark)  # hot pixels: their noise is their own
    return ~bad


def test_calibration_frames_end_used_or_rejected(calib_night):
    night, engine = calib_night
    states = {r["raw_name"]: r for r in engine.store.frames()}
    for f in night.frames:
        row = states[f.raw_name]
        if f.expect in ("saturated", "faint"):
            assert row["state"] == "rejected", (f.raw_name, row["reason"])
            assert ("saturated" if f.expect == "saturated" else "too faint") in row["reason"]
            assert json.loads(row["qc_json"])["raw_median_adu"] > 0  # the measured level stored
        else:
            assert row["state"] == "used", (f.raw_name, row["state"], row["reason"])


def test_master_bias_matches_truth(calib_night):
    night, engine = calib_night
    row, data, err, hdr = master(engine, "bias")
    truth = night.true_bias_e()
    n = hdr["NCOMBINE"]
    assert n == 8 and not hdr["PROVISNL"]
    ok = good_pixels(night, data.shape)
    resid = (data - truth)[ok]
    limit = 6.0 / np.sqrt(n)  # read noise / sqrt(N)
    assert abs(np.mean(resid)) < 0.2 * limit + 0.05
    assert np.std(resid) < 1.2 * limit * np.sqrt(1 + np.pi / 2 / 32)  # + per-row overscan noise
    assert np.median(err[ok]) == pytest.approx(limit, rel=0.1)


def test_master_dark_matches_truth(calib_night):
    night, engine = calib_night
    row, data, err, hdr = master(engine, "dark")
    truth = night.true_dark_e_per_s()
    ok = good_pixels(night, data.shape)
    pull = ((data - truth) / err)[ok]
    assert abs(np.mean(pull)) < 0.1
    assert np.std(pull) < 1.2


def test_master_flat_matches_truth_and_rejects_satellite(calib_night):
    night, engine = calib_night
    row, data, err, hdr = master(engine, "flat")
    truth = night.true_flat("SDSS-R")
    ok = good_pixels(night, data.shape)
    norm_t, _ = robust_level(truth)
    assert robust_level(data)[0] == pytest.approx(1.0, abs=1e-3)
    pull = ((data - truth / norm_t) / err)[ok]
    assert abs(np.median(pull)) < 0.15
    assert np.std(pull) < 1.2
    # the satellite trail and the stars of the twilight flats were clipped: no outliers left
    assert np.mean(np.abs(pull) > 6) < 1e-3


def test_master_versions_and_provisional(calib_night):
    night, engine = calib_night
    flats = engine.store.masters(kind="flat")
    assert [m["version"] for m in flats] == list(range(1, len(flats) + 1))
    assert [bool(m["provisional"]) for m in flats][:3] == [True, True, False]
    for m in flats:
        assert Path(m["path"]).exists()
        assert fits.getheader(m["path"])["NCOMBINE"] == m["ninputs"]
    current = Path(flats[-1]["path"]).parents[1] / "flat_SDSS-R_C0.fits"
    assert current.exists() and fits.getheader(current)["VERSION"] == flats[-1]["version"]


def test_final_rebuild_and_staleness(calib_night, tmp_path, monkeypatch):
    night, engine = calib_night
    # room in memory for one prepared input (data + variance, float32): the others go
    # through the scratch files, so both ways of holding inputs are checked below
    import photowatch.state.masters as masters_mod

    ny, nx = fits.getdata(engine.store.masters(kind="bias")[0]["path"], "SCI").shape
    monkeypatch.setattr(masters_mod, "FINAL_INPUTS_IN_MEMORY", ny * nx * 8)
    made = engine.book.final_masters(night.frames[0].obs_time and "2020-01-28",
                                     scratch=tmp_path)
    kinds = sorted(c.kind for c in made)
    assert kinds == ["bias", "dark", "flat"]
    for c in made:
        assert c.final
    # idempotent
    assert engine.book.final_masters("2020-01-28", scratch=tmp_path) == []
    row, data, err, hdr = master(engine, "bias")
    assert hdr["FINAL"] and "median" in hdr["METHOD"]
    truth = night.true_bias_e()
    ok = good_pixels(night, data.shape)
    # a clipped median of 8 is ~sqrt(pi/2) noisier than the mean: still close to the limit
    assert np.std((data - truth)[ok]) < 1.35 * 6.0 / np.sqrt(8)


def test_frame_added_once_after_crash(calib_night, tmp_path):
    """A frame already in a master's inputs (crash after the state was saved) is not added again."""
    night, engine = calib_night
    bias = [r for r in engine.store.frames(kind="bias")][0]
    from photowatch.core.classify import FrameInfo
    from photowatch.io.fits import read_raw

    info = FrameInfo.from_summary(json.loads(bias["info_json"]))
    raw, _ = read_raw(bias["path"])
    before = engine.store.latest_masters()
    outcome = engine.book.add_frame(bias["id"], info, raw, engine.profile("lmi"))
    assert outcome.state == "used"
    after = [m for m in engine.store.latest_masters() if m["kind"] == "bias"][0]
    old = [m for m in before if m["kind"] == "bias"][0]
    assert after["ninputs"] == old["ninputs"]


def test_bad_calibration_input(tmp_path, calib_night):
    """A flat of another binning and a bias of another readout start their own masters."""
    night, _ = calib_night
    raw = tmp_path / "raw"
    raw.mkdir()
    src = [f for f in night.frames if f.kind in ("bias", "flat") and f.expect is None]
    files = []
    for f in src:
        shutil.copy(f.path, raw / f.raw_name)
        files.append(raw / f.raw_name)
    odd = raw / "odd_flat.fits"
    with fits.open(src[-1].path) as h:
        h[0].header["CCDSUM"] = "2 2"
        h[0].header["DATE-OBS"] = "2020-01-29T01:59:00.000"
        h.writeto(odd)
    # the other readout's bias comes last: the night's first key keeps the plain name
    odd_bias = raw / "odd_bias.fits"
    with fits.open(src[0].path) as h:
        h[0].header["RDMODE"] = "FAST"
        h[0].header["DATE-OBS"] = "2020-01-29T02:30:00.000"
        h.writeto(odd_bias)
    engine = run_engine([*files, odd, odd_bias], tmp_path / "out")
    rows = {r["raw_name"]: r for r in engine.store.frames()}
    # the odd flat has no bias of its binning: it waits (no master is poisoned)
    assert rows["odd_flat.fits"]["state"] == "waiting"
    assert "binning 2x2" in rows["odd_flat.fits"]["reason"]
    assert rows["odd_bias.fits"]["state"] == "used"
    biases = [m for m in engine.store.latest_masters() if m["kind"] == "bias"]
    assert sorted(m["readout"] for m in biases) == ["", "FAST"]
    main = [m for m in biases if m["readout"] == ""][0]
    assert Path(main["path"]).name.startswith("bias_C0_v")
    fast = [m for m in biases if m["readout"] == "FAST"][0]
    assert Path(fast["path"]).name.startswith("bias_C0_4x4_FAST_v")


@pytest.mark.skipif(not RATIR.is_dir(), reason="shared RATIR data not present")
def test_real_ratir_masters(tmp_path):
    files = sorted(p for p in RATIR.glob("*.fits.gz") if p.name[17] in "bdf")
    local = tmp_path / "raw"
    local.mkdir()
    for p in files:
        shutil.copy(p, local / p.name)
    engine = run_engine(sorted(local.iterdir()), tmp_path / "out")
    rows = {r["raw_name"]: r for r in engine.store.frames()}
    for name in ("20130716T031009C1f.fits.gz", "20130716T031239C1f.fits.gz"):
        assert rows[name]["state"] == "rejected" and "saturated" in rows[name]["reason"]
    for name in ("20130716T032023C1f.fits.gz", "20130716T032218C1f.fits.gz"):
        assert rows[name]["state"] == "rejected" and "too faint" in rows[name]["reason"]
    used = [r for r in rows.values() if r["state"] == "used"]
    assert sum(r["kind"] == "flat" for r in used) == 10
    assert sum(r["kind"] == "bias" for r in used) >= 7
    assert sum(r["kind"] == "dark" for r in used) >= 4
    kinds = {m["kind"]: m for m in engine.store.latest_masters()}
    assert set(kinds) == {"bias", "dark", "flat"}
    with fits.open(kinds["flat"]["path"]) as h:
        flat = h["SCI"].data
        assert flat.shape == (925, 985)  # PhotoPipe's C1 trim
        assert robust_level(flat)[0] == pytest.approx(1.0, abs=1e-3)
    with fits.open(kinds["bias"]["path"]) as h:
        assert abs(np.median(h["SCI"].data) - 640 * 18.64 / 4) < 50  # ~640 ADU in electrons
    # raw files are never modified
    for p in files:
        assert (local / p.name).read_bytes() == p.read_bytes()


def test_persistent_defects_are_pixels_flagged_in_most_frames():
    from photowatch.calib.defects import persistent_defects

    rng = np.random.default_rng(3)
    masks = []
    for _ in range(6):
        m = np.zeros((64, 64), np.uint16)
        m.ravel()[rng.choice(64 * 64, 40, replace=False)] |= 4  # transient hits
        m[10, 20] |= 4  # a defect, every frame
        m[30, 5] = 1  # a known bad pixel: not a cosmic ray
        masks.append(m)
    masks[0][40, 40] |= 4
    masks[1][40, 40] |= 4  # twice in six: a coincidence, not a defect
    for m in masks[:4]:
        m[50, 50] |= 4  # four of six: most frames
    found = persistent_defects(masks)
    assert found[10, 20] and found[50, 50]
    assert not found[40, 40] and not found[30, 5]
    assert found.sum() == 2
    assert persistent_defects(masks[:2]) is None  # too few frames to say
