"""The declared science chain: its needs are met, it writes provenance, it writes nothing itself.

Also the night context around it: a claim lost to another frame re-runs the stage
against the winner, the engine's remembered field solutions survive a restart, and
the engine and finalize judge quality against the one night-quality context.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photowatch.core.config import Settings
from photowatch.stages.chain import (
    SCIENCE_CHAIN,
    Stage,
    Update,
    check_chain,
    run_chain,
    settings_digest,
)
from photowatch.stages.context import NightContext
from photowatch.stages.quality import Peer, apcor_peers, night_context
from photowatch.state.store import NOT_NULL


def _noop(name, needs, gives):
    return Stage(name, lambda st, ctx: {g: name for g in gives}, needs=needs, gives=gives,
                 settings=lambda s: s.quality)


def test_every_stage_need_is_met_by_the_context_or_an_earlier_stage():
    assert check_chain(SCIENCE_CHAIN) == []
    names = [st.name for st in SCIENCE_CHAIN]
    assert names == ["prepare", "flatten", "mastersky", "skysub", "cosmics", "sources",
                     "astrometry", "zeropoint", "quality"]
    # the check can fail: the same stages out of order, and a need nothing gives
    swapped = (SCIENCE_CHAIN[1], SCIENCE_CHAIN[0], *SCIENCE_CHAIN[2:])
    problems = check_chain(swapped)
    assert problems and "flatten needs 'p'" in problems[0]
    assert check_chain((*SCIENCE_CHAIN, _noop("extra", ("nowhere",), ("x",)))) == [
        "extra needs 'nowhere', which nothing before it gives"]
    assert any("gives 's' again" in p for p in check_chain(
        (*SCIENCE_CHAIN[:5], _noop("again", ("z",), ("s",)))))


def test_settings_digest_follows_the_settings():
    s = Settings()
    cosmics = next(st for st in SCIENCE_CHAIN if st.name == "cosmics")
    other = s.with_overrides(stages={"cosmics": {"sigclip": s.stages.cosmics.sigclip + 1}})
    assert cosmics.digest(s) == cosmics.digest(Settings())
    assert cosmics.digest(other) != cosmics.digest(s)
    # a stage's digest does not move with another stage's settings
    prepare = SCIENCE_CHAIN[0]
    assert prepare.digest(other) == prepare.digest(s)
    assert len(settings_digest({"a": 1})) == 8


def test_runner_lets_values_go_and_reruns_a_stage_whose_claim_was_lost():
    calls = []

    def founder(st, ctx):
        calls.append("founder")
        won_before = len(calls) > 1  # on the second run the winner is visible: no claim
        ups = [] if won_before else [Update("field", {"n": 1}, claim=True)]
        return {"ref": "winner" if won_before else "mine",
                "updates": [*ups, Update("solution", {"n": 2})]}

    chain = (_noop("a", ("raw",), ("p",)),
             Stage("b", founder, needs=("p",), gives=("ref",), settings=lambda s: s.quality),
             _noop("c", ("ref",), ("qc",)))
    ctx = NightContext(settings=Settings(), info=None, profile=None, frame_id=1, member="m")
    applied = []

    def apply(update):
        applied.append(update.kind)
        return not update.claim  # every claim is lost to another frame once

    inputs = {"raw": np.zeros(3), "header": None}
    run = run_chain(chain, ctx, inputs, apply=apply)
    assert inputs == {}  # handed over
    assert calls == ["founder", "founder"]
    # the lost claim stopped the first run's updates; the second run's went through
    assert applied == ["field", "solution"]
    assert run.updates == []  # applied ones are not held
    assert "p" not in run.state and "ref" not in run.state  # let go after their last use
    assert run.state["qc"] == "c"
    assert [k for k, _ in run.provenance] == ["PWSTEP01", "PWSTEP02", "PWSTEP03"]
    assert set(run.timings) == {"a", "b", "c"}
    # without an applier the updates are collected, claims count as won
    calls.clear()
    run = run_chain(chain, ctx, {"raw": 1, "header": None}, keep=True)
    assert calls == ["founder"] and [u.kind for u in run.updates] == ["field", "solution"]
    assert run.state["p"] == "a"  # kept


def test_night_context_is_the_engines_and_finalizes():
    peers = (Peer(1, "R", "M1", "c", 1.0, 1.1, 0.1, 25.0, None),
             Peer(2, "R", "M1", "c", 2.0, 1.2, 0.1, 25.4, None),
             Peer(3, "R", "M2", "c", 3.0, 1.3, 0.1, None, 0.2),
             Peer(4, "I", "M1", "c", 9.0, 1.4, 0.1, 26.0, None),
             Peer(5, "R", "M2", "c", 4.0, None, None, None, -0.1))
    q = night_context(peers, frame_id=1, filt="R", target="M1", qc={"zp_per_s": 24.0})
    assert q.best_transparency == 25.4  # the filter's best, not I's 26.0
    assert q.fwhm == 3.0  # median of frames 2, 3, 5 (not itself)
    q = night_context(peers, frame_id=5, filt="R", target="M2", qc={"transparency_mag": 0.5})
    assert q.best_transparency == 0.5  # relative: of the target, its own value included
    assert q.fwhm == 2.0
    assert night_context(peers[:2], frame_id=1, filt="R", target="M1", qc={}).fwhm is None
    assert apcor_peers(peers, frame_id=1, filt="R", camera="c") == [
        (1.2, 0.1, 2.0), (1.3, 0.1, 3.0), (None, None, 4.0)]


@pytest.fixture(scope="module")
def reduced(sim_small, tmp_path_factory):
    from photowatch.run.batch import reduce_directory

    out = tmp_path_factory.mktemp("chain") / "out"
    settings = Settings().with_overrides(paths={"output_dir": str(out)})
    summary = reduce_directory(sim_small.raw_dir, settings, catalog=str(sim_small.catalog_path),
                               progress=False, workers=1)
    assert summary.ok, summary.problems
    return settings, out


def test_products_carry_one_provenance_card_per_step(reduced):
    from photowatch.state.store import Store

    settings, out = reduced
    rows = Store(out / "state.sqlite").frames(kind="object", product=NOT_NULL)
    assert rows
    for row in rows:
        with fits.open(row["product"]) as hdul:
            for ext in ("PRIMARY", "SCI"):
                hdr = hdul[ext].header
                cards = [hdr[f"PWSTEP{i:02d}"] for i in range(1, len(SCIENCE_CHAIN) + 1)]
                assert cards == [st.card(settings) for st in SCIENCE_CHAIN]
                assert f"PWSTEP{len(SCIENCE_CHAIN) + 1:02d}" not in hdr
                assert cards[0].split()[0] == "prepare" and len(cards[0].split()[2]) == 8


def _tree(out: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")
            if p.is_file() and "state.sqlite" not in p.name and ".lock" not in p.name}


def test_reduce_object_writes_nothing_and_returns_the_updates(reduced):
    from photowatch.core.classify import FrameInfo
    from photowatch.io.fits import read_raw
    from photowatch.run.engine import Engine
    from photowatch.run.science import reduce_object

    settings, out = reduced
    engine = Engine(settings, out)
    row = engine.store.frames(kind="object", accepted=1)[-1]
    info = engine.book.detector_numbers(FrameInfo.from_summary(json.loads(row["info_json"])))
    profile = engine.profile(info.instrument)
    raw, header = read_raw(row["path"])
    frames_before = [dict(r) for r in engine.store.frames()]
    files_before = _tree(out)
    ctx = engine.night_context(row, info, profile)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.frame_id = 0
    result = reduce_object(ctx, raw, header)
    assert _tree(out) == files_before
    assert [dict(r) for r in engine.store.frames()] == frames_before
    kinds = [u.kind for u in result.updates]
    assert kinds[0] == "sky" and "sky_used" in kinds and "solution" in kinds
    assert not any(u.claim for u in result.updates)  # the night's references exist already
    # the same frame as the engine made it (its field's solutions known, its sky in)
    with fits.open(row["product"]) as hdul:
        assert result.frame.header["MAGZP"] == pytest.approx(hdul[0].header["MAGZP"], abs=0.02)
        assert result.frame.header["PWSTEP07"] == hdul[0].header["PWSTEP07"]


def test_field_solutions_are_rebuilt_from_the_store_after_a_restart(reduced):
    from astropy.wcs import WCS

    from photowatch.run.engine import Engine

    settings, out = reduced
    engine = Engine(settings, out)
    rows = [r for r in engine.store.frames(kind="object", product=NOT_NULL)
            if json.loads(r["qc_json"])["aststat"] in ("ok", "relative")]
    assert len(rows) >= 3
    first = rows[0]
    key = (first["night"], first["target"], first["camera"])
    assert engine._field_solutions == {}  # a new process knows nothing yet ...
    sols = engine.field_solutions(key)  # ... and rebuilds the field from the store
    assert len(sols) == min(len(rows), 16)
    for (ra, dec, result), row in zip(sols, sorted(rows, key=lambda r: (r["obs_time"],
                                                                        r["id"]))[-16:]):
        qc = json.loads(row["qc_json"])
        assert result.status == qc["aststat"] and result.ok
        assert result.offset_east_arcsec == pytest.approx(qc["astoffset_east_arcsec"])
        assert result.offset_north_arcsec == pytest.approx(qc["astoffset_north_arcsec"])
        assert result.suspect == qc["astsuspect"]
        hdr = fits.getheader(row["product"], "SCI")
        ny, nx = hdr["NAXIS2"], hdr["NAXIS1"]
        sky = WCS(hdr, naxis=2).all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
        assert (ra, dec) == pytest.approx((float(sky[0][0]), float(sky[1][0])))
    assert np.isfinite([r.rotation_deg for _, _, r in sols]).all()
    # the second look is the remembered snapshot, not another read
    assert engine.field_solutions(key) == sols


def test_two_frames_founding_a_field_at_once_end_on_one_reference(tmp_path):
    """The engine applies a "field" claim under the references' lock: of two frames that
    both found no field, one founds it, the other's stage runs again against the winner."""
    import threading

    from astropy.table import Table

    from photowatch.run.engine import Engine

    engine = Engine(Settings().with_overrides(paths={"output_dir": str(tmp_path)}), tmp_path)
    both_looked = threading.Barrier(2)
    runs = []

    def register(st, ctx):
        ref = ctx.refs.near("2020-01-28", "M1", None, "astrom", 10.0, 20.0, 0.05)
        runs.append(ctx.member)
        if ref is None:
            if runs.count(ctx.member) == 1:
                both_looked.wait(timeout=10)  # both frames saw no field
            table = Table({"ra": [10.0]}, meta={"frame": ctx.member, "ra0": 10.0,
                                                 "dec0": 20.0})
            return {"field_of": ctx.member, "updates": [Update("field", dict(
                night="2020-01-28", target="M1", filt=None, kind="astrom", table=table,
                ra=10.0, dec=20.0, radius_deg=0.05), claim=True)]}
        return {"field_of": ref.meta["frame"]}

    chain = (Stage("register", register, needs=("refs",), gives=("field_of",),
                   settings=lambda s: s.stages.astrometry),)
    results = {}

    def frame(member):
        ctx = NightContext(settings=engine.settings, info=None, profile=None, frame_id=0,
                           member=member, refs=engine.refs)
        results[member] = run_chain(chain, ctx, {}, apply=engine.apply_update,
                                    keep=True).state["field_of"]

    threads = [threading.Thread(target=frame, args=(m,)) for m in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["A"] == results["B"] in ("A", "B")
    assert len(list((tmp_path / "state" / "refs" / "2020-01-28").glob("astrom_*.ecsv"))) == 1
    assert sorted(runs) == ["A", "A", "B"] or sorted(runs) == ["A", "B", "B"]  # one re-run
