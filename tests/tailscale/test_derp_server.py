"""Our DERP server's HTTP side and its handling of hostile connections, over real loopback sockets,
on both of its ways to serve a connection (asyncio protocol callbacks, and anyio streams with a
writer task each)."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from embedmesh.control.embeddedderp import certificate_sha256, self_signed_certificate
from embedmesh.tailscale import derp, derpserver
from embedmesh.tailscale.derpclient import connect_derp
from embedmesh.tailscale.derpserver import DerpServer, tls_context
from embedmesh.tailscale.keys import NodePrivate


@pytest.fixture(params=[True, False], ids=["protocols", "streams"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _run(body: Callable[[DerpServer], Awaitable[None]], fast_path: bool = True, write_timeout: float = 2.0) -> None:
    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), fast_path=fast_path, write_timeout=write_timeout)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "127.0.0.1", 0)
            with anyio.fail_after(10):
                await body(server)
            tg.cancel_scope.cancel()

    anyio.run(main)


async def _exchange(port: int, request: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


def test_probe_generate_204_and_upgrade_required(fast_path: bool) -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        probe = await _exchange(server.port, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 200 ") and b"Access-Control-Allow-Origin: *" in probe
        latency = await _exchange(server.port, b"HEAD /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n")
        assert latency.startswith(b"HTTP/1.1 200 ")
        bogus = await _exchange(server.port, b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert bogus.startswith(b"HTTP/1.1 405 ")
        no_content = await _exchange(server.port, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_abc\r\n\r\n")
        assert no_content.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response ts_abc" in no_content
        bad_challenge = await _exchange(server.port, b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: a b\r\n\r\n")
        assert b"X-Tailscale-Response" not in bad_challenge
        plain = await _exchange(server.port, b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 426 ")
        assert (await _exchange(server.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await _exchange(server.port, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")

    _run(body, fast_path)


UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


def test_upgrade_answers_101_with_the_key_and_garbage_gets_no_routing_state(fast_path: bool) -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        # Garbage instead of a ClientInfo: the connection ends, nothing is registered.
        answer = await _exchange(server.port, UPGRADE + derp.frame_header(derp.FrameType.SEND_PACKET, 40) + bytes(40))
        head, _, frames = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
        assert b"Derp-Public-Key: " + server.public_key.raw.hex().encode() in head
        assert frames == derp.encode_frame(derp.ServerKey(server.public_key))
        assert len(server.core) == 0 and server.stats.rejected == 1
        # A fast-start client: no HTTP answer, the frames start at once; it logs in and relays.
        alice = derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24), server_key=server.public_key)
        fast = UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n")
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            alice.send_packet(alice.public, b"to myself")
            await stream.send(fast + alice.data_to_send())
            got: list[derp.ClientEvent] = alice.events()
            while not any(isinstance(e, derp.PacketReceived) for e in got):
                got += alice.receive_data(await stream.receive())
            assert derp.ServerInfoReceived(derp.ServerInfo()) in got
            assert derp.PacketReceived(alice.public, b"to myself") in got
            assert len(server.core) == 1
        while len(server.core):
            await anyio.sleep(0.01)

    _run(body, fast_path)


def test_a_slow_reader_does_not_stall_others_and_drops_are_counted(fast_path: bool) -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        keys = [NodePrivate.generate(os.urandom(32)) for _ in range(3)]
        streams: list[anyio.abc.SocketStream] = []
        conns: list[derp.ClientConnection] = []
        for key in keys:
            conn = derp.ClientConnection(key, os.urandom(24), server_key=server.public_key)
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            await stream.send(UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n") + conn.data_to_send())
            streams.append(stream)
            conns.append(conn)
        while len(server.core) < 3:
            await anyio.sleep(0.01)
        sender, slow, quick = conns
        # The slow client never reads: 2,000 full-size packets to it fill its socket, then its queue.
        packet = bytes(60_000)
        for _ in range(40):
            for _ in range(50):
                sender.send_packet(slow.public, packet)
            await streams[0].send(sender.data_to_send())
        sender.send_packet(quick.public, b"still flowing")
        await streams[0].send(sender.data_to_send())
        got: list[derp.ClientEvent] = []
        while derp.PacketReceived(sender.public, b"still flowing") not in got:
            got += quick.receive_data(await streams[2].receive())
        assert server.core.drops[derp.DropReason.QUEUE_HEAD] + server.core.drops[derp.DropReason.WRITE_ERROR] > 0
        for stream in streams:
            await stream.aclose()

    _run(body, fast_path)


def test_keepalives_and_the_write_timeout_come_from_one_ticker(monkeypatch: pytest.MonkeyPatch, fast_path: bool) -> None:
    monkeypatch.setattr(derp, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(derpserver, "KEEPALIVE_JITTER", 0.0)

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), write_timeout=0.4, fast_path=fast_path)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            fast = UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n")
            listener = derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24), server_key=server.public_key)
            stalled = derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24), server_key=server.public_key)
            sender = derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24), server_key=server.public_key)
            streams = []
            for conn in (listener, stalled, sender):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(fast + conn.data_to_send())
                streams.append(stream)
            streams[1].extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with anyio.fail_after(10):
                while len(server.core) < 3:
                    await anyio.sleep(0.01)
                # A logged-in client hears KeepAlive every interval.
                got: list[derp.ClientEvent] = []
                while sum(isinstance(e, derp.KeepAlive) for e in got) < 2:
                    got += listener.receive_data(await streams[0].receive())
                # A client that stops reading: once one write to it hangs past the timeout, it is cut off.
                while server.core.is_connected(stalled.public):
                    for _ in range(20):
                        sender.send_packet(stalled.public, bytes(60_000))
                    await streams[2].send(sender.data_to_send())
                    await anyio.sleep(0.05)
            assert server.core.drops[derp.DropReason.WRITE_ERROR] >= 1
            assert server.core.is_connected(listener.public)
            for stream in streams:
                await stream.aclose()
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_https_and_wss_and_a_stalled_tls_handshake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool) -> None:
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1")
    pin = certificate_sha256(cert)
    monkeypatch.setattr(derpserver, "HANDSHAKE_TIMEOUT", 0.5)

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), ssl_context=tls_context(cert, key), fast_path=fast_path)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            with anyio.fail_after(10):
                async with (
                    connect_derp(f"https://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32)), pinned_cert_sha256=pin) as tls,
                    connect_derp(f"wss://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32)), pinned_cert_sha256=pin) as wss,
                ):
                    await tls.send(wss.public_key, b"tls to wss")
                    assert await anext(wss.packets()) == (tls.public_key, b"tls to wss")
                assert server.stats.websocket == 1
                # A client that opens TCP and never starts TLS is closed after the handshake timeout.
                async with await anyio.connect_tcp("127.0.0.1", port) as idle:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await idle.receive()
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_burst_larger_than_the_queue_reaches_a_client_that_reads(fast_path: bool) -> None:
    """200 packets in one write (far more than the 32 a queue holds) all arrive: the queue bound
    is for a client that does not keep up, not for one read of a sender."""

    async def body(server: DerpServer) -> None:
        assert server.port is not None
        keys = [NodePrivate.generate(os.urandom(32)) for _ in range(2)]
        conns = [derp.ClientConnection(key, os.urandom(24), server_key=server.public_key) for key in keys]
        streams = []
        for conn in conns:
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            await stream.send(UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n") + conn.data_to_send())
            streams.append(stream)
        while len(server.core) < 2:
            await anyio.sleep(0.01)
        sender, receiver = conns
        for i in range(200):
            sender.send_packet(receiver.public, i.to_bytes(2, "big") + bytes(1278))
        await streams[0].send(sender.data_to_send())
        got: list[int] = []
        while len(got) < 200:
            for event in receiver.receive_data(await streams[1].receive()):
                if isinstance(event, derp.PacketReceived):
                    got.append(int.from_bytes(event.packet[:2], "big"))
        assert got == list(range(200))
        assert server.core.drops[derp.DropReason.QUEUE_HEAD] == 0
        for stream in streams:
            await stream.aclose()

    _run(body, fast_path)


def test_a_client_that_stops_reading_is_disconnected_after_the_write_timeout(fast_path: bool) -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        conns = [derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24), server_key=server.public_key) for _ in range(2)]
        streams = []
        for conn in conns:
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            await stream.send(UPGRADE.replace(b"\r\n\r\n", b"\r\nDerp-Fast-Start: 1\r\n\r\n") + conn.data_to_send())
            streams.append(stream)
        while len(server.core) < 2:
            await anyio.sleep(0.01)
        sender, stuck = conns
        # The stuck client never reads: its socket fills, its writes back up, then it is cut off.
        with anyio.fail_after(8):
            while server.core.is_connected(stuck.public):
                for _ in range(20):
                    sender.send_packet(stuck.public, bytes(60_000))
                await streams[0].send(sender.data_to_send())
                await anyio.sleep(0.02)
        assert server.core.drops[derp.DropReason.WRITE_ERROR] == 1
        assert server.core.is_connected(sender.public)
        for stream in streams:
            await stream.aclose()

    _run(body, fast_path, write_timeout=0.5)
