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
from photowatch.stages.sources import moffat_alpha, moffat_encircled
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


@pytest.mark.parametrize("seed", [11, 12])
def test_aperture_correction_follows_each_frames_profile(tmp_path, seed):
    """Issue 17: the Moffat beta drawn per frame (2.5-4.5) at similar seeing. Each frame's
    APCOR is within 0.5 % of its true correction at APRAD: a frame whose own stars pin
    its profile keeps it, and is not pulled to the night's mean (it was, by up to 2 %:
    0.02 mag on its zero point), so the corrections differ as the betas do."""
    night = simulate_night(tmp_path / "night", size=768, binning=4, filters=("SDSS-Z",),
                           seed=seed, n_bias=3, n_dark=0, n_flat=3, n_science=5,
                           bad_flats=False, catalog=False, star_density=65000.0,
                           psf_beta_range=(2.5, 4.5), write_crmasks=False)
    settings = Settings().with_overrides(paths={"output_dir": str(tmp_path / "out")})
    reduce_directory(night.raw_dir, settings, progress=False)
    truth = {f.raw_name: f for f in night.objects()}
    rows = Store(tmp_path / "out" / "state.sqlite").frames(kind="object", state="reduced")
    assert len(rows) == len(truth)
    errors, true_values, own = [], [], 0
    for r in rows:
        prod = read_product(r["product"])
        f, h = truth[r["raw_name"]], prod.header
        scale = float(np.hypot(h["CD1_1"], h["CD2_1"])) * 3600.0
        alpha = moffat_alpha(f.fwhm_arcsec / scale, f.psf_beta)
        true = 1.0 / moffat_encircled(prod.cat.meta["APRAD"], alpha, f.psf_beta)
        errors.append(h["APCOR"] / true - 1.0)
        true_values.append(true)
        own += prod.cat.meta.get("APCORSRC") in ("psf", "growth")
    assert max(true_values) / min(true_values) - 1 > 0.01  # the profiles really differ
    assert own == len(rows)  # twenty stars a frame settle each frame's own correction
    assert max(abs(e) for e in errors) < 0.005, errors
