"""The control server's transport: an upgraded ``/ts2021`` connection, HTTP/2 in Noise, to ASGI.

The HTTP/1.1 server (uvicorn's h11 protocol, see :mod:`embedmesh.control.server`) hands over the
socket after ``POST /ts2021``; :class:`Ts2021Protocol` then answers with ``101``, the Noise
response and an early payload (a node-key challenge, as headscale and Tailscale send it to
clients of capability version 49 and newer) in one write, and runs an h2 server connection inside
the Noise records. Each HTTP/2 request becomes an ASGI ``http`` call of the given app, with the
peer's machine key and capability version in ``scope["extensions"]["tailscale"]``: the Noise
handshake authenticated that machine key, so the app may trust it as Tailscale's servers do.
Anyone can make a machine key, though: the connection keeps counting against its source's cap of
not-yet-registered connections until the app calls ``extensions["tailscale"]["registered"]()``
(the machine is a registered node's).

Flow control both ways: a response body is sent as the client's windows allow (the app's
``send`` waits for window updates and for the socket to drain); request bodies (at most
:data:`MAX_REQUEST_BODY`, within 1 MiB windows) are acknowledged as they arrive.

Two timers bound a connection that does nothing: the client must start HTTP/2 (its preface and
SETTINGS) within :data:`PREFACE_TIMEOUT` of the upgrade, and a connection with no open stream
for :data:`IDLE_TIMEOUT` is ended with ``GOAWAY`` (``NO_ERROR``). An open stream is never cut,
however quiet: a node's map long poll is one, kept open for as long as the node runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from starlette.types import ASGIApp

from embedmesh.tailscale import controlbase
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import ChallengePrivate, MachinePrivate

logger = logging.getLogger("embedmesh.control.server")

#: A request body larger than this is refused (headscale and Tailscale read at most 1 MiB).
MAX_REQUEST_BODY = 1 << 20
#: Seconds from the upgrade until the client's HTTP/2 preface and first SETTINGS must be in.
#: Go's HTTP/2 server (which headscale and Tailscale's servers run ts2021 on) allows 10 s; a
#: Tailscale client sends its preface as soon as the Noise handshake is done, one round trip.
PREFACE_TIMEOUT = 10.0
#: Seconds a connection may go without an open stream before it is ended (GOAWAY, then close).
#: A running node always has its map poll open, so this only ends connections nobody uses, which
#: would otherwise hold their source's place until they go away. It must stay above 2 minutes:
#: Tailscale's client takes a second Noise dial within 2 minutes of the last one for a sign of a
#: broken port 80 and dials only HTTPS (443) then (health.LastNoiseDialWasRecent; unless the
#: URL's host is a private address), which fails against a plain-HTTP server while it retries. Seen with tailscaled v1.102.5:
#: ended after 1 s idle, every redial failed for the 30 s watched; after 125 s, port 80 at once.
#: Read when a connection starts, so a test can shorten it.
IDLE_TIMEOUT = 180.0
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n"
)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _Request:
    __slots__ = ("body", "ended", "event", "received", "reset", "task", "window_open")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        #: Body bytes received so far (the app may already have taken them from ``body``).
        self.received = 0
        self.ended = False
        self.reset = False
        self.event = asyncio.Event()
        self.window_open = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Ts2021Protocol(asyncio.Protocol):
    """One upgraded connection (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        control_key: MachinePrivate,
        initiation: bytes,
        *,
        client: tuple[str, int] | None,
        server: tuple[str, int | None] | None,
        on_close: Callable[[], None] | None = None,
        on_registered: Callable[[], None] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._app = app
        self._noise = controlbase.ServerConnection(control_key, random_bytes(32))
        self._initiation = initiation
        self._random = random_bytes
        self._client = client
        self._server = server
        self._on_close = on_close
        self._on_registered = on_registered
        # Headers stay bytes (read as latin-1 below): with an encoding, h2 raises UnicodeDecodeError
        # out of receive_data on a header that is not UTF-8 (found by fuzz_ts_noiseserver).
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._requests: dict[int, _Request] = {}
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._preface_timeout = PREFACE_TIMEOUT
        self._idle_timeout = IDLE_TIMEOUT
        #: The client's first SETTINGS arrived: HTTP/2 has started.
        self._started = False
        self._preface_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        try:
            response = self._noise.accept_initiation(self._initiation)
        except controlbase.HandshakeError as exc:
            logger.info("refused a ts2021 handshake: %s", exc)
            transport.write(SWITCHING + exc.reply)
            transport.close()
            return
        session = self._noise.session
        assert session is not None
        challenge = ChallengePrivate.generate(self._random(32)).public()
        self._h2.initiate_connection()
        # Windows as large as the biggest request body we take (Go's HTTP/2 server, which
        # headscale and Tailscale run, opens 1 MiB too): a client never waits for a window update
        # in the middle of a request, and concurrent requests do not queue behind one 64 KiB
        # connection window.
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_REQUEST_BODY,
            }
        )
        self._h2.increment_flow_control_window(MAX_REQUEST_BODY)
        # One write, as Tailscale's server "corks" it: the 101, the Noise response, the early
        # payload, then our HTTP/2 preface.
        transport.write(
            SWITCHING
            + response
            + self._noise.send(controlbase.encode_early_payload(challenge))
            + self._noise.send(self._h2.data_to_send())
        )
        # A deadline, not an inactivity timer: a client trickling the preface byte by byte
        # gains nothing.
        self._preface_timer = asyncio.get_running_loop().call_later(self._preface_timeout, self._preface_due)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            plaintext = self._noise.receive_data(data)
            events = self._h2.receive_data(plaintext) if plaintext else []
        except (TailscaleProtocolError, h2.exceptions.ProtocolError) as exc:
            logger.info("closing a ts2021 connection from %s: %s", self._client, exc)
            self._close()
            return
        for event in events:
            self._dispatch(event)
        self._flush()
        self._watch_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timers()
        for request in self._requests.values():
            request.reset = True
            request.event.set()
            request.window_open.set()
            if request.task is not None:
                request.task.cancel()
        self._requests.clear()
        self._writable.set()
        if self._on_close is not None:
            self._on_close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------------ HTTP/2

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged) and not self._started:
            # h2 has checked the preface magic, and the client's first frame is its SETTINGS.
            self._started = True
            if self._preface_timer is not None:
                self._preface_timer.cancel()
                self._preface_timer = None
        elif isinstance(event, h2.events.RequestReceived):
            request = _Request()
            assert event.stream_id is not None
            self._requests[event.stream_id] = request
            if event.stream_ended is not None:
                request.ended = True
            headers = [(_text(k), _text(v)) for k, v in event.headers or ()]
            request.task = asyncio.get_running_loop().create_task(
                self._run(event.stream_id, headers, request)
            )
        elif isinstance(event, h2.events.DataReceived):
            pending = self._requests.get(event.stream_id or 0)
            data = event.data or b""
            if pending is not None:
                pending.received += len(data)
            if pending is None or pending.received > MAX_REQUEST_BODY:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.reset_stream(event.stream_id or 0, h2.errors.ErrorCodes.REFUSED_STREAM)
                # The connection window is shared: give the refused bytes back to it.
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id or 0
                    )
                if pending is not None:
                    # The app sees the client go away instead of waiting for the rest.
                    pending.reset = True
                    pending.event.set()
                    pending.window_open.set()
                return
            pending.body.append(data)
            # The body is small and read whole: give the window back at once.
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
            pending.event.set()
        elif isinstance(event, h2.events.StreamEnded):
            ended = self._requests.get(event.stream_id or 0)
            if ended is not None:
                ended.ended = True
                ended.event.set()
        elif isinstance(event, h2.events.StreamReset):
            gone = self._requests.pop(event.stream_id or 0, None)
            if gone is not None:
                gone.reset = True
                gone.event.set()
                gone.window_open.set()
                if gone.task is not None:
                    gone.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated):
            targets = (
                list(self._requests.values())
                if not event.stream_id
                else [self._requests.get(event.stream_id)]
            )
            for target in targets:
                if target is not None:
                    target.window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()

    def _flush(self) -> None:
        if self._transport is None or self._closed:
            return
        data = self._h2.data_to_send()
        if data:
            try:
                self._transport.write(self._noise.send(data))
            except TailscaleProtocolError:
                self._close()

    def _close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._cancel_timers()
            self._transport.close()

    # ------------------------------------------------------------------ timeouts

    def _watch_idle(self) -> None:
        """Run the idle timer while HTTP/2 is up and no stream is open, and only then.

        Called after each batch of frames and as each request ends. The timer counts from the
        moment the last stream ended: frames without a stream (PING, SETTINGS, WINDOW_UPDATE)
        do not hold a connection open, as with Go's server.
        """
        if self._closed or not self._started:
            return
        if self._requests:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        elif self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle_due)

    def _preface_due(self) -> None:
        self._preface_timer = None
        if not self._closed and not self._started:
            logger.info(
                "closing a ts2021 connection from %s: no HTTP/2 within %g s of the upgrade",
                self._client,
                self._preface_timeout,
            )
            self._close()

    def _idle_due(self) -> None:
        self._idle_timer = None
        if self._closed or self._requests:
            return
        logger.info(
            "closing a ts2021 connection from %s: no request for %g s", self._client, self._idle_timeout
        )
        # GOAWAY first, as Go's server does on its idle timeout: the client knows no request
        # of its was lost (a request sent meanwhile has a higher stream ID, safe to retry).
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
        self._flush()
        self._close()

    def _cancel_timers(self) -> None:
        for timer in (self._preface_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._preface_timer = self._idle_timer = None

    async def _run(self, stream_id: int, headers: list[tuple[str, str]], request: _Request) -> None:
        fields = {k: v for k, v in headers}
        path, _, query = fields.get(":path", "/").partition("?")
        session = self._noise.session
        assert session is not None
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "method": fields.get(":method", "GET"),
            "scheme": "https",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            # HTTP/2's :authority is HTTP/1.1's Host (ASGI apps read the latter).
            "headers": [(b"host", fields.get(":authority", "").encode("latin-1"))]
            + [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in headers
                if not k.startswith(":") and k != "host"
            ],
            "client": self._client,
            "server": self._server,
            "extensions": {
                "tailscale": {
                    "machine_key": session.peer,
                    "version": session.version,
                    # The app calls this once the machine key is a registered node's.
                    "registered": self._on_registered,
                }
            },
        }
        started = False
        finished = False

        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                # The whole request was read: the next receive waits for the client to go away
                # (Starlette's streaming responses listen for that while they send).
                while not request.reset and not self._closed:
                    request.event.clear()
                    await request.event.wait()
                return {"type": "http.disconnect"}
            while not request.body and not request.ended and not request.reset:
                request.event.clear()
                await request.event.wait()
            if request.reset or self._closed:
                return {"type": "http.disconnect"}
            chunk = b"".join(request.body)
            request.body.clear()
            delivered = request.ended
            return {"type": "http.request", "body": chunk, "more_body": not request.ended}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal started, finished
            if self._closed or request.reset:
                raise OSError("the control client went away")
            if message["type"] == "http.response.start":
                # The app's header bytes go out as they are (h2 would re-encode text as UTF-8).
                response_headers = [(b":status", str(message["status"]).encode())] + [
                    (bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])
                ]
                self._h2.send_headers(stream_id, response_headers)
                started = True
                self._flush()
            elif message["type"] == "http.response.body":
                await self._send_body(
                    stream_id, request, message.get("body", b""), not message.get("more_body", False)
                )
                if not message.get("more_body", False):
                    finished = True

        try:
            await self._app(scope, receive, send)
            if not started and not self._closed:
                self._h2.send_headers(stream_id, [(":status", "500")], end_stream=True)
                self._flush()
            elif not finished and not self._closed and not request.reset:
                # The app returned in the middle of its body: the client must not wait for the rest.
                self._reset(stream_id)
        except asyncio.CancelledError:
            pass
        except OSError:
            pass
        except Exception:
            logger.exception("the control API failed on %s %s", scope["method"], path)
            if not started and not self._closed:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.send_headers(stream_id, [(":status", "500")], end_stream=True)
                    self._flush()
            elif not finished and not self._closed and not request.reset:
                # Headers are out, so no 500 can follow: reset the stream, as Go's server does
                # when a handler panics mid-answer, instead of leaving the client waiting.
                self._reset(stream_id)
        finally:
            self._requests.pop(stream_id, None)
            self._watch_idle()

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._flush()

    async def _send_body(self, stream_id: int, request: _Request, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while True:
            if self._closed or request.reset:
                raise OSError("the control client went away")
            if not view:
                if end:
                    self._h2.end_stream(stream_id)
                    self._flush()
                return
            window = self._h2.local_flow_control_window(stream_id)
            if window <= 0:
                request.window_open.clear()
                await request.window_open.wait()
                continue
            # Every frame the window allows, then one flush: a large map is one socket write per
            # window, not one per 16 KiB frame.
            frame_size = self._h2.max_outbound_frame_size
            while view and window > 0:
                size = min(window, frame_size)
                chunk, view = view[:size], view[size:]
                self._h2.send_data(stream_id, bytes(chunk), end_stream=end and not view)
                window -= size
            self._flush()
            await self._writable.wait()
            if not view:
                return
