"""Links: what carries the overlay's IP packets. The runtime reads a link's file descriptors when
they become readable, hands each packet to the stack, and sends the stack's packets through it.

- :class:`WireGuardLink`: the real thing, WireGuard over UDP sockets.
- :class:`TunLink` (Linux, needs CAP_NET_ADMIN): a TUN device, used by the tests and benchmarks to
  put the stack face to face with the kernel's TCP/IP in a network namespace.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from embedmesh.devicepaths import DevicePaths
from embedmesh.paths import DERP_HOST
from embedmesh.runtime.underlay import Endpoint, UdpUnderlay
from embedmesh.tailscale import disco
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
    """The WireGuard device over the node's UDP underlay.

    With ``paths`` (a tailnet node) the path layer chooses each peer's endpoint: disco datagrams
    go to it, STUN answers to :attr:`on_stun`, and datagrams for DERP addresses to
    :attr:`derp_send`. Without it (static mode) the device is plain WireGuard.
    """

    def __init__(
        self,
        device: WireGuardDevice,
        underlay: UdpUnderlay,
        clock: Callable[[], float] = time.monotonic,
        *,
        read_batch: int = READ_BATCH,
        paths: DevicePaths | None = None,
    ) -> None:
        self.device = device
        self.underlay = underlay
        self.clock = clock
        self.read_batch = read_batch
        self.paths = paths
        #: STUN messages from the socket (answers to the node's binding requests).
        self.on_stun: Callable[[bytes, Endpoint, float], None] | None = None
        #: Takes the datagrams for DERP addresses (the node's DERP connections).
        self.derp_send: Callable[[list[tuple[bytes, Endpoint]]], None] | None = None
        self.counters: Counter[str] = Counter()

    def readables(self) -> list[socket.socket | int]:
        return list(self.underlay.sockets)

    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None:
        assert isinstance(readable, socket.socket)
        receive_datagram = self.device.receive_datagram
        paths = self.paths
        for data, source in self.underlay.drain(readable, max_datagrams=self.read_batch):
            # WireGuard messages start with a type of 1-4 and three zero bytes; disco starts with
            # "T" and a STUN message's second byte is its class (1 for binding messages).
            if paths is not None and (len(data) < 4 or data[0] > 4 or data[1]):
                self._demux(paths, data, source, now)
                continue
            packet = receive_datagram(data, source, now)
            if packet is not None:
                deliver(packet, now)

    def _demux(self, paths: DevicePaths, data: bytes | memoryview, source: Endpoint, now: float) -> None:
        kind = disco.classify(data)
        if kind is disco.PacketKind.DISCO:
            paths.receive_disco(data, source, now)
        elif kind is disco.PacketKind.STUN:
            if self.on_stun is not None:
                self.on_stun(bytes(data), source, now)
            else:
                self.counters["drop_stun_unexpected"] += 1
        else:
            # Geneve (Tailscale's UDP peer relays) is not spoken here; anything else is not
            # WireGuard either, which the device would drop and count the same way.
            self.counters["drop_" + kind.value.replace("-", "_")] += 1

    def send(self, packet: bytes) -> None:
        self.device.send_packet(packet, self.clock())

    def flush(self) -> None:
        paths = self.paths
        if paths is None:
            datagrams = self.device.datagrams_to_send()
            if datagrams:
                self.underlay.send(datagrams)
            return
        datagrams = paths.datagrams_to_send()
        if not datagrams:
            return
        if paths.paths.derp_enabled:
            via_derp = [d for d in datagrams if d[1][0] == DERP_HOST]
            if via_derp:
                datagrams = [d for d in datagrams if d[1][0] != DERP_HOST]
                if self.derp_send is not None:
                    self.derp_send(via_derp)
        if datagrams:
            self.underlay.send(datagrams)

    def next_deadline(self) -> float | None:
        if self.paths is not None:
            return self.paths.next_deadline()
        return self.device.next_deadline()

    def handle_timeout(self, now: float) -> None:
        if self.paths is not None:
            self.paths.handle_timeout(now)
        else:
            self.device.handle_timeout(now)

    def close(self) -> None:
        self.underlay.close()
