"""The path layer: where each peer's WireGuard packets go, decided with Tailscale's disco, sans-IO.

The counterpart of Tailscale's magicsock (``wgengine/magicsock/endpoint.go``). WireGuard sees a
peer; this core owns how to reach it: per peer (keyed by node key) its candidate endpoints (the
network map's, CallMeMaybe contents, peer-reflexive sources of authenticated pings and WireGuard
packets), the disco pings sent to them with their TxIDs, the pongs that came back, the best path
with its trust time, and the decision to move.

The rules are Go's, with its numbers:

- A direct path exists only once a pong answered a ping this core sent to that very address
  (:data:`TRUST_UDP_ADDR_DURATION` of trust per pong). Until then the peer's packets go through
  its home DERP region (:attr:`PathKind.DERP`) when this node has DERP (:attr:`PathCore.derp_enabled`)
  and the peer has a home region, else they wait (:attr:`PathKind.NONE`).
- A DERP path is named, for WireGuard, by a per-peer address on :data:`DERP_HOST` (the address
  Tailscale's magicsock uses for DERP too): :meth:`PathCore.derp_route` turns it back into the
  peer's node key and region, for the runtime that holds the DERP connections.
- A path whose trust ran out is still used while new pings look for a better one, and its WireGuard
  packets also go through DERP meanwhile (Go's addrForSendLocked: "send both to it and DERP"), so
  a path that died while the peer was idle, or when a NAT rebooted, loses nothing:
  :attr:`PathCore.derp_copies` names those endpoints. A ping to it that times out while it is
  untrusted drops it.
- While the peer has traffic (:meth:`PathCore.note_send` within :data:`SESSION_ACTIVE_TIMEOUT`), the
  best path is pinged every :data:`HEARTBEAT_INTERVAL`, and every candidate is pinged again
  (at most once per :data:`DISCO_PING_INTERVAL` each) when there is no trusted path, or every
  :data:`UPGRADE_INTERVAL` unless the path is already :data:`GOOD_ENOUGH_LATENCY`.
- A pong moves the best path only to a better address (:func:`better_addr`: latency points, with a
  1-point hysteresis so two equal paths do not flap, and bonuses for loopback, link-local,
  private and IPv6 addresses), or to any proven address once the current one is untrusted.
- CallMeMaybe counts only when it came through DERP (``via_derp=True``), as in Go. While a peer
  with traffic has no trusted direct path, each round of discovery pings also sends it a
  CallMeMaybe through DERP with this node's endpoints (:attr:`PathCore.own_endpoints`) and a disco
  ping through DERP (its pong is the DERP path's latency), so both sides punch at once.

Peers without a disco key (plain WireGuard peers, e.g. wireguard-go in a static mesh) have no
disco: for them the path is WireGuard's own rule, the source of the last authenticated packet
(:meth:`PathCore.note_wireguard`), and before any, their first listed endpoint.

One addition to Go: an authentic ping from a peer we hold no trusted path to is answered with a
pong and also with a ping of our own to its source (unless ours went there within
:data:`PING_BACK_INTERVAL`, even if that one went unanswered: the peer's ping shows its NAT now
lets ours in), so both sides prove a path in one round trip without a DERP CallMeMaybe, and a
node behind an address-and-port-dependent NAT's peer does not wait for the 5-s interval.

Inputs carry ``now`` (seconds, monotonic) and the constructor takes the randomness (TxIDs, box
nonces); nothing here reads a clock or touches a socket. Outputs: the datagrams each call returns,
:meth:`PathCore.next_event` for path changes, :meth:`PathCore.next_deadline` for the timer.
Hostile datagrams never raise: they are dropped and counted in :attr:`PathCore.counters`.

STUN plugs in beside this: its own endpoints are what the node advertises (and sends in
CallMeMaybe), and a STUN-discovered address of a peer is one more candidate (:meth:`PathCore.set_peer`).
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from embedmesh.tailscale import disco
from embedmesh.tailscale.keys import DiscoPrivate, DiscoPublic, NodePublic

#: An underlay UDP endpoint, as the node's sockets use it: ("ip", port).
Endpoint: TypeAlias = tuple[str, int]
#: A datagram to send: (payload, destination).
Datagram: TypeAlias = tuple[bytes, Endpoint]

# Go's magicsock constants (magicsock.go, tsconst/ping.go), in seconds.
#: How long a pong makes an address the exclusive path without another pong.
TRUST_UDP_ADDR_DURATION = 6.5
#: How often the best path is pinged while the peer has traffic.
HEARTBEAT_INTERVAL = 3.0
#: Idle time after which heartbeats stop (and peer-reflexive candidates are forgotten).
SESSION_ACTIVE_TIMEOUT = 45.0
#: How often every candidate is pinged again although a direct path works.
UPGRADE_INTERVAL = 60.0
#: A path this fast is not worth upgrading from.
GOOD_ENOUGH_LATENCY = 0.005
#: How long a ping waits for its pong.
PING_TIMEOUT = 5.0
#: The least time between two discovery pings to one endpoint (a CallMeMaybe resets it).
DISCO_PING_INTERVAL = 5.0
#: The ping interval instead, while a peer with traffic has no path at all (no direct path and no
#: DERP): its packets wait, and a first ping may have reached the peer before the peer knew us.
NO_PATH_PING_INTERVAL = 1.0
#: A peer's ping from an address we have no trusted path to is answered with a ping of ours too,
#: unless ours went there less than this ago (then its pong is likely on the way).
PING_BACK_INTERVAL = 0.25
#: Candidates kept per peer beyond the network map's (Go prunes above 100).
MAX_CANDIDATES = 100
#: Pings in flight per peer (several per candidate at most; a bound for hostile maps).
MAX_PINGS_IN_FLIGHT = 256
#: The host of the per-peer DERP addresses WireGuard sends to (Tailscale's magic DERP IP; never a
#: real destination: the runtime routes these datagrams into DERP connections).
DERP_HOST = "127.3.3.40"
#: Endpoints sent in one CallMeMaybe (18 bytes each; Go sends a handful).
MAX_CALL_ME_MAYBE_ENDPOINTS = 32

_ZERO_KEY = bytes(32)
_NODE_KEY_ZERO = NodePublic.zero()


class PathKind(enum.Enum):
    """How a peer's packets travel."""

    #: UDP to an address a pong proved.
    DIRECT = "direct"
    #: Through a DERP relay (the peer's home region).
    DERP = "derp"
    #: No path yet: WireGuard packets to the peer wait.
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Path:
    """A peer's path as the status shows it: its kind, the direct address (or, for DERP, the
    region), and the last disco round trip on it in seconds (None: not measured)."""

    kind: PathKind
    address: Endpoint | None = None
    latency: float | None = None
    #: The DERP region of a :attr:`PathKind.DERP` path (0 otherwise).
    region: int = 0

    def __str__(self) -> str:
        if self.kind is PathKind.DIRECT and self.address is not None:
            host, port = self.address
            return f"direct [{host}]:{port}" if ":" in host else f"direct {host}:{port}"
        if self.kind is PathKind.DERP:
            return f'relay "{self.region}"'
        return "none"


NO_PATH = Path(PathKind.NONE)


@dataclass(frozen=True, slots=True)
class PathChanged:
    """A peer's path changed (WireGuard should send to ``path.address`` from now on)."""

    node_key: bytes
    path: Path


@dataclass(frozen=True, slots=True)
class PingReceived:
    """An authentic disco ping came from a peer: it is looking for a path to us (a handshake it
    could not answer for want of one is worth resending now)."""

    node_key: bytes
    source: Endpoint


PathEvent: TypeAlias = PathChanged | PingReceived


class PingPurpose(enum.Enum):
    DISCOVERY = "discovery"
    HEARTBEAT = "heartbeat"
    #: Through DERP: measures the relay's round trip.
    DERP = "derp"


@dataclass(slots=True)
class _Candidate:
    #: Listed in the network map (kept until the map drops it).
    from_netmap: bool = False
    #: When it last sent us an authentic ping or WireGuard packet (peer-reflexive; None: never).
    heard_at: float | None = None
    #: When CallMeMaybe last named it (None: never).
    call_me_maybe_at: float | None = None
    last_ping: float | None = None
    last_rx_ping_tx: bytes = b""
    latency: float | None = None

    def keep(self, now: float) -> bool:
        if self.from_netmap or self.call_me_maybe_at is not None:
            return True
        return self.heard_at is not None and now - self.heard_at <= SESSION_ACTIVE_TIMEOUT


@dataclass(slots=True)
class _SentPing:
    to: Endpoint
    at: float
    purpose: PingPurpose


@dataclass(slots=True)
class _Peer:
    node_key: bytes
    disco_key: bytes
    box: disco.DiscoBox | None
    candidates: dict[Endpoint, _Candidate] = field(default_factory=dict)
    #: The network map's order (the wireguard-only fallback is the first).
    netmap_order: list[Endpoint] = field(default_factory=list)
    pings: dict[bytes, _SentPing] = field(default_factory=dict)
    best: Endpoint | None = None
    best_latency: float = 0.0
    trust_until: float = float("-inf")
    last_send: float | None = None
    heartbeat_at: float | None = None
    last_full_ping: float | None = None
    #: Wireguard-only peers: the last authenticated source (WireGuard's roaming).
    roamed: Endpoint | None = None
    #: The path the last :class:`PathChanged` announced (events only when it moves).
    announced: Endpoint | None = None
    #: The peer's home DERP region (0: none known) and its DERP address for WireGuard.
    home_derp: int = 0
    derp_address: Endpoint = (DERP_HOST, 0)
    #: The last round trip of a disco ping through DERP, and when discovery last went via DERP.
    derp_latency: float | None = None
    last_derp_discovery: float | None = None
    #: The untrusted best path whose packets are also copied to DERP (a key of derp_copies).
    copying: Endpoint | None = None

    @property
    def has_disco(self) -> bool:
        return self.box is not None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_PRIVATE_V4 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_PRIVATE_V6 = ipaddress.ip_network("fc00::/7")


def _bonus(host: str) -> int:
    """Go's address preferences in betterAddr: loopback, link-local, private (Go's IsPrivate:
    RFC 1918 and fc00::/7 only), and IPv6."""
    try:
        address = _ip(host)
    except ValueError:
        return 0
    points = 0
    if address.is_loopback:
        points += 50
    elif address.is_link_local:
        points += 30
    elif isinstance(address, ipaddress.IPv4Address):
        if any(address in net for net in _PRIVATE_V4):
            points += 20
    elif address in _PRIVATE_V6:
        points += 20
    if address.version == 6:
        points += 10
    return points


def better_addr(a: Endpoint, a_latency: float, b: Endpoint | None, b_latency: float) -> bool:
    """Whether ``a`` (round trip ``a_latency``) is a better path than ``b`` (Go's betterAddr).

    Each side gets the percentage by which it is faster than the other (integer points, in
    nanoseconds as Go computes them), plus its address bonuses; ``a`` wins only with more points
    and not on a lone point of latency (the hysteresis that keeps two equal paths from flapping).
    """
    if a == b:
        return False
    if b is None:
        return True
    a_ns, b_ns = round(a_latency * 1e9), round(b_latency * 1e9)
    a_points = b_points = 0
    if a_ns > b_ns and a_ns > 0:
        b_points = 100 - (b_ns * 100) // a_ns
    elif b_ns > 0:
        a_points = 100 - (a_ns * 100) // b_ns
    a_points += _bonus(a[0])
    b_points += _bonus(b[0])
    if a_points <= 1 and b_points == 0:
        return False
    return a_points > b_points


class PathCore:
    """Every peer's candidate endpoints, disco pings and best path (see the module docstring).

    ``disco_private`` is this node's disco key (None: a node without disco, whose peers are all
    wireguard-only). ``random_bytes`` draws TxIDs and box nonces.
    """

    def __init__(
        self, disco_private: DiscoPrivate | None, *, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._private = disco_private
        self._random = random_bytes
        self._peers: dict[bytes, _Peer] = {}
        self._by_disco: dict[bytes, list[_Peer]] = {}
        self._events: deque[PathEvent] = deque()
        #: The node key sent in our pings (Tailscale's peers use it to find us): set by the owner.
        self.node_key: NodePublic = _NODE_KEY_ZERO
        #: Whether this node can reach DERP (it has a DERP map): peers without a direct path then
        #: go through their home region. Set with :meth:`set_derp_enabled`.
        self.derp_enabled = False
        #: This node's own endpoints (LAN and STUN-discovered), sent in CallMeMaybe.
        self.own_endpoints: tuple[Endpoint, ...] = ()
        #: Direct endpoints whose WireGuard packets also go to DERP right now -> the DERP address
        #: to send the copy to: the best path of a peer whose trust ran out (it may be dead), while
        #: this node has DERP and the peer a home region. Whoever sends the device's datagrams
        #: sends each one to such an endpoint twice (:class:`~embedmesh.devicepaths.DevicePaths`).
        self.derp_copies: dict[Endpoint, Endpoint] = {}
        # DERP addresses: (DERP_HOST, slot), one slot per peer for as long as it is known.
        self._by_slot: dict[int, _Peer] = {}
        self._next_slot = 1
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ peers

    def set_peer(
        self,
        node_key: bytes,
        disco_key: bytes,
        endpoints: Iterable[Endpoint],
        now: float,
        *,
        home_derp: int = 0,
    ) -> None:
        """Add a peer or update it from a new network map: its disco key (all zero: no disco),
        advertised endpoints, in the map's order, and home DERP region (0: none). Endpoints the
        map dropped are forgotten (and a best path among them is given up) unless a CallMeMaybe or
        a recent ping vouches for them."""
        peer = self._peers.get(node_key)
        last_send: float | None = None
        if peer is not None and peer.disco_key != disco_key:
            # A new disco key is a new disco session (the node restarted, or its key arrived
            # after the peer did): start over, but traffic that waits keeps waiting for a path.
            last_send = peer.last_send
            self.remove_peer(node_key)
            peer = None
        if peer is None:
            box = None
            if self._private is not None and disco_key != _ZERO_KEY and len(disco_key) == 32:
                try:
                    box = disco.DiscoBox(self._private, DiscoPublic(disco_key))
                except disco.DiscoError:
                    self.counters["bad_disco_key"] += 1
            peer = _Peer(node_key, disco_key, box)
            self._peers[node_key] = peer
            if box is not None:
                self._by_disco.setdefault(disco_key, []).append(peer)
                slot = self._next_slot
                while slot in self._by_slot:
                    slot = slot % 65535 + 1
                self._next_slot = slot % 65535 + 1
                self._by_slot[slot] = peer
                peer.derp_address = (DERP_HOST, slot)
        peer.home_derp = home_derp if 0 <= home_derp <= 0xFFFFFFFF else 0
        if last_send is not None and peer.has_disco and now - last_send <= SESSION_ACTIVE_TIMEOUT:
            peer.last_send = last_send
            peer.heartbeat_at = now  # discovery at the next handle_timeout
        order: list[Endpoint] = []
        for endpoint in endpoints:
            if endpoint not in order:
                order.append(endpoint)
        peer.netmap_order = order
        for endpoint, candidate in peer.candidates.items():
            candidate.from_netmap = endpoint in order
        for endpoint in order:
            peer.candidates.setdefault(endpoint, _Candidate()).from_netmap = True
        self._prune(peer, now)
        self._announce(peer)
        self._sync_copy(peer, now)

    def remove_peer(self, node_key: bytes) -> None:
        """Forget a peer and everything learnt about its paths."""
        peer = self._peers.pop(node_key, None)
        if peer is None:
            return
        sharing = self._by_disco.get(peer.disco_key)
        if sharing is not None:
            sharing[:] = [p for p in sharing if p is not peer]
            if not sharing:
                del self._by_disco[peer.disco_key]
        slot = peer.derp_address[1]
        if self._by_slot.get(slot) is peer:
            del self._by_slot[slot]
        self._stop_copy(peer)

    def set_derp_enabled(self, enabled: bool, now: float | None = None) -> None:
        """Whether DERP can carry packets now (the node has a DERP map with regions). With ``now``,
        untrusted paths start being copied to DERP at once (else at the next timer)."""
        if enabled == self.derp_enabled:
            return
        self.derp_enabled = enabled
        for peer in self._peers.values():
            self._announce(peer)
            if not enabled:
                self._stop_copy(peer)
            elif now is not None:
                self._sync_copy(peer, now)

    def derp_route(self, endpoint: Endpoint) -> tuple[bytes, int] | None:
        """The (node key, home region) a DERP address of :meth:`send_path` stands for, or None."""
        if endpoint[0] != DERP_HOST:
            return None
        peer = self._by_slot.get(endpoint[1])
        if peer is None:
            return None
        return peer.node_key, peer.home_derp

    def derp_address(self, node_key: bytes) -> Endpoint | None:
        """The source address to hand WireGuard and :meth:`receive_disco` for a packet the peer
        sent through DERP (None: not a disco peer of ours)."""
        peer = self._peers.get(node_key)
        if peer is None or peer.box is None:
            return None
        return peer.derp_address
    def __contains__(self, node_key: object) -> bool:
        return node_key in self._peers

    # ------------------------------------------------------------------ what WireGuard asks

    def send_path(self, node_key: bytes, now: float) -> Endpoint | None:
        """Where WireGuard packets to the peer go now: the best direct path (trusted, or still in
        use while pings look for another), or None (no path yet: hold them)."""
        peer = self._peers.get(node_key)
        if peer is None:
            return None
        if not peer.has_disco:
            return self._wg_only_path(peer)
        return self._send_address(peer)

    def _send_address(self, peer: _Peer) -> Endpoint | None:
        if peer.best is not None:
            return peer.best
        if self.derp_enabled and peer.home_derp:
            return peer.derp_address
        return None

    def path(self, node_key: bytes, now: float) -> Path:
        """The peer's path for the status: kind, address and last round trip."""
        peer = self._peers.get(node_key)
        if peer is None:
            return NO_PATH
        if not peer.has_disco:
            endpoint = self._wg_only_path(peer)
            return NO_PATH if endpoint is None else Path(PathKind.DIRECT, endpoint)
        if peer.best is None:
            if self.derp_enabled and peer.home_derp:
                return Path(PathKind.DERP, None, peer.derp_latency, peer.home_derp)
            return NO_PATH
        return Path(PathKind.DIRECT, peer.best, peer.best_latency)

    def trusted(self, node_key: bytes, now: float) -> bool:
        """Whether the peer's direct path was proven within :data:`TRUST_UDP_ADDR_DURATION`."""
        peer = self._peers.get(node_key)
        return peer is not None and peer.best is not None and now <= peer.trust_until

    def next_event(self) -> PathEvent | None:
        """The next event (h11 style), or None when there is none."""
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ inputs

    def note_send(self, node_key: bytes, now: float) -> list[Datagram]:
        """WireGuard has traffic for the peer: keep its path alive (heartbeats) and, with no
        trusted path, look for one at once. Returns the pings to send."""
        peer = self._peers.get(node_key)
        if peer is None:
            return []
        peer.last_send = now
        if not peer.has_disco:
            return []
        if peer.heartbeat_at is None:
            peer.heartbeat_at = now + self._heartbeat_interval(peer)
        out: list[Datagram] = []
        if peer.best is None or now > peer.trust_until:
            self._ping_all(peer, now, out)
        return out

    def note_wireguard(self, node_key: bytes, source: Endpoint, now: float) -> list[Datagram]:
        """An authenticated WireGuard packet from the peer came from ``source``: a hint, not an
        endpoint rewrite. A wireguard-only peer's path follows it (WireGuard's roaming); for a
        disco peer an unknown source becomes a candidate, pinged if no path is trusted."""
        peer = self._peers.get(node_key)
        if peer is None:
            return []
        if not peer.has_disco:
            peer.roamed = source
            self._announce(peer)
            return []
        if source[0] == DERP_HOST:
            return []  # through DERP: not an address to try
        out: list[Datagram] = []
        candidate = self._learn(peer, source, now)
        if candidate is not None and (peer.best is None or now > peer.trust_until):
            self._maybe_ping(peer, source, candidate, now, PingPurpose.DISCOVERY, out)
        return out

    def receive_disco(
        self, datagram: bytes | memoryview, source: Endpoint, now: float, *, via_derp: bool = False
    ) -> list[Datagram]:
        """One datagram that :func:`~embedmesh.tailscale.disco.classify` called disco; returns the
        replies. ``via_derp`` marks one a DERP relay delivered (the only way a CallMeMaybe counts;
        no DERP client exists yet, issue 10)."""
        if not disco.looks_like_disco(datagram) or len(datagram) < disco.WRAPPER_SIZE:
            self.counters["drop_not_disco"] += 1
            return []
        sharing = self._by_disco.get(bytes(datagram[len(disco.MAGIC) : disco.HEADER_SIZE]))
        if not sharing:
            self.counters["drop_unknown_sender"] += 1
            return []
        box = sharing[0].box
        assert box is not None
        try:
            message = box.open(datagram)
        except disco.DiscoError:
            self.counters["drop_bad_box"] += 1
            return []
        out: list[Datagram] = []
        if isinstance(message, disco.Ping):
            self._receive_ping(sharing, message, source, now, via_derp, out)
        elif isinstance(message, disco.Pong):
            self._receive_pong(sharing, message, source, now, via_derp)
        elif via_derp:
            for peer in sharing:
                self._receive_call_me_maybe(peer, message, now, out)
        else:
            self.counters["drop_call_me_maybe_not_via_derp"] += 1
        return out

    def _receive_ping(
        self,
        sharing: list[_Peer],
        ping: disco.Ping,
        source: Endpoint,
        now: float,
        via_derp: bool,
        out: list[Datagram],
    ) -> None:
        self.counters["rx_ping"] += 1
        if via_derp:
            # Answered through DERP, where it came from; the observed source is the DERP region
            # (what Go's pong carries then), and nothing is learnt about direct paths.
            box = sharing[0].box
            assert box is not None
            observed_derp = (ipaddress.ip_address(DERP_HOST), sharing[0].home_derp & 0xFFFF)
            pong = box.seal(disco.Pong(ping.tx_id, observed_derp), self._random(disco.NONCE_SIZE))
            out.append((pong, source))
            self.counters["tx_pong_derp"] += 1
            for peer in sharing:
                self._events.append(PingReceived(peer.node_key, source))
            return
        try:
            observed = (_ip(source[0]), source[1])
        except ValueError:
            self.counters["drop_bad_source"] += 1
            return
        duplicate = False
        for peer in sharing:
            candidate = self._learn(peer, source, now)
            if candidate is not None:
                duplicate |= candidate.last_rx_ping_tx == ping.tx_id
                candidate.last_rx_ping_tx = ping.tx_id
        if duplicate:
            self.counters["drop_duplicate_ping"] += 1
            return
        box = sharing[0].box
        assert box is not None
        out.append((box.seal(disco.Pong(ping.tx_id, observed), self._random(disco.NONCE_SIZE)), source))
        self.counters["tx_pong"] += 1
        for peer in sharing:
            self._events.append(PingReceived(peer.node_key, source))
            candidate = peer.candidates.get(source)
            if candidate is not None and (peer.best is None or now > peer.trust_until):
                # Its ping got through, so its NAT now lets ours in: ping back even if ours to
                # this address went unanswered a moment ago (an address-and-port-dependent NAT
                # dropped it), rather than after the 5-s discovery interval.
                last = candidate.last_ping
                if last is None or now - last >= PING_BACK_INTERVAL:
                    self._send_ping(peer, source, candidate, now, PingPurpose.DISCOVERY, out)

    def _receive_pong(self, sharing: list[_Peer], pong: disco.Pong, source: Endpoint, now: float, via_derp: bool) -> None:
        for peer in sharing:
            sent = peer.pings.pop(pong.tx_id, None)
            if sent is not None:
                break
        else:
            self.counters["drop_unknown_pong"] += 1
            return
        self.counters["rx_pong"] += 1
        if sent.purpose is PingPurpose.DERP:
            peer.derp_latency = max(now - sent.at, 0.0)
            return
        if via_derp:
            return
        candidate = peer.candidates.get(sent.to)
        if candidate is None:
            self.counters["drop_pong_forgotten_endpoint"] += 1
            return
        latency = max(now - sent.at, 0.0)
        candidate.latency = latency
        # The pong proves the address the ping went to (where it came from may differ: Go uses
        # the ping's destination too).
        if better_addr(sent.to, latency, peer.best, peer.best_latency) or now > peer.trust_until:
            peer.best = sent.to
        if peer.best == sent.to:
            peer.best_latency = latency
            peer.trust_until = now + TRUST_UDP_ADDR_DURATION
        self._announce(peer)
        self._sync_copy(peer, now)

    def _receive_call_me_maybe(self, peer: _Peer, message: disco.CallMeMaybe, now: float, out: list[Datagram]) -> None:
        self.counters["rx_call_me_maybe"] += 1
        named: set[Endpoint] = set()
        for ip, port in message.endpoints:
            if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
                continue  # Go ignores these too: it cannot tell which interface they belong to
            endpoint = (str(ip), port)
            named.add(endpoint)
            if endpoint not in peer.candidates:
                if len(peer.candidates) >= MAX_CANDIDATES + len(peer.netmap_order):
                    continue
                peer.candidates[endpoint] = _Candidate()
            peer.candidates[endpoint].call_me_maybe_at = now
        for endpoint, candidate in list(peer.candidates.items()):
            if candidate.call_me_maybe_at is not None and endpoint not in named:
                candidate.call_me_maybe_at = None
        self._prune(peer, now)
        # The peer just opened its side: ping everything now, whatever was sent lately.
        for candidate in peer.candidates.values():
            candidate.last_ping = None
        self._ping_all(peer, now, out)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timeout` has work (ping timeouts, heartbeats)."""
        deadline: float | None = None
        for peer in self._peers.values():
            for sent in peer.pings.values():
                at = sent.at + PING_TIMEOUT
                if deadline is None or at < deadline:
                    deadline = at
            at_hb = peer.heartbeat_at
            if at_hb is not None and (deadline is None or at_hb < deadline):
                deadline = at_hb
            if peer.copying is None and peer.best is not None and self._can_copy(peer):
                # When the trust runs out, packets start going to DERP as well.
                at_trust = peer.trust_until
                if deadline is None or at_trust < deadline:
                    deadline = at_trust
        return deadline

    def handle_timeout(self, now: float) -> list[Datagram]:
        """Expire pings, send heartbeats and rediscovery; returns the pings to send."""
        out: list[Datagram] = []
        for peer in list(self._peers.values()):
            expired = [tx for tx, sent in peer.pings.items() if sent.at + PING_TIMEOUT <= now]
            for tx in expired:
                sent = peer.pings.pop(tx)
                self.counters["ping_timeout"] += 1
                if sent.to == peer.best and now > peer.trust_until:
                    self._clear_best(peer, now)
            self._sync_copy(peer, now)
            at = peer.heartbeat_at
            if at is None or at > now:
                continue
            if peer.last_send is None or now - peer.last_send > SESSION_ACTIVE_TIMEOUT:
                peer.heartbeat_at = None  # idle: no heartbeats until the next send
                self._prune(peer, now)
                continue
            if peer.best is not None:
                candidate = peer.candidates.get(peer.best)
                if candidate is not None:
                    self._send_ping(peer, peer.best, candidate, now, PingPurpose.HEARTBEAT, out)
            if self._want_full_ping(peer, now):
                self._ping_all(peer, now, out)
            peer.heartbeat_at = now + self._heartbeat_interval(peer)
        return out

    # ------------------------------------------------------------------ internals

    def _heartbeat_interval(self, peer: _Peer) -> float:
        return HEARTBEAT_INTERVAL if self._send_address(peer) is not None else NO_PATH_PING_INTERVAL

    def _want_full_ping(self, peer: _Peer, now: float) -> bool:
        if peer.best is None or peer.last_full_ping is None or now > peer.trust_until:
            return True
        if peer.best_latency <= GOOD_ENOUGH_LATENCY:
            return False
        return now - peer.last_full_ping >= UPGRADE_INTERVAL

    def _ping_all(self, peer: _Peer, now: float, out: list[Datagram]) -> None:
        self._prune(peer, now)
        peer.last_full_ping = now
        for endpoint, candidate in list(peer.candidates.items()):
            self._maybe_ping(peer, endpoint, candidate, now, PingPurpose.DISCOVERY, out)
        self._discover_via_derp(peer, now, out)

    def _discover_via_derp(self, peer: _Peer, now: float, out: list[Datagram]) -> None:
        """CallMeMaybe (our endpoints: the peer pings them, opening our NAT's way in while ours
        open its) and a latency ping, through the peer's DERP region, once per ping interval."""
        if not (self.derp_enabled and peer.home_derp) or peer.box is None:
            return
        if peer.best is not None and now <= peer.trust_until:
            return
        last = peer.last_derp_discovery
        if last is not None and now - last < DISCO_PING_INTERVAL:
            return
        peer.last_derp_discovery = now
        if self.own_endpoints:
            endpoints = []
            for host, port in self.own_endpoints[: MAX_CALL_ME_MAYBE_ENDPOINTS]:
                try:
                    endpoints.append((_ip(host), port))
                except ValueError:
                    continue
            message = disco.CallMeMaybe(tuple(endpoints))
            out.append((peer.box.seal(message, self._random(disco.NONCE_SIZE)), peer.derp_address))
            self.counters["tx_call_me_maybe"] += 1
        self._send_ping(peer, peer.derp_address, None, now, PingPurpose.DERP, out)

    def _maybe_ping(
        self, peer: _Peer, endpoint: Endpoint, candidate: _Candidate, now: float, purpose: PingPurpose, out: list[Datagram]
    ) -> None:
        interval = DISCO_PING_INTERVAL if self._send_address(peer) is not None else NO_PATH_PING_INTERVAL
        if candidate.last_ping is not None and now - candidate.last_ping < interval:
            return
        self._send_ping(peer, endpoint, candidate, now, purpose, out)

    def _send_ping(
        self,
        peer: _Peer,
        endpoint: Endpoint,
        candidate: _Candidate | None,
        now: float,
        purpose: PingPurpose,
        out: list[Datagram],
    ) -> None:
        box = peer.box
        if box is None:
            return
        if len(peer.pings) >= MAX_PINGS_IN_FLIGHT:
            self.counters["ping_not_sent_too_many"] += 1
            return
        tx_id = self._random(disco.TX_ID_SIZE)
        while tx_id in peer.pings:
            tx_id = self._random(disco.TX_ID_SIZE)
        if candidate is not None:
            candidate.last_ping = now
        peer.pings[tx_id] = _SentPing(endpoint, now, purpose)
        out.append((box.seal(disco.Ping(tx_id, self.node_key), self._random(disco.NONCE_SIZE)), endpoint))
        self.counters["tx_ping"] += 1

    def _learn(self, peer: _Peer, source: Endpoint, now: float) -> _Candidate | None:
        """A peer-reflexive candidate (or a known one heard from again); None when full."""
        candidate = peer.candidates.get(source)
        if candidate is None:
            if len(peer.candidates) >= MAX_CANDIDATES + len(peer.netmap_order):
                self._prune(peer, now)
                if len(peer.candidates) >= MAX_CANDIDATES + len(peer.netmap_order):
                    self.counters["candidate_not_kept_full"] += 1
                    return None
            candidate = peer.candidates[source] = _Candidate()
            self.counters["candidate_learnt"] += 1
        candidate.heard_at = now
        return candidate

    def _prune(self, peer: _Peer, now: float) -> None:
        for endpoint in [e for e, c in peer.candidates.items() if not c.keep(now)]:
            del peer.candidates[endpoint]
            if peer.best == endpoint:
                self._clear_best(peer, now)

    def _clear_best(self, peer: _Peer, now: float) -> None:
        if peer.best is None:
            return
        peer.best = None
        peer.best_latency = 0.0
        peer.trust_until = float("-inf")
        self._announce(peer)
        self._stop_copy(peer)

    def _can_copy(self, peer: _Peer) -> bool:
        return self.derp_enabled and bool(peer.home_derp) and peer.box is not None

    def _sync_copy(self, peer: _Peer, now: float) -> None:
        """Copy the peer's packets to DERP exactly while its best path is untrusted (from the last
        instant of trust on: handle_timeout runs at trust_until and must change something then)."""
        want = peer.best if now >= peer.trust_until and self._can_copy(peer) else None
        if want == peer.copying:
            return
        self._stop_copy(peer)
        if want is not None:
            peer.copying = want
            self.derp_copies[want] = peer.derp_address
            self.counters["derp_copy_start"] += 1

    def _stop_copy(self, peer: _Peer) -> None:
        if peer.copying is not None:
            if self.derp_copies.get(peer.copying) == peer.derp_address:
                del self.derp_copies[peer.copying]
            peer.copying = None

    def _wg_only_path(self, peer: _Peer) -> Endpoint | None:
        if peer.roamed is not None:
            return peer.roamed
        return peer.netmap_order[0] if peer.netmap_order else None

    def _announce(self, peer: _Peer) -> None:
        endpoint = self._send_address(peer) if peer.has_disco else self._wg_only_path(peer)
        if endpoint == peer.announced:
            return
        peer.announced = endpoint
        if endpoint is None:
            self._events.append(PathChanged(peer.node_key, NO_PATH))
        elif endpoint[0] == DERP_HOST and peer.has_disco:
            self._events.append(PathChanged(peer.node_key, Path(PathKind.DERP, None, peer.derp_latency, peer.home_derp)))
        else:
            latency = peer.best_latency if peer.has_disco else None
            self._events.append(PathChanged(peer.node_key, Path(PathKind.DIRECT, endpoint, latency)))


__all__ = [
    "DERP_HOST",
    "DISCO_PING_INTERVAL",
    "GOOD_ENOUGH_LATENCY",
    "HEARTBEAT_INTERVAL",
    "NO_PATH",
    "PING_TIMEOUT",
    "SESSION_ACTIVE_TIMEOUT",
    "TRUST_UDP_ADDR_DURATION",
    "UPGRADE_INTERVAL",
    "Datagram",
    "Endpoint",
    "Path",
    "PathChanged",
    "PathCore",
    "PathEvent",
    "PathKind",
    "PingReceived",
    "better_addr",
]
