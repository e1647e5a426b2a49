"""``photowatch reprocess`` (issue 22): an archive of nights on Dask distributed.

Two small simulated nights (256 px, binning 4) are reduced once the one-machine
way (``reduce`` with one worker, then ``finalize`` of each night) and the
reprocessed output must equal it: every FITS product (pixels within float
tolerance, headers, CAT and coadd catalogues) and every store row apart from
ids, times and the output folder's path (tests/reprocess_compare.py). On a
``LocalCluster(n_workers=2, processes=True)``; then once more while a worker
process is killed in the middle of a night; and in-process (``--scheduler
none``) for a night that has no calibrations of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from reprocess_compare import compare_outputs, products

from photowatch import cli
from photowatch.core.config import Settings
from photowatch.run.batch import reduce_directory
from photowatch.run.finalize import finalize
from photowatch.run.reprocess import SCRATCH, parse_nights, plan_archive, reprocess
from photowatch.sim.night import simulate_night
from photowatch.state.store import TERMINAL, Store

NIGHTS = ("2020-01-29", "2020-01-30")  # observing dates: night labels 2020-01-28 and -29


def _night(root: Path, day: str, seed: int = 3, **kw):
    kw = {"n_bias": 3, "n_dark": 2, "n_flat": 4, **kw}
    sim = simulate_night(root / "sim" / day, size=256, binning=4, seed=seed, night_date=day,
                         n_science=3, write_models=False, write_crmasks=False, **kw)
    shutil.move(sim.raw_dir, root / "archive" / day)
    return sim


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two nights, one folder each (the same field: one reference catalogue)."""
    root = tmp_path_factory.mktemp("reprocess")
    (root / "archive").mkdir()
    sims = [_night(root, day) for day in NIGHTS]
    return root / "archive", str(sims[0].catalog_path)


@pytest.fixture(scope="module")
def one_machine(archive, tmp_path_factory):
    """``reduce`` (one worker) then ``finalize`` of each night: the reference output."""
    rawdir, catalog = archive
    out = tmp_path_factory.mktemp("one_machine")
    # every frame re-reduced with the final masters by finalize (none kept as "close
    # enough", no re-reduction in between): what an archive reprocess does whatever the
    # configuration says (ARCHIVE_CALIBRATION)
    settings = Settings().with_overrides(paths={"output_dir": str(out)}, daemon={"workers": 1},
                                         calibration={"final_tolerance": 0.0,
                                                      "rereduce": "finalize"})
    assert reduce_directory(rawdir, settings, catalog=catalog, workers=1, progress=False).ok
    for night in Store(out / "state.sqlite").nights():
        assert finalize(settings, night=night, catalog=catalog, workers=1).ok
    return out


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    with Client(cluster) as c:
        yield c
    cluster.close()


def _settings(out: Path) -> Settings:
    return Settings().with_overrides(paths={"output_dir": str(out)})


def _assert_each_frame_once_and_terminal(out: Path, rawdir: Path) -> None:
    store = Store(out / "state.sqlite")
    rows = store.frames()
    raws = sorted(str(p.resolve()) for p in rawdir.rglob("*.fits"))
    assert sorted(r["path"] for r in rows) == raws  # one row per raw file, none twice
    assert all(r["state"] in TERMINAL for r in rows)
    assert not (out / SCRATCH).exists()  # no scratch folder (of a lost try) left behind


def test_plan_splits_the_archive_by_night_and_reads_the_nights_option(archive, tmp_path):
    rawdir, _ = archive
    plans = plan_archive(rawdir, Settings())
    assert [p.night for p in plans] == ["2020-01-28", "2020-01-29"]
    assert [len(p.files) for p in plans] == [12, 12]
    assert all(not p.lenders and not p.missing for p in plans)
    # one flat folder: the night rule splits it the same way
    flat = tmp_path / "flat"
    flat.mkdir()
    for day in NIGHTS:
        for f in (rawdir / day).iterdir():
            os.link(f, flat / f"{day}-{f.name}")
    assert [len(p.files) for p in plan_archive(flat, Settings())] == [12, 12]
    later = plan_archive(rawdir, Settings(), nights=parse_nights("2020-01-29.."))
    assert [p.night for p in later] == ["2020-01-29"]
    with pytest.raises(ValueError):
        parse_nights("2020-01-32..")


def test_reprocess_on_a_local_cluster_equals_reduce_then_finalize(client, archive, one_machine,
                                                                  tmp_path):
    rawdir, catalog = archive
    out = tmp_path / "out"
    seen = []
    # a tolerance in the configuration does not let the reprocess keep provisional products,
    # nor does the daemon's policy make it re-reduce before finalize
    settings = _settings(out).with_overrides(calibration={"final_tolerance": 5.0,
                                                          "rereduce": "idle"})
    summary = reprocess(rawdir, settings, catalog=catalog, client=client,
                        progress=False, on_progress=lambda *a: seen.append(a))
    assert summary.ok, summary.problems
    assert summary.nights == ["2020-01-28", "2020-01-29"] and summary.frames == 24
    assert summary.dashboard and summary.dashboard.startswith("http")
    assert len(products(out)) == len(products(one_machine)) > 30
    assert compare_outputs(one_machine, out) == []
    # progress came from the workers, night by night, up to every frame of each night
    assert {s[0] for s in seen} == {"2020-01-28", "2020-01-29"}
    assert max(s[2] for s in seen if s[0] == "2020-01-28") == 12
    _assert_each_frame_once_and_terminal(out, rawdir)


def test_a_worker_killed_mid_night_changes_nothing(client, archive, one_machine, tmp_path):
    """A worker process killed while it reduces a night: Dask reruns the night elsewhere
    (a new scratch folder), and the output is still the one-machine output, once."""
    rawdir, catalog = archive
    out = tmp_path / "out"
    started = threading.Event()
    killed: dict = {}
    outcome: dict = {}
    # the workers' pids before the run: no round trip between choosing a worker and the
    # kill, in which (on a loaded machine) a night near its end could return its result,
    # and then nothing is lost
    pids = client.run(os.getpid)

    def on_progress(night, attempt, done, total):
        if done >= 2:
            started.set()

    def run():
        outcome["summary"] = reprocess(rawdir, _settings(out), catalog=catalog, client=client,
                                       progress=False, on_progress=on_progress)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(300), "no night reported progress"
    for addr, keys in client.processing().items():
        if keys and addr in pids:
            os.kill(pids[addr], signal.SIGKILL)
            killed = {"night": next(iter(keys)).split("-", 1)[1][:10], "pid": pids[addr]}
            break
    thread.join(300)
    assert not thread.is_alive()
    assert killed, "no night task was running to kill"
    summary = outcome["summary"]
    assert summary.ok, summary.problems
    # the killed try left its scratch folder (removed at the end): the night ran again
    assert [t.split(".")[0] for t in summary.lost_tries] == [killed["night"]]
    assert "lost tries" in summary.text()
    _assert_each_frame_once_and_terminal(out, rawdir)
    assert compare_outputs(one_machine, out) == []


def test_a_night_without_calibrations_borrows_the_nearest_nights_masters(tmp_path, capsys):
    """In-process (--scheduler none), through the command line: the night without its own
    calibrations waits for the night before, whose final masters its frames then use."""
    root = tmp_path
    (root / "archive").mkdir()
    sim = _night(root, NIGHTS[0])
    _night(root, NIGHTS[1], n_bias=0, n_dark=0, n_flat=0)
    rawdir = root / "archive"
    plans = plan_archive(rawdir, Settings())
    assert plans[1].lenders == ("2020-01-28",) and len(plans[1].missing) == 3
    out = root / "out"
    code = cli.main(["reprocess", str(rawdir), "--out", str(out), "--catalog",
                     str(sim.catalog_path), "--scheduler", "none"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2 night(s), 15 frames" in text
    store = Store(out / "state.sqlite")
    finals = {r["kind"]: r["id"] for r in store.latest_masters("2020-01-28") if r["final"]}
    assert set(finals) == {"bias", "dark", "flat"}
    import json

    objects = store.frames(night="2020-01-29", kind="object")
    assert len(objects) == 3 and all(r["state"] == "reduced" for r in objects)
    for row in objects:
        used = json.loads(row["masters_json"])
        for kind in ("bias", "dark", "flat"):
            assert used[kind]["night"] == "2020-01-28"
            assert used[kind]["master_id"] == finals[kind]  # ids mapped into this store
            assert Path(store.master(finals[kind])["path"]).is_file()
    _assert_each_frame_once_and_terminal(out, rawdir)
    # a second reprocess into the same folder records nothing twice: both nights skipped
    again = reprocess(rawdir, _settings(out), scheduler="none", progress=False)
    assert again.skipped == ["2020-01-28", "2020-01-29"] and again.nights == []
    _assert_each_frame_once_and_terminal(out, rawdir)


def test_reprocess_options_are_checked_before_work(tmp_path, capsys):
    assert cli.main(["reprocess", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "a").mkdir()
    assert cli.main(["reprocess", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                     "--nights", "2020-13-01"]) == 2
    assert cli.main(["reprocess", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                     "--scheduler", "local:x"]) == 2
    err = capsys.readouterr().err
    assert "--nights" in err and "--scheduler" in err


_FAULTS = """
import os, resource, sys
import numpy as np
try:  # numpy asks for transparent huge pages on large arrays: 2 MiB pages would fault
    from numpy._core.multiarray import _set_madvise_hugepage  # 512x less often, if the
except ImportError:  # kernel has them free at the time (it did not always: flaky)
    from numpy.core.multiarray import _set_madvise_hugepage
_set_madvise_hugepage(False)
from photowatch.run.reprocess import tune_worker_process
tuned = tune_worker_process() if sys.argv[1] == "tuned" else False
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    a = np.ones(1 << 20)  # 8 MiB, an image-sized array, freed at the next turn
    del a
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_process_gets_the_allocator_of_a_plain_process(tmp_path):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_: each image-sized array is then a new
    mmap whose pages fault in again (the local:1 overhead). The task undoes it."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    faults = {}
    for mode in ("plain", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, text=True,
                             capture_output=True, check=True).stdout.split()
        faults[mode] = (out[0] == "True", int(out[1]))
    assert faults["tuned"][0] and not faults["plain"][0]
    assert faults["plain"][1] > 100 * 100  # every array faulted in again (2048 pages of 4 KiB)
    assert faults["tuned"][1] * 10 < faults["plain"][1]


def test_local_workers_share_the_cores_and_keep_the_default_allocator():
    pytest.importorskip("distributed")
    from photowatch.run.reprocess import _client

    client, cluster = _client("local:1")
    try:
        env = client.run(lambda: {k: os.environ.get(k) for k in
                                  ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    finally:
        client.close()
        cluster.close()
    assert list(env.values()) == [{"MALLOC_TRIM_THRESHOLD_": None,
                                   "OMP_NUM_THREADS": str(os.cpu_count() or 1)}]
