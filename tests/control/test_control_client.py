"""Nodes joining through a real server on 127.0.0.1 with the anyio client (asyncio and trio)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.errors import (
    AuthKeyExpiredError,
    AuthKeyInvalidError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
    ControlUnreachableError,
    ServerKeyChangedError,
)
from embedmesh.control.netmap import NodeState

__all__ = ["anyio_backend"]

pytestmark = pytest.mark.anyio


async def test_two_nodes_see_each_other(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        a, b = Identity.new(tmp_path / "a"), Identity.new(tmp_path / "b")
        async with a.client(running.url, "alpha", auth_key=key, endpoints=["127.0.0.1:1000"]) as ca:
            assert ca.state is NodeState.AUTHORIZED and ca.netmap is not None
            assert ca.netmap.self_node.fqdn == "alpha.mesh.internal"
            async with b.client(running.url, "beta", auth_key=key) as cb:
                assert cb.netmap is not None and len(cb.netmap.peers) == 1
                peer = next(iter(cb.netmap.peers.values()))
                assert peer.name == "alpha" and peer.endpoints == ("127.0.0.1:1000",) and peer.online
                netmap = await ca.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
                assert next(iter(netmap.peers.values())).name == "beta"
                await cb.update_endpoints(["127.0.0.1:2000", "[::1]:2000"])
                await ca.wait_for_netmap(
                    lambda m: any(p.endpoints == ("127.0.0.1:2000", "[::1]:2000") for p in m.peers.values()),
                    timeout=5,
                )
            await ca.wait_for_netmap(lambda m: not next(iter(m.peers.values())).online, timeout=5)


async def test_keys_of_each_kind_and_refusals(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        one_off = admin.key()
        async with Identity.new().client(running.url, "first", auth_key=one_off) as client:
            assert client.state is NodeState.AUTHORIZED
        with pytest.raises(AuthKeyUsedError, match="one-off"):
            async with Identity.new().client(running.url, "second", auth_key=one_off):
                pass
        reusable = admin.key(reusable=True, tags=["tag:ci"])
        for name in ("r1", "r2"):
            async with Identity.new().client(running.url, name, auth_key=reusable) as client:
                assert client.netmap is not None and client.netmap.self_node.tags == ("tag:ci",)
                assert client.netmap.self_node.user == "tagged-devices"
        expiring = admin.key(expiry=0.2)
        await anyio.sleep(0.3)
        with pytest.raises(AuthKeyExpiredError, match="expired"):
            async with Identity.new().client(running.url, "late", auth_key=expiring):
                pass
        revoked = admin.key(reusable=True)
        admin.post(f"/authkeys/{revoked.split('-')[1]}/revoke")
        with pytest.raises(AuthKeyRevokedError, match="revoked"):
            async with Identity.new().client(running.url, "rev", auth_key=revoked):
                pass
        with pytest.raises(AuthKeyInvalidError):
            async with Identity.new().client(running.url, "bad", auth_key=reusable[:-4] + "0000"):
                pass
        # No key, on a server that needs one: Tailscale's interactive login (an admin completes it).
        async with Identity.new().client(running.url, "nokey") as client:
            assert client.netmap is None and client.waiting_for_approval
            assert client.auth_url.startswith(f"{running.url}/register/")
            page = admin.http.get(client.auth_url.removeprefix(running.url))
            assert "embedmesh control auth register" in page.text
        # Refused registrations left no node behind.
        assert sorted(n["name"] for n in admin.nodes()) == ["first", "r1", "r2"]


async def test_unreachable_server_and_changed_server_key(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        url, port = running.url, running.port
        key = Admin(running).key(reusable=True)
        node = Identity.new(tmp_path / "node")
        async with node.client(url, "web", auth_key=key):
            pass
    with pytest.raises(ControlUnreachableError, match="embedmesh control serve"):
        async with node.client(url, "web"):
            pass
    # Another server (another key) on the same address: the pinned key refuses it.
    with (
        start_server(tmp_path / "impostor", port=port) as impostor,
        pytest.raises(
            ServerKeyChangedError, match=r"changed from .* to .*; if you rotated it on purpose, delete"
        ),
    ):
        async with node.client(impostor.url, "web"):
            pass
    pin = tmp_path / "node" / "control-server.json"
    assert (pin.stat().st_mode & 0o777) == 0o600


async def test_restart_from_state_keeps_node_and_needs_no_key(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        key = Admin(running).key()
        node = Identity.new(tmp_path / "node")
        async with node.client(running.url, "web", auth_key=key) as client:
            assert client.netmap is not None
            first = client.netmap.self_node
        # Same keys, no auth key (and passing the spent one-off key again is harmless).
        for auth_key in (None, key):
            async with node.client(running.url, "web", auth_key=auth_key) as client:
                assert client.netmap is not None
                again = client.netmap.self_node
                assert (again.id, again.addresses, again.name) == (first.id, first.addresses, first.name)
        assert len(Admin(running).nodes()) == 1


async def test_server_restart_clients_reconnect(tmp_path: Path) -> None:
    state = tmp_path / "server"
    running = start_server(state)
    port = running.port
    key = Admin(running).key(reusable=True)
    a, b = Identity.new(), Identity.new()
    async with a.client(running.url, "a", auth_key=key) as ca, b.client(running.url, "b", auth_key=key) as cb:
        await ca.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
        running.stop()
        with anyio.fail_after(5):
            while ca.connected or cb.connected:
                await anyio.sleep(0.02)
        assert ca.netmap is not None and len(ca.netmap.peers) == 1  # the last map stays
        running = start_server(state, port=port)
        try:
            with anyio.fail_after(10):
                while not (ca.connected and cb.connected):
                    await anyio.sleep(0.02)
            assert ca.reconnects >= 1 and cb.reconnects >= 1
            await cb.update_endpoints(["10.0.0.2:41641"])
            await ca.wait_for_netmap(
                lambda m: any(p.endpoints == ("10.0.0.2:41641",) and p.online for p in m.peers.values()),
                timeout=5,
            )
        finally:
            running.stop()


async def test_a_server_replaced_while_the_node_runs_ends_it_with_server_key_changed(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        url, port = running.url, running.port
        key = Admin(running).key(reusable=True)
        client = Identity.new(tmp_path / "node").client(url, "web", auth_key=key)
        await client.start()
    try:
        # Another server (another key) comes up where the node's server was.
        with start_server(tmp_path / "impostor", port=port):
            with pytest.raises(ServerKeyChangedError, match="changed from"):
                await client.wait_for_netmap(lambda m: False, timeout=15)
            assert client.error is not None and not client.connected
    finally:
        await client.close()
