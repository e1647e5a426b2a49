"""Seconds per stage of one 4k science frame, next to astroscrappy alone.

A simulated LMI night (``photowatch.sim.night``, 4096 x 4096 at 2x2 binning,
one 300 s SDSS-R science frame) is reduced with masters made from the
simulator's truth (bias, dark, flat normalised as the pipeline does) through
each stage of the chain, in order::

    read raw → prepare → flatten → master-sky pattern → sky subtraction →
    cosmics → sources → astrometry → zero point → product write

Each stage is timed on the previous stage's output, best of ``--repeat``
runs; ``astroscrappy.detect_cosmics(niter=2)`` alone (with the stage's
inputs, its old defaults sigclip 4.5, objlim 5) is timed in the same run. The
budget: every other stage together must cost less than astroscrappy alone
(the ratio printed). Astrometry and zero point are skipped with a note if
they fail.

Usage::

    .venv/bin/python benchmarks/bench_stages.py --threads 1          # 4096 x 4096
    .venv/bin/python benchmarks/bench_stages.py --threads 2 --profile
    .venv/bin/python benchmarks/bench_stages.py --size 1024 --repeat 1   # quick

``--threads`` sets OMP_NUM_THREADS (and the BLAS variables) before numpy and
astroscrappy load, as the engine does per worker (``engine.limit_threads``).
The simulated night is kept in ``--out`` (default ``$TMPDIR/photowatch-bench-4096``)
and reused.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS")


def set_threads(n: int | None) -> None:
    """Set the numeric libraries' thread counts; must run before numpy is imported."""
    if n:
        for var in THREAD_VARS:
            os.environ[var] = str(n)


def simulated_night(out: Path, size: int, *, cr_rate: float = 1.5):
    """A one-science-frame night (reused when ``out`` already holds it)."""
    from photowatch.sim.night import SimNight, simulate_night

    if (out / "truth" / "night.json").exists():
        night = SimNight.load(out)
        if night.frames and night.frames[0].shape == (size, size):
            return night
    return simulate_night(out, size=size, binning=2, n_bias=3, n_dark=0, n_flat=3,
                          n_science=1, exptime_s=300.0, bad_flats=False, cr_rate=cr_rate,
                          write_models=True, write_crmasks=True, overwrite=True)


def truth_masters(night, filter_name: str) -> dict:
    """Bias, dark and flat masters from the simulator's truth, as the pipeline would hold them.

    The flat is normalised like a pipeline master (its robust central median,
    :func:`photowatch.calib.combine.robust_level`); variances are tiny, as for
    masters of many frames.
    """
    import numpy as np

    from photowatch.calib.combine import robust_level
    from photowatch.core.frame import MasterImage

    bias = night.true_bias_e()
    dark = night.true_dark_e_per_s()
    flat = night.true_flat(filter_name)
    level, _ = robust_level(flat)
    flat = (flat / np.float32(level)).astype(np.float32)
    return {"bias": MasterImage("bias", bias, np.full_like(bias, 0.01), label="truth_bias"),
            "dark": MasterImage("dark", dark, np.full_like(dark, 1e-8), label="truth_dark"),
            "flat": MasterImage("flat", flat, np.full_like(flat, 1e-8), label="truth_flat",
                                version=1)}


def best_of(repeat: int, fn, *args, **kwargs):
    """(best wall seconds, result of the last call)."""
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, result


def run_chain(night, sf, settings, repeat: int, workdir: Path, notes: list[str]):
    """Time each stage; returns ({stage: seconds}, frames and inputs for the caller)."""
    from photowatch.calib.bpm import bad_pixel_mask
    from photowatch.core.classify import classify
    from photowatch.core.instruments import load_profile
    from photowatch.io.fits import read_raw
    from photowatch.io.products import primary_header, sci_header, write_product
    from photowatch.stages.chain import pattern_for_sky
    from photowatch.stages.cosmics import flag_cosmics
    from photowatch.stages.flatten import flatten
    from photowatch.stages.mastersky import apply_master_sky
    from photowatch.stages.prepare import prepare
    from photowatch.stages.skysub import subtract_sky
    from photowatch.stages.sources import extract_sources

    profile = load_profile("lmi")
    st = settings.stages
    t: dict[str, float] = {}
    t["read raw"], (raw, header) = best_of(repeat, read_raw, sf.path)
    info = classify(header, sf.path.name, profile)
    masters = truth_masters(night, sf.filter)
    bpm = bad_pixel_mask(dark=masters["dark"], flat=masters["flat"],
                         settings=settings.calibration)
    t["prepare"], p = best_of(repeat, prepare, raw, header, info, bias=masters["bias"],
                              dark=masters["dark"], bpm=bpm, settings=st.prepare,
                              calibration=settings.calibration)
    t["flatten"], f = best_of(repeat, flatten, p, flat=masters["flat"], settings=st.flatten)
    t["master-sky pattern"], pattern = best_of(repeat, pattern_for_sky, f, settings)
    # one frame has no master sky: apply its own pattern, for the cost of the step
    sky = _pattern_as_master(pattern)
    t["master-sky apply"], fsky = best_of(repeat, apply_master_sky, f, sky=sky,
                                          level=pattern.level)
    t["sky subtraction"], (s, skyres) = best_of(repeat, subtract_sky, f, settings=st.skysub,
                                                sources=pattern.sources)
    if not skyres.level_e > 0:
        notes.append(f"sky subtraction removed a level of {skyres.level_e:g} e- "
                     f"(masked fraction {skyres.masked_fraction:.2f})")
    t["cosmics"], (z, crres) = best_of(repeat, flag_cosmics, s, settings=st.cosmics)
    t["sources"], src = best_of(repeat, extract_sources, z, settings=st.sources,
                                pixel_scale_arcsec=info.pixel_scale_arcsec)
    frame, cat = z, src.table
    try:
        t["astrometry"], (frame, cat, result, reference) = best_of(
            repeat, _astrometry, night, info, profile, header, z, src, settings)
        if result.status != "ok":
            notes.append(f"astrometry: {result.status} ({result.reason})")
        else:
            try:
                t["zero point"], _ = best_of(repeat, _zeropoint, cat, reference, info, profile,
                                             frame, settings)
            except Exception as exc:  # being finished elsewhere: report, carry on
                notes.append(f"zero point skipped: {type(exc).__name__}: {exc}")
    except Exception as exc:  # being finished elsewhere: report, carry on
        notes.append(f"astrometry skipped: {type(exc).__name__}: {exc}")
    path = workdir / "product.fits"
    prim = primary_header(header)
    shdr = sci_header(frame)
    t["product write"], _ = best_of(repeat, write_product, path, frame, primary=prim,
                                    sci_hdr=shdr, cat=cat)
    del fsky
    return t, {"info": info, "s": s, "z": z, "crres": crres, "raw": raw, "header": header,
               "masters": masters, "bpm": bpm, "frame": frame, "profile": profile,
               "sources": src}


def _pattern_as_master(pattern):
    import numpy as np

    from photowatch.core.frame import MasterImage

    data = np.where(pattern.valid, pattern.data, np.float32(1)).astype(np.float32)
    return MasterImage("sky", data, np.zeros_like(data), label="self", version=1)


def _astrometry(night, info, profile, header, frame, src, settings):
    from photowatch.io.catalogs import LocalCatalog, field_cone
    from photowatch.stages.astrometry import (
        apply_astrometry,
        initial_wcs,
        radec_for,
        solve_astrometry,
    )

    s = settings.stages.astrometry
    shape = frame.sci.shape
    wcs0 = initial_wcs(info, profile, shape, header=header)
    band = profile.band_for(info.filter)
    ra, dec, radius = field_cone(wcs0, shape, margin=settings.catalog.radius_margin,
                                 extra_arcsec=s.max_pointing_error_arcsec)
    reference = LocalCatalog(night.catalog_path).query(ra, dec, radius, bands=[band])
    reference["mag"] = reference[band]
    result = solve_astrometry(src.table, shape=shape, wcs_guess=wcs0, reference=reference,
                              settings=s)
    out = apply_astrometry(frame, result, reference_name="catalog.ecsv")
    cat = radec_for(src.table, result.wcs if result.wcs is not None else wcs0)
    return out, cat, result, reference


def _zeropoint(cat, reference, info, profile, frame, settings):
    from photowatch.stages.zeropoint import calibrate_zeropoint

    band = profile.band_for(info.filter)
    return calibrate_zeropoint(cat, reference, band=band, shape=frame.sci.shape,
                               settings=settings.stages.zeropoint)


def astroscrappy_alone(s, settings, repeat: int) -> float:
    """``astroscrappy.detect_cosmics(niter=2)`` with the stage's inputs (old defaults)."""
    import astroscrappy
    import numpy as np

    from photowatch.stages.cosmics import _EXCLUDE

    rn = float(s.header.get("RDNOISE", 5.0))
    inmask = (s.mask & _EXCLUDE) != 0
    invar = np.maximum(s.var, np.float32(rn * rn))
    seconds, _ = best_of(repeat, astroscrappy.detect_cosmics, s.sci, inmask=inmask, invar=invar,
                         sigclip=4.5, sigfrac=0.3, objlim=5.0, gain=1.0, readnoise=rn,
                         satlevel=1e30, niter=2)
    return seconds


def profile_stages(ctx, settings, top: int) -> str:
    """pyinstrument profile of one pass through the non-cosmic-ray stages."""
    from pyinstrument import Profiler

    from photowatch.stages.chain import pattern_for_sky
    from photowatch.stages.flatten import flatten
    from photowatch.stages.prepare import prepare
    from photowatch.stages.skysub import subtract_sky
    from photowatch.stages.sources import extract_sources

    st = settings.stages
    prof = Profiler(interval=0.002)
    prof.start()
    p = prepare(ctx["raw"], ctx["header"], ctx["info"], bias=ctx["masters"]["bias"],
                dark=ctx["masters"]["dark"], bpm=ctx["bpm"], settings=st.prepare,
                calibration=settings.calibration)
    f = flatten(p, flat=ctx["masters"]["flat"], settings=st.flatten)
    pattern = pattern_for_sky(f, settings)
    s, _ = subtract_sky(f, settings=st.skysub, sources=pattern.sources)
    extract_sources(ctx["z"], settings=st.sources,
                    pixel_scale_arcsec=ctx["info"].pixel_scale_arcsec)
    prof.stop()
    return prof.output_text(unicode=False, color=False, show_all=False)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python "
            f"{platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="best of N per stage")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS etc. (default: leave the environment alone)")
    parser.add_argument("--out", type=Path, default=None, help="simulated night (kept)")
    parser.add_argument("--profile", action="store_true", help="profile the non-CR stages")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from photowatch.core.config import Settings

    out = args.out or Path(tempfile.gettempdir()) / f"photowatch-bench-{args.size}"
    night = simulated_night(out, args.size)
    sf = night.objects()[0]
    settings = Settings()
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        times, ctx = run_chain(night, sf, settings, args.repeat, Path(tmp), notes)
    alone = astroscrappy_alone(ctx["s"], settings, args.repeat)

    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"# {command}")
    print(f"# {machine()}")
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; "
          f"frame {args.size}x{args.size}; best of {args.repeat}")
    c = settings.stages.cosmics
    print(f"# cosmics settings: niter={c.niter} sigclip={c.sigclip} objlim={c.objlim} "
          f"grow_sigma={c.grow_sigma} tiles={c.tiles}; {ctx['crres']}")
    width = max(len(k) for k in times) + 2
    print(f"{'stage':<{width}} {'seconds':>8}")
    for name, sec in times.items():
        print(f"{name:<{width}} {sec:8.3f}")
    others = sum(v for k, v in times.items() if k != "cosmics")
    print(f"{'all but cosmics':<{width}} {others:8.3f}")
    print(f"{'whole chain':<{width}} {sum(times.values()):8.3f}")
    print(f"{'astroscrappy niter=2':<{width}} {alone:8.3f}")
    print(f"ratio (all but cosmics) / astroscrappy alone = {others / alone:.2f}")
    print(f"ratio (whole chain, cosmics stage incl.) / astroscrappy alone = "
          f"{sum(times.values()) / alone:.2f}")
    for note in notes:
        print(f"note: {note}")
    if args.profile:
        print(profile_stages(ctx, settings, args.top))


if __name__ == "__main__":
    main()
