"""Blind detection (stages.sources) on synthetic frames: false detections on pure noise,
the S/N at which faint point sources are found, and the stage's CPU.

Each frame: sky noise (4000 e- sky, 6 e- read noise, as bench_live.py --cost), a few
dozen bright Moffat stars (beta 3, FWHM 5 px: LMI at 1.2") so the frame has a FWHM, and
``--faint`` fake point sources on a grid, their aperture S/N (the CAT aperture, radius
2 FWHM, background noise only: the definition LIMMAG uses at the limit) spread evenly
from 2 to 10. ``extract_sources`` runs with the PSF-matched pass (``psf_detect_snr``, 5)
and without it (0). Per setting:

- false detections: CAT sources farther than 3 FWHM from every bright star and every
  fake, per frame and per square degree (0.24"/px);
- the aperture S/N at which 50 % of the fakes are in the CAT (within 1 FWHM);
- the CPU seconds of ``extract_sources`` (thread time, median over frames).

``--noise-only``: no fakes (pure noise between the bright stars).

    python benchmarks/bench_depth.py --size 1024 4096 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SCALE = 0.24  # arcsec / px
FWHM = 5.0
SKY, READ = 4000.0, 6.0


def frame(size: int, seed: int, n_faint: int):
    from astropy.io import fits

    from photowatch.core.frame import Frame
    from photowatch.sim.night import _Psf, render_stars

    rng = np.random.default_rng(seed)
    psf = _Psf(FWHM)
    nb = max(10, int(40 * (size / 1024) ** 2))
    bx, by = rng.uniform(20, size - 20, nb), rng.uniform(20, size - 20, nb)
    bflux = 10 ** rng.uniform(5.0, 6.3, nb)
    # faint fakes on a jittered grid away from the bright stars
    side = int(np.ceil(np.sqrt(max(n_faint, 1))))
    g = (np.arange(side) + 0.5) * size / side
    fx, fy = np.meshgrid(g, g)
    fx = fx.ravel()[:n_faint] + rng.uniform(-5, 5, n_faint)
    fy = fy.ravel()[:n_faint] + rng.uniform(-5, 5, n_faint)
    if n_faint:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([bx, by])).query(np.column_stack([fx, fy]))
        keep = d > 8 * FWHM
        fx, fy = fx[keep], fy[keep]
    snr = rng.uniform(2.0, 10.0, fx.size)
    r_ap = 2 * FWHM
    sigma_ap = np.sqrt(SKY + READ**2) * np.sqrt(np.pi) * r_ap
    # the Moffat's light within r_ap (the stamp, 5 FWHM, holds all of the flux)
    from photowatch.sim.psf import MOFFAT_BETA as beta

    alpha = FWHM / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))

    def enclosed(r):
        return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)

    ee = enclosed(r_ap) / enclosed(5 * FWHM)
    fflux = snr * sigma_ap / ee
    model = render_stars((size, size), psf, np.r_[bx, fx], np.r_[by, fy], np.r_[bflux, fflux])
    var = (model + SKY + READ**2).astype(np.float32)
    sci = (model + rng.standard_normal((size, size)).astype(np.float32) * np.sqrt(var)).astype(
        np.float32)
    fr = Frame(sci=sci, var=var, mask=np.zeros((size, size), np.uint16), header=fits.Header())
    return fr, np.column_stack([np.r_[bx, fx], np.r_[by, fy]]), np.column_stack([fx, fy]), snr


def s50(snr: np.ndarray, found: np.ndarray) -> float:
    """The aperture S/N where the found fraction crosses 50 % (bins of 0.5, rising)."""
    edges = np.arange(2.0, 10.01, 0.5)
    c = 0.5 * (edges[1:] + edges[:-1])
    frac = np.array([found[(snr >= a) & (snr < b)].mean() if ((snr >= a) & (snr < b)).sum()
                     else np.nan for a, b in zip(edges[:-1], edges[1:])])
    for k in range(1, len(frac)):
        if frac[k - 1] < 0.5 <= frac[k]:
            return float(c[k - 1] + (0.5 - frac[k - 1]) / (frac[k] - frac[k - 1])
                         * (c[k] - c[k - 1]))
    return float("nan")


def main() -> None:
    from scipy.spatial import cKDTree

    from photowatch.core.config import Sources
    from photowatch.stages.sources import extract_sources

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[1024])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--faint", type=int, default=100, help="fakes per 1k frame (scaled)")
    p.add_argument("--noise-only", action="store_true")
    args = p.parse_args()
    for size in args.size:
        res = {}
        for psf_snr in (5.0, 0.0):
            res[psf_snr] = {"false": [], "cpu": [], "snr": [], "found": [], "n": []}
        for seed in args.seeds:
            n_faint = 0 if args.noise_only else int(args.faint * (size / 1024) ** 2)
            fr, truth, fxy, snr = frame(size, seed, n_faint)
            for psf_snr in (5.0, 0.0):
                r = res[psf_snr]
                c0 = time.thread_time()
                t = extract_sources(fr, settings=Sources(psf_detect_snr=psf_snr),
                                    pixel_scale_arcsec=SCALE).table
                r["cpu"].append(time.thread_time() - c0)
                xy = np.column_stack([t["x"], t["y"]])
                d, _ = cKDTree(truth).query(xy)
                r["false"].append(int((d > 3 * FWHM).sum()))
                r["n"].append(len(t))
                if len(fxy):
                    d2, _ = cKDTree(xy).query(fxy)
                    r["snr"] += list(snr)
                    r["found"] += list(d2 < FWHM)
        deg2 = (size * SCALE / 3600) ** 2
        for psf_snr, r in res.items():
            nf = len(r["false"])
            line = (f"size {size} psf_detect_snr {psf_snr:g}: {nf} frames, CAT {np.mean(r['n']):.0f}"
                    f"/frame, false {np.sum(r['false'])} ({np.mean(r['false']):.2f}/frame, "
                    f"{np.sum(r['false']) / (nf * deg2):.1f}/deg2), sources CPU "
                    f"{np.median(r['cpu']):.3f} s")
            if r["snr"]:
                line += f", 50 % found at aperture S/N {s50(np.array(r['snr']), np.array(r['found'])):.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
