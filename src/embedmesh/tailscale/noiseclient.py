"""The control client's transport: HTTP/2 inside ts2021 Noise, over one TCP (or TLS) connection.

This is the anyio runtime around three sans-IO cores: :mod:`.controlhttp` (the ``/key`` fetch and
the HTTP/1.1 upgrade), :mod:`.controlbase` (Noise IK records) and the ``h2`` library (HTTP/2,
with prior knowledge, as Tailscale's clients speak it inside Noise)::

    async with connect_control("http://127.0.0.1:8080", machine_key, capability_version=130) as conn:
        reply = await conn.request("POST", "/machine/register", body)
        async with conn.stream("POST", "/machine/map", body) as response:
            async for chunk in response:
                ...

One task reads the socket and feeds the cores; writers share a lock so that Noise records leave
in the order their nonces were drawn. Flow control: a stream's received data is acknowledged to
the server only when the caller has taken it, so a slow reader slows the server down instead of
filling memory.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.streams.tls
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

from embedmesh.control.errors import ControlUnreachableError
from embedmesh.tailscale import controlbase, controlhttp
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import MachinePrivate, MachinePublic

#: Each stream may have this much unread data in flight (HTTP/2's default is 64 KiB, which would
#: make a big first map crawl at one round trip per 64 KiB).
STREAM_WINDOW = 4 << 20
#: A whole (non-streamed) response body is refused above this (Go's client reads at most 1 MiB of
#: a register answer; maps are streamed).
MAX_RESPONSE_BODY = 16 << 20


class ControlKeyStatusError(ControlUnreachableError):
    """``/key`` answered, but not 200: :attr:`status` says whether waiting can help (5xx: a
    proxy in front of a server that is still starting)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ControlTransportError(TailscaleProtocolError):
    """The Noise/HTTP/2 connection to the control server broke or was used wrongly."""


@dataclass(frozen=True, slots=True)
class Response:
    """A whole HTTP/2 response."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(eq=False)
class _Stream:
    id: int
    headers: anyio.Event = field(default_factory=anyio.Event)
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[bytes, int]] = field(default_factory=list)
    readable: anyio.Event = field(default_factory=anyio.Event)
    ended: bool = False
    error: Exception | None = None


class StreamingResponse:
    """A response whose body arrives in chunks: iterate over it (``async for chunk in response``)."""

    def __init__(self, conn: ControlConnection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    @property
    def status(self) -> int:
        return self._stream.status

    @property
    def headers(self) -> dict[str, str]:
        return self._stream.response_headers

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        stream = self._stream
        while True:
            if stream.chunks:
                data, flow = stream.chunks.pop(0)
                await self._conn._acknowledge(stream.id, flow)
                yield data
                continue
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                return
            stream.readable = anyio.Event()
            await stream.readable.wait()

    async def read(self, limit: int = MAX_RESPONSE_BODY) -> bytes:
        """The whole body (at most ``limit`` bytes)."""
        body = bytearray()
        async for chunk in self:
            body += chunk
            if len(body) > limit:
                raise ControlTransportError(f"the control server's answer is over {limit} bytes")
        return bytes(body)


class ControlConnection:
    """One ts2021 connection; made by :func:`connect_control`."""

    def __init__(
        self,
        socket: anyio.abc.ByteStream,
        noise: controlbase.ClientConnection,
        early: controlbase.EarlyPayloadReader,
        host: str,
    ) -> None:
        self._socket = socket
        self._noise = noise
        self._early = early
        self._host = host
        # Response headers stay bytes (read as latin-1): with an encoding, h2 raises
        # UnicodeDecodeError out of receive_data on a server's header that is not UTF-8.
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._streams: dict[int, _Stream] = {}
        self._write_lock = anyio.Lock()
        self._window_changed = anyio.Event()
        self._closed: Exception | None = None

    @property
    def early_payload(self) -> controlbase.EarlyNoise | None:
        """What the server sent before HTTP/2 (its node-key challenge), if anything."""
        return self._early.early_payload

    @property
    def server_version(self) -> int:
        """The capability version this connection's handshake carried."""
        return self._noise.version

    # ------------------------------------------------------------------ requests

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request and read its whole answer."""
        async with self.stream(method, path, body, headers) as response:
            data = await response.read()
            return Response(response.status, response.headers, data)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> AsyncIterator[StreamingResponse]:
        """Send a request; yields once the response headers are in, with its body to iterate."""
        self._check_open()
        stream_id = self._h2.get_next_available_stream_id()
        stream = _Stream(stream_id)
        self._streams[stream_id] = stream
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self._host),
            (":path", path),
        ]
        if body:
            request_headers.append(("content-length", str(len(body))))
        request_headers += [(k.lower(), v) for k, v in (headers or {}).items()]
        try:
            self._h2.send_headers(stream_id, request_headers, end_stream=not body)
            await self._flush()
            if body:
                await self._send_body(stream, body)
            await stream.headers.wait()
            if stream.error is not None:
                raise stream.error
            yield StreamingResponse(self, stream)
        finally:
            self._streams.pop(stream_id, None)
            if not stream.ended and self._closed is None:
                # The caller stopped early (a map poll that is being replaced): cancel the stream.
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._flush()

    async def _send_body(self, stream: _Stream, body: bytes) -> None:
        view = memoryview(body)
        while view and stream.error is None and not stream.ended:
            try:
                window = min(self._h2.local_flow_control_window(stream.id), self._h2.max_outbound_frame_size)
                if window > 0:
                    chunk, view = view[:window], view[window:]
                    self._h2.send_data(stream.id, bytes(chunk), end_stream=not view)
            except h2.exceptions.StreamClosedError:
                # The server reset or answered the stream before taking the whole body (a body
                # over its limit): stop sending; the caller reads the reset or the answer.
                return
            if window <= 0:
                # Several streams may wait at once: each waits on the event of this moment, which
                # the reader sets and replaces (a waiter replacing it would strand the others).
                await self._window_changed.wait()
                self._check_open()
                continue
            await self._flush()

    async def _acknowledge(self, stream_id: int, flow: int) -> None:
        if flow and self._closed is None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.acknowledge_received_data(flow, stream_id)
            await self._flush()

    async def _flush(self) -> None:
        async with self._write_lock:
            data = self._h2.data_to_send()
            if not data:
                return
            try:
                await self._socket.send(self._noise.send(data))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._fail(ControlTransportError(f"the connection to the control server broke: {exc}"))
                raise self._closed from exc  # type: ignore[misc]

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    # ------------------------------------------------------------------ the reader

    async def _start(self, plaintext: bytes) -> None:
        self._h2.initiate_connection()
        self._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self._h2.increment_flow_control_window(STREAM_WINDOW * 4)
        await self._flush()
        if plaintext:
            await self._feed_plaintext(plaintext)

    async def run(self) -> None:
        """Read the socket until it closes; every stream then fails with the reason."""
        try:
            while True:
                try:
                    data = await self._socket.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                    raise ControlTransportError("the control server closed the connection") from exc
                await self._feed(data)
        except ControlTransportError as exc:
            self._fail(exc)
        except TailscaleProtocolError as exc:
            self._fail(ControlTransportError(f"the control server sent a bad Noise frame: {exc}"))

    async def _feed(self, data: bytes) -> None:
        plaintext = self._noise.receive_data(data)
        if plaintext:
            await self._feed_plaintext(plaintext)

    async def _feed_plaintext(self, plaintext: bytes) -> None:
        plaintext = self._early.receive(plaintext)
        if not plaintext:
            return
        try:
            events = self._h2.receive_data(plaintext)
        except h2.exceptions.ProtocolError as exc:
            raise ControlTransportError(f"the control server broke HTTP/2: {exc}") from None
        for event in events:
            self._dispatch(event)
        await self._flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                headers = {_str(k): _str(v) for k, v in event.headers or ()}
                status = headers.pop(":status", "")
                # h2 checks that :status is there, not that it is a number.
                if status.isascii() and status.isdigit() and len(status) == 3:
                    stream.status = int(status)
                else:
                    stream.error = ControlTransportError(f"the control server answered with status {status[:20]!r}")
                stream.response_headers = headers
                stream.headers.set()
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if stream is None:
                # A stream we gave up on: give its window back at once.
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.acknowledge_received_data(flow, event.stream_id)
                return
            stream.chunks.append((event.data or b"", flow))
            stream.readable.set()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                stream.headers.set()
                stream.readable.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.error = ControlTransportError(f"the control server reset the request ({event.error_code!r})")
                stream.headers.set()
                stream.readable.set()
                self._wake_senders()  # an upload waiting for this stream's window stops
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_senders()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._fail(ControlTransportError(f"the control server ended the connection ({event.error_code!r})"))

    def _fail(self, error: Exception) -> None:
        if self._closed is None:
            self._closed = error
        for stream in self._streams.values():
            if stream.error is None and not stream.ended:
                stream.error = self._closed
            stream.headers.set()
            stream.readable.set()
        self._wake_senders()

    def _wake_senders(self) -> None:
        changed, self._window_changed = self._window_changed, anyio.Event()
        changed.set()

    async def aclose(self) -> None:
        self._fail(ControlTransportError("the connection to the control server was closed"))
        await self._socket.aclose()


def _str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _split_url(url: str) -> tuple[str, str, int, bool]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// control URL")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rpartition("@")[2]
    return parts.hostname, host_header, port, tls


async def fetch_server_key(
    url: str, capability_version: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0
) -> MachinePublic:
    """The control server's Noise key (``GET /key?v=``)."""
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=verify, trust_env=False) as http:
            reply = await http.get(url.rstrip("/") + controlhttp.key_path(capability_version))
    except httpx.HTTPError as exc:
        raise ControlUnreachableError(
            f"cannot reach the control server at {url} ({type(exc).__name__}: {exc}); is it running, "
            "and is the URL right?"
        ) from exc
    if reply.status_code != 200:
        raise ControlKeyStatusError(
            f"the control server at {url} answered /key with HTTP {reply.status_code}: is it a "
            "Tailscale-protocol control server (headscale, embedmesh, Tailscale)?",
            reply.status_code,
        )
    return controlhttp.parse_key_response(reply.content)


@contextlib.asynccontextmanager
async def connect_control(
    url: str,
    machine_key: MachinePrivate,
    capability_version: int,
    *,
    server_key: MachinePublic | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 15.0,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> AsyncIterator[ControlConnection]:
    """Open a ts2021 connection to ``url`` and keep it for the ``async with`` block.

    ``server_key`` skips the ``/key`` request when the caller has it cached. Connection problems
    raise :class:`ControlUnreachableError`; a server that answers but refuses or breaks the
    protocol raises a :class:`TailscaleProtocolError`.
    """
    hostname, host_header, port, tls = _split_url(url)
    if server_key is None:
        server_key = await fetch_server_key(url, capability_version, ssl_context=ssl_context, timeout=timeout)
    noise = controlbase.ClientConnection(machine_key, server_key, capability_version, random_bytes(32))
    upgrade = controlhttp.UpgradeClient(host_header, noise.initiation)
    try:
        with anyio.fail_after(timeout):
            socket: anyio.abc.ByteStream = await anyio.connect_tcp(hostname, port)
            if tls:
                context = ssl_context or ssl.create_default_context()
                context.set_alpn_protocols(["http/1.1"])
                socket = await anyio.streams.tls.TLSStream.wrap(
                    socket, hostname=hostname, ssl_context=context, standard_compatible=False
                )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise ControlUnreachableError(
            f"cannot reach the control server at {url} ({type(exc).__name__}: {exc}); is it running, "
            "and is the URL right?"
        ) from exc
    async with socket:
        try:
            with anyio.fail_after(timeout):
                await socket.send(upgrade.request)
                leftover: bytes | None = None
                while leftover is None:
                    try:
                        data = await socket.receive()
                    except anyio.EndOfStream:
                        data = b""
                    leftover = upgrade.receive_data(data)
            # Records may only be sent once the server's handshake response is in (Noise IK's
            # second message completes the key schedule); Go's client waits for it too.
            plaintext = bytearray(noise.receive_data(leftover))
            while not noise.established:
                try:
                    data = await socket.receive()
                except anyio.EndOfStream:
                    raise ControlTransportError(
                        "the control server closed the connection during the Noise handshake"
                    ) from None
                plaintext += noise.receive_data(data)
        except (OSError, anyio.BrokenResourceError) as exc:
            raise ControlUnreachableError(f"the control server at {url} dropped the connection: {exc}") from exc
        conn = ControlConnection(socket, noise, controlbase.EarlyPayloadReader(), host_header)
        # The caller's exception leaves unwrapped (a task group would put it in a group).
        raised: BaseException | None = None
        # Outside the task group too: HTTP/2 the server sent with its handshake may already be
        # broken, and that error must leave as itself, not inside an exception group.
        await conn._start(bytes(plaintext))
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            try:
                yield conn
            except BaseException as exc:
                raised = exc
            finally:
                tg.cancel_scope.cancel()
                conn._fail(ControlTransportError("the connection to the control server was closed"))
        if raised is not None:
            raise raised


__all__ = [
    "MAX_RESPONSE_BODY",
    "ControlConnection",
    "ControlKeyStatusError",
    "ControlTransportError",
    "Response",
    "StreamingResponse",
    "connect_control",
    "fetch_server_key",
]
