"""Issue 21 (live): light-curve accuracy, depth and per-frame cost.

Two parts:

``--accuracy``: per seed, a simulated LMI night (2x2 binning, 0.24"/px) with an afterglow
(t^-1.2, fading through the limit) at the header's target position and fake constant
stars (sim/inject.py) at quiet spots, reduced by ``photowatch reduce`` with the fakes in a
``[targets] file``. Against the injected truth it gives:
  - pulls (mag - truth) / magerr of detected points clear of the threshold
    (truth brighter than LIMMAG - 0.5), and flux pulls (flux - truth) / fluxerr of all
    points (no selection);
  - upper limits: the share of non-detections whose truth is fainter than the limit given
    (``uplim``), and the share of points fainter than LIMMAG + 0.75 that were (correctly)
    not detected;
  - depth: the 50 % completeness magnitude of forced detection (S/N >= 5 at the known
    position) minus the frame's LIMMAG, and of blind detection (the fake star is in CAT
    with S/N >= 5 within 1 FWHM) minus LIMMAG;
  - false detections: CAT sources farther than 1.5 FWHM from every true star (the
    simulator's whole list, any magnitude, on or off the frame) and every injection, per
    frame and per square degree; those unflagged, and those of the PSF-matched pass
    (flag 1024).

``--cost``: seconds added per frame at 4k by the live lane: the depth (ERR median and the
empty-aperture noise), forced photometry at N targets, the store rows, a light-curve file,
and a coadd point (cutout), on a synthetic 4096x4096 frame with LMI-like noise and stars.

    python benchmarks/bench_live.py --accuracy --seeds 1 2 3 4 5 --size 1024
    python benchmarks/bench_live.py --cost --targets 1 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------- accuracy
def run_night(root: Path, seed: int, size: int, n_science: int, n_fakes: int,
              detect_sigma: float | None = None, psf_snr: float | None = None) -> dict:
    from astropy.table import Table

    from photowatch.sim.inject import Afterglow, FakeStars
    from photowatch.sim.night import simulate_night

    burst = datetime(2020, 1, 29, 2, 5, tzinfo=UTC)
    ag = Afterglow(burst, mag0=21.0, alpha=1.2, ref_s=600.0)
    fakes = FakeStars(n=n_fakes, mags=(18.5, 22.5), spread_arcsec=size * 0.24 * 0.4,
                      seed=seed)
    night = simulate_night(root / "night", size=size, binning=2, n_science=n_science,
                           seed=seed, bad_flats=False, injections=[ag, fakes])
    Table(rows=[p[:3] for p in fakes.positions], names=["name", "ra", "dec"]).write(
        root / "targets.csv", overwrite=True)
    extra = f"[stages.sources]\ndetect_sigma = {detect_sigma}\n" if detect_sigma else ""
    if psf_snr is not None:
        extra += ("" if extra else "[stages.sources]\n") + f"psf_detect_snr = {psf_snr}\n"
    (root / "config.toml").write_text(f'[targets]\nfile = "{root / "targets.csv"}"\n{extra}')
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "photowatch", "reduce", str(night.raw_dir), "--out",
                    str(root / "out"), "--catalog", str(night.catalog_path), "--config",
                    str(root / "config.toml")], check=False, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return {"night": night, "seconds": time.perf_counter() - t0}


def collect(root: Path, night) -> tuple[list[dict], list[dict]]:
    from astropy.io import fits
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from photowatch.io.lightcurves import read_lightcurve
    from photowatch.sim.inject import load_truth
    from photowatch.stages.forced import FLAG_COSMIC

    truth = load_truth(night.root)
    zp_true = {f.raw_name: f.zp_true for f in night.objects()}
    rows, frames = [], []
    cats = {}
    stars = night.stars
    for path in sorted((root / "out" / "lightcurves").rglob("*.ecsv")):
        lc = read_lightcurve(path)
        name = "afterglow" if lc.meta["target"] == "NGC0001" else lc.meta["target"]
        for r in lc[lc["kind"] == "frame"]:
            if r["product"] not in cats:
                hdr = fits.getheader(r["product"])
                cats[r["product"]] = (hdr["ORIGFILE"], Table.read(r["product"], hdu="CAT"),
                                      fits.getheader(r["product"], "SCI"))
                orig, cat, sci = cats[r["product"]]
                frames.append(false_detections(cat, sci, stars,
                                               truth[truth["frame"] == orig]))
            orig, cat, sci = cats[r["product"]]
            t = truth[(truth["name"] == name) & (truth["frame"] == orig)]
            if not len(t) or r["flags"] & FLAG_COSMIC:
                continue
            fwhm_px = sci["FWHM"] / sci.get("PIXSCALE", 0.24)
            # blind: a CAT source within 1 FWHM (CAT x, y are 1-based) with S/N >= 5
            d, i = cKDTree(np.column_stack([cat["x"] - 1, cat["y"] - 1])).query(
                [r["x"], r["y"]]) if len(cat) else (np.inf, 0)
            blind = bool(d < fwhm_px and cat["snr"][i] >= 5)
            rows.append({"name": name, "truth": float(t["mag"][0]),
                         "dzp": float(sci["MAGZP"]) - zp_true[orig],
                         "zp_err": float(sci["MAGZPERR"]), "frame": orig,
                         "flux_true": float(t["flux_e"][0]), **{k: r[k] for k in (
                             "mag", "magerr", "flux", "fluxerr", "limmag", "uplim",
                             "detected")}, "blind": blind})
    return rows, frames


def false_detections(cat, sci, stars, injected) -> dict:
    """CAT sources with no true star (any magnitude) or injection within 1.5 FWHM."""
    from astropy.wcs import WCS
    from scipy.spatial import cKDTree

    scale = sci.get("PIXSCALE", 0.24)
    fwhm_px = sci["FWHM"] / scale
    wcs = WCS(sci)
    ra = np.r_[np.asarray(stars["ra"]), np.asarray(injected["ra"])]
    dec = np.r_[np.asarray(stars["dec"]), np.asarray(injected["dec"])]
    tx, ty = wcs.all_world2pix(ra, dec, 1)  # CAT x, y are 1-based
    d, _ = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([cat["x"], cat["y"]]))
    ny, nx = sci["NAXIS2"], sci["NAXIS1"]
    false = d > 1.5 * fwhm_px
    flags = np.asarray(cat["flags"], int)
    return {"n_cat": len(cat), "false": int(false.sum()),
            "false_unflagged": int((false & (flags == 0)).sum()),
            "false_faint_pass": int((false & ((flags & 1024) != 0)).sum()),
            "deg2": nx * ny * (scale / 3600) ** 2}


def m50(dm: np.ndarray, found: np.ndarray) -> float:
    """The 50 % point of a completeness curve (magnitude relative to LIMMAG)."""
    centres = np.arange(-2.0, 1.51, 0.05)
    frac = np.array([found[np.abs(dm - c) < 0.25].mean() if (np.abs(dm - c) < 0.25).sum()
                     >= 5 else np.nan for c in centres])
    ok = np.isfinite(frac)
    centres, frac = centres[ok], frac[ok]
    # first crossing below 0.5 from the bright side
    for k in range(1, len(frac)):
        if frac[k - 1] >= 0.5 > frac[k]:
            a = (frac[k - 1] - 0.5) / (frac[k - 1] - frac[k])
            return float(centres[k - 1] + a * (centres[k] - centres[k - 1]))
    return float("nan")


def summarise(rows: list[dict], cats: list[dict]) -> dict:
    truth = np.array([r["truth"] for r in rows])
    lim = np.array([r["limmag"] for r in rows], float)
    det = np.array([r["detected"] for r in rows], bool)
    blind = np.array([r["blind"] for r in rows], bool)
    mag = np.array([r["mag"] for r in rows], float)
    magerr = np.array([r["magerr"] for r in rows], float)
    flux = np.array([r["flux"] for r in rows], float)
    fluxerr = np.array([r["fluxerr"] for r in rows], float)
    ftrue = np.array([r["flux_true"] for r in rows], float)
    up = np.array([r["uplim"] for r in rows], float)
    clear = det & (truth < lim - 0.5)
    pulls = (mag[clear] - truth[clear]) / magerr[clear]
    # the same with each frame's MAGZP error taken out (MAGZP - zp_true, less the night's
    # median: the product's flux scale differs from the truth's by a constant) and the
    # quoted MAGZPERR taken out of magerr: what forced photometry itself contributes
    dzp = np.array([r["dzp"] for r in rows])
    zperr = np.array([r["zp_err"] for r in rows])
    off = dzp - np.median(dzp)
    stat = np.sqrt(np.maximum(magerr ** 2 - zperr ** 2, 1e-12))
    pulls_zp = (mag[clear] - off[clear] - truth[clear]) / stat[clear]
    frames = sorted({r["frame"] for r in rows})
    dz = np.array([off[[r["frame"] == f for r in rows]][0] for f in frames])
    ze = np.array([zperr[[r["frame"] == f for r in rows]][0] for f in frames])
    fpulls = (flux - ftrue) / fluxerr
    dm = truth - lim
    faint = truth > lim + 0.75
    return {
        "points": len(rows), "detected": int(det.sum()),
        "mag_pull_n": int(clear.sum()), "mag_pull_mean": float(np.mean(pulls)),
        "mag_pull_std": float(np.std(pulls)),
        "mag_pull_robust_std": float(1.4826 * np.median(np.abs(pulls - np.median(pulls)))),
        "mag_pull_beyond_4": int((np.abs(pulls) > 4).sum()),
        "mag_pull_zp_removed_mean": float(np.mean(pulls_zp)),
        "mag_pull_zp_removed_std": float(np.std(pulls_zp)),
        "zp_offset_rms_over_magzperr": float(np.sqrt(np.mean((dz / ze) ** 2))),
        "flux_pull_mean": float(np.mean(fpulls)), "flux_pull_std": float(np.std(fpulls)),
        "uplim_n": int((~det).sum()), "uplim_correct": float(np.mean(truth[~det] > up[~det])),
        "faint_n": int(faint.sum()), "faint_undetected": float(np.mean(~det[faint])),
        "forced_m50_minus_limmag": m50(dm, det), "blind_m50_minus_limmag": m50(dm, blind),
        "frames": len(cats), "cat_per_frame": float(np.mean([f["n_cat"] for f in cats])),
        "false_per_frame": float(np.mean([f["false"] for f in cats])),
        "false_per_deg2": float(sum(f["false"] for f in cats) / sum(f["deg2"] for f in cats)),
        "false_unflagged_per_frame": float(np.mean([f["false_unflagged"] for f in cats])),
        "false_faint_pass_per_frame": float(np.mean([f["false_faint_pass"] for f in cats])),
    }


def accuracy(args) -> None:
    all_rows, all_frames = [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="bench_live_") as tmp:
            root = Path(args.keep) / f"seed{seed}" if args.keep else Path(tmp)
            run = run_night(root, seed, args.size, args.science, args.fakes,
                            args.detect_sigma, args.psf_detect_snr)
            rows, frames = collect(root, run["night"])
            all_rows += rows
            all_frames += frames
            s = summarise(rows, frames)
            print(f"seed {seed}: {run['seconds']:.0f} s; " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()),
                flush=True)
    s = summarise(all_rows, all_frames)
    print("\nall seeds:")
    for k, v in s.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


# ----------------------------------------------------------------------------- cost
def cost(args) -> None:
    from astropy.wcs import WCS

    from photowatch.sim.night import _Psf, render_stars
    from photowatch.stages.depth import empty_aperture_noise, pixel_noise
    from photowatch.stages.forced import forced_photometry
    from photowatch.state.store import Store

    n = args.size
    rng = np.random.default_rng(0)
    fwhm = 1.2 / 0.24
    r_ap = 2 * fwhm
    nstar = int(65000 * (n * 0.24 / 3600) ** 2)
    x, y = rng.uniform(0, n, nstar), rng.uniform(0, n, nstar)
    flux = 10 ** (-0.4 * (rng.uniform(14, 23.5, nstar) - 29.0))
    sky = 4000.0
    model = render_stars((n, n), _Psf(fwhm), x, y, flux)
    var = (model + sky + 36.0).astype(np.float32)
    data = (model + rng.normal(0, 1, (n, n)).astype(np.float32) * np.sqrt(var)).astype(
        np.float32)
    mask = np.zeros((n, n), np.uint16)
    bright = flux > 10 ** (-0.4 * (21 - 29.0))
    xy = np.column_stack([x[bright], y[bright]])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [n / 2, n / 2]
    wcs.wcs.crval = [60.0, 25.0]
    wcs.wcs.cdelt = [-0.24 / 3600, 0.24 / 3600]
    print(f"{n}x{n}, {nstar} stars, {bright.sum()} catalogued; medians of {args.repeat} runs")
    for ntarg in args.targets:
        ra, dec = wcs.all_pix2world(rng.uniform(100, n - 100, ntarg),
                                    rng.uniform(100, n - 100, ntarg), 0)
        targets = [(f"t{k}", a, b) for k, (a, b) in enumerate(zip(ra, dec))]
        times: dict[str, list] = {k: [] for k in ("depth", "forced", "store+file", "coadd",
                                                  "total")}
        cpu: dict[str, list] = {k: [] for k in times}
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "state.sqlite")
            for rep in range(args.repeat):
                c0 = time.process_time()
                t0 = time.perf_counter()
                noise = pixel_noise(var, mask, bits=27)
                factor, _ = empty_aperture_noise(data, var, mask, xy, r_ap, fwhm, bits=27)
                t1, c1 = time.perf_counter(), time.process_time()
                tab = forced_photometry(data, var, mask, wcs, targets, r_ap_px=r_ap,
                                        apcor=1.04, magzp=29.0, noise_factor=factor)
                t2, c2 = time.perf_counter(), time.process_time()
                from photowatch.io.lightcurves import write_lightcurve

                for r in tab:
                    store.upsert_forced("2020-01-28", r["name"], f"frame{rep}", kind="frame",
                                        filter="r", mjd=58877.0 + rep / 1000,
                                        flux=float(r["flux"]), detected=int(r["detected"]))
                    write_lightcurve(tmp, "2020-01-28", r["name"],
                                     store.forced_points("2020-01-28", r["name"]))
                t3, c3 = time.perf_counter(), time.process_time()
                # a coadd point: the cutout of each target, forced with the coadd's noise
                for name, a, b in targets:
                    px, py = (float(v[0]) for v in wcs.all_world2pix([a], [b], 0))
                    h = int(3 * r_ap) + 2
                    ix, iy = int(px), int(py)
                    sub = wcs.slice((slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1)))
                    forced_photometry(data[iy - h:iy + h + 1, ix - h:ix + h + 1].copy(),
                                      var[iy - h:iy + h + 1, ix - h:ix + h + 1].copy(), None,
                                      sub, [(name, a, b)], r_ap_px=r_ap, apcor=1.04,
                                      magzp=29.0)
                t4, c4 = time.perf_counter(), time.process_time()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[k].append(v)
                for k, v in zip(cpu, (c1 - c0, c2 - c1, c3 - c2, c4 - c3, c4 - c0)):
                    cpu[k].append(v)
            del noise
        med = {k: float(np.median(v)) for k, v in times.items()}
        medc = {k: float(np.median(v)) for k, v in cpu.items()}
        print(f"targets {ntarg}: wall " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        print(f"targets {ntarg}: CPU  " + ", ".join(f"{k} {v:.3f} s" for k, v in medc.items()),
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--size", type=int, default=None, help="frame size (accuracy: 1024; "
                   "cost: 4096)")
    p.add_argument("--science", type=int, default=10, help="science frames per night")
    p.add_argument("--fakes", type=int, default=30, help="fake stars per night")
    p.add_argument("--targets", type=int, nargs="+", default=[1, 10])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--keep", metavar="DIR", help="keep each night and its output in DIR")
    p.add_argument("--detect-sigma", type=float, default=None,
                   help="[stages.sources] detect_sigma for the reduction (default: config's)")
    p.add_argument("--psf-detect-snr", type=float, default=None,
                   help="[stages.sources] psf_detect_snr (0: the PSF-matched pass off)")
    args = p.parse_args()
    if args.accuracy:
        args.size = args.size or 1024
        accuracy(args)
    if args.cost:
        args.size = args.size or 4096
        cost(args)
    if not (args.accuracy or args.cost):
        p.print_help()


if __name__ == "__main__":
    main()
