"""The command line: subcommands only (the work is done by the modules they call).

    photowatch reduce RAWDIR --out OUT [--catalog FILE] [--instrument NAME]
    photowatch watch [RAWDIR] --out OUT [--catalog FILE] [--instrument NAME]
    photowatch finalize --out OUT [--night YYYY-MM-DD]
    photowatch status --out OUT [--json]
    photowatch masters --out OUT [--json] | masters rebuild --out OUT [--night D]
    photowatch simulate OUT [--size N] [--filters F ...] [--seed S]
    photowatch replay RAWDIR WATCHDIR [--speed X] [--chunked]
    photowatch demo [--out DIR]
    photowatch inspect RAWDIR [--json] [--write-profile FILE.toml] [--instrument NAME]

Exit status: 0 done, 1 failed (the message says why), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _settings(args):
    from photowatch.config import load_settings

    settings = load_settings(getattr(args, "config", None))
    out = getattr(args, "out", None)
    if out:
        settings = settings.with_overrides(paths={"output_dir": str(out)})
    return settings


def _setup(args, settings, *, workers=None):
    from photowatch.engine import default_workers, limit_threads, threads_per_worker
    from photowatch.logs import setup_logging

    if workers:
        settings = settings.with_overrides(daemon={"workers": workers})
    limit_threads(threads_per_worker(settings))
    setup_logging(settings.logging.level, settings.logging.format, settings.logging.file)
    return settings, default_workers(settings)


def _common(p, out=True):
    p.add_argument("--config", metavar="FILE", help="config file (default: $PHOTOWATCH_CONFIG, "
                   "./config.toml, built-in defaults)")
    if out:
        p.add_argument("--out", metavar="OUT", help="output directory (default: config "
                       "paths.output_dir)")


def _engine_opts(p):
    p.add_argument("--catalog", metavar="FILE", help="local reference catalogue (ECSV, FITS, CSV)")
    p.add_argument("--instrument", metavar="NAME", help="instrument profile (default: config, "
                   "auto-detected from INSTRUME)")
    p.add_argument("--workers", type=int, metavar="N", help="frames processed at once "
                   "(default: config daemon.workers, 0 = number of cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photowatch",
        description="Real-time imaging reduction for telescopes (PhotoPipe's successor).")
    from photowatch import __version__

    parser.add_argument("--version", action="version", version=f"photowatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reduce", help="reduce every frame of a directory (batch) and return",
                       description="Run every frame in RAWDIR, in observation order "
                       "(calibrations first), through the engine the daemon uses; return "
                       "when every frame is terminal.")
    p.add_argument("rawdir", metavar="RAWDIR")
    _common(p)
    _engine_opts(p)

    p = sub.add_parser("watch", help="watch a directory and reduce frames as they land (daemon)",
                       description="The daemon: watch RAWDIR (default: config paths.watch_dir) "
                       "and reduce every frame that lands; stop with SIGTERM or Ctrl-C.")
    p.add_argument("rawdir", metavar="RAWDIR", nargs="?")
    _common(p)
    _engine_opts(p)

    p = sub.add_parser("finalize", help="end of night: final masters, re-reductions, final "
                       "coadds, catalogues, report")
    _common(p)
    p.add_argument("--night", metavar="YYYY-MM-DD", help="night label (default: the most recent)")
    p.add_argument("--catalog", metavar="FILE", help="local reference catalogue")
    p.add_argument("--workers", type=int, metavar="N")

    p = sub.add_parser("status", help="state of an output directory")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--night", metavar="YYYY-MM-DD")

    p = sub.add_parser("masters", help="list masters (versions, inputs, users); or rebuild them")
    p.add_argument("action", nargs="?", choices=["list", "rebuild"], default="list")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--night", metavar="YYYY-MM-DD")

    p = sub.add_parser("simulate", help="write a simulated night (raw frames, catalogue, truth)")
    p.add_argument("outdir", metavar="OUT")
    p.add_argument("--size", type=int, default=1024, help="frame size in pixels (default 1024)")
    p.add_argument("--binning", type=int, default=2, help="binning (default 2)")
    p.add_argument("--filters", nargs="+", default=["SDSS-R"], metavar="F",
                   help="filters (default SDSS-R)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--science", type=int, default=6, help="science frames per filter")
    p.add_argument("--exptime", type=float, default=60.0, help="science exposure time (s)")
    p.add_argument("--no-catalog", action="store_true", help="do not write a reference catalogue")
    p.add_argument("--no-truth-images", action="store_true",
                   help="skip per-frame truth images (models, cosmic-ray masks)")

    p = sub.add_parser("replay", help="copy a night's raw frames into a watched directory at the "
                       "observing cadence")
    p.add_argument("rawdir", metavar="RAWDIR")
    p.add_argument("watchdir", metavar="WATCHDIR")
    p.add_argument("--speed", type=float, default=1.0, help="cadence divided by this (default 1)")
    p.add_argument("--chunked", action="store_true", help="write each file in chunks, as a camera")
    p.add_argument("--config", metavar="FILE")

    p = sub.add_parser("inspect", help="how each frame of a directory would be classified, "
                       "with every assumption; optionally write a profile that states them")
    p.add_argument("rawdir", metavar="RAWDIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--write-profile", metavar="FILE.toml", help="write a profile for these "
                   "frames (put it in [instrument] profile_dir)")
    p.add_argument("--instrument", metavar="NAME", help="profile to classify with (default: "
                   "auto-detected, else generic)")
    p.add_argument("--config", metavar="FILE")

    p = sub.add_parser("demo", help="simulate a small night and reduce + finalize it")
    p.add_argument("--out", metavar="DIR", default="photowatch-demo",
                   help="folder for the demo (default ./photowatch-demo)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--config", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    from photowatch.errors import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"photowatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("photowatch: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------- commands

def cmd_reduce(args) -> int:
    from photowatch.batch import reduce_directory

    settings, workers = _setup(args, _settings(args), workers=args.workers)
    rawdir = Path(args.rawdir)
    if not rawdir.is_dir():
        print(f"photowatch: {rawdir}: not a directory", file=sys.stderr)
        return 2
    summary = reduce_directory(rawdir, settings, catalog=args.catalog,
                               instrument=args.instrument, workers=workers)
    print(summary.text())
    return 0 if summary.ok else 1


def cmd_watch(args) -> int:
    from photowatch.watch import run_daemon

    settings = _settings(args)
    rawdir = args.rawdir or settings.paths.watch_dir
    settings, workers = _setup(args, settings, workers=args.workers)
    if not Path(rawdir).is_dir():
        print(f"photowatch: {rawdir}: not a directory (paths.watch_dir)", file=sys.stderr)
        return 2
    return run_daemon(Path(rawdir), settings, catalog=args.catalog, instrument=args.instrument,
                      workers=workers)


def cmd_finalize(args) -> int:
    from photowatch.finalize import finalize

    settings, workers = _setup(args, _settings(args), workers=args.workers)
    result = finalize(settings, night=args.night, catalog=args.catalog, workers=workers)
    print(result.text())
    return 0 if result.ok else 1


def cmd_status(args) -> int:
    from photowatch.status import status

    settings = _settings(args)
    out = Path(settings.paths.output_dir)
    if not (out / "state.sqlite").exists():
        print(f"photowatch: {out}: no state.sqlite (not a photowatch output directory)",
              file=sys.stderr)
        return 1
    print(status(out, as_json=args.json, night=args.night))
    return 0


def cmd_masters(args) -> int:
    from photowatch.status import masters_listing

    settings = _settings(args)
    out = Path(settings.paths.output_dir)
    if args.action == "rebuild":
        from photowatch.finalize import rebuild_masters

        settings, workers = _setup(args, settings)
        print(rebuild_masters(settings, night=args.night))
        return 0
    if not (out / "state.sqlite").exists():
        print(f"photowatch: {out}: no state.sqlite", file=sys.stderr)
        return 1
    print(masters_listing(out, as_json=args.json, night=args.night))
    return 0


def cmd_simulate(args) -> int:
    from photowatch.simulate import simulate_night

    night = simulate_night(Path(args.outdir), size=args.size, binning=args.binning,
                           filters=tuple(args.filters), seed=args.seed,
                           n_science=args.science, exptime_s=args.exptime,
                           catalog=not args.no_catalog, write_models=not args.no_truth_images,
                           write_crmasks=not args.no_truth_images)
    print(f"raw frames: {night.raw_dir} ({len(night.frames)} files)")
    if night.catalog_path:
        print(f"catalogue:  {night.catalog_path}")
    print(f"truth:      {night.truth_dir}")
    return 0


def cmd_replay(args) -> int:
    from photowatch.replay import replay

    return replay(Path(args.rawdir), Path(args.watchdir), speed=args.speed,
                  chunked=args.chunked)


def cmd_inspect(args) -> int:
    import json

    from photowatch.inspect import inspect_dir, table, write_profile

    settings = _settings(args)
    rawdir = Path(args.rawdir)
    if not rawdir.is_dir():
        print(f"photowatch: {rawdir}: not a directory", file=sys.stderr)
        return 2
    rows = inspect_dir(rawdir, settings, args.instrument)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    else:
        print(table(rows))
    if args.write_profile:
        path = write_profile([r for r in rows if r.state == "ok"], args.write_profile)
        print(f"profile written: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_demo(args) -> int:
    from photowatch.demo import run_demo

    return run_demo(Path(args.out), size=args.size, config=args.config)


COMMANDS = {
    "reduce": cmd_reduce,
    "watch": cmd_watch,
    "finalize": cmd_finalize,
    "status": cmd_status,
    "masters": cmd_masters,
    "inspect": cmd_inspect,
    "simulate": cmd_simulate,
    "replay": cmd_replay,
    "demo": cmd_demo,
}

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
