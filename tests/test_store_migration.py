"""A state.sqlite written by the release before the sealed store still opens, is migrated,
and a night can be reduced, finalized and reported on it (tests/fixtures/README.md)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from photowatch import cli
from photowatch.sim.night import simulate_night
from photowatch.state.store import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).parent / "fixtures" / "state-v1.sqlite"


def _raw(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def _schema(conn: sqlite3.Connection) -> dict:
    """Columns (name, type, not null, default, pk), foreign keys and the column sets of the
    unique indexes of every table: what a store means, not how its DDL was spelled."""
    out = {}
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    for t in tables:
        out[t] = [tuple(r)[1:] for r in conn.execute(f"PRAGMA table_info({t})")]
        out[t + " fk"] = [tuple(r)[2:5] for r in conn.execute(f"PRAGMA foreign_key_list({t})")]
        out[t + " indexes"] = sorted(
            (bool(r[2]), tuple(x[2] for x in conn.execute(f"PRAGMA index_info('{r[1]}')")))
            for r in conn.execute(f"PRAGMA index_list({t})"))
    return out


@pytest.fixture
def old_out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(FIXTURE, out / "state.sqlite")
    return out


def test_fixture_is_a_v1_store():
    # the fixture itself is never opened by Store (that would migrate it)
    assert _raw(FIXTURE, "PRAGMA user_version") == [(1,)]
    assert SCHEMA_VERSION > 1


def test_v1_store_is_migrated_and_reads_back(old_out, tmp_path):
    path = old_out / "state.sqlite"
    before = {t: _raw(path, f"SELECT * FROM {t} ORDER BY 1")
              for t in ("frames", "masters", "coadds", "files", "meta")}
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    assert _raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # every row survives the migration unchanged
    for t, rows in before.items():
        assert _raw(path, f"SELECT * FROM {t} ORDER BY 1") == rows, t
    # and reads back through the store's methods
    assert store.counts() == {"reduced": 3, "used": 4, "rejected": 2}
    assert len(store.frames()) == 9
    objects = store.frames(kind="object", state="reduced", accepted=1)
    assert len(objects) == 3 and all(r["product"].endswith(".fits") for r in objects)
    assert store.nights() == ["2020-01-28"]
    assert len(store.masters()) == len(before["masters"]) > 0
    assert {m["kind"] for m in store.latest_masters("2020-01-28")} == {"bias", "flat"}
    (coadd,) = store.coadds()
    assert (coadd["target"], coadd["filter"], coadd["stacktype"], coadd["ncombine"]) == \
        ("NGC0001", "SDSS-R", "FINAL", 3)
    assert store.get_meta("finalize:2020-01-28") is not None
    # a second open migrates nothing
    store.close()
    assert Store(path).schema_version == SCHEMA_VERSION
    # the migrated store means the same as a store created today
    fresh = Store(tmp_path / "fresh.sqlite")
    assert _schema(Store(path).conn) == _schema(fresh.conn)


def test_reduce_finalize_status_on_a_migrated_store(old_out, tmp_path, capsys):
    sim = simulate_night(tmp_path / "sim", size=512, binning=4, filters=("SDSS-R",), seed=4,
                         n_bias=3, n_dark=0, n_flat=3, n_science=2, night_date="2020-02-03")
    out = old_out
    assert cli.main(["reduce", str(sim.raw_dir), "--out", str(out),
                     "--catalog", str(sim.catalog_path)]) == 0
    store = Store(out / "state.sqlite")
    assert store.schema_version == SCHEMA_VERSION
    (new_night,) = [n for n in store.nights() if n != "2020-01-28"]
    assert store.counts(new_night).get("reduced") == 2
    assert cli.main(["finalize", "--out", str(out), "--night", new_night]) in (0, 3)
    capsys.readouterr()
    for night in ("2020-01-28", new_night):
        assert cli.main(["status", "--out", str(out), "--json", "--night", night]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["schema"] == SCHEMA_VERSION
        assert {f["state"] for f in data["frames"]} >= {"used", "reduced"}
        (coadd,) = data["coadds"]
        assert coadd["stacktype"] == "FINAL"
        assert coadd["ncombine"] == (3 if night == "2020-01-28" else 2)
