"""The state store: one SQLite file (WAL) that knows every frame, master, coadd and error.

It is the single source of truth of photowatch: the daemon, ``reduce``,
``finalize`` and ``status`` all read and write it, possibly at the same time
from several processes. Every read-then-write runs in ``BEGIN IMMEDIATE``;
state changes are compare-and-set (``UPDATE ... WHERE state IN (...)``), so two
workers can never both take a frame; every state change and every error is
also written to the ``events`` table.

Frame states::

    received ─► processing ─► used | reduced | rejected | quarantined | ignored
        ▲            │
        │            └─► waiting (object frame, no usable masters yet) ─► received
        ├── recovery (the process that took it died)
        ├── held (non-terminal: a header its profile cannot interpret, a missing
        │   profile; a later run with a fixed configuration takes it up by itself)
        └── requeue (``photowatch requeue``: quarantined, rejected or held frames
            back, with an event saying why; the content hash does not block them)

Calibration frames end ``used`` (accepted into a master) or ``rejected``;
object frames end ``reduced`` (a product exists) or ``rejected``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

STATES = ("received", "waiting", "processing", "held", "used", "reduced", "rejected",
          "quarantined", "ignored")
TERMINAL = ("used", "reduced", "rejected", "quarantined", "ignored")
#: states ``photowatch requeue`` takes back (``held`` is not terminal, but waits for a person)
REQUEUABLE = ("quarantined", "rejected", "held", "ignored")
#: order in which queued frames are taken: calibrations first, then objects
KIND_PRIORITY = {"bias": 0, "dark": 1, "flat": 2, "object": 3}

SCHEMA_VERSION = 2

#: owner tokens of the stores opened by this process (a restarted daemon may get the pid of
#: the one that died, e.g. as PID 1 in a container: the token, not the pid, tells them apart)
_LIVE_OWNERS: set[str] = set()


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------- schema

_SCHEMA_V1 = """
CREATE TABLE frames (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    raw_name TEXT NOT NULL,
    size INTEGER NOT NULL,
    name TEXT UNIQUE,
    instrument TEXT,
    kind TEXT,
    camera TEXT,
    filter TEXT,
    exptime REAL,
    obs_time TEXT,
    night TEXT,
    target TEXT,
    binning TEXT,
    readout TEXT,
    info_json TEXT,
    header_json TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    owner TEXT,
    tries INTEGER NOT NULL DEFAULT 0,
    product TEXT,
    product_version INTEGER NOT NULL DEFAULT 0,
    quicklook TEXT,
    masters_json TEXT,
    stale INTEGER NOT NULL DEFAULT 0,
    stale_reason TEXT,
    provisional INTEGER NOT NULL DEFAULT 0,
    qc_json TEXT,
    accepted INTEGER,
    coadd TEXT,
    arrived_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX frames_state ON frames(state, kind, obs_time);
CREATE INDEX frames_night ON frames(night, kind);
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    frame_id INTEGER NOT NULL REFERENCES frames(id),
    size INTEGER NOT NULL,
    mtime REAL,
    duplicate INTEGER NOT NULL DEFAULT 0,
    seen_at TEXT NOT NULL
);
CREATE TABLE masters (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    camera TEXT NOT NULL,
    filter TEXT NOT NULL DEFAULT '',
    binning TEXT NOT NULL,
    readout TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    night TEXT NOT NULL,
    version INTEGER NOT NULL,
    ninputs INTEGER NOT NULL,
    inputs_json TEXT,
    path TEXT NOT NULL,
    provisional INTEGER NOT NULL,
    final INTEGER NOT NULL DEFAULT 0,
    obs_time TEXT,
    method TEXT,
    stats_json TEXT,
    created_at TEXT NOT NULL,
    UNIQUE(kind, camera, filter, binning, readout, target, night, version)
);
CREATE INDEX masters_key ON masters(kind, camera, binning, filter);
CREATE TABLE coadds (
    id INTEGER PRIMARY KEY,
    night TEXT NOT NULL,
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    path TEXT NOT NULL,
    stacktype TEXT NOT NULL,
    ncombine INTEGER NOT NULL DEFAULT 0,
    exptime REAL,
    magzp REAL,
    grid_json TEXT,
    members_json TEXT,
    catalog TEXT,
    quicklook TEXT,
    stats_json TEXT,
    outdated INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    UNIQUE(night, target, filter)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    frame_id INTEGER,
    file TEXT,
    level TEXT NOT NULL,
    event TEXT NOT NULL,
    state_from TEXT,
    state_to TEXT,
    stage TEXT,
    error_class TEXT,
    message TEXT,
    action TEXT,
    owner TEXT
);
CREATE INDEX events_frame ON events(frame_id);
CREATE TABLE processes (
    owner TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    command TEXT,
    started_at TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    status TEXT
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

#: issue 21 (lane live): forced photometry at targets (one row per target and frame, or per
#: target and coadd: ``key`` is the frame's name or "coadd:<filter>"), the coadds' depth
_SCHEMA_LIVE = """
CREATE TABLE forced (
    id INTEGER PRIMARY KEY,
    night TEXT NOT NULL,
    target TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    frame_id INTEGER,
    filter TEXT,
    mjd REAL,
    mjd_start REAL,
    mjd_end REAL,
    exptime REAL,
    ra REAL,
    dec REAL,
    x REAL,
    y REAL,
    flux REAL,
    fluxerr REAL,
    snr REAL,
    mag REAL,
    magerr REAL,
    limmag REAL,
    uplim REAL,
    detected INTEGER,
    flags INTEGER,
    source TEXT,
    product TEXT,
    updated_at TEXT NOT NULL,
    UNIQUE(night, target, key)
);
CREATE INDEX forced_night_target ON forced(night, target);
ALTER TABLE coadds ADD COLUMN limmag REAL
"""

MIGRATIONS: list[str] = [_SCHEMA_V1, _SCHEMA_LIVE]


class Store:
    """Access to ``OUT/state.sqlite``; one connection per thread.

    Parameters
    ----------
    path
        the database file (created with its schema when missing)
    command
        a label for this process in the ``processes`` table
    """

    def __init__(self, path: str | os.PathLike, command: str = "photowatch"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        _LIVE_OWNERS.add(self.owner)
        self.command = command
        self._migrate()

    # ------------------------------------------------------------------ connection
    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                   check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils view of this thread's connection (for simple queries)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite_utils.Database(self.conn)
            self._local.db = db
        return db

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.db = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""
        conn = self.conn
        for attempt in range(200):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.05)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path}: store schema version {current} is newer than this photowatch "
                    f"({len(MIGRATIONS)}); upgrade photowatch"
                )
            for version in range(current, len(MIGRATIONS)):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={version + 1}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ events
    def _event(self, conn, event: str, *, frame_id=None, file=None, level="info",
               state_from=None, state_to=None, stage=None, error_class=None, message=None,
               action=None) -> None:
        conn.execute(
            "INSERT INTO events(time, frame_id, file, level, event, state_from, state_to, stage,"
            " error_class, message, action, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (utcnow(), frame_id, file, level, event, state_from, state_to, stage, error_class,
             message, action, self.owner),
        )

    def event(self, event: str, **fields) -> None:
        """Record an event that is not a state change (an error, a master update...)."""
        with self.transaction() as conn:
            self._event(conn, event, **fields)

    # ------------------------------------------------------------------ processes
    def register_process(self, status: str = "starting") -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO processes(owner, host, pid, command, started_at, heartbeat,"
                " status) VALUES (?,?,?,?,?,?,?)",
                (self.owner, self.host, os.getpid(), self.command, utcnow(), time.time(), status),
            )

    def heartbeat(self, status: str | None = None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE processes SET heartbeat=?, status=COALESCE(?, status) WHERE owner=?",
                (time.time(), status, self.owner),
            )

    def unregister_process(self) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM processes WHERE owner=?", (self.owner,))

    def _owner_alive(self, conn, owner: str, stale_after_s: float) -> bool:
        if owner == self.owner:
            return True
        host, pid, _ = (owner.split(":") + ["", "", ""])[:3]
        row = conn.execute("SELECT heartbeat FROM processes WHERE owner=?", (owner,)).fetchone()
        if host == self.host:
            if pid == str(os.getpid()):
                return owner in _LIVE_OWNERS
            try:
                os.kill(int(pid), 0)
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:
                pass
            # the pid exists: alive unless its heartbeat stopped long ago (pid reused)
            return row is None or time.time() - row["heartbeat"] < stale_after_s
        return row is not None and time.time() - row["heartbeat"] < stale_after_s

    def recover(self, stale_after_s: float = 300.0, max_tries: int = 3) -> list[int]:
        """Give back frames held in ``processing`` by a process that died.

        A frame whose processing killed its worker ``max_tries`` times is
        quarantined instead (it would crash the daemon forever).
        Returns the ids recovered.
        """
        recovered = []
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT id, raw_name, owner, tries FROM frames WHERE state='processing'"
            ).fetchall()
            for row in rows:
                if row["owner"] and self._owner_alive(conn, row["owner"], stale_after_s):
                    continue
                if row["tries"] >= max_tries:
                    new, reason = "quarantined", (
                        f"processing did not finish after {row['tries']} tries "
                        "(the worker died each time)")
                    action = "quarantined"
                else:
                    new, reason, action = "received", "recovered after its worker died", "retried"
                conn.execute(
                    "UPDATE frames SET state=?, reason=?, owner=NULL, updated_at=? "
                    "WHERE id=? AND state='processing'",
                    (new, reason if new == "quarantined" else None, utcnow(), row["id"]),
                )
                self._event(conn, "recovered", frame_id=row["id"], file=row["raw_name"],
                            level="warning", state_from="processing", state_to=new,
                            message=reason, action=action)
                recovered.append(row["id"])
            conn.execute("DELETE FROM processes WHERE heartbeat < ?",
                         (time.time() - 7 * 86400,))
        return recovered

    # ------------------------------------------------------------------ files and frames
    def known_path(self, path: str, size: int | None = None, mtime: float | None = None) -> bool:
        """True when this exact file (path, and size/mtime if given) was already taken."""
        row = self.conn.execute("SELECT size, mtime FROM files WHERE path=?", (path,)).fetchone()
        if row is None:
            return False
        if size is not None and row["size"] != size:
            return False
        return not (mtime is not None and row["mtime"] is not None
                    and abs(row["mtime"] - mtime) > 1e-3)

    def add_frame(self, *, path: str, sha256: str, size: int, mtime: float | None,
                  arrived_at: str | None = None, info: dict | None = None,
                  header: dict | None = None, state: str = "received",
                  reason: str | None = None) -> tuple[int, bool]:
        """Record a raw file. Returns (frame id, new); a known hash records a duplicate.

        ``info`` is :meth:`FrameInfo.summary` (None when classification failed);
        the frame's standardised name is made unique here (``_2``, ``_3`` ...).
        """
        now = utcnow()
        raw_name = Path(path).name
        with self.transaction() as conn:
            row = conn.execute("SELECT id, path FROM frames WHERE sha256=?", (sha256,)).fetchone()
            if row is not None:
                dup = int(row["path"] != path)
                conn.execute(
                    "INSERT OR REPLACE INTO files(path, sha256, frame_id, size, mtime, duplicate,"
                    " seen_at) VALUES (?,?,?,?,?,?,?)",
                    (path, sha256, row["id"], size, mtime, dup, now),
                )
                if dup:
                    self._event(conn, "duplicate", frame_id=row["id"], file=raw_name,
                                message=f"same content as {Path(row['path']).name}",
                                action="not reduced again")
                return row["id"], False
            name = None
            fields = {}
            if info is not None:
                name = self._unique_name(conn, info["std_name"])
                fields = {k: info.get(k) for k in ("instrument", "kind", "camera", "filter",
                                                    "target", "binning", "readout", "night")}
                fields["exptime"] = info.get("exptime_s")
                fields["obs_time"] = info.get("obs_time")
            cur = conn.execute(
                "INSERT INTO frames(sha256, path, raw_name, size, name, instrument, kind, camera,"
                " filter, exptime, obs_time, night, target, binning, readout, info_json,"
                " header_json, state, reason, arrived_at, received_at, updated_at, finished_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sha256, path, raw_name, size, name, fields.get("instrument"),
                 fields.get("kind"), fields.get("camera"), fields.get("filter"),
                 fields.get("exptime"), fields.get("obs_time"), fields.get("night"),
                 fields.get("target"), fields.get("binning"), fields.get("readout"),
                 _json(info), _json(header), state, reason, arrived_at or now, now, now,
                 now if state in TERMINAL else None),
            )
            frame_id = cur.lastrowid
            conn.execute(
                "INSERT OR REPLACE INTO files(path, sha256, frame_id, size, mtime, duplicate,"
                " seen_at) VALUES (?,?,?,?,?,0,?)",
                (path, sha256, frame_id, size, mtime, now),
            )
            self._event(conn, "received", frame_id=frame_id, file=raw_name, state_to=state,
                        level="info" if state == "received" else "warning", message=reason,
                        action=None if state == "received" else state)
            return frame_id, True

    @staticmethod
    def _unique_name(conn, name: str) -> str:
        stem, ext = name[: -len(".fits")], ".fits"
        candidate, n = name, 1
        while conn.execute("SELECT 1 FROM frames WHERE name=?", (candidate,)).fetchone():
            n += 1
            candidate = f"{stem}_{n}{ext}"
        return candidate

    # ------------------------------------------------------------------ transitions
    def transition(self, frame_id: int, from_states: Iterable[str], to_state: str, *,
                   event: str | None = None, message: str | None = None,
                   action: str | None = None, stage: str | None = None,
                   error_class: str | None = None, level: str = "info", **fields) -> bool:
        """Compare-and-set a frame's state; returns False if it was not in ``from_states``.

        ``fields`` are other columns to set in the same transaction (dicts and
        lists are stored as JSON in the ``*_json`` columns).
        """
        assert to_state in STATES, to_state
        from_states = tuple(from_states)
        now = utcnow()
        sets = {"state": to_state, "updated_at": now}
        if to_state in TERMINAL or to_state in ("waiting", "held"):
            sets["finished_at"] = now
            sets["owner"] = None
        if to_state in TERMINAL:
            sets["tries"] = 0  # tries count attempts that did not finish, not past successes
        if to_state == "processing":
            sets["owner"] = self.owner
            sets["started_at"] = now
        for key, value in fields.items():
            sets[key] = _json(value) if key.endswith("_json") else value
        assign = ", ".join(f"{k}=?" for k in sets)
        marks = ",".join("?" * len(from_states))
        with self.transaction() as conn:
            row = conn.execute("SELECT state, raw_name FROM frames WHERE id=?",
                               (frame_id,)).fetchone()
            if row is None or row["state"] not in from_states:
                return False
            conn.execute(
                f"UPDATE frames SET {assign} WHERE id=? AND state IN ({marks})",
                (*sets.values(), frame_id, *from_states),
            )
            self._event(conn, event or to_state, frame_id=frame_id, file=row["raw_name"],
                        level=level, state_from=row["state"], state_to=to_state, stage=stage,
                        error_class=error_class, message=message, action=action)
            return True

    def update_frame(self, frame_id: int, **fields) -> None:
        """Set columns of a frame without changing its state."""
        if not fields:
            return
        sets = {k: (_json(v) if k.endswith("_json") else v) for k, v in fields.items()}
        sets["updated_at"] = utcnow()
        assign = ", ".join(f"{k}=?" for k in sets)
        with self.transaction() as conn:
            conn.execute(f"UPDATE frames SET {assign} WHERE id=?", (*sets.values(), frame_id))

    def claim_next(self, kinds: Iterable[str] | None = None, nights: Iterable[str] | None = None,
                   ) -> sqlite3.Row | None:
        """Take the next ``received`` frame (calibrations first, then by time).

        Returns the frame row, now ``processing`` and owned by this process, or None.
        """
        # a frame waits while a frame it depends on (a lower kind of its night and
        # camera: bias < dark < flat < object) is still queued or in progress
        where = ["state='received'", """NOT EXISTS (SELECT 1 FROM frames g WHERE
                 g.state IN ('received', 'processing') AND g.night = frames.night AND
                 g.camera = frames.camera AND g.id != frames.id AND
                 (CASE g.kind WHEN 'bias' THEN 0 WHEN 'dark' THEN 1 WHEN 'flat' THEN 2
                  ELSE 3 END) < (CASE frames.kind WHEN 'bias' THEN 0 WHEN 'dark' THEN 1
                  WHEN 'flat' THEN 2 ELSE 3 END))"""]
        args: list = []
        if kinds is not None:
            kinds = list(kinds)
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += kinds
        if nights is not None:
            nights = list(nights)
            where.append(f"night IN ({','.join('?' * len(nights))})")
            args += nights
        order = ("CASE kind WHEN 'bias' THEN 0 WHEN 'dark' THEN 1 WHEN 'flat' THEN 2 "
                 "WHEN 'object' THEN 3 ELSE 4 END, obs_time, id")
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(
                f"SELECT id, state, raw_name FROM frames WHERE {' AND '.join(where)} "
                f"ORDER BY {order} LIMIT 1", args).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE frames SET state='processing', owner=?, started_at=?, updated_at=?,"
                " tries=tries+1 WHERE id=? AND state='received'",
                (self.owner, now, now, row["id"]),
            )
            self._event(conn, "processing", frame_id=row["id"], file=row["raw_name"],
                        state_from="received", state_to="processing")
            return conn.execute("SELECT * FROM frames WHERE id=?", (row["id"],)).fetchone()

    def claim_stale(self, nights: Iterable[str] | None = None) -> sqlite3.Row | None:
        """Take a reduced frame marked stale, for re-reduction (reduced → processing)."""
        where, args = ["state IN ('reduced', 'rejected')", "stale=1", "product IS NOT NULL"], []
        if nights is not None:
            nights = list(nights)
            where.append(f"night IN ({','.join('?' * len(nights))})")
            args += nights
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(
                f"SELECT id, raw_name, state, stale_reason FROM frames WHERE {' AND '.join(where)} "
                "ORDER BY obs_time, id LIMIT 1", args).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE frames SET state='processing', owner=?, started_at=?, updated_at=?,"
                " tries=tries+1 WHERE id=? AND state IN ('reduced', 'rejected')",
                (self.owner, now, now, row["id"]),
            )
            self._event(conn, "rereduce", frame_id=row["id"], file=row["raw_name"],
                        state_from=row["state"], state_to="processing",
                        message=row["stale_reason"])
            return conn.execute("SELECT * FROM frames WHERE id=?", (row["id"],)).fetchone()

    def wake_waiting(self, where: str = "1=1", args: tuple = ()) -> int:
        """Move waiting frames back to ``received`` (masters appeared); returns the count."""
        with self.transaction() as conn:
            rows = conn.execute(
                f"SELECT id, raw_name FROM frames WHERE state='waiting' AND ({where})", args
            ).fetchall()
            for row in rows:
                conn.execute("UPDATE frames SET state='received', updated_at=? WHERE id=? "
                             "AND state='waiting'", (utcnow(), row["id"]))
                self._event(conn, "woken", frame_id=row["id"], file=row["raw_name"],
                            state_from="waiting", state_to="received",
                            message="masters may now exist")
            return len(rows)

    def requeue(self, frame_id: int, reason: str, *, to_state: str = "received",
                from_states: Iterable[str] = REQUEUABLE, **fields) -> bool:
        """Put a quarantined, rejected or held frame back (``received`` by default).

        Its tries are reset, its reason cleared; the frame keeps its row (and
        its content hash), so the duplicate rule cannot block it; its product,
        if any, is replaced atomically by the next reduction. An event
        ``requeued`` records ``reason``. Returns False if the frame was not in
        ``from_states``.
        """
        fields = {"reason": None, "tries": 0, "stale": 0, "stale_reason": None, **fields}
        return self.transition(frame_id, from_states, to_state, event="requeued",
                               message=reason, action=f"back to {to_state}", level="info",
                               **fields)

    def replace_identity(self, frame_id: int, *, sha256: str, size: int, mtime: float | None,
                         info: dict | None, header: dict | None) -> str | None:
        """Re-read a frame in place (requeue, held frames): new hash and classification.

        Returns None, or why it could not (the new content is another frame's).
        """
        with self.transaction() as conn:
            other = conn.execute("SELECT id, raw_name FROM frames WHERE sha256=? AND id!=?",
                                 (sha256, frame_id)).fetchone()
            if other is not None:
                return f"same content as {other['raw_name']} (frame {other['id']})"
            row = conn.execute("SELECT path, name FROM frames WHERE id=?",
                               (frame_id,)).fetchone()
            sets: dict = {"sha256": sha256, "size": size, "info_json": _json(info),
                          "header_json": _json(header), "updated_at": utcnow()}
            if info is not None:
                sets.update({k: info.get(k) for k in ("instrument", "kind", "camera", "filter",
                                                      "target", "binning", "readout", "night")})
                sets["exptime"] = info.get("exptime_s")
                sets["obs_time"] = info.get("obs_time")
                if row["name"] is None:
                    sets["name"] = self._unique_name(conn, info["std_name"])
            assign = ", ".join(f"{k}=?" for k in sets)
            conn.execute(f"UPDATE frames SET {assign} WHERE id=?", (*sets.values(), frame_id))
            conn.execute("UPDATE files SET sha256=?, size=?, mtime=? WHERE frame_id=? AND path=?",
                         (sha256, size, mtime, frame_id, row["path"]))
            return None

    def reset_tries(self, frame_id: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE frames SET tries=0 WHERE id=?", (frame_id,))

    # ------------------------------------------------------------------ queries
    def frame(self, frame_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM frames WHERE id=?", (frame_id,)).fetchone()

    def frames(self, where: str = "1=1", args: tuple = (), order: str = "obs_time, id"
               ) -> list[sqlite3.Row]:
        return self.conn.execute(f"SELECT * FROM frames WHERE {where} ORDER BY {order}",
                                 args).fetchall()

    def counts(self, night: str | None = None) -> dict[str, int]:
        sql = "SELECT state, COUNT(*) n FROM frames"
        args: tuple = ()
        if night:
            sql += " WHERE night=?"
            args = (night,)
        rows = self.conn.execute(sql + " GROUP BY state", args).fetchall()
        return {r["state"]: r["n"] for r in rows}

    def pending(self) -> int:
        """Frames not yet terminal (received, processing) plus stale ones."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM frames WHERE state IN ('received','processing')").fetchone()
        return row[0]

    def nights(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT night FROM frames WHERE night IS NOT NULL ORDER BY night").fetchall()
        return [r[0] for r in rows]

    def events(self, frame_id: int | None = None, level: str | None = None,
               limit: int = 50) -> list[sqlite3.Row]:
        where, args = [], []
        if frame_id is not None:
            where.append("frame_id=?")
            args.append(frame_id)
        if level is not None:
            where.append("level IN ('warning','error')" if level == "problems" else "level=?")
            if level != "problems":
                args.append(level)
        sql = "SELECT * FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()

    # ------------------------------------------------------------------ masters
    def add_master(self, *, kind: str, camera: str, filter: str, binning: str, readout: str,
                   night: str, version: int, ninputs: int, inputs: list[int], path: str,
                   provisional: bool, final: bool = False, obs_time: str | None = None,
                   method: str = "", stats: dict | None = None, target: str = "",
                   frame_updates: dict[int, dict] | None = None) -> int:
        """Record a master version; ``frame_updates`` sets frame states in the same commit.

        ``frame_updates`` maps frame id → {"state": ..., "reason": ..., other columns}.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT id FROM masters WHERE kind=? AND camera=? AND filter=? AND binning=? AND "
                "readout=? AND target=? AND night=? AND version=?",
                (kind, camera, filter, binning, readout, target, night, version)).fetchone()
            if row is not None:
                master_id = row["id"]
            else:
                cur = conn.execute(
                    "INSERT INTO masters(kind, camera, filter, binning, readout, target, night,"
                    " version, ninputs, inputs_json, path, provisional, final, obs_time, method,"
                    " stats_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (kind, camera, filter, binning, readout, target, night, version, ninputs,
                     _json(inputs), path, int(provisional), int(final), obs_time, method,
                     _json(stats), utcnow()),
                )
                master_id = cur.lastrowid
                self._event(conn, "master", message=(
                    f"{kind} {camera} {filter or ''} {binning} v{version}: {ninputs} inputs"
                    f"{' (provisional)' if provisional else ''}{' FINAL' if final else ''}"))
            for frame_id, update in (frame_updates or {}).items():
                self._apply_frame_update(conn, frame_id, update)
            return master_id

    def _apply_frame_update(self, conn, frame_id: int, update: dict) -> None:
        update = dict(update)
        state = update.pop("state", None)
        event = update.pop("event", None)
        message = update.get("reason")
        row = conn.execute("SELECT state, raw_name FROM frames WHERE id=?",
                           (frame_id,)).fetchone()
        if row is None:
            return
        sets = {k: (_json(v) if k.endswith("_json") else v) for k, v in update.items()}
        sets["updated_at"] = utcnow()
        if state is not None:
            sets["state"] = state
            if state in TERMINAL:
                sets["finished_at"] = sets["updated_at"]
                sets["owner"] = None
                sets["tries"] = 0
        assign = ", ".join(f"{k}=?" for k in sets)
        conn.execute(f"UPDATE frames SET {assign} WHERE id=?", (*sets.values(), frame_id))
        if state is not None and state != row["state"]:
            self._event(conn, event or state, frame_id=frame_id, file=row["raw_name"],
                        state_from=row["state"], state_to=state, message=message,
                        level="warning" if state in ("rejected", "quarantined") else "info")

    def masters(self, where: str = "1=1", args: tuple = ()) -> list[sqlite3.Row]:
        return self.conn.execute(
            f"SELECT * FROM masters WHERE {where} ORDER BY night, kind, camera, filter, version",
            args).fetchall()

    def latest_masters(self, night: str | None = None) -> list[sqlite3.Row]:
        """The newest version of each master key (of a night, or all nights)."""
        sql = ("SELECT m.* FROM masters m JOIN (SELECT kind, camera, filter, binning, readout,"
               " target, night, MAX(version) v FROM masters GROUP BY kind, camera, filter,"
               " binning, readout, target, night) x ON m.kind=x.kind AND m.camera=x.camera AND"
               " m.filter=x.filter AND m.binning=x.binning AND m.readout=x.readout AND"
               " m.target=x.target AND m.night=x.night AND m.version=x.v")
        args: tuple = ()
        if night:
            sql += " WHERE m.night=?"
            args = (night,)
        return self.conn.execute(sql + " ORDER BY m.night, m.kind, m.camera, m.filter",
                                 args).fetchall()

    def master(self, master_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM masters WHERE id=?", (master_id,)).fetchone()

    def mark_stale(self, where: str, args: tuple, reason: str) -> int:
        """Mark frames with a product stale (a better master exists); returns the count."""
        with self.transaction() as conn:
            rows = conn.execute(
                f"SELECT id, raw_name FROM frames WHERE state IN ('reduced', 'rejected') AND "
                f"product IS NOT NULL AND stale=0 AND ({where})",
                args).fetchall()
            for row in rows:
                conn.execute("UPDATE frames SET stale=1, stale_reason=?, updated_at=? WHERE id=?",
                             (reason, utcnow(), row["id"]))
                self._event(conn, "stale", frame_id=row["id"], file=row["raw_name"],
                            message=reason, action="re-reduce")
            return len(rows)

    # ------------------------------------------------------------------ coadds
    def upsert_coadd(self, *, night: str, target: str, filter: str, path: str, stacktype: str,
                     ncombine: int, exptime: float | None = None, magzp: float | None = None,
                     grid: dict | None = None, members: list | None = None,
                     catalog: str | None = None, quicklook: str | None = None,
                     stats: dict | None = None, outdated: int = 0,
                     frame_updates: dict[int, dict] | None = None) -> int:
        with self.transaction() as conn:
            row = conn.execute("SELECT id, grid_json FROM coadds WHERE night=? AND target=? AND"
                               " filter=?", (night, target, filter)).fetchone()
            values = dict(path=path, stacktype=stacktype, ncombine=ncombine, exptime=exptime,
                          magzp=magzp, members_json=_json(members), catalog=catalog,
                          quicklook=quicklook, stats_json=_json(stats), outdated=outdated,
                          updated_at=utcnow())
            if grid is not None:
                values["grid_json"] = _json(grid)
            if row is None:
                cols = ["night", "target", "filter", *values]
                cur = conn.execute(
                    f"INSERT INTO coadds({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                    (night, target, filter, *values.values()))
                coadd_id = cur.lastrowid
            else:
                coadd_id = row["id"]
                assign = ", ".join(f"{k}=?" for k in values)
                conn.execute(f"UPDATE coadds SET {assign} WHERE id=?",
                             (*values.values(), coadd_id))
            for frame_id, update in (frame_updates or {}).items():
                self._apply_frame_update(conn, frame_id, update)
            return coadd_id

    def coadds(self, night: str | None = None) -> list[sqlite3.Row]:
        if night:
            return self.conn.execute("SELECT * FROM coadds WHERE night=? ORDER BY target, filter",
                                     (night,)).fetchall()
        return self.conn.execute("SELECT * FROM coadds ORDER BY night, target, filter").fetchall()

    def coadd(self, night: str, target: str, filter: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM coadds WHERE night=? AND target=? AND filter=?",
                                 (night, target, filter)).fetchone()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?,?)",
                         (key, json.dumps(value, default=str)))

    # ---- live lane (issue 21): forced photometry at targets, coadd depth
    FORCED_FIELDS = ("kind", "frame_id", "filter", "mjd", "mjd_start", "mjd_end", "exptime",
                     "ra", "dec", "x", "y", "flux", "fluxerr", "snr", "mag", "magerr",
                     "limmag", "uplim", "detected", "flags", "source", "product")

    def upsert_forced(self, night: str, target: str, key: str, **values) -> dict:
        """Record a forced measurement; the point of the same (night, target, key) is
        replaced (a re-reduced frame, an updated coadd), never added twice. Returns the
        target's previous point of another key, kind and the same filter (by time), or
        None, with ``others_detected``: how many other points of it were detected (read in
        the same transaction as the write: workers racing see each other), for the alert
        rules."""
        cols = {k: values.get(k) for k in self.FORCED_FIELDS}
        with self.transaction() as conn:
            prev = conn.execute(
                "SELECT * FROM forced WHERE night=? AND target=? AND key!=? AND filter IS ? "
                "AND kind=? AND mjd < ? ORDER BY mjd DESC LIMIT 1",
                (night, target, key, cols["filter"], cols["kind"],
                 cols["mjd"] if cols["mjd"] is not None else 1e9)).fetchone()
            others = conn.execute(
                "SELECT COUNT(*) FROM forced WHERE night=? AND target=? AND key!=? AND "
                "filter IS ? AND kind=? AND detected=1",
                (night, target, key, cols["filter"], cols["kind"])).fetchone()[0]
            names = ["night", "target", "key", *cols, "updated_at"]
            conn.execute(
                f"INSERT INTO forced({','.join(names)}) VALUES ({','.join('?' * len(names))}) "
                "ON CONFLICT(night, target, key) DO UPDATE SET "
                + ", ".join(f"{k}=excluded.{k}" for k in [*cols, "updated_at"]),
                (night, target, key, *cols.values(), utcnow()))
        return {"previous": dict(prev) if prev is not None else None,
                "others_detected": int(others)}

    def forced_points(self, night: str, target: str | None = None) -> list[dict]:
        """Forced measurements of a night (one target or all), in time order."""
        if target is None:
            rows = self.conn.execute("SELECT * FROM forced WHERE night=? ORDER BY target, mjd",
                                     (night,)).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM forced WHERE night=? AND target=? "
                                     "ORDER BY mjd", (night, target)).fetchall()
        return [dict(r) for r in rows]

    def forced_targets(self, night: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT target FROM forced WHERE night=? ORDER BY target", (night,))]

    def set_coadd_limmag(self, night: str, target: str, filter: str, limmag) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE coadds SET limmag=? WHERE night=? AND target=? AND filter=?",
                         (limmag, night, target, filter))

    def frame_qc_by_name(self, night: str, names) -> dict[str, dict]:
        """qc of the named frames of a night (``name`` -> qc dict)."""
        names = list(names)
        if not names:
            return {}
        rows = self.conn.execute(
            f"SELECT name, qc_json FROM frames WHERE night=? AND name IN "
            f"({','.join('?' * len(names))})", (night, *names)).fetchall()
        return {r["name"]: json.loads(r["qc_json"] or "{}") for r in rows}
