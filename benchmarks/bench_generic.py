"""The generic profile on corpus-style nights: accuracy per style, and photon-transfer cost.

    .venv/bin/python benchmarks/bench_generic.py [--size 512] [--binning 4] [--seed 5]
                                                 [--styles maxim,lco,...] [--ptc-size 4096]

One simulated night (tests/corpus_styles.py rewrites its headers in each style) is
reduced with the LMI profile and with the generic profile per style; printed per run:
seconds, zero-point error against the simulator's truth (median and max |MAGZP - zp_true|),
measured gain and read noise (truth 2.89 e-/ADU, 6.0 e-). Then the cost of
``calib.ptc.photon_transfer`` on 4 biases + 4 flats of ``--ptc-size`` pixels square.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--binning", type=int, default=4)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--styles", default="maxim,lco,saao,issue,mef,decam")
    ap.add_argument("--ptc-size", type=int, default=4096)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from corpus_styles import restyle

    from photowatch.calib.ptc import photon_transfer
    from photowatch.core.config import Settings
    from photowatch.io.products import read_product
    from photowatch.run.batch import reduce_directory
    from photowatch.sim.night import simulate_night
    from photowatch.state.store import Store

    root = Path(tempfile.mkdtemp(prefix="bench_generic_"))
    sim = simulate_night(root / "sim", size=args.size, binning=args.binning,
                         filters=("SDSS-R",), seed=args.seed, n_bias=5, n_dark=0, n_flat=6,
                         n_science=4)
    truth = {f.raw_name.split(".")[1]: f for f in sim.frames}
    print("| run | seconds | reduced | median abs ZP err (mag) | max abs ZP err | gain (e-/ADU)"
          " | read noise (e-) |")
    print("|---|---|---|---|---|---|---|")
    for style in ["lmi", *args.styles.split(",")]:
        raw = sim.raw_dir if style == "lmi" else root / f"raw_{style}"
        if style != "lmi":
            restyle(sim.raw_dir, raw, style)
        out = root / f"out_{style}"
        t0 = time.perf_counter()
        reduce_directory(raw, Settings().with_overrides(paths={"output_dir": str(out)}),
                         catalog=str(sim.catalog_path), progress=False)
        dt = time.perf_counter() - t0
        store = Store(out / "state.sqlite")
        errs = [abs(read_product(r["product"]).header["MAGZP"] -
                    truth[r["raw_name"].split(".")[1]].zp_true)
                for r in store.frames(kind="object", state="reduced")]
        ptc = [json.loads(v) for _, v in store.conn.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'ptc|%'")]
        used = "measured" if store.conn.execute(
            "SELECT 1 FROM frames WHERE info_json LIKE '%\"gain_source\": \"measured%'"
        ).fetchone() else "header; measured"
        g = f"{ptc[0]['gain']:.3f} ({used})" if ptc and ptc[0].get("gain") else "header"
        rn = f"{ptc[0]['read_noise_e']:.2f}" if ptc and ptc[0].get("gain") else "header"
        print(f"| {style} | {dt:.1f} | {len(errs)}/{len(sim.objects())} | "
              f"{np.median(errs):.4f} | {max(errs):.4f} | {g} | {rn} |")

    n = args.ptc_size
    rng = np.random.default_rng(1)
    biases = [rng.normal(500, 2, (n, n)).astype(np.float32) for _ in range(4)]
    flats = [("r", lv, (500 + rng.poisson(lv * 2.9, (n, n)) / 2.9).astype(np.float32))
             for lv in (20000, 21000, 30000, 31000)]
    t0 = time.perf_counter()
    result = photon_transfer(biases, flats)
    print(f"\nphoton_transfer on 4 biases + 4 flats of {n}x{n}: "
          f"{time.perf_counter() - t0:.1f} s (gain {result.gain:.3f}, truth 2.9)")


if __name__ == "__main__":
    main()
