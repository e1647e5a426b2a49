"""Trust at dawn: finalize never quietly makes a night worse, fixable mistakes are held,
every frame has a way back, failures are bounded, and a full disk is survived.

One night with the demo's parameters (512x512 at binning 4, SDSS-R and SDSS-I, five
science frames each plus a cloudy one, seed 7) is reduced once per module; each test
works on its own copy of the reduced output.
"""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from shared_data import copy_output

from photowatch import cli
from photowatch.core.config import Settings
from photowatch.core.errors import StageFailed
from photowatch.io.fits import inject_fault
from photowatch.run.batch import reduce_directory
from photowatch.run.engine import Engine
from photowatch.run.ingest import ingest_file
from photowatch.sim.night import simulate_night
from photowatch.state.store import Store

QUIET = {"quicklook_png": False}


def settings_for(out: Path, **daemon) -> Settings:
    return Settings().with_overrides(paths={"output_dir": str(out)}, stages=QUIET,
                                     coadd=QUIET, daemon={"report_interval_s": 0, **daemon})


@pytest.fixture(scope="module")
def demo_night(tmp_path_factory):
    """The demo's night (photowatch demo: 512 px, binning 4, R and I, 5 science each, seed 7)
    reduced with its catalogue, not finalized."""
    root = tmp_path_factory.mktemp("trust")
    sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R", "SDSS-I"),
                         n_science=5, exptime_s=60.0, cloud_frame=True, seed=7,
                         write_models=False, write_crmasks=False)
    out = root / "reduced"
    summary = reduce_directory(sim.raw_dir, settings_for(out), catalog=str(sim.catalog_path),
                               progress=False)
    assert summary.ok, summary.problems
    return sim, out


@pytest.fixture
def night_copy(demo_night, tmp_path):
    sim, out = demo_night
    work = tmp_path / "out"
    copy_output(out, work)
    return sim, work


def quicklook_members(store) -> dict:
    return {(c["target"], c["filter"]): {m.split(":v")[0] for m in
                                         json.loads(c["members_json"] or "[]")}
            for c in store.coadds()}


# ---------------------------------------------------------------- 1. finalize compares
def test_demo_night_final_coadds_hold_at_least_the_quicklook_frames(night_copy):
    """Done when: the demo night, reduced then finalized, ends with FINAL coadds that hold
    at least the frames of the quick-look ones (whatever the matcher does on re-reduction)."""
    sim, out = night_copy
    store = Store(out / "state.sqlite")
    before = quicklook_members(store)
    assert before and all(len(v) >= 4 for v in before.values()), before
    assert cli.main(["finalize", "--out", str(out)]) == 0
    for c in store.coadds():
        assert c["stacktype"] == "FINAL"
        final = {m.split(":v")[0] for m in json.loads(c["members_json"])}
        assert before[(c["target"], c["filter"])] <= final, (c["filter"], before, final)
        stats = json.loads(c["stats_json"])
        assert stats["finalstat"] == "COMPLETE" and not stats["lost"]
        assert stats["quicklook"]["ncombine"] <= stats["final"]["ncombine"]
        assert stats["final"]["exptime"] >= stats["quicklook"]["exptime"]
        assert np.isfinite(stats["final"]["depth_mag"])
        assert fits.getheader(c["path"])["FINALSTAT"] == "COMPLETE"
    comparison = store.get_meta(f"finalize:{c['night']}")
    assert {e["file"] for e in comparison["frames"]} >= {f.raw_name for f in sim.frames
                                                        if f.kind == "object" and not f.expect}
    for e in comparison["frames"]:  # before and after, per frame
        assert {"aststat", "phot_status", "accepted"} <= set(e["before"]) & set(e["after"])
    assert not comparison["worse"]


def _solve_only_from(predicate):
    """A solve_astrometry that fails (as the 512-px matcher did) unless predicate(kw)."""
    from photowatch.stages import astrometry as ast

    real = ast.solve_astrometry

    def solve(sources, **kw):
        if predicate(kw):
            return real(sources, **kw)
        return ast.AstrometryResult(None, "failed", "none",
                                    reason="no pattern match: best hypothesis matched 21 of "
                                    "21 stars, need 22 (injected)")
    return solve


def test_a_lost_frame_starts_again_from_its_quicklook_solution_else_exit_3(
        night_copy, monkeypatch, capsys):
    """Every re-solve fails as the 512-px matcher did, except a warm start from the frame's
    own quick-look WCS: those frames are rescued. One frame's quick-look solution is made
    not to fit: it is lost, its FINAL coadd is INCOMPLETE, finalize exits 3."""
    sim, out = night_copy
    store = Store(out / "state.sqlite")
    before = quicklook_members(store)
    from photowatch.stages import astrometry as ast
    from photowatch.stages import solve

    monkeypatch.setattr(ast, "solve_astrometry", _solve_only_from(
        lambda kw: kw.get("previous") is not None and kw["previous"] is kw["wcs_guess"]))
    real = solve.quicklook_fallback
    lost = []

    def fallback(sources, shape, quicklook, reference, settings, failed=""):
        if not lost:  # the first frame's quick-look solution no longer fits (say)
            lost.append(quicklook[0])
            return None
        return real(sources, shape, quicklook, reference, settings, failed=failed)

    monkeypatch.setattr(solve, "quicklook_fallback", fallback)
    # every frame is re-reduced (the final masters barely change them: by default they
    # would be kept as they are, and nothing re-solved)
    config = out.parent / "rereduce-all.toml"
    config.write_text("[calibration]\nfinal_tolerance = 0\n")
    assert cli.main(["finalize", "--out", str(out), "--config", str(config)]) == 3
    printed = capsys.readouterr().out
    assert "done with problems" in printed and "1 incomplete final coadd" in printed
    assert "INCOMPLETE" in printed and "from their quick-look solution" in printed
    failed = [r for r in store.frames(kind="object")
              if json.loads(r["qc_json"] or "{}").get("aststat") == "failed"
              and r["name"] in set().union(*before.values())]
    assert len(failed) == 1, [r["raw_name"] for r in failed]
    lost_row = failed[0]
    rescued = store.frames(kind="object", state="reduced")
    assert len(rescued) == sum(len(v) for v in before.values()) - 1
    for row in rescued:
        qc = json.loads(row["qc_json"])
        assert qc["aststat"] == "ok" and qc["astmethod"] == "quicklook-warm"
        assert "quick-look" in qc["astreason"]
        assert fits.getheader(row["product"], "SCI")["WCSSOLVE"] == "quicklook-warm"
    statuses = {}
    for c in store.coadds():
        hdr = fits.getheader(c["path"])
        statuses[c["filter"]] = hdr["FINALSTAT"]
        final = {m.split(":v")[0] for m in json.loads(c["members_json"])}
        missing = before[(c["target"], c["filter"])] - final
        if c["filter"] == lost_row["filter"]:
            assert missing == {lost_row["name"]}
            assert hdr["FINALSTAT"] == "INCOMPLETE"
            assert lost_row["raw_name"] in hdr["FINALRSN"]
            assert "astrometry failed" in hdr["FINALRSN"]
            # the better quick-look coadd is kept beside it, not silently replaced
            copy = Path(c["path"]).with_suffix(".quicklook.fits")
            assert fits.getheader(copy)["STACKTYP"] == "QUICKLOOK"
            assert fits.getheader(copy)["NCOMBINE"] == len(before[(c["target"], c["filter"])])
            assert hdr["NCOMBINE"] == fits.getheader(copy)["NCOMBINE"] - 1
        else:
            assert not missing and hdr["FINALSTAT"] == "COMPLETE"
    assert sorted(statuses.values()) == ["COMPLETE", "INCOMPLETE"]
    assert not list(out.rglob(".*quicklook-snapshot*"))
    html = (out / "report" / "2020-01-28" / "index.html").read_text()
    assert "Final coadds with fewer frames than the quick-look ones" in html
    assert "incomplete final coadd" in html  # counted under "Needs attention"
    facts = json.loads((out / "report" / "2020-01-28" / "night.json").read_text())
    assert [c["finalstat"] for c in facts["coadds"]].count("INCOMPLETE") == 1
    assert facts["finalize"]["worse"] == [lost_row["raw_name"]]
    assert "Frames worse after finalize's re-reduction" in html


def test_a_quicklook_solution_is_kept_only_while_it_still_fits(night_copy, monkeypatch):
    """quicklook_fallback: the product's own WCS kept when the stars still sit on it; one
    shifted by 20 arcsec (beyond the match radius) is refused."""
    from astropy.table import Table
    from astropy.wcs import WCS

    from photowatch.stages import astrometry as ast
    from photowatch.stages import solve

    sim, out = night_copy
    settings = settings_for(out).stages.astrometry
    monkeypatch.setattr(ast, "solve_astrometry", _solve_only_from(lambda kw: False))
    reference = Table.read(sim.catalog_path)
    row = Store(out / "state.sqlite").frames(kind="object", state="reduced")[0]
    with fits.open(row["product"]) as h:
        wcs = WCS(h["SCI"].header)
        shape = h["SCI"].data.shape
        sources = Table(h["CAT"].data)
    from photowatch.core.schema import XY_ORIGIN  # files are 1-based (FITS), the code 0-based
    sources["x"] = sources["x"] - XY_ORIGIN
    sources["y"] = sources["y"] - XY_ORIGIN
    kept = solve.quicklook_fallback(sources, shape, (wcs, "ok"), reference, settings,
                                      failed="injected")
    assert kept is not None and kept.method == "quicklook-kept" and kept.status == "ok"
    assert kept.nstar >= settings.min_matches and kept.rms_arcsec <= settings.max_rms_arcsec
    assert "injected" in kept.reason
    shifted = wcs.deepcopy()
    shifted.wcs.crval = shifted.wcs.crval + [20 / 3600 / np.cos(np.radians(wcs.wcs.crval[1])),
                                             0]
    assert solve.quicklook_fallback(sources, shape, (shifted, "ok"), reference,
                                      settings) is None


# ---------------------------------------------------------------- 3. requeue
def test_requeue_takes_a_frame_back_past_the_duplicate_rule(night_copy, capsys):
    sim, out = night_copy
    store = Store(out / "state.sqlite")
    row = store.frames(kind="object", state="reduced")[0]
    product, version = Path(row["product"]), row["product_version"]
    store.transition(row["id"], ["reduced"], "quarantined", reason="a wrong verdict")
    args = ["requeue", "--out", str(out), "--state", "quarantined", "--reason", "fixed by hand"]
    assert cli.main([*args, "--dry-run"]) == 0
    assert "would requeue 1 frame" in capsys.readouterr().out
    assert store.frame(row["id"])["state"] == "quarantined"
    assert cli.main([*args, row["raw_name"]]) == 0
    assert store.frame(row["id"])["state"] == "received"
    (event,) = [e for e in store.events(row["id"]) if e["event"] == "requeued"]
    assert event["message"] == "fixed by hand" and event["state_from"] == "quarantined"
    # the same raw directory again: the known path and the content hash do not block it
    summary = reduce_directory(sim.raw_dir, settings_for(out), progress=False)
    assert summary.ok
    again = store.frame(row["id"])
    assert again["state"] == "reduced" and again["product_version"] == version + 1
    assert Path(again["product"]) == product and not list(out.rglob("*.tmp"))
    assert fits.getheader(product, "SCI")["ORIGFILE"] == row["raw_name"]
    # the rule still holds for a second copy of the same bytes
    twin = out.parent / "twin.fits"
    shutil.copy(row["path"], twin)
    assert not ingest_file(store, twin, settings_for(out)).new


# ---------------------------------------------------------------- 6. bounded retries
def test_a_deterministic_failure_ends_rejected_after_max_tries(night_copy, monkeypatch,
                                                               capsys):
    sim, out = night_copy
    store = Store(out / "state.sqlite")
    row = store.frames(kind="object", state="reduced")[0]
    assert store.requeue(row["id"], "test", from_states=["reduced"])
    from photowatch.run import science

    calls = []

    def broken(ctx, *args, **kwargs):  # reduce_object(NightContext, raw, header, ...)
        calls.append(ctx.frame_id)
        raise StageFailed("sources: the same deterministic failure")

    monkeypatch.setattr(science, "reduce_object", broken)
    assert cli.main(["reduce", str(sim.raw_dir), "--out", str(out)]) == 3
    assert "1 rejected (failed, not by quality)" in capsys.readouterr().out
    done = store.frame(row["id"])
    assert done["state"] == "rejected" and len(calls) == 3
    assert "failed the same way 3 times" in done["reason"]
    assert "sources: the same deterministic failure" in done["reason"]
    stage = [e for e in store.events(row["id"]) if e["error_class"] == "stage"]
    assert len(stage) == 3 and "try 1 of 3" in stage[-1]["action"]


# ---------------------------------------------------------------- 7. disk full, read-only
def test_disk_full_then_read_only_during_a_live_night_then_resumes(night_copy):
    sim, out = night_copy
    settings = settings_for(out, retry_backoff_s=0.2, retry_backoff_max_s=0.5, workers=1)
    engine = Engine(settings, command="watch")
    engine.startup()
    store = engine.store
    rows = store.frames(kind="object", state="reduced")[:2]
    versions = {r["id"]: r["product_version"] for r in rows}
    stop = threading.Event()
    with inject_fault(str(out / "reduced" / "*"), errno.ENOSPC):
        for r in rows:
            assert store.requeue(r["id"], "test", from_states=["reduced"])
        thread = threading.Thread(target=engine.run, args=(stop,),
                                  kwargs={"until_idle": False}, daemon=True)
        thread.start()
        deadline = time.time() + 60
        while time.time() < deadline and len(
                [e for e in store.events(level="error") if e["error_class"] == "output"]) < 3:
            time.sleep(0.1)
        assert engine.paused and "No space left on device" in engine.paused
        transient = [e for e in store.events(level="error") if e["error_class"] == "output"]
        assert len(transient) >= 3 and "transient: will retry in" in transient[0]["action"]
        for r in rows:  # nothing marked done that is not done; tries not spent
            now = store.frame(r["id"])
            assert now["state"] in ("received", "processing")
            assert now["product_version"] == versions[r["id"]] and now["tries"] <= 1
        assert thread.is_alive()
    with inject_fault(str(out / "*"), errno.EROFS):  # the output folder turns read-only
        deadline = time.time() + 60
        while time.time() < deadline and not (engine.paused and "Read-only" in engine.paused):
            time.sleep(0.1)
        assert "Read-only file system" in engine.paused
        assert all(store.frame(r["id"])["state"] in ("received", "processing") for r in rows)
    # space is back: no restart, the engine resumes by itself
    deadline = time.time() + 60
    while time.time() < deadline and any(store.frame(r["id"])["state"] != "reduced"
                                         for r in rows):
        time.sleep(0.1)
    stop.set()
    engine.notify()
    thread.join(30)
    engine.shutdown()
    for r in rows:
        assert store.frame(r["id"])["state"] == "reduced"
        assert store.frame(r["id"])["product_version"] == versions[r["id"]] + 1
    assert engine.paused is None and not list(out.rglob("*.tmp"))



def test_a_restart_sweeps_temporaries_from_every_output_folder(tmp_path):
    """A kill -9 during an atomic write leaves its ``.name.XXXX.tmp``; the next start
    removes it wherever the writer was: light curves and candidates too (a daemon test
    killed at a random instant found one left in lightcurves/), and nothing else."""
    out = tmp_path / "out"
    left = [out / "lightcurves" / "2020-01-28" / ".NGC0001.ecsv.5iuypcfk.tmp",
            out / "candidates" / "2020-01-28" / ".candidates.ecsv.abc.tmp",
            out / "reduced" / "2020-01-28" / ".x.fits.def.tmp"]
    kept = [out / "lightcurves" / "2020-01-28" / "NGC0001.ecsv",
            out / "reduced" / "2020-01-28" / ".hidden-note"]
    for p in left + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    engine = Engine(settings_for(out), command="watch")
    engine.startup()
    engine.shutdown()
    assert not [p for p in left if p.exists()]
    assert all(p.exists() for p in kept)

def test_a_short_write_is_a_full_disk(tmp_path):
    """numpy's tofile says "N requested and M written" without an errno (and astropy masks
    it with an AttributeError): atomic_write reports ENOSPC, and leaves nothing behind."""
    from photowatch.io.fits import atomic_write

    def write(fh):
        try:
            raise OSError("262144 requested and 608 written")
        except OSError:
            raise AttributeError("'list' object has no attribute '_file'") from None

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.fits", write)
    assert info.value.errno == errno.ENOSPC and "608 written" in str(info.value)
    assert not list(tmp_path.iterdir())

    def bug(fh):
        raise AttributeError("a real bug")

    with pytest.raises(AttributeError):
        atomic_write(tmp_path / "y.fits", bug)


def test_the_engine_survives_a_full_state_store(night_copy, monkeypatch):
    """SQLite says "database or disk is full" while recording an outcome: the worker does
    not die; the engine pauses, releases the frame it held, and resumes by itself."""
    import sqlite3

    sim, out = night_copy
    settings = settings_for(out, retry_backoff_s=0.2, retry_backoff_max_s=0.5, workers=1)
    engine = Engine(settings, command="watch")
    engine.startup()
    store = engine.store
    row = store.frames(kind="object", state="reduced")[0]
    assert store.requeue(row["id"], "test", from_states=["reduced"])
    real = engine.handle
    failures = []

    def handle(claimed):
        if not failures:
            failures.append(claimed["id"])
            raise sqlite3.OperationalError("database or disk is full")
        return real(claimed)

    monkeypatch.setattr(engine, "handle", handle)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), kwargs={"until_idle": False},
                              daemon=True)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline and store.frame(row["id"])["state"] != "reduced":
        time.sleep(0.1)
    stop.set()
    engine.notify()
    thread.join(30)
    engine.shutdown()
    assert failures == [row["id"]]
    assert store.frame(row["id"])["state"] == "reduced"
    released = [e for e in store.events(row["id"]) if e["message"] ==
                "released after a transient fault"]
    assert released and engine.paused is None


@pytest.mark.slow
def test_the_issue_night_final_coadd_keeps_every_quicklook_frame(tmp_path):
    """Issue 16's reproduction, unpatched: `photowatch simulate` at 512 px (binning 2), reduce
    --catalog, finalize. Before the quick-look fallback the FINAL coadd held 1 of the 6
    frames the quick-look one held ("matched 21 of 21 stars, need 22") and finalize said
    "done", exit 0."""
    sim = simulate_night(tmp_path / "sim", size=512, write_models=False,
                         write_crmasks=False)
    out = tmp_path / "out"
    assert cli.main(["reduce", str(sim.raw_dir), "--out", str(out), "--catalog",
                     str(sim.catalog_path)]) == 0
    store = Store(out / "state.sqlite")
    before = quicklook_members(store)
    config = tmp_path / "rereduce-all.toml"  # re-reduce (and re-solve) every frame, as then
    config.write_text("[calibration]\nfinal_tolerance = 0\n")
    assert cli.main(["finalize", "--out", str(out), "--config", str(config)]) == 0
    for c in store.coadds():
        final = {m.split(":v")[0] for m in json.loads(c["members_json"])}
        assert before[(c["target"], c["filter"])] <= final
        assert fits.getheader(c["path"])["FINALSTAT"] == "COMPLETE"
