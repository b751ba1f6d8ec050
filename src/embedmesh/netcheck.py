"""Netcheck: what the network between this node and the DERP regions looks like, sans-IO.

The counterpart of Tailscale's ``net/netcheck``. From a DERP map, :class:`NetcheckCore` plans STUN
Binding requests to every region's STUN servers, sends them (with retransmits) as datagrams for its
driver to put on a socket, reads the answers the driver hands back, and ends in a
:class:`NetcheckReport`: whether UDP works, this node's public IPv4 (and IPv6) address and port as
the STUN servers saw them, whether that mapping varies with the destination (a "hard" NAT), the
round trip to each region, and the preferred (home) DERP region.

The core owns no socket, so any socket owner can drive it. The node drives it from its WireGuard
socket (so the mapping found is the one peers will use), :func:`embedmesh.runtime.netcheck.run_netcheck`
from a socket of its own::

    core = NetcheckCore(derp_map, random_bytes=os.urandom)
    core.start(now)                                   # or start(now, previous_report=report)
    while core.running:
        socket_send(core.datagrams_to_send())         # [(STUN request bytes, (ip, port)), ...]
        ... wait for a datagram or core.next_deadline() ...
        core.receive(data, (ip, port), now)           # a STUN datagram from the socket: True if ours
        core.handle_timeout(now)                      # at or after next_deadline()
        if core.https_regions:                        # UDP got no answer (https_fallback=True)
            ... core.add_https_latency(region_id, seconds); then core.finish(now)
    report = core.report

Every input carries ``now`` (seconds on the driver's monotonic clock); transaction IDs come from
``random_bytes``. Datagrams that are not answers to this core's requests are dropped and counted in
:attr:`NetcheckCore.counters` (``receive`` returns False), never raised.

The rules are Go's, with its numbers:

- A **full** check (the first, then one every :data:`FULL_REPORT_INTERVAL`) sends three requests per
  region and family, 100 ms apart, cycling through the region's nodes; an **incremental** one
  probes only the three fastest regions of the last report plus the current home region (two
  tries, four for the home region, spaced by 120% of the last latency).
- A region's requests stop at its first answer; a planned retransmit that would teach nothing new
  is not sent. The check ends when every region answered, :data:`ENOUGH_REGIONS` regions answered
  and twice (incremental: once) the slowest of their latencies has passed since, or after
  :data:`STUN_PROBE_TIMEOUT`.
- ``mapping_varies_by_dest_ip`` compares the IPv4 addresses that *different* STUN server IP
  addresses saw (Go compares any two answers). When every region has answered from one server
  address and the map names another in an answering region (a region of two servers), one more
  request goes to it before the check ends, so a single-region tailnet still learns its NAT type.
- The preferred region is the one with the lowest latency over the reports of the last
  :data:`HISTORY_MAX_AGE`, but the previous preferred region stays while it still answers and the
  new one is not clearly better: less than :data:`PREFERRED_DERP_ABSOLUTE_DIFF` faster, or not
  faster by a third. With no latency at all, a previous region heard from over DERP within
  :data:`PREFERRED_DERP_KEEPALIVE_TIMEOUT` (``derp_activity``) stays.
- When no STUN answer came at all (UDP blocked), :attr:`NetcheckCore.https_regions` lists the
  regions to measure over HTTPS instead (``/derp/latency-check``, done by the runtime runner;
  the node may skip it), until :data:`REPORT_TIMEOUT` after the start.

DERP nodes named by host name only need their addresses resolved by the driver first
(:func:`hostnames_to_resolve`, ``start(resolved=...)``): the core does no DNS.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

from embedmesh.tailscale import stun
from embedmesh.tailscale.derpmap import DEFAULT_STUN_PORT, DerpMap, DerpNode, DerpRegion

#: A UDP endpoint as the node's sockets name it: ("ip", port).
Endpoint: TypeAlias = tuple[str, int]
#: A datagram to send: (payload, destination).
Datagram: TypeAlias = tuple[bytes, Endpoint]

# Go's netcheck constants (net/netcheck/netcheck.go), in seconds.
#: The longest a whole check (STUN, then HTTPS) takes.
REPORT_TIMEOUT = 5.0
#: The longest the STUN phase waits for answers before it gives up on UDP.
STUN_PROBE_TIMEOUT = 3.0
#: Retransmit spacing in a full check.
INITIAL_RETRANSMIT = 0.1
#: Retransmit spacing in an incremental check for a region without a last latency.
ACTIVE_RETRANSMIT = 0.2
#: Regions whose answers end the check early (after twice the slowest of their latencies).
ENOUGH_REGIONS = 3
#: Regions an incremental check probes (plus the home region).
INCREMENTAL_REGIONS = 3
#: How often a check is a full one.
FULL_REPORT_INTERVAL = 300.0
#: How long reports count for the preferred region's best recent latency (v1.102.5: the full
#: report interval plus a report's timeout, so at least one full report is always kept).
HISTORY_MAX_AGE = FULL_REPORT_INTERVAL + REPORT_TIMEOUT
#: A new preferred region must be at least this much faster than the old one...
PREFERRED_DERP_ABSOLUTE_DIFF = 0.010
#: ...or the old region counts as still there when its DERP connection was heard within this.
PREFERRED_DERP_FRAME_TIME = 8.0
#: With no latency at all, a previous region heard from within this (2 x DERP's keepalive) stays.
PREFERRED_DERP_KEEPALIVE_TIMEOUT = 120.0
#: The least the extra request for ``mapping_varies_by_dest_ip`` is waited for.
MAPPING_PROBE_WAIT = 0.1


class _State(enum.Enum):
    IDLE = "idle"
    PROBING = "probing"
    HTTPS = "https"


@dataclass(frozen=True, slots=True)
class NetcheckReport:
    """The result of one check. Latencies are in seconds; endpoints are ("ip", port)."""

    #: The driver's clock when the check ended.
    time: float
    #: Whether any STUN round trip completed.
    udp: bool = False
    #: Whether an IPv4 (IPv6) STUN round trip completed (or, without UDP, an HTTPS check reached
    #: a region over IPv4 (IPv6)).
    ipv4: bool = False
    ipv6: bool = False
    #: Whether the host has IPv6 at all (reported by the driver).
    os_has_ipv6: bool = False
    #: Whether different STUN servers saw different IPv4 mappings (a "hard", endpoint-dependent
    #: NAT); None when fewer than two server addresses answered.
    mapping_varies_by_dest_ip: bool | None = None
    #: The home DERP region (0: none).
    preferred_derp: int = 0
    region_latency: Mapping[int, float] = field(default_factory=dict)
    region_v4_latency: Mapping[int, float] = field(default_factory=dict)
    region_v6_latency: Mapping[int, float] = field(default_factory=dict)
    #: This node's public address as the first answering STUN server saw it.
    global_v4: Endpoint | None = None
    global_v6: Endpoint | None = None
    #: How many answers saw each address.
    global_v4_counters: Mapping[Endpoint, int] = field(default_factory=dict)
    global_v6_counters: Mapping[Endpoint, int] = field(default_factory=dict)
    #: Whether it was a full check (every region) rather than an incremental one.
    full: bool = True

    def endpoints(self) -> list[Endpoint]:
        """The public endpoints to advertise (Go's ``GetGlobalAddrs``): the global IPv4 and IPv6
        addresses, then any other address more than one answer saw (some NATs hand out a new
        mapping per STUN session while the old one still works)."""
        out: list[Endpoint] = [a for a in (self.global_v4, self.global_v6) if a is not None]
        for counters, best in (
            (self.global_v4_counters, self.global_v4),
            (self.global_v6_counters, self.global_v6),
        ):
            out.extend(a for a, n in sorted(counters.items()) if a != best and n > 1)
        return out

    def to_json(self) -> dict[str, Any]:
        """The report in the JSON shape of Go's ``netcheck.Report`` (``tailscale netcheck
        --format=json``): latencies in nanoseconds, addresses as "ip:port" text."""

        def latencies(m: Mapping[int, float]) -> dict[str, int]:
            return {str(r): round(d * 1e9) for r, d in sorted(m.items())}

        def counters(m: Mapping[Endpoint, int]) -> dict[str, int] | None:
            return {_endpoint_text(a): n for a, n in sorted(m.items())} or None

        return {
            "UDP": self.udp,
            "IPv6": self.ipv6,
            "IPv4": self.ipv4,
            "OSHasIPv6": self.os_has_ipv6,
            "MappingVariesByDestIP": self.mapping_varies_by_dest_ip,
            "PreferredDERP": self.preferred_derp,
            "RegionLatency": latencies(self.region_latency),
            "RegionV4Latency": latencies(self.region_v4_latency),
            "RegionV6Latency": latencies(self.region_v6_latency),
            "GlobalV4Counters": counters(self.global_v4_counters),
            "GlobalV6Counters": counters(self.global_v6_counters),
            "GlobalV4": _endpoint_text(self.global_v4) if self.global_v4 else "",
            "GlobalV6": _endpoint_text(self.global_v6) if self.global_v6 else "",
        }


def _endpoint_text(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normal_ip(text: str) -> str:
    """An IP in canonical text, IPv4-mapped IPv6 unmapped (a dual-stack socket reports those)."""
    ip = _parse_ip(text.partition("%")[0])
    if ip is None:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_test_node(node: DerpNode) -> bool:
    # Go's DERPNode.IsTestNode: such nodes are probed whatever families the host seems to have.
    return bool(node.stun_test_ip) or node.ipv4 == "127.0.0.1"


def _might(node: DerpNode, family: int) -> bool:
    """Go's nodeMight4/6: false only when the map pins the family to something that is not it."""
    pinned = node.ipv4 if family == 4 else node.ipv6
    if not pinned:
        return True
    ip = _parse_ip(pinned)
    return ip is not None and ip.version == family


def hostnames_to_resolve(derp_map: DerpMap) -> list[str]:
    """The host names of STUN nodes that the map gives no address for (for some family): the
    driver resolves them and passes the addresses to :meth:`NetcheckCore.start` as ``resolved``."""
    names: list[str] = []
    for region in derp_map.regions.values():
        if region.no_measure_no_home:
            continue
        for node in region.nodes:
            if node.stun_port < 0 or node.stun_test_ip or not node.host_name:
                continue
            if (
                (not node.ipv4 or not node.ipv6)
                and node.host_name not in names
                and _parse_ip(node.host_name) is None
            ):
                names.append(node.host_name)
    return names


def stun_target(
    node: DerpNode, family: int, resolved: Mapping[str, Sequence[str]] | None = None
) -> Endpoint | None:
    """Where a STUN request to ``node`` over IPv4 (``family`` 4) or IPv6 (6) goes, as Go's
    ``nodeAddrPort`` decides: its ``STUNTestIP``, else its pinned address, else the first address
    of that family its host name resolved to; None when STUN is off or there is no address."""
    port = node.stun_port
    if port < 0 or port > 0xFFFF:
        return None
    port = port or DEFAULT_STUN_PORT
    if node.stun_test_ip:
        ip = _parse_ip(node.stun_test_ip)
        return (str(ip), port) if ip is not None and ip.version == family else None
    pinned = node.ipv4 if family == 4 else node.ipv6
    if pinned:
        ip = _parse_ip(pinned)
        return (str(ip), port) if ip is not None and ip.version == family else None
    literal = _parse_ip(node.host_name)
    if literal is not None:
        return (str(literal), port) if literal.version == family else None
    for text in (resolved or {}).get(node.host_name, ()):
        ip = _parse_ip(_normal_ip(text))
        if ip is not None and ip.version == family:
            return (str(ip), port)
    return None


@dataclass(slots=True)
class _Probe:
    at: float
    node: DerpNode
    target: Endpoint


@dataclass(slots=True)
class _ProbeSet:
    """The requests to one region over one family; done at the first answer (Go's probe set)."""

    region: DerpRegion
    family: int
    probes: list[_Probe]
    done: bool = False


@dataclass(slots=True)
class _InFlight:
    probe_set: _ProbeSet | None  # None: the extra request for the mapping
    node: DerpNode
    target: Endpoint
    sent: float


class NetcheckCore:
    """Plans, sends and reads STUN probes for one check at a time (see the module docstring).

    ``random_bytes`` draws transaction IDs. ``ipv4``/``ipv6`` say which families the driver's
    socket can send (IPv6 off by default: the node's IPv4-only sockets are common). ``https_fallback``
    makes a check without any UDP answer wait for HTTPS latencies (:attr:`https_regions`);
    ``enough_regions`` ends a check once that many regions answered (``tailscale netcheck
    --verbose`` measures every region: pass a large number); ``os_has_ipv6`` is what reports
    say about the host's IPv6 (Go: whether a socket binds to ``::1``).
    """

    def __init__(
        self,
        derp_map: DerpMap,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        ipv4: bool = True,
        ipv6: bool = False,
        https_fallback: bool = False,
        enough_regions: int = ENOUGH_REGIONS,
        os_has_ipv6: bool | None = None,
    ) -> None:
        self.derp_map = derp_map
        self._random = random_bytes
        self.have_ipv4 = ipv4
        self.have_ipv6 = ipv6
        #: What reports say in ``os_has_ipv6`` (default: ``ipv6``).
        self.os_has_ipv6 = ipv6 if os_has_ipv6 is None else os_has_ipv6
        self.https_fallback = https_fallback
        self.enough_regions = enough_regions
        #: The last finished report (None before the first check ends).
        self.report: NetcheckReport | None = None
        self.counters: Counter[str] = Counter()
        self._state = _State.IDLE
        self._history: list[NetcheckReport] = []
        self._last_full: float | None = None
        self._outbox: list[Datagram] = []
        self._sets: list[_ProbeSet] = []
        self._in_flight: dict[bytes, _InFlight] = {}
        self._start = 0.0
        self._full = True
        self._previous: NetcheckReport | None = None
        self._derp_activity: Mapping[int, float] = {}
        self._resolved: Mapping[str, Sequence[str]] = {}
        self._enough_deadline: float | None = None
        self._mapping_deadline: float | None = None
        self._mapping_tried = False
        self._https_regions: list[DerpRegion] = []
        self._reset_results()

    def _reset_results(self) -> None:
        self._udp = False
        self._ipv4 = False
        self._ipv6 = False
        self._latency: dict[int, float] = {}
        self._v4_latency: dict[int, float] = {}
        self._v6_latency: dict[int, float] = {}
        self._global_v4: Endpoint | None = None
        self._global_v6: Endpoint | None = None
        self._v4_counters: Counter[Endpoint] = Counter()
        self._v6_counters: Counter[Endpoint] = Counter()
        #: STUN server IPv4 address -> the mapping it saw (for mapping_varies_by_dest_ip).
        self._v4_by_server: dict[str, Endpoint] = {}
        self._varies: bool | None = None

    # -- the driver's API ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a check is under way (STUN probes or, without UDP, the HTTPS phase)."""
        return self._state is not _State.IDLE

    @property
    def https_regions(self) -> list[DerpRegion]:
        """The regions to measure over HTTPS now: non-empty only when the STUN phase ended without
        any answer and ``https_fallback`` is on. Report each with :meth:`add_https_latency`, then
        call :meth:`finish` (the check also ends by itself :data:`REPORT_TIMEOUT` after the start)."""
        return list(self._https_regions) if self._state is _State.HTTPS else []

    def start(
        self,
        now: float,
        previous_report: NetcheckReport | None = None,
        *,
        full: bool | None = None,
        resolved: Mapping[str, Sequence[str]] | None = None,
        derp_activity: Mapping[int, float] | None = None,
    ) -> None:
        """Begin a check: the first requests are ready in :meth:`datagrams_to_send` at once.

        ``previous_report`` (default: this core's last) is what the probe plan and the preferred
        region's hysteresis build on; ``full`` forces a full (True) or incremental (False) check
        instead of Go's rule; ``resolved`` maps DERP host names to addresses
        (:func:`hostnames_to_resolve`); ``derp_activity`` maps region ids to when (on the same
        clock) a DERP frame last came from that region. A check still running is abandoned.
        """
        if previous_report is not None and all(r is not previous_report for r in self._history):
            self._history.append(previous_report)
            if self._last_full is None and previous_report.full:
                self._last_full = previous_report.time
        self._previous = previous_report if previous_report is not None else self.report
        self._resolved = dict(resolved or {})
        self._derp_activity = dict(derp_activity or {})
        self._start = now
        self._in_flight.clear()
        self._outbox.clear()
        self._enough_deadline = None
        self._mapping_deadline = None
        self._mapping_tried = False
        self._https_regions = []
        self._reset_results()
        if full is None:
            full = (
                self._previous is None
                or self._last_full is None
                or now - self._last_full > FULL_REPORT_INTERVAL
            )
        last = None if full or self._previous is None or not self._previous.region_latency else self._previous
        self._full = last is None
        if self._full:
            self._last_full = now
        preferred = self._previous.preferred_derp if self._previous is not None else 0
        self._sets = self._plan(now, last, preferred)
        self._state = _State.PROBING
        self.counters["checks"] += 1
        if not self._sets:
            self._stun_finished(now)
            return
        self.handle_timeout(now)

    def datagrams_to_send(self) -> list[Datagram]:
        """The STUN requests to send now, as (bytes, ("ip", port)); each is returned once."""
        out, self._outbox = self._outbox, []
        return out

    def receive(self, data: bytes | bytearray | memoryview, source: Endpoint, now: float) -> bool:
        """A STUN datagram from the socket: True when it answered one of this check's requests
        (it is then consumed); False when it is someone else's (dropped and counted)."""
        try:
            response = stun.parse_binding_response(data)
        except stun.StunError as exc:
            self.counters["drop_" + exc.reason] += 1
            return False
        entry = self._in_flight.pop(response.txid, None)
        if entry is None or self._state is _State.IDLE:
            self.counters["drop_unknown_txid"] += 1
            return False
        self.counters["answers"] += 1
        self._note_answer(entry, (_normal_ip(str(response.address[0])), response.address[1]), now)
        self._advance(now)
        return True

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` has work next (None: no check running)."""
        if self._state is _State.IDLE:
            return None
        if self._state is _State.HTTPS:
            return self._start + REPORT_TIMEOUT
        times = [self._start + STUN_PROBE_TIMEOUT]
        for probe_set in self._sets:
            if not probe_set.done and probe_set.probes:
                times.append(probe_set.probes[0].at)
        for deadline in (self._enough_deadline, self._mapping_deadline):
            if deadline is not None:
                times.append(deadline)
        return min(times)

    def handle_timeout(self, now: float) -> None:
        """Send the retransmits that are due and end phases whose time is up."""
        if self._state is _State.HTTPS:
            if now >= self._start + REPORT_TIMEOUT:
                self.finish(now)
            return
        if self._state is not _State.PROBING:
            return
        if now >= self._start + STUN_PROBE_TIMEOUT:
            self._stun_finished(now)
            return
        for probe_set in self._sets:
            while not probe_set.done and probe_set.probes and probe_set.probes[0].at <= now:
                probe = probe_set.probes.pop(0)
                if not self._would_help(probe_set):
                    probe_set.done = True  # Go cancels the whole set here
                    break
                self._send(probe_set, probe.node, probe.target, now)
        if self._enough_deadline is not None and now >= self._enough_deadline:
            self._end_stun(now)
            return
        if self._mapping_deadline is not None and now >= self._mapping_deadline:
            self._stun_finished(now)
            return
        self._advance(now)

    def add_https_latency(self, region_id: int, latency: float, ip: str | None = None) -> None:
        """An HTTPS round trip to a region (measured by the driver while :attr:`https_regions` is
        non-empty); ``ip`` is the address the connection reached, which tells the family."""
        if self._state is not _State.HTTPS:
            return
        _lower(self._latency, region_id, latency)
        address = _parse_ip(_normal_ip(ip)) if ip else None
        if address is not None and address.version == 4:
            self._ipv4 = True
        elif address is not None:
            self._ipv6 = True

    def finish(self, now: float) -> NetcheckReport:
        """End the check now (the driver's HTTPS measurements are in) and return its report; a
        core with no check running returns its last report."""
        if self._state is _State.IDLE and self.report is not None:
            return self.report
        self._in_flight.clear()
        self._outbox.clear()
        self._state = _State.IDLE
        self._https_regions = []
        report = self._make_report(now)
        self.report = report
        return report

    # -- planning ------------------------------------------------------------------------------

    def _family_ok(self, node: DerpNode, family: int, initial: bool) -> bool:
        have = self.have_ipv4 if family == 4 else self.have_ipv6
        pinned = node.ipv4 if family == 4 else node.ipv6
        if pinned == "none":
            return False
        if _is_test_node(node):
            return True
        return have and (_might(node, family) if initial else True)

    def _plan(self, now: float, last: NetcheckReport | None, preferred: int) -> list[_ProbeSet]:
        sets: list[_ProbeSet] = []

        def add(region: DerpRegion, family: int, probes: list[tuple[float, DerpNode]]) -> None:
            planned = []
            for delay, node in probes:
                target = stun_target(node, family, self._resolved)
                if target is not None:
                    planned.append(_Probe(now + delay, node, target))
            if planned:
                sets.append(_ProbeSet(region, family, planned))

        if last is None:
            for region_id in sorted(self.derp_map.regions):
                region = self.derp_map.regions[region_id]
                if region.no_measure_no_home or not region.nodes:
                    continue
                for family in (4, 6):
                    attempts = [
                        (t * INITIAL_RETRANSMIT, region.nodes[t % len(region.nodes)]) for t in range(3)
                    ]
                    add(region, family, [(d, n) for d, n in attempts if self._family_ok(n, family, True)])
            return sets

        had4 = bool(last.region_v4_latency)
        had6 = bool(last.region_v6_latency)
        had_both = self.have_ipv6 and had4 and had6
        contains_home = preferred == 0
        for index, region in enumerate(self._sorted_regions(last, preferred)):
            is_home = region.region_id == preferred
            if index >= INCREMENTAL_REGIONS:
                if contains_home:
                    break
                if not is_home:
                    continue
            do4, do6 = self.have_ipv4, self.have_ipv6
            fastest_two = index < 2
            tries = 1
            if fastest_two or is_home:
                tries = 2
            elif had_both:
                # Dual-stack: the slower regions alternate between the families.
                do4, do6 = index % 2 == 0, index % 2 == 1
            if not is_home and not fastest_two and not had6:
                do6 = False
            if is_home:
                tries = 4  # try hard to keep the home region, so it does not flap
                contains_home = True
            p4: list[tuple[float, DerpNode]] = []
            p6: list[tuple[float, DerpNode]] = []
            spacing = (last.region_latency.get(region.region_id, 0.0) * 1.2) or ACTIVE_RETRANSMIT
            for attempt in range(tries):
                if not region.nodes:
                    continue
                if attempt and not had6:
                    do6 = False
                node = region.nodes[attempt % len(region.nodes)]
                delay = attempt * spacing + (attempt * 0.05 if attempt > 1 else 0.0)
                if node.ipv4 != "none" and (do4 or _is_test_node(node)):
                    p4.append((delay, node))
                if node.ipv6 != "none" and (do6 or _is_test_node(node)):
                    p6.append((delay, node))
            add(region, 4, p4)
            add(region, 6, p6)
        return sets

    def _sorted_regions(self, last: NetcheckReport, preferred: int) -> list[DerpRegion]:
        """Go's sortRegions: measured regions fastest first, then the rest; Avoid regions only
        when they are home."""
        regions = [
            r
            for _, r in sorted(self.derp_map.regions.items())
            if not r.no_measure_no_home and (not r.avoid or r.region_id == preferred)
        ]

        def key(region: DerpRegion) -> tuple[int, float]:
            latency = last.region_latency.get(region.region_id, 0.0)
            return (0, latency) if latency else (1, 0.0)

        return sorted(regions, key=key)

    # -- probing -------------------------------------------------------------------------------

    def _would_help(self, probe_set: _ProbeSet) -> bool:
        """Go's probeWouldHelp: a region without a latency, a first IPv6 answer, or (IPv4) while
        the mapping is still unknown."""
        if probe_set.region.region_id not in self._latency:
            return True
        if probe_set.family == 6 and not self._v6_latency:
            return True
        return probe_set.family == 4 and self._varies is None

    def _send(self, probe_set: _ProbeSet | None, node: DerpNode, target: Endpoint, now: float) -> None:
        txid = self._random(stun.TX_ID_SIZE)
        if txid in self._in_flight:
            # 96 random bits never repeat; a source that does must not make two requests that
            # one answer would match (nor loop here forever).
            self.counters["drop_txid_collision"] += 1
            return
        self._in_flight[txid] = _InFlight(probe_set, node, target, now)
        self._outbox.append((stun.binding_request(txid), target))
        self.counters["requests"] += 1

    def _note_answer(self, entry: _InFlight, mapped: Endpoint, now: float) -> None:
        latency = max(now - entry.sent, 0.0)
        region_id = entry.node.region_id
        if entry.probe_set is not None:
            region_id = entry.probe_set.region.region_id
            entry.probe_set.done = True  # the set's other requests would only repeat this
        self._udp = True
        first_of_region = region_id not in self._latency
        _lower(self._latency, region_id, latency)
        if first_of_region and len(self._latency) == self.enough_regions and self._enough_deadline is None:
            slowest = max(self._latency.values())
            self._enough_deadline = now + slowest * (2 if self._full else 1)
        if ":" in mapped[0]:
            _lower(self._v6_latency, region_id, latency)
            self._ipv6 = True
            self._global_v6 = mapped
            self._v6_counters[mapped] += 1
            return
        _lower(self._v4_latency, region_id, latency)
        self._ipv4 = True
        self._v4_counters[mapped] += 1
        if self._global_v4 is None:
            self._global_v4 = mapped
        server = entry.target[0]
        self._v4_by_server.setdefault(server, mapped)
        if len(set(self._v4_by_server.values())) > 1:
            self._varies = True
        elif len(self._v4_by_server) > 1 and self._varies is None:
            self._varies = False
        if entry.probe_set is None:
            self._mapping_deadline = now  # the extra request is in: end at the next step

    def _advance(self, now: float) -> None:
        if self._state is not _State.PROBING:
            return
        if self._mapping_deadline is not None:
            if now >= self._mapping_deadline:
                self._stun_finished(now)
            return
        if all(s.done for s in self._sets):
            self._end_stun(now)

    def _end_stun(self, now: float) -> None:
        """Every region answered (or enough did): one more request when the mapping is unknown
        and another server address of an answering region can tell, else the end of STUN."""
        if self._varies is None and not self._mapping_tried:
            self._mapping_tried = True
            candidate = self._mapping_candidate()
            if candidate is not None:
                node, target = candidate
                self._send(None, node, target, now)
                wait = max(2 * self._latency.get(node.region_id, 0.0), MAPPING_PROBE_WAIT)
                self._mapping_deadline = min(now + wait, self._start + STUN_PROBE_TIMEOUT)
                for probe_set in self._sets:
                    probe_set.done = True
                self._enough_deadline = None
                return
        self._stun_finished(now)

    def _mapping_candidate(self) -> tuple[DerpNode, Endpoint] | None:
        if not self._v4_by_server:
            return None
        for region_id in sorted(self._v4_latency, key=lambda r: self._v4_latency[r]):
            region = self.derp_map.regions.get(region_id)
            for node in region.nodes if region is not None else ():
                target = stun_target(node, 4, self._resolved)
                if (
                    target is not None
                    and target[0] not in self._v4_by_server
                    and self._family_ok(node, 4, False)
                ):
                    return node, target
        return None

    def _stun_finished(self, now: float) -> None:
        self._enough_deadline = self._mapping_deadline = None
        for probe_set in self._sets:
            probe_set.done = True
        if not self._udp and self.https_fallback:
            need = [
                region
                for _, region in sorted(self.derp_map.regions.items())
                if region.region_id not in self._latency
                and any(not n.stun_only for n in region.nodes)
                and not region.avoid
                and not region.no_measure_no_home
            ]
            if need and now < self._start + REPORT_TIMEOUT:
                self._state = _State.HTTPS
                self._https_regions = need
                return
        self.finish(now)

    # -- the report ----------------------------------------------------------------------------

    def _make_report(self, now: float) -> NetcheckReport:
        report = NetcheckReport(
            time=now,
            udp=self._udp,
            ipv4=self._ipv4,
            ipv6=self._ipv6,
            os_has_ipv6=self.os_has_ipv6,
            mapping_varies_by_dest_ip=self._varies,
            region_latency=dict(self._latency),
            region_v4_latency=dict(self._v4_latency),
            region_v6_latency=dict(self._v6_latency),
            global_v4=self._global_v4,
            global_v6=self._global_v6,
            global_v4_counters=dict(self._v4_counters),
            global_v6_counters=dict(self._v6_counters),
            full=self._full,
        )
        self._history = [r for r in self._history if now - r.time <= HISTORY_MAX_AGE]
        preferred = preferred_region(
            report,
            self._history,
            previous=self._previous.preferred_derp if self._previous is not None else 0,
            derp_activity=self._derp_activity,
            start=self._start,
        )
        report = replace(report, preferred_derp=preferred)
        self._history.append(report)
        return report


def _lower(latencies: dict[int, float], region_id: int, latency: float) -> None:
    old = latencies.get(region_id)
    if old is None or latency < old:
        latencies[region_id] = latency


def preferred_region(
    report: NetcheckReport,
    history: Iterable[NetcheckReport] = (),
    *,
    previous: int = 0,
    derp_activity: Mapping[int, float] | None = None,
    start: float | None = None,
) -> int:
    """The home DERP region for ``report`` (Go's ``addReportHistoryAndSetPreferredDERP``).

    The candidate is the region of this report with the lowest best latency over ``history``
    (reports of the last :data:`HISTORY_MAX_AGE`, this one included). The ``previous`` home stays
    when it still answers (a latency now, or a DERP frame since ``start`` or within
    :data:`PREFERRED_DERP_FRAME_TIME`, from ``derp_activity``) and the candidate is less than
    :data:`PREFERRED_DERP_ABSOLUTE_DIFF` faster, or not faster by more than a third; with no
    latency at all, it stays while heard within :data:`PREFERRED_DERP_KEEPALIVE_TIMEOUT`.
    Returns 0 for no region.
    """
    now = report.time
    activity = derp_activity or {}
    best_recent: dict[int, float] = {}
    for past in [*history, report]:
        if now - past.time > HISTORY_MAX_AGE:
            continue
        for region_id, latency in past.region_latency.items():
            _lower(best_recent, region_id, latency)
    chosen = 0
    best_any = 0.0
    old_latency = 0.0
    for region_id in sorted(report.region_latency):
        if region_id == previous:
            old_latency = report.region_latency[region_id]
        best = best_recent[region_id]
        if chosen == 0 or best < best_any:
            best_any, chosen = best, region_id
    last_heard = activity.get(previous) if previous else None
    changing = previous != 0 and chosen != previous
    heard_recently = False
    if changing and last_heard is not None:
        heard_recently = (
            start is not None and last_heard > start
        ) or last_heard > now - PREFERRED_DERP_FRAME_TIME
    # best_any is the lowest value, so old_latency - best_any is never negative.
    if (changing and (old_latency != 0 or heard_recently)) and (
        old_latency - best_any < PREFERRED_DERP_ABSOLUTE_DIFF or best_any > old_latency / 3 * 2
    ):
        chosen = previous
    if chosen == 0 and last_heard is not None and last_heard > now - PREFERRED_DERP_KEEPALIVE_TIMEOUT:
        chosen = previous
    return chosen


__all__ = [
    "ENOUGH_REGIONS",
    "REPORT_TIMEOUT",
    "STUN_PROBE_TIMEOUT",
    "Datagram",
    "Endpoint",
    "NetcheckCore",
    "NetcheckReport",
    "hostnames_to_resolve",
    "preferred_region",
    "stun_target",
]
