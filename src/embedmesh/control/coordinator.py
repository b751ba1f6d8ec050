"""The coordination server's core, sans-IO: nodes, registration, and the fan-out of map deltas.

The coordinator owns the authoritative tailnet state (persisted in :class:`Store`, mirrored in
memory) and one :class:`Stream` per connected node. Every change goes through :meth:`_update`, which
persists it, works out whether the node entered or left the mesh, and encodes one op (JSON bytes)
for everyone who sees it. Nothing recomputes the world: a node's full map is built only when its
stream starts or it enters the mesh (headscale's scaling bugs, docs/control.md).

Fan-out. Under the allow-all policy every node in the mesh sees every other, so a change is appended
once to a shared *change log* (``(source id, op bytes)``) and each stream keeps a cursor into it:
queueing is O(1) per change, and a stream's writer takes everything past its cursor in one message
(skipping its own changes). Writers that are idle park themselves; a change wakes only parked
writers, so during churn (a thousand nodes reconnecting) busy writers batch instead of being woken
per change. The work per change is still proportional to the viewers, but it is paid by the writers
(one join, one encryption, one send per batch), not by the change. Under any other :class:`Policy`
the coordinator pushes the op onto each viewer's own queue after asking ``can_see``; ACLs will give
that path an index from each node to its viewers.

Time is handed in (``now``: Unix seconds, since key expiry is wall-clock time); randomness comes from
the ``random_bytes`` callable. The server calls :meth:`handle_timeout` when :meth:`next_deadline`
passes.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import ipaddress
import json
import logging
import math
import re
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from embedmesh.control.addresses import AddressPool, ipv6_for
from embedmesh.control.authkeys import AuthKeyRecord, check_auth_key, new_auth_key, parse_auth_key
from embedmesh.control.errors import (
    ApprovalRefusedError,
    AuthKeyRequiredError,
    BadRequestError,
    ConflictError,
    ControlError,
    ControlProtocolError,
    NodeDeletedError,
    NotFoundError,
    RegistrationLimitError,
    SessionReplacedError,
    TagNotPermittedError,
)
from embedmesh.control.messages import (
    FQDN_RE,
    LABEL_RE,
    MAX_TAGS,
    TAG_RE,
    RegisterRequest,
    dumps,
    encode_delta_ops,
    encode_full_map,
    encode_op,
    encode_peer,
    parse_dns_config,
)
from embedmesh.control.netmap import (
    ALLOW_ALL,
    CHANGEABLE_FIELDS,
    DNSChanged,
    DNSConfig,
    NetworkMap,
    NodeState,
    PacketFilter,
    PeerAdded,
    PeerChange,
    PeerInfo,
    PeerRemoved,
    SelfChanged,
)
from embedmesh.control.store import NodeRecord, Store, UserRecord

logger = logging.getLogger("embedmesh.control.server")

DAY = 86400.0
#: Trim the change log every this many entries.
_TRIM_EVERY = 4096
#: A stream this far behind the log gets a full map instead of the backlog.
_MAX_LAG = 262_144
DEFAULT_KEY_EXPIRY = 180 * DAY
#: The longest an auth key may stay valid (admin tools print its expiry as a date).
MAX_KEY_LIFETIME = 100 * 365 * DAY
DEFAULT_EPHEMERAL_TIMEOUT = 60.0
TAGGED_OWNER = "tagged-devices"
DEFAULT_OWNER = "default"
#: User names: what headscale and Tailscale accept as login names (an email address fits).
USER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._@+-]{0,63}")
MAX_DISPLAY_NAME = 128

_PERSISTED = frozenset(f.name for f in dataclasses.fields(NodeRecord)) - {"id"}


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    base_domain: str = "mesh.internal"
    approval_required: bool = False
    #: Seconds a node key stays valid after (re-)authentication; None means never.
    key_expiry: float | None = DEFAULT_KEY_EXPIRY
    #: Seconds after an ephemeral node's stream drops before it is deleted.
    ephemeral_timeout: float = DEFAULT_EPHEMERAL_TIMEOUT
    #: With approval required, nodes may register without a key and wait for an admin. Anyone who
    #: can reach the server can do that, so such nodes are capped in total ...
    max_pending: int = 100
    #: ... and each source address (an IPv6 /64 counts as one) may add this many in a burst,
    #: then one every ``keyless_interval`` seconds.
    keyless_burst: int = 5
    keyless_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.max_pending < 0 or self.keyless_burst < 1 or not self.keyless_interval > 0:
            raise ValueError("max_pending must be >= 0, keyless_burst >= 1 and keyless_interval > 0")
        if FQDN_RE.fullmatch(self.base_domain) is None or len(self.base_domain) > 200:
            raise ValueError(f"base domain {self.base_domain!r} is not a valid DNS name (e.g. mesh.internal)")


class Policy:
    """Who sees whom. Allow-all today; an ACL policy overrides both methods with edge indexes."""

    allows_all = True

    def can_see(self, viewer: LiveNode, peer: LiveNode) -> bool:
        return True

    def packet_filter(self, node: LiveNode) -> PacketFilter:
        return ALLOW_ALL


@dataclass(slots=True, eq=False)
class LiveNode:
    """A node: its persisted record plus what only exists while the server runs."""

    rec: NodeRecord
    expired: bool = False
    online: bool = False
    endpoints: tuple[str, ...] = ()
    #: The DERP region a Tailscale client says it calls home (its map requests' NetInfo).
    home_derp: int = 0
    disconnected_at: float | None = None
    _fragment: bytes | None = None
    #: A map API's own rendering of this node (Tailscale's JSON), kept until the node changes:
    #: one rendering serves every full map that lists the node.
    rendered: Any = None

    @property
    def id(self) -> int:
        return self.rec.id

    @property
    def in_mesh(self) -> bool:
        return self.rec.authorized and not self.expired

    @property
    def state(self) -> NodeState:
        if not self.rec.authorized:
            return NodeState.PENDING_APPROVAL
        if self.expired:
            return NodeState.KEY_EXPIRED
        return NodeState.AUTHORIZED


@dataclass(slots=True, eq=False)
class Stream:
    """A connected node's outgoing queue. The server drains it with :meth:`Coordinator.take`."""

    node_id: int
    wake: Callable[[], None]
    #: Complete messages (registered, error, logged_out), sent first and in order.
    outbox: list[bytes] = field(default_factory=list)
    #: Encoded delta ops for this stream only (its own entry; every peer op under a non-allow-all
    #: policy), shared bytes with the other streams that get the same change.
    ops: list[bytes] = field(default_factory=list)
    #: Position in the coordinator's change log up to which this stream has been served.
    cursor: int = 0
    needs_full_map: bool = True
    #: After the outbox drains, the server closes the connection.
    closing: bool = False
    #: Counters for benchmarks and `nodes list`.
    messages_sent: int = 0
    bytes_sent: int = 0

    def _push_op(self, fragment: bytes) -> None:
        if not self.needs_full_map:
            self.ops.append(fragment)
            self.wake()

    def _push_message(self, payload: bytes, *, close: bool = False) -> None:
        self.outbox.append(payload)
        self.closing = self.closing or close
        self.wake()


@dataclass(slots=True)
class Batch:
    """One :meth:`Coordinator.take_batch`: what a stream's writer sends next."""

    #: Complete messages (registered, error, logged_out), in order.
    messages: list[bytes]
    #: The node whose full map goes next (after the messages), or None.
    full_map: LiveNode | None = None
    #: Encoded delta ops (:func:`encode_op`), in order; the bytes objects are shared among streams.
    ops: list[bytes] = field(default_factory=list)


_MAX_BUCKETS = 65536


def _source_bucket(source: str) -> str:
    """The rate-limit key of a remote address: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address)


def _error_payload(error: ControlError) -> bytes:
    return dumps({"type": "error", "code": error.code, "message": str(error)})


def sanitize_hostname(hostname: str) -> str:
    """A DNS label from what the node calls itself: ``My Laptop.local`` -> ``my-laptop``."""
    label = hostname.strip().lower().split(".", 1)[0]
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")
    label = re.sub(r"-{2,}", "-", label)[:63].strip("-")
    return label or "node"


def _owner(tags: tuple[str, ...], key: AuthKeyRecord | None) -> str:
    """Who a node belongs to: tags replace the user's identity (as in Tailscale)."""
    if tags:
        return TAGGED_OWNER
    return key.user if key is not None and key.user is not None else DEFAULT_OWNER


def _encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


class Coordinator:
    """The tailnet: registration, admin operations and map fan-out."""

    def __init__(
        self,
        store: Store,
        config: CoordinatorConfig,
        *,
        now: float,
        random_bytes: Callable[[int], bytes],
        policy: Policy | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.policy = policy or Policy()
        self._random_bytes = random_bytes
        self._nodes: dict[int, LiveNode] = {}
        self._by_machine: dict[bytes, LiveNode] = {}
        self._by_node_key: dict[bytes, LiveNode] = {}
        self._by_name: dict[str, LiveNode] = {}
        self._streams: dict[int, Stream] = {}
        self._expiries: list[tuple[float, int]] = []
        self._reaps: list[tuple[float, int]] = []
        #: Keyless registrations per source (address, IPv6 /64): (tokens, when).
        self._keyless_buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.dns = DNSConfig(config.base_domain, True, (config.base_domain,))
        saved = store.get_meta("dns")
        if saved:
            self.dns = self._dns_with(json.loads(saved))
        records = store.load_nodes()
        self._pool = AddressPool(r.ipv4 for r in records if r.ipv4 is not None)
        for rec in records:
            self._drop_ungranted_tags(rec)
            node = LiveNode(rec)
            node.expired = rec.key_expiry is not None and rec.key_expiry <= now
            self._index(node)
            if rec.key_expiry is not None and not node.expired:
                heapq.heappush(self._expiries, (rec.key_expiry, rec.id))
            if rec.ephemeral:
                # Nobody is connected yet: an ephemeral node that does not come back is reaped.
                node.disconnected_at = now
                heapq.heappush(self._reaps, (now + config.ephemeral_timeout, rec.id))
        self._log: list[tuple[int, bytes]] = []
        self._log_start = 0
        self._parked: set[Stream] = set()
        #: changes: state changes seen by someone; broadcasts: ops appended to the change log;
        #: ops_queued: ops pushed on single streams; ops_sent: ops delivered in delta messages.
        self.counters: dict[str, int] = {
            "changes": 0,
            "broadcasts": 0,
            "ops_queued": 0,
            "ops_sent": 0,
            "full_maps": 0,
        }

    # ------------------------------------------------------------------ indexes and views

    def _index(self, node: LiveNode) -> None:
        self._nodes[node.id] = node
        self._by_machine[node.rec.machine_key] = node
        self._by_node_key[node.rec.node_key] = node
        self._by_name[node.rec.name] = node

    def _unindex(self, node: LiveNode) -> None:
        self._nodes.pop(node.id, None)
        self._by_machine.pop(node.rec.machine_key, None)
        self._by_node_key.pop(node.rec.node_key, None)
        self._by_name.pop(node.rec.name, None)

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, node_id: int) -> LiveNode:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"no node with id {node_id}: see `embedmesh control nodes list`")
        return node

    def find_node(self, node_id: int) -> LiveNode | None:
        """The node with this id, or None (deleted)."""
        return self._nodes.get(node_id)

    def nodes(self) -> Iterator[LiveNode]:
        return iter(self._nodes.values())

    def node_by_machine(self, machine_key: bytes) -> LiveNode | None:
        return self._by_machine.get(machine_key)

    def node_by_node_key(self, node_key: bytes) -> LiveNode | None:
        return self._by_node_key.get(node_key)

    def update_node_session(
        self,
        node_id: int,
        *,
        disco_key: bytes | None = None,
        endpoints: tuple[str, ...] | None = None,
        home_derp: int | None = None,
    ) -> None:
        """What a Tailscale client's map request says of itself: disco key, endpoints, home DERP."""
        node = self.node(node_id)
        changes: dict[str, Any] = {}
        if home_derp is not None and home_derp != node.home_derp:
            changes["home_derp"] = home_derp
        if disco_key is not None and disco_key != node.rec.disco_key:
            changes["disco_key"] = disco_key
        if endpoints is not None and endpoints != node.endpoints:
            changes["endpoints"] = endpoints
        if changes:
            self._update(node, **changes)

    def logout_node(self, node_id: int, now: float) -> None:
        """A logout outside a stream (Tailscale's register with a past expiry)."""
        node = self.node(node_id)
        stream = self._streams.get(node_id)
        if stream is not None:
            self.logout(stream, now)
            return
        if node.rec.ephemeral:
            self._delete(node, None)
        else:
            self._update(node, key_expiry=now, expired=True)
        logger.info("node %d %s logged out", node.id, node.rec.name)

    def stream_of(self, node_id: int) -> Stream | None:
        return self._streams.get(node_id)

    def peer_info(self, node: LiveNode) -> PeerInfo:
        rec = node.rec
        addresses: tuple[IPv4Address | IPv6Address, ...] = ()
        allowed_ips: tuple[IPv4Network | IPv6Network, ...] = ()
        if rec.ipv4 is not None:
            v4 = IPv4Address(rec.ipv4)
            v6 = ipv6_for(v4)
            addresses = (v4, v6)
            allowed_ips = (IPv4Network(f"{v4}/32"), IPv6Network(f"{v6}/128"))
        return PeerInfo(
            id=rec.id,
            node_key=rec.node_key,
            disco_key=rec.disco_key,
            name=rec.name,
            hostname=rec.hostname,
            fqdn=f"{rec.name}.{self.config.base_domain}",
            addresses=addresses,
            allowed_ips=allowed_ips,
            endpoints=node.endpoints,
            tags=rec.tags,
            user=rec.user,
            os=rec.os,
            online=node.online,
            last_seen=rec.last_seen,
            authorized=rec.authorized,
            key_expiry=rec.key_expiry,
            key_expired=node.expired,
            ephemeral=rec.ephemeral,
            home_derp=node.home_derp,
        )

    def _fragment(self, node: LiveNode) -> bytes:
        if node._fragment is None:
            node._fragment = encode_peer(self.peer_info(node))
        return node._fragment

    def _visible_peers(self, viewer: LiveNode) -> Iterator[LiveNode]:
        if not viewer.in_mesh:
            return
        policy = self.policy
        for peer in self._nodes.values():
            if peer is not viewer and peer.in_mesh and (policy.allows_all or policy.can_see(viewer, peer)):
                yield peer

    def _viewers(self, node: LiveNode) -> Iterator[Stream]:
        """Streams of the nodes that see ``node`` (not its own)."""
        policy = self.policy
        for stream in self._streams.values():
            if stream.node_id == node.id:
                continue
            viewer = self._nodes[stream.node_id]
            if viewer.in_mesh and (policy.allows_all or policy.can_see(viewer, node)):
                yield stream

    def network_map(self, node_id: int) -> NetworkMap:
        """What a full map for ``node_id`` holds right now (the oracle the deltas must match)."""
        viewer = self.node(node_id)
        peers = {p.id: self.peer_info(p) for p in self._visible_peers(viewer)}
        return NetworkMap(self.peer_info(viewer), peers, self.dns, self.policy.packet_filter(viewer))

    def _full_map_payload(self, viewer: LiveNode) -> bytes:
        self.counters["full_maps"] += 1
        return encode_full_map(
            self.peer_info(viewer),
            (self._fragment(p) for p in self._visible_peers(viewer)),
            self.dns,
            self.policy.packet_filter(viewer),
        )

    # ------------------------------------------------------------------ the one place state changes

    def _update(self, node: LiveNode, **changes: Any) -> None:
        """Apply field changes (record or runtime), persist them and tell whoever sees the node."""
        was_in_mesh = node.in_mesh
        before = self.peer_info(node)
        persisted = {k: v for k, v in changes.items() if k in _PERSISTED}
        if persisted:
            self.store.update_node(node.id, **persisted)
        for name, value in changes.items():
            if name in _PERSISTED:
                setattr(node.rec, name, value)
            else:
                setattr(node, name, value)
        if "node_key" in changes and before.node_key != node.rec.node_key:
            self._by_node_key.pop(before.node_key, None)
            self._by_node_key[node.rec.node_key] = node
        if "name" in changes and before.name != node.rec.name:
            self._by_name.pop(before.name, None)
            self._by_name[node.rec.name] = node
        if "key_expiry" in changes and node.rec.key_expiry is not None and not node.expired:
            heapq.heappush(self._expiries, (node.rec.key_expiry, node.id))
        after = self.peer_info(node)
        if after == before:
            return
        node._fragment = None
        node.rendered = None
        self.counters["changes"] += 1
        is_in_mesh = node.in_mesh
        own = self._streams.get(node.id)
        if was_in_mesh and is_in_mesh:
            diff = {
                f: getattr(after, f) for f in CHANGEABLE_FIELDS if getattr(after, f) != getattr(before, f)
            }
            if diff:
                self._fan_out(node, encode_op(PeerChange(node.id, **diff)))
            if own is not None:
                own._push_op(encode_op(SelfChanged(after)))
        elif is_in_mesh:
            self._fan_out(node, encode_op(PeerAdded(after)))
            if own is not None:
                self._send_full_map(own)
        elif was_in_mesh:
            self._fan_out(node, encode_op(PeerRemoved(node.id)))
            if own is not None:
                self._send_full_map(own)
        elif own is not None:
            own._push_op(encode_op(SelfChanged(after)))

    def _dns_with(self, settings: dict[str, Any]) -> DNSConfig:
        """The DNS config with admin ``settings`` ({"extra_records": [...], "split_dns": [...]})
        validated by the same rules as the wire format."""
        document = {
            "base_domain": self.config.base_domain,
            "magic_dns": True,
            "search_domains": [self.config.base_domain],
            "extra_records": settings.get("extra_records", []),
            "split_dns": settings.get("split_dns", []),
        }
        try:
            return parse_dns_config(document)
        except ControlProtocolError as exc:
            raise BadRequestError(str(exc)) from None

    def set_dns(self, settings: dict[str, Any]) -> DNSConfig:
        """Replace the admin DNS settings (extra records, split DNS), persist them and push the
        change to every node as one delta."""
        dns = self._dns_with(settings)
        self.store.set_meta(
            "dns",
            json.dumps(
                {
                    "extra_records": [list(r) for r in dns.extra_records],
                    "split_dns": [[d, list(u)] for d, u in dns.split_dns],
                }
            ),
        )
        self.dns = dns
        fragment = encode_op(DNSChanged(dns))
        if self.policy.allows_all:
            # Node ids start at 1: source 0 is "the server", so no stream skips it as its own.
            self._log.append((0, fragment))
            if self._parked:
                parked, self._parked = self._parked, set()
                for stream in parked:
                    stream.wake()
        else:
            for stream in self._streams.values():
                if self._nodes[stream.node_id].in_mesh:
                    stream._push_op(fragment)
        return dns

    def _fan_out(self, node: LiveNode, fragment: bytes) -> None:
        if self.policy.allows_all:
            self._log.append((node.id, fragment))
            self.counters["broadcasts"] += 1
            if self._parked:
                parked, self._parked = self._parked, set()
                for stream in parked:
                    stream.wake()
            if len(self._log) >= _TRIM_EVERY and len(self._log) % _TRIM_EVERY == 0:
                self._trim_log()
            return
        count = 0
        for stream in self._viewers(node):
            stream._push_op(fragment)
            count += 1
        self.counters["ops_queued"] += count

    @property
    def log_end(self) -> int:
        """The change log position after the newest entry."""
        return self._log_start + len(self._log)

    def _trim_log(self) -> None:
        """Drop log entries every stream has been served; streams too far behind get a full map."""
        end = self.log_end
        oldest = end
        for stream in self._streams.values():
            if stream.needs_full_map or not self._nodes[stream.node_id].in_mesh:
                stream.cursor = end
            elif end - stream.cursor > _MAX_LAG:
                self._send_full_map(stream)
            else:
                oldest = min(oldest, stream.cursor)
        del self._log[: oldest - self._log_start]
        self._log_start = oldest

    def _send_full_map(self, stream: Stream) -> None:
        stream.needs_full_map = True
        stream.ops.clear()
        stream.cursor = self.log_end
        stream.wake()

    def park(self, stream: Stream) -> bool:
        """The stream's writer wants to sleep: True if nothing is pending (it will be woken)."""
        if (
            stream.outbox
            or stream.ops
            or stream.needs_full_map
            or stream.closing
            or (stream.cursor < self.log_end and self._has_log_entries_for(stream))
        ):
            return False
        self._parked.add(stream)
        return True

    def _has_log_entries_for(self, stream: Stream) -> bool:
        node = self._nodes.get(stream.node_id)
        if node is None or not node.in_mesh:
            stream.cursor = self.log_end
            return False
        return True

    # ------------------------------------------------------------------ the stream protocol

    def register(
        self, machine_key: bytes, request: RegisterRequest, now: float, source: str | None = None
    ) -> LiveNode:
        """Register or re-register a machine; raises the :class:`ControlError` that explains a refusal.

        ``source`` is the connection's remote address: keyless registrations are rate-limited by it.
        """
        existing = self._by_machine.get(machine_key)
        holder = self._by_node_key.get(request.node_key)
        if holder is not None and holder is not existing:
            raise ConflictError("this node key belongs to another machine: generate a new node key")
        if (
            existing is not None
            and existing.rec.node_key == request.node_key
            and (not existing.expired or request.auth_key is None)
        ):
            # A restart with the same keys: no auth key needed (an expired node stays cut off
            # until it brings a new auth key or an admin approves it again).
            self._check_kept_tags(existing, request)
            self._update(
                existing,
                disco_key=request.disco_key,
                hostname=request.hostname,
                os=request.os,
                endpoints=request.endpoints,
            )
            return existing
        if request.auth_key is None:
            if existing is not None and not existing.rec.authorized:
                self._check_kept_tags(existing, request)
                self._update(existing, node_key=request.node_key, disco_key=request.disco_key)
                return existing
            if existing is not None:
                raise AuthKeyRequiredError(
                    "this machine is registered with another node key: re-authenticate with an auth key "
                    "(`embedmesh control authkey create`)"
                )
            if not self.config.approval_required:
                raise AuthKeyRequiredError(
                    "this control server needs an auth key to join: create one with "
                    "`embedmesh control authkey create` and pass it to the node"
                )
            self._admit_keyless(source, now)
            return self._create(machine_key, request, None, now)
        key_id, digest = parse_auth_key(request.auth_key)
        key = check_auth_key(self.store.get_auth_key(key_id), digest, now)
        if existing is None:
            return self._create(machine_key, request, key, now)
        return self._reauthenticate(existing, request, key, now)

    def register_interactive(
        self, machine_key: bytes, request: RegisterRequest, user: str, now: float
    ) -> LiveNode:
        """Complete an interactive login: an admin vouches for the machine, as ``user``.

        The node joins authorized (the admin's action is the approval); a machine that is known
        already takes the new node key, as a re-authentication does.
        """
        if user not in {u.name for u in self.store.list_users()}:
            raise NotFoundError(f"no user {user!r}: create it with `embedmesh control users create {user}`")
        holder = self._by_node_key.get(request.node_key)
        existing = self._by_machine.get(machine_key)
        if holder is not None and holder is not existing:
            raise ConflictError("this node key belongs to another machine: generate a new node key")
        if existing is not None:
            self._update(
                existing,
                node_key=request.node_key,
                hostname=request.hostname,
                os=request.os,
                authorized=True,
                key_expiry=self._expiry_from(now),
                expired=False,
                user=user if not existing.rec.tags else existing.rec.user,
                **self._address_if_needed(existing, True),
            )
            return existing
        return self._create(machine_key, request, None, now, approved_by_admin=True, user=user)

    def _tags_for(self, request: RegisterRequest, key: AuthKeyRecord | None) -> tuple[str, ...]:
        """The tags a node registering with ``key`` carries: the ones it asks for, each of which
        the key must grant, or, if it asks for none, all the key grants. Tags are what peers
        authorize callers by (whois), so only an admin hands them out, through the key."""
        granted = key.tags if key is not None else ()
        refused = sorted(set(request.tags) - set(granted))
        if refused:
            if key is None:
                source = "a node that joins without an auth key carries no tags"
            elif not granted:
                source = f"auth key {key.id} grants no tags"
            else:
                source = f"auth key {key.id} grants only {', '.join(granted)}"
            raise TagNotPermittedError(
                f"tags {', '.join(refused)} not permitted: {source}; join with a key created by "
                f"`embedmesh control authkey create --tags {','.join(refused)}`, or drop --tags"
            )
        return tuple(sorted(request.tags)) if request.tags else tuple(sorted(granted))

    @staticmethod
    def _check_kept_tags(node: LiveNode, request: RegisterRequest) -> None:
        """A known node that rejoins without a new key keeps its tags; it cannot add any."""
        extra = sorted(set(request.tags) - set(node.rec.tags))
        if extra:
            held = ", ".join(node.rec.tags) or "no tags"
            raise TagNotPermittedError(
                f"tags {', '.join(extra)} not permitted: node {node.id} carries {held}, granted when it "
                f"joined; to change them an admin deletes it (`embedmesh control nodes delete {node.id}`) "
                "and it joins again with a key that grants them"
            )

    def _drop_ungranted_tags(self, rec: NodeRecord) -> None:
        """Strip tags a node holds without its key granting them (databases from before tags
        needed a grant, when a node could claim any tag)."""
        key = self.store.get_auth_key(rec.auth_key_id) if rec.auth_key_id is not None else None
        granted = set(key.tags) if key is not None else set()
        kept = tuple(t for t in rec.tags if t in granted)
        if kept != rec.tags:
            logger.warning(
                "node %d %s: dropped tags its auth key never granted: %s",
                rec.id,
                rec.name,
                ", ".join(t for t in rec.tags if t not in granted),
            )
            rec.tags = kept
            rec.user = _owner(kept, key)
            self.store.update_node(rec.id, tags=rec.tags, user=rec.user)

    def _admit_keyless(self, source: str | None, now: float) -> None:
        """Refuse a new keyless (pending) node when too many wait or its source sends too fast."""
        pending = sum(1 for node in self._nodes.values() if not node.rec.authorized)
        if pending >= self.config.max_pending:
            raise RegistrationLimitError(
                f"{pending} nodes already wait for approval, the most this server takes: ask an admin to "
                "approve or delete them (`embedmesh control nodes list`), or join with an auth key"
            )
        if source is None:
            return
        bucket = _source_bucket(source)
        burst, interval = self.config.keyless_burst, self.config.keyless_interval
        # A token bucket per source: `tokens` as of `stamp`, refilled one per interval up to burst.
        tokens, stamp = self._keyless_buckets.pop(bucket, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - stamp) / interval)
        if tokens < 1.0:
            self._keyless_buckets[bucket] = (tokens, now)
            wait = (1.0 - tokens) * interval
            raise RegistrationLimitError(
                f"too many registrations without an auth key from {source}: try again in "
                f"{wait:.0f} s, or join with an auth key",
                retry_after=wait,
            )
        self._keyless_buckets[bucket] = (tokens - 1.0, now)
        while len(self._keyless_buckets) > _MAX_BUCKETS:  # oldest first: bounded memory
            self._keyless_buckets.popitem(last=False)

    def _expiry_from(self, now: float) -> float | None:
        return None if self.config.key_expiry is None else now + self.config.key_expiry

    def _unique_name(self, hostname: str, exclude: LiveNode | None = None) -> str:
        base = sanitize_hostname(hostname)
        name, suffix = base, 0
        while (holder := self._by_name.get(name)) is not None and holder is not exclude:
            suffix += 1
            tail = f"-{suffix}"
            name = base[: 63 - len(tail)].rstrip("-") + tail
        return name

    def _take_name_from_pending(self, hostname: str) -> None:
        """A node that joins the mesh gets its name even if a pending node asked for it first.

        Names are claimed by whoever is in the mesh: an unapproved registration (anyone who can
        reach the server can make one) must not push a real ``web`` to ``web-1``. The pending node
        moves to a suffixed name and picks again when it is approved.
        """
        holder = self._by_name.get(sanitize_hostname(hostname))
        if holder is not None and not holder.rec.authorized:
            self._update(holder, name=self._unique_name(holder.rec.hostname, exclude=None))

    def _create(
        self,
        machine_key: bytes,
        request: RegisterRequest,
        key: AuthKeyRecord | None,
        now: float,
        *,
        approved_by_admin: bool = False,
        user: str | None = None,
    ) -> LiveNode:
        tags = self._tags_for(request, key)
        authorized = (
            approved_by_admin or not self.config.approval_required or (key is not None and key.preapproved)
        )
        if authorized:
            self._take_name_from_pending(request.hostname)
        # A node waiting for approval gets no address: anyone who reaches the server can make
        # one, and an address is what peers would route and MagicDNS would publish.
        address = self._pool.allocate() if authorized else None
        rec = NodeRecord(
            id=0,
            machine_key=machine_key,
            node_key=request.node_key,
            disco_key=request.disco_key,
            hostname=request.hostname,
            name=self._unique_name(request.hostname),
            os=request.os,
            tags=tags,
            ipv4=None if address is None else int(address),
            ephemeral=request.ephemeral or (key is not None and key.ephemeral),
            authorized=authorized,
            key_expiry=self._expiry_from(now),
            created=now,
            last_seen=now,
            auth_key_id=key.id if key is not None else None,
            user=user if user is not None and not tags else _owner(tags, key),
        )
        try:
            with self.store.transaction():
                self.store.insert_node(rec)
                if key is not None:
                    self.store.use_auth_key(key.id, now)
        except sqlite3.IntegrityError as exc:
            if address is not None:
                self._pool.release(address)
            raise ConflictError(f"could not register the node: {exc}") from exc
        except BaseException:
            if address is not None:
                self._pool.release(address)
            raise
        node = LiveNode(rec, endpoints=request.endpoints)
        self._index(node)
        if rec.key_expiry is not None:
            heapq.heappush(self._expiries, (rec.key_expiry, rec.id))
        logger.info(
            "registered node %d %s (%s)%s",
            rec.id,
            rec.name,
            address or "no address yet",
            "" if authorized else ", waiting for approval",
        )
        if node.in_mesh:
            self._fan_out(node, encode_op(PeerAdded(self.peer_info(node))))
        return node

    def _reauthenticate(
        self, node: LiveNode, request: RegisterRequest, key: AuthKeyRecord, now: float
    ) -> LiveNode:
        authorized = node.rec.authorized or not self.config.approval_required or key.preapproved
        tags = self._tags_for(request, key)
        with self.store.transaction():
            self.store.use_auth_key(key.id, now)
            self._update(
                node,
                node_key=request.node_key,
                disco_key=request.disco_key,
                hostname=request.hostname,
                os=request.os,
                tags=tags,
                user=_owner(tags, key),
                authorized=authorized,
                key_expiry=self._expiry_from(now),
                expired=False,
                auth_key_id=key.id,
                endpoints=request.endpoints,
                **self._address_if_needed(node, authorized),
            )
        logger.info("node %d %s re-authenticated with auth key %s", node.id, node.rec.name, key.id)
        return node

    def registered_message(self, node: LiveNode) -> bytes:
        state = node.state
        if state is NodeState.PENDING_APPROVAL:
            note = f"waiting for approval by an admin: run `embedmesh control nodes approve {node.id}`"
        elif state is NodeState.KEY_EXPIRED:
            note = (
                f"node key expired: re-authenticate with a new auth key, or an admin runs "
                f"`embedmesh control nodes approve {node.id}`"
            )
        else:
            note = ""
        return dumps({"type": "registered", "node_id": node.id, "state": state.value, "message": note})

    def attach(self, node_id: int, wake: Callable[[], None], now: float) -> Stream:
        """Start streaming maps to a registered node (replacing an older stream of the same node)."""
        node = self.node(node_id)
        old = self._streams.pop(node_id, None)
        if old is not None:
            old._push_message(
                _error_payload(SessionReplacedError("another connection of this node took over")), close=True
            )
        stream = Stream(node_id, wake, cursor=self.log_end)
        stream.outbox.append(self.registered_message(node))
        self._streams[node_id] = stream
        self._update(node, online=True, disconnected_at=None, last_seen=now)
        stream.wake()
        return stream

    def detach(self, stream: Stream, now: float) -> None:
        """The stream's connection ended (cleanly or not)."""
        self._parked.discard(stream)
        if self._streams.get(stream.node_id) is not stream:
            return
        del self._streams[stream.node_id]
        node = self._nodes.get(stream.node_id)
        if node is None:
            return
        self._update(node, online=False, disconnected_at=now, last_seen=now)
        if node.rec.ephemeral:
            heapq.heappush(self._reaps, (now + self.config.ephemeral_timeout, node.id))

    def update_endpoints(self, stream: Stream, endpoints: tuple[str, ...], now: float) -> None:
        node = self._nodes.get(stream.node_id)
        if node is not None and self._streams.get(node.id) is stream:
            self._update(node, endpoints=endpoints)

    def logout(self, stream: Stream, now: float) -> None:
        """Ephemeral nodes are deleted; others have their node key expired (re-auth needed)."""
        node = self._nodes.get(stream.node_id)
        if node is None or self._streams.get(node.id) is not stream:
            return
        stream._push_message(b'{"type":"logged_out"}', close=True)
        if node.rec.ephemeral:
            self._delete(node, None)
        else:
            self._update(node, key_expiry=now, expired=True)
        logger.info("node %d %s logged out", node.id, node.rec.name)

    def take(self, stream: Stream) -> list[bytes]:
        """The messages to send on ``stream`` now, in order (the queue is emptied)."""
        batch = self.take_batch(stream)
        out = batch.messages
        if batch.full_map is not None:
            out.append(self._full_map_payload(batch.full_map))
        elif batch.ops:
            out.append(encode_delta_ops(batch.ops))
        return out

    def take_batch(self, stream: Stream) -> Batch:
        """What to send on ``stream`` now, unrendered (the queue is emptied): the complete messages
        first, then either a full map for :attr:`Batch.full_map` (render it with
        :meth:`visible_peers`) or the encoded delta ops, shared with every other stream that gets
        them. A map API that renders its own format takes this instead of :meth:`take`, so that it
        renders each shared op once for all streams instead of parsing a delta per stream."""
        out = stream.outbox
        stream.outbox = []
        if stream.closing:
            return Batch(out)
        node = self._nodes.get(stream.node_id)
        end = self.log_end
        if stream.needs_full_map or (node is not None and stream.cursor < self._log_start):
            stream.needs_full_map = False
            stream.ops.clear()
            stream.cursor = end
            return Batch(out, full_map=node)
        fragments: list[bytes] = []
        if node is not None and node.in_mesh and stream.cursor < end:
            me = stream.node_id
            fragments = [op for source, op in self._log[stream.cursor - self._log_start :] if source != me]
        stream.cursor = end
        if stream.ops:
            # The stream's own ops touch only its own entry (or, outside allow-all, all of its
            # peer ops are here and the log is unused), so their order against the log's does not matter.
            fragments += stream.ops
            stream.ops = []
        if fragments:
            self.counters["ops_sent"] += len(fragments)
        return Batch(out, ops=fragments)

    def visible_peers(self, viewer: LiveNode) -> Iterator[LiveNode]:
        """The nodes in ``viewer``'s full map (none when it is outside the mesh)."""
        self.counters["full_maps"] += 1
        return self._visible_peers(viewer)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        deadlines = [heap[0][0] for heap in (self._expiries, self._reaps) if heap]
        return min(deadlines, default=None)

    def handle_timeout(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, node_id = heapq.heappop(self._expiries)
            node = self._nodes.get(node_id)
            if node is not None and node.rec.key_expiry == expiry and not node.expired:
                logger.info("node key of %d %s expired", node.id, node.rec.name)
                self._update(node, expired=True)
        while self._reaps and self._reaps[0][0] <= now:
            deadline, node_id = heapq.heappop(self._reaps)
            node = self._nodes.get(node_id)
            if (
                node is not None
                and not node.online
                and node.disconnected_at is not None
                and node.disconnected_at + self.config.ephemeral_timeout <= now
            ):
                logger.info("ephemeral node %d %s gone for %.0f s: deleted", node.id, node.rec.name, deadline)
                self._delete(node, None)

    # ------------------------------------------------------------------ admin operations

    def create_auth_key(
        self,
        *,
        reusable: bool = False,
        ephemeral: bool = False,
        preapproved: bool = False,
        tags: tuple[str, ...] = (),
        expiry: float | None = None,
        user: str | None = None,
        now: float,
    ) -> tuple[AuthKeyRecord, str]:
        """A new key; the text (with its secret) is returned once and never stored.

        ``user``: the user that the key's untagged nodes belong to (None: the default user).
        """
        if user is not None and user not in {u.name for u in self.store.list_users()}:
            raise NotFoundError(f"no user {user!r}: create it with `embedmesh control users create {user}`")
        # The key's tags go into its nodes' map entries, so they obey the wire format's rules.
        for tag in tags:
            if TAG_RE.fullmatch(tag) is None:
                raise BadRequestError(f"tag {tag!r} is not of the form tag:<lowercase-name>")
        if len(set(tags)) > MAX_TAGS:
            raise BadRequestError(f"an auth key grants at most {MAX_TAGS} tags")
        # Finite (NaN compares false to everything and would never expire) and bounded.
        if expiry is not None and not (math.isfinite(expiry) and 0 < expiry <= MAX_KEY_LIFETIME):
            raise BadRequestError("an auth key's expiry must be positive and at most 100 years (e.g. 1h, 7d)")
        key_id, text = new_auth_key(self._random_bytes(6), self._random_bytes(24))
        record = AuthKeyRecord(
            id=key_id,
            secret_sha256=parse_auth_key(text)[1],
            reusable=reusable,
            ephemeral=ephemeral,
            preapproved=preapproved,
            tags=tuple(sorted(set(tags))),
            created=now,
            expires=None if expiry is None else now + expiry,
            revoked=None,
            uses=0,
            last_used=None,
            user=None if user == DEFAULT_OWNER else user,
        )
        self.store.insert_auth_key(record)
        logger.info("auth key %s created", key_id)
        return record, text

    # ------------------------------------------------------------------ users

    def users(self) -> list[UserRecord]:
        return self.store.list_users()

    def create_user(self, name: str, display_name: str | None, now: float) -> UserRecord:
        """A new user; its untagged nodes join with keys created with ``--user``."""
        if USER_NAME_RE.fullmatch(name) is None or name == TAGGED_OWNER:
            raise BadRequestError(
                f"{name!r} is not a valid user name: use lowercase letters, digits and . _ @ + - "
                f"(at most 64; an email address works), and not {TAGGED_OWNER!r}"
            )
        display = name if display_name is None else display_name.strip()
        if not display or len(display) > MAX_DISPLAY_NAME or not display.isprintable():
            raise BadRequestError(f"a display name is 1 to {MAX_DISPLAY_NAME} printable characters")
        record = UserRecord(0, name, display, now)
        try:
            self.store.insert_user(record)
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"user {name!r} exists already: see `embedmesh control users list`") from exc
        logger.info("user %d %s created", record.id, name)
        return record

    def delete_user(self, name: str, now: float) -> None:
        """Delete a user that owns no node and no usable auth key (as headscale refuses to)."""
        if name not in {u.name for u in self.store.list_users()}:
            raise NotFoundError(f"no user {name!r}: see `embedmesh control users list`")
        if name == DEFAULT_OWNER:
            raise ConflictError("the default user cannot be deleted: nodes without a user belong to it")
        owned = sorted(str(n.id) for n in self._nodes.values() if n.rec.user == name)
        if owned:
            raise ConflictError(
                f"user {name!r} still owns nodes {', '.join(owned)}: delete them first "
                "(`embedmesh control nodes delete ID`)"
            )
        keys = [k.id for k in self.store.list_auth_keys() if k.user == name and k.state(now) == "valid"]
        if keys:
            raise ConflictError(
                f"user {name!r} still has usable auth keys {', '.join(keys)}: revoke them first "
                "(`embedmesh control authkey revoke ID`)"
            )
        with self.store.transaction():
            self.store.detach_auth_keys(name)
            self.store.delete_user(name)
        logger.info("user %s deleted", name)

    def revoke_auth_key(self, key_id: str, now: float) -> AuthKeyRecord:
        if self.store.get_auth_key(key_id) is None:
            raise NotFoundError(f"no auth key with id {key_id}: see `embedmesh control authkey list`")
        self.store.revoke_auth_key(key_id, now)
        record = self.store.get_auth_key(key_id)
        assert record is not None
        return record

    def _address_if_needed(self, node: LiveNode, authorized: bool) -> dict[str, Any]:
        """``{"ipv4": ...}`` from the pool for a node that is authorized now and has none yet."""
        if not authorized or node.rec.ipv4 is not None:
            return {}
        return {"ipv4": int(self._pool.allocate())}

    def approve(self, node_id: int, now: float) -> LiveNode:
        """Approve a pending node, or re-approve an expired one (its key gets a fresh expiry)."""
        node = self.node(node_id)
        if node.expired:
            self._update(node, authorized=True, key_expiry=self._expiry_from(now), expired=False)
        elif not node.rec.authorized:
            # Its name was only held while it waited: it takes its hostname now if that is free
            # (a suffix otherwise), the way a node with a key would have at registration.
            self._take_name_from_pending(node.rec.hostname)
            self._update(
                node,
                authorized=True,
                name=self._unique_name(node.rec.hostname, exclude=node),
                **self._address_if_needed(node, True),
            )
        logger.info("node %d %s approved", node.id, node.rec.name)
        return node

    def expire(self, node_id: int, now: float) -> LiveNode:
        node = self.node(node_id)
        if not node.expired:
            self._update(node, key_expiry=now, expired=True)
        return node

    def rename(self, node_id: int, name: str) -> LiveNode:
        node = self.node(node_id)
        if LABEL_RE.fullmatch(name) is None:
            raise BadRequestError(
                f"{name!r} is not a valid name: use lowercase letters, digits and dashes (at most 63)"
            )
        holder = self._by_name.get(name)
        if holder is not None and holder is not node:
            raise ConflictError(
                f"name {name!r} is taken by node {holder.id}: pick another or rename that one"
            )
        self._update(node, name=name)
        return node

    def delete(self, node_id: int) -> None:
        node = self.node(node_id)
        error: ControlError
        if not node.rec.authorized:
            error = ApprovalRefusedError(
                "an admin refused this node's registration; ask for an auth key "
                "(`embedmesh control authkey create`)"
            )
        else:
            error = NodeDeletedError("an admin deleted this node: join again with a new auth key")
        self._delete(node, error)

    def _delete(self, node: LiveNode, error: ControlError | None) -> None:
        was_in_mesh = node.in_mesh
        self.store.delete_node(node.id)
        self._unindex(node)
        if node.rec.ipv4 is not None:
            self._pool.release(IPv4Address(node.rec.ipv4))
        stream = self._streams.pop(node.id, None)
        if stream is not None and error is not None:
            stream._push_message(_error_payload(error), close=True)
        elif stream is not None:
            stream.closing = True
            stream.wake()
        if was_in_mesh:
            self._fan_out(node, encode_op(PeerRemoved(node.id)))
        self.counters["changes"] += 1

    def describe(self, node: LiveNode) -> dict[str, Any]:
        """A node for the admin API (JSON-ready)."""
        info = self.peer_info(node)
        return {
            "id": node.id,
            "name": node.rec.name,
            "hostname": node.rec.hostname,
            "fqdn": info.fqdn,
            "addresses": [str(a) for a in info.addresses],
            "state": node.state.value,
            "online": node.online,
            "last_seen": node.rec.last_seen,
            "endpoints": list(node.endpoints),
            "tags": list(node.rec.tags),
            "user": node.rec.user,
            "os": node.rec.os,
            "ephemeral": node.rec.ephemeral,
            "key_expiry": node.rec.key_expiry,
            "created": node.rec.created,
            "machine_key": _encode_key(node.rec.machine_key),
            "node_key": _encode_key(node.rec.node_key),
            "auth_key_id": node.rec.auth_key_id,
        }
