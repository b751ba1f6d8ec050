"""A DERP relay client (anyio) over :mod:`embedmesh.tailscale.derp`.

It connects as Tailscale's ``derphttp.Client`` does: TCP (TLS for ``https://`` URLs), ``GET /derp``
with ``Upgrade: DERP`` and ``Connection: Upgrade``, the ``101`` answer, then the DERP login with the
node's private key. Packets go to peers by node key; what the server sends arrives as events::

    async with connect_derp("http://127.0.0.1:3340/derp", node_private) as client:
        await client.send(peer_node_public, wireguard_packet)
        event = await client.receive()        # PacketReceived(src, packet), PeerGone, Health, ...
        rtt = await client.ping()              # a round trip to the server, in seconds

With ``websocket=True`` (or a ``ws://`` / ``wss://`` URL) the same DERP stream travels in the binary
messages of a WebSocket (subprotocol ``derp``), as derphttp does in browsers and behind proxies that
pass only WebSockets.

A background task reads the connection: it answers the server's Pings at once and queues every
other event for :meth:`DerpClient.receive` (up to :data:`EVENT_BACKLOG` of them; the reader waits
for the application beyond that, so an application that stops reading stops the connection's
reads, never its memory). There is no reconnect: when the connection ends :meth:`~DerpClient.receive`
raises :class:`DerpConnectionClosed`.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute, TLSStream

from embedmesh.errors import EmbedmeshError
from embedmesh.tailscale import derp, derpws
from embedmesh.tailscale.keys import NodePrivate, NodePublic

#: Events buffered for :meth:`DerpClient.receive` before the reader waits.
EVENT_BACKLOG = 256
MAX_RESPONSE_HEAD = 16 << 10


class DerpConnectError(EmbedmeshError, OSError):
    """The DERP server could not be reached, or refused the upgrade or the login."""


class DerpConnectionClosed(EmbedmeshError, ConnectionError):
    """The DERP connection ended (the server closed it, or it failed)."""


class DerpClient:
    """One logged-in connection to a DERP server. Make it with :func:`connect_derp`."""

    def __init__(self, stream: anyio.abc.ByteStream, conn: derp.ClientConnection, url: str) -> None:
        self._stream = stream
        self._conn = conn
        self.url = url
        self._send_lock = anyio.Lock()
        self._events_in, self._events_out = anyio.create_memory_object_stream[derp.ClientEvent](EVENT_BACKLOG)
        self._pings: dict[bytes, anyio.Event] = {}
        self._closed_reason: str | None = None
        #: The server's ServerInfo once its box opened (the login is complete).
        self.server_info: derp.ServerInfo | None = None

    @property
    def public_key(self) -> NodePublic:
        """Our node key, as peers address us."""
        return self._conn.public

    @property
    def server_key(self) -> NodePublic:
        """The server's public key (from its greeting)."""
        assert self._conn.server_key is not None
        return self._conn.server_key

    async def send(self, dst: NodePublic, packet: bytes) -> None:
        """Relay ``packet`` (at most 64 KiB) to the node with key ``dst``.

        The server drops it silently when ``dst`` is not connected (a disco packet then earns a
        :class:`~embedmesh.tailscale.derp.PeerGone` event). Raises ValueError for a packet over
        64 KiB and :class:`DerpConnectionClosed` when the connection is gone.
        """
        self._conn.send_packet(dst, packet)
        await self._flush()

    async def send_many(self, packets: list[tuple[NodePublic, bytes]]) -> None:
        """Relay several packets with one write (as :meth:`send` each)."""
        for dst, packet in packets:
            self._conn.send_packet(dst, packet)
        await self._flush()

    async def watch_conns(self) -> None:
        """Ask for a PeerPresent of every client of the server, now and later, and a PeerGone when
        one leaves (mesh peers only: the server ends the connection of a client without the mesh key).
        """
        self._conn.watch_conns()
        await self._flush()

    async def forward(self, src: NodePublic, dst: NodePublic, packet: bytes) -> None:
        """Hand the server ``packet`` from ``src`` (a client of another server of the region) for its
        client ``dst``: a ForwardPacket (mesh peers only).
        """
        self._conn.forward_packet(src, dst, packet)
        await self._flush()

    async def close_peer(self, key: NodePublic) -> None:
        """Ask the server to close every connection of ``key`` (mesh peers only)."""
        self._conn.close_peer(key)
        await self._flush()

    async def send_frames(self, frames: bytes) -> None:
        """Write whole, already encoded DERP frames (for a relay that batches ForwardPackets)."""
        if frames:
            self._conn.send_encoded(frames)
            await self._flush()

    async def note_preferred(self, preferred: bool = True) -> None:
        """Tell the server whether it is this node's home DERP server."""
        self._conn.note_preferred(preferred)
        await self._flush()

    async def ping(self, timeout: float = 5.0) -> float:
        """A Ping/Pong round trip to the server; returns the round trip in seconds.

        Raises TimeoutError when no Pong arrives in ``timeout`` seconds.
        """
        data = os.urandom(8)
        arrived = anyio.Event()
        self._pings[data] = arrived
        start = time.monotonic()
        try:
            self._conn.send_ping(data)
            await self._flush()
            with anyio.fail_after(timeout):
                await arrived.wait()
        finally:
            self._pings.pop(data, None)
        return time.monotonic() - start

    async def receive(self) -> derp.ClientEvent:
        """The next event from the server: :class:`~embedmesh.tailscale.derp.PacketReceived`,
        ``PeerGone``, ``PeerPresent``, ``Health``, ``Restarting``, ``KeepAlive``, ``PingReceived``
        (already answered) or ``ServerInfoReceived``. Raises :class:`DerpConnectionClosed` at the end.
        """
        try:
            return await self._events_out.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise DerpConnectionClosed(self._closed_reason or f"the DERP connection to {self.url} ended") from None

    async def packets(self) -> AsyncIterator[tuple[NodePublic, bytes]]:
        """Every relayed packet as ``(source node key, packet)``, skipping other events, until the end."""
        while True:
            try:
                event = await self.receive()
            except DerpConnectionClosed:
                return
            if isinstance(event, derp.PacketReceived):
                yield event.src, event.packet

    async def aclose(self) -> None:
        """Close the connection now (the ``connect_derp`` block may go on; :meth:`receive` then
        raises :class:`DerpConnectionClosed`)."""
        self._closed_reason = self._closed_reason or f"the DERP connection to {self.url} was closed"
        await self._stream.aclose()

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if not data:
            return
        if self._closed_reason is not None:
            raise DerpConnectionClosed(self._closed_reason)
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError) as exc:
                self._closed_reason = f"the DERP connection to {self.url} failed: {exc or type(exc).__name__}"
                raise DerpConnectionClosed(self._closed_reason) from None

    async def _reader(self, first: bytes) -> None:
        try:
            data = first
            while True:
                if data:
                    for event in self._conn.receive_data(data):
                        if isinstance(event, derp.Pong):
                            waiter = self._pings.get(event.data)
                            if waiter is not None:
                                waiter.set()
                            continue
                        if isinstance(event, derp.ServerInfoReceived):
                            self.server_info = event.info
                        await self._events_in.send(event)
                    await self._flush()  # Pongs to the server's Pings
                data = await self._stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            self._closed_reason = self._closed_reason or f"the DERP server {self.url} closed the connection"
        except derp.DerpError as exc:
            self._closed_reason = f"the DERP server {self.url} sent a bad frame: {exc}"
        except DerpConnectionClosed:
            pass
        finally:
            self._events_in.close()


async def _upgrade(stream: anyio.abc.ByteStream, host: str, path: str, url: str, websocket_key: bytes | None = None) -> bytes:
    """Send the upgrade request (to DERP, or to a WebSocket with ``websocket_key``), read the 101;
    returns the bytes that followed it."""
    upgrade = derpws.client_handshake_headers(websocket_key) if websocket_key is not None else [("Upgrade", "DERP"), ("Connection", "Upgrade")]
    request = h11.Request(method="GET", target=path, headers=[("Host", host), ("User-Agent", "embedmesh"), *upgrade])
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    data = client.send(request)
    assert data is not None
    await stream.send(data)
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise DerpConnectError(f"{url} did not answer with HTTP ({exc}): is it a DERP server?") from None
        if event is h11.NEED_DATA:
            try:
                client.receive_data(await stream.receive())
            except anyio.EndOfStream:
                client.receive_data(b"")
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            if websocket_key is not None:
                try:
                    derpws.check_handshake_response(websocket_key, event.headers)
                except derpws.WebSocketHandshakeError as exc:
                    raise DerpConnectError(f"{url}: {exc}") from None
            return bytes(client.trailing_data[0])
        if isinstance(event, h11.Response | h11.InformationalResponse):
            raise DerpConnectError(f"{url} refused the DERP upgrade (HTTP {event.status_code}): check the URL (it ends in /derp)")
        raise DerpConnectError(f"{url} closed the connection during the DERP upgrade")


def derp_tls_context(
    ssl_context: ssl.SSLContext | None = None, *, insecure: bool = False, pinned_cert_sha256: str | None = None
) -> ssl.SSLContext:
    """The TLS context for a DERP node as Tailscale's client chooses it: ``ssl_context`` (default:
    the system's CAs), or no verification at all for a node marked ``InsecureForTests``
    (``insecure``) or pinned by ``CertName: "sha256-raw:<hex>"`` (then the hash is the trust anchor:
    check it with :func:`has_pinned_certificate` after the handshake)."""
    if insecure or pinned_cert_sha256 is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl_context if ssl_context is not None else ssl.create_default_context()


def has_pinned_certificate(stream: TLSStream, pinned_cert_sha256: str | None) -> bool:
    """Whether the server's certificate is the pinned one (True when nothing is pinned)."""
    if pinned_cert_sha256 is None:
        return True
    der = stream.extra(TLSAttribute.peer_certificate_binary, None)
    return der is not None and hashlib.sha256(der).hexdigest() == pinned_cert_sha256.lower()


@asynccontextmanager
async def connect_derp(
    url: str,
    private: NodePrivate,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    info: derp.ClientInfo | None = None,
    dial_host: str | None = None,
    pinned_cert_sha256: str | None = None,
    websocket: bool = False,
) -> AsyncIterator[DerpClient]:
    """Connect to the DERP server at ``url`` (``http://`` or ``https://``, path default ``/derp``)
    and log in with ``private``; the connection closes when the block ends.

    ``ssl_context`` verifies an https server (default: the system's CAs). ``dial_host`` connects
    to that address instead of the URL's host (a DERP map's pinned IPv4/IPv6, or derper's
    ``--mesh-with host/dialhost``), while TLS and the Host header still name the URL's host.
    ``pinned_cert_sha256`` (hex) accepts exactly the server
    certificate with that SHA-256 instead of a CA-signed one (a DERP map's
    ``CertName: "sha256-raw:<hex>"`` for a self-signed certificate, as Tailscale's client).
    ``websocket`` carries DERP in a WebSocket (implied by a ``ws://`` or ``wss://`` URL). Raises
    :class:`DerpConnectError` (one line saying why) when the server cannot be reached, refuses
    the upgrade, or the login fails within ``timeout`` seconds.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise DerpConnectError(f"{url} is not a DERP URL: use http://HOST[:PORT]/derp or https://HOST[:PORT]/derp")
    websocket = websocket or parts.scheme in ("ws", "wss")
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise DerpConnectError(f"{url} has a bad port") from None
    path = parts.path or "/derp"
    host_header = parts.netloc.rpartition("@")[2]
    try:
        with anyio.fail_after(timeout):
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(dial_host or host, port)
    except (OSError, TimeoutError) as exc:
        raise DerpConnectError(f"cannot reach the DERP server {url}: {exc or 'timed out'}") from None
    try:
        with anyio.fail_after(timeout):
            if secure:
                context = derp_tls_context(ssl_context, pinned_cert_sha256=pinned_cert_sha256)
                stream = await TLSStream.wrap(stream, hostname=host, ssl_context=context, standard_compatible=False)
                if not has_pinned_certificate(stream, pinned_cert_sha256):
                    raise DerpConnectError(
                        f"the DERP server {url} presented a certificate that is not the one the DERP "
                        "map pins (CertName sha256-raw): refusing it"
                    )
            websocket_key = os.urandom(16) if websocket else None
            rest = await _upgrade(stream, host_header, path, url, websocket_key)
            if websocket:
                stream = derpws.WebSocketStream(stream, derpws.WebSocketFraming(client=True), rest)
                rest = b""
            conn = derp.ClientConnection(private, os.urandom(derp.NONCE_LEN), info=info)
            client = DerpClient(stream, conn, url)
            events = conn.receive_data(rest)
            while conn.server_key is None:
                events += conn.receive_data(await stream.receive())
            await client._flush()  # our ClientInfo
            # The login is done when the server's box opens; wait for it so a refusal is an error here.
            while not conn.logged_in:
                events += conn.receive_data(await stream.receive())
    except DerpConnectError:
        await stream.aclose()
        raise
    except TimeoutError:
        await stream.aclose()
        raise DerpConnectError(f"the DERP server {url} did not finish the login in {timeout:g} s") from None
    except (derp.DerpError, anyio.EndOfStream, anyio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        await stream.aclose()
        raise DerpConnectError(f"the DERP login to {url} failed: {exc or type(exc).__name__}") from None
    except BaseException:
        await stream.aclose()
        raise
    for event in events:
        if isinstance(event, derp.ServerInfoReceived):
            client.server_info = event.info
        if not isinstance(event, derp.Connected):
            client._events_in.send_nowait(event)
    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(client._reader, b"")
        try:
            yield client
        finally:
            tg.cancel_scope.cancel()


__all__ = ["EVENT_BACKLOG", "DerpClient", "DerpConnectError", "DerpConnectionClosed", "connect_derp"]
