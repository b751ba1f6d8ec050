"""The runtime loop: real sockets and a real clock driving the sans-IO cores.

One reader task per underlay socket drains every waiting datagram through the WireGuard device and
the overlay interface, then flushes what they produced as one batch. One timer task sleeps until
the cores' earliest deadline, or until an application call moves that deadline closer.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable

import anyio

from embedmesh.netstack.interface import NetworkInterface
from embedmesh.runtime.underlay import UdpUnderlay
from embedmesh.wireguard.device import WireGuardDevice

logger = logging.getLogger("embedmesh.runtime")


class DataPlane:
    """Moves packets between the underlay sockets, the WireGuard device and the overlay interface."""

    def __init__(
        self,
        device: WireGuardDevice,
        interface: NetworkInterface,
        underlay: UdpUnderlay,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.interface = interface
        self.underlay = underlay
        self.clock = clock
        self._wake = anyio.Event()
        self._sleep_until = math.inf
        self._deadline_sources: list[Callable[[], float | None]] = [device.next_deadline]
        self._timeout_handlers: list[Callable[[float], None]] = [device.handle_timeout]

    def add_timer_source(
        self, next_deadline: Callable[[], float | None], handle_timeout: Callable[[float], None]
    ) -> None:
        """Let another core (a transport layer) share the timer task."""
        self._deadline_sources.append(next_deadline)
        self._timeout_handlers.append(handle_timeout)

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for sock in self.underlay.sockets:
                tg.start_soon(self._read_loop, sock)
            tg.start_soon(self._timer_loop)
            task_status.started()

    async def _read_loop(self, sock: socket.socket) -> None:
        drain = self.underlay.drain
        receive_datagram = self.device.receive_datagram
        receive_packet = self.interface.receive
        clock = self.clock
        while True:
            await anyio.wait_readable(sock)
            batch = drain(sock)
            if not batch:
                continue
            now = clock()
            for data, source in batch:
                packet = receive_datagram(data, source, now)
                if packet is not None:
                    receive_packet(packet, now)
            self.kick()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._next_deadline()
            self._wake = anyio.Event()
            self._sleep_until = deadline
            delay = deadline - self.clock()
            if delay > 0:
                with anyio.move_on_after(delay if deadline != math.inf else None):
                    await self._wake.wait()
            self._sleep_until = math.inf
            now = self.clock()
            for handle in self._timeout_handlers:
                handle(now)
            self.flush()

    def _next_deadline(self) -> float:
        deadline = math.inf
        for source in self._deadline_sources:
            at = source()
            if at is not None and at < deadline:
                deadline = at
        return deadline

    # ------------------------------------------------------------------ after every input

    def flush(self) -> None:
        """Send every datagram the device has produced."""
        datagrams = self.device.datagrams_to_send()
        if datagrams:
            self.underlay.send(datagrams)

    def kick(self) -> None:
        """Flush output and wake the timer task if a core now has an earlier deadline.

        Call after anything that fed the cores outside the reader and timer tasks (an
        application send, a ping).
        """
        self.flush()
        if self._next_deadline() < self._sleep_until:
            self._wake.set()
