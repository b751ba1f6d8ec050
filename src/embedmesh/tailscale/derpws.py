"""DERP over WebSocket (RFC 6455), as Tailscale's ``derpserver.AddWebSocketSupport`` and derphttp's
WebSocket dialer speak it: ``GET /derp`` with ``Upgrade: websocket`` and the subprotocol ``derp``;
then the DERP byte stream travels in binary messages (message boundaries mean nothing: a frame may
span messages and one message may carry several frames; we send at most 32 KiB in one, the most
Go's side reads). No compression: WireGuard does not
compress, and Go's server disables it.

The WebSocket framing is `wsproto <https://python-hyper.org/projects/wsproto/>`_'s, sans-IO;
:class:`WebSocketFraming` wraps it for a DERP connection (DERP bytes in and out, Pings answered, a
close handshake, a text message is a protocol error) and :class:`WebSocketStream` is the thin anyio
byte stream over it that the DERP server and client read and write as they would a TCP stream.
:func:`accept_websocket` checks a server's upgrade request as Go's ``websocket.Accept`` does;
:func:`client_handshake_headers` / :func:`check_handshake_response` are the client's half.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import wsproto.connection
import wsproto.events
import wsproto.frame_protocol
import wsproto.utilities

from embedmesh.tailscale.errors import TailscaleProtocolError

#: The WebSocket subprotocol a DERP client offers (and the only one served).
SUBPROTOCOL = "derp"
WEBSOCKET_VERSION = b"13"
#: The largest message sent. Go's WebSocket library (coder/websocket, as Tailscale's wsconn uses it)
#: refuses a message over 32 KiB and closes the socket, so a full-size DERP frame goes in three.
MAX_MESSAGE = 32 << 10
#: Seconds :meth:`WebSocketStream.aclose` spends sending the close frame before it drops the socket.
CLOSE_TIMEOUT = 1.0

CloseReason = wsproto.frame_protocol.CloseReason


class WebSocketHandshakeError(TailscaleProtocolError):
    """A WebSocket upgrade request (server) or its answer (client) is not acceptable.

    ``status`` and ``headers`` are the HTTP answer a server sends (as Go's ``websocket.Accept``).
    """

    def __init__(self, message: str, status: int = 400, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated tokens of every ``name`` header (lower-case names, as h11 gives them)."""
    tokens: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            tokens += [token.strip() for token in value.split(b",") if token.strip()]
    return tokens


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


@dataclass(frozen=True, slots=True)
class WebSocketAccept:
    """An acceptable upgrade: ``response`` is the 101 to send; ``derp`` says whether the client
    offered the ``derp`` subprotocol (when not, Go answers 101 and then closes with 1008)."""

    response: bytes
    derp: bool


def accept_websocket(method: bytes, headers: Iterable[tuple[bytes, bytes]], http_version: bytes = b"1.1") -> WebSocketAccept:
    """Check a WebSocket upgrade request as Go's ``websocket.Accept`` does; raises
    :class:`WebSocketHandshakeError` carrying the HTTP status to answer with."""
    headers = list(headers)
    if http_version not in (b"1.1",):
        raise WebSocketHandshakeError("WebSocket protocol violation: handshake request must be at least HTTP/1.1")
    upgrade_headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    if b"upgrade" not in (t.lower() for t in _tokens(headers, b"connection")):
        raise WebSocketHandshakeError("WebSocket protocol violation: Connection header does not contain Upgrade", 426, upgrade_headers)
    if b"websocket" not in (t.lower() for t in _tokens(headers, b"upgrade")):
        raise WebSocketHandshakeError("WebSocket protocol violation: Upgrade header does not contain websocket", 426, upgrade_headers)
    if method != b"GET":
        raise WebSocketHandshakeError("WebSocket protocol violation: handshake request method is not GET", 405)
    if _values(headers, b"sec-websocket-version") != [WEBSOCKET_VERSION]:
        raise WebSocketHandshakeError(
            "unsupported WebSocket protocol version (only 13 is supported)", 400, [(b"sec-websocket-version", WEBSOCKET_VERSION)]
        )
    keys = _values(headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0].strip()):
        raise WebSocketHandshakeError("WebSocket protocol violation: invalid Sec-WebSocket-Key")
    derp = SUBPROTOCOL.encode() in _tokens(headers, b"sec-websocket-protocol")
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + wsproto.utilities.generate_accept_token(keys[0].strip()),
    ]
    if derp:
        lines.append(b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode())
    return WebSocketAccept(b"\r\n".join(lines) + b"\r\n\r\n", derp)


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def client_handshake_headers(nonce: bytes) -> list[tuple[str, str]]:
    """The WebSocket headers of a client's ``GET /derp`` (``nonce``: 16 random bytes, the key)."""
    if len(nonce) != 16:
        raise ValueError("a Sec-WebSocket-Key is 16 random bytes")
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", WEBSOCKET_VERSION.decode()),
        ("Sec-WebSocket-Key", base64.b64encode(nonce).decode()),
        ("Sec-WebSocket-Protocol", SUBPROTOCOL),
    ]


def check_handshake_response(nonce: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Check a server's 101 to :func:`client_handshake_headers`; raises :class:`WebSocketHandshakeError`."""
    headers = list(headers)
    if b"websocket" not in (t.lower() for t in _tokens(headers, b"upgrade")):
        raise WebSocketHandshakeError("the server's 101 does not upgrade to websocket")
    if b"upgrade" not in (t.lower() for t in _tokens(headers, b"connection")):
        raise WebSocketHandshakeError("the server's 101 has no Connection: Upgrade")
    expected = wsproto.utilities.generate_accept_token(base64.b64encode(nonce))
    if [v.strip() for v in _values(headers, b"sec-websocket-accept")] != [expected]:
        raise WebSocketHandshakeError("the server's Sec-WebSocket-Accept does not match our key")
    if _tokens(headers, b"sec-websocket-protocol") != [SUBPROTOCOL.encode()]:
        raise WebSocketHandshakeError("the server did not agree to the derp WebSocket subprotocol")
    if _values(headers, b"sec-websocket-extensions"):
        raise WebSocketHandshakeError("the server chose WebSocket extensions we did not offer")


class WebSocketFraming:
    """The WebSocket framing of one DERP connection, sans-IO: wire bytes in, DERP bytes out.

    :meth:`receive_data` returns the payload of the binary messages in the bytes given (``None``
    means the transport ended) and queues what the protocol answers (Pongs, the close reply);
    :meth:`send` queues DERP bytes as one binary message; :meth:`close` starts the close handshake.
    :attr:`closed` holds the close code once the connection is over for reading (the peer closed,
    it broke the protocol, or sent text), after which no more DERP bytes come.
    """

    def __init__(self, *, client: bool) -> None:
        kind = wsproto.connection.ConnectionType.CLIENT if client else wsproto.connection.ConnectionType.SERVER
        self._ws = wsproto.connection.Connection(kind)
        self._out = bytearray()
        #: The close code (ours or the peer's) once reading is over, else None.
        self.closed: int | None = None

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> bytes:
        """Feed wire bytes (None: the transport ended); returns the DERP bytes they carried."""
        if self.closed is not None:
            return b""
        self._ws.receive_data(None if data is None else bytes(data))
        payload = bytearray()
        for event in self._ws.events():
            if self.closed is not None:
                break
            if isinstance(event, wsproto.events.BytesMessage):
                payload += event.data
            elif isinstance(event, wsproto.events.Ping):
                self._out += self._ws.send(event.response())
            elif isinstance(event, wsproto.events.TextMessage):
                # Go's wsconn reads binary messages only; text ends the connection.
                self.close(CloseReason.UNSUPPORTED_DATA, "DERP travels in binary messages")
            elif isinstance(event, wsproto.events.CloseConnection):
                self.closed = event.code
                if self._ws.state in (wsproto.connection.ConnectionState.OPEN, wsproto.connection.ConnectionState.REMOTE_CLOSING):
                    # A protocol error (wsproto reports it as a close) or the peer's close: answer it.
                    self._out += self._ws.send(wsproto.events.CloseConnection(event.code, event.reason))
        return bytes(payload)

    def send(self, payload: bytes) -> None:
        """Queue DERP bytes as binary messages of at most :data:`MAX_MESSAGE` bytes (nothing once
        the connection is closing)."""
        if self._ws.state is not wsproto.connection.ConnectionState.OPEN:
            return
        view = memoryview(payload)
        for start in range(0, len(view), MAX_MESSAGE):
            self._out += self._ws.send(wsproto.events.BytesMessage(bytes(view[start : start + MAX_MESSAGE])))

    @property
    def open(self) -> bool:
        """Whether messages may still be sent."""
        return self._ws.state is wsproto.connection.ConnectionState.OPEN

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start (or answer) the close handshake; reading ends here."""
        if self.closed is None:
            self.closed = code
        if self._ws.state in (wsproto.connection.ConnectionState.OPEN, wsproto.connection.ConnectionState.REMOTE_CLOSING):
            self._out += self._ws.send(wsproto.events.CloseConnection(code, reason or None))

    @property
    def data_to_send_pending(self) -> bool:
        """Whether :meth:`data_to_send` has bytes."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Wire bytes to write (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out


class WebSocketStream(anyio.abc.ByteStream):
    """An anyio byte stream of DERP bytes over a WebSocket on ``transport`` (TCP or TLS).

    ``trailing`` is what the transport already delivered behind the handshake (WebSocket frames
    the peer sent at once). Reads and writes may happen from two tasks at once (a reader and a
    writer), as on a socket; writes are serialized (the reader writes Pongs and the close reply too).
    """

    def __init__(self, transport: anyio.abc.ByteStream, framing: WebSocketFraming, trailing: bytes = b"") -> None:
        self.transport = transport
        self.framing = framing
        # Read now, so that the first receive() returns it without waiting for more from the wire.
        self._buffer = bytearray(framing.receive_data(trailing) if trailing else b"")
        self._send_lock = anyio.Lock()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._buffer:
            await self._flush()  # answers to what came with the handshake
        while not self._buffer:
            if self.framing.closed is not None:
                await self._flush()
                raise anyio.EndOfStream
            try:
                data: bytes | None = await self.transport.receive()
            except anyio.EndOfStream:
                data = None
            self._buffer += self.framing.receive_data(data)
            await self._flush()
        out = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return out

    async def send(self, item: bytes) -> None:
        if not self.framing.open:
            raise anyio.ClosedResourceError
        self.framing.send(item)
        await self._flush()

    async def _flush(self) -> None:
        if not self.framing.data_to_send_pending:
            return  # the common case on a read: nothing to answer, no lock to take
        async with self._send_lock:
            data = self.framing.data_to_send()
            if data:
                await self.transport.send(data)

    async def send_eof(self) -> None:
        raise NotImplementedError("a WebSocket has no half close")

    async def aclose(self) -> None:
        """Send a close frame (for at most :data:`CLOSE_TIMEOUT` s), then close the transport."""
        self.framing.close(CloseReason.NORMAL_CLOSURE)
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._flush()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Any]:
        return self.transport.extra_attributes


__all__ = [
    "MAX_MESSAGE",
    "SUBPROTOCOL",
    "WebSocketAccept",
    "WebSocketFraming",
    "WebSocketHandshakeError",
    "WebSocketStream",
    "accept_websocket",
    "check_handshake_response",
    "client_handshake_headers",
]
