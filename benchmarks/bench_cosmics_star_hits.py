"""Hits on bright stars (issue 17, seventh round): the fraction of their pixels flagged,
with and without ``star_hits``, and flags on stars without a hit, over the Moffat's beta
and FWHM (``photowatch.sim.psf.hits_on_bright_stars``: 64 stars of peak 30-300 sigma, on
every other one a hit of 10-25 % of its peak 1.5-3 px from its centre). The stage's
templates are Moffats of beta 3; real PSFs have 2.5-4.5.

Usage::

    .venv/bin/python benchmarks/bench_cosmics_star_hits.py
"""

from __future__ import annotations

import numpy as np

import photowatch.stages.cosmics as cosmics
from photowatch.core.config import Cosmics
from photowatch.core.frame import Mask
from photowatch.sim.psf import hits_on_bright_stars


def main() -> None:
    print(f"{'beta':>5s} {'FWHM':>5s} {'seed':>4s} {'with':>6s} {'without':>8s} "
          f"{'px on stars w/o hit':>20s} {'FWHM est':>8s}")
    on = cosmics._STAR_SIGMA
    found, spared = [], 0
    for beta in (2.5, 3.0, 4.5):
        for fwhm in (3.5, 4.5, 6.0):
            for seed in (1, 2, 3):
                frame, x, y, hits = hits_on_bright_stars(seed, fwhm, beta=beta)
                iy, ix = np.indices(hits.shape)
                clean = np.zeros(hits.shape, bool)
                for k in range(1, x.size, 2):
                    clean |= np.hypot(iy - y[k], ix - x[k]) <= 5
                row = []
                for sigma in (on, 0.0):
                    cosmics._STAR_SIGMA = sigma
                    z, res = cosmics.flag_cosmics(frame, settings=Cosmics())
                    flagged = (z.mask & Mask.COSMIC) != 0
                    row.append((flagged[hits].mean(), int((flagged & clean).sum()), res.fwhm_px))
                cosmics._STAR_SIGMA = on
                found.append(row[0][0])
                spared += row[0][1]
                print(f"{beta:5.1f} {fwhm:5.1f} {seed:4d} {row[0][0]:6.0%} {row[1][0]:8.0%} "
                      f"{row[0][1]:20d} {row[0][2]:8.2f}")
    print(f"with star_hits: worst {min(found):.0%}, median {np.median(found):.0%}; "
          f"pixels flagged on stars without a hit: {spared}")


if __name__ == "__main__":
    main()
