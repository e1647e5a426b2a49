"""Session fixtures: small simulated nights, built once per test session."""

from __future__ import annotations

import pytest

from photowatch.sim.night import SimNight, simulate_night


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory) -> SimNight:
    """512x512 at binning 4 (0.48"/px), SDSS-R: 5 bias, 3 dark, 6 flats, 6 science, seed 1."""
    out = tmp_path_factory.mktemp("sim_small")
    return simulate_night(out, size=512, binning=4, filters=("SDSS-R",), seed=1, n_bias=5,
                          n_dark=3, n_flat=6, n_science=6)


@pytest.fixture(scope="session")
def sim_two_filters(tmp_path_factory) -> SimNight:
    """512x512 at binning 4, SDSS-R and SDSS-I alternating: 4 science frames each, seed 2."""
    out = tmp_path_factory.mktemp("sim_two_filters")
    return simulate_night(out, size=512, binning=4, filters=("SDSS-R", "SDSS-I"), seed=2,
                          n_bias=5, n_dark=3, n_flat=6, n_science=4)
