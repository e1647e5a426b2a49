"""Changes (issue 21): new, varying and moving sources, against the simulator's truth.

The pure parts first (linking detections into tracks, the artefact and shape
cuts), then one small simulated night (512 px at 0.48"/px, SDSS-R, 7 science
frames) with an asteroid and a fading new source injected mid-night, reduced
with its 21 mag reference catalogue: the new source is a candidate in the
first frame it is in, the asteroid is one moving track at its true rate, and
nothing else is a candidate.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest
from astropy.table import Table

from photowatch.core.config import Changes, Settings
from photowatch.core.frame import Mask
from photowatch.run.batch import reduce_directory
from photowatch.sim.movers import Asteroid, NewSource
from photowatch.sim.night import simulate_night
from photowatch.stages.changes import find_candidates, link_tracks, reference_limit
from photowatch.state.store import Store

T0 = datetime(2020, 1, 29, 2, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------- linking

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_link_tracks_asteroid_static_and_noise(seed):
    rng = np.random.default_rng(seed)
    n = 8
    t = np.sort(rng.uniform(0, 12, n))  # minutes
    rate = rng.uniform(0.2, 2.0) * np.array([math.cos(seed), math.sin(seed)])  # "/min
    cosd = math.cos(math.radians(25.0))
    ra_a = 60 + (rate[0] * t + rng.normal(0, 0.08, n)) / 3600 / cosd
    dec_a = 25 + (rate[1] * t + rng.normal(0, 0.08, n)) / 3600
    ra_s = np.full(n, 60.02) + rng.normal(0, 0.08, n) / 3600 / cosd
    dec_s = np.full(n, 24.99) + rng.normal(0, 0.08, n) / 3600
    k = 6
    ra_n, dec_n, t_n = 60 + rng.uniform(-0.1, 0.1, k), 25 + rng.uniform(-0.1, 0.1, k), \
        rng.uniform(0, 12, k)
    groups = link_tracks(np.r_[t, t, t_n], np.r_[ra_a, ra_s, ra_n], np.r_[dec_a, dec_s, dec_n])
    moving = [g for g in groups if g.moving]
    assert len(moving) == 1
    assert sorted(moving[0].members) == list(range(n))
    assert moving[0].rate_ra_arcsec_min == pytest.approx(rate[0], abs=0.05)
    assert moving[0].rate_dec_arcsec_min == pytest.approx(rate[1], abs=0.05)
    static = [g for g in groups if not g.moving and len(g.members) > 1]
    assert [sorted(g.members) for g in static] == [list(range(n, 2 * n))]
    assert sum(len(g.members) for g in groups) == 2 * n + k  # every detection, once


def test_link_tracks_too_fast_or_too_few_is_not_a_track():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    dec = 25 + np.zeros(4)
    fast = 60 + 30.0 * t / 3600 / math.cos(math.radians(25))  # 30"/min: above the limit
    assert not any(g.moving for g in link_tracks(t, fast, dec))
    slow = 60 + 0.8 * t / 3600 / math.cos(math.radians(25))
    assert not any(g.moving for g in link_tracks(t[:2], slow[:2], dec[:2]))
    assert [g.moving for g in link_tracks(t, slow, dec)] == [True]


# ---------------------------------------------------------------------------- comparison

def _field(seed, n_ref=60):
    """A reference of n_ref isolated stars and a frame catalogue of the same stars."""
    rng = np.random.default_rng(seed)
    scale = 0.5  # arcsec/px
    x = rng.uniform(30, 470, n_ref)
    y = rng.uniform(30, 470, n_ref)
    # keep them isolated (> 30 px = 7.5 FWHM apart) so that crowding does not decide
    keep = np.ones(n_ref, bool)
    for i in range(n_ref):
        d = np.hypot(x[:i] - x[i], y[:i] - y[i])
        keep[i] = not np.any(d[keep[:i]] < 30)
    x, y = x[keep], y[keep]
    ra = 60 - (x - 250) * scale / 3600 / math.cos(math.radians(25))
    dec = 25 + (y - 250) * scale / 3600
    mag = rng.uniform(16, 20, x.size)
    ref = Table({"ra": ra, "dec": dec, "mag": mag, "magerr": np.full(x.size, 0.01)})
    err = 0.01 + 0.02 * 10 ** (0.4 * (mag - 19))
    cat = Table({"x": x, "y": y, "ra": ra, "dec": dec, "mag": mag + rng.normal(0, 1, x.size) * err,
                 "magerr": err, "snr": 1.0857 / err, "fwhm": np.full(x.size, 4.0),
                 "ellipticity": np.full(x.size, 0.05), "flags": np.zeros(x.size, int)})
    return cat, ref, scale


def _add(cat, x, y, mag, **kw):
    row = {c: cat[c][0] for c in cat.colnames}
    row.update(x=x, y=y, ra=60 - (x - 250) * 0.5 / 3600 / math.cos(math.radians(25)),
               dec=25 + (y - 250) * 0.5 / 3600, mag=mag, magerr=0.03, snr=36.0, **kw)
    cat.add_row([row[c] for c in cat.colnames])


@pytest.mark.parametrize("seed", [4, 5])
def test_new_and_varying_found_and_artefacts_turned_away(seed):
    cat, ref, scale = _field(seed)
    mask = np.zeros((500, 500), np.uint16)
    ref_limit = 21.0
    _add(cat, 100.5, 400.5, 18.5)  # new, clean
    _add(cat, 400.5, 100.5, 18.5)  # new, on a cosmic ray
    mask[99:102, 399:402] = Mask.COSMIC
    _add(cat, 250.5, 492.0, 18.5)  # new, at the edge
    _add(cat, 300.5, 300.5, 18.5)  # new, near a saturation bleed
    mask[290:320, 310] = Mask.SATURATED
    _add(cat, 200.5, 150.5, 18.5, fwhm=1.0)  # sharp: a hot pixel
    _add(cat, 150.5, 250.5, 18.5, ellipticity=0.8)  # a streak
    _add(cat, 350.5, 420.5, 20.9)  # new but fainter than the reference can tell
    added = np.array([(100.5, 400.5), (400.5, 100.5), (250.5, 492.0), (300.5, 300.5),
                      (200.5, 150.5), (150.5, 250.5), (350.5, 420.5)])
    far = np.array([np.min(np.hypot(*(added - (x, y)).T)) > 40
                    for x, y in zip(cat["x"][:len(ref)], cat["y"][:len(ref)])])
    i_vary = int(np.argmin(np.where(far, np.abs(cat["mag"][:len(ref)] - 18.0), 99)))
    cat["mag"][i_vary] -= 0.5  # brightened by 0.5 mag
    cat["flags"][i_vary] = 0
    found = find_candidates(cat, ref, mask=mask, fwhm_px=4.0, pixel_scale_arcsec=scale,
                            ref_limit=ref_limit, limmag=21.5)
    t = found.table
    new = t[t["kind"] == "new"]
    assert len(new) == 1 and abs(new["x"][0] - 100.5) < 0.01, new
    vary = t[t["kind"] == "varying"]
    assert len(vary) == 1 and abs(vary["x"][0] - cat["x"][i_vary]) < 0.01
    assert vary["delta_mag"][0] == pytest.approx(-0.5, abs=0.1)
    assert found.rejected["mask_core"] >= 1 and found.rejected["edge"] >= 1
    assert found.rejected["saturation"] >= 1 and found.rejected["shape"] >= 2
    assert found.rejected["fainter_than_reference"] == 1


def test_reference_limit_is_the_turnover():
    rng = np.random.default_rng(3)
    # counts rising 0.3 dex per mag up to a hard cut at 21
    m = 21 - rng.exponential(1 / (0.3 * math.log(10)), 5000)
    assert reference_limit(m) == pytest.approx(21.0, abs=0.26)


# ---------------------------------------------------------------------------- a night

@pytest.fixture(scope="module")
def injected_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("changes")
    asteroid = Asteroid(60.0 + 20 / 3600, 25.0 - 30 / 3600, T0.replace(minute=20), 0.5, -0.3,
                        mags={"r": 19.3})
    # appears between the 2nd and 3rd science frames, then fades as t^-1.2
    burst = NewSource(60.0 - 40 / 3600, 25.0 + 25 / 3600, T0.replace(minute=22),
                      mags={"r": 18.6}, t_ref_min=1.0, alpha=1.2)
    sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R",), seed=7,
                         n_science=7, write_crmasks=False, write_models=False,
                         injections=[asteroid, burst])
    out = root / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                               progress=False)
    assert summary.ok, summary.problems
    return sim, out


def _frames(out):
    store = Store(out / "state.sqlite")
    frames = [r for r in store.frames() if r["kind"] == "object" and r["state"] == "reduced"]
    return store, frames


def _near(c, d, tol_px=1.5):
    return math.hypot(c["x"] - d["x"], c["y"] - d["y"]) < tol_px


def test_new_source_is_a_candidate_in_its_first_frame(injected_night):
    sim, out = injected_night
    store, frames = _frames(out)
    truth = {f.raw_name: f for f in sim.objects()}
    cands = store.candidates(frames[0]["night"])
    by_frame = {}
    for c in cands:
        by_frame.setdefault(c["frame_id"], []).append(c)
    seen = [(f, [d for d in truth[f["raw_name"]].injected or [] if d["name"] == "transient"])
            for f in frames]
    first = next(i for i, (_, d) in enumerate(seen) if d)
    assert first >= 2  # it appears mid-night: earlier frames show nothing there
    f, (d,) = seen[first]
    hits = [c for c in by_frame.get(f["id"], []) if _near(c, d)]
    assert len(hits) == 1 and hits[0]["kind"] == "new", (d, by_frame.get(f["id"]))
    assert hits[0]["mag"] == pytest.approx(d["mag"], abs=5 * hits[0]["magerr"] + 0.03)
    assert hits[0]["significance"] >= 5
    # detections of the fading source are one stationary object
    objects = {c["object_id"] for fr, ds in seen for c in by_frame.get(fr["id"], [])
               for dd in ds if _near(c, dd)}
    assert len(objects) == 1
    assert not any(c["moving"] for c in cands if c["object_id"] in objects)


def test_asteroid_is_one_linked_track(injected_night):
    sim, out = injected_night
    store, frames = _frames(out)
    truth = {f.raw_name: f for f in sim.objects()}
    cands = store.candidates(frames[0]["night"])
    hits = []
    for f in frames:
        for d in truth[f["raw_name"]].injected or []:
            if d["name"] == "asteroid":
                hits += [c for c in cands if c["frame_id"] == f["id"] and _near(c, d)]
    assert len(hits) >= 5
    assert len({c["object_id"] for c in hits}) == 1
    assert all(c["moving"] for c in hits)
    assert hits[0]["rate_ra"] == pytest.approx(0.5, abs=0.05)
    assert hits[0]["rate_dec"] == pytest.approx(-0.3, abs=0.05)
    # nothing else moves
    assert {c["object_id"] for c in cands if c["moving"]} == {hits[0]["object_id"]}


def test_no_false_candidates_and_files(injected_night):
    sim, out = injected_night
    store, frames = _frames(out)
    truth = {f.raw_name: f for f in sim.objects()}
    cands = store.candidates(frames[0]["night"])
    names = {f["id"]: f["raw_name"] for f in frames}
    false = [c for c in cands
             if not any(_near(c, d, 2.0) for d in truth[names[c["frame_id"]]].injected or [])]
    assert len(false) < len(frames) * 0.5, false  # < 1 per frame at 4k: the benchmark
    for f in frames:
        qc = json.loads(f["qc_json"])
        assert "candidates" in qc and qc["timings"]["changes"] >= 0
    folder = out / "candidates" / frames[0]["night"]
    table = Table.read(folder / "candidates.ecsv", format="ascii.ecsv")
    assert len(table) == len(cands)
    assert set(table["kind"]) <= {"new", "varying"}
    for row in table:
        assert (folder / row["cutout"]).is_file() and (folder / row["ref_cutout"]).is_file()
    assert not list(folder.rglob("*.tmp"))


def test_changes_can_be_switched_off():
    assert Settings().changes.enabled
    assert not Settings().with_overrides(changes={"enabled": False}).changes.enabled
    assert Changes().vary_sigma == 5.0 and Changes().min_snr == 5.0


@pytest.mark.slow
def test_without_a_catalogue_the_first_coadd_is_the_reference(injected_night, tmp_path):
    sim, _ = injected_night
    out = tmp_path / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim.raw_dir, settings, catalog=None, progress=False)
    assert summary.ok, summary.problems
    store, frames = _frames(out)
    night = frames[0]["night"]
    ref = Table.read(out / "candidates" / night / "reference_NGC0001_SDSS-R.ecsv")
    assert ref.meta["ncombine"] >= Changes().reference_frames and len(ref) > 50
    truth = {f.raw_name: f for f in sim.objects()}
    cands = store.candidates(night)
    compared = [f for f in frames if "candidates" in json.loads(f["qc_json"])]
    assert len(compared) >= 3
    # the asteroid has left its place in the reference: new in the frames compared
    hits = [c for f in compared for d in truth[f["raw_name"]].injected or []
            if d["name"] == "asteroid"
            for c in cands if c["frame_id"] == f["id"] and _near(c, d)]
    assert len(hits) >= 2 and all(c["kind"] == "new" for c in hits)
    names = {f["id"]: f["raw_name"] for f in frames}
    false = [c for c in cands
             if not any(_near(c, d, 2.0) for d in truth[names[c["frame_id"]]].injected or [])]
    assert len(false) <= len(compared), false


# ---------------------------------------------------------------------------- report

@pytest.mark.parametrize("rotation, flip, north, east", [
    (0.0, False, (0, 1), (-1, 0)),  # north up, east left (normal parity, as on the sky)
    (0.0, True, (0, 1), (1, 0)),  # mirrored
    (90.0, False, (1, 0), (0, 1)),  # the +y axis points east
])
def test_compass_arrows_follow_the_wcs(rotation, flip, north, east):
    from astropy.wcs import WCS

    from photowatch.report.latest import compass
    from photowatch.sim.night import wcs_header

    wcs = WCS(wcs_header(400, 0.5, rotation, flip, 150.0, 60.0))
    n, e, scale = compass(wcs, 199.5, 199.5)
    assert n == pytest.approx(north, abs=0.01) and e == pytest.approx(east, abs=0.01)
    assert scale == pytest.approx(0.5, rel=0.01)


def test_report_panels(injected_night):
    from photowatch.core.config import Settings as _S
    from photowatch.report.candidates import candidate_facts
    from photowatch.report.html import write_report
    from photowatch.report.latest import latest_frame_facts

    sim, out = injected_night
    store, frames = _frames(out)
    night = frames[0]["night"]
    facts = candidate_facts(store, night)
    kinds = [o["kind"] for o in facts["objects"]]
    assert kinds.count("moving") == 1  # the asteroid: one entry, with its rate
    moving = next(o for o in facts["objects"] if o["kind"] == "moving")
    assert math.hypot(moving["rate_ra_arcsec_min"], moving["rate_dec_arcsec_min"]) == \
        pytest.approx(math.hypot(0.5, 0.3), abs=0.05)
    assert moving["detections"] >= 5
    latest = latest_frame_facts(store, night)
    assert latest["name"] in {f["name"] for f in frames}
    assert latest["fwhm_arcsec"] > 0 and latest["zp"] > 20 and latest["airmass"] >= 1
    assert latest["limmag"] == pytest.approx(21.3, abs=1.0)
    page = write_report(out, store, night, _S(), final=False).read_text()
    folder = out / "report" / night
    assert (folder / "img" / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = page.index('id="latest"')
    assert first < page.index('id="candidates"') < page.index('id="problems"')
    assert "LIMMAG" in page and "moving" in page and "cutouts/" in page
    data = json.loads((folder / "night.json").read_text())
    assert data["latest"]["name"] == latest["name"]
    assert data["candidates"]["by_kind"]["moving"] == 1


def test_night_table_rewritten_only_when_a_frame_changes_it(injected_night, tmp_path,
                                                             monkeypatch):
    """A frame that had no candidates and has none leaves the night's table alone (it
    is still the store's); one whose candidates went away rewrites it without them."""
    import shutil
    import types

    import photowatch.stages.changes as stage
    from photowatch.run import changes

    _, out0 = injected_night
    out = tmp_path / "out"
    shutil.copytree(out0, out, ignore=shutil.ignore_patterns("*.fits", "*.png"))
    store, frames = _frames(out)
    night = frames[0]["night"]
    table_path = out / "candidates" / night / "candidates.ecsv"
    with_cands = {c["frame_id"] for c in store.candidates(night)}
    had = next(f for f in frames if f["id"] in with_cands)
    none = next((f for f in frames if f["id"] not in with_cands), None)

    empty = Table(names=("ra", "dec", "x", "y", "mag", "magerr", "snr", "significance",
                         "kind", "ref_mag", "delta_mag"), dtype=[float] * 8 + [str] + [float] * 2)
    monkeypatch.setattr(changes, "reference_for", lambda *a: Table(
        {"ra": [60.0], "dec": [25.0], "mag": [15.0], "magerr": [0.01]}))
    monkeypatch.setattr(stage, "find_candidates", lambda *a, **k: stage.Candidates(empty))
    engine = types.SimpleNamespace(settings=Settings(), out=out, store=store, catalog=None,
                                   in_background=lambda *a, **k: None)
    info = types.SimpleNamespace(night=night, target=frames[0]["target"], filter="SDSS-R",
                                 pixel_scale_arcsec=0.48, obs_time=None, exptime_s=60.0)
    result = types.SimpleNamespace(
        qc={"abscal": True, "phot_status": "ok", "aststat": "ok", "fwhm_arcsec": 1.0},
        wcs=object(), cat=Table({"ra": [60.0], "dec": [25.0]}),
        frame=types.SimpleNamespace(sci=np.zeros((8, 8)), mask=np.zeros((8, 8), np.int16),
                                    header={}))

    def check(frame):
        return changes.check_frame(engine, {"id": frame["id"], "name": frame["name"]}, info,
                                   None, result)

    if none is not None:
        table_path.write_text("left alone")
        assert check(none) == [] and table_path.read_text() == "left alone"
    table_path.write_text("stale")
    check(had)  # its candidates are gone: the table is rewritten without them
    table = Table.read(table_path, format="ascii.ecsv")
    assert len(table) == len(store.candidates(night)) > 0
    assert had["id"] not in {c["frame_id"] for c in store.candidates(night)}
    table_path.write_text("left alone")
    check(had)  # nothing before, nothing now, the file there: not rewritten
    assert table_path.read_text() == "left alone"
