"""Approval, ephemeral nodes, names, expiry and deletion, end to end (asyncio and trio clients)."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

from embedmesh.control.errors import ApprovalRefusedError, NodeDeletedError
from embedmesh.control.netmap import NodeState, PeerChange

__all__ = ["anyio_backend"]

pytestmark = pytest.mark.anyio


async def test_approval_flow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with start_server(tmp_path / "server", approval_required=True) as running:
        admin = Admin(running)
        approved_key = admin.key(reusable=True, preapproved=True)
        plain_key = admin.key(reusable=True)
        async with Identity.new().client(running.url, "old", auth_key=approved_key) as old:
            assert old.state is NodeState.AUTHORIZED
            with caplog.at_level(logging.WARNING, logger="embedmesh.control.client"):
                async with Identity.new().client(running.url, "new", auth_key=plain_key) as new:
                    assert new.waiting_for_approval and new.netmap is not None and not new.netmap.peers
                    assert f"embedmesh control nodes approve {new.node_id}" in caplog.text
                    # Nobody sees a pending node.
                    await anyio.sleep(0.2)
                    assert old.netmap is not None and not old.netmap.peers
                    with pytest.raises(TimeoutError):
                        await new.wait_for_approval(timeout=0.2)
                    admin.post(f"/nodes/{new.node_id}/approve")
                    netmap = await new.wait_for_approval(timeout=5)
                    assert [p.name for p in netmap.peers.values()] == ["old"]
                    await old.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            # Without any key, a node can still ask for approval; an admin refuses it.
            async with Identity.new().client(running.url, "stranger") as stranger:
                assert stranger.waiting_for_approval
                admin.delete(stranger.node_id or 0)
                with pytest.raises(ApprovalRefusedError, match="refused"):
                    await stranger.wait_for_approval(timeout=5)


async def test_ephemeral_node_vanishes_after_logout_and_after_disconnect(tmp_path: Path) -> None:
    with start_server(tmp_path / "server", ephemeral_timeout=0.3) as running:
        admin = Admin(running)
        ephemeral_key = admin.key(reusable=True, ephemeral=True)
        async with Identity.new().client(running.url, "watcher", auth_key=admin.key()) as watcher:
            async with Identity.new().client(running.url, "job", auth_key=ephemeral_key) as job:
                assert job.netmap is not None and job.netmap.self_node.ephemeral
                address = job.netmap.self_node.addresses
                await watcher.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
                await job.logout()
                assert job.logged_out
            await watcher.wait_for_netmap(lambda m: not m.peers, timeout=5)
            assert [n["name"] for n in admin.nodes()] == ["watcher"]
            # The address went back to the pool: the next node gets it.
            async with Identity.new().client(running.url, "job2", auth_key=ephemeral_key) as job2:
                assert job2.netmap is not None and job2.netmap.self_node.addresses == address
                await watcher.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            # Disconnected without logout: still listed (offline) until the reaper's timeout passes.
            await watcher.wait_for_netmap(lambda m: not m.peers, timeout=5)
            assert admin.nodes()[-1]["name"] in ("job2", "watcher")
        assert [n["name"] for n in admin.nodes()] == ["watcher"]


async def test_hostname_collisions_and_renames_propagate_as_deltas(tmp_path: Path) -> None:
    with start_server(tmp_path / "server", base_domain="corp.example") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        deltas: list[object] = []
        async with (
            Identity.new().client(running.url, "Web Server.local", auth_key=key) as first,
            Identity.new().client(running.url, "web-server", auth_key=key) as second,
        ):
            assert first.netmap is not None and second.netmap is not None
            assert first.netmap.self_node.name == "web-server"
            assert second.netmap.self_node.name == "web-server-1"
            assert second.netmap.self_node.fqdn == "web-server-1.corp.example"
            await first.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            first.on_netmap = deltas.append
            admin.post(f"/nodes/{second.node_id}/rename", name="db")
            netmap = await first.wait_for_netmap(
                lambda m: [p.fqdn for p in m.peers.values()] == ["db.corp.example"], timeout=5
            )
            assert netmap.peers[second.node_id or 0].hostname == "web-server"
            own = await second.wait_for_netmap(lambda m: m.self_node.name == "db", timeout=5)
            assert own.self_node.fqdn == "db.corp.example"
            # A name in use is refused with a clear message.
            response = admin.http.post(f"/admin/v1/nodes/{first.node_id}/rename", json={"name": "db"})
            assert response.status_code == 409 and "taken" in response.json()["error"]["message"]
        assert deltas, "the rename reached the peer"


async def test_rename_is_a_delta_not_a_full_map(tmp_path: Path) -> None:
    """Watch the wire: a rename costs one small delta op per viewer."""
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        async with (
            Identity.new().client(running.url, "a", auth_key=key) as a,
            Identity.new().client(running.url, "b", auth_key=key) as b,
        ):
            await a.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            before = running.call(lambda: dict(running.server.coordinator.counters))
            admin.post(f"/nodes/{b.node_id}/rename", name="bee")
            await a.wait_for_netmap(lambda m: next(iter(m.peers.values())).name == "bee", timeout=5)
            after = running.call(lambda: dict(running.server.coordinator.counters))
            assert after["full_maps"] == before["full_maps"]
            assert after["broadcasts"] == before["broadcasts"] + 1
            # and the op is a PeerChange that names only what changed
            from embedmesh.control.messages import encode_op

            assert len(encode_op(PeerChange(1, name="bee", fqdn="bee.mesh.internal"))) < 80


async def test_key_expiry_cuts_a_node_off_and_reauth_restores_it(tmp_path: Path) -> None:
    """Expiry on the server's clock is covered in test_control_coordinator; here an admin expires."""
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        async with (
            Identity.new().client(running.url, "watcher", auth_key=key) as watcher,
            Identity.new().client(running.url, "node", auth_key=key) as client,
        ):
            await watcher.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=5)
            address = client.netmap.self_node.addresses if client.netmap else ()
            admin.post(f"/nodes/{client.node_id}/expire")
            expired = await client.wait_for_netmap(lambda m: m.state is NodeState.KEY_EXPIRED, timeout=5)
            assert not expired.peers
            await watcher.wait_for_netmap(lambda m: client.node_id not in m.peers, timeout=5)
            # Re-authenticating with a valid key restores it: same node, same address.
            await client.reauthenticate(key)
            assert client.netmap is not None and client.netmap.self_node.addresses == address
            assert len(client.netmap.peers) == 1
            await watcher.wait_for_netmap(lambda m: client.node_id in m.peers, timeout=5)
            # Expired again, then an admin approves it again.
            admin.post(f"/nodes/{client.node_id}/expire")
            await watcher.wait_for_netmap(lambda m: client.node_id not in m.peers, timeout=5)
            admin.post(f"/nodes/{client.node_id}/approve")
            await client.wait_for_netmap(
                lambda m: m.state is NodeState.AUTHORIZED and len(m.peers) == 1, timeout=5
            )
            await watcher.wait_for_netmap(lambda m: client.node_id in m.peers, timeout=5)


async def test_deleted_node_is_told_and_cannot_come_back_without_a_key(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        node = Identity.new()
        async with node.client(running.url, "gone", auth_key=admin.key()) as client:
            admin.delete(client.node_id or 0)
            with pytest.raises(NodeDeletedError, match="new auth key"):
                await client.wait_for_netmap(lambda m: False, timeout=5)
        # Without a key it is a stranger: the server offers only an interactive login.
        async with node.client(running.url, "gone") as again:
            assert again.netmap is None and again.auth_url
        assert admin.nodes() == []
