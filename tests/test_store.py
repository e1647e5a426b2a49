"""The state store: schema, frames by content hash, compare-and-set under concurrent writers."""

import multiprocessing as mp
import sqlite3
import threading

import pytest

from photowatch.state.store import TERMINAL, Store


def info(i, kind="object", night="2020-01-28"):
    return {"std_name": f"20200129T0200{i:02d}C0{kind[0]}.fits", "kind": kind,
            "instrument": "lmi", "camera": "C0", "filter": "SDSS-R", "target": "T",
            "binning": "1x1", "readout": "", "night": night, "exptime_s": 10.0,
            "obs_time": f"2020-01-29T02:00:{i:02d}+00:00"}


def add(store, i, kind="object"):
    return store.add_frame(path=f"/raw/f{i}.fits", sha256=f"sha{i}", size=100, mtime=1.0,
                           info=info(i, kind))[0]


def test_schema_and_wal(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    assert s.schema_version == 4  # v2: files(frame_id) index (sealed store); v3: candidates, v4: forced photometry (issue 21)
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # reopening migrates nothing and keeps data
    add(s, 1)
    s2 = Store(tmp_path / "state.sqlite")
    assert len(s2.frames()) == 1


def test_duplicate_content_is_one_frame(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    fid, new = s.add_frame(path="/raw/a.fits", sha256="x", size=1, mtime=1, info=info(1))
    fid2, new2 = s.add_frame(path="/raw/b.fits", sha256="x", size=1, mtime=1, info=info(1))
    assert new and not new2 and fid == fid2
    assert len(s.frames()) == 1
    assert s.conn.execute("SELECT duplicate FROM files WHERE path='/raw/b.fits'").fetchone()[0]
    assert any(e["event"] == "duplicate" for e in s.events(fid))


def test_same_second_names_do_not_collide(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    a = s.add_frame(path="/a", sha256="a", size=1, mtime=1, info=info(1))[0]
    b = s.add_frame(path="/b", sha256="b", size=1, mtime=1, info=info(1))[0]
    assert s.frame(a)["name"] == "20200129T020001C0o.fits"
    assert s.frame(b)["name"] == "20200129T020001C0o_2.fits"


def test_transitions_are_compare_and_set(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    fid = add(s, 1)
    assert s.transition(fid, ["received"], "processing")
    assert not s.transition(fid, ["received"], "processing")
    assert s.transition(fid, ["processing"], "reduced", product="/p.fits")
    row = s.frame(fid)
    assert row["state"] == "reduced" and row["product"] == "/p.fits" and row["finished_at"]
    events = [(e["state_from"], e["state_to"]) for e in reversed(s.events(fid))]
    assert events[-2:] == [("received", "processing"), ("processing", "reduced")]


def test_claim_order_calibrations_first(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    o = add(s, 1, "object")
    f = add(s, 2, "flat")
    b = add(s, 3, "bias")
    first = s.claim_next()
    assert first["id"] == b
    # a frame waits while a lower kind of its night and camera is queued or in progress
    assert s.claim_next() is None
    s.transition(b, ["processing"], "used")
    assert s.claim_next()["id"] == f
    assert s.claim_next() is None  # the flat is still processing: the object waits
    s.transition(f, ["processing"], "used")
    assert s.claim_next()["id"] == o


def _claimer(path, n_out):
    s = Store(path)
    got = []
    while True:
        row = s.claim_next()
        if row is None:
            break
        got.append(row["id"])
        s.transition(row["id"], ["processing"], "reduced")
    n_out.put(got)


def test_two_processes_never_take_the_same_frame(tmp_path):
    path = tmp_path / "state.sqlite"
    s = Store(path)
    ids = [add(s, i) for i in range(60)]
    q = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_claimer, args=(path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    taken = results[0] + results[1]
    assert sorted(taken) == sorted(ids)  # every frame once, none twice
    assert {r["state"] for r in s.frames()} == {"reduced"}


def test_threads_share_a_store(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    for i in range(40):
        add(s, i)
    taken = []
    lock = threading.Lock()

    def work():
        while (row := s.claim_next()) is not None:
            with lock:
                taken.append(row["id"])
            s.transition(row["id"], ["processing"], "reduced")

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(taken) == len(set(taken)) == 40


def test_recovery_of_dead_owner(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    fid = add(s, 1)
    s.claim_next()
    # pretend the owner was another process on this host that died
    s.conn.execute(f"UPDATE frames SET owner='{s.host}:999999999:dead' WHERE id=?",
                   (fid,))
    assert s.recover() == [fid]
    assert s.frame(fid)["state"] == "received"
    # a frame that killed its worker max_tries times is quarantined
    for _ in range(3):
        s.claim_next()
        s.conn.execute(f"UPDATE frames SET owner='{s.host}:999999999:dead' WHERE id=?",
                       (fid,))
        s.recover(max_tries=3)
    assert s.frame(fid)["state"] == "quarantined"
    assert "tries" in s.frame(fid)["reason"]


def test_live_owner_is_not_recovered(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    fid = add(s, 1)
    s.claim_next()
    other = Store(tmp_path / "state.sqlite")
    assert other.recover() == []  # our own process holds it: alive
    assert s.frame(fid)["state"] == "processing"


def test_masters_and_stale(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    fid = add(s, 1)
    s.transition(fid, ["received"], "processing")
    s.transition(fid, ["processing"], "reduced", masters_json={"bias": {"version": 1}},
                 product="/p.fits")
    mid = s.add_master(kind="bias", camera="C0", filter="", binning="1x1", readout="",
                       night="2020-01-28", version=1, ninputs=1, inputs=[5], path="/m.fits",
                       provisional=True)
    again = s.add_master(kind="bias", camera="C0", filter="", binning="1x1", readout="",
                         night="2020-01-28", version=1, ninputs=1, inputs=[5], path="/m.fits",
                         provisional=True)
    assert mid == again
    assert s.mark_stale([fid], "better master") == 1
    assert s.mark_stale([fid], "better master") == 0
    row = s.claim_stale()
    assert row["id"] == fid and row["state"] == "processing"


def test_terminal_states_are_the_documented_ones():
    assert set(TERMINAL) == {"used", "reduced", "rejected", "quarantined", "ignored"}


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "state.sqlite"
    Store(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


def test_dead_owner_with_our_pid_is_recovered(tmp_path):
    """A daemon restarted under the pid of the one that died (PID 1 in a container)."""
    import os

    s = Store(tmp_path / "state.sqlite")
    fid = add(s, 1)
    s.claim_next()
    s.conn.execute("UPDATE frames SET owner=? WHERE id=?",
                   (f"{s.host}:{os.getpid()}:deadbeef", fid))
    assert s.recover() == [fid]
