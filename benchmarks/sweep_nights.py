"""Nights the project was not built on, through the CLI: a randomised sweep of the simulator.

Each trial draws a night (size, binning, exposure, star density, pointing
error, dither, rotation, flip, PSF variation and beta, thin clouds, filters, seed), runs
``photowatch reduce RAW --out OUT --catalog CAT``, ``photowatch finalize --out OUT`` and
``photowatch status --out OUT --json`` as subprocesses, and checks what an outside check
would: the exit codes, every raw file accounted for in ``status`` (file, type, state,
reason), every good object frame reduced, its WCS within 0.05 px of the truth on a grid,
its ``MAGZP`` within 0.02 mag of the truth (under photowatch's flat normalisation:
:func:`flat_convention_mag`), its ``CAT`` columns, and one final coadd per target and
filter. Prints one line per trial and the problems found; exit status 1 when
any trial had one.

Usage::

    .venv/bin/python benchmarks/sweep_nights.py --trials 10 --seed 1
    .venv/bin/python benchmarks/sweep_nights.py --trials 4 --seed 7 --keep /tmp/sweep
    .venv/bin/python benchmarks/sweep_nights.py --trials 6 --seed 1 --config off.toml  # A/B
    .venv/bin/python benchmarks/sweep_nights.py --rescore /tmp/sweep/trial7_*
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def draw(rng) -> dict:
    """One night's simulator arguments."""
    size = int(rng.choice([384, 512, 640, 768, 1024]))
    binning = int(rng.choice([1, 2, 2, 4]))
    return dict(
        size=size, binning=binning,
        filters=tuple(rng.choice(["SDSS-G", "SDSS-R", "SDSS-I", "SDSS-Z"],
                                 size=int(rng.integers(1, 3)), replace=False).tolist()),
        exptime_s=float(rng.choice([10.0, 30.0, 60.0, 120.0, 300.0])),
        star_density=float(rng.choice([4000.0, 15000.0, 65000.0, 200000.0])),
        pointing_error_arcsec=float(rng.uniform(5, 60)),
        dither_arcsec=float(rng.uniform(10, 60)),
        rotation_deg=float(rng.uniform(-2, 2)),
        flip=bool(rng.random() < 0.3),
        psf_variation=float(rng.choice([0.0, 0.1, 0.3])),
        psf_beta_range=(2.5, 4.5) if rng.random() < 0.5 else None,
        cloud_variation_mag=float(rng.choice([0.0, 0.0, 0.2])),
        fwhm_arcsec=(float(rng.uniform(0.7, 1.2)), float(rng.uniform(1.3, 2.0))),
        n_science=int(rng.integers(3, 6)),
        n_bias=3, n_dark=int(rng.choice([0, 2])), n_flat=int(rng.choice([3, 5])),
        seed=int(rng.integers(1, 100_000)),
    )


CONFIG: list[str] = []  # ``--config FILE`` for every command, when given


def cli(cmd, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "photowatch", cmd, *CONFIG, *args], cwd=cwd,
                          capture_output=True, text=True)


def flat_convention_mag(sim, filt: str) -> float:
    """The zero point the truth implies under photowatch's flat normalisation: the master
    flat is 1 at the median of its central half, the simulator's true flat has a mean of 1
    over the frame, so a flat-fielded star holds median/mean times the truth's electrons
    (+0.008 to +0.019 mag on the sweep's nights: a convention, not an error)."""
    from photowatch.calib.combine import robust_level  # the master flat's own normalisation

    f = sim.true_flat(filt).astype(np.float64)
    return float(2.5 * np.log10(robust_level(f)[0] / f.mean()))


def check(night: dict, work: Path) -> tuple[list[str], dict]:
    """Simulate ``night`` in ``work``, run the three commands, and score (:func:`score`)."""
    from photowatch.sim.night import simulate_night

    t0 = time.perf_counter()
    sim = simulate_night(work / "sim", write_models=False, write_crmasks=False, **night)
    out = work / "out"
    problems: list[str] = []
    r = cli("reduce", str(sim.raw_dir), "--out", str(out), "--catalog", str(sim.catalog_path),
            cwd=work)
    if r.returncode != 0:
        problems.append(f"reduce rc {r.returncode}: {r.stderr.strip().splitlines()[-3:]}")
    f = cli("finalize", "--out", str(out), cwd=work)
    if f.returncode != 0:
        problems.append(f"finalize rc {f.returncode}: {f.stderr.strip().splitlines()[-3:]}")
    more, figures = score(work)
    return problems + more, {"s": round(time.perf_counter() - t0, 1), **figures}


def score(work: Path) -> tuple[list[str], dict]:
    """Check a trial folder's products (``work/out``) against its truth (``work/sim``)."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from shared_data import wcs_grid_rms_px

    from photowatch.sim.night import SimNight

    sim = SimNight.load(work / "sim")
    out = work / "out"
    problems: list[str] = []
    s = cli("status", "--out", str(out), "--json", cwd=work)
    status = json.loads(s.stdout) if s.returncode == 0 else {}
    frames = {Path(row["file"]).name: row for row in status.get("frames", [])}
    for fr in sim.frames:
        if fr.raw_name not in frames:
            problems.append(f"{fr.raw_name}: not in status")
    products = {fits.getval(p, "ORIGFILE", extname="SCI"): p
                for p in (out / "reduced").rglob("*.fits")}
    convention = {filt: flat_convention_mag(sim, filt)
                  for filt in {fr.filter for fr in sim.objects()}}
    rms, dzp, dzp_raw = [], [], []
    for fr in sim.objects(good_only=True):
        row = frames.get(fr.raw_name)
        if not row:
            continue
        if row["state"] != "reduced":
            problems.append(f"{fr.raw_name}: {row['state']} ({row.get('reason')})")
            continue
        prod = products.get(fr.raw_name)
        if not prod:
            problems.append(f"{fr.raw_name}: no product")
            continue
        with fits.open(prod) as h:
            hdr = h["SCI"].header
            cat = h["CAT"].data
            missing = {"x", "y", "ra", "dec", "mag", "magerr"} - set(cat.columns.names)
            if missing:
                problems.append(f"{fr.raw_name}: CAT lacks {sorted(missing)}")
            if hdr.get("ASTSTAT") != "ok":
                problems.append(f"{fr.raw_name}: ASTSTAT {hdr.get('ASTSTAT')} {hdr.get('ASTREASN', '')}")
                continue
            e = wcs_grid_rms_px(WCS(hdr), fr.wcs(), h["SCI"].data.shape)
            rms.append(e)
            if e > 0.05:
                problems.append(f"{fr.raw_name}: WCS {e:.3f} px from truth")
            if "MAGZP" in hdr and fr.zp_true is not None:
                dzp_raw.append(hdr["MAGZP"] - fr.zp_true)
                d = dzp_raw[-1] - convention[fr.filter]
                dzp.append(d)
                if abs(d) > 0.02:
                    problems.append(f"{fr.raw_name}: MAGZP off by {d:+.3f} "
                                    f"(flat convention {convention[fr.filter]:+.3f} removed)")
            else:
                problems.append(f"{fr.raw_name}: no MAGZP")
    coadds = [c for c in status.get("coadds", []) if str(c.get("stacktype", "")).lower() == "final"]
    for filt in {fr.filter for fr in sim.objects(good_only=True)}:
        if not any(filt.split("-")[-1] in Path(c["path"]).name for c in coadds):
            problems.append(f"no final coadd for {filt}: {[c['path'] for c in coadds]}")

    def r4(v):
        return round(float(v), 4)

    figures = dict(rms_max=r4(max(rms, default=float("nan"))),
                   dzp_mean=r4(np.mean(dzp)) if dzp else None,
                   dzp_max=r4(np.max(np.abs(dzp))) if dzp else None,
                   dzp_raw_mean=r4(np.mean(dzp_raw)) if dzp_raw else None,
                   counts=status.get("counts"))
    return problems, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="keep each trial's folder here")
    ap.add_argument("--config", type=Path, help="a config file for every command (A/B runs)")
    ap.add_argument("--rescore", type=Path, nargs="+", metavar="TRIAL",
                    help="score kept trial folders again (no simulation, no reduction)")
    args = ap.parse_args(argv)
    if args.config:
        CONFIG[:] = ["--config", str(args.config.resolve())]
    if args.rescore:
        for work in args.rescore:
            problems, fig = score(work)
            print(f"{work}: {'OK' if not problems else 'PROBLEMS'} {fig}", flush=True)
            for p in problems:
                print(f"  - {p}", flush=True)
        return 0
    rng = np.random.default_rng(args.seed)
    bad = 0
    for i in range(args.trials):
        night = draw(rng)
        base = args.keep or Path(tempfile.mkdtemp(prefix="sweep"))
        work = base / f"trial{args.seed}_{i}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            problems, fig = check(night, work)
        except Exception as exc:  # a crash of the check itself is a finding too
            problems, fig = [f"{type(exc).__name__}: {exc}"], {}
        bad += bool(problems)
        print(f"trial {i}: {json.dumps(night)}", flush=True)
        print(f"  {'OK' if not problems else 'PROBLEMS'} {fig}", flush=True)
        for p in problems:
            print(f"  - {p}", flush=True)
        if not args.keep:
            import shutil
            shutil.rmtree(base, ignore_errors=True)
    print(f"sweep: {args.trials - bad} of {args.trials} trials clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
