"""Nodes that cannot reach each other directly talk through a DERP relay, and move to a direct
path when one appears (a coordination server, a DERP server and nodes on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from embedmesh import Node
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate
from tests.control.control_harness import Admin, start_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tailnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Admin, int]]:
    # Plain-HTTP DERP, as Tailscale's clients do with this knob (tests and labs).
    monkeypatch.setenv("TS_DEBUG_USE_DERP_HTTP", "1")
    port = _free_port()
    derp_map = {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "test",
                "RegionName": "Test",
                "Nodes": [
                    {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "DERPPort": port, "STUNPort": -1}
                ],
            }
        }
    }
    path = tmp_path / "derpmap.json"
    path.write_text(json.dumps(derp_map))
    running = start_server(tmp_path / "control", derp_map=path, embedded_derp=False)
    try:
        yield running, Admin(running), port
    finally:
        running.stop()


@pytest.fixture(params=[True, False], ids=["with-stun", "no-stun"])
def embedded(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Admin]]:
    """A control server with its embedded DERP relay (the default): HTTPS with a pinned
    self-signed certificate, no environment knob; with its STUN server or without."""
    running = start_server(tmp_path / "control", stun_port=0 if request.param else None)
    try:
        yield running, Admin(running)
    finally:
        running.stop()


@pytest.fixture
def embedded_no_stun(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    """The embedded relay without STUN: nodes that advertise nothing learn no endpoint."""
    running = start_server(tmp_path / "control", stun_port=None)
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def _no_direct_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nodes advertise no endpoint, as two nodes behind NATs that let nothing in before STUN."""
    monkeypatch.setattr(Node, "_advertised_hosts", lambda self: set())


@contextlib.asynccontextmanager
async def _web_and_db(url: str, key: str) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes on loopback, up in the tailnet."""
    async with (
        Node(hostname="web", control_url=url, auth_key=key, listen_host="127.0.0.1") as web,
        Node(hostname="db", control_url=url, auth_key=key, listen_host="127.0.0.1") as db,
    ):
        await web.up(timeout=10)
        await db.up(timeout=10)
        yield web, db


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def test_nodes_without_a_direct_path_talk_through_a_derp_map_relay(
    tailnet: tuple[Any, Admin, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, admin, derp_port = tailnet
    key = admin.key(reusable=True)
    _no_direct_endpoints(monkeypatch)
    payload = os.urandom(200_000)

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)))
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "127.0.0.1", derp_port)
            async with _web_and_db(running.url, key) as (web, db):
                await _wait_for(lambda: db.status().peers and web.status().peers)
                assert await db.ping("web", timeout=10) > 0
                (peer,) = db.status().peers
                assert peer.path == "derp" and peer.path_address == "test"
                assert 'relay "test"' in peer.path_text

                listener = await web.listen("tcp", ":8080")

                async def echo(stream: Any) -> None:
                    async with stream:
                        received = bytearray()
                        while len(received) < len(payload):
                            received += await stream.receive()
                        await stream.send(bytes(received))

                tg.start_soon(listener.serve, echo)
                stream = await db.dial("tcp", "web:8080")
                await stream.send(payload)
                back = bytearray()
                with anyio.fail_after(20):
                    while len(back) < len(payload):
                        back += await stream.receive()
                assert bytes(back) == payload
                await stream.aclose()
                # The relay carried it (the DERP server's counters), not a direct path.
                assert server.core.packets_relayed > 0
                status = db.status()
                assert status.counters["derp_tx_packets"] > 0 and status.counters["derp_rx_packets"] > 0
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_nodes_relay_through_the_embedded_derp_server(
    embedded_no_stun: tuple[Any, Admin], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, admin = embedded_no_stun
    key = admin.key(reusable=True)
    _no_direct_endpoints(monkeypatch)
    relay = running.server.embedded_derp
    assert relay is not None and relay.cert_sha256 is not None
    region = running.server.derp_map_json()["Regions"]["999"]
    assert region["Nodes"][0]["CertName"] == f"sha256-raw:{relay.cert_sha256}"

    async def main() -> None:
        async with _web_and_db(running.url, key) as (web, db):
            await _wait_for(lambda: db.status().peers and web.status().peers)
            assert await db.ping("web", timeout=10) > 0
            (peer,) = db.status().peers
            assert peer.path == "derp" and peer.path_address == "embedmesh"
            # Without STUN the node learns nothing to advertise, but its home region is set.
            status = db.status()
            assert status.home_derp == "embedmesh" and status.endpoints == () and not status.udp
            listener = await web.listen_packet("udp", ":9000")
            sender = await db.listen_packet("udp", ":0")
            await sender.sendto(b"through the relay", str(web.ips[0]), 9000)
            with anyio.fail_after(10):
                data, _ = await listener.receive()
            assert data == b"through the relay"
            assert relay.server.core.packets_relayed > 0

    anyio.run(main)


def test_a_relayed_peer_upgrades_to_a_direct_path(
    embedded_no_stun: tuple[Any, Admin], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One node has no endpoint to advertise, the other does: traffic starts on DERP, the
    CallMeMaybe through DERP makes the hidden one ping the other's endpoint, and the pong proves
    a direct path (as two nodes where only one is behind a NAT)."""
    running, admin = embedded_no_stun
    key = admin.key(reusable=True)
    hidden: set[str] = set()
    real = Node._advertised_hosts
    monkeypatch.setattr(Node, "_advertised_hosts", lambda self: set() if self.hostname in hidden else real(self))
    hidden.add("db")

    async def main() -> None:
        async with _web_and_db(running.url, key) as (web, db):
            await _wait_for(lambda: db.status().peers and web.status().peers)
            assert await db.ping("web", timeout=10) > 0
            await _wait_for(lambda: web.status().peers[0].path == "direct", timeout=15)
            await _wait_for(lambda: db.status().peers[0].path == "direct", timeout=15)
            peer = db.status().peers[0]
            assert peer.path_address is not None and peer.path_address[0] == "127.0.0.1"
            assert peer.latency is not None and peer.latency < 1.0
            assert await db.ping("web", timeout=10) > 0

    anyio.run(main)


def test_stun_from_the_wireguard_socket_finds_a_direct_path(
    embedded: tuple[Any, Admin], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes with no local endpoint to advertise (as behind a NAT) learn their public endpoint
    from the embedded STUN server through their WireGuard socket, advertise it, and go direct;
    the measured region is home. Without STUN they stay on the relay."""
    running, admin = embedded
    with_stun = running.server.config.stun_port is not None
    key = admin.key(reusable=True)
    _no_direct_endpoints(monkeypatch)
    relay = running.server.embedded_derp

    async def main() -> None:
        async with _web_and_db(running.url, key) as (web, db):
            await _wait_for(lambda: db.status().udp is not None and web.status().udp is not None)
            status = db.status()
            assert status.udp is with_stun and status.home_derp == "embedmesh"
            if not with_stun:
                assert status.endpoints == ()
                assert await db.ping("web", timeout=10) > 0
                assert db.status().peers[0].path == "derp"
                return
            assert status.endpoints == (f"127.0.0.1:{db.listen_port}",)
            assert relay.stun_server.counters["success"] > 0
            # The control server passed the endpoint on: the peer's map has it.
            await _wait_for(lambda: (p := web.netmap.peer_by_name("db")) is not None and p.endpoints)
            assert await db.ping("web", timeout=10) > 0
            await _wait_for(lambda: db.status().peers[0].path == "direct", timeout=15)
            assert db.status().peers[0].path_address == ("127.0.0.1", web.listen_port)

    anyio.run(main)
