"""The coordination server under unauthenticated abuse, measured as the security review did (on
127.0.0.1): keyless handshakes, keyless registrations in approval mode, idle sockets, /health."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.tailscale import tailcfg
from embedmesh.tailscale.keys import MachinePrivate, NodePrivate
from embedmesh.tailscale.noiseclient import connect_control

__all__ = ["anyio_backend"]

T0 = 1_700_000_000.0


def _rows(state: Path, table: str) -> int:
    with sqlite3.connect(state / "control.db") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


async def _keyless_handshake(url: str, *, register: bool) -> tailcfg.RegisterResponse | None:
    """One stranger: a fresh machine key, a complete ts2021 handshake, optionally a keyless register."""
    async with connect_control(
        url, MachinePrivate.generate(os.urandom(32)), tailcfg.CAPABILITY_VERSION
    ) as conn:
        if not register:
            return None
        node = NodePrivate(os.urandom(32)).public()
        hostinfo = tailcfg.hostinfo("stranger", "linux", version="test")
        reply = await conn.request(
            "POST", "/machine/register", tailcfg.register_request(node, hostinfo=hostinfo)
        )
        return tailcfg.parse_register_response(reply.body)


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
        before = {table: _rows(state, table) for table in ("nodes", "auth_keys", "users")}
        answers = []
        for i in range(100):
            # Half stop after the handshake, half also ask to register without a key: they are
            # offered an interactive login, kept in memory (bounded) until an admin completes it.
            answer = await _keyless_handshake(running.url, register=bool(i % 2))
            if answer is not None:
                answers.append(answer)
        assert len(answers) == 50
        assert all(a.auth_url and not a.machine_authorized for a in answers)
        assert {table: _rows(state, table) for table in ("nodes", "auth_keys", "users")} == before
        assert running.call(lambda: len(running.server.logins)) == 50
        # A machine with a key does register.
        key = Admin(running).key()
        async with Identity.new().client(running.url, "real", auth_key=key):
            pass
        assert _rows(state, "nodes") == before["nodes"] + 1
