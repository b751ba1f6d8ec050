"""The coordination server's persistent state: one SQLite database, ``control.db``, in WAL mode.

The schema version is SQLite's ``user_version``; :data:`MIGRATIONS` lists the steps from 0, and
opening a database applies the missing ones, each in its own transaction. Every change that
touches more than one row (registering a node and using up its auth key, deleting a node) runs in
one transaction, so a ``kill -9`` at any instant leaves either all of it or none of it.

With ``synchronous=NORMAL`` a WAL database survives a crash of the process at any point; only a
power failure may lose the last transactions (never corrupt the file).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from embedmesh.control.authkeys import AuthKeyRecord
from embedmesh.control.errors import StoreError

#: Each entry moves the schema from version ``index`` to ``index + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE auth_keys (
            id TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL,
            reusable INTEGER NOT NULL,
            ephemeral INTEGER NOT NULL,
            preapproved INTEGER NOT NULL,
            tags TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL,
            revoked REAL,
            uses INTEGER NOT NULL DEFAULT 0,
            last_used REAL
        )""",
        # AUTOINCREMENT: a node id is never handed out twice, so clients may key peers by id.
        """CREATE TABLE nodes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            machine_key BLOB NOT NULL UNIQUE,
            node_key BLOB NOT NULL UNIQUE,
            disco_key BLOB NOT NULL,
            hostname TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE,
            os TEXT NOT NULL,
            tags TEXT NOT NULL,
            ipv4 INTEGER NOT NULL UNIQUE,
            ephemeral INTEGER NOT NULL,
            authorized INTEGER NOT NULL,
            key_expiry REAL,
            created REAL NOT NULL,
            last_seen REAL,
            auth_key_id TEXT REFERENCES auth_keys(id) ON DELETE SET NULL,
            user TEXT NOT NULL
        )""",
        """CREATE TABLE handshakes (
            machine_key BLOB PRIMARY KEY,
            last_timestamp INTEGER NOT NULL
        )""",
    ),
    # 1 -> 2: a node waiting for approval holds no address (anyone who reaches a server that
    # takes keyless registrations can make one), so ``ipv4`` becomes nullable. SQLite cannot drop
    # a NOT NULL constraint in place: the table is rebuilt, keeping AUTOINCREMENT's high-water
    # mark so that the id of a deleted node is still never handed out again.
    (
        """CREATE TABLE nodes_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            machine_key BLOB NOT NULL UNIQUE,
            node_key BLOB NOT NULL UNIQUE,
            disco_key BLOB NOT NULL,
            hostname TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE,
            os TEXT NOT NULL,
            tags TEXT NOT NULL,
            ipv4 INTEGER UNIQUE,
            ephemeral INTEGER NOT NULL,
            authorized INTEGER NOT NULL,
            key_expiry REAL,
            created REAL NOT NULL,
            last_seen REAL,
            auth_key_id TEXT REFERENCES auth_keys(id) ON DELETE SET NULL,
            user TEXT NOT NULL
        )""",
        """INSERT INTO nodes_new SELECT id, machine_key, node_key, disco_key, hostname, name, os, tags,
            CASE WHEN authorized THEN ipv4 ELSE NULL END, ephemeral, authorized, key_expiry, created,
            last_seen, auth_key_id, user FROM nodes""",
        """DELETE FROM sqlite_sequence WHERE name = 'nodes_new'""",
        """INSERT INTO sqlite_sequence(name, seq)
            SELECT 'nodes_new', MAX(seq) FROM (
                SELECT seq FROM sqlite_sequence WHERE name = 'nodes'
                UNION ALL SELECT COALESCE(MAX(id), 0) AS seq FROM nodes
            )""",
        """DROP TABLE nodes""",
        """ALTER TABLE nodes_new RENAME TO nodes""",
    ),
    # 2 -> 3: users. Nodes belong to a user (``default`` unless their auth key names one) or, when
    # tagged, to ``tagged-devices``; an auth key may name the user its nodes join as.
    (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            created REAL NOT NULL
        )""",
        """INSERT INTO users(name, display_name, created) VALUES ('default', 'default', 0)""",
        # Whatever owners older servers wrote (only ``default`` and ``tagged-devices``).
        """INSERT OR IGNORE INTO users(name, display_name, created)
            SELECT DISTINCT user, user, 0 FROM nodes WHERE user <> 'tagged-devices'""",
        """ALTER TABLE auth_keys ADD COLUMN user TEXT REFERENCES users(name)""",
    ),
    # 3 -> 4: Tailscale's control protocol replaced embedmesh's own, whose handshakes carried
    # timestamps the server kept per machine against replays (Noise IK in ts2021 has none: a
    # replayed initiation gets a response nobody but the machine can read). Nodes, keys, users
    # and settings stay; a node re-registers once with its node key.
    ("""DROP TABLE handshakes""",),
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(slots=True)
class NodeRecord:
    """A node as persisted. ``id`` is 0 until the row is inserted."""

    id: int
    machine_key: bytes
    node_key: bytes
    disco_key: bytes
    hostname: str
    name: str
    os: str
    tags: tuple[str, ...]
    #: None while the node waits for approval: it gets an address when it is approved.
    ipv4: int | None
    ephemeral: bool
    authorized: bool
    key_expiry: float | None
    created: float
    last_seen: float | None
    auth_key_id: str | None
    user: str

    def __repr__(self) -> str:
        return f"NodeRecord(id={self.id}, name={self.name!r}, ipv4={self.ipv4}, authorized={self.authorized})"


@dataclass(slots=True)
class UserRecord:
    """A user: the owner of the untagged nodes that joined with its keys. ``id`` is stable (it
    becomes the user's ID in Tailscale's network maps) and never reused."""

    id: int
    name: str
    display_name: str
    created: float


_NODE_COLUMNS = tuple(f.name for f in fields(NodeRecord))
_KEY_COLUMNS = tuple(f.name for f in fields(AuthKeyRecord))


def _node_from_row(row: sqlite3.Row) -> NodeRecord:
    values = dict(zip(_NODE_COLUMNS, row, strict=True))
    values["tags"] = tuple(json.loads(values["tags"]))
    values["ephemeral"] = bool(values["ephemeral"])
    values["authorized"] = bool(values["authorized"])
    return NodeRecord(**values)


def _key_from_row(row: sqlite3.Row) -> AuthKeyRecord:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["tags"] = tuple(json.loads(values["tags"]))
    for flag in ("reusable", "ephemeral", "preapproved"):
        values[flag] = bool(values[flag])
    return AuthKeyRecord(**values)


def _to_column(name: str, value: Any) -> Any:
    if name == "tags":
        return json.dumps(list(value))
    if isinstance(value, bool):
        return int(value)
    return value


def create_private_file(path: Path, data: bytes | None = None) -> None:
    """Create (or tighten) ``path`` with mode 0600, optionally writing ``data`` atomically."""
    if data is None:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def prepare_state_dir(path: Path) -> None:
    """Create the state directory with mode 0700 (or tighten an existing one)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class Store:
    """Typed access to ``control.db``; ``path=None`` keeps everything in memory (tests)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            # SQLite gives the -wal and -shm files the main file's mode, so creating it 0600 first
            # keeps all three private.
            create_private_file(path)
        try:
            self._db = sqlite3.connect(
                ":memory:" if path is None else str(path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open {path}: {exc}; is it a control.db?") from exc
        self._in_transaction = False

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this embedmesh understands "
                f"({SCHEMA_VERSION}): upgrade embedmesh"
            )
        for step in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[step]:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={step + 1}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all (re-entrant: inner blocks join)."""
        if self._in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._in_transaction = False
            self._db.execute("ROLLBACK")
            raise
        self._in_transaction = False
        self._db.execute("COMMIT")

    def healthy(self) -> bool:
        """True if the database answers a query (what ``/health`` reports)."""
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ------------------------------------------------------------------ auth keys

    def insert_auth_key(self, record: AuthKeyRecord) -> None:
        placeholders = ", ".join("?" for _ in _KEY_COLUMNS)
        self._db.execute(
            f"INSERT INTO auth_keys({', '.join(_KEY_COLUMNS)}) VALUES ({placeholders})",
            tuple(_to_column(name, getattr(record, name)) for name in _KEY_COLUMNS),
        )

    def get_auth_key(self, key_id: str) -> AuthKeyRecord | None:
        row = self._db.execute(
            f"SELECT {', '.join(_KEY_COLUMNS)} FROM auth_keys WHERE id = ?", (key_id,)
        ).fetchone()
        return None if row is None else _key_from_row(row)

    def list_auth_keys(self) -> list[AuthKeyRecord]:
        rows = self._db.execute(f"SELECT {', '.join(_KEY_COLUMNS)} FROM auth_keys ORDER BY created, id")
        return [_key_from_row(row) for row in rows]

    def revoke_auth_key(self, key_id: str, now: float) -> bool:
        cursor = self._db.execute(
            "UPDATE auth_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (now, key_id)
        )
        return cursor.rowcount == 1

    def use_auth_key(self, key_id: str, now: float) -> None:
        self._db.execute("UPDATE auth_keys SET uses = uses + 1, last_used = ? WHERE id = ?", (now, key_id))

    # ------------------------------------------------------------------ users

    def insert_user(self, record: UserRecord) -> int:
        cursor = self._db.execute(
            "INSERT INTO users(name, display_name, created) VALUES (?, ?, ?)",
            (record.name, record.display_name, record.created),
        )
        assert cursor.lastrowid is not None
        record.id = int(cursor.lastrowid)
        return record.id

    def list_users(self) -> list[UserRecord]:
        rows = self._db.execute("SELECT id, name, display_name, created FROM users ORDER BY id")
        return [UserRecord(*row) for row in rows]

    def delete_user(self, name: str) -> None:
        self._db.execute("DELETE FROM users WHERE name = ?", (name,))

    def detach_auth_keys(self, user: str) -> None:
        """Spent, expired or revoked keys of a deleted user stay listed, without the user."""
        self._db.execute("UPDATE auth_keys SET user = NULL WHERE user = ?", (user,))

    # ------------------------------------------------------------------ nodes

    def load_nodes(self) -> list[NodeRecord]:
        rows = self._db.execute(f"SELECT {', '.join(_NODE_COLUMNS)} FROM nodes ORDER BY id")
        return [_node_from_row(row) for row in rows]

    def insert_node(self, record: NodeRecord) -> int:
        columns = _NODE_COLUMNS[1:]
        cursor = self._db.execute(
            f"INSERT INTO nodes({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
            tuple(_to_column(name, getattr(record, name)) for name in columns),
        )
        assert cursor.lastrowid is not None
        record.id = int(cursor.lastrowid)
        return record.id

    def update_node(self, node_id: int, **changes: Any) -> None:
        if not changes:
            return
        unknown = set(changes) - set(_NODE_COLUMNS[1:])
        if unknown:
            raise ValueError(f"unknown node columns {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in changes)
        self._db.execute(
            f"UPDATE nodes SET {assignments} WHERE id = ?",
            (*(_to_column(name, value) for name, value in changes.items()), node_id),
        )

    def delete_node(self, node_id: int) -> None:
        self._db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def count_rows(self, table: str) -> int:
        """Rows in ``table`` (``nodes``, ``auth_keys``, ``users``, ``meta``), for tests and diagnostics."""
        if table not in ("nodes", "auth_keys", "meta", "users"):
            raise ValueError(f"unknown table {table!r}")
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
