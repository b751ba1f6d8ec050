"""Meshed embedmesh DERP servers on loopback: clients of different servers reach each other both
ways, a client moves between servers, a server of the mesh restarts, and the mesh frames' rules
(mesh key required; WatchConns, ClosePeer) hold over real sockets."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpClient, DerpConnectionClosed, connect_derp
from embedmesh.tailscale.derpmesh import MeshPeer
from embedmesh.tailscale.derpserver import DerpServer, tls_context
from embedmesh.tailscale.keys import NodePrivate, NodePublic

MESH_KEY = os.urandom(32)
RETRY = 0.1  # seconds between a mesh link's attempts (derper's 5 s would make the tests slow)
#: How the servers of a region serve their connections: all from asyncio protocol callbacks, or
#: every other one with anyio streams and writer tasks (set per test by the fixture below).
MIXED = [False]


@pytest.fixture(autouse=True, params=["protocols", "mixed"])
def serving(request: pytest.FixtureRequest) -> Iterator[None]:
    MIXED[0] = request.param == "mixed"
    yield
    MIXED[0] = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """A DERP server serving on a fixed loopback port in its own cancel scope, so it can stop and
    start again (same key, same port) while the test goes on."""

    def __init__(self, tg: anyio.abc.TaskGroup, ports: list[int], index: int) -> None:
        self.tg = tg
        self.ports = ports
        self.index = index
        self.private = NodePrivate.generate(os.urandom(32))
        self.server: DerpServer
        self._scope: anyio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[self.index]}/derp"

    async def start(self) -> DerpServer:
        # Every server names the whole region, itself included, as derper deployments do.
        peers = [MeshPeer(f"http://127.0.0.1:{port}/derp") for port in self.ports]
        fast_path = not (MIXED[0] and self.index % 2)
        self.server = DerpServer(self.private, mesh_key=MESH_KEY, mesh_with=peers, mesh_retry_interval=RETRY, fast_path=fast_path)
        self._scope = anyio.CancelScope()
        started = anyio.Event()

        async def run() -> None:
            assert self._scope is not None
            with self._scope:
                async with anyio.create_task_group() as inner:
                    await inner.start(self.server.serve, "127.0.0.1", self.ports[self.index])
                    started.set()

        self.tg.start_soon(run)
        await started.wait()
        return self.server

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        while self.server.stats.connections:
            await anyio.sleep(0.01)


@asynccontextmanager
async def region(count: int) -> AsyncIterator[list[Running]]:
    ports = [_free_port() for _ in range(count)]
    async with anyio.create_task_group() as tg:
        servers = [Running(tg, ports, i) for i in range(count)]
        for running in servers:
            await running.start()
        yield servers
        tg.cancel_scope.cancel()


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def _meshed(servers: list[Running]) -> None:
    """Every link is watching (or found itself), so every server knows every other's clients."""
    for running in servers:
        for link in running.server.mesh_links:
            await _until(lambda link=link: link.self_connect or link.forwarder is not None, f"link {link.peer}")


async def _knows(running: Running, key: NodePublic) -> None:
    await _until(lambda: running.server.core.in_region(key), f"{key.short_string()} known to {running.url}")


async def _packet(client: DerpClient, src: NodePublic, data: bytes) -> list[derp.ClientEvent]:
    """Wait for ``data`` from ``src``; returns the events that came before it."""
    skipped = []
    with anyio.fail_after(10):
        while True:
            event = await client.receive()
            if isinstance(event, derp.PacketReceived) and event.src == src:
                assert event.packet == data
                return skipped
            skipped.append(event)


def _run(body: Callable[[], Awaitable[None]], backend: str = "asyncio") -> None:
    async def main() -> None:
        with anyio.fail_after(60):
            await body()

    anyio.run(main, backend=backend)


def test_three_meshed_servers_relay_between_their_clients_both_ways() -> None:
    keys = [NodePrivate.generate(os.urandom(32)) for _ in range(3)]

    async def body() -> None:
        async with region(3) as servers:
            await _meshed(servers)
            # Each server found itself in the list once, and links to the two others.
            for running in servers:
                links = running.server.mesh_links
                assert sum(link.self_connect for link in links) == 1
                assert sum(link.forwarder is not None for link in links) == 2
            async with (
                connect_derp(servers[0].url, keys[0]) as alice,
                connect_derp(servers[1].url, keys[1]) as bob,
                connect_derp(servers[2].url, keys[2]) as carol,
            ):
                clients = [alice, bob, carol]
                for running in servers:
                    for client in clients:
                        await _knows(running, client.public_key)
                for sender in clients:
                    for receiver in clients:
                        if sender is not receiver:
                            data = os.urandom(1200)
                            await sender.send(receiver.public_key, data)
                            await _packet(receiver, sender.public_key, data)
                big = os.urandom(derp.MAX_PACKET_SIZE)
                await carol.send(alice.public_key, big)
                await _packet(alice, carol.public_key, big)
                forwarded_out = sum(r.server.core.packets_forwarded_out for r in servers)
                forwarded_in = sum(r.server.core.packets_forwarded_in for r in servers)
                assert forwarded_out == forwarded_in == 7
            for running in servers:
                assert running.server.core.drops[derp.DropReason.UNKNOWN_DEST] == 0

    _run(body)


def test_peer_gone_crosses_the_mesh() -> None:
    async def body() -> None:
        async with region(2) as servers:
            await _meshed(servers)
            async with connect_derp(servers[1].url, NodePrivate.generate(os.urandom(32))) as bob:
                async with connect_derp(servers[0].url, NodePrivate.generate(os.urandom(32))) as alice:
                    await _knows(servers[0], bob.public_key)
                    await alice.send(bob.public_key, b"hi")
                    await _packet(bob, alice.public_key, b"hi")
                # Alice left server 0, so she left the region: Bob, on server 1, hears so.
                with anyio.fail_after(10):
                    while (event := await bob.receive()) != derp.PeerGone(alice.public_key, derp.PeerGoneReason.DISCONNECTED):
                        assert not isinstance(event, derp.PacketReceived)

    _run(body)


def test_a_client_moving_between_servers_keeps_receiving() -> None:
    bob_key = NodePrivate.generate(os.urandom(32))

    async def body() -> None:
        async with region(3) as servers:
            await _meshed(servers)
            a, b, c = servers
            async with (
                connect_derp(a.url, NodePrivate.generate(os.urandom(32))) as alice,
                connect_derp(c.url, NodePrivate.generate(os.urandom(32))) as carol,
                connect_derp(b.url, bob_key) as bob_on_b,
            ):
                for running in (a, c):
                    await _knows(running, bob_on_b.public_key)
                await carol.send(bob_on_b.public_key, b"1")
                await _packet(bob_on_b, carol.public_key, b"1")
                # Bob roams: his new connection (to A) comes up before the old one (to B) ends.
                async with connect_derp(a.url, bob_key) as bob_on_a:
                    await _until(lambda: len(c.server.core.forwarders(bob_key.public())) == 2, "two forwarders on C")
                    await alice.send(bob_key.public(), b"2")  # local to A now
                    await _packet(bob_on_a, alice.public_key, b"2")
                    await bob_on_b.aclose()
                    await _until(lambda: len(c.server.core.forwarders(bob_key.public())) == 1, "B's forwarder gone on C")
                    assert not b.server.core.is_connected(bob_key.public())
                    await carol.send(bob_key.public(), b"3")
                    await _packet(bob_on_a, carol.public_key, b"3")
                    # Carol never heard PeerGone for Bob: he never left the region.
                    await bob_on_a.send(carol.public_key, b"4")
                    before = await _packet(carol, bob_key.public(), b"4")
                    assert not any(isinstance(e, derp.PeerGone) for e in before), before
            for running in servers:
                assert running.server.core.drops[derp.DropReason.UNKNOWN_DEST] == 0

    _run(body)


def test_a_restarting_server_rejoins_the_mesh() -> None:
    async def body() -> None:
        async with region(2) as servers:
            await _meshed(servers)
            a, b = servers
            alice_key, bob_key = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
            async with connect_derp(a.url, alice_key) as alice:
                async with connect_derp(b.url, bob_key) as bob:
                    await _knows(a, bob.public_key)
                    await bob.send(alice.public_key, b"before")
                    await _packet(alice, bob.public_key, b"before")
                    await b.stop()
                    # A's link to B broke: Bob left the region as far as A knows, and Alice, who
                    # heard from him, is told so.
                    with anyio.fail_after(10):
                        while (await alice.receive()) != derp.PeerGone(bob.public_key, derp.PeerGoneReason.DISCONNECTED):
                            pass
                    assert not a.server.core.in_region(bob.public_key)
                    with pytest.raises(DerpConnectionClosed):
                        with anyio.fail_after(10):
                            while True:
                                await bob.receive()
                await b.start()  # the same key on the same port
                await _meshed(servers)
                async with connect_derp(b.url, bob_key) as bob:
                    await _knows(a, bob.public_key)
                    await alice.send(bob.public_key, b"after")
                    await _packet(bob, alice.public_key, b"after")
                    await bob.send(alice.public_key, b"back")
                    await _packet(alice, bob.public_key, b"back")
                assert [link.connects for link in a.server.mesh_links if not link.self_connect] == [2]

    _run(body)


def test_mesh_frames_need_the_mesh_key_and_close_peer_closes() -> None:
    async def body() -> None:
        async with region(1) as (only,):
            url = only.url
            # A client without the mesh key that asks to watch is disconnected.
            async with connect_derp(url, NodePrivate.generate(os.urandom(32))) as intruder:
                await intruder.watch_conns()
                with pytest.raises(DerpConnectionClosed), anyio.fail_after(10):
                    while True:
                        await intruder.receive()
            # A trusted client (the mesh key in its ClientInfo) watches and closes a connection.
            async with connect_derp(url, NodePrivate.generate(os.urandom(32))) as victim:
                info = derp.ClientInfo(mesh_key=MESH_KEY)
                async with connect_derp(url, NodePrivate.generate(os.urandom(32)), info=info) as admin:
                    await admin.watch_conns()
                    seen: set[NodePublic] = set()
                    with anyio.fail_after(10):
                        while victim.public_key not in seen:
                            event = await admin.receive()
                            if isinstance(event, derp.PeerPresent):
                                assert event.ip is not None and str(event.ip) == "127.0.0.1" and event.port > 0
                                seen.add(event.key)
                    await admin.close_peer(victim.public_key)
                    with pytest.raises(DerpConnectionClosed), anyio.fail_after(10):
                        while True:
                            await victim.receive()
                    with anyio.fail_after(10):
                        while (await admin.receive()) != derp.PeerGone(victim.public_key, derp.PeerGoneReason.DISCONNECTED):
                            pass

    _run(body)


def test_a_region_on_trio(serving: None) -> None:
    """Off asyncio the servers serve with anyio streams; meshing and relaying work the same."""

    async def body() -> None:
        async with region(2) as servers:
            await _meshed(servers)
            keys = [NodePrivate.generate(os.urandom(32)) for _ in range(2)]
            async with connect_derp(servers[0].url, keys[0]) as alice, connect_derp(servers[1].url, keys[1]) as bob:
                await _knows(servers[0], bob.public_key)
                await _knows(servers[1], alice.public_key)
                await alice.send(bob.public_key, b"over trio")
                await _packet(bob, alice.public_key, b"over trio")
                await bob.send(alice.public_key, b"and back")
                await _packet(alice, bob.public_key, b"and back")

    _run(body, backend="trio")


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "embedmesh test DERP region")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(private, hashes.SHA256())
    )
    cert_path, key_path = folder / "derp.crt", folder / "derp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_a_region_over_tls(tmp_path: Path, serving: None) -> None:
    """Servers that serve HTTPS mesh over HTTPS (derper's default), clients connect with TLS."""
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        ports = [_free_port(), _free_port()]
        peers = [MeshPeer(f"https://127.0.0.1:{port}/derp") for port in ports]
        servers = [
            DerpServer(
                NodePrivate.generate(os.urandom(32)),
                ssl_context=tls_context(cert, key),
                mesh_key=MESH_KEY,
                mesh_with=peers,
                mesh_ssl_context=trust,
                mesh_retry_interval=RETRY,
                fast_path=not (MIXED[0] and i % 2),
            )
            for i in range(2)
        ]
        async with anyio.create_task_group() as tg:
            for server, port in zip(servers, ports, strict=True):
                await tg.start(server.serve, "127.0.0.1", port)
            for server in servers:
                for link in server.mesh_links:
                    await _until(lambda link=link: link.self_connect or link.forwarder is not None, "TLS mesh link")
            urls = [peer.url for peer in peers]
            keys = [NodePrivate.generate(os.urandom(32)) for _ in range(2)]
            async with (
                connect_derp(urls[0], keys[0], ssl_context=trust) as alice,
                connect_derp(urls[1], keys[1], ssl_context=trust) as bob,
            ):
                await _until(lambda: servers[0].core.in_region(bob.public_key), "bob known to server 0")
                await _until(lambda: servers[1].core.in_region(alice.public_key), "alice known to server 1")
                data = os.urandom(derp.MAX_PACKET_SIZE)
                await alice.send(bob.public_key, data)
                await _packet(bob, alice.public_key, data)
                await bob.send(alice.public_key, b"back over TLS")
                await _packet(alice, bob.public_key, b"back over TLS")
            tg.cancel_scope.cancel()

    _run(body)
