"""Nodes joining through a real server on 127.0.0.1 with the anyio client (asyncio and trio)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from control_harness import Admin, Identity, anyio_backend, start_server

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
