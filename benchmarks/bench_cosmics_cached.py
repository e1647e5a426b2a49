"""The cosmic-ray stage alone on frames cached from real CLI runs (issue 17): try a change
of ``photowatch/stages/cosmics.py`` on dozens of nights in minutes, scored as
``bench_cosmics_cli.py`` scores (MASK bit 4 against ``truth/crmask`` alone).

``cache`` simulates nights (the simulator's defaults unless ``--sim`` says otherwise),
runs ``photowatch reduce`` in-process and keeps every frame handed to the cosmics stage,
with its truth mask and CR charge map, as ``CACHE/nSIZE_SEED/f_<raw stem>.pkl``.
``score`` runs ``flag_cosmics`` on them, with module constants overridden by ``--set``
(also where one of its functions names that constant as a keyword default: printed),
and prints per night: frames, true pixels, completeness (truth outside MASK bits 1, 2, 8
and 16), flags, far (the share of them more than a pixel from a truth pixel), pixels
flagged in every frame; then the nights that meet the goal (>= 95 %, <= 5 %, none in every
frame) and the pooled scores, as ``bench_cosmics_cli.py`` counts them (its ``Tally``).

Usage::

    .venv/bin/python benchmarks/bench_cosmics_cached.py cache /tmp/cc/def 512:401-410 1024:401-404
    .venv/bin/python benchmarks/bench_cosmics_cached.py cache /tmp/cc/c300 512:1-12 --sim exptime_s=300
    .venv/bin/python benchmarks/bench_cosmics_cached.py score /tmp/cc/def
    .venv/bin/python benchmarks/bench_cosmics_cached.py score /tmp/cc/def --set _NOISE_EVENTS=0.05
    .venv/bin/python benchmarks/bench_cosmics_cached.py score /tmp/cc/def --why
    .venv/bin/python benchmarks/bench_cosmics_cached.py score /tmp/cc/def --setting min_peak_sigma=5.0
    .venv/bin/python benchmarks/bench_cosmics_cached.py bound /tmp/cc/def

``score --why`` sorts each night's missed true pixels by where they lie: ``weak`` (a hit on
the sky whose pixels all read below ``--peak`` sigma: the noise hides it), ``defect`` (within
a pixel of a BAD, SATURATED, NODATA or LOWFLAT pixel: the ring no event may start in),
``source`` (a star or galaxy stands 3 sigma under it) and ``sky`` (the rest). ``bound``
asks what an ideal detector would score: one that finds a hit whole whenever one of its
pixels reads ``--peak`` sigma of the local noise or more (its charge plus a draw of unit
noise), on stars and beside defects alike, with perfect growth and no false flag; per
night the share of 400 noise draws that reach 95 %, and the expected number of nights
that meet it. The charge map's unit is the sky noise of the raw frame; the local noise
is the frame's variance plane.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
from bench_cosmics_cli import EXCLUDED, RING, Tally, met, nights, summary


def _keeper(d: Path, night, stage):
    """A stand-in for the cosmics stage that pickles its input to ``d`` and runs it."""
    from astropy.io import fits
    from astropy.time import Time

    objects = [f for f in night.frames if f.crmask_path]

    def keep(frame, settings, **kw):
        # the frame's raw file by its start time (the header keeps no file name)
        when = Time(frame.header["DATE-OBS"]).datetime
        sf = min(objects, key=lambda o: abs(
            (o.obs_time.replace(tzinfo=None) - when).total_seconds()))
        stem = Path(sf.raw_name).stem
        charge = night.truth_dir / f"crcharge_{stem}.fits"
        with open(d / f"f_{stem}.pkl", "wb") as fh:
            pickle.dump(dict(frame=frame, settings=settings, raw=sf.raw_name,
                             crm=fits.getdata(sf.crmask_path) != 0,
                             charge=fits.getdata(charge).astype(np.float32)
                             if charge.exists() else None), fh, protocol=5)
        return stage(frame, settings=settings, **kw)

    return keep


def cache(root: Path, specs: list[str], sim: dict) -> None:
    import photowatch.stages.chain as chain
    from photowatch.cli import main as cli
    from photowatch.sim.night import simulate_night

    stage = chain.flag_cosmics
    for size, seed in nights(specs):
        d = root / f"n{size}_{seed}"
        if (d / "done").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as t:
            night = simulate_night(Path(t) / "night", size=size, seed=seed,
                                   **{"write_crcharge": True, **sim})
            chain.flag_cosmics = _keeper(d, night, stage)
            try:
                rc = cli(["reduce", str(night.raw_dir), "--out", str(Path(t) / "out"),
                          "--catalog", str(Path(t) / "night" / "catalog.ecsv")])
            finally:
                chain.flag_cosmics = stage
        (d / "done").write_text(f"{rc}\n")
        print(f"{d}: reduce rc {rc}, {len(list(d.glob('f_*.pkl')))} frames", flush=True)


def _bound_defaults(module) -> dict[str, list[tuple[str, str]]]:
    """{constant name: [(function, keyword)]} for the module's top-level functions whose
    keyword-only defaults are written as a bare name (``peak: float = _BLOB_PEAK``)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef):
            for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
                if isinstance(default, ast.Name):
                    out.setdefault(default.id, []).append((node.name, arg.arg))
    return out


def _local_charge(c) -> tuple[np.ndarray, np.ndarray]:
    """(charge, clean) of a cached frame in units of its local noise: the hit's charge
    and the frame without it (the charge map is in units of the raw sky noise)."""
    fr = c["frame"]
    sig = np.sqrt(np.maximum(fr.var, 1.0))
    sky = np.sqrt(np.median(fr.var))
    charge = c["charge"] * sky if c["charge"] is not None else np.zeros_like(fr.sci)
    return charge / sig, (fr.sci - charge) / sig


def _why(c, flagged: np.ndarray, peak: float) -> dict[str, int]:
    """The missed true pixels of a frame by where they lie (see the module's notes)."""
    from scipy import ndimage

    fr = c["frame"]
    excluded = (fr.mask & EXCLUDED) != 0
    truth = c["crm"] & ~excluded
    missed = truth & ~flagged
    out = dict(weak=0, defect=0, source=0, sky=0)
    if not missed.any():
        return out
    charge, clean = _local_charge(c)
    read = charge + clean  # the frame in units of its local noise
    ring = ndimage.binary_dilation(excluded, structure=RING)
    lab, n = ndimage.label(c["crm"], structure=RING)
    idx = np.arange(1, n + 1)
    top = np.zeros(n + 1)
    top[1:] = ndimage.maximum(np.where(truth, read, -np.inf), lab, idx)
    under = np.zeros(n + 1)
    under[1:] = ndimage.maximum(np.where(truth, clean, -np.inf), lab, idx)
    for kind, sel in (("defect", ring), ("source", clean > 3.0),
                      ("weak", (top[lab] < peak) & (under[lab] < 3.0))):
        hit = missed & sel
        out[kind] += int(hit.sum())
        missed &= ~hit
    out["sky"] = int(missed.sum())
    return out


def bound(root: Path, peak: float, draws: int = 400) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    expected, nights_ = 0.0, 0
    for d in sorted(p for p in root.iterdir() if (p / "done").exists()):
        sizes, charges = [], []
        for pk in sorted(d.glob("f_*.pkl")):
            with open(pk, "rb") as fh:
                c = pickle.load(fh)
            good = (c["frame"].mask & EXCLUDED) == 0
            charge, _ = _local_charge(c)
            lab, _ = ndimage.label(c["crm"], structure=RING)
            for i, sl in enumerate(ndimage.find_objects(lab), 1):
                m = (lab[sl] == i) & good[sl]
                if m.any():
                    sizes.append(int(m.sum()))
                    charges.append(charge[sl][m])
        true_px = sum(sizes)
        found = np.zeros(draws)
        for k, ch in zip(sizes, charges):
            reads = ch[None, :] + rng.standard_normal((draws, ch.size))
            found += k * (reads.max(axis=1) >= peak)
        p = float((found >= 0.95 * max(true_px, 1)).mean())
        expected += p
        nights_ += 1
        print(f"{d.name:>12s} {true_px:7d} ideal {100 * found.mean() / max(true_px, 1):6.2f}% "
              f"P(>= 95 %) {p:.2f}", flush=True)
    print(f"bound: an ideal detector at {peak:g} sigma meets 95 % on {expected:.1f} of "
          f"{nights_} nights (expected over noise draws)")


def score(root: Path, overrides: list[str], why: bool = False, peak: float = 5.3,
          settings: list[str] = ()) -> None:
    import photowatch.stages.cosmics as cm

    bound = _bound_defaults(cm)
    for item in overrides:
        name, value = item.split("=", 1)
        if not hasattr(cm, name):
            raise SystemExit(f"photowatch.stages.cosmics has no {name}")
        value = ast.literal_eval(value)
        setattr(cm, name, value)
        # a constant bound as a keyword default of the module's functions (faint_events'
        # peak=_BLOB_PEAK) is read there at definition time: change it too, where the
        # source names it (not by value: equal literals of a module are one object)
        for fname, arg in bound.get(name, ()):
            inspect.unwrap(getattr(cm, fname)).__kwdefaults__[arg] = value
            print(f"{name}: also {fname}({arg}=...)")
    update = {k: ast.literal_eval(v) for k, v in (x.split("=", 1) for x in settings)}
    scores = []
    whys = dict(weak=0, defect=0, source=0, sky=0)
    for d in sorted(p for p in root.iterdir() if (p / "done").exists()):
        tally = Tally()
        night_why = dict.fromkeys(whys, 0)
        for pk in sorted(d.glob("f_*.pkl")):
            with open(pk, "rb") as fh:
                c = pickle.load(fh)
            cfg = c["settings"].model_copy(update=update) if update else c["settings"]
            z, _ = cm.flag_cosmics(c["frame"], settings=cfg)
            tally.add((z.mask & 4) != 0, c["frame"].mask, c["crm"])
            if why:
                for k, v in _why(c, (z.mask & 4) != 0, peak).items():
                    night_why[k] += v
        s = tally.scores()
        scores.append(s)
        text = ("  missed: " + ", ".join(f"{k} {v}" for k, v in night_why.items())) if why else ""
        print(f"{d.name:>12s} {s['n']:3d} {s['true_px']:7d} {100 * s['compl']:6.2f}% "
              f"{s['flagged']:7d} {100 * s['far']:5.2f}% {s['every']:3d}"
              f"{'' if met(s) else '  goal missed'}{text}", flush=True)
        for k, v in night_why.items():
            whys[k] += v
    if scores:
        print(summary("score", scores))
        if why:
            print("missed true pixels: " + ", ".join(f"{k} {v}" for k, v in whys.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="simulate nights, reduce them, keep the stage's input")
    c.add_argument("root", type=Path)
    c.add_argument("nights", nargs="+", help="SIZE:SEED or SIZE:FIRST-LAST")
    c.add_argument("--sim", action="append", default=[],
                   help="simulate_night keyword=value (python literal)")
    s = sub.add_parser("score", help="run the stage on the cached frames")
    s.add_argument("root", type=Path)
    s.add_argument("--set", action="append", default=[], dest="overrides",
                   help="NAME=VALUE: a module constant of photowatch.stages.cosmics")
    s.add_argument("--setting", action="append", default=[], dest="settings",
                   help="NAME=VALUE: a field of the [stages.cosmics] settings (min_peak_sigma=5.0)")
    s.add_argument("--why", action="store_true", help="sort each night's missed pixels")
    s.add_argument("--peak", type=float, default=5.3,
                   help="sigma below which a hit on the sky is 'weak' (min_peak_sigma)")
    b = sub.add_parser("bound", help="what an ideal detector would score on the cache")
    b.add_argument("root", type=Path)
    b.add_argument("--peak", type=float, default=5.3, help="its threshold, local sigma")
    args = ap.parse_args()
    if args.cmd == "cache":
        cache(args.root, args.nights,
              {k: ast.literal_eval(v) for k, v in (x.split("=", 1) for x in args.sim)})
    elif args.cmd == "bound":
        bound(args.root, args.peak)
    else:
        score(args.root, args.overrides, why=args.why, peak=args.peak, settings=args.settings)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
