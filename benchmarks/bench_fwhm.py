"""Frame FWHM against the simulator's truth for undersampled stars (issue 17).

Stars of the simulator's pixel-integrated Moffat (beta 3), FWHM 1.5-8 px, 60 per 512 px
frame, sky 1000 e-, Poisson noise; prints the relative error of ``extract_sources``'s
frame FWHM and the seconds of the call.

Usage::

    .venv/bin/python benchmarks/bench_fwhm.py
"""

from __future__ import annotations

import time

import numpy as np
from astropy.io import fits

from photowatch.core.config import Sources
from photowatch.core.frame import Frame
from photowatch.sim.night import _Psf, render_stars
from photowatch.stages.sources import extract_sources


def main() -> None:
    print(f"{'FWHM px':>7s} {'seed':>4s} {'error':>7s} {'stellar':>7s} {'s':>5s}")
    for fw in (1.5, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
        for seed in (1, 2):
            rng = np.random.default_rng(seed)
            n = 512
            x, y = rng.uniform(20, n - 20, 60), rng.uniform(20, n - 20, 60)
            img = render_stars((n, n), _Psf(fw), x, y, 10 ** rng.uniform(3.5, 5.5, 60))
            sci = (rng.poisson(img + 1000.0) - 1000.0).astype(np.float32)
            frame = Frame(sci, (img + 1000.0).astype(np.float32),
                          np.zeros((n, n), np.uint16), fits.Header())
            t0 = time.perf_counter()
            out = extract_sources(frame, settings=Sources(), pixel_scale_arcsec=0.5)
            sec = time.perf_counter() - t0
            print(f"{fw:7.1f} {seed:4d} {out.fwhm_px / fw - 1:+7.2%} {out.n_stellar:7d} "
                  f"{sec:5.2f}")


if __name__ == "__main__":
    main()
