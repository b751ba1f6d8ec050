"""The coordination server under unauthenticated abuse, measured as the security review did (on
127.0.0.1): keyless handshakes, keyless registrations in approval mode, idle sockets, /health."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.errors import HandshakeRejectedError
from embedmesh.control.messages import ErrorMessage, RegisterRequest
from embedmesh.control.noise import MAX_FRAME_SIZE
from embedmesh.control.protocol import ClientSession
from embedmesh.control.server import CONTROL_PATH
from embedmesh.control.store import Store
from embedmesh.control.websocket import WebSocket, WebSocketClosed
from embedmesh.wireguard.crypto import generate_private_key, public_key

__all__ = ["anyio_backend"]

T0 = 1_700_000_000.0


def _rows(state: Path, table: str) -> int:
    with sqlite3.connect(state / "control.db") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


async def _keyless_handshake(url: str, server_key: bytes, *, register: bool) -> object:
    """One stranger: a fresh machine key, a complete Noise handshake, optionally a keyless register."""
    ws = await WebSocket.connect(url, CONTROL_PATH, max_message_size=MAX_FRAME_SIZE)
    try:
        session = ClientSession(
            generate_private_key(os.urandom(32)), server_key, generate_private_key(os.urandom(32))
        )
        await ws.send(session.initiation(time.time_ns()))
        session.receive_response(await ws.receive())
        if not register:
            return None
        request = RegisterRequest(os.urandom(32), os.urandom(32), "stranger", auth_key=None)
        await ws.send(session.send(request))
        try:
            return session.receive(await ws.receive())
        except WebSocketClosed:
            return None
    finally:
        await ws.aclose()


def test_health_says_ok_and_nothing_else(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key()

        async def join() -> None:
            async with Identity.new().client(running.url, "a", auth_key=key):
                pass

        anyio.run(join)
        response = httpx.get(f"{running.url}/health", timeout=5)
        assert response.status_code == 200
        assert response.json() == {"ok": True}


@pytest.mark.anyio
async def test_keyless_handshakes_write_nothing_to_the_store(tmp_path: Path) -> None:
    state = tmp_path / "server"
    with start_server(state) as running:
        server_key = public_key(running.server._private_key)
        before = {table: _rows(state, table) for table in ("nodes", "handshakes")}
        refusals = []
        for i in range(200):
            # Half stop after the handshake, half also ask to register without a key (refused).
            answer = await _keyless_handshake(running.url, server_key, register=bool(i % 2))
            if answer is not None:
                refusals.append(answer)
        assert refusals and all(
            isinstance(a, ErrorMessage) and a.code == "auth_key_required" for a in refusals
        )
        assert {table: _rows(state, table) for table in ("nodes", "handshakes")} == before
        # A machine that does register has its timestamp persisted (replay protection).
        key = Admin(running).key()
        async with Identity.new().client(running.url, "real", auth_key=key):
            pass
        assert _rows(state, "handshakes") == before["handshakes"] + 1
        assert _rows(state, "nodes") == before["nodes"] + 1


def test_stray_handshake_rows_are_pruned_and_go_with_their_node() -> None:
    store = Store(None)
    c = Coordinator(store, CoordinatorConfig(), now=T0, random_bytes=os.urandom)
    _, key = c.create_auth_key(reusable=True, now=T0)
    c.accept_handshake(b"a" * 32, int(T0 * 1e9), T0)
    node = c.register(b"a" * 32, RegisterRequest(b"n" * 32, b"d" * 32, "a", auth_key=key), T0)
    assert store.count_rows("handshakes") == 1
    # What an older server left behind: a row for every stranger's handshake.
    for i in range(50):
        store.advance_handshake_timestamp(os.urandom(32), i + 1)
    again = Coordinator(store, CoordinatorConfig(), now=T0, random_bytes=os.urandom)
    assert store.count_rows("handshakes") == 1
    # The registered machine's replay protection survived the restart.
    with pytest.raises(HandshakeRejectedError, match="replayed"):
        again.accept_handshake(b"a" * 32, int(T0 * 1e9), T0 + 1)
    again.delete(node.id)
    assert store.count_rows("handshakes") == 0


def test_unknown_machines_replays_are_refused_from_memory() -> None:
    c = Coordinator(Store(None), CoordinatorConfig(), now=T0, random_bytes=os.urandom)
    stamp = int(T0 * 1e9)
    c.accept_handshake(b"s" * 32, stamp, T0)
    with pytest.raises(HandshakeRejectedError, match="replayed"):
        c.accept_handshake(b"s" * 32, stamp, T0 + 1)
    assert c.store.count_rows("handshakes") == 0
