"""finalize redoes only what changed (issue 23).

A frame is re-reduced at finalize only when the night's final masters change it by
more than ``calibration.final_tolerance`` of its sky noise; otherwise its product is
kept and marked final (``CALFINAL`` in its header, not stale nor provisional in the
store). One night (512 px at binning 4, SDSS-R and SDSS-I, four science frames each,
seed 11) is reduced once; each test finalizes its own copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from shared_data import copy_output

from photowatch import cli
from photowatch.core.config import Settings
from photowatch.run.batch import reduce_directory
from photowatch.run.finalize import rebuild_masters
from photowatch.sim.night import simulate_night
from photowatch.state.store import NOT_NULL

QUIET = {"quicklook_png": False}


def keep_config(out: Path) -> str:
    """A configuration that opts in to keeping unchanged frames (the default re-reduces)."""
    path = Path(out).parent / "keep.toml"
    path.write_text("[calibration]\nfinal_tolerance = 0.1\n")
    return str(path)


def settings_for(out: Path, **calibration) -> Settings:
    calibration.setdefault("final_tolerance", 0.1)  # opt-in: keeping unchanged frames
    return Settings().with_overrides(paths={"output_dir": str(out)}, stages=QUIET, coadd=QUIET,
                                     calibration=calibration)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("changes")
    sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R", "SDSS-I"),
                         n_science=4, exptime_s=60.0, seed=11, write_models=False,
                         write_crmasks=False)
    out = root / "reduced"
    summary = reduce_directory(sim.raw_dir, settings_for(out), catalog=str(sim.catalog_path),
                               progress=False)
    assert summary.ok, summary.problems
    return sim, out


@pytest.fixture
def night(reduced, tmp_path):
    sim, out = reduced
    work = tmp_path / "out"
    store = copy_output(out, work)
    return sim, work, store


def science(store) -> dict:
    return {r["raw_name"]: r for r in store.frames(kind="object", product=NOT_NULL)}


def test_masters_that_barely_change_re_reduce_nothing_and_products_are_marked_final(
        night, capsys):
    sim, out, store = night
    before = science(store)
    assert len(before) == 8
    mtimes = {name: Path(r["product"]).stat().st_mtime_ns for name, r in before.items()}
    assert cli.main(["finalize", "--out", str(out), "--config", keep_config(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 8 frame(s) as final" in printed and "re-reduced 0 frame(s)" in printed, printed
    after = science(store)
    for name, row in after.items():
        old = before[name]
        assert row["product_version"] == old["product_version"], name  # not re-reduced
        assert not row["stale"] and not row["provisional"]
        calfinal = json.loads(row["qc_json"])["calfinal"]
        assert calfinal["kept"] and 0 <= calfinal["change_sigma"] <= 0.1
        assert set(calfinal["masters"]) >= {"bias", "dark", "flat"}
        hdr = fits.getheader(row["product"], "SCI")
        assert hdr["CALFINAL"] is True and 0 <= hdr["CALDEV"] <= 0.1
        # the pixels are the ones the quick-look pass wrote (a copy renamed into place)
        assert Path(row["product"]).stat().st_mtime_ns >= mtimes[name]
        with fits.open(row["product"]) as h:
            assert [x.name for x in h][1:4] == ["SCI", "ERR", "MASK"]
    events = store.conn.execute("SELECT COUNT(*) FROM events WHERE event='kept_final'"
                                ).fetchone()[0]
    assert events == 8
    for c in store.coadds():
        assert c["stacktype"] == "FINAL" and c["ncombine"] == 4
    # a second finalize: nothing left to do, nothing kept twice
    assert cli.main(["finalize", "--out", str(out), "--config", keep_config(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept" not in printed and "re-reduced 0 frame(s)" in printed


@pytest.mark.parametrize("amplitude, redone", [(0.05, True), (0.0002, False)])
def test_a_final_master_that_changes_beyond_the_tolerance_re_reduces_its_frames(
        night, capsys, amplitude, redone):
    """The final SDSS-I flat gets a gradient of ``amplitude`` (peak to peak) after the
    final masters are made: 5 % is ~2.5 sky sigma at this sky level (the I frames are
    re-reduced), 0.02 % is ~0.01 sigma (kept). The R frames are kept either way."""
    sim, out, store = night
    before = science(store)
    settings = settings_for(out)
    rebuild_masters(settings)
    flat = store.masters(kind="flat", filter="SDSS-I", final=1)[-1]
    with fits.open(flat["path"], mode="update") as h:
        ny, nx = h["SCI"].data.shape
        h["SCI"].data *= (1 + amplitude * np.arange(nx) / nx).astype(np.float32)
    assert cli.main(["finalize", "--out", str(out), "--config", keep_config(out)]) == 0
    printed = capsys.readouterr().out
    after = science(store)
    n_i = sum(1 for r in before.values() if r["filter"] == "SDSS-I")
    assert n_i == 4
    for name, row in after.items():
        changed = redone and row["filter"] == "SDSS-I"
        assert (row["product_version"] > before[name]["product_version"]) is changed, name
        hdr = fits.getheader(row["product"], "SCI")
        assert hdr.get("CALFINAL", False) is not changed
        qc = json.loads(row["qc_json"])
        if changed:
            assert hdr["MFLAT"] == Path(flat["path"]).name  # reduced with the final flat
            assert "calfinal" not in qc
        else:
            assert qc["calfinal"]["change_sigma"] <= 0.1
    assert f"re-reduced {n_i if redone else 0} frame(s)" in printed
    assert f"kept {8 - n_i if redone else 8} frame(s) as final" in printed
