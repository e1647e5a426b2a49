"""Flux-pull widths by true S/N of forced photometry, from nights kept by
``bench_live.py --accuracy --keep DIR`` (issue 21: where the errors are too large or small).

    .venv/bin/python benchmarks/bench_live_pulls.py DIR [--decompose [--measured-factor]]

``--decompose`` splits each point's error with the simulator's noiseless model image
(``truth/model_*.fits``, every star and injection in e-): forced photometry, with the
frame's own aperture, APCOR and errors, on ``SCI - a model`` (the noise alone: ``a`` the
product's flux scale over the truth's, fitted on the stars) and on ``a model`` (the
light in the footprint that is not the target: neighbours, stars below the limit). The
noise pulls' width says whether the quoted errors are the noise; the "contamination"
width whether the positions are clean. It also measures, on each frame's SCI, the empty
aperture scatter over ERR's prediction (``apnoise_factor``'s statistic) at random
empty positions, at positions with no true star in the footprint (3 apertures), and on
the noise image, and the noise image's pixel scatter over ERR.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import collect  # noqa: E402  (the same points as the accuracy summary)


def _robust(v) -> float:
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def widths(base: Path) -> None:
    from photowatch.sim.night import SimNight

    rows = []
    for d in sorted(base.glob("seed*")):
        rows += collect(d, SimNight.load(d / "night"))[0]
    f = np.array([r["flux"] for r in rows], float)
    fe = np.array([r["fluxerr"] for r in rows], float)
    ft = np.array([r["flux_true"] for r in rows], float)
    names = np.array([r["name"] for r in rows])
    snr, pull = ft / fe, (f - ft) / fe
    for lo, hi in [(0, 5), (5, 10), (10, 20), (20, 50), (50, np.inf)]:
        k = (snr >= lo) & (snr < hi)
        print(f"true S/N {lo}-{hi}: n {k.sum()}, width {np.std(pull[k]):.3f}, "
              f"robust {_robust(pull[k]):.3f}, mean {np.mean(pull[k]):+.3f}")
    ag = names == "afterglow"
    print(f"afterglow: n {ag.sum()}, width {np.std(pull[ag]):.3f}; "
          f"fakes: n {(~ag).sum()}, width {np.std(pull[~ag]):.3f}")


def _empty_stats(sci, var, mask, cat_xy, star_xy, r_ap, fwhm, noise, seed=0) -> dict:
    """Robust scatter over ERR's prediction of local-background-subtracted aperture sums
    (empty_aperture_noise's statistic) at 3000 random positions of three kinds."""
    import math

    from scipy.spatial import cKDTree

    from photowatch.core.frame import UNUSABLE
    from photowatch.stages.depth import ANNULUS, _bad_stack, _disc, _stack, local_background

    ny, nx = sci.shape
    margin = int(math.ceil(ANNULUS[1] * r_ap)) + 2
    rng = np.random.default_rng(seed)
    x = rng.integers(margin, nx - margin, 30000)
    y = rng.integers(margin, ny - margin, 30000)
    pts = np.column_stack([x, y])
    d_cat, _ = cKDTree(cat_xy).query(pts)
    d_star, _ = cKDTree(star_xy).query(pts)
    empty = d_cat > ANNULUS[1] * r_ap + 2 * fwhm  # as empty_aperture_noise chooses
    clean = d_star > ANNULUS[1] * r_ap  # no true star in aperture or annulus
    dy, dx = _disc(0.0, r_ap)
    # ERR per pixel: the noise image's sky pixels (mask 0, away from CAT sources) over ERR
    sky = (mask == 0) & np.isfinite(noise) & (var > 0)
    z = (noise[sky] / np.sqrt(var[sky]))[::7]
    out = {"pixel (noise image / ERR)": _robust(z)}
    for label, img, sel in [("empty", sci, empty), ("clean", sci, clean),
                            ("empty, noise image", noise, empty)]:
        xs, ys = x[sel][:3000], y[sel][:3000]
        vals = _stack(img, xs, ys, dy, dx).astype(np.float64)
        vv = _stack(var, xs, ys, dy, dx).astype(np.float64)
        ok = np.isfinite(vals).all(axis=1) & (vv > 0).all(axis=1)
        ok &= ~_bad_stack(mask, int(UNUSABLE), xs, ys, dy, dx).any(axis=1)
        bkg, _ = local_background(img, mask, xs, ys, r_ap, bits=int(UNUSABLE))
        ok &= np.isfinite(bkg)
        p = (vals[ok].sum(axis=1) - dy.size * bkg[ok]) / np.sqrt(vv[ok].sum(axis=1))
        out[label] = _robust(p)
    return out


def decompose(base: Path, measured_factor: bool = False) -> None:
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    from photowatch.sim.inject import load_truth
    from photowatch.stages.forced import FLAG_COSMIC, forced_photometry

    pts, empties = [], []
    for sd in sorted(base.glob("seed*")):
        truth = load_truth(sd / "night")
        stars = Table.read(sd / "night" / "truth" / "stars.ecsv")
        con = sqlite3.connect(sd / "out" / "state.sqlite")
        frames = con.execute("SELECT product, qc_json, raw_name FROM frames WHERE "
                             "kind='object' AND product IS NOT NULL").fetchall()
        con.close()
        for k_frame, (prod, qcj, raw) in enumerate(frames):
            qc = json.loads(qcj or "{}")
            t = truth[truth["frame"] == raw]
            if not qc.get("aprad_px") or not len(t):
                continue
            with fits.open(prod) as h:
                sci = h["SCI"].data.astype(np.float32)
                var = h["ERR"].data.astype(np.float32) ** 2
                mask = h["MASK"].data
                wcs = WCS(h["SCI"].header)
                fwhm = float(h["SCI"].header["FWHM"]) / float(h["SCI"].header["PIXSCALE"])
                cat = h["CAT"].data
            model = fits.getdata(sd / "night" / "truth" / f"model_{Path(raw).stem}.fits"
                                 ).astype(np.float32)
            on = (mask == 0) & (model > 5 * np.sqrt(var))
            a = float(np.sum(sci[on] * model[on]) / np.sum(model[on] ** 2))
            targets = [(str(r["name"]), float(r["ra"]), float(r["dec"])) for r in t]
            kw = dict(r_ap_px=qc["aprad_px"], apcor=qc.get("apcor") or 1.0)
            if measured_factor:  # the errors before lane pulls2k: the empty-aperture factor
                kw["noise_factor"] = qc.get("apnoise_factor") or 1.0
            got = forced_photometry(sci, var, mask, wcs, targets, **kw)
            noise = forced_photometry(sci - a * model, var, mask, wcs, targets, **kw)
            light = forced_photometry(a * model, var, mask, wcs, targets, **kw)
            for k, r in enumerate(t):
                if got["flags"][k] & (1 | FLAG_COSMIC):
                    continue
                ft = a * float(r["flux_e"])
                pts.append((ft / got["fluxerr"][k], noise["flux"][k] / got["fluxerr"][k],
                            (light["flux"][k] - ft) / got["fluxerr"][k]))
            if k_frame < 3:  # the empty apertures of a few frames per night
                sx, sy = wcs.all_world2pix(stars["ra"], stars["dec"], 0)
                empties.append(_empty_stats(
                    sci, var, mask, np.column_stack([cat["x"] - 1, cat["y"] - 1]),
                    np.column_stack([sx, sy]), qc["aprad_px"], fwhm, sci - a * model))
    p = np.array(pts)
    print("\nerrors split with the truth model (pulls in units of the quoted error):")
    for lo, hi in [(0, 5), (5, 10), (10, 20), (20, 50), (50, np.inf), (0, np.inf)]:
        k = (p[:, 0] >= lo) & (p[:, 0] < hi)
        if k.any():
            print(f"true S/N {lo}-{hi}: n {k.sum()}, noise width {np.std(p[k, 1]):.3f} "
                  f"(robust {_robust(p[k, 1]):.3f}), contamination width {np.std(p[k, 2]):.3f}"
                  f" (mean {np.mean(p[k, 2]):+.3f})")
    print(f"\nempty-aperture scatter over ERR's prediction, median of {len(empties)} frames "
          "(the full annulus median's own noise gives 1.110):")
    for key in empties[0]:
        print(f"  {key}: {np.median([e[key] for e in empties]):.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--decompose", action="store_true")
    ap.add_argument("--measured-factor", action="store_true",
                    help="decompose errors scaled by the frame's apnoise_factor (as before)")
    args = ap.parse_args(argv)
    widths(args.dir)
    if args.decompose:
        decompose(args.dir, args.measured_factor)


if __name__ == "__main__":
    main()
