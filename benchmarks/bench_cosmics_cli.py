"""Cosmic-ray masks the way an outside check sees them (issue 17): simulate a night with the
simulator's defaults (60 s, 2x2, bias/dark/flat frames, a bad column and hot pixels,
bad flats, the truth mask of CR charge above 5 sigma and nothing else), run the CLI
(``photowatch reduce RAWDIR --out OUT --catalog FILE``, then ``finalize --out OUT``), and
score every product's ``MASK`` bit 4 against ``truth/crmask_<ORIGFILE stem>.fits``:

- compl: flagged truth pixels / truth pixels outside MASK bits 1, 2, 8, 16 (a hit on a
  bad column is a bad pixel, not a cosmic ray to find);
- compl all: the same over every truth pixel;
- far: bit-4 pixels farther than one pixel (8-connected) from a truth pixel / bit-4 pixels;
- every: pixels with bit 4 in every product of the night.

Both after ``reduce`` (the quick-look products) and after ``finalize`` (final masters,
products re-reduced). Unlike ``bench_cosmics_defects.py`` nothing here uses truth
masters or the charge map: only what a grader holding the default truth files has.

Usage::

    .venv/bin/python benchmarks/bench_cosmics_cli.py 512:401-404 1024:401-402 2048:401
    .venv/bin/python benchmarks/bench_cosmics_cli.py 4096:401 --no-finalize
    .venv/bin/python benchmarks/bench_cosmics_cli.py 1024:401 --sim exptime_s=300 --sim star_density=2e5
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

RING = np.ones((3, 3), bool)
#: MASK bits BAD, SATURATED, NODATA, LOWFLAT: a true pixel under them is not one to find
EXCLUDED = 1 | 2 | 8 | 16


def nights(specs: list[str]) -> list[tuple[int, int]]:
    """(size, seed) of each ``SIZE:SEED`` or ``SIZE:FIRST-LAST``."""
    out = []
    for a in specs:
        size, seeds = a.split(":")
        first, _, last = seeds.partition("-")
        out += [(int(size), s) for s in range(int(first), int(last or first) + 1)]
    return out


class Tally:
    """A night's counts, frame by frame: ``add(flagged, mask, crm)`` with the bit-4
    pixels, the product's MASK and the truth mask; ``scores()`` as the module says."""

    def __init__(self):
        self.true_px = self.true_all = self.hit = self.hit_all = self.flagged = self.far = 0
        self.count = None
        self.n = 0

    def add(self, flagged, mask, crm) -> None:
        truth = crm & ((mask & EXCLUDED) == 0)
        self.true_px += int(truth.sum())
        self.true_all += int(crm.sum())
        self.hit += int((flagged & truth).sum())
        self.hit_all += int((flagged & crm).sum())
        self.flagged += int(flagged.sum())
        self.far += int((flagged & ~ndimage.binary_dilation(crm, structure=RING)).sum())
        self.count = flagged.astype(np.int32) if self.count is None else self.count + flagged
        self.n += 1

    def scores(self) -> dict:
        return dict(n=self.n, true_px=self.true_px, compl=self.hit / max(self.true_px, 1),
                    compl_all=self.hit_all / max(self.true_all, 1), flagged=self.flagged,
                    far=self.far / max(self.flagged, 1),
                    every=int((self.count == self.n).sum()) if self.n else 0)


def met(s: dict) -> bool:
    """The issue's goal on a night's scores."""
    return s["compl"] >= 0.95 and s["far"] <= 0.05 and s["every"] == 0


def summary(label: str, sel: list[dict]) -> str:
    """Goal met, pooled completeness and far, and the worst night of ``sel`` (scores)."""
    tp = sum(s["true_px"] for s in sel)
    fl = sum(s["flagged"] for s in sel)
    pooled = sum(s["compl"] * s["true_px"] for s in sel) / max(tp, 1)
    pooled_far = sum(s["far"] * s["flagged"] for s in sel) / max(fl, 1)
    return (f"{label}: goal met on {sum(met(s) for s in sel)} of {len(sel)} nights; "
            f"pooled completeness {100 * pooled:.2f} %, far {100 * pooled_far:.2f} %; "
            f"worst {100 * min(s['compl'] for s in sel):.2f} % / "
            f"{100 * max(s['far'] for s in sel):.2f} %")


def score(out: Path, truth_dir: Path) -> dict:
    tally = Tally()
    for path in sorted((out / "reduced").glob("*/*.fits")):
        with fits.open(path) as h:
            orig = h[0].header.get("ORIGFILE") or h["SCI"].header.get("ORIGFILE")
            mask = h["MASK"].data
        crm = fits.getdata(truth_dir / f"crmask_{Path(orig).stem}.fits") != 0
        tally.add((mask & 4) != 0, mask, crm)
    return tally.scores()


def _kept(root: str, size: int, seed: int) -> Path:
    d = Path(root) / f"n{size}_{seed}"
    if d.exists():
        raise SystemExit(f"{d} exists: give another --keep folder")
    d.mkdir(parents=True)
    return d


def run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("nights", nargs="*", default=["512:401-404", "1024:401-402", "2048:401"],
                    help="SIZE:SEED or SIZE:FIRST-LAST")
    ap.add_argument("--sim", action="append", default=[],
                    help="simulate_night keyword=value (python literal), e.g. exptime_s=300")
    ap.add_argument("--no-finalize", action="store_true")
    ap.add_argument("--keep", help="keep each night and its products in KEEP/nSIZE_SEED")
    args = ap.parse_args()
    extra = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.sim)}
    from photowatch.sim.night import simulate_night

    runs = nights(args.nights)
    exe = [sys.executable, "-m", "photowatch"]
    print(f"{'night':>10s} {'step':>8s} {'frames':>6s} {'true px':>8s} {'compl':>7s} "
          f"{'all':>7s} {'flagged':>8s} {'far':>6s} {'every':>5s} {'s':>6s}", flush=True)
    results = []
    for size, seed in runs:
        with (contextlib.nullcontext(_kept(args.keep, size, seed)) if args.keep
              else tempfile.TemporaryDirectory()) as d:
            d = Path(d)
            night = simulate_night(d / "night", size=size, seed=seed, **extra)
            out = d / "out"
            t0 = time.time()
            rc = run(exe + ["reduce", str(night.raw_dir), "--out", str(out), "--catalog",
                            str(d / "night" / "catalog.ecsv")], d / "log")
            rows = [("reduce", rc, time.time() - t0, score(out, night.truth_dir))]
            if not args.no_finalize:
                t0 = time.time()
                rc = run(exe + ["finalize", "--out", str(out)], d / "log")
                rows.append(("finalize", rc, time.time() - t0, score(out, night.truth_dir)))
            for step, rc, secs, s in rows:
                print(f"{size:>5d}:{seed:<4d} {step:>8s} {s['n']:6d} {s['true_px']:8d} "
                      f"{100 * s['compl']:6.2f}% {100 * s['compl_all']:6.2f}% "
                      f"{s['flagged']:8d} {100 * s['far']:5.2f}% {s['every']:5d} {secs:6.0f}"
                      f"{'' if rc == 0 else f'  rc {rc}'}{'' if met(s) else '  goal missed'}",
                      flush=True)
                results.append((step, s))
    for step in ("reduce", "finalize"):
        sel = [s for st, s in results if st == step]
        if sel:
            print(summary(step, sel))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
