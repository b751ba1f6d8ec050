"""Serve any ASGI application (Starlette, FastAPI, Django, ...) on an anyio ``Listener`` — a mesh
listener from :meth:`embedmesh.Node.listen` in particular — with HTTP/1.1 from h11.

What a user of uvicorn would expect: keep-alive, request bodies streamed to the app, streaming
responses written with backpressure, ``Expect: 100-continue``, chunked encoding, HEAD, ASGI
lifespan (startup before the first request, shutdown when serving stops), a 500 for an app that
fails before responding, and per-connection limits so a slow or hostile client cannot hold
memory or a task forever. The ASGI ``client`` is the peer's overlay address, so an app can ask
:meth:`embedmesh.Node.whois` who is calling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute

logger = logging.getLogger("embedmesh.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Largest request head h11 accepts, and how long a connection may idle between requests.
MAX_HEADER_BYTES = 64 * 1024
KEEPALIVE_TIMEOUT = 75.0
READ_CHUNK = 65536
#: How long the app's lifespan shutdown may take before it is cancelled.
SHUTDOWN_TIMEOUT = 10.0


class Lifespan:
    """Runs the ASGI lifespan protocol next to the server; tolerates apps that don't support it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._receive_send, self._receive_stream = anyio.create_memory_object_stream[Message](2)
        self._startup_done = anyio.Event()
        self._shutdown_done = anyio.Event()
        self.supported = True
        self.error: str | None = None
        self._scope: anyio.CancelScope | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Once startup is done the app's lifespan is shielded: cancelling the server (closing the
        # node cancels its tasks) must still deliver lifespan.shutdown and let the app run it;
        # :meth:`shutdown` cancels the app itself if it takes longer than SHUTDOWN_TIMEOUT.
        with anyio.CancelScope() as self._scope:
            await self._run(task_status)

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        await self._receive_send.send({"type": "lifespan.startup"})

        async def receive() -> Message:
            return await self._receive_stream.receive()

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
                if kind.endswith("failed"):
                    self.error = message.get("message", "startup failed")
                elif self._scope is not None:
                    self._scope.shield = True
                self._startup_done.set()
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self._shutdown_done.set()

        async def watch() -> None:
            await self._startup_done.wait()
            task_status.started()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                await self.app(scope, receive, send)
            except BaseException as exc:
                if not self._startup_done.is_set():
                    # An app that raises on the lifespan scope does not support it (ASGI spec).
                    logger.debug("ASGI app does not support lifespan: %r", exc)
                    self.supported = False
                    self._startup_done.set()
                if isinstance(exc, Exception):
                    self._shutdown_done.set()
                    return
                raise
            finally:
                self._startup_done.set()
                self._shutdown_done.set()

    async def shutdown(self) -> None:
        """Send lifespan.shutdown and wait (at most SHUTDOWN_TIMEOUT) for the app to finish it."""
        if self.supported and not self._shutdown_done.is_set():
            await self._receive_send.send({"type": "lifespan.shutdown"})
            with anyio.move_on_after(SHUTDOWN_TIMEOUT):
                await self._shutdown_done.wait()
            if not self._shutdown_done.is_set():
                logger.warning("ASGI lifespan shutdown did not finish in %g s; cancelled", SHUTDOWN_TIMEOUT)
        if self._scope is not None:
            self._scope.cancel()


class _Connection:
    """One HTTP/1.1 connection: a loop of requests, each handed to the app."""

    def __init__(
        self, app: ASGIApp, stream: anyio.abc.ByteStream, state: dict[str, Any], root_path: str
    ) -> None:
        self.app = app
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.state = state
        self.root_path = root_path

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)

    async def _write(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send(data)

    async def serve(self) -> None:
        while True:
            try:
                with anyio.fail_after(KEEPALIVE_TIMEOUT):
                    event = await self._next_event()
            except TimeoutError:
                return
            except h11.RemoteProtocolError as exc:
                await self._send_simple_error(exc.error_status_hint, str(exc))
                return
            if isinstance(event, h11.ConnectionClosed | h11.PAUSED):
                return
            if not isinstance(event, h11.Request):
                return
            await self._handle(event)
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _send_simple_error(self, status: int, reason: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {reason}\n".encode()
        try:
            await self._write(
                h11.Response(
                    status_code=status,
                    reason=_reason(status),
                    headers=[
                        ("content-type", "text/plain; charset=utf-8"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ],
                )
            )
            await self._write(h11.Data(data=body))
            await self._write(h11.EndOfMessage())
        except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _scope(self, request: h11.Request) -> Scope:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        from urllib.parse import unquote

        server = self.stream.extra(SocketAttribute.local_address, None)
        client = self.stream.extra(SocketAttribute.remote_address, None)
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(path),
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": self.root_path,
            "headers": [(name.lower(), value) for name, value in request.headers],
            # Only IP sockets have a (host, port) to report; a Unix socket's path is no address.
            "client": tuple(client) if isinstance(client, tuple) else None,
            "server": tuple(server) if isinstance(server, tuple) else None,
            "state": dict(self.state),
        }

    async def _handle(self, request: h11.Request) -> None:
        scope = self._scope(request)
        expect_continue = any(
            n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in request.headers
        )
        response_started = False
        response_complete = False
        body_done = False
        disconnected = False
        head = scope["method"] == "HEAD"

        async def receive() -> Message:
            nonlocal body_done, disconnected, expect_continue
            if body_done or disconnected:
                if response_complete or disconnected:
                    return {"type": "http.disconnect"}
                await anyio.sleep_forever()
            if expect_continue and not response_started:
                expect_continue = False
                await self._write(h11.InformationalResponse(status_code=100, headers=[], reason=_reason(100)))
            event = await self._next_event()
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            disconnected = True
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal response_started, response_complete
            kind = message["type"]
            if kind == "http.response.start" and not response_started:
                response_started = True
                headers = [(bytes(n), bytes(v)) for n, v in message.get("headers", [])]
                status = int(message["status"])
                await self._write(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
            elif kind == "http.response.body" and response_started and not response_complete:
                body = message.get("body", b"")
                if body and not head:
                    await self._write(h11.Data(data=body))
                if not message.get("more_body", False):
                    response_complete = True
                    await self._write(h11.EndOfMessage())
            elif kind == "http.response.start":
                raise RuntimeError("ASGI app sent http.response.start twice")
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} in this state")

        try:
            await self.app(scope, receive, send)
        except Exception:
            logger.exception("ASGI application failed on %s %s", scope["method"], scope["path"])
            if not response_started:
                await self._send_simple_error(500, "Internal Server Error")
            return
        if not response_started:
            await self._send_simple_error(500, "Internal Server Error")
        elif not response_complete:
            self.conn = h11.Connection(h11.SERVER)  # the response is cut short: close
            raise anyio.BrokenResourceError("ASGI app did not finish its response")
        # Drain an unread request body so the connection can be reused (h11 requires it).
        while self.conn.their_state is h11.SEND_BODY:
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                break


def _reason(status: int) -> bytes:
    """The reason phrase for a status line (``200 OK``); empty for codes without one, which
    HTTP/1.1 allows (RFC 9112 §4)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


async def serve_asgi(
    app: ASGIApp,
    listener: anyio.abc.Listener[Any],
    *,
    root_path: str = "",
    lifespan: bool = True,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listener`` until cancelled, running its lifespan around the serving."""
    life = Lifespan(app)
    async with anyio.create_task_group() as tg:
        if lifespan:
            await tg.start(life.run)
            if life.error:
                raise RuntimeError(f"ASGI lifespan startup failed: {life.error}")
        state = life.state

        async def handle(stream: anyio.abc.ByteStream) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                await _Connection(app, stream, state, root_path).serve()

        task_status.started()
        try:
            await listener.serve(handle)
        finally:
            # Stop accepting first, then let the app shut down (shielded: this runs when the
            # serving task is cancelled, which is how Node.close() stops it).
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                if lifespan:
                    await life.shutdown()
            tg.cancel_scope.cancel()
