"""The command line: subcommands only (the work is done by the modules they call).

    photowatch reduce RAWDIR --out OUT [--catalog FILE] [--instrument NAME]
    photowatch watch [RAWDIR] --out OUT [--catalog FILE] [--instrument NAME]
    photowatch finalize --out OUT [--night YYYY-MM-DD]
    photowatch reprocess ARCHIVE --out OUT [--catalog FILE] [--instrument NAME]
                         [--nights FIRST..LAST] [--scheduler local[:N] | tcp://HOST:PORT | none]
    photowatch status --out OUT [--json]
    photowatch requeue --out OUT [--state S] [--reason TEXT] [--night D] [FILE ...] [--dry-run]
    photowatch masters --out OUT [--json] | masters rebuild --out OUT [--night D]
    photowatch simulate OUT [--size N] [--filters F ...] [--seed S]
    photowatch replay RAWDIR WATCHDIR [--speed X] [--chunked]
    photowatch demo [--out DIR]
    photowatch inspect RAWDIR [--json] [--write-profile FILE.toml] [--instrument NAME]

Exit status: 0 done, 1 failed (the message says why), 2 bad usage or configuration
(checked before anything is written), 3 done with problems (frames quarantined,
held, or rejected for a reason other than quality; incomplete final coadds),
with a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path

#: exit statuses (README "Exit status", and ``--help``)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PROBLEMS = 0, 1, 2, 3
EXIT_HELP = """exit status:
  0  all done
  1  failed (the message says why); also: no photowatch store in --out
  2  usage or configuration (unknown instrument, unreadable profile, missing catalogue,
     output directory not writable, a bad --night): one line, nothing written
  3  done with problems (frames quarantined, held, or rejected for a reason other than
     quality; incomplete final coadds), with a one-line summary"""


class UsageError(Exception):
    """A bad argument or configuration found before any work: exit status 2."""


class NoStore(Exception):
    """The output directory holds no store: exit status 1, nothing created."""


def _night(value: str | None) -> str | None:
    """--night: a real calendar date YYYY-MM-DD (UsageError otherwise)."""
    if value is None:
        return None
    try:
        if len(value) != 10:
            raise ValueError
        date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--night {value}: not a date (expected YYYY-MM-DD)") from None
    return value


def _existing_store(settings) -> Path:
    """The output directory of a command that only reads or finishes a night (NoStore if none)."""
    out = Path(settings.paths.output_dir)
    if not (out / "state.sqlite").is_file():
        raise NoStore(f"{out}: no state.sqlite (not a photowatch output directory); "
                      "nothing done")
    return out


def _known_night(out: Path, night: str | None) -> None:
    """A --night the store has (UsageError naming the nights it has)."""
    if night is None:
        return
    from photowatch.state.store import Store

    nights = Store(out / "state.sqlite", command="check").nights()
    if night not in nights:
        raise UsageError(f"--night {night}: no frames of that night in {out} "
                         f"(nights: {', '.join(nights) or 'none'})")


def _writable(folder: Path) -> str | None:
    """Why ``folder`` cannot hold the output (created if missing), or None.

    A probe file is created and removed at once (``os.access`` alone says yes to
    root on file systems that refuse writes, e.g. ``/proc``).
    """
    import tempfile

    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".photowatch-probe-"):
            pass
    except OSError as exc:
        where = exc.filename or folder
        return f"cannot write in {where}: {exc.strerror or exc}"
    return None


def preflight(settings, *, instrument: str | None = None, catalog: str | None = None,
              write: bool = True) -> None:
    """Check the configuration before anything is written (UsageError: exit status 2).

    Unknown instrument (``--instrument`` or ``instrument.name``), an unreadable
    profile (``instrument.profile_dir``), a missing or unreadable catalogue
    (``--catalog`` or ``catalog.path``), an output directory that cannot be
    written (``--out`` or ``paths.output_dir``).
    """
    from photowatch.core.errors import ConfigError
    from photowatch.core.instruments import all_profiles, load_profile

    profile_dir = settings.instrument.profile_dir or None
    if profile_dir and not Path(profile_dir).is_dir():
        raise UsageError(f"instrument.profile_dir: {profile_dir}: not a directory")
    try:
        all_profiles(profile_dir)  # every profile must load: auto-detection reads them all
    except ConfigError as exc:
        raise UsageError(f"instrument.profile_dir: {exc}") from None
    name = instrument or settings.instrument.name
    if name and name != "auto":
        try:
            load_profile(name, profile_dir)
        except ConfigError as exc:
            key = "--instrument" if instrument else "instrument.name"
            raise UsageError(f"{key}: {str(exc).split(': ', 1)[-1]}") from None
    path = catalog or settings.catalog.path
    if path:
        key = "--catalog" if catalog else "catalog.path"
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{key}: {p}: no such file")
        if not p.is_file():
            raise UsageError(f"{key}: {p}: not a file")
        try:
            with open(p, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise UsageError(f"{key}: {p}: cannot read: {exc.strerror}") from None
    if write:
        why = _writable(Path(settings.paths.output_dir))
        if why:
            raise UsageError(f"--out {settings.paths.output_dir}: {why} (paths.output_dir)")
    if settings.targets.file or settings.targets.positions:  # issue 21: bad targets, now
        from photowatch.core.targets import parse_position, read_targets_file

        if settings.targets.file:
            read_targets_file(settings.targets.file)
        for text in settings.targets.positions:
            parse_position(text, "config")


def _with_problems(store_out: Path, night: str | None, text: str, extra=None) -> int:
    """Exit 3 with a one-line summary when frames or coadds need a person, else 0."""
    from photowatch.run.status import problem_summary
    from photowatch.state.store import Store

    line = problem_summary(Store(store_out / "state.sqlite", command="check"), night, extra)
    if line:
        print(f"photowatch: {line}{text}")
        return EXIT_PROBLEMS
    return EXIT_OK


def _settings(args):
    from photowatch.core.config import load_settings

    settings = load_settings(getattr(args, "config", None))
    out = getattr(args, "out", None)
    if out:
        settings = settings.with_overrides(paths={"output_dir": str(out)})
    return settings


def _setup(args, settings, *, workers=None):
    from photowatch.core.logs import setup_logging
    from photowatch.run.engine import default_workers, limit_threads, threads_per_worker

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
    p.add_argument("--target", action="append", default=[], metavar="NAME=RA,DEC",
                   help="forced photometry and a light curve at this position (degrees or "
                   "hh:mm:ss,dd:mm:ss; repeatable; kept for finalize and restarts)")


def _remember_targets(args, settings) -> None:
    """``--target``: checked (a bad one is a usage error), kept in the store's meta."""
    if not getattr(args, "target", None):
        return
    from photowatch.core.targets import parse_position
    from photowatch.state.lightcurves import remember_cli_targets
    from photowatch.state.store import Store

    for text in args.target:
        parse_position(text)
    out = Path(settings.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "state.sqlite", command="photowatch targets")
    try:
        remember_cli_targets(store, args.target)
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photowatch",
        description="Real-time imaging reduction for telescopes (PhotoPipe's successor).",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    from photowatch import __version__

    parser.add_argument("--version", action="version", version=f"photowatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reduce", help="reduce every frame of a directory (batch) and return",
                       description="Run every frame in RAWDIR, in observation order "
                       "(calibrations first), through the engine the daemon uses; return "
                       "when every frame is terminal.", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
                       "coadds, catalogues, report", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="End of night. Each FINAL coadd is compared with the "
                       "quick-look one (frames, exposure, depth) and each frame's astrometric "
                       "and photometric status before and after re-reduction; a frame lost "
                       "on the way makes the coadd FINALSTAT='INCOMPLETE' and exit status 3.")
    _common(p)
    p.add_argument("--night", metavar="YYYY-MM-DD", help="night label (default: the most recent)")
    p.add_argument("--catalog", metavar="FILE", help="local reference catalogue")
    p.add_argument("--workers", type=int, metavar="N")

    p = sub.add_parser("reprocess", help="reprocess an archive of nights (reduce + finalize "
                       "each night), nights in parallel on Dask distributed", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Each night of ARCHIVE (one folder per night, or one flat "
                       "folder split by the night rule) is one task: the one-machine reduce "
                       "and finalize in a scratch folder. This process is the only writer "
                       "of OUT/state.sqlite: it publishes each night's products atomically "
                       "and records its rows once. A night without its own calibrations "
                       "waits for the nearest night's final masters. docs/reprocess.md.")
    p.add_argument("archive", metavar="ARCHIVE")
    _common(p)
    p.add_argument("--catalog", metavar="FILE", help="local reference catalogue")
    p.add_argument("--instrument", metavar="NAME", help="instrument profile (default: config, "
                   "auto-detected from INSTRUME)")
    p.add_argument("--nights", metavar="FIRST..LAST", help="only these nights (YYYY-MM-DD; "
                   "either end may be left out; one date: that night)")
    p.add_argument("--scheduler", metavar="local[:N]|tcp://HOST:PORT|none",
                   help="Dask: a LocalCluster of N worker processes (default: the cores), a "
                   "running scheduler, or none: in this process (default when dask is "
                   "not installed: pip install 'photowatch[cluster]')")

    p = sub.add_parser("status", help="state of an output directory")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--night", metavar="YYYY-MM-DD")

    p = sub.add_parser("requeue", help="put quarantined, rejected or held frames back to "
                       "received (after fixing what was wrong)", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Frames go back to 'received' with an event saying why; "
                       "the content-hash duplicate rule does not block them; a frame never "
                       "classified is read again from its raw file with the configuration "
                       "as it is now. The next reduction replaces the earlier products "
                       "atomically; a running daemon takes them up within a second.")
    _common(p)
    p.add_argument("files", nargs="*", metavar="FILE", help="raw files (path or name); "
                   "default: every frame in the selected states")
    p.add_argument("--state", action="append", choices=["quarantined", "rejected", "held"],
                   help="only frames in this state (repeatable; default: all three)")
    p.add_argument("--reason", metavar="TEXT", default="requeued by hand",
                   help="why (recorded in the frame's events)")
    p.add_argument("--night", metavar="YYYY-MM-DD")
    p.add_argument("--instrument", metavar="NAME", help="instrument profile for frames read "
                   "again (default: config)")
    p.add_argument("--dry-run", action="store_true", help="list what would be requeued")

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
    from photowatch.core.errors import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"photowatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NoStore as exc:
        print(f"photowatch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("photowatch: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------- commands

def cmd_reduce(args) -> int:
    from photowatch.run.batch import reduce_directory

    settings = _settings(args)
    rawdir = Path(args.rawdir)
    if not rawdir.is_dir():
        raise UsageError(f"{rawdir}: not a directory")
    preflight(settings, instrument=args.instrument, catalog=args.catalog)
    settings, workers = _setup(args, settings, workers=args.workers)
    _remember_targets(args, settings)
    summary = reduce_directory(rawdir, settings, catalog=args.catalog,
                               instrument=args.instrument, workers=workers)
    print(summary.text())
    if not summary.ok:
        return EXIT_FAILED
    return _with_problems(summary.out, None, f" (photowatch status --out {summary.out})")


def cmd_reprocess(args) -> int:
    from photowatch.run.reprocess import default_scheduler, have_dask, parse_nights, reprocess

    settings = _settings(args)
    archive = Path(args.archive)
    if not archive.is_dir():
        raise UsageError(f"{archive}: not a directory")
    try:
        parse_nights(args.nights)
    except ValueError:
        raise UsageError(f"--nights {args.nights}: expected FIRST..LAST (YYYY-MM-DD)") from None
    scheduler = args.scheduler or default_scheduler()
    if scheduler != "none":
        if not have_dask():
            raise UsageError(f"--scheduler {scheduler}: dask is not installed "
                             "(pip install 'photowatch[cluster]'), or use --scheduler none")
        if not (scheduler in ("local",) or scheduler.startswith(("local:", "tcp://", "tls://"))
                ) or (scheduler.startswith("local:") and not scheduler[6:].isdigit()):
            raise UsageError(f"--scheduler {scheduler}: expected local[:N], tcp://HOST:PORT "
                             "or none")
    preflight(settings, instrument=args.instrument, catalog=args.catalog)
    settings, _ = _setup(args, settings, workers=1)
    summary = reprocess(archive, settings, catalog=args.catalog, instrument=args.instrument,
                        nights=args.nights, scheduler=scheduler)
    print(summary.text())
    if not summary.ok:
        return EXIT_FAILED if not summary.counts else EXIT_PROBLEMS
    return _with_problems(summary.out, None, f" (photowatch status --out {summary.out})")


def cmd_watch(args) -> int:
    from photowatch.run.watch import run_daemon

    settings = _settings(args)
    rawdir = args.rawdir or settings.paths.watch_dir
    if not Path(rawdir).is_dir():
        raise UsageError(f"{rawdir}: not a directory (paths.watch_dir)")
    preflight(settings, instrument=args.instrument, catalog=args.catalog)
    settings, workers = _setup(args, settings, workers=args.workers)
    _remember_targets(args, settings)
    return run_daemon(Path(rawdir), settings, catalog=args.catalog, instrument=args.instrument,
                      workers=workers)


def cmd_finalize(args) -> int:
    from photowatch.run.finalize import finalize

    settings = _settings(args)
    night = _night(args.night)
    out = _existing_store(settings)
    _known_night(out, night)
    preflight(settings, catalog=args.catalog)
    settings, workers = _setup(args, settings, workers=args.workers)
    result = finalize(settings, night=night, catalog=args.catalog, workers=workers)
    print(result.text())
    if not result.ok:
        return EXIT_FAILED
    if result.night is None:
        return EXIT_OK
    extra = [f"{len(result.incomplete)} incomplete final coadd(s)"] if result.incomplete else []
    return _with_problems(out, result.night, f" (report: {result.report})", extra)


def cmd_status(args) -> int:
    from photowatch.run.status import status

    settings = _settings(args)
    night = _night(args.night)
    out = _existing_store(settings)
    _known_night(out, night)
    print(status(out, as_json=args.json, night=night))
    return 0


def cmd_masters(args) -> int:
    from photowatch.run.status import masters_listing

    settings = _settings(args)
    night = _night(args.night)
    out = _existing_store(settings)
    _known_night(out, night)
    if args.action == "rebuild":
        from photowatch.run.finalize import rebuild_masters

        preflight(settings)
        settings, workers = _setup(args, settings)
        print(rebuild_masters(settings, night=night))
        return 0
    print(masters_listing(out, as_json=args.json, night=night))
    return 0


def cmd_requeue(args) -> int:
    from photowatch.core.logs import setup_logging
    from photowatch.run.requeue import requeue
    from photowatch.state.store import Store

    settings = _settings(args)
    night = _night(args.night)
    out = _existing_store(settings)
    _known_night(out, night)
    preflight(settings, instrument=args.instrument, write=not args.dry_run)
    setup_logging(settings.logging.level, settings.logging.format, settings.logging.file)
    store = Store(out / "state.sqlite", command="requeue")
    done = requeue(store, settings, reason=args.reason, states=args.state, night=night,
                   files=args.files, instrument=args.instrument, dry_run=args.dry_run)
    print(done.text(dry_run=args.dry_run))
    if done.refused:
        print(f"photowatch: done with problems: {len(done.refused)} frame(s) not requeued")
        return EXIT_PROBLEMS
    return EXIT_OK


def cmd_simulate(args) -> int:
    from photowatch.sim.night import simulate_night

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
    from photowatch.run.replay import replay

    return replay(Path(args.rawdir), Path(args.watchdir), speed=args.speed,
                  chunked=args.chunked)


def cmd_inspect(args) -> int:
    import json

    from photowatch.run.inspect import inspect_dir, table, write_profile

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
    from photowatch.run.demo import run_demo

    return run_demo(Path(args.out), size=args.size, config=args.config)


COMMANDS = {
    "reduce": cmd_reduce,
    "watch": cmd_watch,
    "finalize": cmd_finalize,
    "reprocess": cmd_reprocess,
    "status": cmd_status,
    "requeue": cmd_requeue,
    "masters": cmd_masters,
    "inspect": cmd_inspect,
    "simulate": cmd_simulate,
    "replay": cmd_replay,
    "demo": cmd_demo,
}

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
