"""Our DERP client against real DERP servers: Tailscale's ``derper`` (tailscale.com v1.102.5, on
loopback, plain HTTP; over TCP and over WebSocket) and, with Tailscale's own derphttp client on the
other end, our server. derper with ``--verify-client-url`` asks embedmesh's control server
(``/derp/admit``) and relays for its nodes only."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.keys import NodePrivate, NodePublic
from tests.interop import gopeers
from tests.tailscale.test_derp_go import go_client, our_server

pytestmark = pytest.mark.interop


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def derper(tmp_path: Path) -> Iterator[tuple[str, NodePublic]]:
    with run_derper(tmp_path) as running:
        yield running


@contextlib.contextmanager
def run_derper(tmp_path: Path, *flags: str) -> Iterator[tuple[str, NodePublic]]:
    binary = gopeers.require(gopeers.derper)
    key = NodePrivate.generate(os.urandom(32))
    config = tmp_path / "derper.json"
    config.write_text(json.dumps({"PrivateKey": key.to_text()}))
    config.chmod(0o600)
    port = _free_port()
    with gopeers.running_derper(binary, config, port, "-stun=false", *flags):
        yield f"http://127.0.0.1:{port}/derp", key.public()


def test_our_clients_relay_through_derper(derper: tuple[str, NodePublic]) -> None:
    url, derper_key = derper
    alice_key, bob_key = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))

    async def main() -> None:
        async with connect_derp(url, alice_key) as alice, connect_derp(url, bob_key) as bob:
            assert alice.server_key == derper_key and alice.server_info is not None
            await alice.note_preferred(True)
            assert await alice.ping() < 5
            big = os.urandom(64 << 10)
            await alice.send(bob.public_key, b"hello bob")
            await alice.send(bob.public_key, big)
            received = []
            with anyio.fail_after(10):
                async for src, packet in bob.packets():
                    received.append((src, packet))
                    if len(received) == 2:
                        break
            assert received == [(alice.public_key, b"hello bob"), (alice.public_key, big)]
            await bob.send(alice.public_key, b"hello alice")
            with anyio.fail_after(10):
                while (event := await alice.receive()) != derp.PacketReceived(bob.public_key, b"hello alice"):
                    pass
        # A disco packet to a node derper does not know earns PeerGone(not here).
        async with connect_derp(url, alice_key) as alice:
            nobody = NodePrivate.generate(os.urandom(32)).public()
            await alice.send(nobody, b"TS\xf0\x9f\x92\xac" + bytes(56) + b"box")
            with anyio.fail_after(10):
                while not isinstance(event := await alice.receive(), derp.PeerGone):
                    pass
            assert event == derp.PeerGone(nobody, derp.PeerGoneReason.NOT_HERE)

    anyio.run(main)


def test_go_client_and_our_client_through_our_server() -> None:
    key = NodePrivate.generate(os.urandom(32))

    async def main() -> None:
        async with our_server() as server:
            url = f"http://127.0.0.1:{server.port}/derp"
            async with go_client(url) as go, connect_derp(url, key) as ours:
                await go.event("serverinfo")
                await go.send(ours.public_key, b"from go")
                with anyio.fail_after(10):
                    src, packet = await anext(aiter(ours.packets()))
                assert (src, packet) == (go.key, b"from go")
                await ours.send(go.key, b"from python")
                got = await go.event("packet")
                assert (NodePublic.from_text(got["src"]), bytes.fromhex(got["data"])) == (ours.public_key, b"from python")

    anyio.run(main)


def test_connect_errors_are_one_line() -> None:
    async def main() -> None:
        port = _free_port()
        with pytest.raises(DerpConnectError, match="cannot reach"):
            async with connect_derp(f"http://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32))):
                pass
        async with our_server() as server:
            with pytest.raises(DerpConnectError, match="refused the DERP upgrade"):
                async with connect_derp(f"http://127.0.0.1:{server.port}/nope", NodePrivate.generate(os.urandom(32))):
                    pass

    anyio.run(main)


def test_our_websocket_client_through_derper(derper: tuple[str, NodePublic]) -> None:
    url, derper_key = derper

    async def main() -> None:
        async with (
            connect_derp(url, NodePrivate.generate(os.urandom(32)), websocket=True) as ws,
            connect_derp(url, NodePrivate.generate(os.urandom(32))) as tcp,
        ):
            assert ws.server_key == derper_key and ws.server_info is not None
            big = os.urandom(64 << 10)
            await ws.send(tcp.public_key, big)
            with anyio.fail_after(10):
                assert await anext(tcp.packets()) == (ws.public_key, big)
            await tcp.send(ws.public_key, b"to the websocket")
            with anyio.fail_after(10):
                assert await anext(ws.packets()) == (tcp.public_key, b"to the websocket")
            assert await ws.ping() < 5

    anyio.run(main)


def test_derper_admits_only_the_control_server_s_nodes(tmp_path: Path) -> None:
    from embedmesh.control.messages import RegisterRequest
    from embedmesh.control.server import ControlServer, ServerConfig

    member, stranger = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
    with ControlServer(ServerConfig(state_dir=tmp_path / "control")).start_in_thread() as control:
        coordinator = control.server.coordinator

        def register() -> None:
            _, key = coordinator.create_auth_key(now=time.time())
            coordinator.register(b"m" * 32, RegisterRequest(member.public().raw, b"\x02" * 32, "member", auth_key=key), time.time())

        control.call(register)
        flags = ("-verify-client-url", f"{control.url}/derp/admit", "-verify-client-url-fail-open=false")
        with run_derper(tmp_path, *flags) as (url, _):

            async def main() -> None:
                async with connect_derp(url, member) as client:
                    await client.send(client.public_key, b"a member")
                    with anyio.fail_after(10):
                        assert await anext(client.packets()) == (member.public(), b"a member")
                with pytest.raises(DerpConnectError):
                    async with connect_derp(url, stranger, timeout=5):
                        pass

            anyio.run(main)
