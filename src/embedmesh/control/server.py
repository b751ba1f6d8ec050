"""The coordination server: a Starlette app on uvicorn around the sans-IO :class:`Coordinator`.

Routes:

* ``GET /key``: the server's static public key and protocol version (nodes pin it on first contact);
* ``WS /control/v1``: one node's control stream (Noise_IK handshake, then encrypted messages);
* ``/admin/v1/...``: the admin API (bearer token from ``<state-dir>/admin-token``), see
  :mod:`embedmesh.control.admin`;
* ``GET /health``.

Connections are limited before any of that (see :mod:`embedmesh.control.limits`): a first request
within a few seconds, a cap on unauthenticated connections per source and a total cap below the
descriptor limit.

The state directory (0700) holds ``control.db``, ``server.key`` (the static X25519 private key),
``admin-token`` and ``server.json`` (the URL the admin CLI talks to), all 0600.

uvicorn is asyncio-only, so the server runs on asyncio; :meth:`ControlServer.start_in_thread` runs
it on its own loop in a thread, which lets trio programs and tests use it too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

from embedmesh.control.coordinator import (
    DEFAULT_EPHEMERAL_TIMEOUT,
    DEFAULT_KEY_EXPIRY,
    Coordinator,
    CoordinatorConfig,
    Stream,
)
from embedmesh.control.errors import ControlError, ControlProtocolError, HandshakeRejectedError, StoreError
from embedmesh.control.limits import (
    DEFAULT_FIRST_REQUEST_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
    Client,
    ConnectionLimiter,
    default_max_connections,
)
from embedmesh.control.logins import PendingLogins
from embedmesh.control.messages import (
    EndpointsUpdate,
    LogoutRequest,
    Ping,
    RegisterRequest,
    dumps,
)
from embedmesh.control.noise import MAX_FRAME_SIZE, PROTOCOL_VERSION
from embedmesh.control.protocol import ServerSession
from embedmesh.control.store import Store, create_private_file, prepare_state_dir
from embedmesh.errors import ConfigError
from embedmesh.tailscale.controlhttp import (
    UPGRADE_PATH,
    UPGRADE_PROTOCOL,
    ControlHTTPError,
    check_upgrade_request,
)
from embedmesh.tailscale.noiseserver import Ts2021Protocol
from embedmesh.wireguard.crypto import generate_private_key, public_key

logger = logging.getLogger("embedmesh.control.server")

CONTROL_PATH = "/control/v1"
#: A node that sends nothing (it pings every 15 s) for this long is considered gone.
IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
#: Messages from nodes are small; maps only flow the other way.
MAX_CLIENT_MESSAGE = 256 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: Path
    base_domain: str = "mesh.internal"
    approval_required: bool = False
    key_expiry: float | None = DEFAULT_KEY_EXPIRY
    ephemeral_timeout: float = DEFAULT_EPHEMERAL_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    #: With approval required: the most nodes that may wait for an admin at once, and how many
    #: keyless registrations one source address (an IPv6 /64) may make in a burst / per interval.
    max_pending: int = 100
    keyless_burst: int = 5
    keyless_interval: float = 60.0
    #: A connection that sends no complete request this long after it is accepted is closed.
    first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT
    #: All connections at once; None: the descriptor limit (``ulimit -n``) minus 64.
    max_connections: int | None = None
    #: Connections one source address (an IPv6 /64) may hold before its nodes register.
    max_connections_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    #: The DERP map sent to Tailscale clients: a file in Tailscale's DERPMap JSON (``{"Regions":
    #: {...}}``), e.g. of a derper you run; None sends an empty map.
    derp_map: Path | None = None
    #: Serve HTTPS with this certificate chain and key (PEM files); both or neither. Some clients
    #: always speak TLS to control (Noise protects the API over plain HTTP too).
    tls_cert: Path | None = None
    tls_key: Path | None = None


def _read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    if path.exists():
        mode = path.stat().st_mode & 0o077
        if mode:
            raise StoreError(
                f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}): chmod 600 {path}"
            )
        return path.read_bytes()
    data = make()
    create_private_file(path, data)
    return data


class ControlServer:
    """One coordination server over one state directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        state = config.state_dir
        prepare_state_dir(state)
        key_text = _read_or_create(
            state / "server.key", lambda: base64.b64encode(generate_private_key(os.urandom(32))) + b"\n"
        )
        try:
            self._private_key = base64.b64decode(key_text.strip(), validate=True)
            assert len(self._private_key) == 32
        except (ValueError, AssertionError) as exc:
            raise StoreError(f"{state / 'server.key'} is not a base64 private key") from exc
        self.public_key = public_key(self._private_key)
        from embedmesh.control.admin import admin_routes, check_admin_token, new_admin_token

        # Fails closed: a short, empty or garbled token stops the server instead of guarding the API.
        token_path = state / "admin-token"
        self.admin_token = check_admin_token(_read_or_create(token_path, new_admin_token), token_path)
        self.store = Store(state / "control.db")
        self.coordinator = Coordinator(
            self.store,
            CoordinatorConfig(
                base_domain=config.base_domain,
                approval_required=config.approval_required,
                key_expiry=config.key_expiry,
                ephemeral_timeout=config.ephemeral_timeout,
                max_pending=config.max_pending,
                keyless_burst=config.keyless_burst,
                keyless_interval=config.keyless_interval,
            ),
            now=time.time(),
            random_bytes=os.urandom,
        )
        self.app = Starlette(
            routes=[
                Route("/key", self._key, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/register/{login_id}", self._login_page, methods=["GET"]),
                WebSocketRoute(CONTROL_PATH, self._control),
                *admin_routes(self),
            ],
            lifespan=self._lifespan,
        )
        self.limiter = ConnectionLimiter(
            max_connections=(
                default_max_connections() if config.max_connections is None else config.max_connections
            ),
            max_per_source=config.max_connections_per_source,
            first_request_timeout=config.first_request_timeout,
        )
        self.url: str | None = None
        self._uvicorn: uvicorn.Server | None = None
        # Tailscale's clients speak ts2021 with the same static key (the server's machine key).
        from embedmesh.control.tsapi import tsapi_app
        from embedmesh.tailscale.keys import MachinePrivate

        self.machine_key = MachinePrivate(self._private_key)
        self.logins = PendingLogins()
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if config.tls_cert is not None and config.tls_key is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    config.tls_cert, config.tls_key
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot use {config.tls_cert} with {config.tls_key} for TLS: {exc}; "
                    "give a PEM certificate chain and its private key"
                ) from exc
        self.tsapi = tsapi_app(self)
        self._derp_map: dict[str, Any] = {"Regions": {}}
        if config.derp_map is not None:
            try:
                loaded = json.loads(Path(config.derp_map).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read the DERP map {config.derp_map}: {exc}") from exc
            if not isinstance(loaded, dict) or not isinstance(loaded.get("Regions"), dict):
                raise ConfigError(f'{config.derp_map} is not a DERP map: it needs {{"Regions": {{...}}}}')
            self._derp_map = loaded

    def derp_map_json(self) -> dict[str, Any]:
        """The DERP map sent in every Tailscale client's first map."""
        return self._derp_map

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    def close(self) -> None:
        self.store.close()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app uvicorn runs: a request that reaches it has met its first-request deadline."""
        if scope["type"] in ("http", "websocket"):
            self.limiter.started(_client_key(scope))
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ HTTP

    async def _key(self, request: Request) -> JSONResponse:
        # embedmesh's own fields, and Tailscale's (`publicKey`, the ts2021 key; the legacy key is
        # zero, as for every modern client) so tailscaled and tsnet can use this server too.
        return JSONResponse(
            {
                "protocol_version": PROTOCOL_VERSION,
                "public_key": self.public_key_b64,
                "legacyPublicKey": "mkey:" + "0" * 64,
                "publicKey": self.machine_key.public().to_text(),
            }
        )

    async def _login_page(self, request: Request) -> HTMLResponse:
        """Where a Tailscale client's AuthURL points: says how the login is completed."""
        login_id = request.path_params["login_id"]
        try:
            login = self.logins.get(login_id, time.time())
        except ControlError:
            return HTMLResponse(
                _page("Login not found", "<p>This login link has expired or was used. Start the login "
                      "again on the device (for example <code>tailscale up</code>).</p>"),
                status_code=404,
            )
        name = html.escape(login.request.hostname)
        body = (
            f"<p>The device <strong>{name}</strong> is waiting to join this tailnet.</p>"
            "<p>This server has no single sign-on yet: an administrator completes the login with</p>"
            f"<pre>embedmesh control auth register {html.escape(login.id)} --user NAME</pre>"
            "<p>and the device joins at once.</p>"
        )
        return HTMLResponse(_page(f"Join the tailnet: {name}", body))

    async def _health(self, request: Request) -> JSONResponse:
        # Unauthenticated, so it says healthy or not and nothing else (no counts of nodes or
        # connections an outsider could watch); the admin API has the details.
        healthy = self.store.healthy()
        return JSONResponse({"ok": healthy}, status_code=200 if healthy else 503)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timers)
            yield
            tg.cancel_scope.cancel()

    async def _timers(self) -> None:
        """Key expiry and the ephemeral reaper, on the server's clock."""
        longest = min(1.0, self.config.ephemeral_timeout / 4)
        while True:
            now = time.time()
            self.coordinator.handle_timeout(now)
            deadline = self.coordinator.next_deadline()
            wait = longest if deadline is None else min(longest, max(0.01, deadline - now))
            await anyio.sleep(wait)

    # ------------------------------------------------------------------ the control stream

    async def _control(self, websocket: WebSocket) -> None:
        await websocket.accept()
        session = ServerSession(self._private_key)
        stream: Stream | None = None
        coordinator = self.coordinator
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                initiation = session.receive_initiation(await _receive_frame(websocket))
                response = session.respond(generate_private_key(os.urandom(32)))
                try:
                    coordinator.accept_handshake(initiation.machine_key, initiation.timestamp_ns, time.time())
                except HandshakeRejectedError as exc:
                    # The session is authenticated, so the node learns why (an attacker replaying a
                    # capture learns nothing: it cannot decrypt this).
                    logger.warning("refused a control handshake: %s", exc)
                    await websocket.send_bytes(response)
                    await websocket.send_bytes(session.send_encoded(_error(exc)))
                    await websocket.close(1008)
                    return
                await websocket.send_bytes(response)
                request = session.receive(await _receive_frame(websocket))
            if not isinstance(request, RegisterRequest):
                raise ControlProtocolError("the first message on a control stream must be register")
            try:
                source = websocket.client.host if websocket.client is not None else None
                node = coordinator.register(initiation.machine_key, request, time.time(), source)
            except ControlError as exc:
                logger.info("refused a registration: %s", exc)
                await websocket.send_bytes(session.send_encoded(_error(exc)))
                await websocket.close(1008)
                return
            # A registered node's stream no longer counts against its source's cap (many nodes
            # may share one NAT address); it still counts in the total.
            self.limiter.authenticated(_client_key(websocket.scope))
            waker = _Waker()
            stream = coordinator.attach(node.id, waker.wake, time.time())
            await self._stream(websocket, session, stream, waker)
        except WebSocketDisconnect:
            pass
        except TimeoutError:
            logger.info("control stream idle for too long: closed")
            with contextlib.suppress(Exception):
                await websocket.close(1001)
        except ControlProtocolError as exc:
            logger.warning("closing a control stream: %s", exc)
            with contextlib.suppress(Exception):
                await websocket.close(1008)
        except (OSError, RuntimeError) as exc:
            # The connection went away while we were sending (Starlette/uvicorn report it so).
            logger.info("control stream lost: %s", exc)
        finally:
            if stream is not None:
                coordinator.detach(stream, time.time())

    async def _stream(
        self, websocket: WebSocket, session: ServerSession, stream: Stream, waker: _Waker
    ) -> None:
        """Run the writer (queued maps and deltas) and the reader (pings, endpoints, logout)."""
        coordinator = self.coordinator
        error: Exception | None = None

        async def writer() -> None:
            nonlocal error
            try:
                while True:
                    if coordinator.park(stream):
                        await waker.wait()
                    for payload in coordinator.take(stream):
                        frame = session.send_encoded(payload)
                        stream.messages_sent += 1
                        stream.bytes_sent += len(frame)
                        await websocket.send_bytes(frame)
                    if stream.closing:
                        await websocket.close(1000)
                        break
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            # Errors are carried out of the task group by hand so they are not wrapped in groups.
            try:
                while True:
                    with anyio.fail_after(self.config.idle_timeout):
                        message = session.receive(await _receive_frame(websocket))
                    now = time.time()
                    if isinstance(message, EndpointsUpdate):
                        coordinator.update_endpoints(stream, message.endpoints, now)
                    elif isinstance(message, Ping):
                        coordinator.ping(stream, message.id)
                    elif isinstance(message, LogoutRequest):
                        coordinator.logout(stream, now)
                    else:
                        raise ControlProtocolError("register sent twice on one control stream")
            except Exception as exc:
                error = error or exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ running

    def _uvicorn_config(self) -> uvicorn.Config:
        http, ws = _limited_protocols(self.limiter, self)
        return uvicorn.Config(
            self._asgi,
            interface="asgi3",
            http=http,
            ws=ws,
            ws_max_size=MAX_CLIENT_MESSAGE,
            ws_ping_interval=None,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key,
        )

    def _write_server_json(self, url: str) -> None:
        info: dict[str, Any] = {"url": url, "public_key": self.public_key_b64, "pid": os.getpid()}
        if self.config.tls_cert is not None:
            # The admin CLI trusts this certificate for the server's URL (it may be self-signed).
            info["tls_cert"] = str(Path(self.config.tls_cert).resolve())
        create_private_file(
            self.config.state_dir / "server.json", json.dumps(info, indent=2).encode() + b"\n"
        )

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        sock: socket.socket | None = None,
        task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled or :meth:`shutdown`; reports the URL through ``task_status``."""
        if sock is None:
            sock = bind_socket(host, port)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if self.config.tls_cert is not None else "http"
        self.url = f"{scheme}://{url_host}:{bound_port}"
        server = _EmbeddedUvicorn(self._uvicorn_config())
        self._uvicorn = server
        self._write_server_json(self.url)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            while not server.started:
                if server.should_exit:
                    break
                await anyio.sleep(0.01)
            logger.info("control server listening on %s", self.url)
            task_status.started(self.url)

    def shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
        """Run on a private asyncio loop in a daemon thread (for trio programs, tests and demos)."""
        return RunningServer(self, bind_socket(host, port))


def _page(title: str, body: str) -> str:
    """A small accessible HTML page (no scripts, no external resources)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        f'<body style="font-family: sans-serif; max-width: 40em; margin: 2em auto; line-height: 1.5">'
        f"<main><h1>{html.escape(title)}</h1>{body}</main></body></html>"
    )


def _client_key(scope: Scope) -> Client | None:
    client = scope.get("client")
    return (str(client[0]), int(client[1])) if client else None


def _limited_protocols(
    limiter: ConnectionLimiter, server: ControlServer | None = None
) -> tuple[type[H11Protocol], type[WSProtocol]]:
    """uvicorn's h11 and wsproto protocols, with the limiter told about every connection.

    A WebSocket upgrade hands the transport from the HTTP protocol to a new WebSocket protocol
    (only the latter sees connection_lost), so both report the end of a connection.
    """

    class LimitedH11(H11Protocol):
        _limit_key: Client

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._limit_key = self.client or ("?", id(self))
            if not limiter.open(self._limit_key, transport.close):
                logger.info("refused a connection from %s: connection limit reached", self._limit_key[0])
                transport.close()
                return
            timer = self.loop.call_later(limiter.first_request_timeout, self._first_request_due)
            limiter.set_deadline_cancel(self._limit_key, timer.cancel)

        def _first_request_due(self) -> None:
            if limiter.expired(self._limit_key):
                logger.info("closed a connection from %s: no request in time", self._limit_key[0])
                limiter.closed(self._limit_key)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            limiter.closed(self._limit_key)
            super().connection_lost(exc)

        def _should_upgrade(self) -> bool:
            if self._get_upgrade() == UPGRADE_PROTOCOL.encode() and server is not None:
                return True
            return bool(super()._should_upgrade())

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            if self._get_upgrade() != UPGRADE_PROTOCOL.encode() or server is None:
                super().handle_websocket_upgrade(event)
                return
            # Tailscale's ts2021: from here the socket carries Noise, then HTTP/2 inside it.
            limiter.started(self._limit_key)
            try:
                if event.target.partition(b"?")[0] != UPGRADE_PATH.encode():
                    raise ControlHTTPError(f"the ts2021 upgrade is at {UPGRADE_PATH}")
                upgrade = check_upgrade_request(event.method.decode("ascii"), self.headers)
            except ControlHTTPError as exc:
                self.send_400_response(str(exc))
                return
            self.connections.discard(self)
            key = self._limit_key
            protocol = Ts2021Protocol(
                server.tsapi,
                server.machine_key,
                upgrade.initiation,
                client=self.client,
                server=self.server,
                on_close=lambda: limiter.closed(key),
                # Only a registered node's connection leaves its source's cap (the app says when).
                on_registered=lambda: limiter.authenticated(key),
            )
            leftover, _closed = self.conn.trailing_data
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            if leftover:
                protocol.data_received(bytes(leftover))

    class LimitedWS(WSProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            limiter.closed(self.client or ("?", id(self)))
            super().connection_lost(exc)

    return LimitedH11, LimitedWS


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handling: the program that embeds the server owns signals.

    uvicorn's own handlers would replace the embedding program's and, after a graceful stop,
    re-raise the signal, so a SIGTERM'd ``embedmesh control serve`` died with status -15 instead
    of exiting 0. Stopping is :meth:`ControlServer.shutdown` or cancellation.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Waker:
    """Set by the coordinator when a stream has something to send; the writer waits on it."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


def _error(exc: ControlError) -> bytes:
    return dumps({"type": "error", "code": exc.code, "message": str(exc)})


async def _receive_frame(websocket: WebSocket) -> bytes:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data = message.get("bytes")
    if data is None:
        raise ControlProtocolError("control frames are binary WebSocket messages")
    if len(data) > MAX_FRAME_SIZE:
        raise ControlProtocolError("control frame too large")
    return bytes(data)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio disables Nagle only on sockets that say they are TCP, and
    # accepted sockets inherit it; without it, a map right after a small message waits ~40 ms for
    # the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} (is another server running?)"
        ) from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class RunningServer:
    """A :class:`ControlServer` on its own thread and asyncio loop; ``stop()`` ends it."""

    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server = server
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="embedmesh-control", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        if not self.url:
            raise RuntimeError("control server did not start within 30 s")

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            async with anyio.create_task_group() as tg:
                self.url = await tg.start(
                    lambda task_status: self.server.serve(sock=self._sock, task_status=task_status)
                )
                self._started.set()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the server's loop (the coordinator is not thread-safe) and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.shutdown)
        self._thread.join(15)
        self.server.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
