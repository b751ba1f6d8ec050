"""An embedmesh DERP server and Tailscale's ``derper --mesh-with`` (tailscale.com v1.102.5) in one
region, on loopback: each watches the other's connections (WatchConns, PeerPresent, PeerGone) and
forwards packets for the other's clients (ForwardPacket), so clients of either server reach each
other both ways: ours (embedmesh's DERP client) and Tailscale's own derphttp client.

derper dials its mesh peers as ``https://HOST/derp``; ``TS_DEBUG_USE_DERP_HTTP=1`` (a knob of
Tailscale's DERP client) makes it speak plain HTTP to our loopback server instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpClient, connect_derp
from embedmesh.tailscale.derpmesh import MeshPeer
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate, NodePublic
from tests.interop import gopeers
from tests.tailscale.test_derp_go import go_client

pytestmark = pytest.mark.interop

MESH_KEY = os.urandom(32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Derper:
    url: str
    key: NodePublic
    log: Path


@pytest.fixture
def region(tmp_path: Path) -> Iterator[tuple[int, Derper]]:
    """Ports for our server (not started yet) and a derper that meshes with it."""
    binary = gopeers.require(gopeers.derper)
    ours, theirs = _free_port(), _free_port()
    private = NodePrivate.generate(os.urandom(32))
    config = tmp_path / "derper.json"
    config.write_text(json.dumps({"PrivateKey": private.to_text()}))
    config.chmod(0o600)
    key_file = tmp_path / "mesh.key"
    key_file.write_text(MESH_KEY.hex() + "\n")
    log = tmp_path / "derper.log"
    with open(log, "wb") as log_file:
        mesh = ["--mesh-psk-file", str(key_file), "--mesh-with", f"127.0.0.1:{ours},127.0.0.1:{theirs}"]
        process = subprocess.Popen(
            [str(binary), "-a", f"127.0.0.1:{theirs}", "-http-port", "-1", "-stun=false", "-c", str(config), *mesh],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TS_NO_LOGS_NO_SUPPORT": "true", "TS_DEBUG_USE_DERP_HTTP": "1"},
        )
    try:
        yield ours, Derper(f"http://127.0.0.1:{theirs}/derp", private.public(), log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@asynccontextmanager
async def our_server(port: int, derper: Derper) -> AsyncIterator[DerpServer]:
    server = DerpServer(NodePrivate.generate(os.urandom(32)), mesh_key=MESH_KEY, mesh_with=[MeshPeer(derper.url)])
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", port)
        (link,) = server.mesh_links
        try:
            with anyio.fail_after(30):
                # Our link watches derper; derper's link (it retries every 5 s) watches us.
                await link.watching.wait()
                while not server.core.watchers:
                    await anyio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"no mesh with derper: {link.last_error}; derper's log:\n{derper.log.read_text()[-3000:]}")
        assert link.forwarder is not None
        yield server
        tg.cancel_scope.cancel()


async def _until_known(server: DerpServer, key: NodePublic) -> None:
    with anyio.fail_after(10):
        while not server.core.in_region(key):
            await anyio.sleep(0.01)


async def _receive(client: DerpClient, src: NodePublic, data: bytes) -> None:
    with anyio.fail_after(10):
        while (await client.receive()) != derp.PacketReceived(src, data):
            pass


async def _send_until_received(sender: DerpClient, receiver: DerpClient, data: bytes) -> None:
    """derper learns of our clients from its own watch connection: resend until it has."""
    with anyio.fail_after(15):
        while True:
            await sender.send(receiver.public_key, data)
            with anyio.move_on_after(0.2):
                await _receive(receiver, sender.public_key, data)
                return


def test_our_server_and_derper_mesh_and_relay_between_their_clients(region: tuple[int, Derper]) -> None:
    port, derper = region

    async def main() -> None:
        async with our_server(port, derper) as server:
            ours_url = f"http://127.0.0.1:{port}/derp"
            async with (
                connect_derp(ours_url, NodePrivate.generate(os.urandom(32))) as alice,
                connect_derp(derper.url, NodePrivate.generate(os.urandom(32))) as bob,
            ):
                assert bob.server_key == derper.key
                # derper's watchers told our link about Bob; derper forwards Alice's packets back.
                await _until_known(server, bob.public_key)
                assert server.core.forwarders(bob.public_key)
                for data in (b"alice to bob", os.urandom(derp.MAX_PACKET_SIZE)):
                    await alice.send(bob.public_key, data)
                    await _receive(bob, alice.public_key, data)
                for data in (b"bob to alice", os.urandom(1280)):
                    await _send_until_received(bob, alice, data)
                assert server.core.packets_forwarded_out == 2 and server.core.packets_forwarded_in >= 2
                # Tailscale's own client on derper and ours on our server, both ways.
                async with go_client(derper.url) as go:
                    await go.event("serverinfo")
                    await _until_known(server, go.key)
                    await alice.send(go.key, b"python to go")
                    got = await go.event("packet")
                    assert (NodePublic.from_text(got["src"]), bytes.fromhex(got["data"])) == (alice.public_key, b"python to go")
                    await go.send(alice.public_key, b"go to python")
                    await _receive(alice, go.key, b"go to python")
                    # Go leaves derper, so the region: Alice, who heard from it, hears PeerGone
                    # (derper's PeerGone on our watch connection).
                    await go.command("close")
                    with anyio.fail_after(10):
                        while (await alice.receive()) != derp.PeerGone(go.key, derp.PeerGoneReason.DISCONNECTED):
                            pass
                    assert not server.core.in_region(go.key)
            for reason in (derp.DropReason.UNKNOWN_DEST, derp.DropReason.UNKNOWN_DEST_ON_FWD):
                assert server.core.drops[reason] == 0

    anyio.run(main)
