"""Seconds to write a PNG preview (``photowatch.io.previews.save_png``) of a frame or coadd.

    python benchmarks/bench_previews.py [--sizes 512 2048 4096] [--repeat 5]

Each size: a float32 image of Gaussian noise (the worst case for the PNG encoder) with
a few hundred bright points, written with and without a title band, fsync off; prints
the median of ``--repeat`` writes and the file size. The test suite checks what the
preview is (tests/test_quicklook.py); what it costs is measured here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from photowatch.io.previews import save_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        save_png(np.ones((8, 8)), Path(d) / "warm.png", title="x", fsync=False)  # imports
        for n in args.sizes:
            img = rng.normal(0, 1, (n, n)).astype(np.float32)
            ys, xs = rng.integers(0, n, (2, 300))
            img[ys, xs] += 500
            for title in (None, "coadd_TARGET_R"):
                path = Path(d) / f"p{n}.png"
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    save_png(img, path, title=title, fsync=False)
                    times.append(time.perf_counter() - t0)
                print(f"{n}x{n} {'title' if title else 'plain'}: "
                      f"{statistics.median(times) * 1e3:.0f} ms, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
