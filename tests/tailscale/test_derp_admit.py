"""DERP admission (``verify clients``): the DERPAdmitClient JSON as Go reads and writes it, the
``--verify-client-url`` admitter against a real HTTP controller on loopback (allow, deny, errors,
unreachable: closed unless fail-open), and the server refusing a logged-in client as derper does
(no ServerInfo, no routing state, the connection closes)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpadmit import (
    AdmitRequest,
    DerpAdmitError,
    encode_admit_response,
    parse_admit_response,
    source_address,
    url_admitter,
)
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate, NodePublic

KEY = NodePrivate.generate(bytes(range(32))).public()


def test_request_json_is_gos() -> None:
    request = AdmitRequest(KEY, ipaddress.ip_address("192.0.2.7"))
    assert json.loads(request.to_json()) == {"NodePublic": KEY.to_text(), "Source": "192.0.2.7"}
    # A zero netip.Addr marshals as "".
    assert json.loads(AdmitRequest(KEY).to_json())["Source"] == ""
    # Go's reading: any case of the names, unknown fields ignored, a zone allowed, trailing data ignored.
    text = f'{{"nodepublic": "{KEY.to_text()}", "SOURCE": "fe80::1%eth0", "Extra": [1]}} trailing'
    assert AdmitRequest.from_json(text.encode()) == AdmitRequest(KEY, ipaddress.ip_address("fe80::1"))
    assert AdmitRequest.from_json(b"{}") == AdmitRequest(NodePublic.zero(), None)
    for bad in (b"", b"[]", b'{"NodePublic": 5}', b'{"NodePublic": "nodekey:00"}', b'{"Source": "300.1.1.1"}', b'{"Source": "1.2.3.4%x"}'):
        with pytest.raises(DerpAdmitError):
            AdmitRequest.from_json(bad)


def test_response_json_is_gos() -> None:
    assert parse_admit_response(encode_admit_response(True)) is True
    assert parse_admit_response(encode_admit_response(False)) is False
    assert parse_admit_response(b'{"allow": true, "Why": "ok"}\n') is True
    assert parse_admit_response(b'{"Allow": null}') is False
    assert parse_admit_response(b"{}") is False
    for bad in (b"", b"true", b'{"Allow": "yes"}', b'{"Allow": 1}', b"{"):
        with pytest.raises(DerpAdmitError):
            parse_admit_response(bad)


def test_source_address_unmaps_ipv4() -> None:
    assert source_address("::ffff:198.51.100.1") == ipaddress.ip_address("198.51.100.1")
    assert source_address("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert source_address("not an ip") is None


@given(st.binary(max_size=32), st.ip_addresses() | st.none())
def test_request_round_trips(raw: bytes, source: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> None:
    key = NodePublic(raw.ljust(32, b"\x00"))
    request = AdmitRequest(key, source)
    assert AdmitRequest.from_json(request.to_json()) == request


@given(st.binary(max_size=200))
def test_garbage_raises_only_parse_errors(data: bytes) -> None:
    for parse in (AdmitRequest.from_json, parse_admit_response):
        try:
            parse(data)
        except ParseError:
            pass


# ------------------------------------------------------------------------ a controller on loopback


Handler = Callable[[bytes], Awaitable[bytes | None]]


@asynccontextmanager
async def controller(answer: Handler) -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    """An HTTP admission controller: ``answer(body)`` gives the raw HTTP response (None: hang up)."""
    seen: list[dict[str, object]] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += await stream.receive()
            assert head.startswith(b"POST /admit HTTP/1.1")
            seen.append(json.loads(body))
            response = await answer(body)
            if response is not None:
                await stream.send(response)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, handle)
        yield f"http://127.0.0.1:{port}/admit", seen
        tg.cancel_scope.cancel()


def _http(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_url_admitter_follows_the_controller_and_fails_closed() -> None:
    async def main() -> None:
        allowed = {KEY.to_text()}

        async def verdict(body: bytes) -> bytes | None:
            return _http("200 OK", encode_admit_response(json.loads(body)["NodePublic"] in allowed))

        async with controller(verdict) as (url, seen):
            admit = url_admitter(url)
            assert await admit(KEY, ("192.0.2.1", 41641)) is True
            assert seen == [{"NodePublic": KEY.to_text(), "Source": "192.0.2.1"}]
            other = NodePrivate.generate(os.urandom(32)).public()
            assert await admit(other, ("::ffff:192.0.2.2", 1)) is False
            assert seen[-1] == {"NodePublic": other.to_text(), "Source": "192.0.2.2"}

        async def server_error(body: bytes) -> bytes | None:
            return _http("500 Internal Server Error", encode_admit_response(True))

        async def garbage(body: bytes) -> bytes | None:
            return _http("200 OK", b"<html>allow</html>")

        async def hang_up(body: bytes) -> bytes | None:
            return None

        # Only a 200 that says Allow lets a client in, whether or not the admitter fails open.
        for answer in (server_error, garbage, hang_up):
            async with controller(answer) as (url, _):
                assert await url_admitter(url)(KEY, ("192.0.2.1", 1)) is False
                if answer is not hang_up:
                    assert await url_admitter(url, fail_open=True)(KEY, ("192.0.2.1", 1)) is False

        async def slow(body: bytes) -> bytes | None:
            await anyio.sleep(5)
            return None

        async with controller(slow) as (url, _):
            assert await url_admitter(url, timeout=0.3)(KEY, ("192.0.2.1", 1)) is False
            assert await url_admitter(url, timeout=0.3, fail_open=True)(KEY, ("192.0.2.1", 1)) is True
        # Nobody listening: unreachable, so closed by default and open when asked.
        dead = f"http://127.0.0.1:{_free_port()}/admit"
        assert await url_admitter(dead)(KEY, ("192.0.2.1", 1)) is False
        assert await url_admitter(dead, fail_open=True)(KEY, ("192.0.2.1", 1)) is True

    anyio.run(main)


# ------------------------------------------------------------------------ the server


UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"


def test_a_refused_client_gets_no_server_info_and_no_routing_state() -> None:
    alice, mallory = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
    asked: list[tuple[NodePublic, tuple[str, int]]] = []

    async def admit(key: NodePublic, source: tuple[str, int]) -> bool:
        asked.append((key, source))
        # The hook runs before registration: the key is not routable while it decides.
        assert not server.core.is_connected(key)
        return key == alice.public()

    server = DerpServer(NodePrivate.generate(os.urandom(32)), admit=admit)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}/derp"
            async with connect_derp(url, alice) as client:
                await client.send(client.public_key, b"admitted")
                with anyio.fail_after(5):
                    assert await anext(client.packets()) == (alice.public(), b"admitted")
                # Mallory's box opens (her key is real) but the hook says no: the connection ends
                # right after the ServerKey, with nothing else sent.
                conn = derp.ClientConnection(mallory, os.urandom(24), server_key=server.public_key)
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(UPGRADE + conn.data_to_send())
                    received = b""
                    with anyio.fail_after(5):
                        try:
                            while True:
                                received += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            pass
                assert received == derp.encode_frame(derp.ServerKey(server.public_key))
                assert not server.core.is_connected(mallory.public())
                # Our client sees the refusal as a failed login.
                with pytest.raises(DerpConnectError, match="login"):
                    async with connect_derp(url, mallory, timeout=5):
                        pass
                assert server.stats.refused == 2 and server.stats.accepted == 1
                assert len(server.core) == 1
            tg.cancel_scope.cancel()
        assert [key for key, _ in asked] == [alice.public(), mallory.public(), mallory.public()]
        assert all(source[0] == "127.0.0.1" and source[1] > 0 for _, source in asked)

    anyio.run(main)


def test_a_failing_or_hanging_hook_refuses() -> None:
    async def broken(key: NodePublic, source: tuple[str, int]) -> bool:
        raise RuntimeError("the database is down")

    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)), admit=broken)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            with pytest.raises(DerpConnectError):
                async with connect_derp(f"http://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32)), timeout=5):
                    pass
            assert server.stats.refused == 1 and len(server.core) == 0
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_the_server_asks_a_url_controller() -> None:
    alice, bob = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))

    async def main() -> None:
        async def verdict(body: bytes) -> bytes | None:
            return _http("200 OK", encode_admit_response(json.loads(body)["NodePublic"] == alice.public().to_text()))

        async with controller(verdict) as (admit_url, seen):
            server = DerpServer(NodePrivate.generate(os.urandom(32)), admit=url_admitter(admit_url))
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve, "127.0.0.1", 0)
                url = f"http://127.0.0.1:{port}/derp"
                async with connect_derp(url, alice):
                    pass
                with pytest.raises(DerpConnectError):
                    async with connect_derp(url, bob, timeout=5):
                        pass
                tg.cancel_scope.cancel()
            assert seen == [
                {"NodePublic": alice.public().to_text(), "Source": "127.0.0.1"},
                {"NodePublic": bob.public().to_text(), "Source": "127.0.0.1"},
            ]
            assert (server.stats.accepted, server.stats.refused) == (1, 1)

    anyio.run(main)
