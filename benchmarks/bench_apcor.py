"""Aperture corrections against the simulator's truth when the PSF's wings change from frame
to frame (issue 17): the Moffat beta drawn per frame in 2.5-4.5 at similar seeing.

Each night (768 px binned 4, 0.48"/px, five 60 s frames, no catalogue) is reduced
in-process as ``photowatch reduce`` does; each frame's APCOR is compared with its true
Moffat correction at APRAD (1 / E(APRAD) for the frame's true FWHM and beta). Prints one
line per frame (beta, true, APCOR, error, APCORSRC) and, per star density, the largest
and the rms error and how many frames borrowed from the night (``night:N``).

Usage::

    .venv/bin/python benchmarks/bench_apcor.py                       # seeds 11-16, 65,000 /deg2
    .venv/bin/python benchmarks/bench_apcor.py --seeds 21-26 --density 15000 65000 200000
    # before: the same with PYTHONPATH pointing at a checkout of an earlier commit
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def true_apcor(fwhm_px: float, beta: float, r_ap: float) -> float:
    from photowatch.stages.sources import moffat_alpha, moffat_encircled

    return float(1.0 / moffat_encircled(r_ap, moffat_alpha(fwhm_px, beta), beta))


def night(seed: int, density: float, root: Path) -> list[tuple]:
    from photowatch.core.config import Settings
    from photowatch.io.products import read_product
    from photowatch.run.batch import reduce_directory
    from photowatch.sim.night import simulate_night
    from photowatch.state.store import Store

    sim = simulate_night(root / "night", size=768, binning=4, filters=("SDSS-Z",), seed=seed,
                         n_bias=3, n_dark=0, n_flat=3, n_science=5, bad_flats=False,
                         catalog=False, star_density=density, psf_beta_range=(2.5, 4.5),
                         write_crmasks=False)
    settings = Settings().with_overrides(paths={"output_dir": str(root / "out")})
    reduce_directory(sim.raw_dir, settings, progress=False)
    truth = {f.raw_name: f for f in sim.objects()}
    rows = []
    for r in Store(root / "out" / "state.sqlite").frames(kind="object", state="reduced"):
        prod = read_product(r["product"])
        f, h = truth[r["raw_name"]], prod.header
        scale = float(np.hypot(h["CD1_1"], h["CD2_1"])) * 3600.0
        true = true_apcor(f.fwhm_arcsec / scale, f.psf_beta, prod.cat.meta["APRAD"])
        rows.append((r["raw_name"], f.psf_beta, true, h["APCOR"], h["APCOR"] / true - 1.0,
                     prod.cat.meta.get("APCORSRC")))
    return rows


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="11-16")
    ap.add_argument("--density", type=float, nargs="+", default=[65000.0])
    args = ap.parse_args()
    for density in args.density:
        errors, borrowed = [], 0
        for seed in seeds(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                for name, beta, true, apcor, err, src in night(seed, density, Path(tmp)):
                    print(f"{density:8.0f} {seed:4d} {name:14s} beta {beta:4.2f} true {true:.4f} "
                          f"APCOR {apcor:.4f} {100 * err:+6.2f} % {src}", flush=True)
                    errors.append(err)
                    borrowed += str(src).startswith("night:")
        e = np.abs(errors)
        print(f"density {density:.0f}: {len(e)} frames, largest {100 * e.max():.2f} %, "
              f"rms {100 * np.sqrt(np.mean(e**2)):.2f} %, borrowed from the night {borrowed}")


if __name__ == "__main__":
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    main()
