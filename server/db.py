"""The server's state: one SQLite file in WAL mode (the embedded default) or a PostgreSQL
database shared by several servers (server/pgstore.py); one schema, versioned with the same
migrations, and one SQL code path (`?` parameters, `ON CONFLICT`, `RETURNING`, `CASE`).

Writers use `BEGIN IMMEDIATE` transactions (the write lock is taken up front, so two
enrollments never read the same counter value) and `busy_timeout` to wait for each other;
readers never block in WAL mode. Connections come from a small pool: one per thread at a
time. `synchronous=NORMAL` in WAL mode survives a killed process (not a power loss of the
last commits) and always leaves a consistent database.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fwbuild.errors import FwbuildError

if TYPE_CHECKING:
    from .config import ServerConfig

BUSY_TIMEOUT_MS = 60_000

# (version, statements). Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE certificates (
    serial INTEGER PRIMARY KEY,
    node_mac TEXT NOT NULL,
    key_id TEXT NOT NULL,
    principals TEXT NOT NULL,
    valid_after INTEGER NOT NULL,
    valid_before INTEGER NOT NULL,
    public_key TEXT NOT NULL,
    certificate TEXT NOT NULL,
    private_key TEXT,
    issued_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE nodes (
    mac TEXT PRIMARY KEY,
    vpn_mac TEXT NOT NULL UNIQUE,
    boot_mode TEXT CHECK (boot_mode IN ('enforced', 'permissive')),
    state TEXT NOT NULL CHECK (state IN ('enrolled', 'revoked')),
    cert_serial INTEGER NOT NULL UNIQUE REFERENCES certificates(serial),
    enrolled_at INTEGER NOT NULL,
    last_seen INTEGER,
    last_boot INTEGER,
    eeprom_ts INTEGER NOT NULL,
    eeprom_digest TEXT,
    eeprom_key TEXT
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_mac TEXT NOT NULL,
    artifact TEXT NOT NULL,
    time INTEGER NOT NULL,
    result TEXT NOT NULL,
    client TEXT
);
CREATE INDEX events_node ON events(node_mac, id);
"""),
    (2, """
CREATE INDEX certificates_node ON certificates(node_mac, serial);
CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
"""),
    (3, """
CREATE INDEX events_time ON events(time);
"""),
    (4, """
ALTER TABLE nodes ADD COLUMN label TEXT;
ALTER TABLE nodes ADD COLUMN fetched_digest TEXT;
ALTER TABLE nodes ADD COLUMN fetched_at INTEGER;
CREATE UNIQUE INDEX nodes_label ON nodes(label) WHERE label IS NOT NULL;
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class StateError(FwbuildError):
    """The state database cannot be opened or is newer than this server."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What the queries need of a connection: sqlite3's, or server.pgstore's adapter."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


class Store(Protocol):
    """Either state database (SQLite `Database` or `pgstore.PgDatabase`)."""

    dialect: str

    def connection(self) -> contextlib.AbstractContextManager[Conn]: ...

    def transaction(self) -> contextlib.AbstractContextManager[Conn]: ...

    def close(self) -> None: ...

    def schema_version(self) -> int: ...

    def integrity_check(self) -> str: ...

    def wait_change(self, timeout: float, stop: threading.Event) -> None: ...


CHANGES = "changes"  # counter bumped by every write other instances must follow


def open_database(config: ServerConfig) -> Store:
    """The configured state database: PostgreSQL when `server.database` names one."""
    if config.database_url is not None:
        from .pgstore import PgDatabase
        return PgDatabase(config.database_url)
    return Database(config.database)


def state_exists(config: ServerConfig) -> bool:
    """Whether the state database exists (a PostgreSQL database is the admin's to create)."""
    return config.database_url is not None or config.database.exists()


@dataclass(frozen=True)
class NodeRow:
    mac: str
    vpn_mac: str
    boot_mode: str | None
    state: str
    cert_serial: int
    enrolled_at: int
    last_seen: int | None
    last_boot: int | None
    eeprom_ts: int
    eeprom_digest: str | None
    eeprom_key: str | None
    label: str | None = None  # the admin's name for the node (`fwbuild nodes label`)
    fetched_digest: str | None = None  # sha256 of the last pieeprom.bin the node fetched whole
    fetched_at: int | None = None


@dataclass(frozen=True)
class CertRow:
    serial: int
    node_mac: str
    key_id: str
    principals: str
    valid_after: int
    valid_before: int
    public_key: str
    certificate: str
    private_key: str | None
    issued_at: int
    revoked_at: int | None


@dataclass(frozen=True)
class EventRow:
    id: int
    node_mac: str
    artifact: str
    time: int
    result: str
    client: str | None


class Database:
    """A pool of connections to one SQLite file; migrated to SCHEMA_VERSION when opened."""

    dialect = "sqlite"

    def __init__(self, path: Path, pool_size: int = 16) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # The database holds node private keys: create it 0600 before SQLite touches it.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # A restored or hand-made database keeps its mode: make it private (it holds node keys).
        os.chmod(path.parent, 0o700)
        os.chmod(path, 0o600)
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue(maxsize=pool_size)
        with self.connection() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StateError(f"cannot switch the database to WAL mode (got {mode})", str(path))
            self._migrate(conn)

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database: {exc}", str(self.path)) from None
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            try:
                self._pool.put_nowait(conn)
            except queue.Full:
                conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed on success, rolled back on error."""
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StateError(f"state database has schema version {current}, this server "
                                 f"knows up to {SCHEMA_VERSION}", str(self.path),
                                 "run a newer fwbuild, or restore a backup")
            for version, script in MIGRATIONS:
                if version > current:
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def schema_version(self) -> int:
        with self.connection() as conn:
            return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    def integrity_check(self) -> str:
        with self.connection() as conn:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

    def wait_change(self, timeout: float, stop: threading.Event) -> None:
        """Block until another process may have changed the state (SQLite: a poll)."""
        stop.wait(timeout)


def changes(conn: Conn) -> int:
    """The change counter (compare two reads to know whether to re-sync)."""
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (CHANGES,)).fetchone()
    return int(row[0]) if row else 0


def note_change(conn: Conn) -> None:
    """Bump the change counter (inside the write transaction); PostgreSQL also notifies the
    listening instances at commit."""
    next_counter(conn, CHANGES)
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        conn.execute("SELECT pg_notify('fwbuild_changes', '')")


def next_counter(conn: Conn, name: str) -> int:
    """Increment and return a named counter (call inside a write transaction)."""
    conn.execute("INSERT INTO counters(name, value) VALUES (?, 0) ON CONFLICT(name) DO NOTHING",
                 (name,))
    conn.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
    return int(conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])


_NODE_COLS = ", ".join(NodeRow.__dataclass_fields__)
_CERT_COLS = ", ".join(CertRow.__dataclass_fields__)
_EVENT_COLS = ", ".join(EventRow.__dataclass_fields__)


def get_node(conn: Conn, mac: str) -> NodeRow | None:
    row = conn.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE mac = ?", (mac,)).fetchone()
    return NodeRow(*row) if row else None


def get_node_by_label(conn: Conn, label: str) -> NodeRow | None:
    row = conn.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE label = ?", (label,)).fetchone()
    return NodeRow(*row) if row else None


def list_nodes(conn: Conn) -> list[NodeRow]:
    return [NodeRow(*r) for r in conn.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY mac")]


def get_cert(conn: Conn, serial: int) -> CertRow | None:
    row = conn.execute(f"SELECT {_CERT_COLS} FROM certificates WHERE serial = ?",
                       (serial,)).fetchone()
    return CertRow(*row) if row else None


def node_certs(conn: Conn, mac: str) -> list[CertRow]:
    return [CertRow(*r) for r in conn.execute(
        f"SELECT {_CERT_COLS} FROM certificates WHERE node_mac = ? ORDER BY serial", (mac,))]


def revoked_public_keys(conn: Conn) -> list[tuple[int, str, str]]:
    """(serial, key_id, public key line) of every revoked certificate, by serial."""
    return [(int(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
        "SELECT serial, key_id, public_key FROM certificates WHERE revoked_at IS NOT NULL "
        "ORDER BY serial")]


def recent_events(conn: Conn, mac: str | None = None,
                  limit: int = 50) -> list[EventRow]:
    if mac is None:
        rows = conn.execute(f"SELECT {_EVENT_COLS} FROM events ORDER BY id DESC LIMIT ?", (limit,))
    else:
        rows = conn.execute(f"SELECT {_EVENT_COLS} FROM events WHERE node_mac = ? "
                            "ORDER BY id DESC LIMIT ?", (mac, limit))
    return [EventRow(*r) for r in rows]


def prune_events(conn: Conn, older_than: int, keep: int) -> int:
    """Delete events older than `older_than` and all but the newest `keep`; rows deleted."""
    deleted = conn.execute("DELETE FROM events WHERE time < ?", (older_than,)).rowcount
    row = conn.execute("SELECT max(id) FROM events").fetchone()
    if row[0] is not None:
        deleted += conn.execute("DELETE FROM events WHERE id <= ?", (row[0] - keep,)).rowcount
    return int(deleted)


def insert_cert(conn: Conn, cert: CertRow) -> None:
    conn.execute(f"INSERT INTO certificates({_CERT_COLS}) VALUES ({', '.join('?' * 11)})",
                 tuple(cert.__dict__.values()))
