"""The gateways' failure paths (issue 8): every refused or failed SOCKS5 request and every failed
``--forward`` connection ends with the client's socket closed (no CLOSE_WAIT left behind), with the
RFC 1928 reply first; an address no peer routes fails at once; SOCKS5 reaches tailnet peers only
and never asks a resolver about names outside the tailnet."""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_address
from pathlib import Path

import anyio
import anyio.abc
import pytest

from embedmesh import Node
from embedmesh.dns.records import MagicZone
from embedmesh.gateway.forward import forward_local
from embedmesh.gateway.socks5 import serve_socks5, tailnet_dialer
from embedmesh.node import _local_addresses
from tests.dns.dns_harness import AdminDNSConfig, TestUpstream, netmap, peer, zone_handler
from tests.test_node_static import _configs

CLIENTS = 100
CLOSE_WAIT = 0x08  # the state column of /proc/net/tcp (include/net/tcp_states.h)


def sockets_in_state(port: int, state: int) -> int:
    """Sockets whose local port is ``port`` in TCP state ``state``, from /proc/net/tcp{,6}."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and int(fields[3], 16) == state:
                count += 1
    return count


async def settle_close_wait(port: int) -> int:
    """The CLOSE_WAIT count on ``port`` once the server had a moment to run its handlers."""
    deadline = time.monotonic() + 3
    while (count := sockets_in_state(port, CLOSE_WAIT)) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return count


async def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Connect, send ``request``, read until the server closes; (what came back, whether the
    server closed within 3 s). The client closes its end either way."""
    received = b""
    closed = False
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        if request:
            await stream.send(request)
        with anyio.move_on_after(3):
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                closed = True
    return received, closed


async def many(port: int, request: bytes) -> list[tuple[bytes, bool]]:
    results: list[tuple[bytes, bool]] = []

    async def one() -> None:
        results.append(await exchange(port, request))

    async with anyio.create_task_group() as tg:
        for _ in range(CLIENTS):
            tg.start_soon(one)
    return results


def connect(host: str | bytes, port: int) -> bytes:
    """A greeting offering "no authentication" and a CONNECT request."""
    if isinstance(host, bytes):  # a domain name
        address = bytes([3, len(host)]) + host
    else:
        packed = ip_address(host).packed
        address = bytes([1 if len(packed) == 4 else 4]) + packed
    return bytes([5, 1, 0, 5, 1, 0]) + address + port.to_bytes(2, "big")


def reply_code(data: bytes) -> int | None:
    """The reply code of the SOCKS5 reply after the method selection, or None."""
    return data[3] if len(data) >= 4 and data[:2] == bytes([5, 0]) else None


@asynccontextmanager
async def mesh(dns: AdminDNSConfig | None = None, **kw: object) -> AsyncIterator[tuple[Node, Node]]:
    """Two static-mode nodes a (100.64.0.1) and b (100.64.0.2) that know each other by name
    (and a has the admin's DNS settings ``dns``)."""
    a_text, b_text = _configs()
    async with Node(wireguard_config=b_text, listen_host="127.0.0.1", dns_upstreams=[]) as b:
        a_text = a_text.replace("{port_b}", str(b.listen_port))
        async with Node(wireguard_config=a_text, listen_host="127.0.0.1", **kw) as a:  # type: ignore[arg-type]
            names = netmap(
                peer(2, "b", "100.64.0.2", "fd7a:115c:a1e0::2"),
                me=peer(1, "a", "100.64.0.1", "fd7a:115c:a1e0::1"),
                dns=dns,
            )
            a.dns.set_zone(MagicZone.from_netmap(names))
            yield a, b


@asynccontextmanager
async def socks5_gateway(node: Node) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_socks5(listener, tailnet_dialer(node, timeout=5), handshake_timeout=0.5))
        yield port
        tg.cancel_scope.cancel()


def test_every_socks5_failure_replies_then_closes_the_client() -> None:
    """100 clients for each way a request can fail: each gets its reply, then EOF, and no socket
    of the gateway is left in CLOSE_WAIT."""
    cases: list[tuple[str, bytes, bytes | int]] = [
        ("userpass only", bytes([5, 1, 2]), bytes([5, 0xFF])),
        ("GSSAPI only", bytes([5, 1, 1]), bytes([5, 0xFF])),
        ("BIND", bytes([5, 1, 0, 5, 2, 0, 1, 100, 64, 0, 2, 0, 80]), 7),
        ("UDP ASSOCIATE", bytes([5, 1, 0, 5, 3, 0, 1, 100, 64, 0, 2, 0, 80]), 7),
        ("address type 9", bytes([5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80]), 8),
        ("closed port", connect("100.64.0.2", 81), 5),
        ("unrouted address", connect("10.9.9.9", 80), 4),
        ("not a tailnet name", connect(b"nosuch.example", 80), 4),
        ("SOCKS4 client", bytes([4, 1, 0, 80, 100, 64, 0, 2, 0]), b""),
        ("silent client", b"", b""),
    ]

    async def main() -> None:
        async with mesh(dns_upstreams=[]) as (a, _b), socks5_gateway(a) as port:
            for what, request, expected in cases:
                results = await many(port, request)
                for received, closed in results:
                    assert closed, f"{what}: the gateway did not close the client's socket"
                    if isinstance(expected, int):
                        assert reply_code(received) == expected, (what, received)
                        assert len(received) == 2 + 10  # method selection + an IPv4 reply
                    else:
                        assert received == expected, (what, received)
                assert await settle_close_wait(port) == 0, f"{what}: sockets left in CLOSE_WAIT"

    anyio.run(main)


def test_forward_closes_the_client_when_the_peer_cannot_be_reached() -> None:
    """A `--forward` whose target refuses or is unrouted: each client sees EOF at once, nothing
    stays in CLOSE_WAIT, and the forward keeps serving (a failure must not end its listener)."""

    async def main() -> None:
        async with mesh(dns_upstreams=[]) as (a, b):
            targets: list[Callable[[], Awaitable[anyio.abc.ByteStream]]] = [
                lambda: a.dial("tcp", "100.64.0.2:81", timeout=5),  # refused
                lambda: a.dial("tcp", "10.9.9.9:80", timeout=5),  # no peer routes it
                lambda: a.dial("tcp", "nosuch:80", timeout=5),  # no such name
            ]
            served = await b.listen("tcp", ":82")
            async with anyio.create_task_group() as tg:

                async def hello(stream: anyio.abc.ByteStream) -> None:
                    async with stream:
                        await stream.send(b"still here")

                tg.start_soon(served.serve, hello)
                for target in targets:
                    front = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
                    port = int(front.extra(anyio.abc.SocketAttribute.local_port))
                    tg.start_soon(forward_local, front, target, "forward")
                    results = await many(port, b"hello?")
                    assert all(closed and not received for received, closed in results)
                    assert await settle_close_wait(port) == 0
                # The forwards still work after all those failures.
                ok = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
                ok_port = int(ok.extra(anyio.abc.SocketAttribute.local_port))
                tg.start_soon(forward_local, ok, lambda: a.dial("tcp", "100.64.0.2:82", timeout=5), "ok")
                assert await exchange(ok_port, b"") == (b"still here", True)
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_an_address_no_peer_routes_fails_at_once() -> None:
    """Host unreachable in well under a second, from dial() and through SOCKS5 (not a 30-s hang)."""

    async def main() -> None:
        async with mesh(dns_upstreams=[]) as (a, _b), socks5_gateway(a) as port:
            for address in ("10.9.9.9:80", "[2001:db8::1]:80", "100.64.0.99:80"):
                started = time.monotonic()
                with pytest.raises(OSError) as info:
                    await a.dial("tcp", address)
                assert info.value.errno == errno.EHOSTUNREACH
                assert "no peer of this node routes" in str(info.value)
                assert time.monotonic() - started < 1
            for host in ("10.9.9.9", "2001:db8::1", "100.64.0.99"):
                started = time.monotonic()
                received, closed = await exchange(port, connect(host, 80))
                assert reply_code(received) == 4 and closed  # host unreachable
                assert time.monotonic() - started < 1

    anyio.run(main)


def test_socks5_reaches_only_tailnet_peers() -> None:
    """No CONNECT into the host's own network through the proxy (loopback, its LAN addresses,
    localhost by name), and names resolve in the tailnet only: the host's resolver is never asked.
    A tailnet peer by address, short name and FQDN works."""
    upstream = TestUpstream(zone_handler({("localhost", "A"): ["127.0.0.1"], ("lan.example", "A"): ["127.0.0.1"]}))
    lab = TestUpstream(zone_handler({("web.lab.example", "A"): ["100.64.0.2"], ("host.lab.example", "A"): ["127.0.0.1"]}))

    async def main() -> None:
        host_service = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        host_port = int(host_service.extra(anyio.abc.SocketAttribute.local_port))
        accepted: list[object] = []

        async def record(stream: anyio.abc.SocketStream) -> None:
            accepted.append(stream.extra(anyio.abc.SocketAttribute.remote_address))
            await stream.aclose()

        async with anyio.create_task_group() as outer:
            up_port = await outer.start(upstream.run)
            lab_port = await outer.start(lab.run)
            outer.start_soon(host_service.serve, record)
            split = AdminDNSConfig(split_dns={"lab.example": (f"127.0.0.1:{lab_port}",)})
            async with (
                mesh(split, dns_upstreams=[f"127.0.0.1:{up_port}"]) as (a, b),
                socks5_gateway(a) as port,
            ):
                web = await b.listen("tcp", ":80")
                async with anyio.create_task_group() as tg:

                    async def hello(stream: anyio.abc.ByteStream) -> None:
                        async with stream:
                            await stream.send(b"hello from b")

                    tg.start_soon(web.serve, hello)
                    refused: list[str | bytes] = ["127.0.0.1", "::1", "0.0.0.0", *_local_addresses()]
                    refused += [b"localhost", b"lan.example", b"127.0.0.1.nip.io", b"host.lab.example"]
                    for host in refused:
                        received, closed = await exchange(port, connect(host, host_port))
                        assert reply_code(received) == 4 and closed, host
                    assert accepted == []
                    assert upstream.queries == []  # no name left the tailnet
                    # A tailnet peer by address, by name, and by a name of a split-DNS route.
                    peers: list[str | bytes] = ["100.64.0.2", "fd7a:115c:a1e0::2", b"b", b"b.mesh.internal"]
                    for host in [*peers, b"B.Mesh.Internal.", b"web.lab.example"]:
                        received, closed = await exchange(port, connect(host, 80))
                        assert reply_code(received) == 0, host
                        assert received.endswith(b"hello from b") and closed
                    # The node's own resolver still forwards: only the proxy is confined.
                    assert await a.resolve("lan.example") == [ip_address("127.0.0.1")]
                    tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    anyio.run(main)
