"""Relative flux scales on a simulated night with what real frames have (issue 17): few
stars (30000 per deg2), 20 s exposures, thin clouds varying within minutes (0.3 mag), no
catalogue. Each FLXSCALE against the truth zero points of the frame and its field's
reference; APCOR >= 1 and steady (the simulator's PSF shape is fixed here; with
``psf_beta_range`` the aperture ratio is off by up to 0.03 mag, see the notes of issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from photowatch.core.config import Settings
from photowatch.io.products import read_product
from photowatch.run.batch import reduce_directory
from photowatch.sim.night import simulate_night
from photowatch.state.store import Store


@pytest.mark.slow
def test_flux_scale_follows_thin_clouds_on_a_sparse_short_night(tmp_path):
    night = simulate_night(tmp_path / "night", size=512, binning=4, filters=("SDSS-R",),
                           seed=7, n_bias=3, n_dark=2, n_flat=3, n_science=6, exptime_s=20.0,
                           bad_flats=False, catalog=False, cloud_variation_mag=0.3,
                           star_density=30000.0, write_crmasks=False)
    settings = Settings().with_overrides(paths={"output_dir": str(tmp_path / "out")})
    reduce_directory(night.raw_dir, settings, progress=False)
    truth = {f.raw_name: f for f in night.objects()}
    rows = Store(tmp_path / "out" / "state.sqlite").frames(kind="object", state="reduced")
    by_std = {r["name"]: r for r in rows}
    checked, apcors = 0, []
    for r in rows:
        h = read_product(r["product"]).header
        apcors.append(h["APCOR"])
        assert h["APCOR"] >= 1.0 and "APCORERR" in h and "APCORN" in h
        ref = by_std[h["FLXREF"]]
        if ref["name"] == r["name"]:
            continue
        true = 0.4 * (truth[ref["raw_name"]].zp_true - truth[r["raw_name"]].zp_true)
        assert abs(np.log10(h["FLXSCALE"]) - true) * 2.5 <= 0.02, (r["raw_name"], h["FLXSCALE"])
        assert h["FLXSCERR"] > 0
        checked += 1
    assert checked >= 2
    assert max(apcors) / min(apcors) - 1 < 0.03, apcors
