"""What held up in the security review of issue 8, kept proved: one-off keys under concurrent
registrations, expired and revoked keys, and a node's reach over other nodes' entries."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.errors import (
    AuthKeyExpiredError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
    ConflictError,
    ControlError,
)
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.store import Store

__all__ = ["anyio_backend"]

T0 = 1_700_000_000.0


def _coordinator() -> Coordinator:
    rng = random.Random(3)
    return Coordinator(
        Store(None),
        CoordinatorConfig(),
        now=T0,
        random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
    )


def _request(n: int, key: str | None = None) -> RegisterRequest:
    return RegisterRequest(bytes([n, 1]) * 16, bytes([n, 2]) * 16, f"n{n}", auth_key=key)


@pytest.mark.anyio
async def test_a_one_off_key_registers_exactly_one_of_8_concurrent_nodes(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key()
        outcomes: list[str] = []

        async def join(i: int) -> None:
            try:
                async with Identity.new().client(running.url, f"racer{i}", auth_key=key) as client:
                    assert client.netmap is not None
                    outcomes.append("joined")
                    await anyio.sleep(0.3)  # stay connected while the others try
            except AuthKeyUsedError:
                outcomes.append("used")
            except ControlError as exc:
                outcomes.append(f"unexpected {exc!r}")

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(join, i)
        assert sorted(outcomes) == ["joined"] + ["used"] * 7
        keys = admin.http.get("/admin/v1/authkeys").json()["authkeys"]
        assert [(k["uses"], k["state"]) for k in keys] == [(1, "used")]
        assert len(admin.nodes()) == 1


def test_expired_and_revoked_keys_are_refused_and_not_used_up() -> None:
    c = _coordinator()
    record, expiring = c.create_auth_key(reusable=True, expiry=60.0, now=T0)
    c.register(b"a" * 32, _request(1, expiring), T0 + 59.9)
    # The expiry instant itself is already too late.
    for when in (T0 + 60.0, T0 + 10 * 86400):
        with pytest.raises(AuthKeyExpiredError, match="has expired"):
            c.register(b"b" * 32, _request(2, expiring), when)
    _, revoked = c.create_auth_key(reusable=True, now=T0)
    revoked_node = c.register(b"c" * 32, _request(3, revoked), T0)
    c.revoke_auth_key(revoked.split("-")[1], T0 + 1)
    with pytest.raises(AuthKeyRevokedError, match="was revoked"):
        c.register(b"d" * 32, _request(4, revoked), T0 + 2)
    # A revoked key cannot re-authenticate the node it once registered either.
    c.expire(revoked_node.id, T0 + 3)
    with pytest.raises(AuthKeyRevokedError):
        c.register(b"c" * 32, _request(5, revoked), T0 + 4)
    assert c.node(revoked_node.id).expired
    # Refusals neither register nor count a use.
    assert len(c) == 2
    assert {k.id: k.uses for k in c.store.list_auth_keys()} == {record.id: 1, revoked.split("-")[1]: 1}


@pytest.mark.anyio
async def test_a_node_cannot_claim_another_nodes_key(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        victim = Identity.new()
        async with victim.client(running.url, "victim", auth_key=key) as client:
            assert client.netmap is not None
            before = admin.nodes()
            # Another machine presenting the victim's node key, with a valid auth key.
            thief = Identity(Identity.new().machine, victim.node, victim.disco)
            with pytest.raises(ConflictError, match="belongs to another machine"):
                async with thief.client(running.url, "thief", auth_key=key):
                    pass
            assert admin.nodes() == before and client.connected


def test_a_node_updates_only_its_own_endpoints() -> None:
    """Endpoints name no node: the server applies them to the stream's own node, and only while
    that stream is the node's current one."""
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    a = c.register(b"a" * 32, _request(1, key), T0)
    b = c.register(b"b" * 32, _request(2, key), T0)
    stream_a = c.attach(a.id, lambda: None, T0)
    stream_b = c.attach(b.id, lambda: None, T0)
    c.update_endpoints(stream_b, ("192.0.2.2:41641",), T0)
    assert b.endpoints == ("192.0.2.2:41641",) and a.endpoints == ()
    # A replaced stream (the node reconnected) cannot change anything any more.
    c.attach(b.id, lambda: None, T0 + 1)
    c.update_endpoints(stream_b, ("198.51.100.9:1",), T0 + 1)
    assert b.endpoints == ("192.0.2.2:41641",)
    c.update_endpoints(stream_a, ("192.0.2.1:41641",), T0 + 2)
    assert a.endpoints == ("192.0.2.1:41641",) and b.endpoints == ("192.0.2.2:41641",)


@pytest.mark.anyio
async def test_endpoint_updates_over_the_wire_touch_only_the_sender(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        async with (
            Identity.new().client(running.url, "a", auth_key=key, endpoints=["127.0.0.1:1000"]) as a,
            Identity.new().client(running.url, "b", auth_key=key) as b,
        ):
            await b.update_endpoints(["127.0.0.1:2000"])
            await a.wait_for_netmap(
                lambda m: any(p.endpoints == ("127.0.0.1:2000",) for p in m.peers.values()), timeout=5
            )
            assert {n["name"]: n["endpoints"] for n in admin.nodes()} == {
                "a": ["127.0.0.1:1000"],
                "b": ["127.0.0.1:2000"],
            }
