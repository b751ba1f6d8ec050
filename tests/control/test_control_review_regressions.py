"""What held up in the security review of issue 8, kept proved: a one-off key registers exactly one
of 8 concurrent nodes, expired and revoked keys are refused at the moment they stop being valid,
and a node can neither take another machine's node key nor change another node's endpoints."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig, Stream
from embedmesh.control.errors import (
    AuthKeyExpiredError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
    ConflictError,
)
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.netmap import NodeState
from embedmesh.control.store import Store
from embedmesh.wireguard.crypto import public_key

__all__ = ["anyio_backend"]

T0 = 1_000_000.0


async def _join(url: str, hostname: str, key: str) -> BaseException | int:
    """Register one fresh machine; its node id, or the error that refused it."""
    try:
        async with Identity.new().client(url, hostname, auth_key=key) as client:
            assert client.state is NodeState.AUTHORIZED and client.node_id is not None
            return client.node_id
    except AuthKeyUsedError as exc:
        return exc


@pytest.mark.anyio
async def test_a_one_off_key_registers_exactly_one_of_8_concurrent_nodes(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        for round_ in range(3):
            key = admin.key()
            results: list[BaseException | int] = []

            async def attempt(name: str, key: str = key, results: list[BaseException | int] = results) -> None:
                results.append(await _join(running.url, name, key))

            # Eight machines connect, handshake and register at once, interleaved on the server.
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(attempt, f"racer-{round_}-{i}")
            winners = [r for r in results if isinstance(r, int)]
            losers = [r for r in results if isinstance(r, AuthKeyUsedError)]
            assert len(winners) == 1 and len(losers) == 7, results
            key_id = key.split("-")[1]
            record = running.call(lambda key_id=key_id: running.server.coordinator.store.get_auth_key(key_id))
            assert record.uses == 1
        # Exactly one node per key, none left half-made by the refusals.
        assert len(admin.nodes()) == 3


def _coordinator() -> Coordinator:
    return Coordinator(Store(None), CoordinatorConfig(), now=T0, random_bytes=os.urandom)


def _machine(seed: int) -> tuple[bytes, bytes, bytes]:
    """(machine public key, node public key, disco public key), distinct per seed."""
    keys = tuple(public_key(bytes([seed, k]) * 16) for k in range(3))
    return keys[0], keys[1], keys[2]


def test_expired_and_revoked_keys_are_refused_from_that_instant() -> None:
    c = _coordinator()
    _, expiring = c.create_auth_key(reusable=True, expiry=60.0, now=T0)
    _, revoked = c.create_auth_key(reusable=True, now=T0)
    m1, n1, d1 = _machine(1)
    c.register(m1, RegisterRequest(n1, d1, "early", auth_key=expiring), T0 + 59.999)
    for seed, at in ((2, T0 + 60.0), (3, T0 + 10**9)):
        m, n, d = _machine(seed)
        with pytest.raises(AuthKeyExpiredError, match="has expired"):
            c.register(m, RegisterRequest(n, d, "late", auth_key=expiring), at)
    c.revoke_auth_key(revoked.split("-")[1], T0 + 1)
    m4, n4, d4 = _machine(4)
    with pytest.raises(AuthKeyRevokedError, match="was revoked"):
        c.register(m4, RegisterRequest(n4, d4, "after-revoke", auth_key=revoked), T0 + 1)
    # A known machine re-authenticating with a new node key cannot use a dead key either.
    m1_new_node = _machine(5)[1]
    for key, error in ((expiring, AuthKeyExpiredError), (revoked, AuthKeyRevokedError)):
        with pytest.raises(error):
            c.register(m1, RegisterRequest(m1_new_node, d1, "early", auth_key=key), T0 + 61)
    # Only the one valid registration exists and was counted.
    assert [n.rec.name for n in c.nodes()] == ["early"]
    assert {k.id: k.uses for k in c.store.list_auth_keys()} == {
        expiring.split("-")[1]: 1,
        revoked.split("-")[1]: 0,
    }


def _stream(c: Coordinator, node_id: int) -> Stream:
    return c.attach(node_id, lambda: None, T0)


def test_a_node_cannot_take_another_machines_node_key_or_endpoints() -> None:
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    ma, na, da = _machine(1)
    mb, nb, db = _machine(2)
    a = c.register(ma, RegisterRequest(na, da, "alpha", auth_key=key, endpoints=("192.0.2.1:41641",)), T0)
    b = c.register(mb, RegisterRequest(nb, db, "beta", auth_key=key), T0)
    # Machine B presents A's node key, with and without a key: refused, A untouched.
    for auth_key in (key, None):
        with pytest.raises(ConflictError, match="belongs to another machine"):
            c.register(mb, RegisterRequest(na, db, "alpha", auth_key=auth_key, endpoints=("6.6.6.6:1",)), T0)
    # So does a brand-new machine.
    mc, _, dc = _machine(3)
    with pytest.raises(ConflictError, match="belongs to another machine"):
        c.register(mc, RegisterRequest(na, dc, "gamma", auth_key=key), T0)
    assert c.node(a.id).rec.node_key == na and c.node(a.id).rec.machine_key == ma
    assert c.node(a.id).endpoints == ("192.0.2.1:41641",)
    assert c.node(b.id).rec.node_key == nb and len(list(c.nodes())) == 2
    # Endpoint updates act on the node whose session sends them, never on another; a replaced
    # (older) session of the same node cannot change anything either.
    stream_b = _stream(c, b.id)
    c.update_endpoints(stream_b, ("6.6.6.6:1",), T0)
    assert c.node(b.id).endpoints == ("6.6.6.6:1",)
    assert c.node(a.id).endpoints == ("192.0.2.1:41641",)
    stream_a = _stream(c, a.id)
    _stream(c, a.id)  # A reconnects: the first stream is replaced
    c.update_endpoints(stream_a, ("6.6.6.6:2",), T0)
    assert c.node(a.id).endpoints == ("192.0.2.1:41641",)


@pytest.mark.anyio
async def test_over_the_wire_a_node_changes_only_its_own_endpoints(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        key = Admin(running).key(reusable=True)
        a, b = Identity.new(), Identity.new()
        async with a.client(running.url, "alpha", auth_key=key, endpoints=["127.0.0.1:1000"]) as ca:
            async with b.client(running.url, "beta", auth_key=key) as cb:
                await cb.update_endpoints(["127.0.0.1:2000"])
                netmap = await ca.wait_for_netmap(
                    lambda m: any(p.endpoints == ("127.0.0.1:2000",) for p in m.peers.values()), timeout=5
                )
                assert netmap.self_node.endpoints == ("127.0.0.1:1000",)
            # Machine B with A's node key is refused by the server.
            with pytest.raises(ConflictError, match="belongs to another machine"):
                async with Identity(b.machine, a.node, b.disco).client(running.url, "alpha", auth_key=key):
                    pass
            nodes = {n["name"]: n for n in Admin(running).nodes()}
            assert set(nodes) == {"alpha", "beta"}
            assert nodes["alpha"]["endpoints"] == ["127.0.0.1:1000"]
