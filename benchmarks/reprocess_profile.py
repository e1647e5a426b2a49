"""Profile: one simulated night's task in-process and in a Dask worker (CPU, page faults).

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/reprocess_profile.py \
        [--modes none,worker,worker-untuned] [--size 1024] [--science 6] [--work DIR]

Each mode runs the same night task (``reduce`` + ``finalize`` in a scratch
folder) and prints the task's wall time, user and system CPU seconds and minor
page faults (``getrusage`` of the process running it, all its threads):

- ``none``: :func:`photowatch.run.reprocess.reduce_night` in this process;
- ``worker``: ``dask_reduce_night`` on a one-worker ``LocalCluster`` started with
  Dask's defaults (the nanny sets ``MALLOC_TRIM_THRESHOLD_``): what a worker of
  any cluster runs;
- ``worker-untuned``: the same worker, but the night run without
  ``tune_worker_process`` (the allocator as the nanny left it): the overhead the
  first benchmark saw.

CPU seconds and faults hardly depend on the machine's load, unlike wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def measured(fn, *args, **kwargs):
    """(result, figures) of ``fn`` run here: wall, user, system, minor faults, env."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return result, {"wall": time.perf_counter() - t0, "user": r1.ru_utime - r0.ru_utime,
                    "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
                    "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                    "omp": os.environ.get("OMP_NUM_THREADS")}


def untuned_night(plan, settings, out, catalog):
    from photowatch.run.reprocess import reduce_night

    return reduce_night(plan, settings, out, catalog=catalog)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from reprocess import simulate

    from photowatch.core.config import Settings
    from photowatch.run.reprocess import dask_reduce_night, plan_archive, reduce_night

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="none,worker,worker-untuned")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--science", type=int, default=6)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pw-rpprof-"))
    try:
        archive, catalog = simulate(work, 1, args.size, args.science)
        for mode in args.modes.split(","):
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            settings = Settings().with_overrides(paths={"output_dir": str(out)})
            plan = plan_archive(archive, settings)[0]
            if mode == "none":
                _, fig = measured(reduce_night, plan, settings, str(out), catalog=catalog)
            else:
                from distributed import Client, LocalCluster

                fn = untuned_night if mode == "worker-untuned" else dask_reduce_night
                extra = () if mode == "worker-untuned" else (None, [])
                with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, Client(cluster) as client:
                    _, fig = client.submit(measured, fn, plan, settings, str(out), catalog,
                                           *extra, pure=False).result()
            print(f"{mode:15s} wall {fig['wall']:6.1f} s  user {fig['user']:6.1f} s  "
                  f"sys {fig['sys']:5.1f} s  minor faults {fig['minflt'] / 1e6:5.2f} M  "
                  f"(MALLOC_TRIM_THRESHOLD_={fig['trim']}, OMP_NUM_THREADS={fig['omp']})",
                  flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
