"""The coordination server: a Starlette app on uvicorn around the sans-IO :class:`Coordinator`.

Routes:

* ``GET /key``: the server's Noise public key (Tailscale's ``/key`` answer; nodes pin it on first
  contact);
* ``POST /ts2021``: Tailscale's control protocol, the only one (the Noise IK upgrade, then HTTP/2
  inside it to :mod:`embedmesh.control.tsapi`); tailscaled, tsnet programs and embedmesh's own
  nodes all come here;
* ``/register/<id>``: where an interactive login's URL points;
* ``/admin/v1/...``: the admin API (bearer token from ``<state-dir>/admin-token``), see
  :mod:`embedmesh.control.admin`;
* ``POST /derp/admit``: the DERP admission controller (``--verify-client-url``) for this tailnet's
  nodes, see :mod:`embedmesh.control.derpadmit`;
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
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from embedmesh.control.coordinator import (
    DEFAULT_EPHEMERAL_TIMEOUT,
    DEFAULT_KEY_EXPIRY,
    Coordinator,
    CoordinatorConfig,
)
from embedmesh.control.derpadmit import ADMIT_PATH, admit_endpoint, admits
from embedmesh.control.embeddedderp import REGION_ID, EmbeddedDerp, map_host
from embedmesh.control.errors import ControlError, StoreError
from embedmesh.control.limits import (
    DEFAULT_FIRST_REQUEST_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
    Client,
    ConnectionLimiter,
    default_max_connections,
)
from embedmesh.control.logins import PendingLogins
from embedmesh.control.store import Store, create_private_file, prepare_state_dir
from embedmesh.errors import AddressInUseError, ConfigError
from embedmesh.tailscale.controlhttp import (
    UPGRADE_PATH,
    UPGRADE_PROTOCOL,
    ControlHTTPError,
    check_upgrade_request,
)
from embedmesh.tailscale.keys import NodePublic
from embedmesh.tailscale.noiseserver import Ts2021Protocol
from embedmesh.tailscale.stunserver import StunServer
from embedmesh.wireguard.crypto import generate_private_key, public_key

logger = logging.getLogger("embedmesh.control.server")

#: Where embedmesh's own protocol (before it spoke Tailscale's) had its WebSocket: a node that
#: still asks there is told to upgrade.
OLD_CONTROL_PATH = "/control/v1"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: Path
    base_domain: str = "mesh.internal"
    approval_required: bool = False
    key_expiry: float | None = DEFAULT_KEY_EXPIRY
    ephemeral_timeout: float = DEFAULT_EPHEMERAL_TIMEOUT
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
    #: Run a DERP relay in this process and publish it as region 999 ("embedmesh") in the DERP
    #: map (see :mod:`embedmesh.control.embeddedderp`).
    embedded_derp: bool = True
    #: Its TCP port (0: any free port) and the host name or address the map gives clients
    #: (None: the listen address, or this machine's name when that is a wildcard).
    derp_port: int = 0
    derp_host: str | None = None
    #: A STUN server beside the embedded relay, on this UDP port (0: any free port; None: none),
    #: published as the region's STUNPort so nodes learn their public addresses.
    stun_port: int | None = 0
    #: When the STUN port is taken: warn and run without STUN (True) or fail (False).
    stun_optional: bool = False
    #: The embedded relay serves only this tailnet's approved, unexpired node keys ("verify
    #: clients"); False: anyone who can reach it.
    derp_verify_clients: bool = True
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
                Route(OLD_CONTROL_PATH, self._old_protocol, methods=["GET"]),
                Route(ADMIT_PATH, self._derp_admit, methods=["POST"]),
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
        #: Upgraded ts2021 connections: uvicorn no longer tracks them, so stopping closes them.
        self.upgraded: set[asyncio.BaseTransport] = set()
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
        regions = self._derp_map.get("Regions") or {}
        if config.embedded_derp and (str(REGION_ID) in regions or REGION_ID in regions):
            raise ConfigError(
                f"{config.derp_map} has a region {REGION_ID}, the embedded DERP server's: renumber it, "
                "or turn the embedded server off"
            )
        #: The embedded DERP relay, made when serving starts (it needs the bound address).
        self.embedded_derp: EmbeddedDerp | None = None

    def derp_map_json(self) -> dict[str, Any]:
        """The DERP map sent in every Tailscale client's first map: the ``derp_map`` file's
        regions and the embedded relay's."""
        if self.embedded_derp is None or not self.embedded_derp.port:
            return self._derp_map
        regions = dict(self._derp_map.get("Regions") or {})
        regions[str(REGION_ID)] = self.embedded_derp.region_json()
        return {**self._derp_map, "Regions": regions}

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    def close(self) -> None:
        self.store.close()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app uvicorn runs: a request that reaches it has met its first-request deadline."""
        if scope["type"] == "http":
            self.limiter.started(_client_key(scope))
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ HTTP

    async def _key(self, request: Request) -> JSONResponse:
        # Tailscale's answer: `publicKey` is the ts2021 key; the legacy (pre-Noise) key is zero,
        # as for every modern client.
        return JSONResponse(
            {"legacyPublicKey": "mkey:" + "0" * 64, "publicKey": self.machine_key.public().to_text()}
        )

    async def _old_protocol(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            "this control server speaks Tailscale's control protocol (POST /ts2021) only: upgrade the "
            "node to an embedmesh that does (its state folder carries over)",
            status_code=426,
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

    async def _derp_admit(self, request: Request) -> Response:
        return await admit_endpoint(self.coordinator, request, time.time())

    async def _derp_admits(self, node_key: NodePublic, source: tuple[str, int]) -> bool:
        # The embedded relay runs on this loop, so it asks the coordinator directly.
        return admits(self.coordinator, node_key.raw, time.time())

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

    # ------------------------------------------------------------------ running

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self._asgi,
            interface="asgi3",
            http=_limited_protocol(self.limiter, self),
            ws="none",
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
        try:
            async with anyio.create_task_group() as tg:
                if self.config.embedded_derp:
                    derp = EmbeddedDerp.create(
                        self.config.state_dir,
                        map_host(bound_host, self.config.derp_host),
                        tls_cert=self.config.tls_cert,
                        tls_key=self.config.tls_key,
                        admit=self._derp_admits if self.config.derp_verify_clients else None,
                    )
                    derp.port = await tg.start(derp.server.serve, bound_host, self.config.derp_port)
                    if self.config.stun_port is not None:
                        stun_server = StunServer()
                        try:
                            derp.stun_port = await tg.start(stun_server.serve, bound_host, self.config.stun_port)
                            derp.stun_server = stun_server
                        except AddressInUseError as exc:
                            if not self.config.stun_optional:
                                raise
                            logger.warning("no STUN server beside the embedded DERP relay: %s", exc)
                    self.embedded_derp = derp
                    logger.info("embedded DERP server on %s port %d (region %d)", derp.host, derp.port, REGION_ID)

                async def serve_http() -> None:
                    await server.serve(sockets=[sock])
                    tg.cancel_scope.cancel()  # the relay stops with the control server

                tg.start_soon(serve_http)
                while not server.started:
                    if server.should_exit:
                        break
                    await anyio.sleep(0.01)
                logger.info("control server listening on %s", self.url)
                task_status.started(self.url)
        finally:
            self._close_upgraded()

    def shutdown(self) -> None:
        """Stop serving (from the server's event loop): nodes see their connections close."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        self._close_upgraded()

    def _close_upgraded(self) -> None:
        # Without this a stopped server's nodes would notice only at their map watchdog (2 min).
        for transport in list(self.upgraded):
            transport.close()
        self.upgraded.clear()

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


def _limited_protocol(limiter: ConnectionLimiter, server: ControlServer | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the limiter told about every connection, and Tailscale's
    ts2021 upgrade (the only upgrade: it hands the socket to :class:`Ts2021Protocol`, which then
    reports the connection's end)."""

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
            # Any other Upgrade header is served as plain HTTP (no WebSocket here).
            return self._get_upgrade() == UPGRADE_PROTOCOL.encode() and server is not None

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            assert server is not None
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
            transport = self.transport
            server.upgraded.add(transport)

            def closed() -> None:
                server.upgraded.discard(transport)
                limiter.closed(key)

            protocol = Ts2021Protocol(
                server.tsapi,
                server.machine_key,
                upgrade.initiation,
                client=self.client,
                server=self.server,
                on_close=closed,
                # Only a registered node's connection leaves its source's cap (the app says when).
                on_registered=lambda: limiter.authenticated(key),
            )
            leftover, _closed = self.conn.trailing_data
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            if leftover:
                protocol.data_received(bytes(leftover))

    return LimitedH11


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handling: the program that embeds the server owns signals.

    uvicorn's own handlers would replace the embedding program's and, after a graceful stop,
    re-raise the signal, so a SIGTERM'd ``embedmesh control serve`` died with status -15 instead
    of exiting 0. Stopping is :meth:`ControlServer.shutdown` or cancellation.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
