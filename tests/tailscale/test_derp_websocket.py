"""DERP over WebSocket: the framing (any split of the wire, Pings answered, text and protocol
errors close), the handshake checks Go's websocket.Accept makes, and the server relaying between a
WebSocket client and a TCP client; wsproto's own high-level client (an independent handshake)
logs in too, and a client without the derp subprotocol is closed with 1008 as Go does."""

from __future__ import annotations

import base64
import os

import anyio
import anyio.abc
import pytest
import wsproto
import wsproto.events
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.tailscale import derp, derpws
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate

KEY = base64.b64encode(b"0123456789abcdef")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=12), st.lists(st.integers(0, 1 << 20), max_size=20), st.booleans())
def test_any_split_of_the_wire_carries_the_same_stream(messages: list[bytes], cuts: list[int], ping: bool) -> None:
    client, server = derpws.WebSocketFraming(client=True), derpws.WebSocketFraming(client=False)
    wire = b""
    for message in messages:
        client.send(message)
        wire += client.data_to_send()
    if ping:
        wire += wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT).send(wsproto.events.Ping(b"hi"))
    got = b"".join(server.receive_data(piece) for piece in _split(wire, cuts))
    assert got == b"".join(messages)
    answer = server.data_to_send()
    assert (answer != b"") == ping  # the Pong
    server.send(b"back")
    assert client.receive_data(server.data_to_send()) == b"back"


def test_no_message_is_over_go_s_read_limit() -> None:
    client, reader = derpws.WebSocketFraming(client=True), wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    client.send(bytes(70_000))
    reader.receive_data(client.data_to_send())
    sizes = [len(e.data) for e in reader.events() if isinstance(e, wsproto.events.BytesMessage)]
    assert sizes == [32768, 32768, 70_000 - 65536] and max(sizes) <= derpws.MAX_MESSAGE


def test_text_protocol_errors_and_close() -> None:
    server = derpws.WebSocketFraming(client=False)
    text = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT).send(wsproto.events.TextMessage("hi"))
    assert server.receive_data(text) == b"" and server.closed == derpws.CloseReason.UNSUPPORTED_DATA
    assert not server.open and server.receive_data(b"more") == b""
    # A client frame without a mask breaks RFC 6455: close 1002, answered.
    server = derpws.WebSocketFraming(client=False)
    unmasked = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER).send(wsproto.events.BytesMessage(b"x"))
    assert server.receive_data(unmasked) == b"" and server.closed == derpws.CloseReason.PROTOCOL_ERROR
    assert server.data_to_send()[:1] == b"\x88"  # a close frame
    # The peer's close is answered and ends reading; so does the transport ending.
    client, server = derpws.WebSocketFraming(client=True), derpws.WebSocketFraming(client=False)
    client.close()
    assert server.receive_data(client.data_to_send()) == b"" and server.closed == 1000
    assert client.receive_data(server.data_to_send()) == b""
    ended = derpws.WebSocketFraming(client=False)
    assert ended.receive_data(None) == b"" and ended.closed == derpws.CloseReason.ABNORMAL_CLOSURE


def _headers(**extra: bytes) -> list[tuple[bytes, bytes]]:
    base = {
        b"host": b"x",
        b"upgrade": b"websocket",
        b"connection": b"keep-alive, Upgrade",
        b"sec-websocket-version": b"13",
        b"sec-websocket-key": KEY,
        b"sec-websocket-protocol": b"derp",
    }
    base.update({k.replace("_", "-").encode(): v for k, v in extra.items()})
    return [(k, v) for k, v in base.items() if v]


def test_handshake_checks_are_gos() -> None:
    accept = derpws.accept_websocket(b"GET", _headers())
    assert accept.derp
    assert b"Sec-WebSocket-Protocol: derp\r\n" in accept.response
    # RFC 6455's example key and answer.
    sample = derpws.accept_websocket(b"GET", _headers(sec_websocket_key=b"dGhlIHNhbXBsZSBub25jZQ=="))
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in sample.response
    assert not derpws.accept_websocket(b"GET", _headers(sec_websocket_protocol=b"xderp")).derp
    cases = [
        (b"GET", _headers(connection=b"keep-alive"), 426),
        (b"POST", _headers(), 405),
        (b"GET", _headers(sec_websocket_version=b"8"), 400),
        (b"GET", _headers(sec_websocket_key=b""), 400),
        (b"GET", _headers(sec_websocket_key=b"c2hvcnQ="), 400),
    ]
    for method, headers, status in cases:
        with pytest.raises(derpws.WebSocketHandshakeError) as caught:
            derpws.accept_websocket(method, headers)
        assert caught.value.status == status
    with pytest.raises(derpws.WebSocketHandshakeError) as caught:
        derpws.accept_websocket(b"GET", _headers(sec_websocket_version=b"8"))
    assert (b"sec-websocket-version", b"13") in caught.value.headers
    # The client's half: the answer must match our key and agree to derp.
    nonce = b"0123456789abcdef"
    good = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-protocol", b"derp")]
    token = wsproto.utilities.generate_accept_token(base64.b64encode(nonce))
    derpws.check_handshake_response(nonce, [*good, (b"sec-websocket-accept", token)])
    for bad in (good, [*good[:2], (b"sec-websocket-accept", token)], [*good, (b"sec-websocket-accept", b"x")]):
        with pytest.raises(derpws.WebSocketHandshakeError):
            derpws.check_handshake_response(nonce, bad)


def _run(body: object) -> None:
    async def main() -> None:
        server = DerpServer(NodePrivate.generate(os.urandom(32)))
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "127.0.0.1", 0)
            with anyio.fail_after(15):
                await body(server)  # type: ignore[operator]
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_websocket_client_and_a_tcp_client_relay_through_the_server() -> None:
    async def body(server: DerpServer) -> None:
        url = f"http://127.0.0.1:{server.port}/derp"
        async with (
            connect_derp(url, NodePrivate.generate(os.urandom(32)), websocket=True) as ws,
            connect_derp(url, NodePrivate.generate(os.urandom(32))) as tcp,
        ):
            assert ws.server_key == server.public_key and server.stats.websocket == 1
            big = os.urandom(derp.MAX_PACKET_SIZE)
            await ws.send(tcp.public_key, big)
            assert await anext(tcp.packets()) == (ws.public_key, big)
            await tcp.send(ws.public_key, b"over the websocket")
            assert await anext(ws.packets()) == (tcp.public_key, b"over the websocket")
            assert await ws.ping() < 5
        # ws:// means the same.
        async with connect_derp(f"ws://127.0.0.1:{server.port}/derp", NodePrivate.generate(os.urandom(32))) as again:
            await again.send(again.public_key, b"self")
            assert await anext(again.packets()) == (again.public_key, b"self")
        assert server.stats.websocket == 2
        while len(server.core):
            await anyio.sleep(0.01)

    _run(body)


async def _ws_exchange(port: int, subprotocols: list[str]) -> tuple[wsproto.WSConnection, list[wsproto.events.Event], anyio.abc.SocketStream]:
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(ws.send(wsproto.events.Request(host="x", target="/derp", subprotocols=subprotocols)))
    events: list[wsproto.events.Event] = []
    while not any(isinstance(e, wsproto.events.AcceptConnection | wsproto.events.RejectConnection) for e in events):
        ws.receive_data(await stream.receive())
        events += ws.events()
    return ws, events, stream


def test_wsproto_s_own_client_logs_in_and_a_client_without_the_subprotocol_is_closed() -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        ws, events, stream = await _ws_exchange(server.port, ["derp"])
        async with stream:
            assert isinstance(events[0], wsproto.events.AcceptConnection) and events[0].subprotocol == "derp"
            login = derp.ClientConnection(NodePrivate.generate(os.urandom(32)), os.urandom(24))
            got: list[derp.ClientEvent] = []
            # The server's first message (its key) may have come in the same read as the 101.
            pending: list[wsproto.events.Event] = events[1:]
            while not login.logged_in:
                for event in [*pending, *ws.events()]:
                    if isinstance(event, wsproto.events.BytesMessage):
                        got += login.receive_data(event.data)
                pending = []
                out = login.data_to_send()
                if out:
                    await stream.send(ws.send(wsproto.events.BytesMessage(out)))
                if not login.logged_in:
                    ws.receive_data(await stream.receive())
            assert derp.Connected(server.public_key) in got
        # "derp" somewhere in the header but not as the subprotocol: 101, then close 1008.
        ws, events, stream = await _ws_exchange(server.port, ["xderp"])
        async with stream:
            assert isinstance(events[0], wsproto.events.AcceptConnection) and events[0].subprotocol is None
            closes: list[wsproto.events.Event] = [e for e in events if isinstance(e, wsproto.events.CloseConnection)]
            while not closes:
                ws.receive_data(await stream.receive())
                closes += [e for e in ws.events() if isinstance(e, wsproto.events.CloseConnection)]
            assert closes[0].code == derpws.CloseReason.POLICY_VIOLATION  # type: ignore[attr-defined]
        assert server.stats.websocket == 1

    _run(body)


async def _http(port: int, request: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
        return data


def test_the_server_s_websocket_answers() -> None:
    async def body(server: DerpServer) -> None:
        assert server.port is not None
        head = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        key = b"Sec-WebSocket-Key: " + KEY + b"\r\n"
        old_version = await _http(server.port, head + key + b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
        assert old_version.startswith(b"HTTP/1.1 400 ") and b"sec-websocket-version: 13" in old_version.lower()
        # Upgrade: websocket without the derp subprotocol is plain DERP (very old clients sent it).
        legacy = await _http(server.port, head + b"\r\n")
        assert legacy.startswith(b"HTTP/1.1 101 ") and b"Upgrade: DERP" in legacy

    _run(body)


def test_a_websocket_server_that_does_not_agree_to_derp_is_one_line() -> None:
    async def plain_websocket(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + wsproto.utilities.generate_accept_token(key) + b"\r\n\r\n"
            )

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, plain_websocket)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            with pytest.raises(DerpConnectError, match="derp WebSocket subprotocol"):
                async with connect_derp(f"ws://127.0.0.1:{port}/derp", NodePrivate.generate(os.urandom(32)), timeout=5):
                    pass
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_frames_that_came_with_the_handshake_are_read_at_once() -> None:
    # A server's first WebSocket frame often shares a TCP segment with its 101: the stream must
    # return its bytes without waiting for more from a peer that now waits for us.
    server_side = derpws.WebSocketFraming(client=False)
    server_side.send(b"greeting")
    early = server_side.data_to_send()

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda stream: anyio.sleep_forever())
            transport = await anyio.connect_tcp("127.0.0.1", listener.extra(anyio.abc.SocketAttribute.local_port))
            async with derpws.WebSocketStream(transport, derpws.WebSocketFraming(client=True), early) as ws:
                with anyio.fail_after(2):
                    assert await ws.receive() == b"greeting"
            tg.cancel_scope.cancel()

    anyio.run(main)
