"""The SQLite store, address allocation and auth keys, without a server."""

from __future__ import annotations

import os
import sqlite3
import stat
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from embedmesh.control.addresses import AddressPool, PoolExhaustedError, ipv6_for
from embedmesh.control.authkeys import AuthKeyRecord, check_auth_key, new_auth_key, parse_auth_key
from embedmesh.control.errors import (
    AuthKeyExpiredError,
    AuthKeyInvalidError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
    StoreError,
)
from embedmesh.control.store import SCHEMA_VERSION, NodeRecord, Store, prepare_state_dir


def _node(machine: int, ipv4: int, name: str) -> NodeRecord:
    return NodeRecord(
        id=0,
        machine_key=bytes([machine]) * 32,
        node_key=bytes([machine + 1]) * 32,
        disco_key=bytes(32),
        hostname=name,
        name=name,
        os="linux",
        tags=("tag:a",),
        ipv4=ipv4,
        ephemeral=False,
        authorized=True,
        key_expiry=None,
        created=1.0,
        last_seen=None,
        auth_key_id=None,
        user="default",
    )


def _key(key_id: str = "00112233aabb", **kw: object) -> AuthKeyRecord:
    values: dict[str, object] = dict(
        id=key_id,
        secret_sha256=bytes(32),
        reusable=False,
        ephemeral=False,
        preapproved=False,
        tags=(),
        created=1.0,
        expires=None,
        revoked=None,
        uses=0,
        last_used=None,
    )
    values.update(kw)
    return AuthKeyRecord(**values)  # type: ignore[arg-type]


def test_ipv6_is_derived_from_ipv4() -> None:
    assert ipv6_for(IPv4Address("100.64.0.1")) == IPv6Address("fd7a:115c:a1e0::6440:1")


def test_pool_allocates_lowest_free_and_reuses_released() -> None:
    pool = AddressPool()
    first = [pool.allocate() for _ in range(3)]
    assert first == [IPv4Address("100.64.0.1"), IPv4Address("100.64.0.2"), IPv4Address("100.64.0.3")]
    pool.release(first[1])
    assert pool.allocate() == first[1]
    assert pool.allocate() == IPv4Address("100.64.0.4")
    # Reloading from the used set keeps gaps free and never hands out a used address.
    reloaded = AddressPool(int(a) for a in (first[0], first[2]))
    assert reloaded.allocate() == first[1]
    assert reloaded.allocate() == IPv4Address("100.64.0.4")


def test_pool_skips_reserved_ranges() -> None:
    # Pretend everything below the reserved blocks is taken, via the free-interval heap.
    pool = AddressPool()
    pool._free = [(int(IPv4Address("100.100.100.100")), int(IPv4Address("100.100.100.102")))]
    assert pool.allocate() == IPv4Address("100.100.100.101")
    pool._free = [(int(IPv4Address("100.115.92.0")), int(IPv4Address("100.115.95.0")))]
    assert pool.allocate() == IPv4Address("100.115.94.0")


def test_pool_exhaustion_is_an_error() -> None:
    pool = AddressPool()
    pool._free = [(int(IPv4Address("100.127.255.254")), int(IPv4Address("100.127.255.254")))]
    assert pool.allocate() == IPv4Address("100.127.255.254")
    with pytest.raises(PoolExhaustedError):
        pool.allocate()


def test_auth_key_format_and_checks() -> None:
    key_id, text = new_auth_key(bytes(range(6)), bytes(range(24)))
    parsed_id, digest = parse_auth_key(text)
    assert parsed_id == key_id == "000102030405"
    record = _key(key_id, secret_sha256=digest)
    assert check_auth_key(record, digest, now=2.0) is record
    with pytest.raises(AuthKeyInvalidError):
        check_auth_key(record, bytes(32), now=2.0)
    with pytest.raises(AuthKeyInvalidError):
        check_auth_key(None, digest, now=2.0)
    with pytest.raises(AuthKeyInvalidError, match="emk-<id>-<secret>"):
        parse_auth_key("tskey-nope")
    with pytest.raises(AuthKeyUsedError, match="one-off"):
        check_auth_key(_key(key_id, secret_sha256=digest, uses=1), digest, now=2.0)
    assert check_auth_key(_key(key_id, secret_sha256=digest, uses=5, reusable=True), digest, now=2.0)
    with pytest.raises(AuthKeyExpiredError):
        check_auth_key(_key(key_id, secret_sha256=digest, expires=2.0), digest, now=2.0)
    with pytest.raises(AuthKeyRevokedError):
        check_auth_key(_key(key_id, secret_sha256=digest, revoked=1.5), digest, now=2.0)
    assert "secret" not in repr(record) and digest.hex() not in repr(record)


def test_store_round_trips_and_enforces_uniqueness(tmp_path: Path) -> None:
    prepare_state_dir(tmp_path / "state")
    store = Store(tmp_path / "state" / "control.db")
    assert store.schema_version == SCHEMA_VERSION
    store.insert_auth_key(_key())
    with store.transaction():
        node_id = store.insert_node(_node(1, 100, "web"))
        store.use_auth_key("00112233aabb", 3.0)
    nodes = store.load_nodes()
    assert [n.id for n in nodes] == [node_id] and nodes[0].tags == ("tag:a",) and nodes[0].authorized
    assert store.get_auth_key("00112233aabb").uses == 1  # type: ignore[union-attr]
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_node(_node(5, 100, "other"))  # same address
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_node(_node(7, 101, "web"))  # same name
    # A failed transaction leaves nothing behind.
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.use_auth_key("00112233aabb", 4.0)
        store.insert_node(_node(9, 100, "third"))
    assert store.get_auth_key("00112233aabb").uses == 1  # type: ignore[union-attr]
    store.update_node(node_id, name="web2", authorized=False, tags=("tag:b",))
    assert store.load_nodes()[0].name == "web2" and store.load_nodes()[0].tags == ("tag:b",)
    assert store.revoke_auth_key("00112233aabb", 5.0)
    assert not store.revoke_auth_key("00112233aabb", 6.0)
    store.delete_node(node_id)
    # Node ids are never reused.
    assert store.insert_node(_node(1, 100, "web")) > node_id
    store.close()


def test_store_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_state_dir(state)
    store = Store(state / "control.db")
    store.set_meta("x", "y")
    for name in ("control.db", "control.db-wal", "control.db-shm"):
        path = state / name
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    store.close()


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="upgrade embedmesh"):
        Store(path)


def test_schema_1_databases_migrate_and_waiting_nodes_lose_their_address(tmp_path: Path) -> None:
    """A database written before waiting nodes went without an address: approved nodes keep
    theirs, waiting ones give theirs back, and a deleted node's id is still never reused."""
    from embedmesh.control.store import MIGRATIONS

    path = tmp_path / "control.db"
    db = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version=1")
    insert = (
        "INSERT INTO nodes(machine_key, node_key, disco_key, hostname, name, os, tags, ipv4, ephemeral,"
        " authorized, key_expiry, created, last_seen, auth_key_id, user)"
        " VALUES (?, ?, ?, ?, ?, 'linux', '[]', ?, 0, ?, NULL, 1.0, NULL, NULL, 'default')"
    )
    for n, (name, ipv4, authorized) in enumerate(
        [("web", 0x64400001, 1), ("waiting", 0x64400002, 0), ("gone", 0x64400003, 1)]
    ):
        db.execute(insert, (bytes([n]) * 32, bytes([n + 10]) * 32, bytes(32), name, name, ipv4, authorized))
    db.execute("DELETE FROM nodes WHERE name = 'gone'")
    db.commit()
    db.close()

    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    nodes = {n.name: n for n in store.load_nodes()}
    assert (nodes["web"].id, nodes["web"].ipv4, nodes["web"].authorized) == (1, 0x64400001, True)
    assert (nodes["waiting"].id, nodes["waiting"].ipv4) == (2, None)
    assert store.integrity_check() == "ok"
    # Schema 3: the owners older servers wrote became users; tagged-devices is not one.
    assert [(u.id, u.name) for u in store.list_users()] == [(1, "default")]
    # AUTOINCREMENT still remembers id 3.
    assert store.insert_node(_node(40, 0x64400004, "next")) == 4
    # Several waiting nodes may hold no address at once; addresses stay unique.
    waiting = _node(50, 0, "w2")
    waiting.ipv4 = None
    store.insert_node(waiting)
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_node(_node(60, 0x64400001, "dup"))
    store.close()
