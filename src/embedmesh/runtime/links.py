"""Links: what carries the overlay's IP packets. The runtime reads a link's file descriptors when
they become readable, hands each packet to the stack, and sends the stack's packets through it.

- :class:`WireGuardLink`: the real thing, WireGuard over UDP sockets.
- :class:`TunLink` (Linux, needs CAP_NET_ADMIN): a TUN device, used by the tests and benchmarks to
  put the stack face to face with the kernel's TCP/IP in a network namespace.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Protocol

from embedmesh.runtime.underlay import Endpoint, UdpUnderlay
from embedmesh.wireguard.device import WireGuardDevice

Deliver = Callable[[bytes | memoryview, float], None]


class Link(Protocol):
    """What the runtime needs from a link."""

    def readables(self) -> list[socket.socket | int]: ...
    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None: ...
    def send(self, packet: bytes) -> None: ...
    def flush(self) -> None: ...
    def next_deadline(self) -> float | None: ...
    def handle_timeout(self, now: float) -> None: ...
    def close(self) -> None: ...


#: Datagrams per :meth:`WireGuardLink.read`: about one GRO read (up to 64 datagrams of a bulk
#: transfer). The stack runs over the batch and its output (one ACK per connection, new segments)
#: leaves before the next batch is read, so the peer hears back every ~64 segments rather than once
#: per drained socket buffer.
READ_BATCH = 64


class WireGuardLink:
    """The WireGuard device over the node's UDP underlay."""

    def __init__(
        self,
        device: WireGuardDevice,
        underlay: UdpUnderlay,
        clock: Callable[[], float] = time.monotonic,
        *,
        read_batch: int = READ_BATCH,
    ) -> None:
        self.device = device
        self.underlay = underlay
        self.clock = clock
        self.read_batch = read_batch
        #: Disco packets (Tailscale's path discovery) go here instead of to WireGuard, when set:
        #: it returns the replies to send.
        self.on_disco: Callable[[bytes | memoryview, Endpoint, float], list[tuple[bytes, Endpoint]]] | None = None

    def readables(self) -> list[socket.socket | int]:
        return list(self.underlay.sockets)

    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None:
        assert isinstance(readable, socket.socket)
        receive_datagram = self.device.receive_datagram
        on_disco = self.on_disco
        for data, source in self.underlay.drain(readable, max_datagrams=self.read_batch):
            # One byte tells them apart: WireGuard messages start with 1-4, disco with "T" (0x54).
            if on_disco is not None and data and data[0] == 0x54:
                replies = on_disco(data, source, now)
                if replies:
                    self.underlay.send(replies)
                continue
            packet = receive_datagram(data, source, now)
            if packet is not None:
                deliver(packet, now)

    def send(self, packet: bytes) -> None:
        self.device.send_packet(packet, self.clock())

    def flush(self) -> None:
        datagrams = self.device.datagrams_to_send()
        if datagrams:
            self.underlay.send(datagrams)

    def next_deadline(self) -> float | None:
        return self.device.next_deadline()

    def handle_timeout(self, now: float) -> None:
        self.device.handle_timeout(now)

    def close(self) -> None:
        self.underlay.close()
