"""anyio sockets over the overlay stack: ``TcpStream`` (a ``ByteStream``), ``TcpListener`` (a
``Listener``) and ``UdpSocket`` (a ``UDPSocket``).

The sans-IO TCP and UDP cores hold all protocol state; these classes only wait. A waiting task
sleeps on an ``anyio.Event``; after every batch of packets, timer run or application call the
runtime collects the connections that changed (``TcpLayer.pop_changed``) and sets their events, so
the cost of waking is per batch, not per packet, and idle connections cost nothing.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from typing import Any

import anyio
import anyio.abc
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import SocketAttribute

from embedmesh.netstack.stack import Netstack
from embedmesh.netstack.tcp.connection import TcpConnection
from embedmesh.netstack.tcp.listener import TcpListener as TcpListenerState
from embedmesh.netstack.udp import UdpSocketState
from embedmesh.wire.ip import bytes_to_address

Kick = Callable[[], None]
_clock = time.monotonic


def _address(raw: bytes, port: int) -> tuple[str, int]:
    return (str(bytes_to_address(raw)), port)


class _Waiter:
    """An event that can be waited on repeatedly: replaced each time it fires."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: anyio.Event | None = None

    async def wait(self) -> None:
        if self.event is None:
            self.event = anyio.Event()
        await self.event.wait()

    def fire(self) -> None:
        event = self.event
        if event is not None:
            self.event = None
            event.set()


class TcpStream(anyio.abc.ByteStream):
    """A TCP connection over the mesh, as an anyio ``ByteStream`` with half-close.

    ``receive`` raises ``anyio.EndOfStream`` after the peer's FIN and ``anyio.BrokenResourceError``
    after a reset; ``send`` waits while the send buffer is full (backpressure).
    """

    def __init__(self, connection: TcpConnection, kick: Kick) -> None:
        self._conn = connection
        self._kick = kick
        self._waiter = _Waiter()
        self._closed = False
        connection.user_data = self
        # Like Go (and tsnet), small writes go out at once; call set_nodelay(False) for Nagle.
        connection.set_nodelay(True)

    # -- notifications from the runtime
    def _changed(self) -> None:
        self._waiter.fire()

    @property
    def connection(self) -> TcpConnection:
        """The sans-IO connection underneath (state, counters, RTT)."""
        return self._conn

    def set_nodelay(self, enabled: bool) -> None:
        """Disable (True, the default) or enable (False) Nagle's algorithm."""
        self._conn.set_nodelay(enabled, _clock())
        self._kick()

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError
        error = self._conn.error
        if error is not None:
            raise BrokenResourceError(f"connection {error}")

    async def receive(self, max_bytes: int = 65536) -> bytes:
        conn = self._conn
        while True:
            if self._closed:
                raise ClosedResourceError
            if conn.readable:
                data = conn.receive(max_bytes, _clock())
                # Reading may open the window: let the window update go out now.
                self._kick()
                return data
            if conn.at_eof:
                raise EndOfStream
            if conn.error is not None:
                raise BrokenResourceError(f"connection {conn.error}")
            await self._waiter.wait()

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        view = memoryview(item)
        conn = self._conn
        while True:
            self._check()
            try:
                sent = conn.send(view, _clock()) if view else 0
            except BrokenPipeError:
                raise ClosedResourceError("the stream was shut down for sending (send_eof)") from None
            except OSError as exc:
                raise BrokenResourceError(str(exc)) from exc
            self._kick()
            view = view[sent:]
            if not view:
                return
            await self._waiter.wait()

    async def send_eof(self) -> None:
        if self._closed:
            raise ClosedResourceError
        self._conn.shutdown(_clock())
        self._kick()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close(_clock())
        self._kick()
        self._waiter.fire()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        conn = self._conn
        return {
            SocketAttribute.family: lambda: 2 if len(conn.local_addr) == 4 else 10,
            SocketAttribute.local_address: lambda: _address(conn.local_addr, conn.local_port),
            SocketAttribute.local_port: lambda: conn.local_port,
            SocketAttribute.remote_address: lambda: _address(conn.remote_addr, conn.remote_port),
            SocketAttribute.remote_port: lambda: conn.remote_port,
        }


class TcpListener(anyio.abc.Listener[TcpStream]):
    """Accepts TCP connections on a mesh address and port (an anyio ``Listener``)."""

    def __init__(self, state: TcpListenerState, kick: Kick) -> None:
        self._state = state
        self._kick = kick
        self._waiter = _Waiter()
        self._closed = False
        state.user_data = self

    def _changed(self) -> None:
        self._waiter.fire()

    @property
    def port(self) -> int:
        return self._state.port

    async def accept(self) -> TcpStream:
        while True:
            if self._closed:
                raise ClosedResourceError
            conn = self._state.accept()
            if conn is not None:
                return TcpStream(conn, self._kick)
            await self._waiter.wait()

    async def serve(
        self,
        handler: Callable[[TcpStream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Accept connections and run ``handler(stream)`` for each in its own task, until the
        listener is closed; each stream is closed when its handler returns."""

        async def run(stream: TcpStream) -> None:
            async with stream:
                await handler(stream)

        async with anyio.create_task_group() as own:
            group = task_group or own
            while True:
                try:
                    stream = await self.accept()
                except ClosedResourceError:
                    return  # closed by aclose(): stop accepting; running handlers finish
                group.start_soon(run, stream)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.close(_clock())
        self._kick()
        self._waiter.fire()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        state = self._state
        local = state.local_addr
        return {
            SocketAttribute.local_port: lambda: state.port,
            SocketAttribute.local_address: lambda: (
                str(bytes_to_address(local)) if local else "",
                state.port,
            ),
        }


class UdpSocket(anyio.abc.UnreliableObjectStream[tuple[bytes, tuple[str, int]]]):
    """A UDP socket on a mesh address, with the interface of anyio's ``UDPSocket``:
    ``sendto(data, host, port)``, ``send((data, (host, port)))``, ``receive() -> (data, (host, port))``
    and the socket attributes. (It is not an ``anyio.abc.UDPSocket`` only because there is no OS
    socket underneath to expose as ``raw_socket``.)"""

    def __init__(self, state: UdpSocketState, kick: Kick) -> None:
        self._state = state
        self._kick = kick
        self._waiter = _Waiter()
        self._closed = False
        state.on_readable = self._waiter.fire

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        while True:
            if self._closed:
                raise ClosedResourceError
            item = self._state.receive()
            if item is not None:
                data, (source, port) = item
                return data, _address(source, port)
            await self._waiter.wait()

    async def send(self, item: tuple[bytes, tuple[str, int]]) -> None:
        data, (host, port) = item
        if self._closed:
            raise ClosedResourceError
        try:
            destination = ip_address(host).packed
        except ValueError:
            raise OSError(errno.EINVAL, f"{host!r} is not an IP address") from None
        self._state.send(bytes(data), destination, port)
        self._kick()
        await anyio.lowlevel.checkpoint()

    async def sendto(self, data: bytes, host: str, port: int) -> None:
        await self.send((data, (host, port)))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.close()
        self._waiter.fire()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        state = self._state
        return {
            SocketAttribute.local_port: lambda: state.local_port,
            SocketAttribute.local_address: lambda: (
                str(bytes_to_address(state.local_address)) if state.local_address else "",
                state.local_port,
            ),
        }


class SocketLayer:
    """Creates sockets on a stack and wakes them after each burst of activity."""

    def __init__(self, stack: Netstack, kick: Kick) -> None:
        self.stack = stack
        self.kick = kick

    def dispatch(self) -> None:
        """Wake the waiters of every connection and listener that changed (runtime callback)."""
        for item in self.stack.tcp.pop_changed():
            wrapper = item.user_data
            if wrapper is not None:
                wrapper._changed()  # type: ignore[attr-defined]

    def listen_tcp(self, local: bytes | None, port: int, backlog: int) -> TcpListener:
        return TcpListener(self.stack.tcp.listen(local, port, backlog), self.kick)

    async def dial_tcp(self, remote: bytes, port: int, timeout: float | None) -> TcpStream:
        local = self.stack.interface.source_for(remote)
        conn = self.stack.tcp.connect(local, remote, port, _clock())
        stream = TcpStream(conn, self.kick)
        self.kick()
        where = f"{bytes_to_address(remote)}:{port}"
        try:
            with anyio.fail_after(timeout):
                while not conn.established:
                    if conn.error == "refused":
                        raise ConnectionRefusedError(errno.ECONNREFUSED, f"connection to {where} refused")
                    if conn.error is not None:
                        raise TimeoutError(f"connection to {where} failed: {conn.error}")
                    await stream._waiter.wait()
        except TimeoutError as exc:
            conn.abort(_clock())
            self.kick()
            if exc.args:
                raise
            raise TimeoutError(f"connection to {where} timed out after {timeout:g} s") from None
        except BaseException:
            conn.abort(_clock())
            self.kick()
            raise
        return stream

    def bind_udp(self, local: bytes | None, port: int) -> UdpSocket:
        return UdpSocket(self.stack.udp.bind(local, port), self.kick)
