"""Simulated NAT boxes: UDP mapping and filtering the way RFC 4787 names them, with the behaviours
the NAT lab measured on Linux (``../shared/natlab/RESULTS.md``).

A :class:`NatBox` sits between two :class:`~embedmesh.sim.network.Segment`\\ s of a
:class:`~embedmesh.sim.network.SimNetwork`: its LAN (private hosts, or the WAN side of an inner
NAT: double NAT) and its WAN (the internet, or an outer NAT's LAN), where it owns one public IP.

- Mapping (:class:`Mapping`): which internal flows share an external port. Endpoint-independent
  keeps one port per internal endpoint whatever the destination; address-and-port-dependent
  ("symmetric") takes a new port per destination endpoint.
- Filtering (:class:`Filtering`): which outside sources may use a mapping. Endpoint-independent
  ("full cone") lets anyone in; address-dependent only IPs the inside sent to; address-and-port-
  dependent only the exact endpoints (plain conntrack: a home router).
- Ports come from a seeded ``random.Random``: endpoint-independent mappings keep the internal port
  when it is free (Linux ``masquerade``), otherwise, and always for symmetric NATs (``masquerade
  fully-random``), a random port; a run is reproducible from its seed.
- A mapping idles out after :attr:`NatKind.timeout` seconds without a packet (30 s: Linux
  conntrack's UDP timeout for young flows, measured in the lab). Outbound packets and the inbound
  packets it lets in refresh it, as conntrack refreshes on replies.
- :meth:`NatBox.flush` forgets every mapping (the NAT rebooted); :meth:`NatBox.set_kind` changes
  the behaviour in place and flushes (the lab's ``nl_set_kind``).
- Hairpinning (a LAN host sending to the NAT's own public address, :attr:`NatKind.hairpin`): the
  packet is mapped out as usual and turned back in to whichever internal endpoint owns the
  destination port, without filtering (NAT loopback is a DNAT rule, not the reply path). Off (the
  lab's nftables NATs and many home routers), such packets are dropped.
- UDP blocked (:attr:`NatKind.udp`): no UDP passes either way (DERP, a TCP connection, is not
  modelled as passing through NAT boxes, so it still works, as it does behind the lab's
  ``udp-blocked`` router that forwards TCP 443).
"""

from __future__ import annotations

import enum
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedmesh.sim.network import Segment

Endpoint = tuple[str, int]

#: The ports a NAT hands out (random picks; a preserved internal port may lie anywhere).
PORT_RANGE = (1024, 65535)
#: Linux conntrack's UDP timeout for a flow younger than its "stream" promotion (the lab's 30 s).
DEFAULT_TIMEOUT = 30.0


class Mapping(enum.Enum):
    """RFC 4787 mapping behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Filtering(enum.Enum):
    """RFC 4787 filtering behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@dataclass(frozen=True, slots=True)
class NatKind:
    """How a NAT box behaves (see the module docstring)."""

    mapping: Mapping = Mapping.ENDPOINT_INDEPENDENT
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    #: Endpoint-independent mappings keep the internal port when free (ignored for the others).
    port_preserving: bool = True
    #: False: all UDP is dropped.
    udp: bool = True
    hairpin: bool = False
    #: Idle seconds after which a mapping is forgotten.
    timeout: float = DEFAULT_TIMEOUT
    name: str = ""

    def __str__(self) -> str:
        text = self.name or f"{self.mapping.value}-mapping/{self.filtering.value}-filtering"
        return text + ("+hairpin" if self.hairpin else "")


EIM = Mapping.ENDPOINT_INDEPENDENT
APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT

#: Endpoint-independent mapping and filtering: a "full cone" (the lab's ``eim``).
EASY = NatKind(EIM, Filtering.ENDPOINT_INDEPENDENT, name="easy")
#: Endpoint-independent mapping, address-dependent filtering ("restricted cone").
EIM_ADF = NatKind(EIM, Filtering.ADDRESS_DEPENDENT, name="eim-adf")
#: Endpoint-independent mapping, address-and-port-dependent filtering: a Linux home router
#: (plain ``masquerade``; the lab's ``eim-apdf``).
EIM_APDF = NatKind(EIM, Filtering.ADDRESS_AND_PORT_DEPENDENT, name="eim-apdf")
#: A new random port per destination, address-and-port-dependent filtering (``masquerade
#: fully-random``; the lab's ``symmetric``).
SYMMETRIC = NatKind(APDM, Filtering.ADDRESS_AND_PORT_DEPENDENT, port_preserving=False, name="symmetric")
#: No UDP at all (the lab's ``udp-blocked``: only TCP 80/443 out).
UDP_BLOCKED = NatKind(EIM, Filtering.ADDRESS_AND_PORT_DEPENDENT, udp=False, name="udp-blocked")


@dataclass(slots=True)
class _Mapping:
    internal: Endpoint
    port: int
    key: tuple[object, ...]
    last_used: float
    #: Filtering: the remote (IP, or IP and port) -> when a packet to or from it last passed.
    permits: dict[object, float] = field(default_factory=dict)


class NatBox:
    """One NAT: its public IP on the WAN segment, its translation state, its counters."""

    def __init__(self, kind: NatKind, public_ip: str, rng: random.Random, *, name: str = "") -> None:
        self.kind = kind
        self.public_ip = public_ip
        self.name = name or public_ip
        self._rng = rng
        self._mappings: dict[tuple[object, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self.counters: Counter[str] = Counter()
        #: The latest inbound drops, (time, reason, source, destination), for tests and debugging.
        self.drops: deque[tuple[float, str, Endpoint, Endpoint]] = deque(maxlen=256)
        #: Set by :meth:`~embedmesh.sim.network.SimNetwork.add_nat`: the segment behind this NAT
        #: and the one its public IP is on.
        self.lan: Segment | None = None
        self.wan: Segment | None = None

    def __repr__(self) -> str:
        return f"NatBox({self.name!r}, {self.kind}, {self.public_ip})"

    # ------------------------------------------------------------------ operations

    def flush(self) -> None:
        """Forget every mapping, as a NAT that rebooted does."""
        self.counters["flushed"] += len(self._mappings)
        self._mappings.clear()
        self._by_port.clear()

    def set_kind(self, kind: NatKind) -> None:
        """Behave as ``kind`` from now on (and forget the mappings: a reloaded ruleset)."""
        self.kind = kind
        self.flush()

    @property
    def mappings(self) -> dict[Endpoint, list[int]]:
        """Internal endpoint -> its external ports (live or not yet swept), for tests."""
        out: dict[Endpoint, list[int]] = {}
        for m in self._mappings.values():
            out.setdefault(m.internal, []).append(m.port)
        return out

    # ------------------------------------------------------------------ translation

    def outbound(self, source: Endpoint, destination: Endpoint, now: float) -> Endpoint | None:
        """A LAN packet from ``source`` leaves for ``destination``: the source it has on the WAN,
        or None (dropped)."""
        kind = self.kind
        if not kind.udp:
            self.counters["drop_udp_blocked"] += 1
            return None
        if kind.mapping is Mapping.ENDPOINT_INDEPENDENT:
            key: tuple[object, ...] = (source,)
        elif kind.mapping is Mapping.ADDRESS_DEPENDENT:
            key = (source, destination[0])
        else:
            key = (source, destination)
        mapping = self._mappings.get(key)
        if mapping is not None and now - mapping.last_used > kind.timeout:
            self._expire(mapping)
            mapping = None
        if mapping is None:
            port = self._allocate(source[1], now)
            if port is None:
                self.counters["drop_ports_exhausted"] += 1
                return None
            mapping = _Mapping(source, port, key, now)
            self._mappings[key] = mapping
            self._by_port[port] = mapping
            self.counters["new_mapping"] += 1
        mapping.last_used = now
        mapping.permits[self._permit_key(destination)] = now
        return (self.public_ip, mapping.port)

    def inbound(
        self, source: Endpoint, destination: Endpoint, now: float, *, hairpin: bool = False
    ) -> Endpoint | None:
        """A WAN packet from ``source`` to our ``destination`` port: the internal endpoint it goes
        to, or None (dropped). ``hairpin``: it came from our own LAN through :meth:`outbound`."""
        kind = self.kind
        if not kind.udp:
            self.counters["drop_udp_blocked"] += 1
            return None
        mapping = self._by_port.get(destination[1])
        if mapping is not None and now - mapping.last_used > kind.timeout:
            self._expire(mapping)
            mapping = None
        if mapping is None:
            self.counters["drop_no_mapping"] += 1
            self.drops.append((now, "no_mapping", source, destination))
            return None
        permit = self._permit_key(source)
        if not hairpin and kind.filtering is not Filtering.ENDPOINT_INDEPENDENT:
            at = mapping.permits.get(permit)
            if at is None or now - at > kind.timeout:
                self.counters["drop_filtered"] += 1
                self.drops.append((now, "filtered", source, destination))
                return None
        mapping.last_used = now
        mapping.permits[permit] = now
        self.counters["inbound"] += 1
        return mapping.internal

    # ------------------------------------------------------------------ internals

    def _permit_key(self, remote: Endpoint) -> object:
        filtering = self.kind.filtering
        if filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT:
            return remote
        if filtering is Filtering.ADDRESS_DEPENDENT:
            return remote[0]
        return None

    def _expire(self, mapping: _Mapping) -> None:
        self.counters["expired"] += 1
        del self._mappings[mapping.key]
        if self._by_port.get(mapping.port) is mapping:
            del self._by_port[mapping.port]

    def _port_free(self, port: int, now: float) -> bool:
        held = self._by_port.get(port)
        if held is None:
            return True
        if now - held.last_used > self.kind.timeout:
            self._expire(held)
            return True
        return False

    def _allocate(self, internal_port: int, now: float) -> int | None:
        kind = self.kind
        if (
            kind.port_preserving
            and kind.mapping is Mapping.ENDPOINT_INDEPENDENT
            and self._port_free(internal_port, now)
        ):
            return internal_port
        low, high = PORT_RANGE
        for _ in range(64):
            port = self._rng.randint(low, high)
            if self._port_free(port, now):
                return port
        for port in range(low, high + 1):  # nearly full: the first free one, still deterministic
            if self._port_free(port, now):
                return port
        return None


__all__ = [
    "DEFAULT_TIMEOUT",
    "EASY",
    "EIM_ADF",
    "EIM_APDF",
    "SYMMETRIC",
    "UDP_BLOCKED",
    "Filtering",
    "Mapping",
    "NatBox",
    "NatKind",
]
