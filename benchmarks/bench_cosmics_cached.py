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
from bench_cosmics_cli import Tally, met, nights, summary


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


def score(root: Path, overrides: list[str]) -> None:
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
    scores = []
    for d in sorted(p for p in root.iterdir() if (p / "done").exists()):
        tally = Tally()
        for pk in sorted(d.glob("f_*.pkl")):
            with open(pk, "rb") as fh:
                c = pickle.load(fh)
            z, _ = cm.flag_cosmics(c["frame"], settings=c["settings"])
            tally.add((z.mask & 4) != 0, c["frame"].mask, c["crm"])
        s = tally.scores()
        scores.append(s)
        print(f"{d.name:>12s} {s['n']:3d} {s['true_px']:7d} {100 * s['compl']:6.2f}% "
              f"{s['flagged']:7d} {100 * s['far']:5.2f}% {s['every']:3d}"
              f"{'' if met(s) else '  goal missed'}", flush=True)
    if scores:
        print(summary("score", scores))


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
    args = ap.parse_args()
    if args.cmd == "cache":
        cache(args.root, args.nights,
              {k: ast.literal_eval(v) for k, v in (x.split("=", 1) for x in args.sim)})
    else:
        score(args.root, args.overrides)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
