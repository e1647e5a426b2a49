"""Faint stars' cores against the cosmic-ray stage (issue 21): the fraction of stars of
known flux whose core (pixels within 1.5 px of the centre) gets bit 4.

Frames of 20 x 20 simulator (Moffat, beta 3) stars at optimal S/N 5-20 on sky noise of
20 e- with their Poisson noise, FWHM 1.5-3.8 px, and a 1-2 px hit of 15-60 sigma
4-6 px beside every other star (those must stay flagged). The stage estimates the
frame's FWHM itself, as in the chain. Each FWHM runs with the PSF test off
(``psf_sigma = 0``: the stage before issue 21) and on (the default).

Usage::

    .venv/bin/python benchmarks/bench_cosmics_stars.py                  # 1.5 2.0 2.6 3.0 3.8
    .venv/bin/python benchmarks/bench_cosmics_stars.py 2.0 --frames 3
"""

from __future__ import annotations

import argparse

import numpy as np

from photowatch.core.config import Cosmics
from photowatch.core.frame import Mask
from photowatch.sim.psf import faint_stars_with_hits
from photowatch.stages.cosmics import flag_cosmics

SKY_SIGMA = 20.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fwhm", nargs="*", type=float, default=[1.5, 2.0, 2.6, 3.0, 3.8])
    ap.add_argument("--frames", type=int, default=5)
    args = ap.parse_args()
    print(f"{'FWHM':>5s} {'PSF test':>8s} {'cores':>7s} {'S/N 5-10':>8s} {'10-15':>7s} "
          f"{'15-20':>7s} {'hits':>7s} {'FWHM est':>9s}")
    for fwhm in args.fwhm:
        for label, settings in (("off", Cosmics(psf_sigma=0.0)), ("on", Cosmics())):
            cores, snrs, hit_rate, est = [], [], [], []
            for seed in range(1, args.frames + 1):
                frame, x, y, snr, hits = faint_stars_with_hits(seed, fwhm, n_side=20,
                                                                sky_sigma=SKY_SIGMA)
                z, res = flag_cosmics(frame, settings=settings)
                flagged = (z.mask & Mask.COSMIC) != 0
                iy, ix = np.indices(flagged.shape)
                for xk, yk in zip(x, y):
                    sl = (slice(int(yk) - 2, int(yk) + 3), slice(int(xk) - 2, int(xk) + 3))
                    near = np.hypot(iy[sl] - yk, ix[sl] - xk) <= 1.5
                    cores.append(bool((flagged[sl] & near).any()))
                snrs.append(snr)
                hit_rate.append(flagged[hits].mean())
                est.append(res.fwhm_px)
            c, s = np.array(cores), np.concatenate(snrs)
            e = np.nanmedian(est) if np.isfinite(est).any() else float("nan")
            print(f"{fwhm:5.1f} {label:>8s} {c.mean():7.2%} {c[s < 10].mean():8.2%} "
                  f"{c[(s >= 10) & (s < 15)].mean():7.2%} {c[s >= 15].mean():7.2%} "
                  f"{np.mean(hit_rate):7.1%} {e:9.2f}", flush=True)


if __name__ == "__main__":
    main()
