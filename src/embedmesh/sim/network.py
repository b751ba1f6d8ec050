"""A simulated underlay on a virtual clock: hosts exchange datagrams with loss, delay, jitter,
reordering and duplication drawn from one seeded ``random.Random``, so a run is reproducible from
its seed.

A host is any sans-IO core with the underlay side of the device interface
(:class:`SimHost`): the WireGuard device itself, or a :class:`~embedmesh.sim.node.SimNode` that
adds the overlay interface on top.

Hosts live on :class:`Segment`\\ s: the internet (:attr:`SimNetwork.internet`, where hosts and
servers have public addresses) and the LAN behind each NAT box (:meth:`SimNetwork.add_nat`, see
:mod:`embedmesh.sim.nat`). A datagram to an address on the sender's own segment goes straight
there; anything else leaves through the segment's NAT (translated when it is sent: the NAT is next
to the sender) and is filtered by the NATs in front of its destination when it arrives (so a
pinhole opened while a packet was in flight lets it in, as in a real simultaneous open). Addresses
are unique across the whole network (like the NAT lab's 10.240.n.0/24 LANs); a private address
sent over the internet reaches nobody. The impairments apply once per datagram, end to end.

Besides datagrams the network runs timed callbacks (:meth:`SimNetwork.call_at`): the DERP relay
and the control server of :mod:`embedmesh.sim.tailnet` deliver through them.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from embedmesh.sim.nat import NatBox, NatKind

Endpoint = tuple[str, int]


class SimHost(Protocol):
    """What the simulated network needs from a host."""

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> object: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]: ...
    def next_deadline(self) -> float | None: ...
    def handle_timeout(self, now: float) -> None: ...


@dataclass(slots=True)
class LinkConditions:
    """Impairments applied to every datagram (probabilities are per datagram)."""

    delay: float = 0.001
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    #: Probability that a datagram is held back by ``reorder_delay`` extra, overtaken by later ones.
    reorder: float = 0.0
    reorder_delay: float = 0.005


@dataclass(eq=False, slots=True)
class Segment:
    """One broadcast domain: the internet, or the LAN behind a NAT box (its ``gateway``)."""

    name: str
    gateway: NatBox | None = None
    #: Impairments for datagrams that stay on this segment (None: the network's).
    conditions: LinkConditions | None = None
    #: NAT boxes whose public (WAN) address is on this segment, by that address.
    nats: dict[str, NatBox] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Segment({self.name!r})"


# Queue entries: (delivery time, sequence number, segment, destination, source, data). Plain
# tuples: the heap compares them in C, which keeps the simulator's own cost far below the cores'.
# A timed callback is an entry with segment None (its callback waits in SimNetwork._calls).
_Event = tuple[float, int, Segment | None, Endpoint, Endpoint, bytes]


class SimNetwork:
    """Datagram delivery between attached hosts, through NAT boxes, in virtual time."""

    def __init__(self, rng: random.Random, conditions: LinkConditions | None = None) -> None:
        self.rng = rng
        self.conditions = conditions or LinkConditions()
        self.now = 0.0
        self.hosts: dict[Endpoint, SimHost] = {}
        self.counters: Counter[str] = Counter()
        #: Called with (source, destination, data) for every datagram sent (the source as the
        #: sending host has it, before any NAT); tests record or tamper.
        self.observers: list[Callable[[Endpoint, Endpoint, bytes], None]] = []
        self.internet = Segment("internet")
        self.nats: list[NatBox] = []
        # Where each host and NAT address lives (unlisted addresses: the internet).
        self._segment_of: dict[str, Segment] = {}
        self._queue: list[_Event] = []
        self._calls: dict[int, Callable[[float], None]] = {}
        self._seq = 0

    # ------------------------------------------------------------------ topology

    def attach(self, endpoint: Endpoint, host: SimHost, *, behind: NatBox | None = None) -> None:
        """Put ``host`` at ``endpoint``: on the internet, or on the LAN of the NAT ``behind``."""
        segment = self.internet if behind is None else behind.lan
        assert segment is not None
        known = self._segment_of.setdefault(endpoint[0], segment)
        if known is not segment:
            raise ValueError(f"{endpoint[0]} is already on {known.name}")
        self.hosts[endpoint] = host

    def add_nat(
        self,
        kind: NatKind,
        public_ip: str,
        *,
        behind: NatBox | None = None,
        name: str = "",
        lan_conditions: LinkConditions | None = None,
    ) -> NatBox:
        """A NAT box with ``public_ip`` on the internet (or on the LAN of the NAT ``behind``: a
        double NAT). Its ports come from a random.Random seeded from the network's."""
        wan = self.internet if behind is None else behind.lan
        assert wan is not None
        if public_ip in self._segment_of:
            raise ValueError(f"{public_ip} is already in use")
        nat = NatBox(kind, public_ip, random.Random(self.rng.getrandbits(64)), name=name)
        nat.wan = wan
        nat.lan = Segment(name or f"lan of {public_ip}", gateway=nat, conditions=lan_conditions)
        wan.nats[public_ip] = nat
        self._segment_of[public_ip] = wan
        self.nats.append(nat)
        return nat

    def segment_of(self, host: str) -> Segment:
        return self._segment_of.get(host, self.internet)

    # ------------------------------------------------------------------ traffic

    def inject(self, source: Endpoint, destination: Endpoint, data: bytes, delay: float = 0.0) -> None:
        """Deliver ``data`` as if ``source`` had sent it, bypassing the impairments (and any NAT
        on the way: it arrives on the destination's own segment)."""
        self._seq += 1
        segment = self.segment_of(destination[0])
        heapq.heappush(self._queue, (self.now + delay, self._seq, segment, destination, source, data))

    def call_at(self, at: float, endpoint: Endpoint, callback: Callable[[float], None]) -> None:
        """Run ``callback(now)`` at virtual time ``at``, then send what the host at ``endpoint``
        produced (the way a delivery to it does)."""
        self._seq += 1
        self._calls[self._seq] = callback
        heapq.heappush(self._queue, (max(at, self.now), self._seq, None, endpoint, endpoint, b""))

    def _send(self, source: Endpoint, destination: Endpoint, data: bytes) -> None:
        for observer in self.observers:
            observer(source, destination, data)
        self.counters["sent"] += 1
        origin = segment = self.segment_of(source[0])
        now = self.now
        while True:
            target = self._segment_of.get(destination[0])
            if target is segment or (target is None and segment is self.internet):
                break
            nat = segment.gateway
            if nat is None:
                break  # on the internet towards a private address: it reaches nobody (delivery counts it)
            hairpin = destination[0] == nat.public_ip  # our own public address, from inside
            if hairpin and not nat.kind.hairpin:
                nat.counters["drop_hairpin"] += 1
                self.counters["nat_drop_hairpin"] += 1
                return
            mapped = nat.outbound(source, destination, now)
            if mapped is None:
                self.counters["nat_drop_out"] += 1
                return
            if hairpin:
                internal = nat.inbound(mapped, destination, now, hairpin=True)
                if internal is None:
                    self.counters["nat_drop_hairpin"] += 1
                    return
                nat.counters["hairpin"] += 1
                assert nat.lan is not None
                source, destination, segment = mapped, internal, nat.lan
                break
            assert nat.wan is not None
            source, segment = mapped, nat.wan
        c = self.conditions
        if segment is origin and segment.conditions is not None and segment is not self.internet:
            c = segment.conditions
        rng = self.rng
        if c.loss and rng.random() < c.loss:
            self.counters["lost"] += 1
            return
        copies = 2 if c.duplicate and rng.random() < c.duplicate else 1
        for _ in range(copies):
            delay = c.delay + (rng.uniform(0, c.jitter) if c.jitter else 0.0)
            if c.reorder and rng.random() < c.reorder:
                delay += c.reorder_delay
                self.counters["reordered"] += 1
            self._seq += 1
            heapq.heappush(self._queue, (now + delay, self._seq, segment, destination, source, data))
        if copies == 2:
            self.counters["duplicated"] += 1

    def _deliver(self, segment: Segment, destination: Endpoint, source: Endpoint, data: bytes) -> None:
        now = self.now
        nat = segment.nats.get(destination[0])
        while nat is not None:
            internal = nat.inbound(source, destination, now)
            if internal is None:
                self.counters["nat_drop_in"] += 1
                return
            assert nat.lan is not None
            destination, segment = internal, nat.lan
            nat = segment.nats.get(destination[0])
        if self.segment_of(destination[0]) is not segment:
            self.counters["no_route"] += 1
            return
        host = self.hosts.get(destination)
        if host is None:
            self.counters["no_host"] += 1
            return
        self.counters["delivered"] += 1
        host.receive_datagram(data, source, now)
        self._collect(destination, host)

    def _collect(self, endpoint: Endpoint, host: SimHost) -> None:
        for data, destination in host.datagrams_to_send():
            self._send(endpoint, destination, data)

    def flush(self) -> None:
        """Send whatever the hosts produced outside of the network's own calls."""
        for endpoint, host in list(self.hosts.items()):
            self._collect(endpoint, host)

    # ------------------------------------------------------------------ time

    def _next_time(self) -> float:
        at = self._queue[0][0] if self._queue else math.inf
        for host in self.hosts.values():
            deadline = host.next_deadline()
            if deadline is not None and deadline < at:
                at = deadline
        return at

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance virtual time to ``until``, or until ``stop()`` is true (then return True)."""
        self.flush()
        while True:
            if stop is not None and stop():
                return True
            at = self._next_time()
            if at > until:
                self.now = max(self.now, until)
                return False
            self.now = max(self.now, at)
            if self._queue and self._queue[0][0] <= self.now:
                _, seq, segment, destination, source, data = heapq.heappop(self._queue)
                if segment is None:
                    self._calls.pop(seq)(self.now)
                    host = self.hosts.get(destination)
                    if host is not None:
                        self._collect(destination, host)
                    continue
                self._deliver(segment, destination, source, data)
            else:
                for endpoint, host in list(self.hosts.items()):
                    deadline = host.next_deadline()
                    if deadline is not None and deadline <= self.now:
                        host.handle_timeout(self.now)
                        self._collect(endpoint, host)
