"""The network map a node receives from control, and the deltas that update it.

A :class:`NetworkMap` is immutable; :meth:`NetworkMap.apply` returns the map after one
:class:`MapDelta`, whose operations apply in order. The server sends a full map when a stream starts
(or the node enters the mesh) and deltas afterwards; applying every delta to the first map gives
what the server would send as a full map at that moment (a property test checks exactly this).

Peers are keyed by node id, which the server never reuses; a node key can change (re-authentication),
an id cannot. The packet filter is a list of rules so that ACLs can replace today's allow-all without
changing the shape of the map.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final, Literal

from embedmesh.control.errors import NetmapDesyncError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Unchanged(enum.Enum):
    """Marks a field a :class:`PeerChange` leaves as it is (for fields where None is a value)."""

    UNCHANGED = 0


UNCHANGED: Final = Unchanged.UNCHANGED


class NodeState(enum.Enum):
    """Where the node itself stands with control."""

    #: In the mesh: it has peers and peers have it.
    AUTHORIZED = "authorized"
    #: Registered but waiting for an admin (``embedmesh control nodes approve <id>``).
    PENDING_APPROVAL = "pending_approval"
    #: Its node key expired (or an admin expired it): cut off until it re-authenticates.
    KEY_EXPIRED = "key_expired"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One node as the map shows it (peers, and the node itself as ``NetworkMap.self_node``)."""

    id: int
    node_key: bytes
    disco_key: bytes
    #: The DNS label control gave the node (unique in the tailnet; ``web``, ``web-1``, ...).
    name: str
    #: The hostname the node asked for.
    hostname: str
    fqdn: str
    #: Overlay addresses.
    addresses: tuple[IPAddress, ...]
    #: Overlay prefixes routed to this peer (its addresses as /32 and /128 for now).
    allowed_ips: tuple[IPNetwork, ...]
    #: Underlay endpoints, ``"ip:port"`` / ``"[ip6]:port"``, as the node reported them.
    endpoints: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    user: str = ""
    os: str = ""
    online: bool = False
    last_seen: float | None = None
    authorized: bool = True
    #: Unix time when the node key expires; None means never.
    key_expiry: float | None = None
    key_expired: bool = False
    ephemeral: bool = False
    #: The DERP region the node calls home (0: none), as a Tailscale client reports it.
    home_derp: int = 0

    def __repr__(self) -> str:
        return (
            f"PeerInfo(id={self.id}, name={self.name!r}, addresses={[str(a) for a in self.addresses]}, "
            f"endpoints={list(self.endpoints)}, online={self.online})"
        )

    @property
    def state(self) -> NodeState:
        if not self.authorized:
            return NodeState.PENDING_APPROVAL
        if self.key_expired:
            return NodeState.KEY_EXPIRED
        return NodeState.AUTHORIZED


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """MagicDNS settings: names are ``<name>.<base_domain>``."""

    base_domain: str
    magic_dns: bool = True
    search_domains: tuple[str, ...] = ()
    #: Admin-configured records ``(name, type, value)``, e.g. ``("printer", "A", "192.168.1.9")``;
    #: a name without a dot is relative to the base domain.
    extra_records: tuple[tuple[str, str, str], ...] = ()
    #: Split DNS: a domain and the resolvers (``"ip:port"``) its names are sent to.
    split_dns: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class FilterRule:
    """Accept packets from ``sources`` to ``destinations`` on ``ports`` (``"*"`` is anything).

    ``protocols`` are IP protocol numbers; empty means TCP, UDP and ICMP.
    """

    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    ports: tuple[tuple[int, int], ...] = ((0, 65535),)
    protocols: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PacketFilter:
    """Inbound filter rules; a packet passes if any rule accepts it."""

    rules: tuple[FilterRule, ...]


ALLOW_ALL = PacketFilter((FilterRule(("*",), ("*",)),))


@dataclass(frozen=True, slots=True)
class PeerAdded:
    """A peer joins the map (or replaces the entry with the same id)."""

    peer: PeerInfo
    op: Literal["add"] = "add"


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    id: int
    op: Literal["remove"] = "remove"


@dataclass(frozen=True, slots=True)
class PeerChange:
    """Some fields of one peer changed. ``None`` (or :data:`UNCHANGED`) leaves a field as it is."""

    id: int
    node_key: bytes | None = None
    disco_key: bytes | None = None
    name: str | None = None
    hostname: str | None = None
    fqdn: str | None = None
    endpoints: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    user: str | None = None
    os: str | None = None
    online: bool | None = None
    last_seen: float | Unchanged | None = UNCHANGED
    key_expiry: float | Unchanged | None = UNCHANGED
    home_derp: int | None = None
    op: Literal["change"] = "change"

    def changes(self) -> dict[str, object]:
        """The fields this change sets, by name."""
        out: dict[str, object] = {}
        for name in CHANGEABLE_FIELDS:
            value = getattr(self, name)
            if name in NULLABLE_FIELDS:
                if value is not UNCHANGED:
                    out[name] = value
            elif value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class SelfChanged:
    """The node's own entry changed (rename, expiry, approval)."""

    node: PeerInfo
    op: Literal["self"] = "self"


@dataclass(frozen=True, slots=True)
class DNSChanged:
    dns: DNSConfig
    op: Literal["dns"] = "dns"


@dataclass(frozen=True, slots=True)
class FilterChanged:
    packet_filter: PacketFilter
    op: Literal["filter"] = "filter"


DeltaOp = PeerAdded | PeerRemoved | PeerChange | SelfChanged | DNSChanged | FilterChanged

CHANGEABLE_FIELDS: tuple[str, ...] = (
    "node_key",
    "disco_key",
    "name",
    "hostname",
    "fqdn",
    "endpoints",
    "tags",
    "user",
    "os",
    "online",
    "last_seen",
    "key_expiry",
    "home_derp",
)
NULLABLE_FIELDS = frozenset({"last_seen", "key_expiry"})


@dataclass(frozen=True, slots=True)
class MapDelta:
    ops: tuple[DeltaOp, ...]


@dataclass(frozen=True, slots=True)
class NetworkMap:
    """Everything a node knows about its tailnet at one moment."""

    self_node: PeerInfo
    peers: Mapping[int, PeerInfo] = field(default_factory=dict)
    dns: DNSConfig = field(default_factory=lambda: DNSConfig("mesh.internal"))
    packet_filter: PacketFilter = ALLOW_ALL

    def __repr__(self) -> str:
        return f"NetworkMap(self={self.self_node.name!r}, state={self.state.value}, peers={len(self.peers)})"

    @property
    def state(self) -> NodeState:
        return self.self_node.state

    def peer_by_node_key(self, node_key: bytes) -> PeerInfo | None:
        for peer in self.peers.values():
            if peer.node_key == node_key:
                return peer
        return None

    def peer_by_name(self, name: str) -> PeerInfo | None:
        for peer in self.peers.values():
            if name in (peer.name, peer.fqdn):
                return peer
        return None

    def apply(self, delta: MapDelta) -> NetworkMap:
        """The map after ``delta``; raises :class:`NetmapDesyncError` if a change names no peer."""
        peers = dict(self.peers)
        self_node, dns, packet_filter = self.self_node, self.dns, self.packet_filter
        for op in delta.ops:
            if isinstance(op, PeerAdded):
                peers[op.peer.id] = op.peer
            elif isinstance(op, PeerRemoved):
                peers.pop(op.id, None)
            elif isinstance(op, PeerChange):
                current = peers.get(op.id)
                if current is None:
                    raise NetmapDesyncError(f"delta changes peer {op.id}, which is not in the map")
                peers[op.id] = dataclasses.replace(current, **op.changes())  # type: ignore[arg-type]
            elif isinstance(op, SelfChanged):
                self_node = op.node
            elif isinstance(op, DNSChanged):
                dns = op.dns
            else:
                packet_filter = op.packet_filter
        return NetworkMap(self_node, peers, dns, packet_filter)
