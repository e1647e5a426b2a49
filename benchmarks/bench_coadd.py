"""Benchmark of photowatch.coadd.stack on synthetic 4k frames.

Measures, on one machine in one run:

1. the cost of adding frame k (k = 1..N) to the quick-look coadd: resample,
   accumulate, atomic write of the coadd file (should be flat in k);
2. :func:`photowatch.coadd.stack.resample` next to ``reproject.reproject_interp``
   (bilinear) on the same frame, and the accuracy of both against the truth
   (fluxes and positions of isolated stars);
3. the time and peak memory (max RSS of a separate process) of the final,
   outlier-rejected coadd of the N frames.

Usage::

    .venv/bin/python benchmarks/bench_coadd.py            # 4096 x 4096, 30 frames
    .venv/bin/python benchmarks/bench_coadd.py --size 1024 --frames 10   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RA0, DEC0 = 210.0, 40.0
SCALE = 0.24  # arcsec / px (LMI 2x2)
SIGMA = 1.6  # px (FWHM 0.9")


def frame_wcs(size: int, k: int):
    """TAN-SIP WCS of frame k: dithers of up to ~40 px, rotations up to 0.3 deg,
    a SIP distortion of ~2 px at the corners that changes a little per frame."""
    from astropy.wcs import WCS, Sip

    rng = np.random.default_rng([11, k])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [RA0, DEC0]
    dither = size / 100.0
    w.wcs.crpix = [(size + 1) / 2 + rng.uniform(-dither, dither),
                   (size + 1) / 2 + rng.uniform(-dither, dither)]
    s, t = SCALE / 3600.0, math.radians(rng.uniform(-0.3, 0.3))
    w.wcs.cd = [[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]]
    n = size / 2.0
    kk = 2.0 * (1 + 0.05 * rng.standard_normal()) / (2 * n**3)  # radial, ~2 px at corners
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[3, 0] = a[1, 2] = kk
    b[2, 1] = b[0, 3] = kk
    a[2, 0] = b[0, 2] = 0.3 / n**2
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def star_field(size: int):
    rng = np.random.default_rng(3)
    n = int(3000 * (size / 4096) ** 2)
    half = size * SCALE / 2 * 1.1
    east, north = rng.uniform(-half, half, n), rng.uniform(-half, half, n)
    ra = RA0 - east / 3600 / math.cos(math.radians(DEC0))
    dec = DEC0 + north / 3600
    flux = 10 ** rng.uniform(3, 5.5, n)
    return ra, dec, flux


def make_frame(size: int, k: int, stars, sky_noise=12.0):
    """(model, sci, var, mask, wcs): stars + noise, flagged cosmic rays and a bad column."""
    from photowatch.core.frame import Mask
    from photowatch.sim.psf import gaussian_stars

    w = frame_wcs(size, k)
    ra, dec, flux = stars
    xs, ys = w.all_world2pix(ra, dec, 0)
    model = gaussian_stars((size, size), xs, ys, flux, sigma_px=SIGMA,
                           radius=math.ceil(6 * SIGMA)).astype(np.float32)
    rng = np.random.default_rng([12, k])
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise *= sky_noise
    sci = model + noise
    var = model.clip(0) + np.float32(sky_noise**2)
    mask = np.zeros((size, size), np.uint16)
    ncr = int(2000 * (size / 4096) ** 2)
    cy, cx = rng.integers(0, size, ncr), rng.integers(0, size, ncr)
    sci[cy, cx] += 3000
    mask[cy, cx] |= int(Mask.COSMIC)
    col = int(rng.integers(10, size - 10))
    mask[:, col] |= int(Mask.BAD)
    sci[:, col] = 1e5
    return model, sci, var, mask, w


def measure_stars(img, gx, gy, flux, radius=10, min_flux=2e4):
    """Flux ratios and centroid offsets of bright, isolated stars fully inside ``img``."""
    ratios, dx, dy = [], [], []
    ny, nx = img.shape
    order = np.argsort(gx)
    for i in order:
        x, y, f = gx[i], gy[i], flux[i]
        if f < min_flux:
            continue
        d = np.hypot(gx - x, gy - y)
        d[i] = np.inf
        if np.any((d < 3 * radius) & (flux > f * 0.001)):
            continue
        ix, iy = int(round(x)), int(round(y))
        if not (radius <= ix < nx - radius and radius <= iy < ny - radius):
            continue
        sub = img[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1]
        if not np.all(np.isfinite(sub)):
            continue
        yy, xx = np.mgrid[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1]
        total = float(sub.sum(dtype=float))
        ratios.append(total / f)
        dx.append(float((sub * xx).sum() / total - x))
        dy.append(float((sub * yy).sum() / total - y))
    return np.array(ratios), np.array(dx), np.array(dy)


def describe(ratios, dx, dy) -> str:
    if len(ratios) == 0:
        return "no stars"
    return (f"n={len(ratios)} flux: median {np.median(ratios) - 1:+.2e}, "
            f"max |err| {np.max(np.abs(ratios - 1)):.2e}; position: max |d| "
            f"{max(np.max(np.abs(dx)), np.max(np.abs(dy))):.4f} px")


def _vm(key: str) -> float:
    """A /proc/self/status memory figure (MB), e.g. VmRSS or VmHWM (peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def final_worker(spec_path: str) -> None:
    """Run in a child process: the final coadd alone, for its own time and peak RSS.

    The peak is VmHWM, reset just before the call (``/proc/self/clear_refs``);
    ``ru_maxrss`` would include the parent's size inherited at fork."""
    from photowatch.coadd.stack import CoaddGrid, FinalMember, final_coadd

    spec = json.loads(Path(spec_path).read_text())
    grid = CoaddGrid.from_json(spec["grid"])
    members = [FinalMember(**m) for m in spec["members"]]
    # libraries the call imports lazily, and BLAS buffers, are not the call's working set
    import astropy.io.fits  # noqa: F401
    import astropy.wcs  # noqa: F401
    import scipy.interpolate  # noqa: F401
    import scipy.ndimage  # noqa: F401

    np.ones((64, 64)) @ np.ones((64, 64))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    rss0 = _vm("VmRSS")
    t = time.perf_counter()
    final_coadd(members, grid, spec["out"], clip_sigma=3.0, chunk_rows=spec["chunk_rows"],
                magzp=25.0, header_extra=None, workers=spec["workers"])
    elapsed = time.perf_counter() - t
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": _vm("VmHWM"), "rss_before_mb": rss0,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="frame side (px)")
    parser.add_argument("--frames", type=int, default=30, help="number of frames")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="threads for resampling")
    parser.add_argument("--no-reproject", action="store_true")
    parser.add_argument("--final-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.final_worker:
        final_worker(args.final_worker)
        return

    from astropy.io import fits

    from photowatch.coadd.stack import Accumulator, make_grid, resample
    from photowatch.core.frame import Frame
    from photowatch.io.products import write_product

    size, nframes = args.size, args.frames
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_coadd_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_coadd: {nframes} frames of {size}x{size}, {os.cpu_count()} CPUs, "
          f"workers={args.workers}, scratch {work}")
    stars = star_field(size)
    w0 = frame_wcs(size, 0)
    grid = make_grid(RA0, DEC0, SCALE, (size, size), w0, margin_arcsec=60.0 * size / 4096)
    gx, gy = grid.wcs.all_world2pix(stars[0], stars[1], 0)
    print(f"# grid {grid.shape[1]}x{grid.shape[0]} px at {grid.pixel_scale_arcsec:.3f}\"/px")

    # ---- 1. quick-look: cost of frame k --------------------------------------------------
    acc = Accumulator(grid)
    coadd_path = work / "coadds" / "coadd_BENCH_R.fits"
    rows, members = [], []
    first = None
    for k in range(nframes):
        t0 = time.perf_counter()
        model, sci, var, mask, w = make_frame(size, k, stars)
        t_make = time.perf_counter() - t0
        if k == 0:
            first = (model, sci, var, mask, w)
        t = time.perf_counter()
        res = resample(sci, None, mask, w, grid, workers=args.workers)
        t_res = time.perf_counter() - t
        t = time.perf_counter()
        acc.add(f"f{k:03d}", res, flxscale=1.0, skynoise=12.0, exptime_s=300.0)
        t_add = time.perf_counter() - t
        t = time.perf_counter()
        acc.write(coadd_path, magzp=25.0)
        t_write = time.perf_counter() - t
        rows.append((k + 1, t_res, t_add, t_write, t_res + t_add + t_write))
        # a reduced product for the final coadd (not timed)
        hdr = w.to_header(relax=True)
        path = work / "reduced" / f"f{k:03d}.fits"
        write_product(path, Frame(sci=sci, var=var, mask=mask, header=hdr),
                      primary=fits.Header(), sci_hdr=hdr, fsync=False)
        members.append(dict(member_id=f"f{k:03d}", path=str(path), flxscale=1.0,
                            skynoise=12.0, exptime_s=300.0))
        print(f"  frame {k + 1:3d}: resample {t_res:6.2f} s  add {t_add:5.2f} s  "
              f"write {t_write:5.2f} s  total {rows[-1][-1]:6.2f} s   (synth {t_make:.1f} s)",
              flush=True)
    ql = np.array(rows)
    size_mb = coadd_path.stat().st_size / 2**20

    # ---- 2. resample vs reproject_interp on the same frame --------------------------------
    model, sci, var, mask, w = first
    zero = np.zeros_like(mask)
    timings = {}
    for label, kw in (("resample, 1 thread, data+var", dict(var=var, workers=1)),
                      ("resample, 2 threads, data+var", dict(var=var, workers=2)),
                      ("resample, 1 thread, data only", dict(var=None, workers=1)),
                      ("resample, 2 threads, data only", dict(var=None, workers=2))):
        best = math.inf
        for _ in range(2):
            t = time.perf_counter()
            res = resample(model, kw["var"], zero, w, grid, workers=kw["workers"])
            best = min(best, time.perf_counter() - t)
        timings[label] = best
    ours = np.full(grid.shape, np.nan, np.float32)
    ours[res.slices] = np.where(res.good, res.data, np.nan)
    acc_ours = describe(*measure_stars(ours, gx, gy, stars[2]))
    acc_rep = "skipped"
    t_rep = math.nan
    if not args.no_reproject:
        from reproject import reproject_interp

        t = time.perf_counter()
        rep, foot = reproject_interp((model, w), grid.wcs, shape_out=grid.shape,
                                     order="bilinear")
        t_rep = time.perf_counter() - t
        rep[foot == 0] = np.nan
        acc_rep = describe(*measure_stars(rep, gx, gy, stars[2]))
        area = resample(np.ones_like(model), None, zero, w, grid, workers=args.workers)
        both = res.good & area.good & np.isfinite(rep[res.slices])
        diff = np.abs(res.data[both] / area.data[both] - rep[res.slices][both])
        pix_agree = float(diff.max() / model.max())

    # ---- 2b. catalogue and PNG of the quick-look coadd ---------------------------------------
    from photowatch.coadd.catalogue import coadd_catalog
    from photowatch.io.previews import save_png

    save_png(np.ones((8, 8)), work / "warm.png", title="x")  # imports matplotlib, PIL
    t = time.perf_counter()
    preview_png = save_png(acc.sci(), work / "coadds" / "coadd_BENCH_R.png", title="BENCH R")
    t_png = time.perf_counter() - t
    t = time.perf_counter()
    catalog = coadd_catalog(coadd_path, detect_sigma=5.0)
    t_cat = time.perf_counter() - t
    del acc

    # ---- 3. final coadd in a child process -------------------------------------------------
    spec = work / "final_spec.json"
    spec.write_text(json.dumps({"grid": grid.to_json(), "members": members,
                                "out": str(work / "coadds" / "coadd_BENCH_R_final.fits"),
                                "chunk_rows": args.chunk_rows, "workers": args.workers}))
    out = subprocess.run([sys.executable, __file__, "--final-worker", str(spec)],
                         capture_output=True, text=True, check=True)
    final = json.loads(out.stdout.strip().splitlines()[-1])
    input_gb = sum(Path(m["path"]).stat().st_size for m in members) / 2**30

    # ---- report ---------------------------------------------------------------------------
    print()
    print(f"## quick-look coadd, {size}x{size} frames onto {grid.shape[1]}x{grid.shape[0]} "
          f"(file {size_mb:.0f} MB, written atomically with fsync)")
    print("| k | resample s | add s | write s | total s |")
    print("|---|---|---|---|---|")
    for k, a, b, c, d in ql:
        print(f"| {int(k)} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |")
    half = max(len(ql) // 2, 1)
    print(f"mean total, frames 1-{half}: {ql[:half, 4].mean():.2f} s; frames {half + 1}-"
          f"{len(ql)}: {ql[half:, 4].mean():.2f} s; slope {np.polyfit(ql[:, 0], ql[:, 4], 1)[0]:+.4f} s/frame")
    print()
    print(f"## resampling one {size}x{size} frame")
    print("| method | seconds | speed-up vs reproject |")
    print("|---|---|---|")
    print(f"| reproject_interp (bilinear, full grid) | {t_rep:.2f} | 1 |")
    for label, sec in timings.items():
        print(f"| {label} | {sec:.2f} | {t_rep / sec:.1f}x |")
    print()
    print(f"accuracy vs truth, isolated stars (box r=10 px): ours: {acc_ours}")
    print(f"accuracy vs truth, isolated stars (box r=10 px): reproject: {acc_rep}")
    if not args.no_reproject:
        print(f"ours / pixel-area ratio vs reproject, max |diff| / peak: {pix_agree:.1e}")
    print()
    print(f"quick-look coadd PNG ({preview_png.stat().st_size // 1024} kB): {t_png:.2f} s; "
          f"catalogue ({len(catalog)} sources at 5 sigma): {t_cat:.1f} s")
    print()
    print(f"## final coadd of {len(members)} frames ({input_gb:.1f} GB of products), "
          f"chunk_rows={args.chunk_rows}")
    print(f"time {final['seconds']:.1f} s, peak RSS during the call {final['peak_rss_mb']:.0f} MB "
          f"(RSS before the call {final['rss_before_mb']:.0f} MB; output planes alone "
          f"{grid.shape[0] * grid.shape[1] * 14 / 2**20:.0f} MB)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
