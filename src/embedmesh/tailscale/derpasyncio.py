"""The DERP server's connections on asyncio: one :class:`asyncio.Protocol` per connection.

:class:`~embedmesh.tailscale.derpserver.DerpServer` accepts with ``loop.create_server`` when it
runs on asyncio (and with anyio's listener elsewhere). Each connection is a :class:`DerpProtocol`:

* until the login it buffers what arrives for a :class:`ProtocolStream`, an anyio ``ByteStream``
  over the protocol, so the server's HTTP, upgrade and login code is the same for every backend;
* after the login a :class:`FastRelay` takes over: ``data_received`` hands each read to
  :meth:`~embedmesh.tailscale.derp.ServerConnection.relay_data` (every packet routed through the
  relay core on the spot), and each connection that got packets is written at once, all its
  queued frames in one ``transport.write``. No task wakes per packet or per read, nothing awaits,
  and nothing is copied between the read and the destination's queue but the packet itself.

Back-pressure is Go's: while a destination's transport holds more than its high-water mark
(``pause_writing``), its packets wait in the core's bounded queues, which drop from the head; a
destination paused for longer than the write timeout is disconnected (by the server's ticker, as
a writer task stuck in a write: no timer per connection, and keepalives come from there too).
Readers are paused after the login only for a client over its receive rate limit: its reading
stops until the bucket refills (as the reader task sleeps on the other path); a relay drops
rather than stall its senders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc

from embedmesh.tailscale import derp

if TYPE_CHECKING:
    from embedmesh.tailscale.derpserver import DerpServer

log = logging.getLogger(__name__)

#: Bytes buffered before the login (an HTTP request and a ClientInfo are far smaller) before the
#: protocol stops reading until the handshake code catches up.
HANDSHAKE_BUFFER = 1 << 20


class DerpProtocol(asyncio.Protocol):
    """One accepted connection; ``on_connection`` gets its :class:`ProtocolStream` (start its task there)."""

    def __init__(self, on_connection: Callable[[ProtocolStream], None]) -> None:
        self._on_connection = on_connection
        self.transport: asyncio.Transport | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.writing_paused = False
        self.eof = False
        self.lost = False
        self.exception: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        #: The relay after the login; then every read goes to it.
        self.relay: FastRelay | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's, or another loop's such as uvloop's, which does not
        # subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets whose proto field says TCP, and anyio's
            # listening sockets (so the accepted ones) say 0: without it, Nagle holds each small
            # frame back until the client's delayed ACK (40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_connection(ProtocolStream(self))

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.feed(data)
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > HANDSHAKE_BUFFER and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport: a DERP client that stops sending is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exception = exc
        self._wake()
        self._wake_drain()
        if self.relay is not None:
            self.relay.connection_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.relay is not None:
            self.relay.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drain()
        if self.relay is not None:
            self.relay.resume_writing()

    # ------------------------------------------------------------------ for the stream

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _wake_drain(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def start_relay(self, relay: FastRelay) -> None:
        """Every read goes to ``relay`` from now on, starting with what is buffered."""
        self.relay = relay
        # The transport calls protocol.data_received per read: an instance attribute that is the
        # relay's feed saves a call per read (the method above stays for the handshake).
        self.data_received = relay.feed  # type: ignore[method-assign]
        if self.reading_paused and self.transport is not None:
            self.transport.resume_reading()
            self.reading_paused = False
        while self.buffer and self.relay is relay and not relay.closed:
            chunk = self.buffer.popleft()
            self.buffered -= len(chunk)
            relay.feed(chunk)


class ProtocolStream(anyio.abc.ByteStream):
    """An anyio byte stream over a :class:`DerpProtocol` (for the HTTP request and the login)."""

    def __init__(self, protocol: DerpProtocol) -> None:
        self.protocol = protocol
        assert protocol.transport is not None
        self.transport = protocol.transport

    async def receive(self, max_bytes: int = 65536) -> bytes:
        p = self.protocol
        while not p.buffer:
            if p.exception is not None:
                raise anyio.BrokenResourceError from p.exception
            if p.eof or p.lost:
                raise anyio.EndOfStream
            p.waiter = asyncio.get_running_loop().create_future()
            try:
                await p.waiter
            finally:
                p.waiter = None
        chunk = p.buffer.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            p.buffer.appendleft(rest)
        p.buffered -= len(chunk)
        if p.reading_paused and p.buffered <= HANDSHAKE_BUFFER // 2:
            self.transport.resume_reading()
            p.reading_paused = False
        return chunk

    async def send(self, item: bytes) -> None:
        p = self.protocol
        if p.lost or self.transport.is_closing():
            raise anyio.BrokenResourceError
        self.transport.write(item)
        while p.writing_paused and not p.lost:
            p.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await p.drain_waiter
            finally:
                p.drain_waiter = None
        if p.lost:
            raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        if self.transport.can_write_eof():
            self.transport.write_eof()

    async def aclose(self) -> None:
        # close(), not abort(): an HTTP answer written just before still goes out.
        self.transport.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        info = self.transport.get_extra_info
        return {
            anyio.abc.SocketAttribute.remote_address: lambda: info("peername"),
            anyio.abc.SocketAttribute.local_address: lambda: info("sockname"),
            anyio.abc.SocketAttribute.raw_socket: lambda: info("socket"),
        }

    async def relay(self, server: DerpServer, client: derp.RelayClient, conn: derp.ServerConnection, events: list[derp.ServerEvent]) -> None:
        """Serve the logged-in ``client`` from the protocol's callbacks until the connection ends."""
        await FastRelay(server, client, conn, self.protocol).run(events)


class FastRelay:
    """The relay side of one logged-in connection on asyncio (see the module docstring).

    It is what the server wakes for ``client`` (:meth:`set` writes its queued frames).
    """

    def __init__(self, server: DerpServer, client: derp.RelayClient, conn: derp.ServerConnection, protocol: DerpProtocol) -> None:
        self.server = server
        self.client = client
        self.conn = conn
        self.protocol = protocol
        assert protocol.transport is not None
        self.transport = protocol.transport
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.paused = protocol.writing_paused
        self._done = asyncio.Event()
        #: Reads that came while reading is paused for the rate limit, in order (a transport may
        #: deliver one more after pause_reading), and the timer that resumes.
        self._held: deque[bytes] | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        # Bound once: these run per read and per write.
        self._take_data = client.take_data
        self._write = self.transport.write
        self._relay_data = conn.relay_data
        self._core = server.core
        self._wakers = server._wake
        self._buckets = server._buckets
        self._sending = server._sending
        self._time = self.loop.time

    async def run(self, events: list[derp.ServerEvent]) -> None:
        server = self.server
        server._wake[self.client] = self
        try:
            if events:
                self._handle(events, self.loop.time())
            if not self.closed:
                if self.paused:
                    self.pause_writing()
                self._set_writable()
                self.set()
                self.protocol.start_relay(self)
            if not self.closed:
                await self._done.wait()
        finally:
            self.protocol.relay = None
            self.protocol.__dict__.pop("data_received", None)
            self._close()
            self.transport.abort()

    # ------------------------------------------------------------------ reads

    def feed(self, data: bytes) -> None:
        """One read of the client's stream (``data_received``)."""
        if self.closed:
            return
        if self._held is not None:
            self._held.append(data)
            return
        now = self._time()
        if self._buckets and self.client in self._buckets:
            delay = self.server._rate_delay(self.client, len(data), now)
            if delay > 0:
                # Over its rate limit: this read waits, and nothing more is read meanwhile, so
                # the socket fills and TCP slows the client down.
                self._held = deque([data])
                self.transport.pause_reading()
                self._rate_timer = self.loop.call_later(delay, self._rate_resume)
                return
        self._route(data, now)

    def _rate_resume(self) -> None:
        self._rate_timer = None
        held, self._held = self._held, None
        if held is None or self.closed:
            return
        # The first read has paid for itself; the others queue for the bucket again.
        self._route(held.popleft(), self._time())
        while held and not self.closed:
            self.feed(held.popleft())
            if self._held is not None:
                self._held.extend(held)  # paused again: the rest waits behind it
                return
        if not self.closed:
            self.transport.resume_reading()

    def _route(self, data: bytes, now: float) -> None:
        try:
            events, woken = self._relay_data(data, self._core, self.client, now)
        except derp.DerpError as exc:
            log.info("DERP client %s: %s", self.client.key.short_string(), exc)
            self._close()
            return
        wakers = self._wakers
        for target in woken:
            waker = wakers.get(target)  # as DerpServer._notify, inline: this runs per read
            if waker is not None:
                waker.set()
        if events:
            self._handle(events, now)

    def _handle(self, events: list[derp.ServerEvent], now: float) -> None:
        try:
            self.server._handle_events(self.client, events, now)
        except derp.DerpError as exc:
            log.info("DERP client %s: %s", self.client.key.short_string(), exc)
            self._close()

    # ------------------------------------------------------------------ writes

    def _set_writable(self) -> None:
        self.client.writable = not self.paused and not self.closed

    def set(self) -> None:
        """Write every frame queued for the client (the server's wake-up); while the transport is
        above its high-water mark they stay queued, and the queues drop from the head."""
        if self.paused or self.closed:
            return
        data = self._take_data()
        if data:
            self._write(data)

    def pause_writing(self) -> None:
        self.paused = True
        self._set_writable()
        if not self.closed and self.client not in self._sending:
            # As a writer task stuck in a write: the server's ticker ends the connection when
            # this lasts longer than the write timeout.
            self._sending[self.client] = self._time()

    def resume_writing(self) -> None:
        self.paused = False
        self._set_writable()
        self._sending.pop(self.client, None)
        self.set()

    # ------------------------------------------------------------------ the end

    def connection_lost(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.writable = False
        self._sending.pop(self.client, None)
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None
        self._held = None
        self._done.set()
        self.transport.abort()


__all__ = ["DerpProtocol", "FastRelay", "ProtocolStream"]
