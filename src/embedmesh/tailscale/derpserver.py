"""A DERP relay server (anyio): HTTP/1.1 (h11) in front, :mod:`embedmesh.tailscale.derp` behind.

It serves what Tailscale's ``derper`` serves for a client:

* ``GET /derp`` with ``Upgrade: DERP`` and ``Connection: Upgrade``: ``101 Switching Protocols``
  with ``Derp-Version`` and ``Derp-Public-Key``, or no answer at all when the client sent
  ``Derp-Fast-Start: 1``; then the DERP frames;
* ``GET /derp`` with ``Upgrade: websocket`` and the subprotocol ``derp`` (browsers, and Go clients
  built with WebSockets): a WebSocket whose binary messages carry the DERP frames
  (:mod:`embedmesh.tailscale.derpws`). ``Upgrade: websocket`` without that subprotocol is served as
  plain DERP, as Go does for very old clients that sent it;
* ``/derp`` without an upgrade: 426 "DERP requires connection upgrade";
* ``/derp/probe`` and ``/derp/latency-check``: 200 with ``Access-Control-Allow-Origin: *`` for GET
  and HEAD (405 otherwise), for clients that measure latency over HTTP;
* ``/generate_204``: 204 for captive-portal checks, echoing a sane ``X-Tailscale-Challenge`` as
  ``X-Tailscale-Response: response <challenge>``;
* ``/``: a short page saying what this is; anything else 404.

Every authenticated connection's reads go through
:meth:`~embedmesh.tailscale.derp.ServerConnection.relay_data` (each packet routed through the
:class:`~embedmesh.tailscale.derp.RelayCore` as the read is split) and its queues out to it. On
asyncio a plain-TCP or loop-TLS connection is served from protocol callbacks
(:mod:`embedmesh.tailscale.derpasyncio`); any other stream (WebSocket, TLS after plain-HTTP
sniffing, other backends) by a reader and a writer task. One ticker task sends every connection
a KeepAlive every 60 s plus jitter (as Go) and ends any connection whose write has not finished
in :data:`WRITE_TIMEOUT` seconds (derper's ``--tcp-write-timeout``; :data:`MESH_WRITE_TIMEOUT`
for a mesh peer); the bounded queues drop the oldest packet first, so a slow client never stalls
the others.

Meshed regions (:mod:`embedmesh.tailscale.derpmesh`): with a ``mesh_key`` the clients that log in
with it are mesh peers (WatchConns, ForwardPacket, ClosePeer; exempt from admission and rate
limits, as in Go), and ``mesh_with`` names the other servers of the region, each reached over a
:class:`~embedmesh.tailscale.derpmesh.MeshLink` that runs beside the connections.

Admission and limits, as derper's (all off by default, so a normal tailnet never meets them):

* ``admit``: an async hook (node key, (host, port)) -> bool asked after a client's ClientInfo box
  opened and before it gets any routing state; a refused client gets no ServerInfo, its connection
  just closes (derper's ``verifyClient``). :func:`~embedmesh.tailscale.derpadmit.url_admitter` asks
  a ``--verify-client-url`` admission controller;
* ``rate_limit`` / ``rate_burst``: a token bucket per client on the bytes it sends (derper's
  per-client receive rate limit): past it the server stops reading from that client until the
  bucket refills, which slows the client down through TCP instead of dropping its packets;
* ``accept_rate`` / ``accept_burst``: new connections per second; one over it is closed at once
  (derper's ``--accept-connection-limit``).

:meth:`DerpServer.shutdown` is the graceful restart: no new connections, a Restarting frame to
every client, a moment for it to go out, then every connection closes.

Usage::

    server = DerpServer(NodePrivate.generate(os.urandom(32)))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 3340)
        ...  # server.port, server.public_key
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import random
import ssl
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

from embedmesh.errors import ConfigError, ListenError
from embedmesh.tailscale import derp, derpws
from embedmesh.tailscale.derpadmit import Admit
from embedmesh.tailscale.derpasyncio import DerpProtocol, FastRelay, ProtocolStream
from embedmesh.tailscale.derpmesh import RETRY_INTERVAL, MeshLink, MeshPeer
from embedmesh.tailscale.keys import KeyFormatError, NodePrivate, NodePublic

log = logging.getLogger(__name__)

#: Seconds a client has to finish the HTTP request and its login (Go's 10-s deadline).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds one write to a client may take before the connection is dropped (derper's default).
WRITE_TIMEOUT = 2.0
#: The same for a mesh peer (Go's ``privilegedWriteTimeout``).
MESH_WRITE_TIMEOUT = 30.0
#: Bytes asked of a stream per read: all a socket has (asyncio reads up to 256 KiB at once), so
#: anyio never splits a chunk (which copies its rest).
READ_SIZE = 1 << 20
#: Up to this many seconds are added to each connection's keepalive interval (as Go), so that the
#: keepalives of clients that connected together spread out.
KEEPALIVE_JITTER = 5.0
#: The largest HTTP request head read before the upgrade.
MAX_REQUEST_HEAD = 16 << 10
_CHALLENGE_CHARS = frozenset(string.ascii_letters + string.digits + ".-_:")


@dataclass
class DerpStats:
    """Counters of a running server."""

    #: Logged-in connections now.
    connections: int = 0
    #: Connections that logged in and were admitted.
    accepted: int = 0
    #: Connections whose login failed (garbage, a box that did not open, no login in time).
    rejected: int = 0
    #: Logged-in clients the admission hook refused (or that it could not answer for).
    refused: int = 0
    #: Connections closed at once because they came faster than the accept limit.
    accept_limited: int = 0
    #: Times a client's reader paused for its receive rate limit (Go's ``rateLimitPerClientWaited``).
    rate_limited: int = 0
    #: WebSocket connections upgraded (Go's ``derp_websocket_accepts``).
    websocket: int = 0


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate chain and key; raises ConfigError (one line)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use {cert} with {key} for TLS: {exc}; give a PEM certificate chain and its private key") from None
    return context


def load_or_create_server_key(path: str | os.PathLike[str] | None) -> NodePrivate:
    """A DERP server's key from ``path``, in derper's config file format (``{"PrivateKey":
    "privkey:..."}``, so one file serves both), created with mode 0600 when missing; None: a new
    key (clients then see a new server key after every restart)."""
    if path is None:
        return NodePrivate.generate(os.urandom(32))
    path = Path(path)
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            return NodePrivate.from_text(doc["PrivateKey"])
        except (OSError, ValueError, KeyError, TypeError, KeyFormatError) as exc:
            raise ConfigError(f"cannot read the DERP key file {path}: {exc}; delete it to make a new key") from None
    key = NodePrivate.generate(os.urandom(32))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"PrivateKey": key.to_text()}, file)
    return key


class DerpServer:
    """A DERP relay. ``private`` is its node key (clients see the public half); ``ssl_context``
    makes it serve HTTPS, and with ``plain_http_too`` plain HTTP as well on the same port (told
    apart by the first byte: a TLS handshake record starts with 0x16, an HTTP request with a
    letter), for clients run with ``TS_DEBUG_USE_DERP_HTTP``; ``queue_depth`` packets per client
    and class are buffered before head drop.

    ``admit`` decides which logged-in clients may stay (default: all); ``rate_limit`` bytes per
    second (0: none) with a burst of ``rate_burst`` bytes (at least one full packet) limits what
    each client sends; ``accept_rate`` connections per second with a burst of ``accept_burst``
    (default: one second's worth) limits new connections. See the module's description.

    Meshed regions (see :mod:`embedmesh.tailscale.derpmesh`): with ``mesh_key`` (the region's 32
    bytes) clients that log in with it are mesh peers, and ``mesh_with`` (or :meth:`add_mesh_peer`)
    names the other servers of the region, each reached over a :class:`~embedmesh.tailscale.derpmesh.MeshLink`
    (``mesh_ssl_context`` verifies those that serve HTTPS; default: the system's CAs).

    On asyncio the connections are served from protocol callbacks (:mod:`embedmesh.tailscale.derpasyncio`:
    each read routed at once, each destination written once per read); ``fast_path=False`` (and
    any other backend) serves them with anyio streams, a reader and a writer task each.
    """

    def __init__(
        self,
        private: NodePrivate,
        *,
        ssl_context: ssl.SSLContext | None = None,
        plain_http_too: bool = False,
        queue_depth: int = derp.PER_CLIENT_SEND_QUEUE_DEPTH,
        write_timeout: float = WRITE_TIMEOUT,
        admit: Admit | None = None,
        rate_limit: float = 0,
        rate_burst: float = 0,
        accept_rate: float = math.inf,
        accept_burst: float | None = None,
        mesh_key: bytes | None = None,
        mesh_with: list[MeshPeer] | tuple[MeshPeer, ...] = (),
        mesh_ssl_context: ssl.SSLContext | None = None,
        mesh_retry_interval: float = RETRY_INTERVAL,
        fast_path: bool = True,
    ) -> None:
        self.private = private
        self.public_key: NodePublic = private.public()
        self.ssl_context = ssl_context
        self.plain_http_too = plain_http_too
        self.core = derp.RelayCore(queue_depth=queue_depth, mesh_key=mesh_key, server_key=self.public_key)
        self.stats = DerpStats()
        self.write_timeout = write_timeout
        self.admit = admit
        self.port: int | None = None
        self.fast_path = fast_path
        #: What wakes each connection's writer (an anyio Event for a writer task; a FastRelay
        #: writes at once) and each mesh link's.
        self._wake: dict[derp.RelayClient | derp.MeshForwarder, anyio.Event | FastRelay] = {}
        self._streams: dict[derp.RelayClient, anyio.abc.ByteStream] = {}
        self._buckets: dict[derp.RelayClient, derp.TokenBucket] = {}
        #: Clients whose writer is in a write (or, on the asyncio path, whose transport is above
        #: its high-water mark), and since when (for the write timeout).
        self._sending: dict[derp.RelayClient, float] = {}
        self._keepalive_due: dict[derp.RelayClient, float] = {}
        self._scopes: dict[derp.RelayClient, anyio.CancelScope] = {}
        self.rate_limit = 0.0
        self.rate_burst = 0.0
        self.update_rate_limits(rate_limit, rate_burst)
        if not accept_rate > 0:
            raise ValueError("accept_rate is a positive number of connections per second (math.inf: no limit)")
        burst = accept_burst if accept_burst is not None else (math.inf if math.isinf(accept_rate) else max(1.0, accept_rate))
        self._accept_bucket = None if math.isinf(accept_rate) else derp.TokenBucket(accept_rate, burst)
        self._accepting: anyio.CancelScope | None = None
        self._stop: anyio.Event | None = None
        self._stopping = False
        self.mesh_ssl_context = mesh_ssl_context
        self.mesh_retry_interval = mesh_retry_interval
        #: The links to the other servers of the region.
        self.mesh_links: list[MeshLink] = []
        #: The task group of the connections, the ticker and the mesh links, while serving.
        self._connections: anyio.abc.TaskGroup | None = None
        for peer in mesh_with:
            self.add_mesh_peer(peer)

    def add_mesh_peer(self, peer: MeshPeer) -> MeshLink:
        """Mesh with another server of the region (at once when serving, else when :meth:`serve` starts).

        Raises ConfigError when this server has no mesh key.
        """
        if self.core.mesh_key is None:
            raise ConfigError("meshing with other DERP servers needs the region's mesh key (--mesh-key-file)")
        link = MeshLink(self, peer, ssl_context=self.mesh_ssl_context, retry_interval=self.mesh_retry_interval)
        self.mesh_links.append(link)
        if self._connections is not None:
            self._connections.start_soon(link.run)
        return link

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a free port) and serve until cancelled.

        ``task_status.started`` reports the bound port. Raises
        :class:`~embedmesh.errors.ListenError` when the port cannot be opened. Returns after
        :meth:`shutdown` has closed every connection.
        """
        try:
            tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenError.from_os_error(exc, host, port) from None
        self._stop = anyio.Event()
        try:
            async with anyio.create_task_group() as connections:
                connections.start_soon(self._ticker)
                with anyio.CancelScope() as accepting:
                    self._accepting = accepting
                    if self.fast_path and _running_asyncio():
                        await self._serve_asyncio(tcp, connections, task_status)
                    else:
                        async with tcp:
                            self._started(tcp, connections, task_status)
                            await tcp.serve(self._accept, task_group=connections)
                # shutdown() closed the listener; the connections (and the mesh links) live until
                # it has told them.
                await self._stop.wait()
                connections.cancel_scope.cancel()
        finally:
            self._connections = None

    def _started(
        self, tcp: anyio.abc.Listener[anyio.abc.SocketStream], connections: anyio.abc.TaskGroup, task_status: anyio.abc.TaskStatus[int]
    ) -> None:
        self.port = int(tcp.extra(anyio.abc.SocketAttribute.local_port))
        self._connections = connections
        for link in self.mesh_links:
            connections.start_soon(link.run)
        task_status.started(self.port)

    async def _serve_asyncio(
        self, tcp: anyio.abc.Listener[anyio.abc.SocketStream], connections: anyio.abc.TaskGroup, task_status: anyio.abc.TaskStatus[int]
    ) -> None:
        """Accept with asyncio's own servers on the sockets anyio bound (one per address), until cancelled."""
        loop = asyncio.get_running_loop()
        listeners = getattr(tcp, "listeners", [tcp])
        sockets = [listener.extra(anyio.abc.SocketAttribute.raw_socket) for listener in listeners]
        # asyncio runs TLS itself, except when plain HTTP shares the port: then _handle looks at
        # the first bytes and wraps the stream (served by the reader and writer tasks).
        context = self.ssl_context if not self.plain_http_too else None
        servers: list[asyncio.Server] = []
        # The protocols' callbacks run outside any task, where anyio cannot tell which loop it is
        # on (a loop not started by anyio.run, such as the control server's): they only queue
        # the connection, and this task starts its handler.
        accepted: asyncio.Queue[ProtocolStream] = asyncio.Queue()

        def on_connection(stream: ProtocolStream) -> None:
            if self._stopping:
                stream.transport.abort()
            else:
                accepted.put_nowait(stream)

        try:
            for sock in sockets:
                servers.append(
                    await loop.create_server(
                        lambda: DerpProtocol(on_connection),
                        sock=sock,
                        ssl=context,
                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
                    )
                )
            self._started(tcp, connections, task_status)
            while True:
                connections.start_soon(self._accept, await accepted.get())
        finally:
            for server in servers:
                server.close()
            while not accepted.empty():  # accepted while the server shuts down
                accepted.get_nowait().transport.abort()

    async def _accept(self, tcp: anyio.abc.ByteStream) -> None:
        if self._accept_bucket is not None and not self._accept_bucket.allow(anyio.current_time()):
            # derper accepts and closes at once rather than accepting slowly: the client hears
            # "no" quickly and the backlog does not fill up.
            self.stats.accept_limited += 1
            await tcp.aclose()
            return
        await self._handle(tcp)

    async def _handle(self, tcp: anyio.abc.ByteStream) -> None:
        try:
            async with tcp:
                stream = tcp
                if self.ssl_context is not None and not _tls_by_loop(tcp):
                    # The TLS handshake counts towards the client's 10 s: a client that stalls in
                    # it holds nothing for long.
                    with anyio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                        if self.plain_http_too:
                            stream = await self._sniff_tls(tcp)
                        else:
                            stream = await TLSStream.wrap(tcp, server_side=True, ssl_context=self.ssl_context, standard_compatible=False)
                    if scope.cancelled_caught:
                        return
                await self._serve_connection(stream)
        except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, ssl.SSLError):
            pass  # the client went away (or its TLS failed): nothing to answer
        except Exception:  # one bad connection must never take the listener down
            log.exception("DERP connection failed")

    async def _sniff_tls(self, stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
        """HTTPS or plain HTTP on one port: look at the first bytes, then hand them back."""
        assert self.ssl_context is not None
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            first = await stream.receive()
            prefixed = _Prefixed(stream, first)
            if first[:1] != b"\x16":
                return prefixed
            return await TLSStream.wrap(
                prefixed, server_side=True, ssl_context=self.ssl_context, standard_compatible=False
            )

    async def _serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        with anyio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            request, rest = await self._read_request(stream)
        if scope.cancelled_caught or request is None:
            return
        upgrade = await self._route_http(stream, request)
        if not upgrade:
            return
        if isinstance(upgrade, derpws.WebSocketAccept):
            await stream.send(upgrade.response)
            websocket = derpws.WebSocketStream(stream, derpws.WebSocketFraming(client=False), rest)
            try:
                if not upgrade.derp:
                    websocket.framing.close(derpws.CloseReason.POLICY_VIOLATION, "client must speak the derp subprotocol")
                    return
                self.stats.websocket += 1
                await self._run_derp(websocket, b"")
            finally:
                await websocket.aclose()
            return
        fast_start = _header(request, b"derp-fast-start") == b"1"
        if not fast_start:
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                + f"Derp-Version: {derp.PROTOCOL_VERSION}\r\nDerp-Public-Key: {self.public_key.raw.hex()}\r\n\r\n".encode()
            )
        await self._run_derp(stream, rest)

    async def _read_request(self, stream: anyio.abc.ByteStream) -> tuple[h11.Request | None, bytes]:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request: h11.Request | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                await _send_simple(stream, 400, b"bad request\n")
                return None, b""
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    return None, b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                continue
            if isinstance(event, h11.Data):
                continue  # a body on GET: read and ignore, as net/http does
            if event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
                if request is None:
                    return None, b""
                # After an upgrade request h11 pauses; what follows the head is DERP already
                # (a fast-start client sends its ClientInfo right behind the request).
                return request, bytes(conn.trailing_data[0])
            return None, b""

    async def _route_http(self, stream: anyio.abc.ByteStream, request: h11.Request) -> bool | derpws.WebSocketAccept | None:
        """Answer plain HTTP requests; True for a DERP upgrade to serve, the accepted handshake
        for a DERP WebSocket, None when the request is answered."""
        path = request.target.split(b"?", 1)[0]
        method = request.method
        if path in (b"/derp/probe", b"/derp/latency-check"):
            if method in (b"GET", b"HEAD"):
                await _send_simple(stream, 200, b"", [(b"Access-Control-Allow-Origin", b"*")], head=method == b"HEAD")
            else:
                await _send_simple(stream, 405, b"bogus probe method\n")
            return None
        if path == b"/generate_204":
            headers = [(b"Cache-Control", b"no-cache, no-store, must-revalidate, no-transform, max-age=0")]
            challenge = _header(request, b"x-tailscale-challenge")
            if challenge and len(challenge) <= 64 and all(chr(c) in _CHALLENGE_CHARS for c in challenge):
                headers.append((b"X-Tailscale-Response", b"response " + challenge))
            await _send_simple(stream, 204, b"", headers)
            return None
        if path == b"/derp":
            upgrade = (_header(request, b"upgrade") or b"").lower()
            offered = b"derp" in b",".join(value for key, value in request.headers if key == b"sec-websocket-protocol")
            if upgrade == b"websocket" and offered:
                # Go looks for "derp" anywhere in the header here, then lets the WebSocket library
                # pick the subprotocol (and closes a socket that did not get it).
                try:
                    return derpws.accept_websocket(request.method, request.headers, request.http_version)
                except derpws.WebSocketHandshakeError as exc:
                    await _send_simple(stream, exc.status, str(exc).encode() + b"\n", exc.headers)
                    return None
            if upgrade in (b"derp", b"websocket"):
                return True
            await _send_simple(stream, 426, b"DERP requires connection upgrade\n")
            return None
        if path == b"/":
            await _send_simple(stream, 200, b"embedmesh DERP server: this is a Tailscale DERP relay (GET /derp)\n")
            return None
        await _send_simple(stream, 404, b"not found\n")
        return None

    async def _run_derp(self, stream: anyio.abc.ByteStream, rest: bytes) -> None:
        conn = derp.ServerConnection(self.private, os.urandom(derp.NONCE_LEN))
        await stream.send(conn.data_to_send())
        auth: derp.ClientAuthenticated | None = None
        events: list[derp.ServerEvent] = []
        with anyio.move_on_after(HANDSHAKE_TIMEOUT):
            data = rest
            while auth is None:
                if not data:
                    data = await stream.receive()
                try:
                    events = conn.receive_data(data)
                except derp.DerpError as exc:
                    self.stats.rejected += 1
                    log.info("DERP login refused: %s", exc)
                    return
                data = b""
                if events:
                    first = events.pop(0)
                    assert isinstance(first, derp.ClientAuthenticated)
                    auth = first
        if auth is None:
            self.stats.rejected += 1
            return
        if self.admit is not None and not self._is_mesh_peer(auth.info) and not await self._admitted(auth.key, stream):
            # As derper: no ServerInfo, no routing state; the connection just closes.
            self.stats.refused += 1
            return
        if self._stopping:
            return
        client = self.core.register(auth.key, auth.info, _remote_address(stream))
        self.stats.accepted += 1
        self.stats.connections += 1
        self._wake[client] = anyio.Event()
        self._streams[client] = stream
        if self.rate_limit and not self._is_mesh_peer(client):
            self._buckets[client] = derp.TokenBucket(self.rate_limit, self.rate_burst)
        self._keepalive_due[client] = anyio.current_time() + _keepalive_interval()
        for watcher in self.core.watchers:
            self._notify(watcher)  # its PeerPresent
        try:
            await stream.send(conn.data_to_send())  # ServerInfo
            if isinstance(stream, ProtocolStream):
                # asyncio: the protocol's callbacks serve it (reads, rate limit, writes) until
                # it ends or this scope is cancelled (write timeout, ClosePeer, shutdown).
                with anyio.CancelScope() as scope:
                    self._scopes[client] = scope
                    await stream.relay(self, client, conn, events)
                return
            async with anyio.create_task_group() as tg:
                self._scopes[client] = tg.cancel_scope
                tg.start_soon(self._writer, client, stream, tg.cancel_scope)
                while True:
                    try:
                        self._handle_events(client, events, anyio.current_time())
                    except derp.DerpError as exc:
                        log.info("DERP client %s: %s", auth.key.short_string(), exc)
                        break
                    try:
                        data = await stream.receive(READ_SIZE)
                        if self._buckets:
                            await self._rate_limit(client, len(data))
                        events, woken = conn.relay_data(data, self.core, client, anyio.current_time())
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, ssl.SSLError):
                        break
                    except derp.DerpError as exc:
                        log.info("DERP client %s: %s", auth.key.short_string(), exc)
                        break
                    for target in woken:
                        self._notify(target)
                tg.cancel_scope.cancel()
        finally:
            self.stats.connections -= 1
            self._wake.pop(client, None)
            self._streams.pop(client, None)
            self._buckets.pop(client, None)
            self._keepalive_due.pop(client, None)
            self._sending.pop(client, None)
            self._scopes.pop(client, None)
            for gone in self.core.unregister(client):
                self._notify(gone)

    def _is_mesh_peer(self, who: derp.RelayClient | derp.ClientInfo) -> bool:
        """Whether a client is a trusted mesh peer (exempt from admission and rate limits, as in
        Go: the admission controller knows only tailnet nodes): a registered client's ``can_mesh``,
        or, before it is registered, whether its ClientInfo carries this server's mesh key (the
        same check the core makes for ``can_mesh``)."""
        if isinstance(who, derp.RelayClient):
            return who.can_mesh
        return self.core.is_mesh_key(who.mesh_key)

    def _write_timeout_for(self, client: derp.RelayClient) -> float:
        return MESH_WRITE_TIMEOUT if client.can_mesh else self.write_timeout

    async def _admitted(self, key: NodePublic, stream: anyio.abc.ByteStream) -> bool:
        assert self.admit is not None
        remote = stream.extra(anyio.abc.SocketAttribute.remote_address, None)
        source = (str(remote[0]), int(remote[1])) if isinstance(remote, tuple) else (str(remote or ""), 0)
        try:
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                return bool(await self.admit(key, source))
            log.info("DERP client %s refused: the admission check took over %g s", key.short_string(), HANDSHAKE_TIMEOUT)
        except Exception:  # a broken hook fails closed
            log.exception("DERP admission check of %s failed: refusing it", key.short_string())
        return False

    async def _rate_limit(self, client: derp.RelayClient, received: int) -> None:
        # Go reserves each frame's length before reading its body; here each read's bytes (frame
        # headers included), which paces the client the same way: while this reader sleeps the
        # socket fills and TCP slows the client down.
        delay = self._rate_delay(client, received, anyio.current_time())
        if delay > 0:
            await anyio.sleep(delay)

    def _rate_delay(self, client: derp.RelayClient, received: int, now: float) -> float:
        """Take a read's bytes from ``client``'s bucket: the seconds to stop reading it before
        handling them (0: go on). The asyncio path pauses the transport that long instead of
        sleeping (see :class:`~embedmesh.tailscale.derpasyncio.FastRelay`)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        # A read may hold many frames (up to READ_SIZE) and the bucket counts at most a burst per
        # reservation: take it a burst at a time (Go reserves per frame, each within the burst);
        # the bucket's debt after the last says how long to wait for all of it.
        left = float(received)
        delay = bucket.reserve(min(left, bucket.burst), now)
        left -= bucket.burst
        while left > 0:
            delay = bucket.reserve(min(left, bucket.burst), now)
            left -= bucket.burst
        if delay > 0:
            self.stats.rate_limited += 1
        return delay

    def update_rate_limits(self, bytes_per_second: float, burst: float = 0) -> None:
        """Set the per-client receive rate limit (0: none), for new and existing clients, as Go's
        ``UpdateRateLimits``; a burst below one full packet (:data:`derp.MIN_RATE_LIMIT_BURST`) is raised to it."""
        if bytes_per_second < 0 or burst < 0:
            raise ValueError("rate limits are not negative")
        self.rate_limit = float(bytes_per_second)
        self.rate_burst = max(float(burst), derp.MIN_RATE_LIMIT_BURST) if bytes_per_second else 0.0
        for client in list(self._streams):
            if not self.rate_limit or self._is_mesh_peer(client):
                self._buckets.pop(client, None)
            else:
                self._buckets[client] = derp.TokenBucket(self.rate_limit, self.rate_burst)

    def _handle_events(self, client: derp.RelayClient, events: list[derp.ServerEvent], now: float) -> None:
        for event in events:
            self.core.note_activity(client)
            if isinstance(event, derp.SendPacket):
                target = self.core.route(client, event.dst, event.packet, now)
                if target is not None:
                    self._notify(target)
            elif isinstance(event, derp.Ping):
                # Go keeps one pending pong; a client that pings faster than that is ignored.
                if not any(isinstance(f, derp.Pong) for f in client.control):
                    client.control.append(derp.Pong(event.data))
                    self._notify(client)
            elif isinstance(event, derp.NotePreferred):
                client.preferred = event.preferred
            # The mesh frames: the core raises DerpError for a client without the mesh key, and
            # the connection ends, as Go's "insufficient permissions".
            elif isinstance(event, derp.ForwardPacket):
                target = self.core.forward(client, event.src, event.dst, event.packet, now)
                if target is not None:
                    self._notify(target)
            elif isinstance(event, derp.WatchConns):
                if self.core.add_watcher(client):
                    self._notify(client)
            elif isinstance(event, derp.ClosePeer):
                for victim in self.core.close_peer(client, event.key):
                    log.info("DERP mesh peer %s closes %s", client.key.short_string(), event.key.short_string())
                    scope = self._scopes.get(victim)
                    if scope is not None:
                        scope.cancel()

    def _notify(self, client: derp.RelayClient | derp.MeshForwarder) -> None:
        # An anyio Event wakes a writer task; a FastRelay writes at once.
        waker = self._wake.get(client)
        if waker is not None:
            waker.set()

    async def _writer(self, client: derp.RelayClient, stream: anyio.abc.ByteStream, scope: anyio.CancelScope) -> None:
        # No timers here: keepalives and the write timeout come from _ticker, one task for all.
        client.writable = True
        try:
            while True:
                wake = self._wake[client]
                assert isinstance(wake, anyio.Event)
                if not client.pending():
                    await wake.wait()
                self._wake[client] = anyio.Event()
                data = client.take_data()
                if not data:
                    continue
                # While a write is under way the queues are bounded; while this task waits for
                # work it takes everything a read queued (see RelayClient.writable).
                client.writable = False
                self._sending[client] = anyio.current_time()
                try:
                    await stream.send(data)
                finally:
                    self._sending.pop(client, None)
                client.writable = True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            self.core.drops[derp.DropReason.WRITE_ERROR] += 1
        finally:
            client.writable = False
        scope.cancel()

    async def _ticker(self) -> None:
        """Every connection's KeepAlive (every 60 s plus jitter, as Go) and write timeout
        (:data:`MESH_WRITE_TIMEOUT` for a mesh peer), checked by one task: a timer per connection
        and per write would cost more than the writes."""
        period = min(1.0, self.write_timeout / 4) if self.write_timeout > 0 else 1.0
        while True:
            await anyio.sleep(period)
            now = anyio.current_time()
            if self.write_timeout > 0:
                for client, started in list(self._sending.items()):
                    if now - started > self._write_timeout_for(client):
                        # derper's --tcp-write-timeout: a client this slow loses its connection.
                        self.core.drops[derp.DropReason.WRITE_ERROR] += 1
                        self._sending.pop(client, None)
                        scope = self._scopes.get(client)
                        if scope is not None:
                            scope.cancel()
            for client, due in list(self._keepalive_due.items()):
                if now >= due:
                    client.control.append(derp.KeepAlive())
                    self._keepalive_due[client] = now + _keepalive_interval()
                    self._notify(client)

    async def restart_notice(self, reconnect_in_ms: int = 0, try_for_ms: int = 5000, smear_ms: int = 0) -> list[derp.RelayClient]:
        """Queue a Restarting frame for every client: reconnect after ``reconnect_in_ms`` plus a
        random part of ``smear_ms`` (so that thousands of clients do not come back at once), and
        keep trying for ``try_for_ms``. Returns the clients told (see :meth:`shutdown`)."""
        clients = list(self._streams)
        for client in clients:
            smear = random.randint(0, smear_ms) if smear_ms > 0 else 0  # spreading load, not a secret
            client.control.append(derp.Restarting(reconnect_in_ms + smear, try_for_ms))
            self._notify(client)
        await anyio.sleep(0)
        return clients

    async def shutdown(
        self, *, reconnect_in_ms: int = 0, try_for_ms: int = 5000, smear_ms: int = 0, grace: float = WRITE_TIMEOUT
    ) -> int:
        """A graceful restart: stop accepting, send every client Restarting (as :meth:`restart_notice`),
        wait up to ``grace`` seconds for those frames to be written, then close every connection;
        :meth:`serve` returns. Returns how many clients were told."""
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        clients = await self.restart_notice(reconnect_in_ms, try_for_ms, smear_ms)
        with anyio.move_on_after(grace):
            while any(not c.closed and (c.control or c in self._sending) for c in clients):
                await anyio.sleep(0.01)
        if self._stop is not None:
            self._stop.set()
        return len(clients)

    def set_health(self, problem: str) -> None:
        """Send a Health frame to every client (empty: healthy again)."""
        for client in list(self._streams):
            client.control.append(derp.Health(problem))
            self._notify(client)


def _keepalive_interval() -> float:
    return derp.KEEPALIVE_INTERVAL + random.uniform(0, KEEPALIVE_JITTER)  # jitter, not a secret


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False  # trio, or another backend
    return True


def _tls_by_loop(stream: anyio.abc.ByteStream) -> bool:
    """Whether asyncio already ran TLS on this accepted connection (its server had the context)."""
    return isinstance(stream, ProtocolStream) and stream.transport.get_extra_info("sslcontext") is not None


def _remote_address(stream: anyio.abc.ByteStream) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The client's IP and port (for PeerPresent), when the stream is a socket."""
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
        if isinstance(address, tuple):
            return ipaddress.ip_address(address[0]), int(address[1])
    except (anyio.TypedAttributeLookupError, ValueError):
        pass
    return None


class _Prefixed(anyio.abc.ByteStream):
    """A stream whose first received bytes were already read (to tell TLS from plain HTTP)."""

    def __init__(self, stream: anyio.abc.ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first: bytes | None = first

    async def receive(self, max_bytes: int = 65536) -> bytes:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


_REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 426: b"Upgrade Required"}


async def _send_simple(
    stream: anyio.abc.ByteStream,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head: bool = False,
) -> None:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
    for key, value in headers or []:
        lines.append(key + b": " + value)
    if status != 204:
        lines.append(b"Content-Type: text/plain; charset=utf-8")
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    with anyio.move_on_after(WRITE_TIMEOUT):
        await stream.send(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body))


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MESH_WRITE_TIMEOUT",
    "WRITE_TIMEOUT",
    "DerpServer",
    "DerpStats",
    "load_or_create_server_key",
    "tls_context",
]
