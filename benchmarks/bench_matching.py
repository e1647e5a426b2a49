"""Benchmark: cold pattern matching on star lists: success, false solutions, time.

Run::

    .venv/bin/python benchmarks/bench_matching.py [--trials 200] [--random 1000]
        [--dense 10] [--astroalign]

Star lists, no images: a true TAN WCS (random position angle, mirrored or not, 0.4"/px
on 1024 x 1024, or 0.24"/px on 4096 x 4096 for the dense case), a catalogue over the
search cone whose stars in the footprint are ten times as many as the image detects
(a few-star field against a catalogue to r = 21; 2.5 times for the dense case, about
20,000 catalogue stars in the search cone), and an image list of the brightest ``N`` stars
in the footprint with 0.15 mag of brightness scatter (so the orders differ), 0.05 px
centroid noise, one spurious source in ten and, for the dense case, the brightest 40
flagged saturated. The header guess is off by up to 60" in pointing, up to 2 degrees in
rotation and 2 % in scale, and has the wrong parity half of the time.

- ``success``: :func:`solve_astrometry` returns ``ok`` (cold start: no previous
  solution) with an rms against the truth on a grid over the frame below 0.05 px (dense
  4k) or 0.3 px (sparse: a linear fit to 7-45 stars of 0.05 px centroid noise,
  extrapolated to the corners); the median grid rms is printed.
- ``false``: image lists of uniformly random positions (8-60 stars) against the same
  catalogues; any ``ok`` is a false solution.
- ``astroalign`` (``--astroalign``, needs ``pip install astroalign``): its
  ``find_transform`` on the same image list and the catalogue stars within the true
  pointing error (60", a smaller area than photowatch searches) projected to pixels with
  the guess; success when the transform puts the image stars within 1 px of their true
  positions (a similarity only: no fit, no SIP).

Prints one line per case: trials, successes, median and 95th percentile time.
"""

from __future__ import annotations

import argparse
import math
import time
import zlib

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from photowatch.core.config import Astrometry
from photowatch.stages.astrometry import solve_astrometry
from photowatch.stages.matching import deproject


def tan_wcs(ra0, dec0, n, scale, pa_deg, flip):
    s = scale / 3600
    th = math.radians(pa_deg)
    sx = 1.0 if flip else -1.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.crval = [ra0, dec0]
    w.wcs.cd = [[sx * s * math.cos(th), s * math.sin(th)],
                [-sx * s * math.sin(th), s * math.cos(th)]]
    w.wcs.set()
    w.pixel_shape = (n, n)
    return w


def make_case(rng, nstars: int, *, n: int = 1024, scale: float = 0.4, nsat: int = 0,
              random_image: bool = False, max_pointing: float = 60.0, depth: float = 10.0,
              faint: int = 0, reference: Table | None = None, field=None,
              settings: Astrometry | None = None):
    """(sources, reference, truth WCS, guess WCS) of one trial.

    ``faint`` adds image sources fainter than the catalogue (a deep frame against a
    shallow catalogue); ``reference`` and ``field`` (ra0, dec0, pa, flip) give another
    dithered frame of an existing field.
    """
    settings = settings or Astrometry()
    if field is None:
        ra0, dec0 = rng.uniform(0, 360), rng.uniform(-60, 60)
        pa, flip = rng.uniform(-180, 180), bool(rng.integers(2))
    else:
        ra0, dec0, pa, flip = field
    truth = tan_wcs(ra0, dec0, n, scale, pa, flip)
    side = n * scale
    # catalogue: uniform over a square covering the search cone; depth * nstars per footprint
    if reference is None:
        half = side / 2 * math.sqrt(2) * 1.05 + settings.max_pointing_error_arcsec + 150
        ncat = rng.poisson(depth * nstars * (2 * half) ** 2 / side**2)
        xi, eta = rng.uniform(-half, half, (2, ncat)) / 3600
        ra, dec = deproject(xi, eta, ra0, dec0)
        bexp = 0.3 * math.log(10)
        u = rng.uniform(0, 1, ncat)
        mag = np.log(np.exp(bexp * 12) + u * (np.exp(bexp * 21) - np.exp(bexp * 12))) / bexp
        reference = Table({"ra": ra, "dec": dec, "mag": mag})
    ra, dec, mag = (np.asarray(reference[c]) for c in ("ra", "dec", "mag"))
    x, y = truth.all_world2pix(ra, dec, 0)
    on = np.flatnonzero((x > 0) & (x < n - 1) & (y > 0) & (y < n - 1))
    seen = on[np.argsort(mag[on] + rng.normal(0, 0.15, len(on)))][:nstars]
    nfake = nstars // 10
    sx, sy = x[seen], y[seen]
    flux = 10 ** (-0.4 * (mag[seen] - 25))
    if random_image:
        sx, sy = rng.uniform(0, n - 1, (2, nstars))
    else:
        keep = nstars - nfake
        sx = np.r_[sx[:keep], rng.uniform(0, n - 1, nfake)]
        sy = np.r_[sy[:keep], rng.uniform(0, n - 1, nfake)]
        flux = np.r_[flux[:keep], flux[rng.integers(0, len(flux), nfake)]]
    if faint:
        sx = np.r_[sx, rng.uniform(0, n - 1, faint)]
        sy = np.r_[sy, rng.uniform(0, n - 1, faint)]
        flux = np.r_[flux, 10 ** (-0.4 * (rng.uniform(21, 23, faint) - 25))]
    flags = np.zeros(len(sx), np.int32)
    if nsat:
        from photowatch.stages.sources import SourceFlag

        flags[np.argsort(-flux)[:nsat]] = int(SourceFlag.SATURATED)
    sources = Table({"x": sx + rng.normal(0, 0.05, len(sx)),
                     "y": sy + rng.normal(0, 0.05, len(sx)), "flux": flux,
                     "snr": np.clip(flux / 10 ** (-0.4 * (21 - 25)) * 20, 5, 1000), "fwhm": np.full(len(sx), 3.0),
                     "flags": flags})
    # the header guess
    r_err, ang = rng.uniform(0, max_pointing), rng.uniform(0, 2 * math.pi)
    cra, cdec = truth.all_pix2world([(n - 1) / 2], [(n - 1) / 2], 0)
    gra, gdec = deproject(r_err * math.sin(ang) / 3600, r_err * math.cos(ang) / 3600,
                          float(cra[0]), float(cdec[0]))
    guess_flip = flip if rng.random() < 0.5 else not flip
    guess = tan_wcs(float(gra), float(gdec), n, scale * (1 + rng.uniform(-0.02, 0.02)),
                    pa + rng.uniform(-2, 2), guess_flip)
    return sources, reference, truth, guess


def grid_rms_px(solved, truth, n):
    g = np.linspace(0, n - 1, 17)
    gx, gy = (v.ravel() for v in np.meshgrid(g, g))
    bx, by = solved.all_world2pix(*truth.all_pix2world(gx, gy, 0), 0)
    return float(np.sqrt(np.mean((bx - gx) ** 2 + (by - gy) ** 2)))


def astroalign_trial(aa, sources, reference, truth, guess, n, settings):
    """astroalign.find_transform from the image list to the catalogue's search area."""
    from photowatch.stages.matching import project

    ra_c, dec_c = guess.all_pix2world([(n - 1) / 2], [(n - 1) / 2], 0)
    xi, eta = project(np.asarray(reference["ra"]), np.asarray(reference["dec"]),
                      float(ra_c[0]), float(dec_c[0]))
    r = np.hypot(xi, eta) * 3600
    scale = abs(np.linalg.det(guess.wcs.cd)) ** 0.5 * 3600
    # the true pointing errors (<= 60"), not photowatch's 300" allowance: astroalign keeps
    # only its brightest 50 control points of each list, so a wider cone starves it
    search = n * scale / math.sqrt(2) * 1.05 + 60.0
    inside = np.flatnonzero(r <= search)
    inside = inside[np.argsort(np.asarray(reference["mag"])[inside])]
    # the catalogue in pixels of the guess (its rotation and parity are not trusted: the
    # similarity found by astroalign absorbs them)
    tx, ty = guess.all_world2pix(np.asarray(reference["ra"])[inside],
                                 np.asarray(reference["dec"])[inside], 0)
    target = np.column_stack([tx, ty])
    src = np.column_stack([np.asarray(sources["x"]), np.asarray(sources["y"])])
    src = src[np.argsort(-np.asarray(sources["flux"]))]
    t0 = time.perf_counter()
    try:
        tf, _ = aa.find_transform(src, target, max_control_points=50)
    except Exception:
        return False, time.perf_counter() - t0
    dt = time.perf_counter() - t0
    # where the transform puts image pixels, back in true pixels through the guess
    pred = tf(src)
    ra, dec = guess.all_pix2world(pred[:, 0], pred[:, 1], 0)
    bx, by = truth.all_world2pix(ra, dec, 0)
    err = np.hypot(bx - src[:, 0], by - src[:, 1])
    return bool(np.median(err) < 1.0), dt


def run(label, trials, make, settings, aa=None, n=1024, tol_px=0.05):
    ok = 0
    wrong = 0  # solved, but more than 2 px from the truth: a false solution of a true list
    errs = []
    times = []
    aa_ok = 0
    aa_times = []
    fails = []
    for t in range(trials):
        rng = np.random.default_rng([zlib.crc32(label.encode()), t])
        sources, reference, truth, guess = make(rng)
        t0 = time.perf_counter()
        res = solve_astrometry(sources, shape=(n, n), wcs_guess=guess, reference=reference,
                               settings=settings)
        times.append(time.perf_counter() - t0)
        err = grid_rms_px(res.wcs, truth, n) if res.ok else float("nan")
        good = res.ok and err < tol_px
        ok += good
        wrong += bool(res.ok and not err < 2.0)
        if res.ok:
            errs.append(err)
        if not good and len(fails) < 3:
            fails.append(f"{res.status} {err:.3f} px {res.reason[:160]}")
        if aa is not None:
            s, dt = astroalign_trial(aa, sources, reference, truth, guess, n, settings)
            aa_ok += s
            aa_times.append(dt)
    line = (f"{label:28s} {ok:5d}/{trials:<5d} {100 * ok / trials:6.1f} %  "
            f"median {np.median(times) * 1e3:6.1f} ms  p95 {np.percentile(times, 95) * 1e3:6.1f} ms  "
            f"grid rms median {np.median(errs) if errs else float('nan'):.3f} px"
            + (f"  WRONG {wrong}" if wrong else ""))
    if aa is not None:
        line += (f" | astroalign {aa_ok:5d}/{trials:<5d} median "
                 f"{np.median(aa_times) * 1e3:6.1f} ms")
    print(line, flush=True)
    for f in fails:
        print("    e.g.", f)


def run_warm(trials, settings, *, n=4096, scale=0.24, dither=60.0):
    """A dense deep 4k field: frame 1 solved cold, frame 2 (dithered) warm from it."""
    ok = 0
    times = []
    methods = {}
    fails = []
    for t in range(trials):
        rng = np.random.default_rng([11, t])
        src1, ref, truth1, guess1 = make_case(rng, 3000, n=n, scale=scale, nsat=40,
                                               depth=2.5, faint=3000, settings=settings)
        first = solve_astrometry(src1, shape=(n, n), wcs_guess=guess1, reference=ref,
                                 settings=settings)
        if not first.ok:
            fails.append(f"first frame: {first.reason[:120]}")
            continue
        ra0, dec0 = (float(v) for v in truth1.wcs.crval)
        de, dn = rng.uniform(-dither, dither, 2)
        ra1, dec1 = deproject(de / 3600, dn / 3600, ra0, dec0)
        _, pa, flip = _geometry(truth1)
        src2, _, truth2, guess2 = make_case(rng, 3000, n=n, scale=scale, nsat=40,
                                            faint=3000, reference=ref,
                                            field=(float(ra1), float(dec1), pa, flip),
                                            settings=settings)
        t0 = time.perf_counter()
        res = solve_astrometry(src2, shape=(n, n), wcs_guess=guess2, reference=ref,
                               settings=settings, previous=first.wcs)
        times.append(time.perf_counter() - t0)
        err = grid_rms_px(res.wcs, truth2, n) if res.ok else float("nan")
        good = res.ok and err < 0.05
        ok += good
        methods[res.method] = methods.get(res.method, 0) + 1
        if not good and len(fails) < 3:
            fails.append(f"{res.status} {res.method} {err:.3f} px {res.reason[:200]}")
    print(f"{'dense deep 4k, warm start':28s} {ok:5d}/{trials:<5d} methods {methods} "
          f"median {np.median(times) * 1e3:6.1f} ms", flush=True)
    for f in fails:
        print("    e.g.", f)


def _geometry(w):
    cd = w.wcs.cd
    return (abs(np.linalg.det(cd)) ** 0.5 * 3600, math.degrees(math.atan2(cd[0, 1], cd[1, 1])),
            np.linalg.det(cd) > 0)


def run_random(trials, settings, small: bool = False, few: bool = False):
    """Random image lists (8-60 stars) against real catalogues: half on 512 px at 0.24"/px,
    half on 1024 px at 0.4"/px; ``small``: all on 512 px at 0.12"/px (a 61" field) against
    a catalogue four times as deep as the list (the ``--small`` case's); ``few``: lists of
    4-7 stars (the ``--few`` case's sizes)."""
    false = 0
    times = []
    for t in range(trials):
        rng = np.random.default_rng([7, t] if not small else [8, t])
        if few:
            rng = np.random.default_rng([9, t, int(small)])
        nstars = int(rng.choice([4, 5, 6, 7] if few else [8, 12, 20, 30, 50, 60]))
        n, scale = ((512, 0.24), (1024, 0.4))[t % 2] if not small else (512, 0.12)
        sources, reference, truth, guess = make_case(rng, nstars, n=n, scale=scale,
                                                     random_image=True, settings=settings,
                                                     depth=4.0 if small else 10.0)
        t0 = time.perf_counter()
        res = solve_astrometry(sources, shape=(n, n), wcs_guess=guess, reference=reference,
                               settings=settings)
        times.append(time.perf_counter() - t0)
        false += res.ok
        if res.ok:
            print(f"    false solution: trial {t}, {nstars} stars, {res.method}, "
                  f"{res.nstar} matched, rms {res.rms_arcsec:.3f}\"", flush=True)
    label = ("random lists (4-7 stars)" if few else "random lists (8-60 stars)") + (
        ", 61\"" if small else "")
    print(f"{label:28s} false solutions {false}/{trials} "
          f"({100 * false / trials:.2f} %)  median {np.median(times) * 1e3:6.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per sparse case")
    parser.add_argument("--random", type=int, default=1000, help="random-list trials")
    parser.add_argument("--dense", type=int, default=10, help="dense 4k trials")
    parser.add_argument("--warm", type=int, default=10, help="dense deep 4k warm-start trials")
    parser.add_argument("--small", type=int, default=0,
                        help="trials per small-field case (512 px at 0.12\"/px, catalogue "
                             "four times as deep) and, with --random, random lists there")
    parser.add_argument("--few", type=int, default=0,
                        help="trials per few-star case (4, 5, 6 stars on 512 px at 0.24\"/px "
                             "and on 61\" fields) and, with --random, random lists of 4-7 "
                             "stars there")
    parser.add_argument("--min-matches", type=int, default=None,
                        help="astrometry min_matches (default: the configuration's)")
    parser.add_argument("--astroalign", action="store_true")
    args = parser.parse_args()
    settings = Astrometry(solve_field=False)
    if args.min_matches is not None:
        settings = settings.model_copy(update={"min_matches": args.min_matches})
    aa = None
    if args.astroalign:
        import astroalign as aa
    for nstars in (8, 12, 20, 50) if args.trials else ():
        run(f"{nstars} stars, 512 px", args.trials,
            lambda rng, k=nstars: make_case(rng, k, n=512, scale=0.24, settings=settings),
            settings, aa, n=512,
            tol_px=0.3)
    if args.dense:
        run("dense 4k: 3000 stars", args.dense,
            lambda rng: make_case(rng, 3000, n=4096, scale=0.24, nsat=40, depth=2.5,
                                  settings=settings),
            settings, aa, n=4096)
    if args.warm:
        run_warm(args.warm, settings)
    for nstars in (8, 12, 20) if args.small else ():
        run(f"{nstars} stars, 61\" field", args.small,
            lambda rng, k=nstars: make_case(rng, k, n=512, scale=0.12, depth=4.0,
                                            settings=settings),
            settings, aa, n=512, tol_px=0.3)
    for nstars in (4, 5, 6) if args.few else ():
        run(f"{nstars} stars, 512 px", args.few,
            lambda rng, k=nstars: make_case(rng, k, n=512, scale=0.24, settings=settings),
            settings, aa, n=512, tol_px=0.5)
        run(f"{nstars} stars, 61\" field", args.few,
            lambda rng, k=nstars: make_case(rng, k, n=512, scale=0.12, depth=4.0,
                                            settings=settings),
            settings, aa, n=512, tol_px=0.5)
    if args.random:
        if not args.few:
            run_random(args.random, settings)
        if args.small:
            run_random(args.random, settings, small=True)
        if args.few:
            run_random(args.random, settings, few=True)
            run_random(args.random, settings, small=True, few=True)


if __name__ == "__main__":
    main()
