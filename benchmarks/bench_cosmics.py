"""Cosmic-ray cleaning against the simulator's truth: completeness, false positives, seconds.

One simulated 4k LMI science frame (4096 x 4096, 2x2 binning, 300 s SDSS-R,
sky ~4300 e-, seeing 0.91" = 3.8 px) with its truth cosmic-ray mask (pixels
whose CR charge exceeds 5 sigma of the background noise) and its noiseless
star image, plus a *twin* night simulated identically but without cosmic rays
(``cr_rate=0``). Both are reduced with truth masters through prepare, flatten,
the master-sky pattern (its source mask) and sky subtraction, i.e. the frame
``photowatch.stages.cosmics.flag_cosmics`` receives in the chain.

Measured for each variant of the settings:

- completeness: flagged true CR pixels / true CR pixels (excluded pixels left out);
- star FP: flagged star pixels / star pixels, star pixels being those where the
  noiseless model exceeds 3 sigma of the sky noise, not excluded, and not within
  1 px of a true CR pixel (real CR charge below the truth threshold spills
  there); on the twin the same without the CR condition;
- sky FP: flagged pixels per million of the twin's star-free, usable pixels;
- seconds of the stage at 4k (``flag_cosmics``, wall time), per OMP_NUM_THREADS.

A few variants also run on three undersampled nights like the tests'
``sim_small`` (512 px at 4x4 binning, 0.48"/px, FWHM 1.9-3.1 px, six 60 s
frames each, seeds 1-3), reduced with the night's master sky.

Tile modes (``Cosmics.tiles``: full, halves, candidates) are run with the same
settings and their masks compared pixel by pixel with the full-frame run.

Usage::

    .venv/bin/python benchmarks/bench_cosmics.py                 # 4096, OMP 1 and 2
    .venv/bin/python benchmarks/bench_cosmics.py --only modes --threads 1,2 --repeat 5
    .venv/bin/python benchmarks/bench_cosmics.py --size 1024 --repeat 1    # quick

Each thread count runs in its own process (OMP_NUM_THREADS must be set before
astroscrappy loads). The nights and the reduced frames are kept in ``--out``
(default ``$TMPDIR/photowatch-bench-cosmics-<size>``) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stages import machine, set_threads, simulated_night, truth_masters  # noqa: E402

#: the settings before this benchmark (photowatch's first defaults)
OLD = dict(sigclip=4.5, sigfrac=0.3, objlim=5.0, niter=2, sepmed=True, fsmode="median",
           grow_sigma=0.0, tiles="full")
#: the settings chosen by this benchmark (photowatch.core.config.Cosmics defaults until issue 17)
CHOSEN = dict(sigclip=4.0, sigfrac=0.3, objlim=4.0, niter=1, sepmed=True, fsmode="median",
              grow_sigma=2.5, grow_passes=3, sharp_sigma=4.0, min_peak_sigma=0.0)
#: the defaults since issue 17: events must reach min_peak_sigma, so lower thresholds
DEFAULT = dict(sigclip=4.0, sigfrac=0.3, objlim=4.0, niter=1, sepmed=True, fsmode="median",
               grow_sigma=2.0, grow_passes=3, sharp_sigma=3.0, min_peak_sigma=5.2)


def variants() -> list[tuple[str, dict]]:
    """(label, settings) of the parameter scan (tiles=full); fwhm=FWHM: the frame's FWHM."""
    la = dict(CHOSEN, grow_sigma=0.0, tiles="full")  # L.A.Cosmic alone, chosen parameters
    chosen = dict(CHOSEN, tiles="full")
    out = [("PhotoPipe 30/0.3/5 n3", dict(OLD, sigclip=30.0, objlim=5.0, niter=3)),
           ("old default 4.5/0.3/5 n2", OLD)]
    out += [(f"LA 4/0.3/4 niter {n}", dict(la, niter=n)) for n in (1, 2, 3, 4)]
    out += [("LA niter 1 sepmed off", dict(la, sepmed=False))]
    out += [(f"LA sigclip {v:g}", dict(la, sigclip=v)) for v in (3.5, 4.5, 5.0)]
    out += [(f"LA objlim {v:g}", dict(la, objlim=v)) for v in (2.0, 3.0, 5.0)]
    out += [(f"LA sigfrac {v:g}", dict(la, sigfrac=v)) for v in (0.15, 0.5)]
    out += [(f"LA convolve FWHM objlim {v:g}", dict(la, fsmode="convolve", objlim=v, fwhm="FWHM"))
            for v in (1.0, 2.0, 5.0)]
    out += [("chosen: LA + grow 2.5 x3", chosen)]
    out += [(f"chosen, grow {g:g} x{n}", dict(chosen, grow_sigma=g, grow_passes=n))
            for g, n in ((3.0, 1), (3.0, 2), (2.0, 3))]
    out += [("chosen, niter 2", dict(chosen, niter=2)),
            ("chosen, objlim 3", dict(chosen, objlim=3.0)),
            ("chosen, objlim 5", dict(chosen, objlim=5.0)),
            ("chosen, sigclip 4.5", dict(chosen, sigclip=4.5)),
            ("old default + grow 2.5 x3", dict(OLD, grow_sigma=2.5, grow_passes=3))]
    return out


def small_variants() -> list[tuple[str, dict]]:
    """The variants also run on the undersampled 4x4-binned nights."""
    chosen = dict(CHOSEN, tiles="candidates")
    return [("old default 4.5/0.3/5 n2", OLD),
            ("LA 4/0.3/4 n1 (no grow)", dict(chosen, grow_sigma=0.0)),
            ("chosen: LA + grow 2.5 x3", chosen),
            ("chosen, objlim 3", dict(chosen, objlim=3.0)),
            ("chosen, objlim 5", dict(chosen, objlim=5.0)),
            ("chosen, sigclip 3.5", dict(chosen, sigclip=3.5))]


def mode_configs() -> list[tuple[str, dict]]:
    return [("default", DEFAULT), ("chosen", CHOSEN), ("old default", OLD)]


# ----------------------------------------------------------------------------- data

def reduce_for_cosmics(night):
    """The sky-subtracted frame of the night's science frame, as the cosmics stage gets it."""
    import numpy as np
    from astropy.io import fits

    from photowatch.calib.bpm import bad_pixel_mask
    from photowatch.calib.combine import robust_level
    from photowatch.core.classify import classify
    from photowatch.core.config import Settings
    from photowatch.core.instruments import load_profile
    from photowatch.io.fits import read_raw
    from photowatch.stages.chain import front, pattern_for_sky
    from photowatch.stages.skysub import subtract_sky

    sf = night.objects()[0]
    profile = load_profile("lmi")
    raw, header = read_raw(sf.path)
    info = classify(header, sf.path.name, profile)
    settings = Settings()
    masters = truth_masters(night, sf.filter)
    bpm = bad_pixel_mask(dark=masters["dark"], flat=masters["flat"],
                         settings=settings.calibration)
    f = front(raw, header, info, masters=masters, bpm=bpm, settings=settings)["f"]
    pattern = pattern_for_sky(f, settings)
    s, sky = subtract_sky(f, settings=settings.stages.skysub, sources=pattern.sources)
    level, _ = robust_level(night.true_flat(sf.filter))
    model = fits.getdata(sf.model_path).astype(np.float32) * np.float32(level)
    crm = (fits.getdata(sf.crmask_path) != 0) if sf.crmask_path else np.zeros(model.shape, bool)
    return dict(sci=s.sci, var=s.var, mask=s.mask, crm=crm, model=model,
                skynoise=np.float64(sky.noise_e), skylevel=np.float64(sky.level_e),
                fwhm_px=np.float64(sf.fwhm_arcsec / info.pixel_scale_arcsec),
                rn=np.float64(info.read_noise_e))


def prepare_data(out: Path, size: int) -> tuple[Path, Path]:
    """Simulate (or reuse) the night and its CR-free twin; cache the reduced frames."""
    import numpy as np

    paths = []
    for name, rate in (("cr", 1.5), ("twin", 0.0)):
        cache = out / f"frame_{name}_{size}.npz"
        if not cache.exists():
            night = simulated_night(out / f"night_{name}", size, cr_rate=rate)
            np.savez(cache, **reduce_for_cosmics(night))
        paths.append(cache)
    return paths[0], paths[1]


def reduce_small_night(out: Path, seed: int) -> dict:
    """A sim_small-like night (512 px, 4x4 binning, 6 x 60 s SDSS-R), each frame reduced with
    the night's master sky (leave one out), as tests/stages/test_science_truth.py does."""
    import numpy as np
    from astropy.io import fits

    from photowatch.calib.bpm import bad_pixel_mask
    from photowatch.calib.combine import robust_level
    from photowatch.core.classify import classify
    from photowatch.core.config import Settings
    from photowatch.core.instruments import load_profile
    from photowatch.io.fits import read_raw
    from photowatch.sim.night import SimNight, simulate_night
    from photowatch.stages.chain import front, pattern_for_sky
    from photowatch.stages.mastersky import SkyAccumulator, apply_master_sky
    from photowatch.stages.skysub import subtract_sky

    if (out / "truth" / "night.json").exists():
        night = SimNight.load(out)
    else:
        night = simulate_night(out, size=512, binning=4, filters=("SDSS-R",), seed=seed,
                               n_bias=5, n_dark=3, n_flat=6, n_science=6)
    settings = Settings()
    profile = load_profile("lmi")
    acc, flat = SkyAccumulator(), []
    for sf in night.objects(good_only=True):
        raw, header = read_raw(sf.path)
        info = classify(header, sf.path.name, profile)
        masters = truth_masters(night, sf.filter)
        bpm = bad_pixel_mask(dark=masters["dark"], flat=masters["flat"],
                             settings=settings.calibration)
        f = front(raw, header, info, masters=masters, bpm=bpm, settings=settings)["f"]
        pattern = pattern_for_sky(f, settings)
        acc.add(sf.raw_name, pattern, (info.ra_deg, info.dec_deg))
        flat.append((sf, info, f, pattern))
    level, _ = robust_level(night.true_flat(flat[0][0].filter))
    res = {}
    for i, (sf, info, f, pattern) in enumerate(flat):
        sky = acc.master(exclude=sf.raw_name, pattern=pattern)
        if sky is not None:
            f = apply_master_sky(f, sky=sky, level=pattern.level)
        s, skyres = subtract_sky(f, settings=settings.stages.skysub, sources=pattern.sources)
        model = fits.getdata(sf.model_path).astype(np.float32) * np.float32(level)
        res.update({f"{i}_sci": s.sci, f"{i}_var": s.var, f"{i}_mask": s.mask,
                    f"{i}_crm": fits.getdata(sf.crmask_path) != 0, f"{i}_model": model,
                    f"{i}_skynoise": np.float64(skyres.noise_e),
                    f"{i}_fwhm_px": np.float64(sf.fwhm_arcsec / info.pixel_scale_arcsec),
                    f"{i}_rn": np.float64(info.read_noise_e)})
    return res


def prepare_small(out: Path, seeds: list[int]) -> list[Path]:
    import numpy as np

    paths = []
    for seed in seeds:
        cache = out / f"small_{seed}.npz"
        if not cache.exists():
            np.savez(cache, **reduce_small_night(out / f"small_night_{seed}", seed))
        paths.append(cache)
    return paths


def load_small(path: Path) -> list[dict]:
    import numpy as np

    d = dict(np.load(path))
    n = len({k.split("_")[0] for k in d})
    return [_prepared({k.split("_", 1)[1]: v for k, v in d.items() if k.startswith(f"{i}_")})
            for i in range(n)]


def load(path: Path) -> dict:
    import numpy as np

    return _prepared(dict(np.load(path)))


def _prepared(d: dict) -> dict:
    import numpy as np
    from astropy.io import fits
    from scipy import ndimage

    from photowatch.core.frame import Frame
    from photowatch.stages.cosmics import _EXCLUDE

    excluded = (d["mask"] & _EXCLUDE) != 0
    hdr = fits.Header()
    hdr["RDNOISE"] = float(d["rn"])
    star = (d["model"] > 3 * float(d["skynoise"])) & ~excluded
    near_cr = ndimage.binary_dilation(d["crm"], iterations=1)
    near8 = ndimage.binary_dilation(d["crm"], structure=np.ones((3, 3), bool))
    return dict(frame=Frame(d["sci"], d["var"], d["mask"], hdr), truth=d["crm"] & ~excluded,
                star=star & ~near_cr, sky=~star & ~excluded & ~near_cr, near_cr8=near8,
                fwhm_px=float(d["fwhm_px"]), skynoise=float(d["skynoise"]))


# ----------------------------------------------------------------------------- measuring

def run_stage(data: dict, spec: dict, repeat: int):
    """(best wall seconds, COSMIC mask, result) of flag_cosmics with ``spec``."""
    import numpy as np

    from photowatch.core.config import Cosmics
    from photowatch.core.frame import Mask
    from photowatch.stages.cosmics import flag_cosmics

    spec = dict(spec)
    fwhm = data["fwhm_px"] if spec.pop("fwhm", None) == "FWHM" else None
    settings = Cosmics(**spec)
    best, z, res = float("inf"), None, None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        z, res = flag_cosmics(data["frame"], settings=settings, fwhm_px=fwhm)
        best = min(best, time.perf_counter() - t0)
    return best, (z.mask & np.uint16(Mask.COSMIC)) != 0, res


def scores(mask, data: dict, twin_mask=None, twin: dict | None = None) -> dict:
    out = {"completeness": float((mask & data["truth"]).sum() / max(1, data["truth"].sum())),
           "star_fp": float((mask & data["star"]).sum() / max(1, data["star"].sum())),
           "flagged": int(mask.sum()),
           # flagged pixels farther than one pixel (8-neighbourhood) from a true CR pixel
           "far": float((mask & ~data["near_cr8"]).sum() / max(1, mask.sum()))}
    if twin_mask is not None:
        out["twin_star_fp"] = float((twin_mask & twin["star"]).sum() / twin["star"].sum())
        out["sky_fp_per_mpx"] = float((twin_mask & twin["sky"]).sum() / twin["sky"].sum() * 1e6)
    return out


def child(args) -> None:
    """Run the variants in this process (OMP threads already set) and print JSON lines."""
    import numpy as np

    data = load(Path(args.cr_npz))
    twin = load(Path(args.twin_npz))
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    if "params" in args.only:
        for label, spec in variants():
            sec, mask, _ = run_stage(data, spec, 1)
            _, tmask, _ = run_stage(twin, spec, 1)
            print(json.dumps({"kind": "params", "label": label, "spec": spec,
                              "threads": threads, "seconds": sec,
                              **scores(mask, data, tmask, twin)}), flush=True)
    if "small" in args.only and args.small_npz:
        nights = [load_small(Path(p)) for p in args.small_npz.split(",")]
        for label, spec in small_variants():
            per_night = []
            for frames in nights:
                true_px = hit = star_px = star_hit = 0
                for one in frames:
                    _, mask, _ = run_stage(one, spec, 1)
                    true_px += int(one["truth"].sum())
                    hit += int((mask & one["truth"]).sum())
                    star_px += int(one["star"].sum())
                    star_hit += int((mask & one["star"]).sum())
                per_night.append((hit, true_px, star_hit, star_px))
            print(json.dumps({"kind": "small", "label": label, "spec": spec,
                              "nights": per_night}), flush=True)
    if "modes" in args.only:
        for name, spec in mode_configs():
            full = None
            for tiles in ("full", "halves", "candidates"):
                sec, mask, res = run_stage(data, dict(spec, tiles=tiles), args.repeat)
                full = mask if full is None else full
                print(json.dumps({"kind": "modes", "label": name, "tiles": tiles,
                                  "ran": res.tiles, "area": res.area_fraction,
                                  "threads": threads, "seconds": sec,
                                  "same_as_full": bool(np.array_equal(mask, full)),
                                  "differ_px": int((mask != full).sum()),
                                  **scores(mask, data)}), flush=True)


def _fmt_params(rows: list[dict]) -> str:
    head = (f"{'variant':34s} {'compl':>6s} {'starFP':>7s} {'twin':>7s} {'skyFP/Mpx':>9s} "
            f"{'flagged':>7s} {'s (OMP ' + rows[0]['threads'] + ')':>10s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['label']:34s} {r['completeness']:6.1%} {r['star_fp']:7.3%} "
                     f"{r['twin_star_fp']:7.3%} {r['sky_fp_per_mpx']:9.0f} {r['flagged']:7d} "
                     f"{r['seconds']:10.2f}")
    return "\n".join(lines)


def _fmt_modes(rows: list[dict]) -> str:
    head = (f"{'settings':12s} {'tiles':16s} {'OMP':>3s} {'area':>5s} {'seconds':>8s} "
            f"{'compl':>6s} {'starFP':>7s} {'far':>6s} {'same mask as full':>17s}")
    lines = [head]
    for r in rows:
        ran = r["tiles"] if r["ran"] == r["tiles"] else f"{r['tiles']}->{r['ran']}"
        lines.append(f"{r['label']:12s} {ran:16s} {r['threads']:>3s} {r['area']:5.2f} "
                     f"{r['seconds']:8.2f} {r['completeness']:6.1%} {r['star_fp']:7.3%} "
                     f"{r.get('far', float('nan')):6.1%} "
                     f"{'yes' if r['same_as_full'] else 'NO (' + str(r['differ_px']) + ' px)':>17s}")
    return "\n".join(lines)


def _fmt_small(rows: list[dict], seeds: list[int]) -> str:
    head = f"{'variant':28s} " + " ".join(f"{'seed ' + str(s) + ' compl/starFP':>24s}"
                                           for s in seeds) + f" {'all':>16s}"
    lines = [head]
    for r in rows:
        cells = [f"{h / t:6.1%} ({h}/{t}) {sh / sp:6.2%}" for h, t, sh, sp in r["nights"]]
        h, t, sh, sp = (sum(x) for x in zip(*r["nights"]))
        lines.append(f"{r['label']:28s} " + " ".join(f"{c:>24s}" for c in cells)
                     + f" {h / t:7.1%} {sh / sp:7.2%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", default="1,2", help="OMP thread counts, e.g. 1,2")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the tile modes")
    parser.add_argument("--only", default="params,small,modes",
                        help="comma list of: params (4k scan), small (4x4 nights), modes (tiles)")
    parser.add_argument("--small-seeds", default="1,2,3",
                        help="seeds of the undersampled 512 px 4x4-binned nights ('' for none)")
    parser.add_argument("--params-threads", type=int, default=None,
                        help="thread count of the parameter scan (default: the first)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cr-npz", help=argparse.SUPPRESS)
    parser.add_argument("--twin-npz", help=argparse.SUPPRESS)
    parser.add_argument("--small-npz", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    out = args.out or Path(tempfile.gettempdir()) / f"photowatch-bench-cosmics-{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    cr_npz, twin_npz = prepare_data(out, args.size)
    seeds = [int(v) for v in args.small_seeds.split(",") if v]
    small = prepare_small(out, seeds) if "small" in args.only and seeds else []
    threads = [int(t) for t in args.threads.split(",") if t]
    params_threads = args.params_threads or threads[0]
    rows: list[dict] = []
    for n in threads:
        only = [k for k in args.only.split(",")
                if k == "modes" or (k in ("params", "small") and n == params_threads)]
        if not only:
            continue
        env = dict(os.environ)
        set_threads(n)
        env.update({k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                        "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")})
        cmd = [sys.executable, __file__, "--child", "--cr-npz", str(cr_npz), "--twin-npz",
               str(twin_npz), "--only", ",".join(only), "--repeat", str(args.repeat),
               "--small-npz", ",".join(str(p) for p in small)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"child with OMP_NUM_THREADS={n} failed ({proc.returncode})")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    print(f"# {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"# {machine()}")
    import numpy as np

    d = np.load(cr_npz)
    print(f"# frame {args.size}x{args.size}: {int(d['crm'].sum())} true CR pixels, sky noise "
          f"{float(d['skynoise']):.1f} e-, FWHM {float(d['fwhm_px']):.2f} px; star pixels: "
          f"model > 3 sigma of the sky noise")
    params = [r for r in rows if r["kind"] == "params"]
    if params:
        print("\n## parameters (flag_cosmics, tiles=full; sigclip/sigfrac/objlim; "
              "seconds: one run)")
        print(_fmt_params(params))
    small_rows = [r for r in rows if r["kind"] == "small"]
    if small_rows:
        print("\n## undersampled: 512 px, 4x4 binning (0.48\"/px, FWHM 1.9-3.1 px), 6 x 60 s "
              "per night, master sky applied (completeness (hits/true px), star FP)")
        print(_fmt_small(small_rows, seeds))
    modes = [r for r in rows if r["kind"] == "modes"]
    if modes:
        print(f"\n## tile modes (best of {args.repeat})")
        print(_fmt_modes(modes))


if __name__ == "__main__":
    main()
