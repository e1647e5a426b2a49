"""A night without darks: its hot pixels are not in the bad-pixel mask, so the cosmic-ray
pass flags them in every frame. Finalize finds them (COSMIC at the same pixel in most
frames), adds them to the night's BPM, turns their bit 4 into bit 1 and reports them
(issue 17: no pixel has bit 4 in every frame of a night)."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from photowatch.core.config import Settings
from photowatch.run.batch import reduce_directory
from photowatch.run.finalize import finalize
from photowatch.sim.night import simulate_night
from photowatch.state.store import NOT_NULL, Store


def test_persistent_defects_move_from_cosmic_to_bad(tmp_path):
    night = simulate_night(tmp_path / "night", size=256, binning=4, filters=("SDSS-R",),
                           seed=5, n_bias=3, n_dark=0, n_flat=3, n_science=5, exptime_s=60.0,
                           bad_flats=False, write_models=False, write_crmasks=False)
    settings = Settings().with_overrides(paths={"output_dir": str(tmp_path / "out")})
    summary = reduce_directory(night.raw_dir, settings, progress=False)
    assert summary.ok, summary.problems
    store = Store(tmp_path / "out" / "state.sqlite")
    rows = [r for r in store.frames(kind="object", product=NOT_NULL)]
    assert len(rows) >= 4
    before = [fits.getdata(r["product"], "MASK") for r in rows]
    every = np.logical_and.reduce([(m & 4) != 0 for m in before])
    assert every.sum() > 0  # hot pixels flagged as cosmic rays in every frame
    result = finalize(settings)
    assert result.ok, result.problems
    assert any("persistent defect" in line for line in result.done), result.done
    rows = [r for r in store.frames(kind="object", product=NOT_NULL)]
    after = [fits.getdata(r["product"], "MASK") for r in rows]
    assert not np.logical_and.reduce([(m & 4) != 0 for m in after]).any()
    # the true hot pixels of the night are among the defects found
    dark = night.true_dark_e_per_s()
    (bpm_path,) = (tmp_path / "out" / "masters").glob("*/bpm_C0.fits")
    with fits.open(bpm_path) as h:
        bpm, hdr = h[0].data != 0, h[0].header
    assert hdr["NDEFECT"] >= every.sum()
    assert np.all(bpm[every])
    assert (dark[every] > 0.4).mean() > 0.9  # they are hot pixels, not sky
    for m in after:
        assert np.all(m[every] & 1)
