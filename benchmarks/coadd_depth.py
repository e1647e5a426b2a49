"""Does a final coadd reach the depth its members predict? Simulated deep nights (six
frames, 2x2 binning, 256 px: ``tests/test_night.py``'s ``deep_night`` with other seeds),
reduced and finalized, then coadds of the first 1, 2, 4 and 6 members built as that
test builds them; per coadd the noise of 4-px aperture sums over the noise its members
predict (SKYNOISE x FLXSCALE, inverse-variance combined), and per night the ratios to the
single frame's:

- ``random``: apertures anywhere the centre is covered by all members, NaN summed as 0
  (the test's measurement until 2026-12-07);
- ``noise``: apertures of noise alone (:func:`test_night.noise_apertures`: every pixel
  valid, no star of the truth near), the measurement the test makes now.

    python benchmarks/coadd_depth.py /tmp/depth --seeds 21 22 23 24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def night(root: Path, seed: int):
    from photowatch.core.config import Settings
    from photowatch.run.batch import reduce_directory
    from photowatch.run.finalize import finalize
    from photowatch.sim.night import simulate_night

    sim = simulate_night(root / "sim", size=512, binning=2, filters=("SDSS-R",), seed=seed,
                         n_science=6, overwrite=True)  # the same bytes for a seed
    if not (root / "out" / "state.sqlite").exists():
        settings = Settings().with_overrides(paths={"output_dir": str(root / "out")})
        assert reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                                progress=False).ok
        assert finalize(settings).ok
    return sim


def ratios(root: Path, sim) -> dict[str, np.ndarray]:
    from test_night import coadd_depths, noise_apertures

    def random(sci, ncov, n, wcs, seed):
        ys, xs = np.nonzero(ncov[8:-8, 8:-8] == n)
        pick = np.random.default_rng(seed).choice(ys.size, 12000, replace=False)
        return xs[pick] + 8.0, ys[pick] + 8.0

    def noise(sci, ncov, n, wcs, seed):
        return noise_apertures(sci, ncov, n, wcs, sim.stars, seed=seed)

    depth = coadd_depths(root / "out", root, {"random": random, "noise": noise})
    return {k: v / v[0] for k, v in depth.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23, 24])
    args = ap.parse_args()
    for seed in args.seeds:
        root = args.work / f"seed{seed}"
        sim = night(root, seed)
        r = ratios(root, sim)
        print(f"seed {seed}: coadds of 1, 2, 4, 6 over the single frame: "
              f"random {np.round(r['random'], 3).tolist()}, noise {np.round(r['noise'], 3).tolist()}")


if __name__ == "__main__":
    main()
