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
import json
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
                         n_science=6)
    if not (root / "out" / "state.sqlite").exists():
        settings = Settings().with_overrides(paths={"output_dir": str(root / "out")})
        assert reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path),
                                progress=False).ok
        assert finalize(settings).ok
    return sim


def ratios(root: Path, sim) -> dict[str, np.ndarray]:
    import sep
    from astropy.io import fits
    from astropy.stats import mad_std
    from astropy.wcs import WCS
    from test_night import noise_apertures

    from photowatch.coadd.stack import CoaddGrid, FinalMember, final_coadd
    from photowatch.state.store import Store

    store = Store(root / "out" / "state.sqlite")
    (coadd,) = store.coadds()
    grid = CoaddGrid.from_json(coadd["grid_json"])
    rows = store.frames(kind="object", state="reduced", accepted=1)
    members = [FinalMember(r["name"], r["product"], json.loads(r["qc_json"])["flxscale"],
                           json.loads(r["qc_json"])["skynoise_e"], r["exptime"]) for r in rows]
    out: dict[str, list[float]] = {"random": [], "noise": []}
    for n in (1, 2, 4, len(members)):
        path = final_coadd(members[:n], grid, root / f"c{n}.fits", clip_sigma=3.0,
                           chunk_rows=256, magzp=None)
        with fits.open(path) as h:
            sci, ncov = h["SCI"].data.astype(np.float32), h["NCOV"].data
            wcs = WCS(h["SCI"].header)
        sigma = np.array([m.skynoise * m.flxscale for m in members[:n]])
        predicted = 1.0 / np.sqrt(np.sum(1.0 / sigma**2))
        ys, xs = np.nonzero(ncov[8:-8, 8:-8] == n)
        pick = np.random.default_rng(n).choice(ys.size, 12000, replace=False)
        places = {"random": (xs[pick] + 8.0, ys[pick] + 8.0),
                  "noise": noise_apertures(sci, ncov, n, wcs, sim.stars, seed=n)}
        for kind, (x, y) in places.items():
            v, _, _ = sep.sum_circle(np.ascontiguousarray(np.nan_to_num(sci)), x, y, 4.0)
            for _ in range(5):
                med, sig = np.median(v), mad_std(v)
                v = v[np.abs(v - med) < 3 * sig]
            out[kind].append(np.std(v) / predicted)
    return {k: np.array(v) / v[0] for k, v in out.items()}


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
