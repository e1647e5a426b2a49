"""Benchmark: source extraction and astrometry of a 4096 x 4096 frame with ~2000 stars.

Run::

    .venv/bin/python benchmarks/bench_astrometry.py [--size 4096] [--repeat 3]

A synthetic star field (Moffat stars at positions from a TAN-SIP WCS, Poisson
and read noise) is extracted and solved against its catalogue from a guess off
by 60" in pointing, 1.5 deg in rotation and 3 % in scale (cold start: pattern
match), then again with the first solution as ``previous`` (warm start). The
matching (triangle hash + verification, or the shift search) and the fitting
(iterative matching and TAN-SIP fit) are timed inside the solve. Prints the
best of ``--repeat`` runs of each step (wall-clock and CPU seconds), and the
accuracy against the truth.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, Sip

import photowatch.stages.astrometry as astro
from photowatch.core.config import Astrometry, Sources
from photowatch.core.frame import Frame
from photowatch.stages.matching import deproject
from photowatch.stages.sources import extract_sources


def make_field(size: int, nstars: int, scale: float, seed: int = 1):
    """A TAN-SIP truth, its catalogue (wider than the frame) and a noisy frame."""
    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    w.wcs.crval = [60.0, 25.0]
    th = math.radians(0.5)
    s = scale / 3600
    w.wcs.cd = [[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]]
    k = 1e-3 / (2 * (size / 2) ** 2)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[3, 0] = a[1, 2] = b[2, 1] = b[0, 3] = k
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    half = size * scale / 2 * 1.45 + 300  # arcsec: the frame, its diagonal and a margin
    density = nstars / (size * scale) ** 2
    n = rng.poisson(density * (2 * half) ** 2)
    xi, eta = rng.uniform(-half, half, (2, n)) / 3600
    ra, dec = deproject(xi, eta, 60.0, 25.0)
    bexp = 0.3 * math.log(10)
    u = rng.uniform(0, 1, n)
    mag = np.log(np.exp(bexp * 14) + u * (np.exp(bexp * 21.5) - np.exp(bexp * 14))) / bexp
    cat = Table({"ra": ra, "dec": dec, "mag": mag})

    x, y = w.all_world2pix(ra, dec, 0)
    on = (x > -10) & (x < size + 10) & (y > -10) & (y < size + 10)
    x, y, flux = x[on], y[on], 10 ** (-0.4 * (mag[on] - 29.5))
    fwhm, beta = 4.0, 3.0
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    h = int(math.ceil(3 * fwhm))
    off = np.arange(-h, h + 1)
    img = np.zeros((size, size), np.float32)
    for start in range(0, len(x), 500):  # bounded memory
        sl = slice(start, start + 500)
        xs, ys, fs = x[sl], y[sl], flux[sl]
        gx = np.rint(xs).astype(int)[:, None, None] + off[None, None, :]
        gy = np.rint(ys).astype(int)[:, None, None] + off[None, :, None]
        r2 = (gx - xs[:, None, None]) ** 2 + (gy - ys[:, None, None]) ** 2
        val = fs[:, None, None] * (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
        gx, gy = np.broadcast_arrays(gx, gy)
        ok = (gx >= 0) & (gx < size) & (gy >= 0) & (gy < size)
        np.add.at(img, (gy[ok], gx[ok]), val[ok].astype(np.float32))
    var = (150.0 + img).astype(np.float32)
    noise = rng.standard_normal((size, size), dtype=np.float32)
    sci = img + noise * np.sqrt(var)
    frame = Frame(sci=sci, var=var, mask=np.zeros((size, size), np.uint16),
                  header=fits.Header())
    return w, cat, frame


def guess_wcs(truth, size):
    """The header's guess: 60" off in pointing, 1.5 deg in rotation, 3 % in scale."""
    g = WCS(naxis=2)
    g.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    g.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    ra, dec = truth.wcs.crval
    g.wcs.crval = list(deproject(60 / 3600, 0.0, ra, dec))
    th = math.radians(0.5 + 1.5)
    s = math.sqrt(abs(np.linalg.det(truth.wcs.cd))) * 1.03
    g.wcs.cd = [[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]]
    g.wcs.set()
    return g


class Timers:
    """Wraps the matcher's pieces inside the stage module to time them during a solve."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def wrapped(self):
        names = {"find_similarity": "matching", "shift_search": "matching",
                 "refine": "fitting"}
        originals = {n: getattr(astro, n) for n in names}

        def wrap(name, func):
            def timed(*args, **kwargs):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return func(*args, **kwargs)
                finally:
                    key = names[name]
                    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                    self.cpu[key] = self.cpu.get(key, 0.0) + time.process_time() - c0
            return timed

        for n, f in originals.items():
            setattr(astro, n, wrap(n, f))
        try:
            yield self
        finally:
            for n, f in originals.items():
                setattr(astro, n, f)


def grid_rms_px(solved, truth, size):
    g = np.linspace(0, size - 1, 33)
    gx, gy = (v.ravel() for v in np.meshgrid(g, g))
    r1, d1 = truth.all_pix2world(gx, gy, 0)
    r2, d2 = solved.all_pix2world(gx, gy, 0)
    scale = math.sqrt(abs(np.linalg.det(truth.wcs.cd))) * 3600
    d = np.hypot((r2 - r1) * np.cos(np.radians(d1)), d2 - d1) * 3600 / scale
    return float(np.sqrt(np.mean(d**2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stars", type=int, default=3100,
                        help="catalogue stars on the frame (about two thirds are detected)")
    parser.add_argument("--scale", type=float, default=0.24, help="arcsec per pixel")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    truth, cat, frame = make_field(args.size, args.stars, args.scale)
    print(f"synthetic {args.size}x{args.size} frame, {len(cat)} catalogue stars: "
          f"{time.perf_counter() - t0:.1f} s to make")
    shape = frame.shape
    guess = guess_wcs(truth, args.size)
    settings = Astrometry()

    rows: dict[str, list[tuple[float, float]]] = {}

    def record(name, wall, cpu):
        rows.setdefault(name, []).append((wall, cpu))

    def clock():
        return time.perf_counter(), time.process_time()

    def since(start):
        return time.perf_counter() - start[0], time.process_time() - start[1]

    src = cold = warm = None
    for _ in range(args.repeat):
        t = clock()
        src = extract_sources(frame, settings=Sources(), pixel_scale_arcsec=args.scale)
        record("extraction (sep + centroids + photometry)", *since(t))

        timers = Timers()
        with timers.wrapped():
            t = clock()
            cold = astro.solve_astrometry(src.table, shape=shape, wcs_guess=guess, reference=cat,
                                          settings=settings)
            total = since(t)
        record("cold solve: matching (triangle hash + verify)", timers.seconds["matching"],
               timers.cpu["matching"])
        record("cold solve: fitting (iterative match + TAN-SIP)", timers.seconds["fitting"],
               timers.cpu["fitting"])
        record("cold solve: total", *total)

        timers = Timers()
        with timers.wrapped():
            t = clock()
            warm = astro.solve_astrometry(src.table, shape=shape, wcs_guess=guess, reference=cat,
                                          settings=settings, previous=cold.wcs)
            total = since(t)
        record("warm solve: matching (shift search)", timers.seconds["matching"],
               timers.cpu["matching"])
        record("warm solve: fitting (iterative match + TAN-SIP)", timers.seconds["fitting"],
               timers.cpu["fitting"])
        record("warm solve: total", *total)

    width = max(len(k) for k in rows) + 2
    print(f"\n{'step':<{width}}{'wall s':>8}{'cpu s':>8}   (best of {args.repeat})")
    best = {}
    for name, values in rows.items():
        wall = min(v[0] for v in values)
        cpu = min(v[1] for v in values)
        best[name] = (wall, cpu)
        print(f"{name:<{width}}{wall:8.3f}{cpu:8.3f}")
    ext = best["extraction (sep + centroids + photometry)"]
    for label, key in (("extraction + cold solve", "cold solve: total"),
                       ("extraction + warm solve", "warm solve: total")):
        print(f"{label:<{width}}{ext[0] + best[key][0]:8.3f}{ext[1] + best[key][1]:8.3f}")
    print("cpu s: CPU time of this process (the code is single-threaded); wall s is larger "
          "when other processes share the cores")

    print(f"\nsources: {len(src)} ({src.n_stellar} stellar), FWHM {src.fwhm_px:.2f} px, "
          f"aperture correction {src.aperture_correction:.3f} ({src.n_apcor} stars)")
    for name, res in (("cold", cold), ("warm", warm)):
        print(f"{name}: {res.status}/{res.method}, {res.nstar} stars, rms {res.rms_arcsec:.3f}\", "
              f"SIP degree {res.sip_degree}, offset {res.offset_arcsec:.1f}\", "
              f"vs truth {grid_rms_px(res.wcs, truth, args.size):.4f} px rms on a grid")


if __name__ == "__main__":
    main()
