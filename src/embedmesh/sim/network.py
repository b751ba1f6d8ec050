"""A simulated underlay on a virtual clock: hosts exchange datagrams with loss, delay, jitter,
reordering and duplication drawn from one seeded ``random.Random``, so a run is reproducible from
its seed.

A host is any sans-IO core with the underlay side of the device interface
(:class:`SimHost`): the WireGuard device itself, or a :class:`~embedmesh.sim.node.SimNode` that
adds the overlay interface on top.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


# Queue entries: (delivery time, sequence number, destination, source, data). Plain tuples: the
# heap compares them in C, which keeps the simulator's own cost far below the cores'.
_Event = tuple[float, int, Endpoint, Endpoint, bytes]


class SimNetwork:
    """Datagram delivery between attached hosts, in virtual time."""

    def __init__(self, rng: random.Random, conditions: LinkConditions | None = None) -> None:
        self.rng = rng
        self.conditions = conditions or LinkConditions()
        self.now = 0.0
        self.hosts: dict[Endpoint, SimHost] = {}
        self.counters: Counter[str] = Counter()
        #: Called with (source, destination, data) for every datagram sent; tests record or tamper.
        self.observers: list[Callable[[Endpoint, Endpoint, bytes], None]] = []
        self._queue: list[_Event] = []
        self._seq = 0

    def attach(self, endpoint: Endpoint, host: SimHost) -> None:
        self.hosts[endpoint] = host

    def inject(self, source: Endpoint, destination: Endpoint, data: bytes, delay: float = 0.0) -> None:
        """Deliver ``data`` as if ``source`` had sent it, bypassing the impairments."""
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, destination, source, data))

    def _send(self, source: Endpoint, destination: Endpoint, data: bytes) -> None:
        for observer in self.observers:
            observer(source, destination, data)
        c = self.conditions
        rng = self.rng
        self.counters["sent"] += 1
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
            heapq.heappush(self._queue, (self.now + delay, self._seq, destination, source, data))
        if copies == 2:
            self.counters["duplicated"] += 1

    def _collect(self, endpoint: Endpoint, host: SimHost) -> None:
        for data, destination in host.datagrams_to_send():
            self._send(endpoint, destination, data)

    def flush(self) -> None:
        """Send whatever the hosts produced outside of the network's own calls."""
        for endpoint, host in self.hosts.items():
            self._collect(endpoint, host)

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
                _, _, destination, source, data = heapq.heappop(self._queue)
                host = self.hosts.get(destination)
                if host is None:
                    self.counters["no_host"] += 1
                    continue
                self.counters["delivered"] += 1
                host.receive_datagram(data, source, self.now)
                self._collect(destination, host)
            else:
                for endpoint, host in self.hosts.items():
                    deadline = host.next_deadline()
                    if deadline is not None and deadline <= self.now:
                        host.handle_timeout(self.now)
                        self._collect(endpoint, host)
