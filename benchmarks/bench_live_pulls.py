"""Flux-pull widths by true S/N of forced photometry, from nights kept by
``bench_live.py --accuracy --keep DIR`` (issue 21: where the errors are too large or small).

    .venv/bin/python benchmarks/bench_live_pulls.py DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import collect  # noqa: E402  (the same points as the accuracy summary)


def main(argv: list[str] | None = None) -> None:
    from photowatch.sim.night import SimNight

    base = Path((argv or sys.argv[1:])[0])
    rows = []
    for d in sorted(base.glob("seed*")):
        rows += collect(d, SimNight.load(d / "night"))[0]
    f = np.array([r["flux"] for r in rows], float)
    fe = np.array([r["fluxerr"] for r in rows], float)
    ft = np.array([r["flux_true"] for r in rows], float)
    names = np.array([r["name"] for r in rows])
    snr, pull = ft / fe, (f - ft) / fe
    for lo, hi in [(0, 5), (5, 10), (10, 20), (20, 50), (50, np.inf)]:
        k = (snr >= lo) & (snr < hi)
        robust = 1.4826 * np.median(np.abs(pull[k] - np.median(pull[k])))
        print(f"true S/N {lo}-{hi}: n {k.sum()}, width {np.std(pull[k]):.3f}, "
              f"robust {robust:.3f}, mean {np.mean(pull[k]):+.3f}")
    ag = names == "afterglow"
    print(f"afterglow: n {ag.sum()}, width {np.std(pull[ag]):.3f}; "
          f"fakes: n {(~ag).sum()}, width {np.std(pull[~ag]):.3f}")


if __name__ == "__main__":
    main()
