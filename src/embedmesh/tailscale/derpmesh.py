"""Meshed DERP regions (anyio): the connection from one DERP server to each other server of its
region, as derper's ``--mesh-with`` makes them.

A region may run several DERP servers; a client connects to any one of them, and the servers
forward to each other so that two clients of the region reach each other wherever they landed.
Every server holds the region's mesh key (derper's ``--mesh-psk-file``: 64 hex digits) and keeps
one :class:`MeshLink` to every other server: a DERP client connection logged in with the server's
own node key and the mesh key, which

* sends WatchConns, so the other server reports every client it has (PeerPresent) and every key
  that leaves it (PeerGone); each reported key gets this link's
  :class:`~embedmesh.tailscale.derp.MeshForwarder` in the local :class:`~embedmesh.tailscale.derp.RelayCore`;
* carries the ForwardPacket frames the core queues on that forwarder (a SendPacket for a client
  connected over there), batched per wake-up;
* reconnects when it breaks (after :data:`FIRST_RETRY` seconds, doubling up to
  :data:`RETRY_INTERVAL`, Go's fixed interval), forgetting what it had
  learned meanwhile (Go's ``RunWatchConnectionLoop``), and stops for good when the other end turns
  out to be this server itself (a region's list may name every server, this one included).

The other direction (the other server's link to this one) arrives as an ordinary DERP connection
whose ClientInfo carries the mesh key; :class:`~embedmesh.tailscale.derpserver.DerpServer`
serves it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio

from embedmesh.hostport import join_host_port, split_host_port
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpClient, DerpConnectError, DerpConnectionClosed, connect_derp

if TYPE_CHECKING:
    from embedmesh.tailscale.derpserver import DerpServer

log = logging.getLogger(__name__)

#: Seconds between attempts to reach a mesh peer (Go's ``retryInterval``), at most.
RETRY_INTERVAL = 5.0
#: The first retry comes sooner, doubling up to :data:`RETRY_INTERVAL`: servers of a region that
#: start together mesh within a second instead of five.
FIRST_RETRY = 0.25
#: Seconds one write of forwarded packets may take before the link is dropped (Go's 5 s per ForwardPacket).
FORWARD_WRITE_TIMEOUT = 5.0


@dataclass(frozen=True)
class MeshPeer:
    """Another DERP server of the region: its ``/derp`` URL, and optionally a host to dial instead
    of the URL's (derper's ``host/dialhost``)."""

    url: str
    dial_host: str | None = None

    def __str__(self) -> str:
        return self.url if self.dial_host is None else f"{self.url} (dialing {self.dial_host})"


def parse_mesh_with(value: str, *, tls: bool) -> list[MeshPeer]:
    """The servers of a ``--mesh-with`` list: comma-separated ``HOST[:PORT][/DIALHOST]`` entries
    (derper's form; HTTPS when this server serves TLS, else plain HTTP) or ``http(s)://`` URLs.

    Raises ValueError (one line) for a malformed entry.
    """
    peers = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{entry!r} is not a DERP URL: use http(s)://HOST[:PORT]/derp or HOST[:PORT]")
            try:
                parts.port  # noqa: B018 (urlsplit checks the port only when asked)
            except ValueError:
                raise ValueError(f"{entry!r} has a bad port") from None
            peers.append(MeshPeer(parts._replace(path=parts.path or "/derp").geturl()))
            continue
        host_part, slash, dial_host = entry.partition("/")
        if slash and (not dial_host or "/" in dial_host):
            raise ValueError(f"{entry!r}: a mesh peer is HOST[:PORT] or HOST[:PORT]/DIALHOST")
        scheme = "https" if tls else "http"
        if host_part.startswith("[") or host_part.count(":") == 1:
            try:
                host, port = split_host_port(host_part)
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
            if not host or not 0 < port < 65536:
                raise ValueError(f"{entry!r}: a mesh peer is HOST:PORT with a port from 1 to 65535")
            netloc = join_host_port(host, port)
        elif host_part and ":" not in host_part:
            netloc = host_part
        else:
            raise ValueError(f"{entry!r}: write an IPv6 address in brackets, [ADDR]:PORT")
        peers.append(MeshPeer(f"{scheme}://{netloc}/derp", dial_host or None))
    return peers


class MeshLink:
    """This server's connection to one other server of the region; :meth:`run` it in a task."""

    def __init__(
        self,
        server: DerpServer,
        peer: MeshPeer,
        *,
        ssl_context: ssl.SSLContext | None = None,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        if server.core.mesh_key is None:
            raise ValueError("a DERP mesh link needs the region's mesh key")
        self.server = server
        self.peer = peer
        self.ssl_context = ssl_context
        self.retry_interval = retry_interval
        #: The forwarder of the live connection (None while disconnected).
        self.forwarder: derp.MeshForwarder | None = None
        #: True once the peer turned out to be this server: the link stopped.
        self.self_connect = False
        self.connects = 0
        self.last_error: str | None = None
        #: Set while connected and watching (for tests and status).
        self.watching = anyio.Event()

    async def run(self) -> None:
        """Connect, watch and forward; reconnect after failures; return only on a self-connect."""
        delay = min(FIRST_RETRY, self.retry_interval)
        while True:
            connects = self.connects
            try:
                await self._run_once()
            except (DerpConnectError, DerpConnectionClosed, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.info("DERP mesh link to %s: %s", self.peer, self.last_error)
            if self.self_connect:
                return
            if self.connects != connects:
                delay = min(FIRST_RETRY, self.retry_interval)  # it was up: start over quickly
            await anyio.sleep(delay)
            delay = min(delay * 2, self.retry_interval)

    async def _run_once(self) -> None:
        server, core = self.server, self.server.core
        info = derp.ClientInfo(mesh_key=core.mesh_key)
        async with connect_derp(
            self.peer.url, server.private, ssl_context=self.ssl_context, info=info, dial_host=self.peer.dial_host
        ) as client:
            if client.server_key == server.public_key:
                self.self_connect = True
                log.info("DERP mesh link to %s reached this server itself; ignoring it", self.peer)
                return
            self.connects += 1
            fwd = derp.MeshForwarder(self.peer.url)
            server._wake[fwd] = anyio.Event()
            self.forwarder = fwd
            try:
                await client.watch_conns()
                self.last_error = None
                self.watching.set()
                log.info("DERP mesh link to %s (%s) is up", self.peer, client.server_key.short_string())
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._writer, client, fwd, tg.cancel_scope)
                    await self._reader(client, fwd)
                    tg.cancel_scope.cancel()
            finally:
                self.forwarder = None
                self.watching = anyio.Event()
                server._wake.pop(fwd, None)
                for woken in core.drop_forwarder(fwd):
                    server._notify(woken)

    async def _reader(self, client: DerpClient, fwd: derp.MeshForwarder) -> None:
        server, core = self.server, self.server.core
        while True:
            try:
                event = await client.receive()
            except DerpConnectionClosed as exc:
                self.last_error = str(exc)
                log.info("DERP mesh link to %s: %s", self.peer, exc)
                return
            if isinstance(event, derp.PeerPresent):
                # Our own link shows up among the peer's clients; packets for our key stay here.
                if event.key != server.public_key:
                    core.add_forwarder(event.key, fwd)
            elif isinstance(event, derp.PeerGone):
                for woken in core.remove_forwarder(event.key, fwd):
                    server._notify(woken)

    async def _writer(self, client: DerpClient, fwd: derp.MeshForwarder, scope: anyio.CancelScope) -> None:
        wakes = self.server._wake
        try:
            while True:
                wake = wakes[fwd]
                assert isinstance(wake, anyio.Event)
                await wake.wait()
                wakes[fwd] = anyio.Event()
                data = fwd.take_data()
                with anyio.fail_after(FORWARD_WRITE_TIMEOUT):
                    await client.send_frames(data)
        except TimeoutError:
            self.last_error = f"forwarding to {self.peer} took over {FORWARD_WRITE_TIMEOUT:g} s"
        except DerpConnectionClosed as exc:
            self.last_error = str(exc)
        log.info("DERP mesh link to %s: %s", self.peer, self.last_error)
        scope.cancel()


__all__ = ["FORWARD_WRITE_TIMEOUT", "RETRY_INTERVAL", "MeshLink", "MeshPeer", "parse_mesh_with"]
