"""Session fixtures: small simulated nights, built once per test session."""

from __future__ import annotations

import os

# pytest-xdist's worker processes share the machine's cores: each one's numeric libraries
# (OpenMP in astroscrappy, OpenBLAS) would start a thread per core, oversubscribed and
# spinning (the suite 10 % longer in wall time, 16 % in CPU). The same share the CLI gives
# each daemon worker (photowatch.run.engine.limit_threads); set before numpy is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))

import pytest  # noqa: E402

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
