"""A DERP relay server (anyio): HTTP/1.1 (h11) in front, :mod:`embedmesh.tailscale.derp` behind.

It serves what Tailscale's ``derper`` serves for a client:

* ``GET /derp`` with ``Upgrade: DERP`` (or ``websocket``, which is refused here with 426 for now:
  the WebSocket transport is a later step) and ``Connection: Upgrade``: ``101 Switching Protocols``
  with ``Derp-Version`` and ``Derp-Public-Key``, or no answer at all when the client sent
  ``Derp-Fast-Start: 1``; then the DERP frames;
* ``/derp`` without an upgrade: 426 "DERP requires connection upgrade";
* ``/derp/probe`` and ``/derp/latency-check``: 200 with ``Access-Control-Allow-Origin: *`` for GET
  and HEAD (405 otherwise), for clients that measure latency over HTTP;
* ``/generate_204``: 204 for captive-portal checks, echoing a sane ``X-Tailscale-Challenge`` as
  ``X-Tailscale-Response: response <challenge>``;
* ``/``: a short page saying what this is; anything else 404.

Every authenticated connection has a reader (frames into the :class:`~embedmesh.tailscale.derp.RelayCore`)
and a writer (its queues out, a KeepAlive every 60 s plus jitter, as Go). A write that does not
finish in :data:`WRITE_TIMEOUT` seconds ends that connection (derper's ``--tcp-write-timeout``), and
the bounded queues drop the oldest packet first, so a slow client never stalls the others.

Usage::

    server = DerpServer(NodePrivate.generate(os.urandom(32)))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 3340)
        ...  # server.port, server.public_key
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import ssl
import string
from dataclasses import dataclass

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSListener

from embedmesh.errors import ConfigError, ListenError
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpasyncio import DerpProtocol, FastRelay, ProtocolStream
from embedmesh.tailscale.derpmesh import RETRY_INTERVAL, MeshLink, MeshPeer
from embedmesh.tailscale.keys import NodePrivate, NodePublic

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
#: The largest HTTP request head read before the upgrade.
MAX_REQUEST_HEAD = 16 << 10
_CHALLENGE_CHARS = frozenset(string.ascii_letters + string.digits + ".-_:")


@dataclass
class DerpStats:
    """Counters of a running server."""

    connections: int = 0
    accepted: int = 0
    rejected: int = 0


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate chain and key; raises ConfigError (one line)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use {cert} with {key} for TLS: {exc}; give a PEM certificate chain and its private key") from None
    return context


class DerpServer:
    """A DERP relay. ``private`` is its node key (clients see the public half); ``ssl_context``
    makes it serve HTTPS; ``queue_depth`` packets per client and class are buffered before head drop.

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
        queue_depth: int = derp.PER_CLIENT_SEND_QUEUE_DEPTH,
        write_timeout: float = WRITE_TIMEOUT,
        mesh_key: bytes | None = None,
        mesh_with: list[MeshPeer] | tuple[MeshPeer, ...] = (),
        mesh_ssl_context: ssl.SSLContext | None = None,
        mesh_retry_interval: float = RETRY_INTERVAL,
        fast_path: bool = True,
    ) -> None:
        self.private = private
        self.public_key: NodePublic = private.public()
        self.ssl_context = ssl_context
        self.core = derp.RelayCore(queue_depth=queue_depth, mesh_key=mesh_key, server_key=self.public_key)
        self.stats = DerpStats()
        self.write_timeout = write_timeout
        self.port: int | None = None
        self.fast_path = fast_path
        self._wake: dict[derp.RelayClient | derp.MeshForwarder, anyio.Event | FastRelay] = {}
        self._streams: dict[derp.RelayClient, anyio.abc.ByteStream] = {}
        self._scopes: dict[derp.RelayClient, anyio.CancelScope] = {}
        self.mesh_ssl_context = mesh_ssl_context
        self.mesh_retry_interval = mesh_retry_interval
        #: The links to the other servers of the region.
        self.mesh_links: list[MeshLink] = []
        self._mesh_tg: anyio.abc.TaskGroup | None = None
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
        if self._mesh_tg is not None:
            self._mesh_tg.start_soon(link.run)
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
        :class:`~embedmesh.errors.ListenError` when the port cannot be opened.
        """
        try:
            tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenError.from_os_error(exc, host, port) from None
        if self.fast_path and _running_asyncio():
            await self._serve_asyncio(tcp, task_status)
            return
        listener: anyio.abc.Listener[anyio.abc.ByteStream] = (
            TLSListener(tcp, self.ssl_context, standard_compatible=False) if self.ssl_context is not None else tcp
        )
        async with listener, anyio.create_task_group() as mesh:
            self.port = int(tcp.extra(anyio.abc.SocketAttribute.local_port))
            for link in self.mesh_links:
                mesh.start_soon(link.run)
            self._mesh_tg = mesh
            task_status.started(self.port)
            try:
                await listener.serve(self._handle)
            finally:
                self._mesh_tg = None

    async def _serve_asyncio(self, tcp: anyio.abc.Listener[anyio.abc.SocketStream], task_status: anyio.abc.TaskStatus[int]) -> None:
        """Accept with asyncio's own servers on the sockets anyio bound (one per address)."""
        loop = asyncio.get_running_loop()
        listeners = getattr(tcp, "listeners", [tcp])
        sockets = [listener.extra(anyio.abc.SocketAttribute.raw_socket) for listener in listeners]
        servers: list[asyncio.Server] = []
        async with anyio.create_task_group() as connections, anyio.create_task_group() as mesh:

            def on_connection(stream: ProtocolStream) -> None:
                try:
                    connections.start_soon(self._handle, stream)
                except RuntimeError:  # accepted while the server shuts down
                    stream.transport.abort()

            try:
                for sock in sockets:
                    servers.append(
                        await loop.create_server(
                            lambda: DerpProtocol(on_connection),
                            sock=sock,
                            ssl=self.ssl_context,
                            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context is not None else None,
                        )
                    )
                self.port = int(tcp.extra(anyio.abc.SocketAttribute.local_port))
                for link in self.mesh_links:
                    mesh.start_soon(link.run)
                self._mesh_tg = mesh
                task_status.started(self.port)
                await anyio.sleep_forever()
            finally:
                self._mesh_tg = None
                for server in servers:
                    server.close()

    def _write_timeout_for(self, client: derp.RelayClient) -> float:
        return MESH_WRITE_TIMEOUT if client.can_mesh else self.write_timeout

    async def _handle(self, stream: anyio.abc.ByteStream) -> None:
        try:
            async with stream:
                await self._serve_connection(stream)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, ssl.SSLError):
            pass  # the client went away (or its TLS failed): nothing to answer
        except Exception:  # one bad connection must never take the listener down
            log.exception("DERP connection failed")

    async def _serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        with anyio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            request, rest = await self._read_request(stream)
        if scope.cancelled_caught or request is None:
            return
        if not await self._route_http(stream, request):
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

    async def _route_http(self, stream: anyio.abc.ByteStream, request: h11.Request) -> bool:
        """Answer plain HTTP requests; True when the request is a DERP upgrade to serve."""
        path = request.target.split(b"?", 1)[0]
        method = request.method
        if path in (b"/derp/probe", b"/derp/latency-check"):
            if method in (b"GET", b"HEAD"):
                await _send_simple(stream, 200, b"", [(b"Access-Control-Allow-Origin", b"*")], head=method == b"HEAD")
            else:
                await _send_simple(stream, 405, b"bogus probe method\n")
            return False
        if path == b"/generate_204":
            headers = [(b"Cache-Control", b"no-cache, no-store, must-revalidate, no-transform, max-age=0")]
            challenge = _header(request, b"x-tailscale-challenge")
            if challenge and len(challenge) <= 64 and all(chr(c) in _CHALLENGE_CHARS for c in challenge):
                headers.append((b"X-Tailscale-Response", b"response " + challenge))
            await _send_simple(stream, 204, b"", headers)
            return False
        if path == b"/derp":
            upgrade = (_header(request, b"upgrade") or b"").lower()
            if upgrade == b"derp":
                return True
            await _send_simple(stream, 426, b"DERP requires connection upgrade\n")
            return False
        if path == b"/":
            await _send_simple(stream, 200, b"embedmesh DERP server: this is a Tailscale DERP relay (GET /derp)\n")
            return False
        await _send_simple(stream, 404, b"not found\n")
        return False

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
        client = self.core.register(auth.key, auth.info, _remote_address(stream))
        self.stats.accepted += 1
        self.stats.connections += 1
        self._wake[client] = anyio.Event()
        self._streams[client] = stream
        for watcher in self.core.watchers:
            self._notify(watcher)  # its PeerPresent
        try:
            await stream.send(conn.data_to_send())  # ServerInfo
            if isinstance(stream, ProtocolStream):
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
            self._scopes.pop(client, None)
            for gone in self.core.unregister(client):
                self._notify(gone)

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
        interval = derp.KEEPALIVE_INTERVAL + random.uniform(0, 5)  # jitter, not a secret
        write_timeout = self._write_timeout_for(client)
        deadline = anyio.current_time() + interval
        client.writable = True
        try:
            while True:
                wake = self._wake[client]
                assert isinstance(wake, anyio.Event)
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await wake.wait()
                if wake.is_set():
                    self._wake[client] = anyio.Event()
                if anyio.current_time() >= deadline:
                    client.control.append(derp.KeepAlive())
                    deadline = anyio.current_time() + interval
                data = client.take_data()
                if not data:
                    continue
                # While a write is under way the queues are bounded; while this task waits for
                # work it takes everything a read queued (see RelayClient.writable).
                client.writable = False
                with anyio.fail_after(write_timeout):
                    await stream.send(data)
                client.writable = True
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            self.core.drops[derp.DropReason.WRITE_ERROR] += 1
        finally:
            client.writable = False
        scope.cancel()

    async def restart_notice(self, reconnect_in_ms: int = 0, try_for_ms: int = 5000) -> None:
        """Tell every client the server is restarting (a Restarting frame), for a graceful restart."""
        for client in list(self._streams):
            client.control.append(derp.Restarting(reconnect_in_ms, try_for_ms))
            self._notify(client)
        await anyio.sleep(0)

    def set_health(self, problem: str) -> None:
        """Send a Health frame to every client (empty: healthy again)."""
        for client in list(self._streams):
            client.control.append(derp.Health(problem))
            self._notify(client)


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False  # trio, or another backend
    return True


def _remote_address(stream: anyio.abc.ByteStream) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The client's IP and port (for PeerPresent), when the stream is a socket."""
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
        if isinstance(address, tuple):
            return ipaddress.ip_address(address[0]), int(address[1])
    except (anyio.TypedAttributeLookupError, ValueError):
        pass
    return None


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


__all__ = ["HANDSHAKE_TIMEOUT", "MESH_WRITE_TIMEOUT", "WRITE_TIMEOUT", "DerpServer", "DerpStats", "tls_context"]
