"""A minimal WebSocket client (wsproto) and HTTP GET (h11) over anyio streams: asyncio and trio.

Only what the control client needs: ``GET /key``, and a WebSocket that sends and receives whole
binary messages, answers pings and closes. Text messages are a protocol error; messages larger than
``max_message_size`` too. (httpx would do for the GET, but builds an SSL context per client, about
0.1 s of CPU, even for plain http.)
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections import deque
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from embedmesh.control.errors import ControlProtocolError
from embedmesh.errors import ConfigError


class WebSocketClosed(ConnectionError):
    """The server closed the WebSocket (``code`` is the close code)."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        super().__init__(f"WebSocket closed by the server (code {code}{': ' + reason if reason else ''})")


def split_url(url: str) -> tuple[str, str, int, bool]:
    """(scheme, host, port, tls) of an http(s)/ws(s) URL.

    Raises :class:`~embedmesh.errors.ConfigError` (a ``ValueError``) that says what to write
    instead, e.g. ``http://127.0.0.1:8080`` for ``127.0.0.1:8080``.
    """
    if "://" not in url:
        # urlsplit reads "127.0.0.1:8080" as a path and "localhost:8080" as scheme "localhost".
        raise ConfigError(
            f"control URL {url!r} has no scheme: write 'http://{url.lstrip('/')}' "
            "(or https:// for a server behind TLS)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ConfigError(
            f"control URL {url!r}: the scheme must be http or https (ws and wss work too), "
            "e.g. http://127.0.0.1:8080"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"control URL {url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ConfigError(f"control URL {url!r} names no host: write e.g. http://127.0.0.1:8080")
    tls = parts.scheme in ("https", "wss")
    return parts.scheme, parts.hostname, port or (443 if tls else 80), tls


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


async def _connect(host: str, port: int, tls: bool) -> anyio.abc.ByteStream:
    if tls:
        return await anyio.connect_tcp(host, port, ssl_context=_tls_context(), tls_hostname=host)
    return await anyio.connect_tcp(host, port)


def _host_header(host: str, port: int, tls: bool) -> str:
    header = f"[{host}]" if ":" in host else host
    return header if port == (443 if tls else 80) else f"{header}:{port}"


class HTTPStatusError(ConnectionError):
    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HTTP {status}")


async def http_get_json(url: str, path: str, max_size: int = 65536) -> Any:
    """GET ``path`` and decode the JSON body; raises OSError subclasses and ValueError."""
    _, host, port, tls = split_url(url)
    stream = await _connect(host, port, tls)
    async with stream:
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[
                ("host", _host_header(host, port, tls)),
                ("accept", "application/json"),
                ("connection", "close"),
            ],
        )
        await stream.send(connection.send(request) + connection.send(h11.EndOfMessage()))
        body = bytearray()
        status = 0
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnectionError(f"bad HTTP answer from {url}: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                connection.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_size:
                    raise ConnectionError(f"answer from {url}{path} is too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise HTTPStatusError(status)
        return json.loads(bytes(body))


class WebSocket:
    """One client WebSocket connection."""

    def __init__(self, stream: anyio.abc.ByteStream, connection: WSConnection, max_message_size: int) -> None:
        self._stream = stream
        self._ws = connection
        self._max = max_message_size
        self._send_lock = anyio.Lock()
        self._events: deque[Event] = deque()
        self._partial = bytearray()
        self.closed = False

    @classmethod
    async def connect(cls, url: str, path: str, *, max_message_size: int) -> WebSocket:
        _, host, port, tls = split_url(url)
        stream = await _connect(host, port, tls)
        ws = WSConnection(ConnectionType.CLIENT)
        self = cls(stream, ws, max_message_size)
        try:
            await stream.send(ws.send(Request(host=_host_header(host, port, tls), target=path)))
            while True:
                event = await self._next_event()
                if isinstance(event, AcceptConnection):
                    return self
                if isinstance(event, RejectConnection):
                    raise ConnectionRefusedError(
                        f"{url}{path} refused the WebSocket upgrade (HTTP {event.status_code}): "
                        "is this an embedmesh control server?"
                    )
                raise ControlProtocolError(
                    f"unexpected {type(event).__name__} during the WebSocket handshake"
                )
        except BaseException:
            await self.aclose()
            raise

    async def _next_event(self) -> Event:
        while not self._events:
            try:
                data = await self._stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.closed = True
                raise WebSocketClosed(1006, "connection lost") from None
            try:
                self._ws.receive_data(data)
                self._events.extend(self._ws.events())
            except RemoteProtocolError as exc:
                raise ControlProtocolError(f"WebSocket protocol error: {exc}") from exc
        return self._events.popleft()

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self.closed = True
                raise WebSocketClosed(1006, "connection lost") from exc

    async def send(self, data: bytes) -> None:
        """Send one binary message."""
        try:
            payload = self._ws.send(BytesMessage(data=data))
        except LocalProtocolError as exc:
            raise WebSocketClosed(1006, str(exc)) from exc
        await self._send_raw(payload)

    async def receive(self) -> bytes:
        """The next whole binary message; raises :class:`WebSocketClosed` when the server closes."""
        while True:
            event = await self._next_event()
            if isinstance(event, BytesMessage):
                self._partial += event.data
                if len(self._partial) > self._max:
                    raise ControlProtocolError(f"WebSocket message larger than {self._max} bytes")
                if event.message_finished:
                    message = bytes(self._partial)
                    self._partial.clear()
                    return message
            elif isinstance(event, Ping):
                await self._send_raw(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                with contextlib.suppress(Exception):
                    await self._send_raw(self._ws.send(event.response()))
                self.closed = True
                raise WebSocketClosed(event.code, event.reason or "")
            elif isinstance(event, TextMessage):
                raise ControlProtocolError("the control stream carries only binary messages")

    async def aclose(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception), anyio.move_on_after(1, shield=True):
                await self._send_raw(self._ws.send(CloseConnection(code=code)))
        with contextlib.suppress(Exception):
            await self._stream.aclose()
