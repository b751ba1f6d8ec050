"""A tailnet from before embedmesh spoke Tailscale's control protocol carries over: the store
migrates (schema 3 -> 4), and each node re-registers once over ts2021 with its node key and keeps
its name and addresses, with no auth key."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.netmap import NodeState
from embedmesh.control.store import MIGRATIONS, SCHEMA_VERSION
from embedmesh.tailscale.client import PIN_FILE, REGISTERED_FILE
from embedmesh.wireguard.crypto import generate_private_key, public_key

__all__ = ["anyio_backend"]

pytestmark = pytest.mark.anyio

WEB_V4 = 0x64400007  # 100.64.0.7


def _old_server_state(state: Path, web: Identity, db_node: Identity) -> bytes:
    """A server state folder as embedmesh's own protocol left it (schema 3, handshake stamps)."""
    state.mkdir(mode=0o700)
    server_key = generate_private_key(os.urandom(32))
    (state / "server.key").write_bytes(base64.b64encode(server_key) + b"\n")
    (state / "server.key").chmod(0o600)
    db = sqlite3.connect(state / "control.db")
    for step in MIGRATIONS[:3]:
        for statement in step:
            db.execute(statement)
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO users(name, display_name, created) VALUES ('alice', 'Alice', 5.0)")
    insert = (
        "INSERT INTO nodes(machine_key, node_key, disco_key, hostname, name, os, tags, ipv4, ephemeral,"
        " authorized, key_expiry, created, last_seen, auth_key_id, user)"
        " VALUES (?, ?, ?, ?, ?, 'linux', ?, ?, 0, 1, NULL, 1.0, NULL, NULL, ?)"
    )
    db.execute(
        insert,
        (public_key(web.machine), public_key(web.node), web.disco, "web", "web", "[]", WEB_V4, "alice"),
    )
    db.execute(
        insert,
        (
            public_key(db_node.machine),
            public_key(db_node.node),
            db_node.disco,
            "db",
            "db",
            "[]",
            WEB_V4 + 1,
            "default",
        ),
    )
    db.execute(
        "INSERT INTO handshakes(machine_key, last_timestamp) VALUES (?, 12345)", (public_key(web.machine),)
    )
    db.execute(
        "INSERT INTO meta(key, value) VALUES ('dns', ?)",
        (json.dumps({"extra_records": [["printer", "A", "192.0.2.9"]]}),),
    )
    db.commit()
    db.close()
    return public_key(server_key)


def _old_node_state(identity: Identity, url: str, server_public: bytes) -> None:
    """What the old client left in a node's state folder: the pinned server key, no marker."""
    assert identity.state_dir is not None
    identity.state_dir.mkdir(mode=0o700)
    pin = identity.state_dir / PIN_FILE
    pin.write_text(json.dumps({"control_url": url, "public_key": base64.b64encode(server_public).decode()}))
    pin.chmod(0o600)


async def test_an_old_tailnet_carries_over_to_tailscales_protocol(tmp_path: Path) -> None:
    web, db_node = Identity.new(tmp_path / "web"), Identity.new(tmp_path / "db")
    state = tmp_path / "server"
    server_public = _old_server_state(state, web, db_node)
    with start_server(state) as running:
        with sqlite3.connect(state / "control.db") as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "handshakes" not in tables
        admin = Admin(running)
        listed = {n["name"]: n for n in admin.nodes()}
        assert listed["web"]["addresses"][0] == "100.64.0.7" and listed["web"]["user"] == "alice"
        assert listed["db"]["addresses"][0] == "100.64.0.8"
        for identity in (web, db_node):
            _old_node_state(identity, running.url, server_public)
        # No auth key: the server knows the node keys. The pin of the old protocol still holds
        # (the server's static key is its ts2021 key).
        async with web.client(running.url, "web") as a, db_node.client(running.url, "db") as b:
            assert a.netmap is not None and a.state is NodeState.AUTHORIZED
            me = a.netmap.self_node
            assert (me.name, str(me.addresses[0]), me.user) == ("web", "100.64.0.7", "alice")
            netmap = await a.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            peer = next(iter(netmap.peers.values()))
            assert (peer.name, str(peer.addresses[0]), peer.user) == ("db", "100.64.0.8", "default")
            assert netmap.dns.extra_records == (("printer", "A", "192.0.2.9"),)
            assert b.netmap is not None and b.netmap.self_node.name == "db"
        assert sorted(n["name"] for n in admin.nodes()) == ["db", "web"]
        assert web.state_dir is not None
        marker = web.state_dir / REGISTERED_FILE
        assert marker.read_text().strip() == running.url and (marker.stat().st_mode & 0o777) == 0o600
