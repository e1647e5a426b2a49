"""The state store: one SQLite file (WAL) that knows every frame, master, coadd and error.

It is the single source of truth of photowatch: the daemon, ``reduce``,
``finalize`` and ``status`` all read and write it, possibly at the same time
from several processes. Every read-then-write runs in ``BEGIN IMMEDIATE``;
state changes are compare-and-set (``UPDATE ... WHERE state IN (...)``), so two
workers can never both take a frame; every state change and every error is
also written to the ``events`` table.

The store is sealed: this is the only module with SQL. Callers use named methods or
keyword filters on column names (``frames(kind="object", product=NOT_NULL)``), never
WHERE text. Tables are created and rows inserted/upserted with sqlite-utils; the schema
version is ``PRAGMA user_version`` and an older store is migrated when opened.

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

#: owner tokens of the stores opened by this process (a restarted daemon may get the pid of
#: the one that died, e.g. as PID 1 in a container: the token, not the pid, tells them apart)
_LIVE_OWNERS: set[str] = set()


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------- filters
# Callers select rows with keyword filters on column names, never with SQL text:
#   store.frames(night=n, kind="object", product=NOT_NULL, state=("reduced", "rejected"))
# A scalar is ``col = ?``, a list/tuple/set ``col IN (...)``, ``Not(...)`` ``col NOT IN``,
# ``NULL``/``NOT_NULL`` ``IS [NOT] NULL``, ``Like(pattern)`` ``col LIKE ?`` (see
# ``startswith``/``contains``). Column names are checked against the table.

class _Null:
    def __init__(self, negate: bool):
        self.negate = negate

    def __repr__(self) -> str:
        return "NOT_NULL" if self.negate else "NULL"


NULL = _Null(False)
NOT_NULL = _Null(True)


class Not(tuple):
    """``col=Not(("a", "b"))``: ``col NOT IN ('a', 'b')``."""


class Like(str):
    """``col=Like("pattern%")``: ``col LIKE 'pattern%'``."""


def startswith(prefix: str) -> Like:
    return Like(prefix + "%")


def contains(text: str) -> Like:
    return Like(f"%{text}%")


def _clause(column: str, value) -> tuple[str, list]:
    if isinstance(value, _Null):
        return f"{column} IS {'NOT ' if value.negate else ''}NULL", []
    if isinstance(value, Like):
        return f"{column} LIKE ?", [str(value)]
    if isinstance(value, Not):
        return (f"{column} NOT IN ({','.join('?' * len(value))})", list(value)) if value \
            else ("1=1", [])
    if isinstance(value, list | tuple | set | frozenset):
        value = list(value)
        return (f"{column} IN ({','.join('?' * len(value))})", value) if value else ("0", [])
    if value is None:
        raise TypeError(f"filter {column}=None: say NULL or NOT_NULL")
    if isinstance(value, bool):
        value = int(value)
    return f"{column} = ?", [value]


# ---------------------------------------------------------------------------- schema

# The schema is built with sqlite-utils, one function per version. A store written by an
# older release (``PRAGMA user_version`` = its version) runs the later steps when opened;
# a step, once released, never changes (tests/fixtures/state-v1.sqlite is a v1 store).
TEXT, INT, REAL = str, int, float


def _schema_v1(db: sqlite_utils.Database) -> None:
    """The tables of the first release (frames, files, masters, coadds, events, processes,
    meta), as they were written by raw DDL until the store moved to sqlite-utils."""
    db["frames"].create(
        {"id": INT, "sha256": TEXT, "path": TEXT, "raw_name": TEXT, "size": INT, "name": TEXT,
         "instrument": TEXT, "kind": TEXT, "camera": TEXT, "filter": TEXT, "exptime": REAL, "obs_time": TEXT,
         "night": TEXT, "target": TEXT, "binning": TEXT, "readout": TEXT, "info_json": TEXT,
         "header_json": TEXT, "state": TEXT, "reason": TEXT, "owner": TEXT, "tries": INT, "product": TEXT,
         "product_version": INT, "quicklook": TEXT, "masters_json": TEXT, "stale": INT,
         "stale_reason": TEXT, "provisional": INT, "qc_json": TEXT, "accepted": INT, "coadd": TEXT,
         "arrived_at": TEXT, "received_at": TEXT, "started_at": TEXT, "finished_at": TEXT,
         "updated_at": TEXT},
        pk="id",
        not_null=["sha256", "path", "raw_name", "size", "state", "tries", "product_version",
                  "stale", "provisional", "arrived_at", "received_at", "updated_at"],
        defaults={"tries": 0, "product_version": 0, "stale": 0, "provisional": 0})
    db["frames"].create_index(["sha256"], unique=True)
    db["frames"].create_index(["name"], unique=True)
    db["frames"].create_index(["state", "kind", "obs_time"], index_name="frames_state")
    db["frames"].create_index(["night", "kind"], index_name="frames_night")
    db["files"].create(
        {"path": TEXT, "sha256": TEXT, "frame_id": INT, "size": INT, "mtime": REAL, "duplicate": INT,
         "seen_at": TEXT},
        pk="path", foreign_keys=[("frame_id", "frames", "id")],
        not_null=["sha256", "frame_id", "size", "duplicate", "seen_at"],
        defaults={"duplicate": 0})
    db["masters"].create(
        {"id": INT, "kind": TEXT, "camera": TEXT, "filter": TEXT, "binning": TEXT, "readout": TEXT,
         "target": TEXT, "night": TEXT, "version": INT, "ninputs": INT, "inputs_json": TEXT, "path": TEXT,
         "provisional": INT, "final": INT, "obs_time": TEXT, "method": TEXT, "stats_json": TEXT,
         "created_at": TEXT},
        pk="id",
        not_null=["kind", "camera", "filter", "binning", "readout", "target", "night",
                  "version", "ninputs", "path", "provisional", "final", "created_at"],
        defaults={"filter": "", "readout": "", "target": "", "final": 0})
    db["masters"].create_index(["kind", "camera", "filter", "binning", "readout", "target",
                                "night", "version"], unique=True)
    db["masters"].create_index(["kind", "camera", "binning", "filter"],
                               index_name="masters_key")
    db["coadds"].create(
        {"id": INT, "night": TEXT, "target": TEXT, "filter": TEXT, "path": TEXT, "stacktype": TEXT,
         "ncombine": INT, "exptime": REAL, "magzp": REAL, "grid_json": TEXT, "members_json": TEXT,
         "catalog": TEXT, "quicklook": TEXT, "stats_json": TEXT, "outdated": INT, "updated_at": TEXT},
        pk="id",
        not_null=["night", "target", "filter", "path", "stacktype", "ncombine", "outdated",
                  "updated_at"],
        defaults={"ncombine": 0, "outdated": 0})
    db["coadds"].create_index(["night", "target", "filter"], unique=True)
    db["events"].create(
        {"id": INT, "time": TEXT, "frame_id": INT, "file": TEXT, "level": TEXT, "event": TEXT,
         "state_from": TEXT, "state_to": TEXT, "stage": TEXT, "error_class": TEXT, "message": TEXT,
         "action": TEXT, "owner": TEXT},
        pk="id", not_null=["time", "level", "event"])
    db["events"].create_index(["frame_id"], index_name="events_frame")
    db["processes"].create(
        {"owner": TEXT, "host": TEXT, "pid": INT, "command": TEXT, "started_at": TEXT, "heartbeat": REAL,
         "status": TEXT},
        pk="owner", not_null=["host", "pid", "started_at", "heartbeat"])
    db["meta"].create({"key": TEXT, "value": TEXT}, pk="key")


def _schema_v2(db: sqlite_utils.Database) -> None:
    """An index on ``files(frame_id)``: the paths of a frame (its duplicates, the file a
    re-read replaces) are looked up by frame, which scanned the whole table before."""
    db["files"].create_index(["frame_id"], index_name="files_frame", if_not_exists=True)


def _schema_candidates(db: sqlite_utils.Database) -> None:
    """Lane changes (issue 21): candidates of new, varying and moving sources, one row per
    detection on a frame; ``object_id`` groups a stationary object's detections or a moving
    track's (an asteroid: one track)."""
    db["candidates"].create(
        {"id": INT, "night": TEXT, "target": TEXT, "filter": TEXT, "frame_id": INT,
         "frame": TEXT, "obs_mjd": REAL, "ra": REAL, "dec": REAL, "x": REAL, "y": REAL,
         "mag": REAL, "magerr": REAL, "snr": REAL, "significance": REAL, "kind": TEXT,
         "ref_mag": REAL, "delta_mag": REAL, "limmag": REAL, "object_id": INT, "moving": INT,
         "rate_ra": REAL, "rate_dec": REAL, "cutout": TEXT, "ref_cutout": TEXT,
         "created_at": TEXT},
        pk="id", not_null=["night", "target", "filter", "frame_id", "frame", "ra", "dec", "kind",
                           "moving", "created_at"],
        defaults={"target": "", "filter": "", "moving": 0})
    db["candidates"].create_index(["night", "target", "kind"], index_name="candidates_field")
    db["candidates"].create_index(["frame_id"], index_name="candidates_frame")


def _schema_forced(db: sqlite_utils.Database) -> None:
    """Issue 21 (lane live): forced photometry at targets, one row per night, target and
    frame (``key`` = the frame's name) or quick-look coadd (``key`` = ``coadd:<filter>``):
    a re-reduction or a coadd update replaces its point; and each coadd's depth."""
    db["forced"].create({
        "id": int, "night": str, "target": str, "key": str, "kind": str, "frame_id": int,
        "filter": str, "mjd": float, "mjd_start": float, "mjd_end": float, "exptime": float,
        "ra": float, "dec": float, "x": float, "y": float, "flux": float, "fluxerr": float,
        "snr": float, "mag": float, "magerr": float, "limmag": float, "uplim": float,
        "detected": int, "flags": int, "source": str, "product": str, "updated_at": str,
    }, pk="id", not_null={"night", "target", "key", "kind", "updated_at"}, if_not_exists=True)
    db["forced"].create_index(["night", "target", "key"], index_name="forced_key",
                              unique=True, if_not_exists=True)
    db["forced"].create_index(["night", "target"], index_name="forced_night_target",
                              if_not_exists=True)
    # the coadds' depth in a table of its own: the coadds rows stay as they were
    db["coadd_depth"].create({"night": str, "target": str, "filter": str, "limmag": float},
                             pk=("night", "target", "filter"), if_not_exists=True)


MIGRATIONS = [_schema_v1, _schema_v2, _schema_candidates, _schema_forced]
SCHEMA_VERSION = len(MIGRATIONS)


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
                MIGRATIONS[version](self.db)
                conn.execute(f"PRAGMA user_version={version + 1}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _update(self, table: str, pk, values: dict) -> bool:
        """Set columns of one row (sqlite-utils); False if there is no such row."""
        try:
            self.db[table].update(pk, values)
        except sqlite_utils.db.NotFoundError:
            return False
        return True

    def _columns(self, table: str) -> frozenset[str]:
        cache = self.__dict__.setdefault("_column_cache", {})
        if table not in cache:
            cache[table] = frozenset(self.db[table].columns_dict)
        return cache[table]

    def _where(self, table: str, filters: dict, *extra: str) -> tuple[str, list]:
        """SQL condition and arguments for keyword ``filters`` (see ``_clause``)."""
        columns = self._columns(table)
        parts, args = list(extra), []
        for column, value in filters.items():
            if column not in columns:
                raise ValueError(f"{table} has no column {column!r}")
            sql, more = _clause(column, value)
            parts.append(sql)
            args += more
        return " AND ".join(f"({p})" for p in parts) or "1=1", args

    def _order(self, table: str, order: str) -> str:
        columns = self._columns(table)
        for part in order.split(","):
            words = part.split()
            if not (1 <= len(words) <= 2 and words[0] in columns
                    and (len(words) == 1 or words[1].upper() in ("ASC", "DESC"))):
                raise ValueError(f"cannot order {table} by {order!r}")
        return order

    # ------------------------------------------------------------------ events
    def _event(self, conn, event: str, *, frame_id=None, file=None, level="info",
               state_from=None, state_to=None, stage=None, error_class=None, message=None,
               action=None) -> None:
        self.db["events"].insert(dict(
            time=utcnow(), frame_id=frame_id, file=file, level=level, event=event,
            state_from=state_from, state_to=state_to, stage=stage, error_class=error_class,
            message=message, action=action, owner=self.owner))

    def event(self, event: str, **fields) -> None:
        """Record an event that is not a state change (an error, a master update...)."""
        with self.transaction() as conn:
            self._event(conn, event, **fields)

    # ------------------------------------------------------------------ processes
    def register_process(self, status: str = "starting") -> None:
        with self.transaction():
            self.db["processes"].insert(dict(
                owner=self.owner, host=self.host, pid=os.getpid(), command=self.command,
                started_at=utcnow(), heartbeat=time.time(), status=status), replace=True)

    def heartbeat(self, status: str | None = None) -> None:
        values = {"heartbeat": time.time()}
        if status is not None:
            values["status"] = status
        with self.transaction():
            self._update("processes", self.owner, values)

    def unregister_process(self) -> None:
        with self.transaction():
            self.db["processes"].delete_where("owner = ?", [self.owner])

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
            self.db["processes"].delete_where("heartbeat < ?", [time.time() - 7 * 86400])
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
                self.db["files"].insert(dict(path=path, sha256=sha256, frame_id=row["id"],
                                             size=size, mtime=mtime, duplicate=dup,
                                             seen_at=now), replace=True)
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
            columns = ("instrument", "kind", "camera", "filter", "exptime", "obs_time", "night",
                       "target", "binning", "readout")
            frame_id = self.db["frames"].insert(dict(
                sha256=sha256, path=path, raw_name=raw_name, size=size, name=name,
                **{k: fields.get(k) for k in columns}, info_json=_json(info),
                header_json=_json(header), state=state, reason=reason,
                arrived_at=arrived_at or now, received_at=now, updated_at=now,
                finished_at=now if state in TERMINAL else None)).last_rowid
            self.db["files"].insert(dict(path=path, sha256=sha256, frame_id=frame_id,
                                         size=size, mtime=mtime, duplicate=0, seen_at=now),
                                    replace=True)
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
        with self.transaction():
            self._update("frames", frame_id, sets)

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

    def wake_waiting(self, **filters) -> int:
        """Move waiting frames (matching keyword ``filters``) back to ``received`` (masters
        appeared); returns the count."""
        sql, args = self._where("frames", filters, "state='waiting'")
        with self.transaction() as conn:
            rows = conn.execute(f"SELECT id, raw_name FROM frames WHERE {sql}", args).fetchall()
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
            self._update("frames", frame_id, sets)
            if self.db["files"].count_where("path = ? AND frame_id = ?",
                                            [row["path"], frame_id]):
                self._update("files", row["path"], {"sha256": sha256, "size": size,
                                                    "mtime": mtime})
            return None

    def reset_tries(self, frame_id: int, tries: int = 0) -> None:
        with self.transaction():
            self._update("frames", frame_id, {"tries": tries})

    def uncount_try(self, frame_id: int) -> None:
        """The frame's last try does not count (a transient fault, not the frame's doing)."""
        with self.transaction() as conn:
            conn.execute("UPDATE frames SET tries=MAX(tries-1, 0) WHERE id=?", (frame_id,))

    def keep_final(self, frame_id: int, state: str, qc: dict, message: str) -> bool:
        """A stale product that the final masters barely change is kept and marked final
        (compare-and-set on ``stale=1`` and ``state``); False if another process took it."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE frames SET stale=0, stale_reason=NULL, provisional=0, qc_json=?, "
                "updated_at=? WHERE id=? AND stale=1 AND state=?",
                (json.dumps(qc), utcnow(), frame_id, state))
            if cur.rowcount:
                row = conn.execute("SELECT raw_name FROM frames WHERE id=?",
                                   (frame_id,)).fetchone()
                self._event(conn, "kept_final", frame_id=frame_id, file=row["raw_name"],
                            message=message, action="product kept, marked final")
            return bool(cur.rowcount)

    # ------------------------------------------------------------------ queries
    def frame(self, frame_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM frames WHERE id=?", (frame_id,)).fetchone()

    def frames(self, order: str = "obs_time, id", **filters) -> list[sqlite3.Row]:
        """Frames matching keyword ``filters`` (column=value, see ``_clause``), in ``order``
        (column names, checked against the table)."""
        sql, params = self._where("frames", filters)
        return self.conn.execute(
            f"SELECT * FROM frames WHERE {sql} ORDER BY {self._order('frames', order)}",
            params).fetchall()

    def frames_of_night(self, night: str | None = None, **filters) -> list[sqlite3.Row]:
        """The frames of a night (every night's when ``night`` is None) matching ``filters``,
        by observation time."""
        return self.frames(**({"night": night} if night else {}), **filters)

    def products_of_night(self, night: str, kind: str = "object") -> list[sqlite3.Row]:
        """Frames of a night (of ``kind``) that have a product."""
        return self.frames(night=night, kind=kind, product=NOT_NULL)

    def count_frames(self, **filters) -> int:
        sql, params = self._where("frames", filters)
        return self.conn.execute(f"SELECT COUNT(*) FROM frames WHERE {sql}", params).fetchone()[0]

    def frame_by_hash(self, sha256: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM frames WHERE sha256=?", (sha256,)).fetchone()

    def frame_named(self, name: str, night: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM frames WHERE name=? AND night=?",
                                 (name, night)).fetchone()

    def processing_here(self) -> list[sqlite3.Row]:
        """Frames this process holds ``processing``, the longest-held first."""
        return self.conn.execute(
            "SELECT * FROM frames WHERE state='processing' AND owner=? ORDER BY started_at, id",
            (self.owner,)).fetchall()

    def last_stage_error(self, frame_id: int) -> sqlite3.Row | None:
        """The frame's latest stage-failure event (None if it never failed)."""
        return self.conn.execute(
            "SELECT * FROM events WHERE frame_id=? AND error_class='stage' "
            "ORDER BY id DESC LIMIT 1", (frame_id,)).fetchone()

    def meta_with_prefix(self, prefix: str) -> dict[str, object]:
        """Every meta key starting with ``prefix`` → its value."""
        return {r["key"]: json.loads(r["value"])
                for r in self.db["meta"].rows_where("key LIKE ?", [prefix + "%"])}

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
                master_id = self.db["masters"].insert(dict(
                    kind=kind, camera=camera, filter=filter, binning=binning, readout=readout,
                    target=target, night=night, version=version, ninputs=ninputs,
                    inputs_json=_json(inputs), path=path, provisional=int(provisional),
                    final=int(final), obs_time=obs_time, method=method, stats_json=_json(stats),
                    created_at=utcnow())).last_rowid
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
        self._update("frames", frame_id, sets)
        if state is not None and state != row["state"]:
            self._event(conn, event or state, frame_id=frame_id, file=row["raw_name"],
                        state_from=row["state"], state_to=state, message=message,
                        level="warning" if state in ("rejected", "quarantined") else "info")

    def masters(self, **filters) -> list[sqlite3.Row]:
        """Masters matching keyword ``filters`` (column=value, see ``_clause``)."""
        sql, params = self._where("masters", filters)
        return self.conn.execute(
            f"SELECT * FROM masters WHERE {sql} ORDER BY night, kind, camera, filter, version",
            params).fetchall()

    def next_master_version(self, *, kind: str, camera: str, filter: str, binning: str,
                            readout: str, target: str, night: str) -> int:
        row = self.conn.execute(
            "SELECT MAX(version) FROM masters WHERE kind=? AND camera=? AND filter=? AND "
            "binning=? AND readout=? AND target=? AND night=?",
            (kind, camera, filter, binning, readout, target, night)).fetchone()
        return (row[0] or 0) + 1

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

    def mark_stale(self, frame_ids: Iterable[int], reason: str) -> int:
        """Mark frames with a product stale (a better master exists); returns the count."""
        sql, args = self._where("frames", {"id": list(frame_ids)},
                                "state IN ('reduced', 'rejected')", "product IS NOT NULL",
                                "stale=0")
        with self.transaction() as conn:
            rows = conn.execute(f"SELECT id, raw_name FROM frames WHERE {sql}", args).fetchall()
            for row in rows:
                self._update("frames", row["id"], {"stale": 1, "stale_reason": reason,
                                                   "updated_at": utcnow()})
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
                coadd_id = self.db["coadds"].insert(dict(
                    night=night, target=target, filter=filter, **values)).last_rowid
            else:
                coadd_id = row["id"]
                self._update("coadds", coadd_id, values)
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

    def set_coadd_catalog(self, coadd_id: int, catalog: str) -> None:
        with self.transaction():
            self._update("coadds", coadd_id, {"catalog": catalog})

    def readd_to_coadd(self, night: str, target: str, filter: str) -> None:
        """A coadd started afresh: every frame already in it must be added again."""
        with self.transaction() as conn:
            conn.execute("UPDATE frames SET coadd='pending' WHERE night=? AND target=? AND "
                         "filter=? AND coadd IN ('added', 'adding')", (night, target, filter))

    def resume_coadd_additions(self) -> None:
        """A coadd addition cut short (crash): the frame goes back to ``pending``."""
        with self.transaction() as conn:
            conn.execute("UPDATE frames SET coadd='pending' WHERE coadd='adding'")

    def claim_coadd_pending(self, nights: Iterable[str] | None = None) -> sqlite3.Row | None:
        """Take the earliest accepted frame whose coadd addition is pending (pending →
        adding, compare-and-set); None if there is none."""
        filters = {} if not nights else {"night": list(nights)}
        sql, args = self._where("frames", filters, "state='reduced'", "coadd='pending'",
                                "accepted=1")
        with self.transaction() as conn:
            row = conn.execute(f"SELECT * FROM frames WHERE {sql} ORDER BY obs_time LIMIT 1",
                               args).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE frames SET coadd='adding' WHERE id=? AND coadd='pending'",
                         (row["id"],))
            return row

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default=None):
        row = next(self.db["meta"].rows_where("key = ?", [key], select="value"), None)
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self.transaction():
            self.db["meta"].upsert({"key": key, "value": json.dumps(value, default=str)},
                                   pk="key")

    # ---- report lane
    # Named read-only queries of the report (report/facts.py) and of ``photowatch status``
    # and ``photowatch masters`` (run/status.py): no SQL outside the store.
    _FRAME_ORDER = "obs_time, id"
    _MASTER_ORDER = "night, kind, camera, filter, version"

    def frames_by_ids(self, ids) -> list[sqlite3.Row]:
        """The frames with these ids, by observation time."""
        ids = list(ids)
        rows: list[sqlite3.Row] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows += self.conn.execute(
                f"SELECT * FROM frames WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
        return sorted(rows, key=lambda r: (r["obs_time"] is not None, r["obs_time"] or "",
                                           r["id"]))

    def unclassified_frames_of_night(self, night: str) -> list[sqlite3.Row]:
        """Frames without a night (unclassifiable) whose nearest frame by id has ``night``."""
        rows = []
        for row in self.conn.execute(
                f"SELECT * FROM frames WHERE night IS NULL ORDER BY {self._FRAME_ORDER}"):
            near = self.conn.execute(
                "SELECT night FROM frames WHERE night IS NOT NULL ORDER BY ABS(id - ?), id "
                "LIMIT 1", (row["id"],)).fetchone()
            if near is not None and near["night"] == night:
                rows.append(row)
        return rows

    def problem_state_frames(self, night: str | None = None) -> list[sqlite3.Row]:
        """Quarantined, held and rejected frames of a night and the unclassified ones
        (every night's when ``night`` is None)."""
        sql = "SELECT * FROM frames WHERE state IN ('quarantined', 'held', 'rejected')"
        args: tuple = ()
        if night:
            sql += " AND (night=? OR night IS NULL)"
            args = (night,)
        return self.conn.execute(f"{sql} ORDER BY {self._FRAME_ORDER}", args).fetchall()

    def object_frames_with_masters(self) -> list[sqlite3.Row]:
        """Science frames that recorded the masters they were reduced with."""
        return self.conn.execute(
            "SELECT * FROM frames WHERE masters_json IS NOT NULL AND kind='object' "
            f"ORDER BY {self._FRAME_ORDER}").fetchall()

    def first_terminal_times(self, ids) -> dict[int, str]:
        """Time of each frame's first terminal state (its first product), from the events."""
        ids = list(ids)
        done: dict[int, str] = {}
        marks = ",".join("?" * len(TERMINAL))
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self.conn.execute(
                f"SELECT frame_id, MIN(time) t FROM events WHERE state_to IN ({marks}) AND "
                f"frame_id IN ({','.join('?' * len(chunk))}) GROUP BY frame_id",
                (*TERMINAL, *chunk)).fetchall()
            done.update({r["frame_id"]: r["t"] for r in rows})
        return done

    def night_problem_events(self, night: str, frame_ids=(), between=None,
                             limit: int = 25) -> list[sqlite3.Row]:
        """The newest warning/error events of a night: of its frames, of the frames
        ``frame_ids`` (unclassified ones listed with it), and of no frame between the
        two times ``between`` (first, last)."""
        frame_ids = list(frame_ids)
        where, args = ["f.night = ?"], [night]
        if frame_ids:
            where.append(f"e.frame_id IN ({','.join('?' * len(frame_ids))})")
            args += frame_ids
        if between:
            where.append("(e.frame_id IS NULL AND e.time BETWEEN ? AND ?)")
            args += [between[0], between[1]]
        return self.conn.execute(
            "SELECT e.* FROM events e LEFT JOIN frames f ON f.id = e.frame_id "
            f"WHERE e.level IN ('warning', 'error') AND ({' OR '.join(where)}) "
            "ORDER BY e.id DESC LIMIT ?", (*args, limit)).fetchall()

    def night_header_value(self, night: str, key: str) -> str | None:
        """The first value of header keyword ``key`` among a night's frames, or None."""
        path = f"$.{key}"
        row = self.conn.execute(
            "SELECT json_extract(header_json, ?) v FROM frames WHERE night=? AND "
            "json_extract(header_json, ?) IS NOT NULL LIMIT 1", (path, night, path)).fetchone()
        return str(row["v"]) if row else None

    def masters_of_night(self, night: str | None = None) -> list[sqlite3.Row]:
        """Every version of every master of a night (of all nights when ``night`` is None)."""
        if night:
            return self.conn.execute(
                f"SELECT * FROM masters WHERE night=? ORDER BY {self._MASTER_ORDER}",
                (night,)).fetchall()
        return self.conn.execute(f"SELECT * FROM masters ORDER BY {self._MASTER_ORDER}").fetchall()

    def masters_from_other_nights(self, night: str, ids) -> list[sqlite3.Row]:
        """The masters with these ids that were not made for ``night``."""
        ids = [i for i in ids if i is not None]
        if not ids:
            return []
        return self.conn.execute(
            f"SELECT * FROM masters WHERE night != ? AND id IN ({','.join('?' * len(ids))}) "
            f"ORDER BY {self._MASTER_ORDER}", (night, *ids)).fetchall()

    def duplicate_files(self) -> list[sqlite3.Row]:
        """Files seen with the content of a frame already known (path, frame_id), oldest first."""
        return self.conn.execute(
            "SELECT path, frame_id FROM files WHERE duplicate=1 ORDER BY seen_at").fetchall()

    def processes(self) -> list[sqlite3.Row]:
        """The photowatch processes registered on this store."""
        return self.conn.execute(
            "SELECT owner, command, started_at, heartbeat, status FROM processes").fetchall()

    # ---- chain lane
    def night_quality(self, night: str, filt: str | None = None) -> list[dict]:
        """The night's object frames with quality numbers (qc recorded), for the one
        night-quality context (:func:`photowatch.stages.quality.night_context`): id,
        filter, target, camera, state, has_product and the qc fields it reads."""
        sql = ("SELECT id, filter, target, camera, state, product IS NOT NULL AS has_product, "
               "json_extract(qc_json, '$.fwhm_arcsec') AS fwhm_arcsec, "
               "json_extract(qc_json, '$.apcor_own') AS apcor_own, "
               "json_extract(qc_json, '$.apcor_own_err') AS apcor_own_err, "
               "json_extract(qc_json, '$.zp_per_s') AS zp_per_s, "
               "json_extract(qc_json, '$.transparency_mag') AS transparency_mag "
               "FROM frames WHERE night=? AND kind='object' AND qc_json IS NOT NULL")
        args: tuple = (night,)
        if filt is not None:
            sql += " AND filter=?"
            args += (filt,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args).fetchall()]

    def field_solutions(self, night: str, target: str | None, camera: str | None,
                        limit: int = 16) -> list[dict]:
        """The newest ``limit`` solved object frames of a field (night, target, camera),
        oldest first: id, product, qc (dict); to rebuild the engine's remembered
        solutions after a restart."""
        rows = self.conn.execute(
            "SELECT id, product, qc_json FROM frames WHERE night=? AND target IS ? AND "
            "camera IS ? AND kind='object' AND product IS NOT NULL AND "
            "json_extract(qc_json, '$.aststat') IN ('ok', 'relative') "
            "ORDER BY obs_time DESC, id DESC LIMIT ?", (night, target, camera, limit)).fetchall()
        return [{"id": r["id"], "product": r["product"], "qc": json.loads(r["qc_json"])}
                for r in reversed(rows)]

    # ---- reprocess lane
    def export_rows(self) -> dict[str, list[dict]]:
        """Every row of the store's tables but ``processes`` (a night's scratch store, whole).

        The reprocess coordinator imports them into the one store (:meth:`import_rows`).
        """
        out = {}
        for table in ("frames", "files", "masters", "coadds", "events", "meta"):
            out[table] = [dict(r) for r in self.conn.execute(
                f"SELECT * FROM {table} ORDER BY rowid")]
        return out

    def seed_masters(self, rows: list[dict]) -> None:
        """Master rows of other nights (the calibration library), ids kept, no events."""
        with self.transaction() as conn:
            for row in rows:
                cols = list(row)
                conn.execute(f"INSERT OR IGNORE INTO masters({','.join(cols)}) VALUES "
                             f"({','.join('?' * len(cols))})", tuple(row.values()))

    def has_frame_hash(self, sha256: str) -> bool:
        return self.conn.execute("SELECT 1 FROM frames WHERE sha256=?",
                                 (sha256,)).fetchone() is not None

    def import_rows(self, rows: dict[str, list[dict]], *, night: str,
                    rewrite=lambda v: v) -> dict[str, int]:
        """Add one night's rows (from another store's :meth:`export_rows`), in one commit.

        Ids are new (this store's); every reference is mapped: ``files.frame_id``,
        ``events.frame_id``, ``masters.inputs_json`` (frame ids), the ``master_id`` of
        ``frames.masters_json``. Master rows of other nights (seeded calibration library)
        map to the rows already here. ``rewrite`` is applied to every text value (paths
        of the scratch folder → the output folder). A night whose frames are already here
        is not added again (returns zero counts): nothing is recorded twice.
        """
        def fix(row: dict, skip=("id",)) -> dict:
            return {k: (rewrite(v) if isinstance(v, str) else v) for k, v in row.items()
                    if k not in skip}

        def insert(conn, table: str, row: dict) -> int:
            cols = list(row)
            cur = conn.execute(f"INSERT INTO {table}({','.join(cols)}) VALUES "
                               f"({','.join('?' * len(cols))})", tuple(row.values()))
            return cur.lastrowid

        counts = {t: 0 for t in ("frames", "files", "masters", "coadds", "events", "meta")}
        with self.transaction() as conn:
            if any(conn.execute("SELECT 1 FROM frames WHERE sha256=?",
                                (f["sha256"],)).fetchone() for f in rows["frames"]):
                return counts
            fmap: dict[int, int] = {}
            for f in rows["frames"]:
                fmap[f["id"]] = insert(conn, "frames", fix(f))
                counts["frames"] += 1
            mmap: dict[int, int] = {}
            keys = ("kind", "camera", "filter", "binning", "readout", "target", "night",
                    "version")
            for m in rows["masters"]:
                have = conn.execute(
                    "SELECT id FROM masters WHERE " + " AND ".join(f"{k}=?" for k in keys),
                    tuple(m[k] for k in keys)).fetchone()
                if have is not None and m["night"] != night:
                    mmap[m["id"]] = have["id"]
                    continue
                row = fix(m)
                if row.get("inputs_json"):
                    row["inputs_json"] = _json([fmap.get(i, i) for i in
                                                json.loads(row["inputs_json"])])
                mmap[m["id"]] = insert(conn, "masters", row)
                counts["masters"] += 1
            for new in fmap.values():
                mj = conn.execute("SELECT masters_json FROM frames WHERE id=?",
                                  (new,)).fetchone()[0]
                if not mj:
                    continue
                used = json.loads(mj)
                for entry in used.values():
                    if isinstance(entry, dict) and entry.get("master_id") is not None:
                        entry["master_id"] = mmap.get(entry["master_id"], entry["master_id"])
                conn.execute("UPDATE frames SET masters_json=? WHERE id=?", (_json(used), new))
            for f in rows["files"]:
                row = fix(f, skip=())
                row["frame_id"] = fmap[row["frame_id"]]
                conn.execute("INSERT OR REPLACE INTO files(" + ",".join(row) + ") VALUES (" +
                             ",".join("?" * len(row)) + ")", tuple(row.values()))
                counts["files"] += 1
            for c in rows["coadds"]:
                conn.execute("DELETE FROM coadds WHERE night=? AND target=? AND filter=?",
                             (c["night"], c["target"], c["filter"]))
                insert(conn, "coadds", fix(c))
                counts["coadds"] += 1
            for e in rows["events"]:
                row = fix(e)
                if row.get("frame_id") is not None:
                    row["frame_id"] = fmap.get(row["frame_id"])
                insert(conn, "events", row)
                counts["events"] += 1
            for m in rows["meta"]:
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?,?)",
                             (rewrite(m["key"]), rewrite(m["value"]) if m["value"] else None))
                counts["meta"] += 1
        return counts

    # ---- changes lane
    # Candidates of new, varying and moving sources (run/changes.py, report/candidates.py).
    _CANDIDATE_COLUMNS = ("night", "target", "filter", "frame", "obs_mjd", "ra", "dec", "x",
                          "y", "mag", "magerr", "snr", "significance", "kind", "ref_mag",
                          "delta_mag", "limmag", "cutout", "ref_cutout")

    def replace_candidates(self, frame_id: int, rows: list[dict]) -> list[int]:
        """The candidates of one frame, replacing those of its earlier reduction; their ids."""
        now = utcnow()
        ids = []
        with self.transaction():
            self.db["candidates"].delete_where("frame_id = ?", [frame_id])
            for row in rows:
                ids.append(self.db["candidates"].insert(dict(
                    {c: row.get(c) for c in self._CANDIDATE_COLUMNS}, frame_id=frame_id,
                    moving=0, created_at=now)).last_rowid)
        return ids

    def set_candidate_cutouts(self, candidate_id: int, cutout: str | None,
                              ref_cutout: str | None) -> None:
        with self.transaction():
            self._update("candidates", candidate_id,
                         {"cutout": cutout, "ref_cutout": ref_cutout})

    def candidates(self, night: str, target: str | None = None,
                   kind: str | None = None) -> list[sqlite3.Row]:
        """A night's candidates (of one target, of one kind), in time order."""
        filters = {"night": night, **({"target": target} if target is not None else {}),
                   **({"kind": kind} if kind is not None else {})}
        sql, params = self._where("candidates", filters)
        return self.conn.execute(f"SELECT * FROM candidates WHERE {sql} ORDER BY obs_mjd, id",
                                 params).fetchall()

    def set_candidate_links(self, links: list[tuple]) -> None:
        """(candidate id, object id, moving, rate_ra, rate_dec) for each linked detection."""
        with self.transaction():
            for i, o, m, ra, dec in links:
                self._update("candidates", i, {"object_id": o, "moving": int(m),
                                               "rate_ra": ra, "rate_dec": dec})

    def latest_science_frame(self, night: str) -> sqlite3.Row | None:
        """The night's science frame reduced last (reduced or not stacked, with a product)."""
        sql, params = self._where("frames", {"night": night, "kind": "object",
                                             "state": ("reduced", "rejected"),
                                             "product": NOT_NULL})
        return self.conn.execute(f"SELECT * FROM frames WHERE {sql} "
                                 "ORDER BY finished_at DESC, id DESC LIMIT 1",
                                 params).fetchone()

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
            conn.execute("INSERT OR REPLACE INTO coadd_depth(night, target, filter, limmag) "
                         "VALUES (?,?,?,?)", (night, target, filter, limmag))

    def coadd_limmag(self, night: str, target: str, filter: str) -> float | None:
        row = self.conn.execute("SELECT limmag FROM coadd_depth WHERE night=? AND target=? "
                                "AND filter=?", (night, target, filter)).fetchone()
        return row[0] if row else None

    def frame_qc_by_name(self, night: str, names) -> dict[str, dict]:
        """qc of the named frames of a night (``name`` -> qc dict)."""
        names = list(names)
        if not names:
            return {}
        rows = self.conn.execute(
            f"SELECT name, qc_json FROM frames WHERE night=? AND name IN "
            f"({','.join('?' * len(names))})", (night, *names)).fetchall()
        return {r["name"]: json.loads(r["qc_json"] or "{}") for r in rows}

    # ---- cpu1k2 lane
    def frame_has_candidates(self, frame_id: int) -> bool:
        """Whether a frame has candidates recorded (from an earlier reduction)."""
        return self.conn.execute("SELECT 1 FROM candidates WHERE frame_id=? LIMIT 1",
                                 (frame_id,)).fetchone() is not None
